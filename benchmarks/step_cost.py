"""Cost of one minibatch update: AM-Adam and AM-mem against Adam backprop, same net, same process.

Real MNIST minibatches (batch 200) cycle through all learners in an interleaved order, so
that machine noise (other processes on shared cores) hits every method alike; the
reported time is the median over the timed steps after a warm-up.

    python benchmarks/step_cost.py --json                 # 784-500-500-10, 1 thread, cpu
    python benchmarks/step_cost.py --arch 784-100-100-10 --threads 2
    python benchmarks/step_cost.py --arch lenet5 --json   # or 784-rnn15-10 --batch-size 1024
    python benchmarks/step_cost.py --activation sign,tanh --json   # the binary net (+ STE)
    python benchmarks/step_cost.py --device cuda --json

The JSON has ``ratio_am_adam`` and ``ratio_am_mem`` (each method's median time per
minibatch over Adam's) plus the absolute times, threads and device.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from amstream import AMConfig, make_learner
from amstream.datasets import load_dataset

def algos_for(cfg: AMConfig) -> tuple[str, ...]:
    """Adam, AM-Adam and SGD; AM-mem where the net is an MLP; STE where it has sign units."""
    return ("adam", "am-adam") + (("am-mem",) if cfg.network.is_mlp else ()) + ("sgd",) + \
        (("ste",) if "sign" in cfg.activations else ())


def measure(arch, *, steps: int, warmup: int, batch_size: int, device: str, seed: int,
            activation="relu") -> dict[str, float]:
    data = load_dataset("mnist")
    rng = np.random.default_rng(seed)
    n_batches = warmup + steps
    idx = rng.permutation(len(data.x_train))[: n_batches * batch_size].reshape(n_batches, batch_size)
    xs = [torch.as_tensor(data.x_train[i], device=device) for i in idx]
    ys = [torch.as_tensor(data.y_train[i], device=device) for i in idx]
    base = AMConfig(arch=arch, activation=activation, seed=seed)
    algos = algos_for(base)
    learners = {algo: make_learner(base.replace(algo=algo), device=device) for algo in algos}
    times: dict[str, list[float]] = {algo: [] for algo in algos}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for step in range(n_batches):
        order = algos if step % 2 == 0 else algos[::-1]  # alternate who goes first
        for algo in order:
            sync()
            t0 = time.perf_counter()
            learners[algo].learn(xs[step], ys[step])
            sync()
            if step >= warmup:
                times[algo].append(time.perf_counter() - t0)
    return {algo: float(np.median(v)) * 1e3 for algo, v in times.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="784-500-500-10", help="an MLP's sizes or any arch spec (lenet5, 784-rnn15-10)")
    p.add_argument("--activation", default="relu", help="one name or a comma list (sign,tanh)")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    activation = tuple(args.activation.split(",")) if "," in args.activation else args.activation
    ms = measure(args.arch, steps=args.steps, warmup=args.warmup, batch_size=args.batch_size,
                 device=args.device, seed=args.seed, activation=activation)
    result = {
        "arch": args.arch,
        "batch_size": args.batch_size,
        "ms_per_minibatch": {k: round(v, 3) for k, v in ms.items()},
        "activation": args.activation,
        **{f"ratio_{algo.replace('-', '_')}": round(v / ms["adam"], 3) for algo, v in ms.items() if algo != "adam"},
        "threads": torch.get_num_threads(),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "steps": args.steps,
        "seed": args.seed,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.arch}, batch {args.batch_size}, {result['threads']} thread(s), {result['device']}, "
              f"median of {args.steps} steps (seed {args.seed}):")
        for algo, v in ms.items():
            print(f"  {algo:8s} {v:8.2f} ms/minibatch  ({v / ms['adam']:.2f}x Adam)")
    return result


if __name__ == "__main__":
    main()
