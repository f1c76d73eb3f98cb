"""The tiny array API that the algorithm is written against: one NumPy and one torch backend.

:mod:`amstream.functional` (Algorithms 2.1-2.3), :mod:`amstream.activations` and
:mod:`amstream.optim` use arithmetic operators (``@ * + - / .T``, in-place ``+= *=``), which
NumPy arrays and torch tensors share, and the functions below, which they spell
differently. Each backend is a namespace of those functions, nothing more: the algorithm
exists once, and a learner picks the backend per update (see
:meth:`amstream.learner.AMLearner.learn`).

- :data:`TORCH` runs on any device and suits large networks and minibatches: its kernels
  (MKL, cuBLAS) are the fastest, but every call costs about a microsecond of dispatch.
- :data:`NUMPY` runs on the CPU only. For the small networks of a River stream, updated on
  one sample at a time, that dispatch cost is most of an update, and NumPy's is half.

``backend_of(array)`` tells which backend an array belongs to.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["Backend", "NUMPY", "TORCH", "backend_of"]


class Backend:
    """The functions the algorithm needs beyond operators; see the two subclasses."""

    name = "base"

    # elementwise
    def relu(self, c): raise NotImplementedError
    def tanh(self, c): raise NotImplementedError
    def sigmoid(self, c): raise NotImplementedError
    def exp(self, c): raise NotImplementedError
    def sign(self, c): raise NotImplementedError
    def abs(self, c): raise NotImplementedError
    def sqrt(self, c): raise NotImplementedError
    def where(self, cond, a, b): raise NotImplementedError
    def clamp_min(self, c, low: float): raise NotImplementedError
    def as_float(self, mask, like): raise NotImplementedError

    # linear algebra
    def linear(self, a, W, b):
        """``a @ W.T + b`` (``b`` may be None)."""
        raise NotImplementedError

    def matmul_into(self, out, a, b) -> None:
        """``out[...] = a @ b`` without a temporary."""
        raise NotImplementedError

    def inv(self, M): raise NotImplementedError
    def eye(self, n: int, like): raise NotImplementedError

    # reductions, construction
    def rowsq(self, u):
        """Per-sample squared norms ``|u_i|^2`` over all but the first axis, shaped to broadcast
        against ``u`` ([B, 1] for [B, n] codes, [B, 1, 1, 1] for feature maps)."""
        raise NotImplementedError

    def colsum_into(self, out, r) -> None: raise NotImplementedError
    def append_ones(self, a):
        """``[a, 1]``: a column of ones after the last column of a [B, n]."""
        raise NotImplementedError

    def append_column(self, W, b):
        """``[W | b]`` for W [m, n], b [m]."""
        raise NotImplementedError

    def stack(self, arrays, axis: int): raise NotImplementedError
    def zeros_like(self, u): raise NotImplementedError
    def ones_like(self, u): raise NotImplementedError
    def log_softmax(self, z): raise NotImplementedError
    def softmax_xent(self, z, y, with_loss: bool = True):
        """The multinomial loss of eq. (2) per row of logits z [B, m] with class ids y [B]
        (None unless ``with_loss``), and its gradient w.r.t. z, ``softmax(z) - onehot(y)``."""
        raise NotImplementedError

    def active_columns(self, u):
        """Indices of the columns of u [B, n] with a nonzero entry."""
        raise NotImplementedError

    def mean_diag(self, A) -> float: raise NotImplementedError
    def flush_subnormal(self, u, tiny: float) -> None:
        """Set the entries of ``u`` with ``|u| < tiny`` to 0, in place."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<amstream backend {self.name}>"


