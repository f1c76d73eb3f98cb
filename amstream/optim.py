"""The weight steps of Algorithm 2.3 that are plain optimizers: Adam and SGD on flat buffers.

AM-Adam steps every hidden layer on its own local loss and the output layer on the loss;
all of them are elementwise updates, so a learner keeps its parameters, gradients and
moments in flat buffers and one call steps every layer it covers (each layer still sees only
its own gradient). The arithmetic is ``torch.optim.Adam``'s and ``torch.optim.SGD``'s (no
weight decay, no amsgrad, no Nesterov), written once against :mod:`amstream.backend`; for
torch tensors :func:`adam_step` uses the fused kernel behind ``torch.optim.Adam(fused=True)``
(one pass over memory instead of a dozen; faster at every size, measured), as
``torch.optim.adam`` picks its own backend.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from amstream.backend import TORCH, backend_of

__all__ = ["AdamSlot", "SGDSlot", "adam_step", "sgd_step", "FLUSH_EVERY"]

Array = Any

#: every this many steps, moments below 1e-30 are set to 0 on the CPU (see :func:`flush`)
FLUSH_EVERY = 64
_TINY = 1e-30


class AdamSlot(NamedTuple):
    """Flat views that one Adam call steps: parameters, gradients and the two moments."""

    param: Array
    grad: Array
    exp_avg: Array
    exp_avg_sq: Array


class SGDSlot(NamedTuple):
    """Flat views that one SGD call steps: parameters, gradients and the momentum buffer."""

    param: Array
    grad: Array
    momentum_buffer: Array


_FUSED = hasattr(torch, "_fused_adam_")  # the kernel of torch.optim.Adam(fused=True)


def adam_step(s: AdamSlot, t: int, *, lr: float, betas: tuple[float, float], eps: float,
              fused: bool | None = None) -> None:
    """One Adam step in place, the ``t``-th (t >= 1) on these parameters.

    ``fused`` (default: where torch has the kernel for the tensors' device) runs torch's fused
    kernel; otherwise the step is a dozen array operations on whichever backend holds them.
    """
    beta1, beta2 = betas
    xp = backend_of(s.param)
    if fused is None:
        fused = xp is TORCH and _FUSED and s.param.device.type in ("cpu", "cuda")
    if fused:
        step = torch.full((), float(t), dtype=torch.float32, device=s.param.device)
        torch._fused_adam_([s.param], [s.grad], [s.exp_avg], [s.exp_avg_sq], [], [step], lr=lr,
                           beta1=beta1, beta2=beta2, weight_decay=0.0, eps=eps, amsgrad=False,
                           maximize=False)
    else:
        p, g, m, v = s
        m += (g - m) * (1.0 - beta1)  # exp_avg.lerp_(grad, 1 - beta1)
        v *= beta2  # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
        v += (g * g) * (1.0 - beta2)
        denom = xp.sqrt(v)  # sqrt(v) / sqrt(1 - beta2^t) + eps
        denom *= 1.0 / math.sqrt(1.0 - beta2 ** t)
        denom += eps
        update = m / denom  # param -= lr / (1 - beta1^t) * m / denom
        update *= lr / (1.0 - beta1 ** t)
        p -= update
    if t % FLUSH_EVERY == 0:
        flush(s.exp_avg, s.exp_avg_sq)


def sgd_step(s: SGDSlot, *, lr: float, momentum: float) -> None:
    """One SGD step with (heavy-ball) momentum in place; the buffer starts at 0, so the first
    step is a plain gradient step, as in ``torch.optim.SGD``."""
    p, g, buf = s
    if momentum:
        buf *= momentum
        buf += g
        p -= buf * lr
    else:
        p -= g * lr


def flush(*arrays: Array) -> None:
    """Set to 0, in place, the entries below 1e-30 of CPU arrays.

    Where an input stays 0 (a one-hot column never seen yet, a missing feature), its
    gradient is 0 and its moments (and AM-mem's decaying memories) shrink geometrically,
    down into float32's subnormal range (below 1.2e-38), where each arithmetic operation
    on them costs a hundred times more on a CPU: the update then runs several times slower.
    Values below 1e-30 change nothing else (they are 22 orders of magnitude below Adam's eps).
    """
    for a in arrays:
        if isinstance(a, torch.Tensor) and a.device.type != "cpu":
            continue
        backend_of(a).flush_subnormal(a, _TINY)
