"""How far AM moves the codes, and what that does to the weights (the LeNet-5 instability).

Trains AM-Adam on MNIST minibatches (batch 200) and prints, every ``--every`` minibatches, the
test accuracy (first 2,000 test images), each code's relative move ``|c - c_fwd| / |c_fwd|``
made by the code solvers on the last minibatch, the share of each layer's units active on at
least one sample, and each layer's weight norm. It observes ``functional.update_codes`` by
wrapping it (the update itself is unchanged).

    python benchmarks/code_moves.py --arch lenet5 --seed 1 --lr 0.01 --lr-out 0.01
    python benchmarks/code_moves.py --arch lenet5 --seed 1 --lr 0.003 --lr-out 0.01 --set mu=0.1
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

import amstream.functional as F
from amstream import AMConfig, make_learner
from amstream.datasets import load_dataset


def _norm(a) -> float:
    return float((a * a).sum()) ** 0.5


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="lenet5")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--lr-out", type=float, default=0.01)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="other AMConfig fields")
    p.add_argument("--minibatches", type=int, default=300)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from amstream.commands.common import parse_key_values

    seen: dict[str, list[float]] = {}
    solve = F.update_codes

    def observed(enc, *a, **k):
        codes, acts, residuals = solve(enc, *a, **k)
        seen["move"] = [_norm(c - f) / max(_norm(f), 1e-30) for c, f in zip(codes, enc.codes)]
        alive = [(f.reshape(len(f), -1) > 0).any(0) for f in enc.codes]
        seen["alive"] = [float(u.sum()) / u.shape[0] for u in alive]
        return codes, acts, residuals

    F.update_codes = observed
    cfg = AMConfig(arch=args.arch, seed=args.seed, lr=args.lr, lr_out=args.lr_out,
                   **parse_key_values(args.set, "--set"))
    data = load_dataset("mnist")
    learner = make_learner(cfg)
    x_test, y_test = torch.as_tensor(data.x_test[:2000]), torch.as_tensor(data.y_test[:2000])
    order = np.random.default_rng(args.seed).permutation(len(data.x_train))
    print(f"{cfg.arch_string()} am-adam lr {args.lr} lr_out {args.lr_out} {' '.join(args.set)}, seed {args.seed}, "
          f"batch 200, {args.threads} thread(s), cpu, load {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("| minibatch | test acc | code moves (layer 1..L) | units alive | weight norms (layer 1..L+1) |")
    print("|---|---|---|---|---|")
    for step in range(1, args.minibatches + 1):
        idx = order[((step - 1) * 200) % len(order):][:200]
        learner.learn(torch.as_tensor(data.x_train[idx]), torch.as_tensor(data.y_train[idx]))
        if step % args.every == 0:
            acc = float((learner.predict(x_test) == y_test).float().mean())
            norms = [float(layer.weight.norm()) for layer in learner.model.layers]
            print(f"| {step} | {acc:.3f} | {' '.join(f'{m:.1e}' for m in seen['move'])} | "
                  f"{' '.join(f'{a:.2f}' for a in seen['alive'])} | {' '.join(f'{n:.1f}' for n in norms)} |",
                  flush=True)
    F.update_codes = solve


if __name__ == "__main__":
    main()
