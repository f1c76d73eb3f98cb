"""`amstream continual`: train a strategy on a continual benchmark; print the accuracy matrix.

Trains on each experience in turn and, after each, tests on every experience, through
Avalanche (`amstream.avalanche`): AM-Adam and AM-mem as `AMStrategy`, and Avalanche's
Naive, EWC, SI (CPU bug fixed), LwF and Replay on the same MLP (784-400-400-10 ReLU,
Adam, lr 1e-3). Prints the accuracy matrix (rows: trained through experience i;
columns: test experience j), the average accuracy, forgetting and BWT, and saves a heat
map. The data are local (MNIST ships inside a package; Fashion-MNIST: ``amstream
datasets --fetch fashion_mnist``).

Benchmarks: split-mnist (class-incremental), split-mnist-task (task-incremental),
permuted-mnist (10 tasks), split-fashion-mnist (class-incremental).

Examples
--------
    $ amstream continual --benchmark split-mnist --strategy am-mem
    $ amstream continual --benchmark permuted-mnist --strategy ewc --seed 2 --json
    $ amstream continual --benchmark split-mnist --strategy am-mem --experiences 2 --checkpoint run.ckpt
    $ amstream continual --resume run.ckpt --checkpoint run.ckpt      # experiences 3..5
    $ amstream continual --benchmark split-mnist --strategy am-mem --replay 500
    $ amstream continual --benchmark permuted-mnist --strategy am-mem --preset permuted-mnist

With nothing set, AM-Adam and AM-mem use AMConfig's defaults, the same rule as
``amstream serve --algo am-mem``. Presets (``--preset NAME``) are named settings tuned on
held-out tasks: permuted-mnist (am-mem: mu 10; am-adam: lr 1e-3, lr-out 1e-3) and replay
(am-mem with ``--replay 500``: lr-out 1e-2, mem-decay 0.99; tuned on Split-Fashion-MNIST).
"""
from __future__ import annotations

import argparse

AM_STRATEGIES = ("am-adam", "am-mem")
BASELINE_STRATEGIES = ("naive", "ewc", "si", "lwf", "replay", "cumulative")
BENCHMARK_NAMES = ("split-mnist", "split-mnist-task", "permuted-mnist", "split-fashion-mnist")

from amstream.continual import PRESETS

def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "continual",
        help="continual learning: accuracy matrix, forgetting and BWT of AM or an Avalanche baseline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--benchmark", choices=BENCHMARK_NAMES, default=None, help="task sequence (default split-mnist)")
    p.add_argument("--strategy", choices=AM_STRATEGIES + BASELINE_STRATEGIES, default=None,
                   help="am-adam, am-mem, or an Avalanche baseline (default am-mem)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per experience (default 1)")
    p.add_argument("--seed", type=int, default=None, help="seeds weights, data order and subsets (default 0)")
    p.add_argument("--batch-size", type=int, default=None, help="training minibatch (default 128)")
    p.add_argument("--experiences", type=int, default=None, metavar="N",
                   help="stop after training N experiences (the rest can follow with --resume)")
    p.add_argument("--train-per-class", type=int, default=None, metavar="N",
                   help="use a random subset of N training samples per class (quick runs)")
    p.add_argument("--test-per-class", type=int, default=None, metavar="N",
                   help="use a random subset of N test samples per class")
    am = p.add_argument_group("AM hyperparameters (am-adam, am-mem)")
    am.add_argument("--arch", default="784-400-400-10", help="layer sizes (default 784-400-400-10)")
    am.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="named AM settings (default: AMConfig's defaults, as `serve`): "
                         + "; ".join(f"{k}: {v}" for k, v in PRESETS.items()))
    am.add_argument("--mu", type=float, default=None, help="penalty weight mu")
    am.add_argument("--lr", type=float, default=None,
                    help="hidden layers' Adam step (AM-Adam); baselines' Adam step (default 1e-3)")
    am.add_argument("--lr-out", type=float, default=None, help="output layer's step")
    am.add_argument("--mem-decay", type=float, default=None, help="AM-mem forgetting factor gamma (1 = plain sums)")
    am.add_argument("--mem-sweeps", type=int, default=None, help="AM-mem BCD sweeps per minibatch")
    am.add_argument("--replay", type=int, default=0, metavar="N",
                    help="add Avalanche's ReplayPlugin with N stored samples to an AM strategy")
    bl = p.add_argument_group("baseline hyperparameters")
    bl.add_argument("--ewc-lambda", type=float, default=None, help="EWC lambda (default 5e3)")
    bl.add_argument("--si-lambda", type=float, default=None, help="SI lambda (default 100)")
    bl.add_argument("--mem-size", type=int, default=None, help="Replay buffer size (default 500)")
    io = p.add_argument_group("state and output")
    io.add_argument("--checkpoint", metavar="PATH", default=None,
                    help="save the learner and the matrix so far after each experience (AM strategies)")
    io.add_argument("--resume", metavar="PATH", default=None, help="continue the run saved in PATH")
    io.add_argument("--plot", metavar="PATH", default=None,
                    help="heat-map PNG (default continual-<benchmark>-<strategy>-seed<seed>.png; `none` skips)")
    io.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    io.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    io.add_argument("--data-dir", default=None, help="dataset directory (default $AMSTREAM_DATA or ~/.cache/amstream/data)")
    io.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    io.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _settings(args: argparse.Namespace, saved: dict | None) -> dict:
    """The run's settings: the command line, else the resumed checkpoint, else defaults."""
    from amstream.exceptions import ConfigError

    defaults = {"benchmark": "split-mnist", "strategy": "am-mem", "epochs": 1, "seed": 0, "batch_size": 128,
                "train_per_class": None, "test_per_class": None}
    out = {}
    for key, default in defaults.items():
        given = getattr(args, key)
        if saved is not None:
            if given is not None and given != saved.get(key):
                raise ConfigError(f"`--{key.replace('_', '-')}` is `{given}` but the resumed run used "
                                  f"`{saved.get(key)}`")
            out[key] = saved.get(key)
        else:
            out[key] = default if given is None else given
    if out["epochs"] < 1 or out["batch_size"] < 1:
        raise ConfigError(f"`--epochs` and `--batch-size` must be >= 1, got `{out['epochs']}`, `{out['batch_size']}`")
    return out


