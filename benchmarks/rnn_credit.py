"""How far back in time an AM update reaches in an Elman RNN, beside backprop's gradient.

An RNN unrolled over T steps is, for AM, a chain of T code layers (Algorithm 2.2): the top
code moves against the loss (problem (4)), then each step's code moves to agree with the moved
code above it (problem (5)), from t = T-1 down to 1. This benchmark measures, on a held-out
minibatch, how large that move is at each step, ``|c_t(new) - c_t(forward)|``, next to the
size of backprop's gradient at the same step, ``|dL/dc_t|``, both divided by their value at
the last step, and the cosine between the two. It does so at initialisation and after each
of a few epochs of AM-Adam training, for each seed.

Why the move shrinks: per sample, problem (5) linearized is
``min_d |r - J d|^2 + |d|^2`` with ``J = W_hh diag(tanh'(c_t))`` and r the move above; along
a singular direction of J with value s the answer is ``d = s / (1 + s^2) r``, at most r / 2
(at s = 1), and one line-search step (the default solver) moves less still on an
ill-conditioned J. Backprop's gradient is multiplied by s. A direction that carries memory
(s near 1) so keeps backprop's signal whole but halves AM's at every step.

    python benchmarks/rnn_credit.py                                  # 28x28-rnn64-10, 3 seeds
    python benchmarks/rnn_credit.py --arch 784-rnn15-10 --batch 1024 --lr 1e-3 --lr-out 1e-3   # fig6's rates

Writes ``credit.csv``, ``credit.png`` and ``summary.md`` under ``--out`` (default
``benchmarks/results/rnn_credit/<arch>``).
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
from pathlib import Path

import numpy as np
import torch

from amstream import AMConfig, make_learner
from amstream import functional as F
from amstream.datasets import load_dataset
from amstream.exceptions import ConfigError
from amstream.training import iter_training

HERE = Path(__file__).resolve().parent


def functional_rnn(model: torch.nn.Module, steps: int) -> F.Elman:
    """The learner's Elman network (its ``model`` view) as the functional layers of the paper's
    algorithm; the gradient buffers are scratch (only the codes are computed here)."""
    rnn, out = model.layers
    zeros = [torch.zeros_like(p) for p in (rnn.weight_ih, rnn.weight_hh, rnn.bias)]
    readout = F.Dense(out.weight.detach(), out.bias.detach())
    scratch = F.Dense(torch.zeros_like(out.weight), torch.zeros_like(out.bias))
    return F.Elman(rnn.weight_ih.detach(), rnn.weight_hh.detach(), rnn.bias.detach(), readout, tuple(zeros),
                   scratch, steps)


def credit_by_step(learner, cfg: AMConfig, x: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    """Per step t: the AM code move's norm, backprop's gradient norm, their cosine (sums over the
    minibatch)."""
    steps = cfg.network.layers[0].steps
    net = functional_rnn(learner.model, steps)
    u = net.unroll(x)
    enc = F.encode_input(u.x0, u.layers, u.activations)
    _, g_out = F.output_loss_grad(enc.out, y, cfg.loss)
    codes, _, _ = F.update_codes(enc, y, u.layers, u.activations, cfg.mu, cfg.loss,
                                 iters_top=cfg.code_iters_top, iters=cfg.code_iters, solver=cfg.code_solver,
                                 step=cfg.code_step, g_out_fwd=g_out)
    moves = [codes[t] - enc.codes[t] for t in range(steps)]
    # backprop through time: the gradient of the summed loss w.r.t. each step's code
    w_hh = net.weight_hh.clone().requires_grad_(True)
    state, fwd = u.x0, []
    for step in u.layers[:-1]:  # step t: W_hh tanh(c_{t-1}) + (W_ih x_t + b)
        c = state @ w_hh.T + step.bias
        c.retain_grad()
        fwd.append(c)
        state = torch.tanh(c)
    logits = net.out.forward(torch.relu(state))
    torch.nn.functional.cross_entropy(logits, y, reduction="sum").backward()
    grads = [-c.grad for c in fwd]
    move_norm = np.array([float(m.norm()) for m in moves])
    grad_norm = np.array([float(g.norm()) for g in grads])
    cosine = np.array([float((m * g).sum() / (m.norm() * g.norm())) if m.norm() > 0 else 0.0
                       for m, g in zip(moves, grads)])
    return {"move": move_norm, "grad": grad_norm, "cosine": cosine}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="28x28-rnn64-10")
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3, help="AM-Adam's hidden rate (fig6-rows64's validation choice)")
    p.add_argument("--lr-out", type=float, default=1e-2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    try:
        is_rnn = AMConfig(arch=args.arch).network.is_rnn
    except ConfigError as exc:
        p.error(str(exc))
    if not is_rnn:
        p.error(f"--arch `{args.arch}` is not an RNN (e.g. 28x28-rnn64-10 or 784-rnn15-10)")
    torch.set_num_threads(args.threads)
    out = args.out or HERE / "results" / "rnn_credit" / args.arch
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset("mnist")
    # the probe minibatch: the last 1,000 training images, which training below never sees
    x_train, y_train = data.x_train[:-1000], data.y_train[:-1000]
    x_probe = torch.as_tensor(data.x_train[-1000:], dtype=torch.float32)
    y_probe = torch.as_tensor(data.y_train[-1000:], dtype=torch.int64)
    rows = []
    for seed in args.seeds:
        cfg = AMConfig(arch=args.arch, algo="am-adam", lr=args.lr, lr_out=args.lr_out, seed=seed)
        learner = make_learner(cfg)

        def probe(epoch: int, accuracy: float) -> None:
            measured = credit_by_step(learner, cfg, x_probe, y_probe)
            T = len(measured["move"])
            for t in range(T):
                rows.append({"seed": seed, "epoch": epoch, "step": t + 1, "test_accuracy": round(accuracy, 4),
                             "am_move": measured["move"][t], "bp_grad": measured["grad"][t],
                             "am_move_rel": measured["move"][t] / measured["move"][-1],
                             "bp_grad_rel": measured["grad"][t] / measured["grad"][-1],
                             "cosine": measured["cosine"][t]})
            last = [r for r in rows if r["seed"] == seed and r["epoch"] == epoch]
            print(f"seed {seed} epoch {epoch}: test accuracy {accuracy:.4f}; relative AM move / backprop gradient "
                  f"at step {T // 2}: {last[T // 2 - 1]['am_move_rel']:.1e} / {last[T // 2 - 1]['bp_grad_rel']:.1e}",
                  flush=True)

        probe(0, float("nan"))
        for event in iter_training(learner, x_train, y_train, epochs=args.epochs, batch_size=args.batch, seed=seed,
                                   x_test=data.x_test, y_test=data.y_test):
            if event.kind == "epoch":
                probe(event.epoch, event.test["accuracy"])
    with open(out / "credit.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    meta = {"date": dt.datetime.now().isoformat(timespec="seconds"),
            "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "threads": args.threads, "torch": torch.__version__, "arch": args.arch, "batch": args.batch,
            "AM-Adam": f"lr {args.lr:g}, output layer {args.lr_out:g}, defaults otherwise (mu 1, one "
                       "line-search step per code problem)",
            "probe": "the last 1,000 MNIST training images (not trained on)", "seeds": args.seeds}
    (out / "summary.md").write_text(summarize(rows, meta))
    plot(rows, out, args.arch)
    print((out / "summary.md").read_text())
    return 0


def _per_step_factor(rel: np.ndarray, upto: int) -> float:
    """The geometric mean shrink per step over the last ``upto`` steps (1 = no shrinking)."""
    T = len(rel)
    lo = rel[T - 1 - upto]
    return float(lo ** (1.0 / upto)) if lo > 0 else 0.0


def summarize(rows: list[dict], meta: dict) -> str:
    lines = ["# How far back an AM update reaches in an RNN", ""] + [f"- {k}: {v}" for k, v in meta.items()]
    epochs = sorted({r["epoch"] for r in rows})
    T = max(r["step"] for r in rows)
    probes = [T - k for k in (1, 4, 8, 12, 16, 24, 48, 96) if T - k >= 1]
    lines += ["", "Norms relative to the last step's (mean over seeds); per-step factor: the geometric mean "
              f"shrink over the last {min(8, T - 1)} steps.", "",
              "| epoch | test acc | " + " | ".join(f"step {s}: AM / BP" for s in probes)
              + " | per-step factor AM / BP | cosine at step " + f"{T - 4} |",
              "|---|---|" + "---|" * len(probes) + "---|---|"]
    for e in epochs:
        mine = [r for r in rows if r["epoch"] == e]
        seeds = sorted({r["seed"] for r in mine})

        def mean(key, step):
            return float(np.mean([r[key] for r in mine if r["step"] == step]))

        cells = [f"{mean('am_move_rel', s):.1e} / {mean('bp_grad_rel', s):.1e}" for s in probes]
        upto = min(8, T - 1)
        am = np.mean([_per_step_factor(np.array([r["am_move_rel"] for r in mine if r["seed"] == s]), upto)
                      for s in seeds])
        bp = np.mean([_per_step_factor(np.array([r["bp_grad_rel"] for r in mine if r["seed"] == s]), upto)
                      for s in seeds])
        acc = mean("test_accuracy", T)
        lines.append(f"| {e} | {'-' if acc != acc else f'{acc:.4f}'} | " + " | ".join(cells)
                     + f" | {am:.2f} / {bp:.2f} | {mean('cosine', T - 4):+.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path, arch: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = sorted({r["epoch"] for r in rows})
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(epochs)))
    f, ax = plt.subplots(figsize=(7, 4.5))
    for e, color in zip(epochs, colors):
        mine = [r for r in rows if r["epoch"] == e]
        steps = sorted({r["step"] for r in mine})
        for key, style, who in (("am_move_rel", "-", "AM code move"), ("bp_grad_rel", "--", "backprop gradient")):
            ys = [np.mean([r[key] for r in mine if r["step"] == s]) for s in steps]
            ax.semilogy(steps, np.maximum(ys, 1e-30), style, color=color, label=f"{who}, epoch {e}")
    T = max(r["step"] for r in rows)
    steps = np.arange(1, T + 1)
    ax.semilogy(steps, 0.5 ** (T - steps), ":", color="gray", label="bound on AM's move: 2^-(T-t)")
    ax.set_ylim(1e-12, 1e2)
    ax.set_xlabel("time step t (the readout is after the last)")
    ax.set_ylabel("norm at step t / norm at the last step")
    ax.set_title(f"{arch}: how far back credit reaches (mean over seeds)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    f.tight_layout()
    f.savefig(out / "credit.png", dpi=110)
    plt.close(f)


if __name__ == "__main__":
    raise SystemExit(main())