class _Numpy(Backend):
    name = "numpy"

    def relu(self, c): return np.maximum(c, 0.0)
    def tanh(self, c): return np.tanh(c)
    def sigmoid(self, c): return 0.5 * np.tanh(0.5 * c) + 0.5  # no overflow for large |c|
    def exp(self, c): return np.exp(c)
    def sign(self, c): return np.sign(c)
    def abs(self, c): return np.abs(c)
    def sqrt(self, c): return np.sqrt(c)
    def where(self, cond, a, b): return np.where(cond, a, b).astype(np.result_type(a, b), copy=False)
    def clamp_min(self, c, low): return np.maximum(c, low)
    def as_float(self, mask, like): return mask.astype(like.dtype)

    def linear(self, a, W, b):
        out = a @ W.T
        if b is not None:
            out += b
        return out

    def matmul_into(self, out, a, b):
        if a.shape[1] == 1:  # an outer product (one sample): NumPy's matmul takes 5x longer
            np.multiply(a, b, out=out)
        else:
            np.matmul(a, b, out=out)
    def inv(self, M): return np.linalg.inv(M)
    def eye(self, n, like): return np.eye(n, dtype=like.dtype)

    def rowsq(self, u):
        flat = u.reshape(u.shape[0], u[:1].size if len(u) else 0)
        if flat.shape[0] == 1:  # one sample: a dot product is the cheapest call
            return (flat @ flat.T).reshape((1,) * u.ndim)
        return np.einsum("ij,ij->i", flat, flat).reshape((len(u),) + (1,) * (u.ndim - 1))

    def colsum_into(self, out, r): np.add.reduce(r, axis=0, out=out)

    def append_ones(self, a):
        out = np.empty((a.shape[0], a.shape[1] + 1), dtype=a.dtype)
        out[:, :-1] = a
        out[:, -1] = 1.0
        return out

    def append_column(self, W, b): return np.concatenate([W, b[:, None]], axis=1)
    def stack(self, arrays, axis): return np.stack(arrays, axis)
    def zeros_like(self, u): return np.zeros_like(u)
    def ones_like(self, u): return np.ones_like(u)

    def log_softmax(self, z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    # (the ufuncs' own reduce methods: ndarray.max / .sum add a Python layer per call)
    def softmax_xent(self, z, y, with_loss=True):
        z = z - np.maximum.reduce(z, axis=1, keepdims=True)
        e = np.exp(z)
        total = np.add.reduce(e, axis=1, keepdims=True)
        rows = np.arange(len(y))
        loss = None
        if with_loss:
            loss = np.log(total[:, 0])
            loss -= z[rows, y]
        e /= total
        e[rows, y] -= 1.0
        return loss, e

    def active_columns(self, u): return np.flatnonzero(u.any(0))
    def mean_diag(self, A): return float(A.diagonal().mean())

    def flush_subnormal(self, u, tiny):
        np.putmask(u, np.abs(u) < tiny, 0.0)


class _Torch(Backend):
    name = "torch"

    def relu(self, c): return torch.relu(c)
    def tanh(self, c): return torch.tanh(c)
    def sigmoid(self, c): return torch.sigmoid(c)
    def exp(self, c): return torch.exp(c)
    def sign(self, c): return torch.sign(c)
    def abs(self, c): return torch.abs(c)
    def sqrt(self, c): return torch.sqrt(c)

    def where(self, cond, a, b):
        return torch.where(cond, a, b)

    def clamp_min(self, c, low): return torch.clamp_min(c, low)
    def as_float(self, mask, like): return mask.to(like.dtype)

    def linear(self, a, W, b):
        if b is None:
            return a @ W.T
        return torch.addmm(b, a, W.T)

    def matmul_into(self, out, a, b): torch.matmul(a, b, out=out)
    def inv(self, M): return torch.linalg.inv(M)
    def eye(self, n, like): return torch.eye(n, dtype=like.dtype, device=like.device)

    def rowsq(self, u):
        dims = tuple(range(1, u.dim()))
        return torch.linalg.vector_norm(u, dim=dims, keepdim=True).square_()

    def colsum_into(self, out, r): torch.sum(r, 0, out=out)

    def append_ones(self, a):
        return torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)

    def append_column(self, W, b): return torch.cat([W, b.view(-1, 1)], dim=1)
    def stack(self, arrays, axis): return torch.stack(arrays, axis)
    def zeros_like(self, u): return torch.zeros_like(u)
    def ones_like(self, u): return torch.ones_like(u)
    def log_softmax(self, z): return torch.log_softmax(z, dim=1)
    def softmax_xent(self, z, y, with_loss=True):
        logp = torch.log_softmax(z, dim=1)
        loss = -logp.gather(1, y.view(-1, 1)).squeeze(1) if with_loss else None
        grad = logp.exp()  # (not in place: autograd may need logp, in the objectives' tests)
        grad[torch.arange(z.shape[0], device=z.device), y] -= 1.0
        return loss, grad

    def active_columns(self, u): return u.any(0).nonzero().squeeze(1)
    def mean_diag(self, A): return float(A.diagonal().mean())

    def flush_subnormal(self, u, tiny):
        u.masked_fill_(u.abs() < tiny, 0.0)


NUMPY: Backend = _Numpy()
TORCH: Backend = _Torch()


_BY_TYPE = {np.ndarray: NUMPY, torch.Tensor: TORCH}


def backend_of(array: Any) -> Backend:
    """The backend whose functions take ``array``."""
    xp = _BY_TYPE.get(type(array))
    if xp is not None:
        return xp
    if isinstance(array, torch.Tensor):  # a Parameter, a tensor subclass
        return TORCH
    if isinstance(array, np.ndarray):
        return NUMPY
    raise TypeError(f"expected a NumPy array or a torch tensor, got `{type(array).__name__}`")

