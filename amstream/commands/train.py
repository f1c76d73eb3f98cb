"""`amstream train`: train a learner on a dataset, report the test accuracy.

Example::

    amstream train --dataset mnist --algo am-adam --arch 784-500-500-10 --activation relu \\
        --epochs 20 --batch-size 200 --seed 1 --checkpoint runs/mnist.ckpt --json
"""
from __future__ import annotations

import argparse

from amstream.commands import common


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train on a dataset (online AM, offline AM or backprop)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", help="dataset name (see `amstream datasets`) or a .csv/.npz path")
    common.add_model_args(p)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--limit", type=int, default=None, help="use only the first N training (and test) samples")
    p.add_argument("--standardize", action="store_true",
                   help="standardize features with the training mean/std (saved in the checkpoint)")
    p.add_argument("--checkpoint", default=None, help="write the final state here (atomically)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    common.add_run_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from amstream.checkpoint import load_checkpoint, save_checkpoint
    from amstream.datasets import load_dataset
    from amstream.exceptions import ConfigError
    from amstream.learner import learner_from_state, make_learner
    from amstream.training import Preprocessor, evaluate, fit

    device = common.setup_runtime(args)
    data = load_dataset(args.dataset, limit=args.limit)
    if data.x_test is None or len(data.x_test) == 0:
        raise ConfigError(f"dataset `{data.name}` has no test split to report on")
    prep = Preprocessor.fit(data.x_train) if args.standardize else Preprocessor()
    x_train, x_test = prep(data.x_train), prep(data.x_test)
    args._n_train = len(x_train)
    config = common.config_from_args(args, n_inputs=data.n_features, n_outputs=data.n_classes or 1,
                                     loss="ce" if data.task == "classification" else "mse")

    resumed_epochs = 0
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    if args.resume and ckpt is not None and ckpt.exists():
        loaded = load_checkpoint(ckpt)
        learner = learner_from_state(loaded["state"]["learner"], device=device)
        prep = Preprocessor.from_state(loaded["state"].get("preprocess"))
        x_train, x_test = prep(data.x_train), prep(data.x_test)
        resumed_epochs = int(loaded["metadata"].get("epochs", 0))
        common.log(args, f"resumed {ckpt} after {resumed_epochs} epochs ({learner.n_updates:,} updates)")
    else:
        learner = make_learner(config, device=device)

    common.log(args, f"{config.algo} {config.arch_string()} on {data.name}: {len(x_train):,} train / "
                     f"{len(x_test):,} test samples, batch {args.batch_size}, {args.epochs} epochs, "
                     f"seed {config.seed}, device {device}, threads {args.threads}")
    t0 = time.perf_counter()
    history = fit(learner, x_train, data.y_train, epochs=args.epochs, batch_size=args.batch_size,
                  seed=args.seed + resumed_epochs, x_test=x_test, y_test=data.y_test,
                  progress=common.show_progress(args), desc=config.algo,
                  on_epoch=None if (args.json or common.show_progress(args)) else
                  lambda e: common.log(args, f"epoch {e.epoch}: loss {e.train_loss:.4f} "
                                             f"test accuracy {e.test.get('accuracy', float('nan')):.4f}"))
    wall = time.perf_counter() - t0
    final = evaluate(learner, x_test, data.y_test)
    epochs_done = resumed_epochs + args.epochs
    if ckpt is not None:
        state = {"learner": learner.state_dict(), "preprocess": prep.state_dict()}
        save_checkpoint(ckpt, state, metadata={"dataset": data.name, "epochs": epochs_done,
                                               "test": final, "command": "train"})
        common.log(args, f"checkpoint written to {ckpt}")
    result = {
        "test_accuracy": final.get("accuracy"),
        "test_loss": final["loss"],
        "epochs": epochs_done,
        "samples": learner.n_samples,
        "updates": learner.n_updates,
        "seconds": round(wall, 3),
        "train_seconds": round(history[-1].seconds if history else 0.0, 3),
        "algo": config.algo,
        "arch": config.arch_string(),
        "activation": config.activation if isinstance(config.activation, str) else list(config.activation),
        "seed": config.seed,
        "dataset": data.name,
        "device": str(device),
        "threads": args.threads,
        "epoch_test_accuracy": [e.test.get("accuracy") for e in history if e.kind == "epoch"],
        "checkpoint": str(ckpt) if ckpt else None,
    }
    common.emit(args, result, human=f"test accuracy {final.get('accuracy', float('nan')):.4f} "
                                    f"after {epochs_done} epochs ({learner.n_samples:,} samples, {wall:.1f} s)")
    return 0
