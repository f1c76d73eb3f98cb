"""Where one AM step's time goes: cProfile over real MNIST minibatches, by function.

    python benchmarks/profile_step.py                       # 784-500-500-10, batch 200, 1 thread
    python benchmarks/profile_step.py --arch lenet5 --steps 50
    python benchmarks/profile_step.py --algo adam           # the same for backprop

Prints the functions with the most own time (``tottime``) and the cumulative time of the
stages of Algorithm 2.1 (forward pass, top code, hidden codes, weight gradients, optimizer
step), and writes them to ``benchmarks/results/profile_step/<arch>_<algo>.md``.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time
from pathlib import Path

import numpy as np
import torch

from amstream import AMConfig, make_learner
from amstream.datasets import load_dataset

HERE = Path(__file__).resolve().parent
#: the stages of Algorithm 2.1 (functional.py's functions) and the learner's own wrapper
STAGES = ("learn", "am_step", "encode_input", "output_loss_grad", "solve_top_code", "solve_hidden_code",
          "_residual_after_step", "update_weights", "output_grad", "hidden_grads", "adam_step")


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="784-500-500-10")
    p.add_argument("--algo", default="am-adam")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="AMConfig fields")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=18)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from amstream.commands.common import parse_key_values

    cfg = AMConfig(arch=args.arch, algo=args.algo, seed=0, **parse_key_values(args.set, "--set"))
    data = load_dataset("mnist")
    rng = np.random.default_rng(0)
    n = args.steps + 20
    idx = rng.permutation(len(data.x_train))[: n * args.batch_size].reshape(n, args.batch_size)
    xs = [torch.as_tensor(data.x_train[i]) for i in idx]
    ys = [torch.as_tensor(data.y_train[i]) for i in idx]
    learner = make_learner(cfg)
    for i in range(20):  # warm-up
        learner.learn(xs[i], ys[i])
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for i in range(20, n):
        learner.learn(xs[i], ys[i])
    prof.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof)
    per_step = 1e3 / args.steps
    rows = []
    for (file, line, name), (cc, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((name, Path(file).name, line, nc, tt * per_step, ct * per_step))
    lines = [f"# Profile of one `{args.algo}` step, {cfg.arch_string()}, batch {args.batch_size}", "",
             f"`python benchmarks/profile_step.py {' '.join(argv if argv is not None else __import__('sys').argv[1:])}`"
             f" — {args.steps} MNIST minibatches after 20 warm-up, {args.threads} thread(s), cpu, "
             f"load {' '.join(f'{v:.2f}' for v in os.getloadavg())}; wall {1e3 * wall / args.steps:.2f} ms/step "
             "with the profiler on (its overhead inflates the many small calls).", "",
             "## Stages (cumulative ms per step)", "", "| stage | ms/step | calls/step |", "|---|---|---|"]
    for stage in STAGES:
        mine = [r for r in rows if r[0] == stage and r[1] in ("functional.py", "learner.py", "optim.py", "network.py")]
        if mine:
            r = max(mine, key=lambda r: r[5])
            lines.append(f"| `{stage}` ({r[1]}) | {r[5]:.2f} | {r[3] / args.steps:g} |")
    lines += ["", f"## Top {args.top} functions by own time (ms per step)", "",
              "| function | file:line | calls/step | own ms | cumulative ms |", "|---|---|---|---|---|"]
    for name, file, line, nc, tt, ct in sorted(rows, key=lambda r: -r[4])[: args.top]:
        lines.append(f"| `{name}` | {file}:{line} | {nc / args.steps:g} | {tt:.3f} | {ct:.3f} |")
    text = "\n".join(lines) + "\n"
    out = HERE / "results" / "profile_step"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{cfg.arch_string()}_{args.algo}.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
