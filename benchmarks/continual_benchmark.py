"""Continual learning: AM-Adam and AM-mem against Avalanche's Naive, EWC, SI, LwF and Replay.

Same MLP (784-400-400-10 ReLU), minibatch 128 and epochs for every strategy; all runs go
through Avalanche (`amstream.avalanche.AMStrategy` for AM, Avalanche's own strategies for
the baselines, Adam lr 1e-3 as in shared/notes/continual-baselines.md) and are scored
from the same accuracy matrix (average accuracy, forgetting = -BWT, learning accuracy).

Benchmarks: Split-MNIST class-incremental (split-mnist), task-incremental
(split-mnist-task: AM's task heads are the task's outputs of its one output layer, a
MultiTaskModule; the baselines use one MultiHeadClassifier head per task), Permuted-MNIST
(permuted-mnist, 10 tasks; ``--permuted-train-per-class`` picks a subset, see below) and
Split-Fashion-MNIST. The CSV accumulates: runs already in ``<prefix>_runs.csv`` are skipped
(``--fresh`` starts anew). Every run records seed, threads, device and the load average.

Baseline hyperparameters are the ones measured in continual-baselines.md (EWC lambda
5e3, 1e5 for task-IL; SI lambda 100 with the CPU bug fixed by
`FixedSynapticIntelligencePlugin`; LwF alpha 1, T 2; Replay 500 samples). AM's come
from ``--tune``: a small grid on a *validation* split carved out of the MNIST training
set (never the test set), run with the plain loop of `amstream.continual` (same learner,
same scores; no Avalanche overhead). Its winners are the preset `permuted-mnist`
of `amstream.continual.PRESETS` (runs named `*-pm` below; `AM_RUNS`).

    python benchmarks/continual_benchmark.py --quick            # 1 seed, subsets: a few minutes
    python benchmarks/continual_benchmark.py --tune             # the validation grid
    python benchmarks/continual_benchmark.py --tune-replay      # AM-mem + Replay grid, Split-Fashion-MNIST
    python benchmarks/continual_benchmark.py --prefix continual_full --permuted-train-per-class 0 \
        --permuted-test-per-class 0                             # the full protocol, seeds 1 2 3
    python benchmarks/continual_benchmark.py --benchmarks permuted-mnist --strategies am-mem ewc naive

Writes (under benchmarks/results/, prefix ``continual`` or ``continual_quick``): ``_runs.csv``
(one row per run, with its matrix), ``_summary.csv`` / ``_summary.md`` (mean and std over
seeds), ``_bars.png`` (average accuracy and forgetting) and ``_heatmaps_<benchmark>.png``
(the accuracy matrices of the first seed). Every run records its seed, threads and device.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ARCH = (784, 400, 400, 10)
BATCH = 128
ALL_STRATEGIES = ("am-adam", "am-mem", "am-adam-pm", "am-mem-pm", "am-mem-decay", "am-mem-replay", "am-mem-pm-replay",
                  "am-mem-replay-tuned", "naive", "ewc", "si", "lwf", "replay", "cumulative")
ALL_BENCHMARKS = ("split-mnist", "split-mnist-task", "permuted-mnist", "split-fashion-mnist")

#: The AM runs: (algorithm, preset of `amstream.continual.PRESETS` or None = AMConfig's defaults,
#: overrides, ReplayPlugin size). "am-mem" and "am-adam" are what `amstream continual --strategy
#: am-mem` / `am-adam` run with nothing set.
AM_RUNS: dict[str, tuple[str, str | None, dict[str, Any], int]] = {
    "am-adam": ("am-adam", None, {}, 0),
    "am-mem": ("am-mem", None, {}, 0),
    "am-adam-pm": ("am-adam", "permuted-mnist", {}, 0),
    "am-mem-pm": ("am-mem", "permuted-mnist", {}, 0),
    "am-mem-decay": ("am-mem", "permuted-mnist", {"mem_decay": 0.95}, 0),
    "am-mem-replay": ("am-mem", None, {}, 500),
    "am-mem-pm-replay": ("am-mem", "permuted-mnist", {}, 500),
    "am-mem-replay-tuned": ("am-mem", "replay", {}, 500),  # the winner of --tune-replay, as a preset
}
#: Baseline hyperparameters (continual-baselines.md); EWC's lambda depends on the benchmark.
EWC_LAMBDA = {"split-mnist": 5e3, "split-mnist-task": 1e5, "permuted-mnist": 5e3, "split-fashion-mnist": 5e3}

#: The validation grid of ``--tune``, in two stages: stage 1 (the first 11 entries) varies
#: AM-Adam's step and AM-mem's forgetting factor, output step, BCD sweeps and mu; stage 2
#: follows the stage-1 finding that a larger mu helps AM-mem (less forgetting, and better
#: accuracy), crossing mu with gamma, with an AM-Adam mu control.
TUNE_GRID: list[tuple[str, dict[str, Any]]] = (
    [("am-adam", {"algo": "am-adam", "lr": lr, "lr_out": lr}) for lr in (1e-3, 3e-3)]
    + [("am-mem", {"algo": "am-mem", "mem_decay": g, "lr_out": lo}) for g in (1.0, 0.99, 0.95) for lo in (1e-3, 3e-3)]
    + [("am-mem", {"algo": "am-mem", "mem_decay": 1.0, "lr_out": 3e-3, "mem_sweeps": 3}),
       ("am-mem", {"algo": "am-mem", "mem_decay": 1.0, "lr_out": 3e-3, "mu": 0.1}),
       ("am-mem", {"algo": "am-mem", "mem_decay": 1.0, "lr_out": 3e-3, "mu": 10.0})]
    # stage 2
    + [("am-mem", {"algo": "am-mem", "mem_decay": g, "lr_out": 3e-3, "mu": mu})
       for mu in (10.0, 30.0) for g in (1.0, 0.95, 0.9) if (mu, g) != (10.0, 1.0)]
    + [("am-adam", {"algo": "am-adam", "lr": 1e-3, "lr_out": 1e-3, "mu": 10.0})]
)

_WORKER: dict[str, Any] = {}


# --------------------------------------------------------------------------- one run
def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")


def _benchmark(name: str, train_per_class: int | None, test_per_class: int | None):
    from amstream import avalanche as av
    from amstream.continual import BENCHMARKS
    from amstream.datasets import load_dataset

    key = BENCHMARKS[name].dataset
    if key not in _WORKER:
        _WORKER[key] = load_dataset(key)
    # the subset is drawn with seed 0 for every run, so all strategies and seeds see the same data
    return av.make_benchmark(name, train_per_class=train_per_class, test_per_class=test_per_class,
                             dataset=_WORKER[key], seed=0)


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one strategy on one benchmark with one seed; return the scores and the matrix."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from amstream import AMConfig, make_learner
    from amstream import avalanche as av
    from amstream.continual import BENCHMARKS, summarize

    name, strategy_name, seed = job["benchmark"], job["strategy"], job["seed"]
    spec = BENCHMARKS[name]
    bm = _benchmark(name, job["train_per_class"], job["test_per_class"])
    t0 = time.perf_counter()
    if strategy_name.startswith("am-"):
        from avalanche.training.plugins import ReplayPlugin

        from amstream.continual import preset_config

        algo, preset, overrides, replay = AM_RUNS[strategy_name]
        cfg = preset_config(algo, preset, arch=ARCH, activation="relu", seed=seed, **overrides)
        strategy = av.AMStrategy(learner=make_learner(cfg), train_mb_size=BATCH, train_epochs=job["epochs"],
                                 plugins=[ReplayPlugin(mem_size=replay)] if replay else None,
                                 task_classes=av.task_classes_of(bm) if spec.task_aware else None)
        hyper = {k: v for k, v in cfg.to_dict().items() if k in ("mu", "lr", "lr_out", "mem_decay", "mem_sweeps")}
        hyper.update(preset=preset, replay=replay)
    else:
        hyper = {"ewc_lambda": EWC_LAMBDA[name]} if strategy_name == "ewc" else {}
        strategy = av.make_baseline(strategy_name, arch=ARCH, task_aware=spec.task_aware, lr=1e-3,
                                    train_mb_size=BATCH, train_epochs=job["epochs"], seed=seed, **hyper)
        hyper = {**av.BASELINES[strategy_name], **hyper, "lr": 1e-3}
        torch.manual_seed(seed)  # Avalanche draws the data order from the global RNG
    rows, last = [], {}
    for item in av.iter_experiences(strategy, bm):
        rows.append(item["accuracies"])
        last = item
    wall = time.perf_counter() - t0
    return {**job, **summarize(rows), "stream_accuracy": last.get("stream_accuracy"),
            "avalanche_forgetting": last.get("stream_forgetting"), "wall_s": round(wall, 1),
            "threads": torch.get_num_threads(), "device": "cpu", "hyper": json.dumps(hyper),
            "loadavg_1m": round(os.getloadavg()[0], 2),
            "matrix": json.dumps([[round(a, 4) for a in r] for r in rows])}


# --------------------------------------------------------------------------- tuning
def tune(args: argparse.Namespace) -> None:
    """A small grid on a validation split: AM-Adam lr, AM-mem gamma and output step."""
    import dataclasses

    import torch

    from amstream import AMConfig, make_learner
    from amstream.continual import iter_continual, make_tasks, subsample_per_class, summarize
    from amstream.datasets import load_dataset

    torch.set_num_threads(args.threads)
    full = load_dataset("mnist")
    # validation split: 1,000 samples per class held out of the *training* set
    rng = np.random.default_rng(123)
    val = np.zeros(full.n_train, dtype=bool)
    for c in range(10):
        val[rng.choice(np.flatnonzero(full.y_train == c), 1000, replace=False)] = True
    tr_idx = np.flatnonzero(~val)
    tr_idx = tr_idx[subsample_per_class(full.y_train[tr_idx], args.tune_train_per_class, seed=0)]
    va_idx = np.flatnonzero(val)
    va_idx = va_idx[subsample_per_class(full.y_train[va_idx], 200, seed=1)]
    ds = dataclasses.replace(full, x_train=full.x_train[tr_idx], y_train=full.y_train[tr_idx],
                             x_test=full.x_train[va_idx], y_test=full.y_train[va_idx])
    grid = TUNE_GRID
    out = RESULTS / "continual_tuning.csv"
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    if out.exists():  # resume: configurations already measured are kept, not rerun
        with open(out) as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            for k in ("average_accuracy", "forgetting", "bwt", "max_forgetting", "learning_accuracy"):
                r[k] = float(r[k])
    done = {(r["benchmark"], r["hyper"]) for r in rows}
    for bench in args.tune_benchmarks:
        tasks = make_tasks(bench, dataset=ds, n_tasks=args.tune_tasks)
        for family, hyper in grid:
            if (bench, json.dumps(hyper)) in done:
                continue
            t0 = time.perf_counter()
            learner = make_learner(AMConfig(arch=ARCH, seed=0, **hyper))
            R = [r["accuracies"] for r in iter_continual(learner, tasks, batch_size=BATCH, seed=0,
                                                         task_aware=bench.endswith("-task"))]
            s = summarize(R)
            row = {"benchmark": bench, "n_tasks": len(tasks), "train_per_class": args.tune_train_per_class,
                   "family": family, "hyper": json.dumps(hyper), **{k: round(v, 4) for k, v in s.items()},
                   "wall_s": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads(), "seed": 0}
            rows.append(row)
            print(json.dumps(row), flush=True)
            _write_csv(out, rows)
    lines = ["# AM hyperparameter grid on a validation split", "",
             f"MNIST training set minus 1,000 held-out samples per class; {args.tune_train_per_class} training "
             "samples per class per task; validation = 200 held-out samples per class; "
             f"{args.tune_tasks} tasks; seed 0; threads {args.threads}; plain loop of amstream.continual. Rows in the "
             "order they were run (stage 1, then stage 2: see `TUNE_GRID`). Selection: the highest Permuted-MNIST "
             "validation average accuracy per family: AM-Adam, AM-mem with gamma = 1 (the paper's plain sums) "
             "and AM-mem with gamma < 1 (preset `permuted-mnist` of `amstream.continual.PRESETS`).", "",
             "| benchmark | family | hyperparameters | val. avg acc | forgetting | learning acc |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['benchmark']} | {r['family']} | `{r['hyper']}` | {r['average_accuracy']:.3f} | "
                     f"{r['forgetting']:.3f} | {r['learning_accuracy']:.3f} |")
    (RESULTS / "continual_tuning.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out} and continual_tuning.md")


#: ``--tune-replay``: AM-mem with ReplayPlugin(500), on the tuning benchmark Split-Fashion-MNIST only
#: (full protocol, seed 1). Rule fixed before the runs: the highest average accuracy wins and becomes
#: the run ``am-mem-replay-tuned``, reported on Split-MNIST (3 seeds) without further changes.
TUNE_REPLAY: list[dict[str, Any]] = [
    {"lr_out": lo, "mu": mu, "mem_decay": g} for lo in (1e-3, 1e-2) for mu in (0.1, 1.0) for g in (1.0, 0.99)]


def tune_replay(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    out = RESULTS / "continual_tuning_replay.csv"
    rows = []
    for overrides in TUNE_REPLAY:
        AM_RUNS["am-mem-replay-grid"] = ("am-mem", None, overrides, 500)
        r = run_one({"benchmark": "split-fashion-mnist", "strategy": "am-mem-replay-grid", "seed": 1, "epochs": 1,
                     "train_per_class": None, "test_per_class": None})
        r["overrides"] = json.dumps(overrides)
        rows.append(r)
        print(json.dumps({k: r[k] for k in ("overrides", "average_accuracy", "forgetting", "wall_s", "loadavg_1m")}),
              flush=True)
        _write_csv(out, rows)
    best = max(rows, key=lambda r: r["average_accuracy"])
    lines = ["# AM-mem + ReplayPlugin(500): grid on Split-Fashion-MNIST (tuning benchmark)", "",
             "Full protocol (all training images, 784-400-400-10, batch 128, 1 epoch), seed 1, "
             f"{args.threads} thread; rule fixed before the runs: the highest Acc wins. Best: `{best['overrides']}`.", "",
             "| overrides of AMConfig(algo='am-mem') | Acc | F | s | load |", "|---|---|---|---|---|"]
    lines += [f"| `{r['overrides']}` | {r['average_accuracy']:.3f} | {r['forgetting']:.3f} | {r['wall_s']:.0f} | "
              f"{r['loadavg_1m']} |" for r in rows]
    (RESULTS / "continual_tuning_replay.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# --------------------------------------------------------------------------- reporting
def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def summarize_runs(runs: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["benchmark"], r["strategy"]), []).append(r)
    order = {s: i for i, s in enumerate(ALL_STRATEGIES)}
    summary = []
    for (bench, strat), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 99))):
        row: dict[str, Any] = {"benchmark": bench, "strategy": strat, "n_seeds": len(rs),
                               "seeds": " ".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))}
        for key in ("average_accuracy", "forgetting", "bwt", "learning_accuracy", "wall_s"):
            vals = np.array([float(r[key]) for r in rs])
            row[key] = round(float(vals.mean()), 4)
            row[key + "_std"] = round(float(vals.std(ddof=1)) if len(vals) > 1 else 0.0, 4)
        row["train_per_class"] = rs[0]["train_per_class"]
        row["test_per_class"] = rs[0]["test_per_class"]
        row["hyper"] = rs[0]["hyper"]
        summary.append(row)
    _write_csv(RESULTS / f"{prefix}_summary.csv", summary)
    lines = [f"# Continual-learning benchmark ({prefix})", "",
             f"MLP {'-'.join(map(str, ARCH))} ReLU, batch {BATCH}, {runs[0]['epochs']} epoch(s) per experience, "
             f"threads {runs[0]['threads']}, device {runs[0]['device']}, {platform.processor() or platform.machine()}; "
             "mean ± std over seeds. Acc = mean test accuracy over all tasks after the last one; "
             "F = forgetting (mean drop since each task was learned; BWT = -F); LA = learning accuracy "
             "(mean of the diagonal).", "",
             "| benchmark | strategy | seeds | Acc | F | LA | train/test per class | s/run |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary:
        tpc = f"{r['train_per_class'] or 'all'}/{r['test_per_class'] or 'all'}"
        lines.append(f"| {r['benchmark']} | {r['strategy']} | {r['seeds']} | {r['average_accuracy']:.3f} ± "
                     f"{r['average_accuracy_std']:.3f} | {r['forgetting']:.3f} ± {r['forgetting_std']:.3f} | "
                     f"{r['learning_accuracy']:.3f} | {tpc} | {r['wall_s']:.0f} |")
    (RESULTS / f"{prefix}_summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


def plot(runs: list[dict[str, Any]], summary: list[dict[str, Any]], prefix: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = [b for b in ALL_BENCHMARKS if any(s["benchmark"] == b for s in summary)]
    fig, axes = plt.subplots(2, len(benches), figsize=(4.2 * len(benches), 6.0), squeeze=False)
    for j, bench in enumerate(benches):
        rows = [s for s in summary if s["benchmark"] == bench]
        names = [r["strategy"] for r in rows]
        colors = ["tab:orange" if n.startswith("am-") else "tab:blue" for n in names]
        for i, (key, label) in enumerate((("average_accuracy", "average accuracy"), ("forgetting", "forgetting"))):
            ax = axes[i][j]
            ax.bar(range(len(rows)), [r[key] for r in rows], yerr=[r[key + "_std"] for r in rows],
                   color=colors, capsize=3)
            ax.set_xticks(range(len(rows)), names, rotation=45, ha="right", fontsize=8)
            ax.set_ylabel(label)
            ax.set_ylim(min(0.0, min(r[key] for r in rows) - 0.05), 1.0)
            if i == 0:
                ax.set_title(bench, fontsize=10)
    fig.suptitle("AM (orange) vs Avalanche baselines (blue); error bars: std over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{prefix}_bars.png", dpi=110)
    plt.close(fig)

    for bench in benches:
        first = {}
        for r in sorted(runs, key=lambda r: r["seed"]):
            if r["benchmark"] == bench:
                first.setdefault(r["strategy"], r)
        names = [s for s in ALL_STRATEGIES if s in first]
        cols = 4
        nrow = (len(names) + cols - 1) // cols
        fig, axes = plt.subplots(nrow, cols, figsize=(3.3 * cols, 3.0 * nrow), squeeze=False)
        for k, name in enumerate(names):
            ax = axes[k // cols][k % cols]
            R = np.array(json.loads(first[name]["matrix"]))
            ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
            ax.set_title(f"{name}: acc {first[name]['average_accuracy']:.2f}, F {first[name]['forgetting']:.2f}",
                         fontsize=8)
            ax.set_xlabel("test task", fontsize=7)
            ax.set_ylabel("trained through", fontsize=7)
            ax.tick_params(labelsize=6)
        for k in range(len(names), nrow * cols):
            axes[k // cols][k % cols].axis("off")
        fig.suptitle(f"{bench}: accuracy matrices (seed {min(r['seed'] for r in first.values())})", fontsize=9)
        fig.tight_layout()
        fig.savefig(RESULTS / f"{prefix}_heatmaps_{bench}.png", dpi=110)
        plt.close(fig)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="1 seed, subsets (split: 2000 train / 200 test per class; permuted: 400 / 100)")
    p.add_argument("--tune", action="store_true", help="run the AM validation grid instead")
    p.add_argument("--tune-replay", action="store_true",
                   help="run the AM-mem + Replay grid on Split-Fashion-MNIST instead (TUNE_REPLAY)")
    p.add_argument("--benchmarks", nargs="+", default=list(ALL_BENCHMARKS), choices=ALL_BENCHMARKS)
    p.add_argument("--strategies", nargs="+", default=list(ALL_STRATEGIES), choices=ALL_STRATEGIES)
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-per-class", type=int, default=None, help="split benchmarks (default: all)")
    p.add_argument("--test-per-class", type=int, default=None, help="all benchmarks (default: all)")
    p.add_argument("--permuted-train-per-class", type=int, default=1000,
                   help="Permuted-MNIST training samples per class and task (default 1000 = 10,000 per task; "
                        "0 = all 60,000)")
    p.add_argument("--permuted-test-per-class", type=int, default=500, help="(0 = all 10,000)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes, 1 thread each)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prefix", default=None)
    p.add_argument("--fresh", action="store_true", help="start a new <prefix>_runs.csv (default: add to it)")
    p.add_argument("--summarize-only", action="store_true", help="rebuild summary and plots from <prefix>_runs.csv")
    p.add_argument("--tune-benchmarks", nargs="+", default=["permuted-mnist", "split-mnist"])
    p.add_argument("--tune-tasks", type=int, default=5)
    p.add_argument("--tune-train-per-class", type=int, default=1000)
    args = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.tune:
        tune(args)
        return 0
    if args.tune_replay:
        tune_replay(args)
        return 0
    prefix = args.prefix or ("continual_quick" if args.quick else "continual")
    if args.summarize_only:  # rebuild the table and plots from the runs CSV (e.g. of an interrupted run)
        with open(RESULTS / f"{prefix}_runs.csv") as f:
            runs = list(csv.DictReader(f))
        for r in runs:
            r["seed"] = int(r["seed"])
            for k in ("average_accuracy", "forgetting", "bwt", "max_forgetting", "learning_accuracy", "wall_s"):
                r[k] = float(r[k])
        plot(runs, summarize_runs(runs, prefix), prefix)
        return 0
    if args.quick:  # enough minibatches per task (~30) that every strategy can learn each task
        args.seeds = args.seeds[:1]
        args.train_per_class = args.train_per_class or 2000
        args.test_per_class = args.test_per_class or 200
        args.permuted_train_per_class = 400
        args.permuted_test_per_class = 100
    jobs = []
    for seed in args.seeds:  # seeds outermost: a partial run still covers every strategy
        for bench in args.benchmarks:
            for strat in args.strategies:
                perm = bench == "permuted-mnist"
                jobs.append({"benchmark": bench, "strategy": strat, "seed": seed, "epochs": args.epochs,
                             "train_per_class": (args.permuted_train_per_class or None) if perm else args.train_per_class,
                             "test_per_class": (args.permuted_test_per_class or None) if perm else args.test_per_class})
    print(f"{len(jobs)} runs, {args.jobs} at a time, {args.threads} thread(s) each, device cpu; python {sys.version.split()[0]}",
          flush=True)
    runs: list[dict[str, Any]] = []
    out = RESULTS / f"{prefix}_runs.csv"
    if out.exists() and not args.fresh:  # resume: runs already in the CSV are kept, not rerun
        with open(out) as f:
            runs = list(csv.DictReader(f))
        for r in runs:
            r["seed"] = int(r["seed"])
            for k in ("average_accuracy", "forgetting", "bwt", "max_forgetting", "learning_accuracy", "wall_s"):
                r[k] = float(r[k])
        done = {(r["benchmark"], r["strategy"], r["seed"]) for r in runs}
        jobs = [j for j in jobs if (j["benchmark"], j["strategy"], j["seed"]) not in done]
        print(f"{len(runs)} runs already in {out.name}; {len(jobs)} to go", flush=True)
    from tqdm.auto import tqdm

    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx, initializer=_init_worker,
                                initargs=(args.threads,)) as pool:
        futures = {pool.submit(run_one, job): job for job in jobs}
        with tqdm(total=len(jobs), desc="runs", unit="run") as bar:
            for fut in cf.as_completed(futures):
                r = fut.result()
                runs.append(r)
                _write_csv(out, runs)  # partial results survive an interrupted run
                bar.write(f"{r['benchmark']:>17} {r['strategy']:>13} seed {r['seed']}: acc {r['average_accuracy']:.3f} "
                          f"F {r['forgetting']:.3f} LA {r['learning_accuracy']:.3f} ({r['wall_s']:.0f} s, "
                          f"{r['threads']} thread)")
                bar.update(1)
    summary = summarize_runs(runs, prefix)
    plot(runs, summary, prefix)
    print(f"wrote {out}, {prefix}_summary.csv/.md, {prefix}_bars.png, {prefix}_heatmaps_*.png in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
