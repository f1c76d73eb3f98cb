"""Code solvers compared: the default per-sample line search against the authors' momentum steps.

Two measurements on MNIST (784-500-500-10, batch 200), both in this one process:

1. How far each solver gets on the code problems (4) and (5) of real minibatches, taken
   along an AM-Adam run: the objective after k iterations relative to the forward codes
   (lower is better; 1.0 = no progress), averaged over minibatches.
2. Test accuracy after 10, 50, 100 and 300 minibatches of AM-Adam with each solver (and
   each solver's iteration count), over seeds.

    python benchmarks/code_solvers.py            # ~ a few minutes on 1 CPU thread
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from amstream import AMConfig, functional as F, make_learner
from amstream.datasets import load_dataset
from amstream.training import iter_training

# the authors' code: SGD(lr 0.3, momentum 0.9, nesterov) on *mean*-reduced losses; on our
# per-sample sums that is a rate of 0.3 / (batch * width); we also try larger rates
MOMENTUM_RATES = (0.3 / (200 * 500), 1e-3, 1e-2)


def objective_progress(data, *, n_batches: int, iters: int, seed: int) -> dict[str, list[float]]:
    learner = make_learner(AMConfig(arch=(784, 500, 500, 10), algo="am-adam", seed=seed, lr=8e-3))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.x_train))
    solvers = {"linesearch": ("linesearch", 1.0)} | {f"momentum lr={r:.2g}": ("momentum", r) for r in MOMENTUM_RATES}
    ratios: dict[str, list[list[float]]] = {f"{k} {p}": [] for k in solvers for p in ("top", "hidden")}
    mu = learner.mu
    for b in range(n_batches):
        idx = order[b * 200:(b + 1) * 200]
        x, y = torch.as_tensor(data.x_train[idx]), torch.as_tensor(data.y_train[idx])
        with torch.no_grad():
            layers = learner.model.as_layers()
            enc = F.encode_input(x, layers, ("relu", "relu"))
            c2f, c1f = enc.codes[1], enc.codes[0]
            top0 = float(F.top_code_objective(c2f, c2f, y, layers[2], "relu", mu, "ce"))
            for name, (solver, step) in solvers.items():
                tops, hids = [], []
                for k in range(1, iters + 1):
                    c2, _ = F.solve_top_code(c2f, y, layers[2], "relu", mu, "ce", iters=k, solver=solver, step=step)
                    tops.append(float(F.top_code_objective(c2, c2f, y, layers[2], "relu", mu, "ce")) / top0)
                # hidden problem against the line-search top code, so both face the same target
                c2, _ = F.solve_top_code(c2f, y, layers[2], "relu", mu, "ce", iters=1)
                hid0 = float(F.hidden_code_objective(c1f, c1f, c2, layers[1], "relu", mu))
                for k in range(1, iters + 1):
                    c1, _, _ = F.solve_hidden_code(c1f, c2, c2f, layers[1], "relu", mu, iters=k, solver=solver, step=step)
                    hids.append(float(F.hidden_code_objective(c1, c1f, c2, layers[1], "relu", mu)) / hid0)
                ratios[f"{name} top"].append(tops)
                ratios[f"{name} hidden"].append(hids)
        learner.learn(x, y)
    return {k: np.mean(v, 0).round(4).tolist() for k, v in ratios.items()}


def accuracy(data, *, seeds, marks=(10, 50, 100, 300)) -> list[dict]:
    variants = {
        "linesearch x1 (default)": dict(code_solver="linesearch", code_iters=1, code_iters_top=1),
        "linesearch x3": dict(code_solver="linesearch", code_iters=3, code_iters_top=3),
        "momentum x5 lr=1e-3": dict(code_solver="momentum", code_step=1e-3, code_iters=5, code_iters_top=5),
        "momentum x5 lr=3e-6 (authors')": dict(code_solver="momentum", code_step=3e-6, code_iters=5, code_iters_top=5),
    }
    rows = []
    for name, kw in variants.items():
        accs = []
        for seed in seeds:
            learner = make_learner(AMConfig(arch=(784, 500, 500, 10), algo="am-adam", seed=seed, lr=8e-3, **kw))
            curve = [e.test["accuracy"] for e in iter_training(
                learner, data.x_train, data.y_train, epochs=1, batch_size=200, seed=seed,
                x_test=data.x_test[:5000], y_test=data.y_test[:5000], eval_minibatches=marks, eval_epochs=False)
                if e.test]
            accs.append(curve)
        mean = np.mean(accs, 0)
        rows.append({"variant": name, **{f"acc@{m}": round(float(a), 4) for m, a in zip(marks, mean)}})
        print(rows[-1], flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--batches", type=int, default=20, help="minibatches for the objective measurement")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_dataset("mnist")
    print(f"MNIST 784-500-500-10, batch 200, seeds {args.seeds}, threads {torch.get_num_threads()}, device cpu")
    progress = objective_progress(data, n_batches=args.batches, iters=args.iters, seed=args.seeds[0])
    print("objective after k = 1.." + str(args.iters) + " iterations, relative to the forward codes:")
    for k, v in progress.items():
        print(f"  {k:32s} {v}")
    rows = accuracy(data, seeds=args.seeds)
    print(json.dumps({"objective_ratio": progress, "accuracy": rows}))


if __name__ == "__main__":
    main()
