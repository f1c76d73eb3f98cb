"""How far each layer's weights move under AM-mem and AM-Adam (MNIST, one epoch).

Prints, after minibatches 10, 50, 100 and 300, the test accuracy (first 5,000 test samples)
and ``|W_l - W_l(0)| / |W_l(0)|`` for every layer: the diagnostic behind the AM-mem notes in
`benchmarks/results/am_mem_probe.md`.

    python benchmarks/layer_moves.py [--arch 784-500-500-10] [--seed 1]
"""
from __future__ import annotations

import argparse

import torch

from amstream import AMConfig, make_learner
from amstream.datasets import load_dataset
from amstream.training import iter_training

SETTINGS = {"am-mem": dict(mem_decay=0.8, lr_out=3e-3), "am-adam": dict(lr=8e-3, lr_out=3e-3)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="784-500-500-10")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_dataset("mnist")
    print(f"MNIST {args.arch}, batch 200, seed {args.seed}, threads {torch.get_num_threads()}, device cpu")
    for algo, fields in SETTINGS.items():
        learner = make_learner(AMConfig(arch=args.arch, algo=algo, seed=args.seed, **fields))
        start = [layer.weight.detach().clone() for layer in learner.model.layers]
        for event in iter_training(learner, data.x_train, data.y_train, epochs=1, batch_size=200, seed=args.seed,
                                   x_test=data.x_test[:5000], y_test=data.y_test[:5000],
                                   eval_minibatches={10, 50, 100, 300}, eval_epochs=False):
            if event.test:
                moves = [float((layer.weight - w0).norm() / w0.norm())
                         for layer, w0 in zip(learner.model.layers, start)]
                print(f"{algo:8s} minibatch {event.minibatch:4d}  acc {event.test['accuracy']:.4f}  "
                      f"relative move per layer {' / '.join(f'{m:.2f}' for m in moves)}", flush=True)


if __name__ == "__main__":
    main()
