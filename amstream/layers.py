"""The linear maps between codes, and their adjoints: what the code problems need of a layer.

A code layer maps the previous activations ``a`` to its code ``c = W M(a) + b``, where the
input map M is the identity, a flattening, or a max-pooling (then flattening) of the
activations (:mod:`amstream.network`). The code subproblems of Algorithm 2.2 move the
activations, so they need the layer's linearization in its input at the current ``a``:

- ``layer.at(a).apply(v)``: the first-order change ``W M'(a) v`` of the layer's output;
- ``layer.at(a).adjoint(r)``: its transpose ``M'(a)^T W^T r``, which carries a residual back;

and the weight step of Algorithm 2.3 needs ``layer.grad_into(a, r, grad)``: the gradient
``r^T M(a)`` (and ``sum r`` for the bias) of the local least squares (6), written into the
layer's gradient buffers. ``Dense`` runs on either backend; ``Conv`` and max-pooling on torch
(a learner with them runs on torch).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as tF
from torch.nn.grad import conv2d_input, conv2d_weight

from amstream.backend import backend_of

__all__ = ["Dense", "Conv"]

Array = Any


class Dense(NamedTuple):
    """``c = M(a) @ weight.T + bias``; bias may be None (or per-sample [B, out], as the input
    term of an RNN step)."""

    weight: Array
    bias: Array | None
    pool: int = 0  # max-pool the incoming feature maps first (0: no)
    flatten: bool = False  # flatten the incoming activations first

    @property
    def plain(self) -> bool:
        return not self.pool and not self.flatten

    def forward(self, a):
        if self.plain:
            return backend_of(a).linear(a, self.weight, self.bias)
        return backend_of(a).linear(_flat(_pooled(a, self.pool)[0]), self.weight, self.bias)

    def at(self, a):
        """The layer linearized in its input at ``a`` (a plain layer is linear: itself)."""
        return self if self.plain else _Linearized(self, a)

    def apply(self, v):
        return v @ self.weight.T

    def adjoint(self, r):
        return r @ self.weight

    def grad_into(self, a, r, grad: "Dense") -> None:
        """``grad.weight = r^T M(a)``, ``grad.bias = sum_i r_i``, in place."""
        xp = backend_of(r)
        u = a if self.plain else _flat(_pooled(a, self.pool)[0])
        xp.matmul_into(grad.weight, r.T, u)
        if grad.bias is not None:
            xp.colsum_into(grad.bias, r)


class Conv(NamedTuple):
    """``c = conv2d(M(a), weight, bias)`` with stride and zero padding (torch only)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: int = 1
    padding: int = 0
    pool: int = 0

    plain = False

    def forward(self, a):
        return tF.conv2d(_pooled(a, self.pool)[0], self.weight, self.bias, self.stride, self.padding)

    def at(self, a):
        return _Linearized(self, a)

    def grad_into(self, a, r, grad: "Conv") -> None:
        u = _pooled(a, self.pool)[0]
        grad.weight.copy_(conv2d_weight(u, self.weight.shape, r, self.stride, self.padding))
        if grad.bias is not None:
            torch.sum(r, (0, 2, 3), out=grad.bias)


def _flat(u):
    """[B, ...] -> [B, n] (also for B = 0, where reshape(0, -1) is ambiguous)."""
    return u.reshape(u.shape[0], math.prod(u.shape[1:]))


def _pooled(a, pool: int):
    """(max-pooled a, the argmax indices) or (a, None)."""
    if not pool:
        return a, None
    return tF.max_pool2d(a, pool, return_indices=True)


class _Linearized:
    """A layer with an input map, linearized at the activations ``a``: max-pooling selects,
    in each window, the entry that is the largest in ``a``."""

    __slots__ = ("layer", "a_shape", "u_shape", "index")

    def __init__(self, layer, a):
        self.layer = layer
        u, self.index = _pooled(a, layer.pool)
        self.a_shape, self.u_shape = tuple(a.shape), tuple(u.shape)

    def _select(self, v):  # M'(a) v
        if self.index is None:
            return v
        return v.flatten(2).gather(2, self.index.flatten(2)).view(self.u_shape)

    def _unselect(self, u):  # M'(a)^T u
        if self.index is None:
            return u
        return tF.max_unpool2d(u, self.index, self.layer.pool, output_size=self.a_shape[-2:])

    def apply(self, v):
        layer = self.layer
        u = self._select(v)
        if isinstance(layer, Conv):
            return tF.conv2d(u, layer.weight, None, layer.stride, layer.padding)
        return _flat(u) @ layer.weight.T

    def adjoint(self, r):
        layer = self.layer
        if isinstance(layer, Conv):
            u = conv2d_input(self.u_shape, layer.weight, r, layer.stride, layer.padding)
        else:
            u = (r @ layer.weight).reshape(self.u_shape)
        return self._unselect(u).reshape(self.a_shape)
