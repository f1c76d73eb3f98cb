"""The paper's Figures 6-8: AM beyond fully connected nets, against backprop, on MNIST.

- fig6: sequential MNIST (784 steps of one pixel), Elman RNN with 15 tanh units and a ReLU
  readout, minibatch 1024: AM-Adam vs SGD (paper: AM-Adam ahead of SGD up to epoch 6);
- fig7: LeNet-5, minibatch 200: AM-Adam vs SGD vs Adam (paper: AM-Adam above SGD, below Adam);
- fig8: the binary net of Lee et al., 784-500-500-10 with ``sign`` after hidden layer 1 and
  ``tanh`` after layer 2, minibatch 200: AM-Adam vs straight-through (STE) backprop
  (target: test error <= 3% within 20 epochs).

Every method's learning rate (and AM-Adam's output-layer rate, where a figure has an
``out_grid``) is chosen first on a validation split (train on the first 50,000
training images for ``--tune-epochs``, score on the last 10,000; the test set is not looked
at), then each method trains on all 60,000 for ``--epochs`` with the rates halved every
``--decay-epochs`` epochs, test accuracy after every epoch (and every few minibatches of the
first epoch, the paper's insets). All methods run in this one process, on the same seeds.

    python benchmarks/beyond_mlp.py --figures fig7 --epochs 10 --seeds 1 2 3
    python benchmarks/beyond_mlp.py --quick                # every figure, tiny, a few minutes
    python benchmarks/beyond_mlp.py --figures fig6 --device cuda

Writes ``curves.csv``, ``tuning.csv``, ``<figure>.png`` and ``summary.md`` under ``--out``
(default ``benchmarks/results/beyond_mlp``), rewritten after every run.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from amstream import AMConfig, make_learner
from amstream.datasets import load_dataset
from amstream.training import evaluate, iter_training

HERE = Path(__file__).resolve().parent

FIGURES: dict[str, dict] = {
    "fig6": dict(
        title="Figure 6: sequential MNIST, Elman RNN (784 steps, 15 units)",
        arch="784-rnn15-10", activation="relu", batch=1024, inset_every=5,
        methods={"am-adam": dict(algo="am-adam"), "sgd": dict(algo="sgd", momentum=0.9)},
        grid={"am-adam": [1e-3, 3e-3, 1e-2], "sgd": [0.01, 0.03, 0.1]},
        out_grid={"am-adam": [1e-3, 1e-2]},
    ),
    # not in the paper: the same net reading a row (28 pixels) per step, 28 steps, where both
    # methods learn within a CPU budget
    "fig6-rows": dict(
        title="Figure 6 variant: row-by-row MNIST, Elman RNN (28 steps of 28 pixels, 15 units)",
        arch="28x28-rnn15-10", activation="relu", batch=1024, inset_every=5,
        methods={"am-adam": dict(algo="am-adam"), "sgd": dict(algo="sgd", momentum=0.9)},
        grid={"am-adam": [1e-3, 3e-3, 1e-2], "sgd": [0.01, 0.03, 0.1]},
    ),
    # issue 16: the row-by-row task with 64 units, AM-Adam beside Adam backprop
    "fig6-rows64": dict(
        title="Row-by-row MNIST, Elman RNN (28 steps of 28 pixels, 64 units)",
        arch="28x28-rnn64-10", activation="relu", batch=200, inset_every=20,
        methods={"am-adam": dict(algo="am-adam"), "adam": dict(algo="adam")},
        grid={"am-adam": [3e-4, 1e-3, 3e-3], "adam": [1e-3, 3e-3, 1e-2]},
        out_grid={"am-adam": [1e-3, 3e-3, 1e-2]},
    ),
    "fig7": dict(
        title="Figure 7: LeNet-5 on MNIST",
        arch="lenet5", activation="relu", batch=200, inset_every=10,
        methods={"am-adam": dict(algo="am-adam"), "sgd": dict(algo="sgd", momentum=0.9),
                 "adam": dict(algo="adam")},
        grid={"am-adam": [1e-3, 3e-3, 1e-2], "sgd": [0.01, 0.03, 0.1], "adam": [3e-4, 1e-3, 3e-3]},
    ),
    "fig8": dict(
        title="Figure 8: binary net 784-500-500-10 (sign, tanh)",
        arch=(784, 500, 500, 10), activation=("sign", "tanh"), batch=200, inset_every=10,
        methods={"am-adam": dict(algo="am-adam"), "ste": dict(algo="ste")},
        grid={"am-adam": [1e-3, 3e-3, 8e-3], "ste": [3e-4, 1e-3, 3e-3]},
    ),
}
COLORS = {"am-adam": "tab:red", "sgd": "tab:blue", "adam": "tab:green", "ste": "tab:purple"}


def config_for(fig: dict, method: str, lr: float, seed: int, per_epoch: int, decay_epochs: int,
               lr_out: float | None = None) -> AMConfig:
    """``lr_out``: AM's output-layer rate where the figure tunes it apart (``out_grid``), else ``lr``."""
    kwargs = dict(fig["methods"][method])
    if kwargs["algo"] == "am-adam":
        kwargs["lr_out"] = lr_out or lr
    return AMConfig(arch=fig["arch"], activation=fig["activation"], seed=seed, lr=lr,
                    lr_decay_every=decay_epochs * per_epoch if decay_epochs else 0, **kwargs)