def _am_config(args: argparse.Namespace, s: dict):
    from amstream.continual import preset_config

    hyper = {key: getattr(args, key) for key in ("mu", "lr", "lr_out", "mem_decay", "mem_sweeps")
             if getattr(args, key) is not None}
    return preset_config(s["strategy"], args.preset, arch=args.arch, activation="relu", seed=s["seed"], **hyper)


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    import time

    import torch

    from amstream.checkpoint import load_checkpoint, save_checkpoint
    from amstream.continual import BENCHMARKS, plot_accuracy_matrix, summarize
    from amstream.exceptions import ConfigError
    from amstream.learner import learner_from_state, make_learner

    torch.set_num_threads(max(1, args.threads))
    saved_meta = None
    learner = None
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        saved_meta = ckpt["metadata"]
        if saved_meta.get("kind") != "amstream-continual":
            raise ConfigError(f"`{args.resume}` is not a checkpoint of `amstream continual`")
        learner = learner_from_state(ckpt["state"], device=args.device)
    s = _settings(args, saved_meta)
    is_am = s["strategy"] in AM_STRATEGIES
    if (args.checkpoint or args.resume) and not is_am:
        raise ConfigError(f"`--checkpoint` and `--resume` need an AM strategy ({', '.join(AM_STRATEGIES)}), "
                          f"got `{s['strategy']}`")
    if args.replay and not is_am:
        raise ConfigError("`--replay` adds replay to an AM strategy; for the baseline use `--strategy replay`")
    if args.replay and args.resume:
        raise ConfigError("`--resume` cannot restore a replay buffer: run with `--replay` in one process")
    spec = BENCHMARKS[s["benchmark"]]

    # importing Avalanche takes ~10 s: say so before the wait
    progress = not args.quiet
    if progress:
        print(f"loading Avalanche and {spec.dataset} ...", file=sys.stderr, flush=True)
    from avalanche.training.plugins import ReplayPlugin

    from amstream import avalanche as av

    bm = av.make_benchmark(s["benchmark"], train_per_class=s["train_per_class"], test_per_class=s["test_per_class"],
                           data_dir=args.data_dir, seed=s["seed"])
    n_exp = len(bm.train_stream)
    rows: list[list[float]] = [list(r) for r in (saved_meta or {}).get("accuracy_matrix", [])]
    start = len(rows)
    stop = n_exp if args.experiences is None else min(n_exp, start + max(0, args.experiences))
    plugins: list = [av.ProgressPlugin(disable=not progress)]
    config_out: dict
    if is_am:
        if learner is None:
            learner = make_learner(_am_config(args, s), device=args.device)
        if args.replay:
            plugins.append(ReplayPlugin(mem_size=args.replay))
        strategy = av.AMStrategy(learner=learner, train_mb_size=s["batch_size"], train_epochs=s["epochs"],
                                 plugins=plugins, task_classes=av.task_classes_of(bm) if spec.task_aware else None)
        config_out = learner.config.to_dict()
    else:
        hyper = {k: v for k, v in {"ewc_lambda": args.ewc_lambda, "si_lambda": args.si_lambda,
                                   "mem_size": args.mem_size}.items()
                 if v is not None and k in av.BASELINES[s["strategy"]]}
        lr = 1e-3 if args.lr is None else args.lr
        strategy = av.make_baseline(s["strategy"], arch=tuple(int(a) for a in args.arch.split("-")),
                                    task_aware=spec.task_aware, lr=lr, train_mb_size=s["batch_size"],
                                    train_epochs=s["epochs"], device=args.device, seed=s["seed"],
                                    plugins=plugins, **hyper)
        torch.manual_seed(s["seed"])  # Avalanche's data order comes from the global RNG
        config_out = {"arch": args.arch, "lr": lr, **{**av.BASELINES[s["strategy"]], **hyper}}

    header = (f"benchmark {s['benchmark']} ({spec.description}), strategy {s['strategy']}, seed {s['seed']}, "
              f"epochs {s['epochs']}, batch {s['batch_size']}, device {args.device}, threads {torch.get_num_threads()}")
    if not args.json:
        print(header)
    last: dict = {}
    t0 = time.perf_counter()
    if start < stop:
        from tqdm.auto import tqdm

        with tqdm(total=stop - start, desc="experiences", unit="exp", disable=not progress, position=0,
                  dynamic_ncols=True) as bar:
            for item in av.iter_experiences(strategy, bm, start=start):
                rows.append(item["accuracies"])
                last = item
                if args.checkpoint:
                    meta = {"kind": "amstream-continual", **s, "accuracy_matrix": rows, "n_experiences": n_exp}
                    save_checkpoint(args.checkpoint, learner.state_dict(), metadata=meta)
                bar.update(1)
                if len(rows) >= stop:
                    break
    wall = time.perf_counter() - t0

    scores = summarize(rows) if rows else {}
    plot_path = None
    if rows and (args.plot or "").lower() != "none":
        plot_path = args.plot or f"continual-{s['benchmark']}-{s['strategy']}-seed{s['seed']}.png"
        title = (f"{s['strategy']} on {s['benchmark']} (seed {s['seed']}): avg acc {scores['average_accuracy']:.3f}, "
                 f"forgetting {scores['forgetting']:.3f}")
        plot_accuracy_matrix(rows, plot_path, title=title)
    result = {
        "benchmark": s["benchmark"], "strategy": s["strategy"], "seed": s["seed"], "epochs": s["epochs"],
        "batch_size": s["batch_size"], "n_experiences": n_exp, "experiences_trained": len(rows),
        "accuracy_matrix": rows, **scores,
        "stream_accuracy": last.get("stream_accuracy"), "avalanche_stream_forgetting": last.get("stream_forgetting"),
        "avalanche_stream_bwt": last.get("stream_bwt"),
        "train_per_class": s["train_per_class"], "test_per_class": s["test_per_class"], "replay": args.replay,
        "config": config_out, "device": args.device, "threads": torch.get_num_threads(),
        "wall_s": round(wall, 2), "plot": str(plot_path) if plot_path else None, "checkpoint": args.checkpoint,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    _print_matrix(rows, n_exp)
    if rows:
        print(f"average accuracy {scores['average_accuracy']:.4f}   forgetting {scores['forgetting']:.4f}   "
              f"BWT {scores['bwt']:.4f}   (learning accuracy {scores['learning_accuracy']:.4f}, "
              f"max-forgetting {scores['max_forgetting']:.4f})")
    if last.get("stream_accuracy") is not None and start == 0:
        print(f"Avalanche: stream accuracy {last['stream_accuracy']:.4f}, StreamForgetting "
              f"{last['stream_forgetting']:.4f}, StreamBWT {last['stream_bwt']:.4f}")
    if plot_path:
        print(f"heat map: {plot_path}")
    if args.checkpoint:
        print(f"checkpoint: {args.checkpoint} ({len(rows)} of {n_exp} experiences)")
    print(f"wall time {wall:.1f} s")
    return 0


def _print_matrix(rows: list[list[float]], n_exp: int) -> None:
    print("accuracy matrix (row i: after training experience i; column j: test experience j)")
    print("         " + " ".join(f"{'exp' + str(j):>6}" for j in range(n_exp)))
    for i, row in enumerate(rows):
        print(f"after {i:<3}" + " ".join(f"{a:6.3f}" for a in row))
