"""River benchmark: the AM estimators against River's strongest models and deep-river (not a test).

Prequential accuracy (``evaluate.progressive_val_score``: predict, then learn, on every
sample) and throughput (samples/s, prediction + learning) on the *report* streams: River's
bundled Phishing, Bananas and ImageSegments, Elec2, the first 100k rows of Covertype, and
River's synthetic generators with concept drift (SEA, Agrawal: abrupt-ish drift at the middle;
Hyperplane: a rotating boundary). Every model sits behind a ``preprocessing.StandardScaler``;
the MLPs are Linear(d, H)-ReLU-Linear(H, C) with H the AMClassifier default (64) for AM and
deep-river alike.

The AMClassifier defaults were chosen by ``benchmarks/river_tune.py`` on other streams, the
*tuning* streams of ``STREAMS`` (RandomRBF and LED with drift, Waveform, Mixed and Sine with
drift, Weather, Moving Squares), none of which is reported here.

    .venv/bin/python benchmarks/river_benchmark.py            # full run (~1 h on 2 cores)
    .venv/bin/python benchmarks/river_benchmark.py --quick    # stream prefixes, a few minutes

Elec2, Covertype, Weather and Moving Squares need ``amstream datasets --fetch all`` first.

deep-river pins old torch and river, so it runs in its own virtual environment,
``benchmarks/.deepriver-venv`` (built here on first use: torch 2.13.0 CPU, river 0.25.0,
pandas<3, pytest, sortedcontainers, then deep-river 0.3.4 without dependencies), through
``benchmarks/river_deepriver_worker.py``, one subprocess per stream, which reports JSON.

Writes ``benchmarks/results/river_benchmark{,_quick}.{md,csv,png}``.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
VENV = HERE / ".deepriver-venv"
WORKER = HERE / "river_deepriver_worker.py"
VENV_REQUIREMENTS = ["torch==2.13.0", "river==0.25.0", "pandas<3", "pytest", "sortedcontainers"]
DEEP_RIVER = "deep-river==0.3.4"

# name: (title, role, rows in a full run (None = all), rows in a quick run)
STREAMS = {
    "phishing": ("Phishing", "report", None, None),
    "phishing_x4": ("Phishing x4", "report", None, None),  # the speed target's stream: 5,000 samples
    "bananas": ("Bananas", "report", None, 1_000),
    "image_segments": ("ImageSegments", "report", None, 1_000),
    "elec2": ("Elec2", "report", None, 2_000),
    "covertype": ("Covertype", "report", 100_000, 2_000),
    "sea_drift": ("SEA drift", "report", 20_000, 2_000),
    "agrawal_drift": ("Agrawal drift", "report", 20_000, 2_000),
    "hyperplane_drift": ("Hyperplane drift", "report", 20_000, 2_000),
    # the streams the defaults are chosen on (benchmarks/river_tune.py), never reported
    "rbf_drift": ("RandomRBF drift", "tune", 10_000, 2_000),
    "led_drift": ("LED drift", "tune", 10_000, 2_000),
    "waveform": ("Waveform", "tune", 10_000, 2_000),
    "mixed_drift": ("Mixed drift", "tune", 10_000, 2_000),
    "sine_drift": ("Sine drift", "tune", 10_000, 2_000),
    "weather": ("Weather", "tune", None, 2_000),
    "moving_squares": ("Moving Squares", "tune", 20_000, 2_000),
}
REPORT = [k for k, v in STREAMS.items() if v[1] == "report"]
TUNE = [k for k, v in STREAMS.items() if v[1] == "tune"]
TITLES = {k: v[0] for k, v in STREAMS.items()}
FULL = {k: v[2] for k, v in STREAMS.items()}
QUICK = {k: v[3] for k, v in STREAMS.items()}

def _default_hidden() -> int:
    """AMClassifier's default width: deep-river gets the same MLP."""
    import inspect

    from amstream.river import AMClassifier

    return inspect.signature(AMClassifier).parameters["hidden_sizes"].default[0]


HIDDEN = _default_hidden()
AM_MODELS = ("AM-Adam", "AM-mem")
MODELS = ("AM-Adam", "AM-mem", "LogReg", "HoeffdingTree", "HAT", "ARF", "deep-river", "NoChange")
DEEP_RIVER_OPTIMIZER, DEEP_RIVER_LR = "adam", 1e-3
ARF_MODELS = 5