def train(cfg: AMConfig, x, y, *, epochs, batch, seed, device, x_test, y_test, inset_every, on_epoch=None):
    """The curve of (epochs done, "end" or the minibatch within the first epoch, test accuracy,
    training seconds) of one learner."""
    learner = make_learner(cfg, device=device)
    per_epoch = -(-len(x) // batch)
    inset = range(inset_every, per_epoch + 1, inset_every) if inset_every else ()
    curve = []
    for event in iter_training(learner, x, y, epochs=epochs, batch_size=batch, seed=seed, x_test=x_test,
                               y_test=y_test, eval_minibatches=inset):
        if event.kind == "minibatch" and event.test:
            curve.append((event.minibatch / per_epoch, event.minibatch, event.test["accuracy"], event.seconds))
        elif event.kind == "epoch":
            curve.append((float(event.epoch), "end", event.test["accuracy"], event.seconds))
            if on_epoch:
                on_epoch(event)
    return curve


def tune(name: str, fig: dict, data, *, epochs: int, seed: int, device, decay_epochs: int, limit) -> list[dict]:
    """Each method's learning rate on a validation split: the last 10,000 training images."""
    x, y = data.x_train, data.y_train
    n_val = min(10_000, len(x) // 6)
    xt, yt, xv, yv = x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:]
    if limit:
        xt, yt = xt[:limit], yt[:limit]
    per_epoch = -(-len(xt) // fig["batch"])
    rows = []
    out_grid = fig.get("out_grid", {})
    for method, rates in fig["grid"].items():
        for lr in rates:
            for lr_out in out_grid.get(method, [lr]):
                t0 = time.perf_counter()
                cfg = config_for(fig, method, lr, seed, per_epoch, decay_epochs, lr_out)
                curve = train(cfg, xt, yt, epochs=epochs, batch=fig["batch"], seed=seed, device=device,
                              x_test=xv, y_test=yv, inset_every=0)
                rows.append({"figure": name, "method": method, "lr": lr, "lr_out": lr_out,
                             "val_accuracy": curve[-1][2], "seconds": round(time.perf_counter() - t0, 1)})
                apart = f" lr_out={lr_out:g}" if method in out_grid else ""
                print(f"  tune {name} {method} lr={lr:g}{apart}: validation accuracy {curve[-1][2]:.4f}", flush=True)
    return rows


def best_rates(tuning: list[dict], name: str) -> dict[str, tuple[float, float]]:
    """Each method's (lr, lr_out) with the best validation accuracy."""
    best: dict[str, tuple[float, float, float]] = {}
    for r in tuning:
        if r["figure"] == name and r["val_accuracy"] > best.get(r["method"], (-1.0, 0.0, 0.0))[0]:
            best[r["method"]] = (r["val_accuracy"], r["lr"], _lr_out(r))
    return {m: (lr, lr_out) for m, (_, lr, lr_out) in best.items()}


def _lr_out(row: dict) -> float:
    """A run's output-layer rate (rows written before ``out_grid`` have none: the same as lr)."""
    return row.get("lr_out") or row["lr"]


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k, v in r.items():
            if k in ("figure", "method", "minibatch_in_epoch"):
                continue
            r[k] = float(v) if "." in v or "e" in v or v == "nan" else int(v)
        if r.get("minibatch_in_epoch", "end") != "end":
            r["minibatch_in_epoch"] = int(r["minibatch_in_epoch"])
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def summarize(rows: list[dict], tuning: list[dict], meta: dict, figures: list[str]) -> str:
    lines = ["# Beyond MLPs: the paper's Figures 6-8 on CPU", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    for name in figures:
        fig = FIGURES[name]
        mine = [r for r in rows if r["figure"] == name and r["minibatch_in_epoch"] == "end"]
        if not mine:
            continue
        rates = {r["method"]: (r["lr"], _lr_out(r)) for r in mine}
        tuned = {r["method"] for r in tuning if r["figure"] == name and r["val_accuracy"] == r["val_accuracy"]}
        lines += ["", f"## {fig['title']}", "",
                  f"arch `{AMConfig(arch=fig['arch']).arch_string()}`, activation {fig['activation']}, minibatch "
                  f"{fig['batch']}; learning rates: "
                  + ", ".join(f"{m} {lr:g}{f' (output layer {out:g})' if out != lr else ''} "
                              f"({'chosen on validation' if m in tuned else 'given'})"
                              for m, (lr, out) in rates.items()), ""]
        epochs = sorted({int(r["epoch"]) for r in mine})
        methods = [m for m in fig["methods"] if any(r["method"] == m for r in mine)]
        lines.append("| epoch | " + " | ".join(f"{m} test acc (mean ± sd, seeds)" for m in methods) + " |")
        lines.append("|---|" + "---|" * len(methods))
        means: dict[str, dict[int, float]] = {m: {} for m in methods}
        for e in epochs:
            cells = []
            for m in methods:
                accs = [r["test_accuracy"] for r in mine if r["method"] == m and int(r["epoch"]) == e]
                if accs:
                    means[m][e] = float(np.mean(accs))
                    cells.append(f"{np.mean(accs):.4f} ± {np.std(accs):.4f} ({len(accs)})")
                else:
                    cells.append("-")
            lines.append(f"| {e} | " + " | ".join(cells) + " |")
        secs = {m: np.mean([r["seconds"] / max(1, int(r["epoch"])) for r in mine if r["method"] == m])
                for m in methods}
        lines += ["", "Seconds per epoch (training and the per-epoch test pass): "
                  + ", ".join(f"{m} {s:.1f}" for m, s in secs.items())]
        lines += ["", *claims(name, means)]
    return "\n".join(lines) + "\n"


def claims(name: str, means: dict[str, dict[int, float]]) -> list[str]:
    """The paper's claim for the figure, checked against the measured means."""
    out = []
    if name.startswith("fig6") and means.get("am-adam") and means.get("sgd"):
        ahead = [e for e in means["am-adam"] if e in means["sgd"] and means["am-adam"][e] > means["sgd"][e]]
        out.append(f"Paper: AM-Adam ahead of SGD up to epoch 6. Measured: AM-Adam ahead at epochs {ahead or 'none'}.")
    if name == "fig7" and all(means.get(m) for m in ("am-adam", "sgd", "adam")):
        last = max(means["am-adam"])
        a, s, d = (means[m].get(last, float("nan")) for m in ("am-adam", "sgd", "adam"))
        out.append(f"Paper: AM-Adam above SGD, below Adam. Measured at epoch {last}: AM-Adam {a:.4f}, SGD {s:.4f}, "
                   f"Adam {d:.4f} -> above SGD: {'yes' if a > s else 'no'}, below Adam: {'yes' if a < d else 'no'}.")
    if name == "fig8" and means.get("am-adam"):
        best = {m: (min(v, key=lambda e: 1 - v[e]), max(v.values())) for m, v in means.items()}
        for m, (e, acc) in best.items():
            out.append(f"{m}: best mean test error {100 * (1 - acc):.2f}% (epoch {e}).")
        reached = [e for e, acc in sorted(means["am-adam"].items()) if acc >= 0.97 and e <= 20]
        out.append(f"Target: AM-Adam test error <= 3% within 20 epochs: "
                   f"{'met at epoch ' + str(reached[0]) if reached else 'NOT met'}.")
    return out


def plot(rows: list[dict], name: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = FIGURES[name]
    mine = [r for r in rows if r["figure"] == name]
    if not mine:
        return
    error = name == "fig8"
    f, ax = plt.subplots(figsize=(7, 4.5))
    inset = ax.inset_axes([0.45, 0.12, 0.5, 0.42]) if not error else None
    for method in fig["methods"]:
        rs = [r for r in mine if r["method"] == method]
        if not rs:
            continue
        xs = sorted({r["x"] for r in rs})
        ys = np.array([[r["test_accuracy"] for r in rs if r["x"] == x] for x in xs], dtype=object)
        mean = np.array([np.mean(v) for v in ys])
        sd = np.array([np.std(v) for v in ys])
        vals = 100 * (1 - mean) if error else mean
        band = 100 * sd if error else sd
        ends_x = {r["x"] for r in rs if r["minibatch_in_epoch"] == "end"}
        xs = np.array(xs)
        ends = np.array([x in ends_x for x in xs])
        ax.plot(xs[ends], vals[ends], "o-", color=COLORS[method], label=method)
        ax.fill_between(xs[ends], (vals - band)[ends], (vals + band)[ends], color=COLORS[method], alpha=0.2)
        if inset is not None:
            first = xs <= 1
            inset.plot(xs[first], vals[first], color=COLORS[method])
    ax.set_xlabel("epoch")
    ax.set_ylabel("test error (%)" if error else "test accuracy")
    if error:
        from matplotlib.ticker import ScalarFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.axhline(3.0, color="gray", ls="--", lw=0.8)
    if inset is not None:
        inset.set_title("first epoch", fontsize=8)
        inset.tick_params(labelsize=7)
    seeds = sorted({r["seed"] for r in mine})
    ax.set_title(f"{fig['title']}\nmean ± sd over seeds {seeds}", fontsize=9)
    ax.legend(loc="upper left" if not error else "upper right")
    f.tight_layout()
    f.savefig(out / f"{name}.png", dpi=110)
    plt.close(f)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--figures", nargs="+", default=list(FIGURES), choices=list(FIGURES))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--tune-epochs", type=int, default=1)
    p.add_argument("--decay-epochs", type=int, default=4, help="halve the learning rates every this many epochs")
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                   help="use this learning rate for METHOD instead of tuning it; with --methods, "
                        "e.g. --methods am-adam --lr am-adam=0.003 (repeatable)")
    p.add_argument("--methods", nargs="+", default=None, help="a subset of the figure's methods")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a few thousand images, 2 epochs, 1 seed")
    p.add_argument("--replot", action="store_true", help="redraw the plots and summary from --out's CSVs")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or HERE / "results" / ("beyond_mlp_quick" if args.quick else "beyond_mlp")
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset("mnist", limit=6000 if args.quick else None)
    epochs, seeds = (2, args.seeds[:1]) if args.quick else (args.epochs, args.seeds)
    device = torch.device(args.device)
    meta = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "device": f"{device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
                  + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""),
        "threads": f"torch.set_num_threads({args.threads})",
        "torch": torch.__version__,
        "data": f"MNIST {len(data.x_train):,} train / {len(data.x_test):,} test (pixels / 255)",
        "seeds": seeds, "epochs": epochs, "lr halved every": f"{args.decay_epochs} epochs",
        "tuning": f"{args.tune_epochs} epoch(s) on the first {len(data.x_train) - min(10_000, len(data.x_train) // 6):,} "
                  "training images, scored on the rest",
        "load average at start": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    rows: list[dict] = []
    tuning: list[dict] = []
    if args.replot:
        rows, tuning = _read_csv(out / "curves.csv"), _read_csv(out / "tuning.csv")
        meta = {}  # the run's own, from the summary it wrote
        for line in (out / "summary.md").read_text().split("\n## ")[0].splitlines():
            if line.startswith("- ") and ": " in line:
                key, value = line[2:].split(": ", 1)
                meta[key] = value

    def save():
        if not args.replot:
            meta["load average at end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
        write_csv(out / "curves.csv", rows)
        write_csv(out / "tuning.csv", tuning)
        (out / "summary.md").write_text(summarize(rows, tuning, meta, args.figures))
        for name in args.figures:
            plot(rows, name, out)

    if args.replot:
        save()
        print((out / "summary.md").read_text())
        return 0
    fixed = {}
    for item in args.lr:
        method, _, value = item.partition("=")
        fixed[method.strip()] = float(value)
    for name in args.figures:
        fig = dict(FIGURES[name])
        if args.methods:
            fig["methods"] = {m: v for m, v in fig["methods"].items() if m in args.methods}
            fig["grid"] = {m: v for m, v in fig["grid"].items() if m in args.methods}
        fig["grid"] = {m: v for m, v in fig["grid"].items() if m not in fixed}
        print(f"{fig['title']}: tuning", flush=True)
        tuning += tune(name, fig, data, epochs=args.tune_epochs, seed=0, device=device,
                       decay_epochs=args.decay_epochs, limit=None)
        tuning += [{"figure": name, "method": m, "lr": lr, "lr_out": lr, "val_accuracy": float("nan"),
                    "seconds": 0.0} for m, lr in fixed.items() if m in fig["methods"]]
        rates = best_rates(tuning, name)
        rates.update({m: (lr, lr) for m, lr in fixed.items() if m in fig["methods"]})
        per_epoch = -(-len(data.x_train) // fig["batch"])
        for seed in seeds:
            for method, (lr, lr_out) in rates.items():
                cfg = config_for(fig, method, lr, seed, per_epoch, args.decay_epochs, lr_out)

                def log(event, method=method, seed=seed):
                    print(f"  {name} {method} seed {seed} epoch {event.epoch}: test accuracy "
                          f"{event.test['accuracy']:.4f} ({event.seconds:.0f} s)", flush=True)

                curve = train(cfg, data.x_train, data.y_train, epochs=epochs, batch=fig["batch"], seed=seed,
                              device=device, x_test=data.x_test, y_test=data.y_test,
                              inset_every=fig["inset_every"], on_epoch=log)
                for x, mb, acc, secs in curve:
                    rows.append({"figure": name, "method": method, "seed": seed, "lr": lr, "lr_out": lr_out,
                                 "x": round(x, 4),
                                 "epoch": int(np.ceil(x)), "minibatch_in_epoch": mb,
                                 "test_accuracy": acc, "test_error": round(1 - acc, 4), "seconds": round(secs, 2)})
                save()
    save()
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
