"""The race: wall clock and minibatches each method needs to first reach a target test accuracy.

All methods train in this one process on the same shuffled minibatches, interleaved step by
step (one minibatch for each method in turn, the order alternating), so that noise from other
jobs on shared cores hits every method alike. Only ``learner.learn`` is timed; evaluation is
not. Each method is evaluated on the test set every ``--eval-every`` minibatches, and after
every minibatch once it is within ``--dense-margin`` of its next target, so the minibatch at
which it first reaches a target is exact up to that rule.

Learning rates are chosen first, on a validation split (train on the first 50,000 training
images, score on the last 10,000; the test set is not read): every method runs the same race
on that split with every rate of ``--grid`` (the same grid for every method) and keeps the rate
that reaches each target in the fewest minibatches (ties: the higher validation accuracy at the
end). For AM-Adam a rate sets the hidden layers' ``lr`` and the output layer's ``lr_out`` is
scaled with it by the ratio of the method's own settings (AMConfig's defaults: ``lr_out`` =
``lr``). SGD, whose rates are an order of magnitude larger, takes ``--sgd-grid``.

    python benchmarks/time_to_accuracy.py --arch 784-500-500-10 --targets 0.95 0.97
    python benchmarks/time_to_accuracy.py --arch lenet5 --targets 0.98 --eval-every 5
    python benchmarks/time_to_accuracy.py --dataset fashion-mnist --arch 784-500-500-10 --targets 0.85
    python benchmarks/time_to_accuracy.py --threads 2 --tag _2threads
    python benchmarks/time_to_accuracy.py --device cuda --batch-size 1000 --targets 0.97

Writes ``race.csv`` (first time each method reached each target, per seed), ``curves.csv``
(every evaluation), ``tuning.csv``, ``race.png`` (accuracy against training seconds and
against samples) and ``summary.md`` under ``benchmarks/results/time_to_accuracy/<name>``.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from amstream import AMConfig, make_learner
from amstream.config import parse_arch
from amstream.datasets import load_dataset
from amstream.training import evaluate

HERE = Path(__file__).resolve().parent

#: the methods a race can run: AMConfig fields over the defaults (AM's defaults are the product)
METHODS: dict[str, dict[str, Any]] = {
    "am-adam": dict(algo="am-adam"),
    "adam": dict(algo="adam"),
    "sgd": dict(algo="sgd"),
    "am-mem": dict(algo="am-mem"),
}
GRID = (1e-3, 2e-3, 3e-3, 5e-3, 8e-3)
SGD_GRID = (0.01, 0.03, 0.1)
COLORS = {"am-adam": "tab:red", "adam": "tab:green", "sgd": "tab:blue", "am-mem": "tab:orange"}


def config_for(method: str, lr: float, *, arch, seed: int, extra: dict) -> AMConfig:
    """The method's config with its learning rate(s) set from ``lr`` (see the module docstring)."""
    kwargs = {**METHODS.get(method, {}), **extra.get(method, {})}
    base = AMConfig(arch=arch, seed=seed, **kwargs)
    if base.is_am and not base.uses_memory:
        return base.replace(lr=lr, lr_out=lr * base.lr_out / base.lr)
    if base.uses_memory:
        return base.replace(lr_out=lr)
    return base.replace(lr=lr)


@dataclass
class Runner:
    """One learner in a race and what it has done so far."""

    name: str
    config: AMConfig
    learner: Any
    targets: list[float]
    seconds: float = 0.0
    minibatches: int = 0
    last_acc: float = 0.0
    reached: dict[float, tuple[int, float, int]] = field(default_factory=dict)  # target -> (mb, s, samples)
    curve: list[tuple[int, int, float, float]] = field(default_factory=list)  # (mb, samples, s, acc)

    @property
    def done(self) -> bool:
        return len(self.reached) == len(self.targets)

    def next_target(self) -> float:
        return min((t for t in self.targets if t not in self.reached), default=1.0)


