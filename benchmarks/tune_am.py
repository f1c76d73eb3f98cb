"""The small hyperparameter grid behind the benchmark settings (early-training accuracy).

Each configuration trains on the first ``--minibatches`` shuffled MNIST minibatches (batch
200) for each seed and reports the test accuracy (first 5,000 test samples) after 10, 50,
100 and the last minibatch, averaged over seeds. Backprop baselines run in the same process.

    python benchmarks/tune_am.py                          # the default grid, 784-500-500-10
    python benchmarks/tune_am.py --grid '{"algo": ["am-mem"], "mem_decay": [0.8, 0.9, 0.99]}'

With ``--epochs N`` it trains on the whole training set for N epochs instead (learning rates
halved after every epoch, a compressed version of the 20-epoch schedule) and reports the full
test accuracy after each epoch: the probe behind AM-mem's forgetting factor 0.6
(`benchmarks/results/am_mem_probe.md`):

    python benchmarks/tune_am.py --epochs 4 --seeds 1 \
        --grid '{"algo": ["am-mem"], "lr_out": [0.003], "mem_decay": [0.8, 0.6, 0.4]}'
"""
from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
import torch

from amstream import AMConfig, make_learner
from amstream.datasets import load_dataset
from amstream.training import iter_training

DEFAULT_GRIDS = [
    {"algo": ["adam"], "lr": [1e-3, 3e-3, 8e-3]},
    {"algo": ["am-adam"], "mu": [0.01, 0.1, 1.0], "code_iters_top": [1, 3], "lr": [3e-3, 8e-3]},
    {"algo": ["am-adam"], "mu": [1.0, 3.0], "code_iters": [1, 2], "lr": [8e-3], "lr_out": [3e-3, 8e-3]},
    {"algo": ["am-mem"], "mem_decay": [0.8, 0.9, 0.99, 1.0]},
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="784-500-500-10")
    p.add_argument("--grid", default=None, help="JSON dict of AMConfig field -> list of values")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    p.add_argument("--minibatches", type=int, default=150)
    p.add_argument("--epochs", type=int, default=0,
                   help="train N whole epochs (lr halved every epoch) and report test accuracy per epoch")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_dataset("mnist")
    arch = tuple(int(s) for s in args.arch.split("-"))
    marks = sorted({10, 50, 100, args.minibatches} & set(range(1, args.minibatches + 1)))
    n = args.minibatches * 200
    grids = [json.loads(args.grid)] if args.grid else DEFAULT_GRIDS
    if args.epochs:
        per_epoch = -(-len(data.x_train) // 200)
        print(f"MNIST {args.arch}, batch 200, {args.epochs} epochs, lr halved every epoch, seeds {args.seeds}, "
              f"threads {torch.get_num_threads()}, device cpu; full test accuracy after each epoch")

        def curve(fields, seed):
            learner = make_learner(AMConfig(arch=arch, seed=seed, lr_decay_every=per_epoch, **fields))
            return [e.test["accuracy"] for e in iter_training(
                learner, data.x_train, data.y_train, epochs=args.epochs, batch_size=200, seed=seed,
                x_test=data.x_test, y_test=data.y_test) if e.kind == "epoch"]
        digits = 4
    else:
        print(f"MNIST {args.arch}, batch 200, first {args.minibatches} minibatches, seeds {args.seeds}, "
              f"threads {torch.get_num_threads()}, device cpu; accuracy at minibatches {marks}")

        def curve(fields, seed):
            learner = make_learner(AMConfig(arch=arch, seed=seed, **fields))
            order = np.random.default_rng(seed).permutation(len(data.x_train))[:n]
            return [e.test["accuracy"] for e in iter_training(
                learner, data.x_train[order], data.y_train[order], epochs=1, batch_size=200, seed=seed,
                shuffle=False, x_test=data.x_test[:5000], y_test=data.y_test[:5000],
                eval_minibatches=marks, eval_epochs=False) if e.test]
        digits = 3
    for grid in grids:
        for values in itertools.product(*grid.values()):
            fields = dict(zip(grid, values))
            curves = [curve(fields, seed) for seed in args.seeds]
            print(json.dumps(fields), np.mean(curves, 0).round(digits).tolist(), flush=True)


if __name__ == "__main__":
    main()
