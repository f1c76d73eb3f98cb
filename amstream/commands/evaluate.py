"""`amstream evaluate`: test accuracy of a saved learner on a dataset's test split.

Example::

    amstream evaluate --checkpoint runs/mnist.ckpt --dataset mnist --json
"""
from __future__ import annotations

import argparse

from amstream.commands import common


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a checkpoint on a dataset's test split",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by `train` or `serve`")
    p.add_argument("--dataset", default="mnist", help="dataset name or a .csv/.npz path")
    p.add_argument("--limit", type=int, default=None, help="use only the first N test samples")
    common.add_run_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from amstream.checkpoint import load_checkpoint
    from amstream.datasets import load_dataset
    from amstream.exceptions import ConfigError
    from amstream.learner import learner_from_state
    from amstream.training import Preprocessor, evaluate

    device = common.setup_runtime(args)
    loaded = load_checkpoint(args.checkpoint)
    state = loaded["state"]
    learner = learner_from_state(state["learner"] if "learner" in state else state, device=device)
    prep = Preprocessor.from_state(state.get("preprocess"))
    data = load_dataset(args.dataset, limit=args.limit)
    if data.x_test is None or len(data.x_test) == 0:
        raise ConfigError(f"dataset `{data.name}` has no test split")
    if data.n_features != learner.n_inputs:
        raise ConfigError(f"checkpoint `{args.checkpoint}` expects {learner.n_inputs} features, "
                          f"dataset `{data.name}` has {data.n_features}")
    t0 = time.perf_counter()
    metrics = evaluate(learner, prep(data.x_test), data.y_test)
    config = learner.config
    result = {
        "test_accuracy": metrics.get("accuracy"),
        "test_loss": metrics["loss"],
        "epochs": loaded["metadata"].get("epochs"),
        "samples": learner.n_samples,
        "updates": learner.n_updates,
        "seconds": round(time.perf_counter() - t0, 3),
        "algo": config.algo,
        "arch": config.arch_string(),
        "seed": config.seed,
        "dataset": data.name,
        "n_test": len(data.x_test),
        "device": str(device),
        "checkpoint": str(args.checkpoint),
    }
    common.emit(args, result, human=f"test accuracy {metrics.get('accuracy', float('nan')):.4f} on "
                                    f"{len(data.x_test):,} {data.name} test samples")
    return 0