# -- streams ----------------------------------------------------------------------------
def _drift(before, after, n: int, seed: int):
    """River's ConceptDriftStream: ``before``'s concept, then ``after``'s, switching around the
    middle of n samples over a window of n/20."""
    from river.datasets import synth

    return synth.ConceptDriftStream(stream=before, drift_stream=after, position=n // 2,
                                    width=max(1, n // 20), seed=seed)


def _synthetic(name: str, n: int, seed: int = 42):
    from river.datasets import synth

    if name == "sea_drift":
        return _drift(synth.SEA(variant=0, seed=seed), synth.SEA(variant=2, seed=seed), n, seed)
    if name == "agrawal_drift":
        return _drift(synth.Agrawal(classification_function=0, seed=seed),
                      synth.Agrawal(classification_function=4, seed=seed), n, seed)
    if name == "hyperplane_drift":
        return synth.Hyperplane(seed=seed, n_features=10, n_drift_features=5, mag_change=0.001,
                                noise_percentage=0.05)
    if name == "rbf_drift":
        return synth.RandomRBFDrift(seed_model=seed, seed_sample=seed, n_classes=4, n_features=10,
                                    n_centroids=50, change_speed=0.001)
    if name == "led_drift":
        return synth.LEDDrift(seed=seed, noise_percentage=0.1, irrelevant_features=True, n_drift_features=4)
    if name == "waveform":
        return synth.Waveform(seed=seed, has_noise=True)
    if name == "mixed_drift":
        return _drift(synth.Mixed(classification_function=0, seed=seed),
                      synth.Mixed(classification_function=1, seed=seed), n, seed)
    if name == "sine_drift":
        return _drift(synth.Sine(classification_function=0, seed=seed),
                      synth.Sine(classification_function=2, seed=seed), n, seed)
    return None


def load_stream(name: str, limit: int | None) -> list[tuple[dict, object]]:
    """(x dict, label) pairs in stream order."""
    if name == "phishing_x4":
        return load_stream("phishing", limit) * 4
    if name in ("phishing", "bananas", "image_segments"):
        from river import datasets

        ds = {"phishing": datasets.Phishing, "bananas": datasets.Bananas,
              "image_segments": datasets.ImageSegments}[name]()
        return list(ds.take(limit)) if limit else list(ds)
    generator = _synthetic(name, limit or 0)
    if generator is not None:
        return [({k: float(v) for k, v in x.items()}, y) for x, y in generator.take(limit)]
    from amstream.datasets import load_dataset

    ds = load_dataset(name, limit=limit, test_fraction=0)
    names = ds.feature_names or tuple(f"x{j}" for j in range(ds.x_train.shape[1]))
    labels = ds.classes if ds.classes is not None else tuple(range(ds.n_classes))
    return [(dict(zip(names, x)), labels[y]) for x, y in zip(ds.x_train.tolist(), ds.y_train.tolist())]


# -- models -------------------------------------------------------------------------------
def make_model(name: str, *, n_classes: int, seed: int):
    from river import dummy, forest, linear_model, multiclass, preprocessing, tree

    from amstream.river import AMClassifier

    if name == "AM-Adam":
        model = AMClassifier(algo="am-adam", seed=seed)  # the defaults
    elif name == "AM-mem":
        model = AMClassifier(algo="am-mem", seed=seed)
    elif name == "LogReg":
        model = (linear_model.LogisticRegression() if n_classes == 2
                 else multiclass.OneVsRestClassifier(linear_model.LogisticRegression()))
    elif name == "HoeffdingTree":
        model = tree.HoeffdingTreeClassifier()
    elif name == "HAT":
        model = tree.HoeffdingAdaptiveTreeClassifier(seed=seed)
    elif name == "ARF":
        model = forest.ARFClassifier(n_models=ARF_MODELS, seed=seed)
    elif name == "NoChange":  # predicts the previous label: River's overhead, and a naive baseline
        model = dummy.NoChangeClassifier()
    else:
        raise ValueError(f"unknown model `{name}`")
    return preprocessing.StandardScaler() | model


def am_defaults() -> dict:
    """The AMClassifier defaults that the benchmark runs with (read from its signature)."""
    import inspect

    from amstream.river import AMClassifier

    params = inspect.signature(AMClassifier).parameters
    return {k: params[k].default for k in ("hidden_sizes", "batch_size", "warmup", "lr", "lr_out", "mu",
                                           "mem_decay", "mem_ridge")}


def run_in_process(name: str, rows, *, n_classes: int, seed: int) -> dict:
    from river import evaluate, metrics

    model = make_model(name, n_classes=n_classes, seed=seed)
    metric = metrics.Accuracy()
    start = time.perf_counter()
    evaluate.progressive_val_score(rows, model, metric)
    seconds = time.perf_counter() - start
    out = {"accuracy": metric.get(), "seconds": seconds, "samples_per_s": len(rows) / seconds}
    if name in AM_MODELS:
        out["n_updates"] = model[-1].n_updates
    return out


def warm_up(seed: int) -> None:
    """Pay one-time costs (lazy imports, River's lazily loaded datasets) before any timing."""
    from river import datasets

    rows = list(datasets.Phishing().take(40))
    for name in AM_MODELS:
        run_in_process(name, rows, n_classes=2, seed=seed)


# -- deep-river in its own venv ---------------------------------------------------------------
def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_deep_river_venv() -> None:
    if venv_python().exists():
        probe = subprocess.run([str(venv_python()), "-c", "import deep_river, river, torch"],
                               capture_output=True, text=True)
        if probe.returncode == 0:
            return
        print(f"{VENV} exists but cannot import deep-river; reinstalling", flush=True)
    print(f"building {VENV} (torch 2.13.0 CPU, river 0.25.0, {DEEP_RIVER}); takes a few minutes",
          flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(venv_python()), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, *VENV_REQUIREMENTS], check=True)
    subprocess.run([*pip, "--no-deps", DEEP_RIVER], check=True)


def run_deep_river(rows, *, n_classes: int, seed: int, threads: int, tmp: Path) -> dict:
    stream = tmp / "stream.pkl"
    with open(stream, "wb") as fh:
        pickle.dump({"rows": rows}, fh)
    spec = {"stream": str(stream), "hidden": HIDDEN, "optimizer": DEEP_RIVER_OPTIMIZER,
            "lr": DEEP_RIVER_LR, "seed": seed, "threads": threads, "n_classes": n_classes}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run([str(venv_python()), str(WORKER), json.dumps(spec)], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"deep-river worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- report -------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def targets(results: list[dict], datasets: list[str]) -> list[dict]:
    """AM vs deep-river on each stream: >= 10x its samples/s, and accuracy >= its accuracy."""
    by = {(r["dataset"], r["model"]): r for r in results}
    rows = []
    for ds in datasets:
        ref = by.get((ds, "deep-river"))
        for am in AM_MODELS:
            r = by.get((ds, am))
            if ref is None or r is None:
                continue
            speedup = r["samples_per_s"] / ref["samples_per_s"]
            # the same ratio once the time every model pays (StandardScaler, River's loop) is
            # taken off: NoChange's time per sample
            floor = by.get((ds, "NoChange"))
            model_only = float("nan")
            if floor is not None:
                t0 = 1 / floor["samples_per_s"]
                model_only = (1 / ref["samples_per_s"] - t0) / max(1 / r["samples_per_s"] - t0, 1e-12)
            rows.append({"dataset": ds, "model": am, "speedup": speedup, "model_only": model_only,
                         "load": f"{r.get('load1', float('nan')):.2f} / {ref.get('load1', float('nan')):.2f}",
                         "accuracy_gap": r["accuracy"] - ref["accuracy"],
                         "speed_met": speedup >= 10.0, "accuracy_met": r["accuracy"] >= ref["accuracy"]})
    return rows


def write_markdown(path: Path, meta: dict, results: list[dict], datasets: list[str], models: list[str]) -> None:
    by = {(r["dataset"], r["model"]): r for r in results}
    lines = [f"# River benchmark{' (quick)' if meta['quick'] else ''}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "Prequential accuracy (`evaluate.progressive_val_score`) and samples/s "
              "(prediction + learning, StandardScaler included). The AMClassifier defaults were chosen "
              "by `benchmarks/river_tune.py` on other streams (`river_tuning.md`), none of these.", ""]
    header = "| stream | n | " + " | ".join(models) + " |"
    lines += ["## Accuracy", "", header, "|" + "---|" * (len(models) + 2)]
    for ds in datasets:
        n = next((r["n"] for r in results if r["dataset"] == ds), 0)
        cells = [f"{by[(ds, m)]['accuracy']:.4f}" if (ds, m) in by else "-" for m in models]
        lines.append(f"| {TITLES[ds]} | {n:,} | " + " | ".join(cells) + " |")
    lines += ["", "## Samples/s", "", "The machine is shared: the 1-minute load average when each run ended is "
              "in the CSV (`load1`); compare speeds of runs made under similar load.", "",
              header, "|" + "---|" * (len(models) + 2)]
    for ds in datasets:
        n = next((r["n"] for r in results if r["dataset"] == ds), 0)
        cells = [f"{by[(ds, m)]['samples_per_s']:,.0f}" if (ds, m) in by else "-" for m in models]
        lines.append(f"| {TITLES[ds]} | {n:,} | " + " | ".join(cells) + " |")
    rows = targets(results, datasets)
    if rows:
        lines += ["", "## Targets: AM vs deep-river (>= 10x samples/s, accuracy >= deep-river's)", "",
                  "Speed-up is end to end; 'model only' first takes off the time per sample of "
                  "StandardScaler | NoChange (the pipeline and loop that every model pays). Load: the "
                  "1-minute load average when each of the two runs ended.", "",
                  "| stream | model | speed-up | model only | accuracy - deep-river | speed | accuracy | load (AM / deep-river) |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in rows:
            lines.append(f"| {TITLES[t['dataset']]} | {t['model']} | {t['speedup']:.1f}x | "
                         f"{t['model_only']:.1f}x | "
                         f"{t['accuracy_gap']:+.4f} | {'met' if t['speed_met'] else 'NOT met'} | "
                         f"{'met' if t['accuracy_met'] else 'NOT met'} | {t['load']} |")
        for am in AM_MODELS:
            mine = [t for t in rows if t["model"] == am]
            if mine:
                ok = all(t["speed_met"] and t["accuracy_met"] for t in mine)
                lines.append(f"\n{am}: targets {'met on every stream' if ok else 'NOT met on every stream'}.")
    adam, mem = by.get(("phishing_x4", "AM-Adam")), by.get(("phishing_x4", "AM-mem"))
    if adam or mem:
        lines += ["", "## Targets on Phishing x4 (`StandardScaler() | AMClassifier()` defaults, 1 thread)", ""]
        if adam:
            lines.append(f"- AM-Adam: {adam['samples_per_s']:,.0f} samples/s (target >= 10,000: "
                         f"{'met' if adam['samples_per_s'] >= 10_000 else 'NOT met'}), accuracy "
                         f"{adam['accuracy']:.4f} (target >= 0.89: {'met' if adam['accuracy'] >= 0.89 else 'NOT met'})")
        if mem:
            lines.append(f"- AM-mem: {mem['samples_per_s']:,.0f} samples/s (target >= 5,000: "
                         f"{'met' if mem['samples_per_s'] >= 5_000 else 'NOT met'}), accuracy {mem['accuracy']:.4f}")
    am_updates = [r for r in results if r["model"] in AM_MODELS]
    if am_updates:
        lines += ["", "AM updates per stream: " + ", ".join(
            f"{TITLES[r['dataset']]}/{r['model']} {r['n_updates']:,}" for r in am_updates)]
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, results: list[dict], datasets: list[str], models: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    by = {(r["dataset"], r["model"]): r for r in results}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(models)
    xs = np.arange(len(datasets))
    for i, m in enumerate(models):
        acc = [by[(d, m)]["accuracy"] if (d, m) in by else np.nan for d in datasets]
        sps = [by[(d, m)]["samples_per_s"] if (d, m) in by else np.nan for d in datasets]
        axes[0].bar(xs + i * width, acc, width, label=m)
        axes[1].bar(xs + i * width, sps, width, label=m)
    for ax, ylabel in zip(axes, ("prequential accuracy", "samples/s (log)")):
        ax.set_xticks(xs + width * (len(models) - 1) / 2)
        ax.set_xticklabels([TITLES[d] for d in datasets])
        ax.set_ylabel(ylabel)
    axes[0].set_ylim(0.4, 1.0)
    axes[1].set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(models), fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="stream prefixes (a few minutes)")
    parser.add_argument("--datasets", default=",".join(REPORT), help="comma-separated subset")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (both venvs)")
    parser.add_argument("--out", type=Path, default=None, help="output prefix")
    args = parser.parse_args(argv)

    import numpy as np
    import river
    import torch

    torch.set_num_threads(args.threads)
    np.random.seed(args.seed)
    sizes = QUICK if args.quick else FULL
    datasets = [d for d in args.datasets.split(",") if d]
    models = [m for m in args.models.split(",") if m]
    for d in datasets:
        if d not in sizes:
            parser.error(f"unknown dataset `{d}`; choose from {', '.join(sizes)}")
    for m in models:
        if m not in MODELS:
            parser.error(f"unknown model `{m}`; choose from {', '.join(MODELS)}")
    out = args.out or RESULTS / ("river_benchmark_quick" if args.quick else "river_benchmark")
    out.parent.mkdir(parents=True, exist_ok=True)

    deep_river_versions = ""
    if "deep-river" in models:
        ensure_deep_river_venv()
        deep_river_versions = subprocess.run(
            [str(venv_python()), "-c", "import torch, river; from importlib.metadata import version; "
             "print(f'torch {torch.__version__}, river {river.__version__}, deep-river {version(\"deep-river\")}')"],
            capture_output=True, text=True, check=True).stdout.strip()
    meta = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "quick": args.quick,
        "seed": args.seed,
        "threads": f"torch.set_num_threads({args.threads}) in both environments",
        "device": f"cpu ({cpu_name()}, {os.cpu_count()} cores)",
        "load average at start": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "amstream env": f"python {platform.python_version()}, torch {torch.__version__}, river {river.__version__}",
        "deep-river env": deep_river_versions or "(not run)",
        "MLP": f"Linear(d, {HIDDEN})-ReLU-Linear({HIDDEN}, C) for AM and deep-river "
               f"(deep-river: {DEEP_RIVER_OPTIMIZER}, lr={DEEP_RIVER_LR})",
        "AM estimators": "AMClassifier defaults ({}), algo am-adam / am-mem; the same for every stream".format(
            ", ".join(f"{k}={v}" for k, v in am_defaults().items())),
        "baselines": f"LogisticRegression (one-vs-rest when multiclass), HoeffdingTreeClassifier, "
                     f"HoeffdingAdaptiveTreeClassifier, ARFClassifier(n_models={ARF_MODELS}), "
                     "NoChangeClassifier (the previous label); defaults otherwise",
    }
    print("\n".join(f"{k}: {v}" for k, v in meta.items()), flush=True)
    warm_up(args.seed)

    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        for ds in datasets:
            rows = load_stream(ds, sizes[ds])
            n_classes = len({y for _, y in rows})
            for m in models:
                if m == "deep-river":
                    r = run_deep_river(rows, n_classes=n_classes, seed=args.seed, threads=args.threads,
                                       tmp=Path(tmpdir))
                    r = {k: r[k] for k in ("accuracy", "seconds", "samples_per_s")}
                else:
                    r = run_in_process(m, rows, n_classes=n_classes, seed=args.seed)
                r = {"dataset": ds, "n": len(rows), "model": m, **r,
                     "load1": round(os.getloadavg()[0], 2)}  # other processes share the cores
                results.append(r)
                print(f"{TITLES[ds]:>14} {m:>14}  acc {r['accuracy']:.4f}  {r['samples_per_s']:>9,.0f} samples/s"
                      f"  ({r['seconds']:.1f} s, load {r['load1']})", flush=True)
    meta["load average at end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())

    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["dataset", "n", "model", "accuracy", "seconds",
                                                "samples_per_s", "n_updates", "load1"])
        writer.writeheader()
        for r in results:
            writer.writerow({**r, "n_updates": r.get("n_updates", "")})
    write_markdown(out.with_suffix(".md"), meta, results, datasets, models)
    write_plot(out.with_suffix(".png"), results, datasets, models,
               f"progressive validation, seed {args.seed}, {args.threads} torch thread(s), {meta['device']}")
    print(out.with_suffix(".md").read_text())
    print(f"wrote {out}.{{md,csv,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
