"""The AM update (Algorithm 2.1) in NumPy, in place on an AMLearner's own tensors, for small
networks on the CPU.

The engine (:mod:`amstream.functional`, :class:`amstream.learner.AMLearner`) runs one AM
update as some fifty small torch operations. For the networks of a River stream (tens of
units, often one sample per update) their fixed cost per call, about 2 ms per update on
one core, dwarfs the arithmetic. :class:`NumpyAM` runs the same update, operation for
operation, in NumPy on the learner's tensors (weights, Adam moments and step counts, AM-mem
memories), so the learner stays the one owner of the state: its ``state_dict``, checkpoints
and forward pass see every update. It covers the default configurations (one linesearch
step per code problem, one weight step, Adam for the stepped layers); :meth:`NumpyAM.attach`
returns ``None`` for anything else and the caller uses ``learner.learn``.

The readable reference is :mod:`amstream.functional`; this module follows it line for line
(tests/test_river.py checks that both give the same weights to float32 rounding). It is the
engine's own fast path: adapters get it with ``NumpyAM.attach(learner)`` and never touch the
learner's insides themselves.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from amstream.functional import _LOSS_CURVATURE  # the same bound as the torch update
from amstream.learner import Learner

__all__ = ["NumpyAM"]


def _np_relu_grad(c, a):
    return np.sign(a)  # 1{c > 0}, as the engine


def _np_leaky_grad(c, a):
    return np.sign(a) * np.float32(0.495) + np.float32(0.505)


# name -> (sigma, sigma'(c, a), whether sigma' takes only the values 0 and 1): the engine's
_NP_AM_ACTIVATIONS = {
    "relu": (lambda c: np.maximum(c, 0.0), _np_relu_grad, True),
    "leaky_relu": (lambda c: np.where(c > 0, c, np.float32(0.01) * c), _np_leaky_grad, False),
    "tanh": (np.tanh, lambda c, a: 1.0 - a * a, False),
    "sigmoid": (lambda c: 1.0 / (1.0 + np.exp(-c)), lambda c, a: a * (1.0 - a), False),
    "identity": (lambda c: c, lambda c, a: np.ones_like(c), True),
}


def _rowsq(u: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", u, u)[:, None]


class NumpyAM:
    """:meth:`amstream.learner.AMLearner.learn` (Algorithm 2.1) in NumPy, in place on the
    learner's tensors, for small CPU networks.

    Built by :meth:`attach`, which returns ``None`` for a configuration or state that it does
    not reproduce; the caller then uses ``learner.learn``. The parameters that Adam steps
    (and their two moments and step counts) are moved into three flat float32 buffers
    shared with the learner's tensors, so that one Adam step is a dozen vector operations
    whatever the number of layers.
    """

    @classmethod
    def attach(cls, learner: Learner) -> "NumpyAM | None":
        from amstream.learner import AMLearner

        c = learner.config
        if (type(learner) is not AMLearner or learner.device.type != "cpu" or not c.bias
                or c.n_hidden < 1 or any(a not in _NP_AM_ACTIVATIONS for a in c.activations)
                or c.code_iters_top != 1 or c.code_iters != 1 or c.code_solver != "linesearch"
                or c.weight_iters != 1 or c.out_optimizer != "adam" or c.lr_decay_every):
            return None
        opt = learner.opt if learner.opt is not None else learner.out_opt
        if type(opt) is not torch.optim.Adam or any(
                g["amsgrad"] or g["weight_decay"] or g["maximize"] or g["betas"] != opt.param_groups[0]["betas"]
                or g["eps"] != opt.param_groups[0]["eps"] for g in opt.param_groups):
            return None
        stepped = [p for g in opt.param_groups for p in g["params"]]
        states = [opt.state.get(p) for p in stepped]
        if not all(states):
            return None  # Adam's state appears at the engine's first step
        if any(p.dtype != torch.float32 for p in stepped) or len({float(s["step"]) for s in states}) != 1:
            return None
        self = cls()
        self.learner, self.config, self.opt = learner, c, opt
        self.n_updates = learner.n_updates
        self.acts = [_NP_AM_ACTIVATIONS[a] for a in c.activations]
        # flat buffers: parameters, first and second moments, gradients, scratch; the step
        # counts of all the parameters are one small buffer too
        sizes = [p.numel() for p in stepped]
        total = sum(sizes)
        P, M, V = (np.empty(total, dtype=np.float32) for _ in range(3))
        self.S = np.empty(len(stepped), dtype=np.float32)
        self.G, self.T = np.zeros(total, dtype=np.float32), np.empty(total, dtype=np.float32)
        self.LR = np.empty(total, dtype=np.float32)
        views = {}
        start = 0
        for i, (p, st, n) in enumerate(zip(stepped, states, sizes)):
            shape = tuple(p.shape)
            cut = slice(start, start + n)
            for buf, src in ((P, p.detach()), (M, st["exp_avg"]), (V, st["exp_avg_sq"])):
                buf[cut] = src.reshape(-1).numpy()
            self.S[i] = float(st["step"])
            p.data = torch.from_numpy(P[cut]).view(shape)
            st["exp_avg"] = torch.from_numpy(M[cut]).view(shape)
            st["exp_avg_sq"] = torch.from_numpy(V[cut]).view(shape)
            st["step"] = torch.from_numpy(self.S[i:i + 1]).view(())
            views[id(p)] = self.G[cut].reshape(shape)
            start += n
        self.P, self.M, self.V = P, M, V
        self.sentinel = (opt.state[stepped[0]], opt.state[stepped[0]]["exp_avg"])
        self.groups = [(g, sum(p.numel() for p in g["params"])) for g in opt.param_groups]
        self.lrs = self.lr = None
        self.layers = [(m.weight.detach().numpy(), m.bias.detach().numpy()) for m in learner.model.layers]
        # the gradient buffers of the stepped layers (None for AM-mem's hidden layers)
        self.grads = [(views[id(m.weight)], views[id(m.bias)]) if id(m.weight) in views else None
                      for m in learner.model.layers]
        self.memories = [(A.numpy(), B.numpy()) for A, B in learner.memories]
        return self

    def valid(self) -> bool:
        """Still in step with the learner (nothing else has updated or reloaded it)?"""
        st, m = self.sentinel
        return (self.learner.n_updates == self.n_updates and st.get("exp_avg") is m
                and self.opt.state.get(self.opt.param_groups[0]["params"][0]) is st)

    # -- pieces --------------------------------------------------------------------------
    def _loss_grad(self, out: np.ndarray, y: np.ndarray) -> np.ndarray:
        """d loss / d output, per sample (functional.output_loss_grad), in place on out."""
        if self.config.loss == "ce":
            out -= out.max(axis=1, keepdims=True)
            np.exp(out, out=out)
            out /= out.sum(axis=1, keepdims=True)
            out[np.arange(len(y)), y] -= 1.0
            return out
        out -= y.reshape(out.shape)
        return out

    def _flush_tiny(self) -> None:
        """Set to 0 the entries below 1e-30 of the Adam moments and the memories.

        Where an input stays 0 (a one-hot column never seen yet, a missing feature), its
        gradient is 0 and its moments and memories decay geometrically, down into float32's
        subnormal range (below 1.2e-38), where every arithmetic operation on them costs a
        hundred times more: the update then runs several times slower. Flushed every 64 steps,
        before they get there; values below 1e-30 change nothing else (they are 22 orders of
        magnitude below Adam's eps)."""
        for a in (self.M, self.V, *(m for pair in self.memories for m in pair)):
            np.putmask(a, np.abs(a) < 1e-30, 0.0)

    def _adam(self) -> None:
        """torch.optim.Adam's step (no weight decay, no amsgrad) on the flat buffers."""
        lrs = tuple(g["lr"] for g, _ in self.groups)
        if lrs != self.lrs:
            self.LR[:] = np.repeat(np.asarray(lrs, dtype=np.float32), [n for _, n in self.groups])
            self.lrs = lrs
            self.lr = lrs[0] if len(set(lrs)) == 1 else None  # one rate for all: a scalar
        beta1, beta2 = self.opt.param_groups[0]["betas"]
        eps = self.opt.param_groups[0]["eps"]
        S, G, M, V, T = self.S, self.G, self.M, self.V, self.T
        S += 1.0
        t = float(S[0])
        if t % 64 == 0:
            self._flush_tiny()
        np.subtract(G, M, out=T)  # exp_avg.lerp_(grad, 1 - beta1)
        T *= 1.0 - beta1
        M += T
        V *= beta2  # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
        np.multiply(G, G, out=T)
        T *= 1.0 - beta2
        V += T
        np.sqrt(V, out=T)  # denom = sqrt(v) / sqrt(1 - beta2^t) + eps
        T /= math.sqrt(1.0 - beta2 ** t)
        T += eps
        np.divide(M, T, out=T)  # param -= lr / (1 - beta1^t) * m / denom
        if self.lr is None:
            T *= self.LR
            T *= 1.0 / (1.0 - beta1 ** t)
        else:
            T *= self.lr / (1.0 - beta1 ** t)
        self.P -= T

    # -- the update ------------------------------------------------------------------------
    def learn(self, x: np.ndarray, y: np.ndarray) -> None:
        """One AM update on x [B, d] (float32), y [B] class ids or [B, 1] float32 targets."""
        c = self.config
        mu = self.learner.mu
        layers, acts = self.layers, self.acts
        n_hidden = len(layers) - 1
        B = x.shape[0]
        # encodeInput (Algorithm 2.2): codes c[l] and activations a[l]
        a_fwd, codes_fwd = [x], []
        for (W, b), (fn, _, _) in zip(layers[:-1], acts):
            code = a_fwd[-1] @ W.T
            code += b
            codes_fwd.append(code)
            a_fwd.append(fn(code))
        W_out, b_out = layers[-1]
        out = a_fwd[-1] @ W_out.T
        out += b_out
        g_out = self._loss_grad(out, y)

        # updateCodes: problem (4), one linesearch step from the forward code
        fn, dfn, binary = acts[-1]
        code = codes_fwd[-1]
        d = dfn(code, a_fwd[-1])
        grad = g_out @ W_out
        grad *= d
        gg = _rowsq(grad)
        Jg = (grad if binary else grad * d) @ W_out.T
        den = _rowsq(Jg)
        den *= _LOSS_CURVATURE[c.loss]
        den += (2.0 * mu) * gg
        np.maximum(den, 1e-30, out=den)
        alpha = np.divide(gg, den, out=gg)
        if c.code_step != 1.0:
            alpha *= c.code_step
        grad *= alpha
        codes = [None] * n_hidden
        a_new = [None] * n_hidden
        residuals = [None] * n_hidden
        codes[-1] = code - grad
        a_new[-1] = fn(codes[-1])
        # problem (5) for l = L-1, ..., 1, one linesearch step each
        for l in range(n_hidden - 2, -1, -1):
            fn, dfn, binary = acts[l]
            W_next, b_next = layers[l + 1]
            code = codes_fwd[l]
            d = dfn(code, a_fwd[l + 1])
            descent = (codes[l + 1] - codes_fwd[l + 1]) @ W_next
            descent *= d
            J = (descent if binary else descent * d) @ W_next.T
            dd = _rowsq(descent)
            den = _rowsq(J)
            den += dd
            np.maximum(den, 1e-30, out=den)
            alpha = np.divide(dd, den, out=dd)
            if c.code_step != 1.0:
                alpha *= c.code_step
            descent *= alpha
            codes[l] = code + descent
            a_new[l] = fn(codes[l])
            res = codes[l + 1] - a_new[l] @ W_next.T
            res -= b_next
            residuals[l + 1] = res
        a_in = [x] + a_new

        # updateWeights (Algorithm 2.3); the output layer's gradient at the new top activation
        out = a_in[-1] @ W_out.T
        out += b_out
        g = self._loss_grad(out, y)
        g /= B
        gw_out, gb_out = self.grads[-1]
        np.matmul(g.T, a_in[-1], out=gw_out)
        np.sum(g, axis=0, out=gb_out)
        if self.memories:  # AM-mem: output step, then memories and BCD for each hidden layer
            self._adam()
            for l, (A, Bm) in enumerate(self.memories):
                aug = np.empty((B, a_in[l].shape[1] + 1), dtype=np.float32)
                aug[:, :-1] = a_in[l]
                aug[:, -1] = 1.0
                if c.mem_decay != 1.0:
                    A *= c.mem_decay
                    Bm *= c.mem_decay
                A += aug.T @ aug
                Bm += codes[l].T @ aug
                self._bcd(l, A, Bm)
        else:  # AM-Adam: local least squares (6) of each hidden layer, one Adam step for all
            residuals[0] = codes[0] - codes_fwd[0]
            scale = -2.0 * mu / B
            for l in range(n_hidden):
                gw, gb = self.grads[l]
                np.matmul(residuals[l].T, a_in[l], out=gw)
                gw *= scale
                np.sum(residuals[l], axis=0, out=gb)
                gb *= scale
            self._adam()
        self.learner.n_updates += 1
        self.learner.n_samples += B
        self.n_updates = self.learner.n_updates

    def learn1(self, x: np.ndarray, y) -> None:
        """:meth:`learn` for a single sample (x [d] float32), the same arithmetic with vectors
        (fewer, cheaper NumPy calls: the cost of an update on one sample is all overhead)."""
        c = self.config
        mu = self.learner.mu
        layers, acts = self.layers, self.acts
        n_hidden = len(layers) - 1
        ce = c.loss == "ce"
        a_fwd, codes_fwd = [x], []
        for (W, b), (fn, _, _) in zip(layers[:-1], acts):
            code = W @ a_fwd[-1]
            code += b
            codes_fwd.append(code)
            a_fwd.append(fn(code))
        W_out, b_out = layers[-1]
        out = W_out @ a_fwd[-1]
        out += b_out
        g_out = self._loss_grad1(out, y, ce)
        # updateCodes: problem (4), then (5) for l = L-1, ..., 1; one linesearch step each
        fn, dfn, binary = acts[-1]
        code = codes_fwd[-1]
        d = dfn(code, a_fwd[-1])
        grad = g_out @ W_out
        grad *= d
        Jg = W_out @ (grad if binary else grad * d)
        gg = float(grad @ grad)
        den = _LOSS_CURVATURE[c.loss] * float(Jg @ Jg) + 2.0 * mu * gg
        grad *= -(gg / max(den, 1e-30) * c.code_step)  # the step -alpha g
        codes = [None] * n_hidden
        a_new = [None] * n_hidden
        residuals = [None] * n_hidden
        codes[-1] = grad + code
        a_new[-1] = fn(codes[-1])
        step = grad  # c[L] - c_fwd[L]
        for l in range(n_hidden - 2, -1, -1):
            fn, dfn, binary = acts[l]
            W_next, b_next = layers[l + 1]
            code = codes_fwd[l]
            d = dfn(code, a_fwd[l + 1])
            descent = step @ W_next
            descent *= d
            J = W_next @ (descent if binary else descent * d)
            dd = float(descent @ descent)
            descent *= dd / max(float(J @ J) + dd, 1e-30) * c.code_step
            codes[l] = code + descent
            a_new[l] = fn(codes[l])
            res = codes[l + 1] - W_next @ a_new[l]
            res -= b_next
            residuals[l + 1] = res
            step = descent
        a_in = [x] + a_new
        # updateWeights
        out = W_out @ a_in[-1]
        out += b_out
        g = self._loss_grad1(out, y, ce)
        gw_out, gb_out = self.grads[-1]
        np.multiply(g[:, None], a_in[-1], out=gw_out)
        gb_out[...] = g
        if self.memories:
            self._adam()
            for l, (A, Bm) in enumerate(self.memories):
                aug = np.empty(a_in[l].shape[0] + 1, dtype=np.float32)
                aug[:-1] = a_in[l]
                aug[-1] = 1.0
                if c.mem_decay != 1.0:
                    A *= c.mem_decay
                    Bm *= c.mem_decay
                A += aug[:, None] * aug
                Bm += codes[l][:, None] * aug
                self._bcd(l, A, Bm)
        else:
            residuals[0] = step if n_hidden == 1 else codes[0] - codes_fwd[0]
            scale = -2.0 * mu
            for l in range(n_hidden):
                gw, gb = self.grads[l]
                np.multiply(residuals[l], scale, out=gb)
                np.multiply(gb[:, None], a_in[l], out=gw)
            self._adam()
        self.learner.n_updates += 1
        self.learner.n_samples += 1
        self.n_updates = self.learner.n_updates

    @staticmethod
    def _loss_grad1(out: np.ndarray, y, ce: bool) -> np.ndarray:
        if ce:
            out -= out.max()
            np.exp(out, out=out)
            out /= out.sum()
            out[y] -= 1.0
            return out
        out -= y
        return out

    def _bcd(self, l: int, A: np.ndarray, Bm: np.ndarray) -> None:
        """functional.bcd on [W | b] of hidden layer l, written back in place."""
        c = self.config
        W_l, b_l = self.layers[l]
        W = np.concatenate([W_l, b_l[:, None]], axis=1)
        n, block = A.shape[0], c.mem_block
        eps = np.float32(c.mem_ridge * float(A.diagonal().mean()) + 1e-12)
        starts = range(0, n, block)
        inverses = []
        for s in starts:
            A_JJ = A[s:s + block, s:s + block].copy()
            A_JJ.flat[::len(A_JJ) + 1] += eps
            inverses.append(np.linalg.inv(A_JJ))
        for _ in range(c.mem_sweeps):
            for s, inv in zip(starts, inverses):
                J = slice(s, s + block)
                W[:, J] += (Bm[:, J] - W @ A[:, J]) @ inv
        W_l[...] = W[:, :-1]
        b_l[...] = W[:, -1]