def race(configs: dict[str, AMConfig], x, y, x_eval, y_eval, *, targets, batch_size: int, seed: int,
         max_epochs: float, eval_every: int, dense_margin: float, device, progress=None) -> list[Runner]:
    """Train every config on the same minibatches, interleaved, until each has reached every
    target on (x_eval, y_eval) or ``max_epochs`` have passed."""
    runners = [Runner(name, cfg, make_learner(cfg, device=device), sorted(targets)) for name, cfg in configs.items()]
    xt, yt = torch.as_tensor(x, device=device), torch.as_tensor(y, device=device)
    rng = np.random.default_rng(seed)
    n = len(x)
    per_epoch = -(-n // batch_size)
    total = int(max_epochs * per_epoch)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    order = None
    for step in range(total):
        if step % per_epoch == 0:
            order = torch.as_tensor(rng.permutation(n), device=device)
        live = [r for r in runners if not r.done]
        if not live:
            break
        s = (step % per_epoch) * batch_size
        idx = order[s:s + batch_size]
        xb, yb = xt[idx], yt[idx]
        for r in (live if step % 2 == 0 else live[::-1]):
            sync()
            t0 = time.perf_counter()
            r.learner.learn(xb, yb)
            sync()
            r.seconds += time.perf_counter() - t0
            r.minibatches += 1
            near = r.next_target() - r.last_acc <= dense_margin
            if near or r.minibatches % eval_every == 0 or step == total - 1:
                r.last_acc = evaluate(r.learner, x_eval, y_eval)["accuracy"]
                samples = r.learner.n_samples
                r.curve.append((r.minibatches, samples, r.seconds, r.last_acc))
                for t in r.targets:
                    if t not in r.reached and r.last_acc >= t:
                        r.reached[t] = (r.minibatches, r.seconds, samples)
        if progress is not None:
            progress.update(1)
            progress.set_postfix({r.name: f"{r.last_acc:.3f}" for r in runners}, refresh=False)
    return runners


def tune(methods, grids, data, args, targets) -> tuple[dict[tuple[str, float], float], list[dict]]:
    """Per (method, target), the rate of its grid that reaches the target first on the validation
    split (the last 10,000 training images), in one interleaved race of every (method, rate)."""
    n_val = min(10_000, len(data.x_train) // 6)
    xt, yt = data.x_train[:-n_val], data.y_train[:-n_val]
    xv, yv = data.x_train[-n_val:], data.y_train[-n_val:]
    configs = {f"{m}@{lr:g}": config_for(m, lr, arch=args.arch, seed=args.tune_seed,
                                         extra=args.extra)
               for m in methods for lr in grids[m]}
    runners = race(configs, xt, yt, xv, yv, targets=targets, batch_size=args.batch_size, seed=args.tune_seed,
                   max_epochs=args.max_epochs, eval_every=args.eval_every, dense_margin=args.dense_margin,
                   device=args.device, progress=_bar(args, "tune"))
    rows, best = [], {}
    for r in runners:
        method, lr = r.name.split("@")
        for t in targets:
            mb, sec, _ = r.reached.get(t, (None, None, None))
            rows.append(dict(method=method, lr=float(lr), target=t, val_minibatches=mb,
                             val_seconds=None if sec is None else round(sec, 3),
                             val_final_accuracy=round(r.last_acc, 4), val_minibatches_run=r.minibatches))
    for m in methods:
        for t in targets:
            mine = [row for row in rows if row["method"] == m and row["target"] == t]
            key = min(mine, key=lambda row: (row["val_minibatches"] is None, row["val_minibatches"] or 0,
                                             -row["val_final_accuracy"]))
            best[(m, t)] = key["lr"]
    return best, rows


def _bar(args, desc):
    if args.no_progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc=desc, unit="mb", dynamic_ncols=True)


def plot(curves: list[dict], out: Path, title: str, targets) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "train_seconds", "training seconds (evaluation excluded)"),
                           (axes[1], "samples", "training samples")):
        for (method, lr, seed) in sorted({(c["method"], c["lr"], c["seed"]) for c in curves}):
            sel = [c for c in curves if (c["method"], c["lr"], c["seed"]) == (method, lr, seed)]
            first = seed == min(c["seed"] for c in curves if c["method"] == method)
            ax.plot([c[key] for c in sel], [c["test_accuracy"] for c in sel], color=COLORS.get(method),
                    alpha=0.8, lw=1, label=f"{method} (lr {lr:g})" if first else None)
        for t in targets:
            ax.axhline(t, color="gray", ls="--", lw=0.7)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.set_ylim(max(0.0, min(targets) - 0.1), min(1.0, max(targets) + 0.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "race.png", dpi=110)
    plt.close(fig)


def summarize(results: list[dict], meta: dict, methods, targets, reference: str | None) -> str:
    lines = ["# Time to accuracy", ""] + [f"- {k}: {v}" for k, v in meta.items()] + [""]
    seeds = sorted({r["seed"] for r in results})
    for t in targets:
        lines += [f"## Target {t:g} test accuracy", "",
                  "| method | lr (chosen on validation) | minibatches (per seed) | train seconds (per seed) | "
                  "mean minibatches | mean seconds |"
                  + (f" seconds / {reference}'s (per seed) |" if reference else ""),
                  "|---|---|---|---|---|---|" + ("---|" if reference else "")]
        for m in methods:
            rows = {r["seed"]: r for r in results if r["method"] == m and r["target"] == t}
            mbs = [rows[s]["minibatches"] if s in rows else None for s in seeds]
            secs = [rows[s]["train_seconds"] if s in rows else None for s in seeds]
            lr = next((r["lr"] for r in rows.values()), float("nan"))
            cell = lambda vs, f: " / ".join("—" if v is None else f.format(v) for v in vs)  # noqa: E731
            ok = [v for v in mbs if v is not None]
            mean_mb = f"{np.mean(ok):.1f}" if len(ok) == len(seeds) else f"{len(ok)}/{len(seeds)} reached"
            ok_s = [v for v in secs if v is not None]
            mean_s = f"{np.mean(ok_s):.2f}" if len(ok_s) == len(seeds) else "—"
            line = f"| {m} | {lr:g} | {cell(mbs, '{}')} | {cell(secs, '{:.2f}')} | {mean_mb} | {mean_s} |"
            if reference:
                ref = {r["seed"]: r for r in results if r["method"] == reference and r["target"] == t}
                ratios = [rows[s]["train_seconds"] / ref[s]["train_seconds"]
                          if s in rows and s in ref and rows[s]["train_seconds"] is not None
                          and ref[s]["train_seconds"] else None for s in seeds]
                ok_r = [v for v in ratios if v is not None]
                line += f" {cell(ratios, '{:.2f}')}" + (f" (mean {np.mean(ok_r):.2f})" if ok_r else "") + " |"
            lines.append(line)
        lines.append("")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    if rows:
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--arch", default="784-500-500-10")
    p.add_argument("--methods", nargs="+", default=["am-adam", "adam"])
    p.add_argument("--set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="an AMConfig field for one method, over its defaults (repeatable)")
    p.add_argument("--targets", nargs="+", type=float, default=[0.95, 0.97])
    p.add_argument("--grid", nargs="+", type=float, default=list(GRID))
    p.add_argument("--sgd-grid", nargs="+", type=float, default=list(SGD_GRID))
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                   help="race METHOD at this rate for every target instead of tuning it (repeatable)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--tune-seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--max-epochs", type=float, default=3.0, help="give up on a target after this many epochs")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--dense-margin", type=float, default=0.01,
                   help="evaluate after every minibatch once this close to the next target")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--reference", default="adam", help="report every method's seconds over this one's")
    p.add_argument("--tag", default="")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--tune-only", action="store_true",
                   help="only the validation race (to compare settings without reading the test set)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from amstream.commands.common import parse_key_values

    args.extra = {}
    for item in args.set:
        method, _, kv = item.partition(":")
        args.extra.setdefault(method, {}).update(parse_key_values([kv], "--set"))
    unknown = [m for m in args.methods if m not in METHODS and m not in args.extra]
    if unknown:
        p.error(f"unknown methods {unknown}: use {sorted(METHODS)} or define one with --set NAME:algo=...")
    data = load_dataset(args.dataset)
    args.arch = parse_arch(args.arch)
    arch_name = AMConfig(arch=args.arch).arch_string()
    name = f"{data.name}_{arch_name.replace('x', 'by')}_b{args.batch_size}_t{args.threads}" + args.tag
    out = args.out or HERE / "results" / "time_to_accuracy" / name
    out.mkdir(parents=True, exist_ok=True)
    targets = sorted(args.targets)
    fixed = {}
    for item in args.lr:
        method, _, value = item.partition("=")
        fixed[method.strip()] = float(value)
    device_name = args.device if args.device == "cpu" else torch.cuda.get_device_name()
    meta = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python benchmarks/time_to_accuracy.py " + " ".join(argv if argv is not None else
                                                                       __import__("sys").argv[1:]),
        "data": f"{data.name} {len(data.x_train):,} train / {len(data.x_test):,} test",
        "arch": arch_name, "batch": args.batch_size, "seeds": args.seeds,
        "device": f"{device_name} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "threads": f"torch.set_num_threads({args.threads})", "torch": torch.__version__,
        "evaluation": f"test set every {args.eval_every} minibatches, every minibatch within "
                      f"{args.dense_margin} of a target (excluded from the seconds)",
        "method settings": json.dumps({m: {**METHODS.get(m, {}), **args.extra.get(m, {})} for m in args.methods}),
        "load average at start": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    def algo_of(m):
        return {**METHODS.get(m, {}), **args.extra.get(m, {})}.get("algo", AMConfig.algo)

    grids = {m: [] if m in fixed else (args.sgd_grid if algo_of(m) == "sgd" else args.grid) for m in args.methods}
    best, tuning = {}, []
    to_tune = [m for m in args.methods if m not in fixed]
    if to_tune:
        print(f"tuning {to_tune} on the validation split, grids {grids}", flush=True)
        best, tuning = tune(to_tune, grids, data, args, targets)
        write_csv(out / "tuning.csv", tuning)
        if args.tune_only:
            for row in tuning:
                print(row)
            return {"tuning": tuning, "out": str(out)}
    for m, lr in fixed.items():
        for t in targets:
            best[(m, t)] = lr
    meta["learning rates (method, target)"] = {f"{m} {t:g}": lr for (m, t), lr in sorted(best.items())}
    print(f"rates: {meta['learning rates (method, target)']}", flush=True)
    results, curves = [], []
    for seed in args.seeds:
        # one learner per distinct (method, rate): a rate best for several targets races once
        configs = {}
        for m in args.methods:
            for lr in sorted({best[(m, t)] for t in targets}):
                configs[f"{m}@{lr:g}"] = config_for(m, lr, arch=args.arch, seed=seed,
                                                    extra=args.extra)
        runners = race(configs, data.x_train, data.y_train, data.x_test, data.y_test, targets=targets,
                       batch_size=args.batch_size, seed=seed, max_epochs=args.max_epochs,
                       eval_every=args.eval_every, dense_margin=args.dense_margin, device=args.device,
                       progress=_bar(args, f"race seed {seed}"))
        for r in runners:
            method, lr = r.name.split("@")
            curves += [dict(method=method, lr=float(lr), seed=seed, minibatch=mb, samples=smp,
                            train_seconds=round(sec, 4), test_accuracy=acc) for mb, smp, sec, acc in r.curve]
            for t in targets:
                if best[(method, t)] != float(lr):
                    continue
                mb, sec, smp = r.reached.get(t, (None, None, None))
                results.append(dict(method=method, lr=float(lr), seed=seed, target=t, minibatches=mb,
                                    samples=smp, train_seconds=None if sec is None else round(sec, 4),
                                    seconds_per_minibatch=round(r.seconds / max(1, r.minibatches), 5)))
            print(f"seed {seed} {r.name}: " + ", ".join(
                f"{t:g} at mb {r.reached[t][0]} ({r.reached[t][1]:.2f} s)" if t in r.reached else f"{t:g} not reached"
                for t in targets) + f"; {1e3 * r.seconds / max(1, r.minibatches):.2f} ms/minibatch", flush=True)
        meta["load average at end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
        write_csv(out / "race.csv", results)
        write_csv(out / "curves.csv", curves)
        reference = args.reference if args.reference in args.methods else None
        (out / "summary.md").write_text(summarize(results, meta, args.methods, targets, reference))
        plot(curves, out, f"{data.name} {arch_name}, batch {args.batch_size}, {args.threads} thread(s), "
                          f"{device_name}, seeds {sorted({c['seed'] for c in curves})}", targets)
    print((out / "summary.md").read_text())
    return {"results": results, "out": str(out)}


if __name__ == "__main__":
    main()
