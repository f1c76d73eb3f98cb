"""The activations sigma_l of eq. (1): value, derivative and straight-through derivative, once.

Every part of amstream that applies an activation takes it from :data:`ACTIVATIONS`: the AM
update (:mod:`amstream.functional`), the forward pass of every learner, the backprop
baselines (through :func:`torch_activation`, which makes the entry differentiable for
autograd) and the River estimators' predictions. Each entry is written once against the
tiny array API of :mod:`amstream.backend`, so it runs on NumPy arrays and torch tensors.

``sign`` is not differentiable: where a derivative is needed (inside the code subproblems
of AM, and in the backward pass of the ``ste`` baseline) its straight-through estimate
``1{|c| <= 1}`` stands in for it (Lee et al., 2015; the paper's binary network).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

from amstream.backend import TORCH, Backend, backend_of

__all__ = ["Activation", "ACTIVATIONS", "apply", "torch_activation"]


class Activation(NamedTuple):
    """sigma, and sigma'(c) computed from c and a = sigma(c) (whichever is cheaper)."""

    fn: Callable[[Backend, Any], Any]
    grad: Callable[[Backend, Any, Any], Any]
    binary_grad: bool = False  # sigma' only takes the values 0 and 1
    piecewise_linear: bool = False  # sigma(c + dc) = sigma(c) + sigma'(c) dc unless c crosses 0
    straight_through: bool = False  # grad is an estimate standing in for a derivative that is 0


ACTIVATIONS: dict[str, Activation] = {
    # sign(a) = 1{c > 0} for a = relu(c) >= 0: cheaper than a comparison
    "relu": Activation(lambda xp, c: xp.relu(c), lambda xp, c, a: xp.sign(a), True, True),
    # 1 where c > 0, 0.01 elsewhere (0.505 at c = 0)
    "leaky_relu": Activation(lambda xp, c: xp.where(c > 0, c, 0.01 * c),
                             lambda xp, c, a: xp.sign(a) * 0.495 + 0.505, False, True),
    "tanh": Activation(lambda xp, c: xp.tanh(c), lambda xp, c, a: 1.0 - a * a),
    "sigmoid": Activation(lambda xp, c: xp.sigmoid(c), lambda xp, c, a: a * (1.0 - a)),
    "identity": Activation(lambda xp, c: c, lambda xp, c, a: xp.ones_like(c), True, True),
    # relu(tanh(c)): an Elman RNN's last state, read out through a ReLU (the paper's Section 4)
    "tanh_relu": Activation(lambda xp, c: xp.relu(xp.tanh(c)),
                            lambda xp, c, a: xp.as_float(c > 0, c) * (1.0 - a * a)),
    # sign(0) = +1, so that a unit is always on or off
    "sign": Activation(lambda xp, c: xp.as_float(c >= 0, c) * 2.0 - 1.0,
                       lambda xp, c, a: xp.as_float(xp.abs(c) <= 1.0, c), True, False, True),
}


def apply(name: str, c):
    """sigma(c) for the activation called ``name``, on a NumPy array or a torch tensor."""
    return ACTIVATIONS[name].fn(backend_of(c), c)


class _StraightThrough(torch.autograd.Function):
    """sigma in the forward pass, the entry's straight-through derivative in the backward."""

    @staticmethod
    def forward(ctx, c, name):  # type: ignore[override]
        ctx.save_for_backward(c)
        ctx.name = name
        return ACTIVATIONS[name].fn(TORCH, c)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (c,) = ctx.saved_tensors
        return grad * ACTIVATIONS[ctx.name].grad(TORCH, c, None), None


def torch_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``ACTIVATIONS[name]`` as a function of torch tensors that autograd can differentiate
    (through the straight-through estimate for ``sign``)."""
    act = ACTIVATIONS[name]
    if act.straight_through:
        return lambda c: _StraightThrough.apply(c, name)
    return lambda c: act.fn(TORCH, c)
