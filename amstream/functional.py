"""The algorithm of Choromanska et al. (ICML 2019), Algorithms 2.1-2.3, as pure functions.

Read this file next to Section 2 of the paper. Notation (one minibatch of B samples):

- ``W[l], b[l]`` for l = 1..L+1 are the linear maps; layer l computes
  ``c[l] = a[l-1] @ W[l].T + b[l]`` and ``a[l] = sigma_l(c[l])`` with ``a[0] = x``.
- ``c[1..L]`` are the *codes* (hidden pre-activations), the auxiliary variables of eq. (3).
  The output pre-activation (logits) is not a code.

Algorithm 2.1 (one online AM step) is :func:`am_step`:

1. ``encode_input``   (Algorithm 2.2, forward)  codes from the current weights;
2. ``update_codes``   (Algorithm 2.2, backward) top code by problem (4), then hidden codes by
   problem (5) from l = L-1 down to 1;
3. ``update_weights`` (Algorithm 2.3)           output layer by one SGD/Adam step on the loss;
   each hidden layer independently: AM-Adam takes Adam steps on the local least squares
   loss (6) with t' = t, AM-mem updates the co-activation memories A, B (``update_memory``)
   and minimizes the surrogate (7) by block-coordinate descent (``bcd``).

All gradients are derived by hand (no autograd graph), and every code problem is
separable over samples, so the code solvers work on the whole minibatch at once.

Code solver. Problems (4) and (5) are, per sample, a smooth loss of ``sigma(c)`` plus
``mu * ||c - c_fwd||^2``. The default solver (``linesearch``) is steepest descent where
each sample takes the step that exactly minimizes the problem's Gauss-Newton model along
the gradient (linearizing sigma around the current code). It is scale free — no step
size to tune, whatever mu, the batch size or the layer widths — and each step lowers the
model objective; it costs one extra matrix product per step. The ``momentum`` solver is
the authors' choice (gradient steps with Nesterov momentum and a fixed rate), kept for
comparison (``benchmarks/code_solvers.py`` measures both).

Non-differentiable ``sign``: the forward pass and the weight fits use the true sign; inside
the code problems its derivative is replaced by the straight-through ``1{|c| <= 1}``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "Layer",
    "Encoding",
    "encode_input",
    "output_loss_grad",
    "top_code_objective",
    "hidden_code_objective",
    "solve_top_code",
    "solve_hidden_code",
    "update_codes",
    "local_lsq_grad",
    "lsq_residual",
    "output_grad",
    "update_memory",
    "bcd",
    "mem_objective",
]


# ---------------------------------------------------------------------------------------
# Activations: sigma and its derivative sigma'(c) (given c and a = sigma(c))
# ---------------------------------------------------------------------------------------
class Activation(NamedTuple):
    fn: Callable[[Tensor], Tensor]
    grad: Callable[[Tensor, Tensor], Tensor]  # (c, a) -> sigma'(c)
    binary_grad: bool = False  # sigma'(c) only takes the values 0 and 1
    piecewise_linear: bool = False  # sigma(c + dc) = sigma(c) + sigma'(c) dc unless c crosses 0


def _relu_grad(c: Tensor, a: Tensor) -> Tensor:
    return torch.sign(a)  # a = relu(c) >= 0, so sign(a) = 1{c > 0}; cheaper than a comparison


def _leaky_grad(c: Tensor, a: Tensor) -> Tensor:
    return torch.sign(a).mul_(0.495).add_(0.505)  # 1 where c > 0, 0.01 elsewhere (0.505 at c = 0)


def _sign(c: Tensor) -> Tensor:
    # sign with sign(0) = +1, so a unit is always on or off
    return torch.where(c >= 0, 1.0, -1.0).to(c.dtype)


ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation(torch.relu, _relu_grad, True, True),
    "leaky_relu": Activation(lambda c: torch.nn.functional.leaky_relu(c, 0.01), _leaky_grad, False, True),
    "tanh": Activation(torch.tanh, lambda c, a: 1.0 - a * a),
    "sigmoid": Activation(torch.sigmoid, lambda c, a: a * (1.0 - a)),
    "identity": Activation(lambda c: c, lambda c, a: torch.ones_like(c), True, True),
    # straight-through derivative, used only inside the code subproblems
    "sign": Activation(_sign, lambda c, a: (c.abs() <= 1.0).to(c.dtype), True),
}


class Layer(NamedTuple):
    """One linear map ``c = a @ weight.T + bias`` (bias may be None)."""

    weight: Tensor
    bias: Tensor | None


def _linear(a: Tensor, layer: Layer) -> Tensor:
    if layer.bias is None:
        return a @ layer.weight.T
    return torch.addmm(layer.bias, a, layer.weight.T)


# ---------------------------------------------------------------------------------------
# Algorithm 2.2, encodeInput: the forward pass
# ---------------------------------------------------------------------------------------
class Encoding(NamedTuple):
    codes: list[Tensor]  # c[1..L]
    acts: list[Tensor]  # a[0..L], a[0] = x
    out: Tensor  # output pre-activation (logits for ce)


def encode_input(x: Tensor, layers: Sequence[Layer], activations: Sequence[str]) -> Encoding:
    """c[l] = W[l] sigma_{l-1}(c[l-1]) for l = 1..L, and the network output."""
    acts = [x]
    codes = []
    for layer, name in zip(layers[:-1], activations):
        c = _linear(acts[-1], layer)
        codes.append(c)
        acts.append(ACTIVATIONS[name].fn(c))
    return Encoding(codes, acts, _linear(acts[-1], layers[-1]))


# ---------------------------------------------------------------------------------------
# The loss of eq. (2) (or squared loss) and its gradient w.r.t. the output
# ---------------------------------------------------------------------------------------
def output_loss_grad(out: Tensor, y: Tensor, loss: str) -> tuple[Tensor, Tensor]:
    """Per-sample loss [B] and its gradient w.r.t. the output pre-activation [B, m].

    ``ce``: multinomial loss, y holds class indices; ``mse``: 0.5 ||out - y||^2.
    """
    if loss == "ce":
        logp = torch.log_softmax(out, dim=1)
        per_sample = -logp.gather(1, y.view(-1, 1)).squeeze(1)
        grad = logp.exp_()
        grad[torch.arange(out.shape[0], device=out.device), y] -= 1.0
        return per_sample, grad
    diff = out - y.view(out.shape)
    return 0.5 * (diff * diff).sum(1), diff


# curvature bound of the loss w.r.t. the output: softmax Hessian <= 1/2, squared loss = 1
_LOSS_CURVATURE = {"ce": 0.5, "mse": 1.0}


# ---------------------------------------------------------------------------------------
# Algorithm 2.2, updateCodes: problems (4) and (5)
# ---------------------------------------------------------------------------------------
def top_code_objective(c, c_fwd, y, out_layer: Layer, act: str, mu: float, loss: str) -> Tensor:
    """Problem (4), summed over the minibatch: L(y, sigma(c), W[L+1]) + mu ||c - c_fwd||^2."""
    out = _linear(ACTIVATIONS[act].fn(c), out_layer)
    if loss == "ce":
        value = torch.nn.functional.cross_entropy(out, y, reduction="sum")
    else:
        value = 0.5 * (out - y.view(out.shape)).pow(2).sum()
    return value + mu * (c - c_fwd).pow(2).sum()


def hidden_code_objective(c, c_fwd, c_next, next_layer: Layer, act: str, mu: float) -> Tensor:
    """Problem (5), summed: mu ||c[l+1] - W[l+1] sigma(c)||^2 + mu ||c - c_fwd||^2."""
    r = c_next - _linear(ACTIVATIONS[act].fn(c), next_layer)
    return mu * (r.pow(2).sum() + (c - c_fwd).pow(2).sum())


def _rowsq(u: Tensor) -> Tensor:
    """Per-sample squared norms |u_i|^2 as a column [B, 1]."""
    return torch.linalg.vector_norm(u, dim=1, keepdim=True).square_()


def solve_top_code(
    c_fwd: Tensor, y: Tensor, out_layer: Layer, act: str, mu: float, loss: str,
    *, iters: int, solver: str = "linesearch", step: float = 1.0, a_fwd: Tensor | None = None,
    g_out_fwd: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Problem (4): c[L] = argmin_c L(y, sigma_L(c), W[L+1]) + mu ||c - W[L] a[L-1]||^2.

    Per sample, the gradient is ``g = sigma'(c) * (dL/dout @ W[L+1]) + 2 mu (c - c_fwd)``.
    ``linesearch`` steps along -g by the minimizer of the Gauss-Newton model of the
    objective, ``alpha = |g|^2 / (k |W (sigma' g)|^2 + 2 mu |g|^2)``, where k bounds the loss
    curvature (1/2 for the softmax, 1 for squared loss): one matrix product with the
    small output matrix per step, and a descent step whatever mu, the widths or the scale.
    ``a_fwd = sigma(c_fwd)`` and ``g_out_fwd`` (the loss gradient at the forward output)
    may be passed when the caller has them. Returns the new code and its activation.
    """
    sigma = ACTIVATIONS[act]
    c = c_fwd
    a = sigma.fn(c) if a_fwd is None else a_fwd
    if iters == 0:
        return c.clone(), a
    kappa = _LOSS_CURVATURE[loss]
    velocity = torch.zeros_like(c) if solver == "momentum" else None
    for it in range(iters):
        d = sigma.grad(c, a)
        if it == 0 and g_out_fwd is not None:
            g_out = g_out_fwd
        else:
            _, g_out = output_loss_grad(_linear(a, out_layer), y, loss)
        grad = (g_out @ out_layer.weight).mul_(d)
        if it > 0:  # at c = c_fwd the penalty's gradient is 0
            grad.add_(c - c_fwd, alpha=2.0 * mu)
        if velocity is None:
            gg = _rowsq(grad)
            # sigma' * g; at it = 0 with a 0/1 derivative it is g itself
            d_grad = grad if (it == 0 and sigma.binary_grad) else grad * d
            Jg = d_grad @ out_layer.weight.T  # first-order change of the output along g
            alpha = gg.div_((kappa * _rowsq(Jg)).add_(gg, alpha=2.0 * mu).clamp_min_(1e-30)).mul_(step)
            c = torch.addcmul(c, grad, alpha, value=-1.0)
        else:
            c = _momentum_step(c, grad, velocity, step)
        a = sigma.fn(c)
    return c, a


def solve_hidden_code(
    c_fwd: Tensor, c_next: Tensor, c_next_fwd: Tensor, next_layer: Layer, act: str, mu: float,
    *, iters: int, solver: str = "linesearch", step: float = 1.0, a_fwd: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Problem (5): c[l] = argmin_c mu ||c[l+1] - W[l+1] sigma_l(c)||^2 + mu ||c - W[l] a[l-1]||^2.

    Per sample, the gradient divided by 2 mu (mu cancels, as the paper notes) is
    ``g = (c - c_fwd) - sigma'(c) * (r @ W[l+1])`` with the residual
    ``r = c[l+1] - W[l+1] sigma(c) - b[l+1]``. ``linesearch`` steps along -g by the exact
    minimizer of the problem linearized in sigma, ``alpha = |g|^2 / (|W (sigma' g)|^2 + |g|^2)``
    (one extra product per step). ``c_next`` is the already updated code above and
    ``c_next_fwd = W[l+1] sigma(c_fwd) + b`` its forward value, so the first residual costs
    no matrix product.

    Returns the new code, its activation, and the residual at the new code, which is
    exactly what the weight update of layer l+1 needs (AM-Adam): computed once, here.
    """
    sigma = ACTIVATIONS[act]
    c = c_fwd
    a = sigma.fn(c) if a_fwd is None else a_fwd
    residual = c_next - c_next_fwd
    if iters == 0:
        return c.clone(), a, residual
    velocity = torch.zeros_like(c) if solver == "momentum" else None
    W = next_layer.weight
    for it in range(iters):
        d = sigma.grad(c, a)
        descent = (residual @ W).mul_(d)  # minus the gradient
        if it > 0:  # at c = c_fwd the penalty's gradient is 0
            descent.sub_(c - c_fwd)
        if velocity is not None:
            c = _momentum_step(c, descent.neg_(), velocity, step)
            a = sigma.fn(c)
            residual = lsq_residual(c_next, a, next_layer)
            continue
        # sigma' * descent; at it = 0 with a 0/1 derivative it is descent itself
        d_desc = descent if (it == 0 and sigma.binary_grad) else descent * d
        J_desc = d_desc @ W.T  # first-order change of W sigma(c) along the descent direction
        dd = _rowsq(descent)
        alpha = dd.div_((_rowsq(J_desc) + dd).clamp_min_(1e-30)).mul_(step)
        c_new = torch.addcmul(c, descent, alpha)
        a_new = sigma.fn(c_new)
        if sigma.piecewise_linear:
            # W sigma(c_new) = W a + alpha J_desc + W corr, where corr is nonzero only on the
            # few units whose code crossed 0: the exact new residual for the price of a
            # product over those columns instead of a full matrix product
            corr = (a_new - a).addcmul_(d_desc, alpha, value=-1.0)
            crossed = corr.any(0).nonzero().squeeze(1)
            if 4 * crossed.numel() < W.shape[1]:
                residual = residual.addcmul(J_desc, alpha, value=-1.0)
                if crossed.numel():
                    residual.sub_(corr[:, crossed] @ W[:, crossed].T)
            else:  # many units crossed: the full product is cheaper
                residual = lsq_residual(c_next, a_new, next_layer)
        else:
            residual = lsq_residual(c_next, a_new, next_layer)
        c, a = c_new, a_new
    return c, a, residual


def _momentum_step(c: Tensor, grad: Tensor, velocity: Tensor, lr: float) -> Tensor:
    """Nesterov momentum 0.9 (as torch.optim.SGD(nesterov=True)): the authors' code solver."""
    velocity.mul_(0.9).add_(grad)
    return c - lr * (grad + 0.9 * velocity)


def update_codes(
    enc: Encoding, y: Tensor, layers: Sequence[Layer], activations: Sequence[str], mu: float,
    loss: str, *, iters_top: int, iters: int, solver: str = "linesearch", step: float = 1.0,
    g_out_fwd: Tensor | None = None,
) -> tuple[list[Tensor], list[Tensor], list[Tensor | None]]:
    """Algorithm 2.2, updateCodes: solve (4) for c[L], then (5) for l = L-1, ..., 1.

    Returns the new codes c[1..L], their activations, and for each hidden layer
    l = 1..L the residual ``c[l] - W[l] sigma(c[l-1]) - b[l]`` at the new codes where a code
    solver already computed it (``None`` for layer 1: the caller has it for free).
    """
    L = len(enc.codes)
    codes: list[Tensor] = [None] * L  # type: ignore[list-item]
    acts: list[Tensor] = [None] * L  # type: ignore[list-item]
    residuals: list[Tensor | None] = [None] * L
    codes[L - 1], acts[L - 1] = solve_top_code(
        enc.codes[L - 1], y, layers[L], activations[L - 1], mu, loss,
        iters=iters_top, solver=solver, step=step, a_fwd=enc.acts[L], g_out_fwd=g_out_fwd)
    for l in range(L - 2, -1, -1):
        codes[l], acts[l], residuals[l + 1] = solve_hidden_code(
            enc.codes[l], codes[l + 1], enc.codes[l + 1], layers[l + 1], activations[l], mu,
            iters=iters, solver=solver, step=step, a_fwd=enc.acts[l + 1])
    return codes, acts, residuals


# ---------------------------------------------------------------------------------------
# Algorithm 2.3, updateWeights: layer-local gradients (AM-Adam) and memories (AM-mem)
# ---------------------------------------------------------------------------------------
def output_grad(a_top: Tensor, y: Tensor, out_layer: Layer, loss: str) -> tuple[Tensor, Tensor | None, Tensor]:
    """Gradient of the mean loss w.r.t. W[L+1], b[L+1], with input sigma(c[L]) (line 1).

    Returns (grad_weight, grad_bias, per-sample loss).
    """
    per_sample, g = output_loss_grad(_linear(a_top, out_layer), y, loss)
    g.div_(a_top.shape[0])
    return g.T @ a_top, (g.sum(0) if out_layer.bias is not None else None), per_sample


def lsq_residual(c: Tensor, a_in: Tensor, layer: Layer) -> Tensor:
    """c - W a - b: the residual of eq. (6) for one layer."""
    r = torch.addmm(c, a_in, layer.weight.T, alpha=-1.0)
    return r.sub_(layer.bias) if layer.bias is not None else r


def local_lsq_grad(a_in: Tensor, residual: Tensor, mu: float, has_bias: bool) -> tuple[Tensor, Tensor | None]:
    """Gradient of eq. (6) with t' = t, mean over the minibatch: mu/B sum ||c - W a - b||^2.

    ``residual`` is ``c - W a - b`` at the new codes; the gradient is -2 mu/B r^T a.
    """
    scale = -2.0 * mu / a_in.shape[0]
    g_w = torch.addmm(a_in.new_empty(()), residual.T, a_in, beta=0.0, alpha=scale)
    return g_w, (residual.sum(0).mul_(scale) if has_bias else None)


def augment(a: Tensor, has_bias: bool) -> Tensor:
    """[a, 1]: the bias becomes the last column of the weight matrix (AM-mem)."""
    if not has_bias:
        return a
    return torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], dim=1)


def update_memory(A: Tensor, B: Tensor, a_in: Tensor, c: Tensor, decay: float = 1.0) -> None:
    """updateMemory (Algorithm 2.3), in place: A <- decay A + sum a a^T, B <- decay B + sum c a^T.

    With decay = 1 these are the plain sums A_t, B_t of eq. (7); decay < 1 is a
    forgetting factor (Mairal et al., 2009, Sec. 3.4).
    """
    if decay != 1.0:
        A.mul_(decay)
        B.mul_(decay)
    A.addmm_(a_in.T, a_in)
    B.addmm_(c.T, a_in)


def mem_objective(W: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """The surrogate of eq. (7): Tr(W^T W A) - 2 Tr(W^T B)."""
    return ((W @ A) * W).sum() - 2.0 * (W * B).sum()


def bcd(W: Tensor, A: Tensor, B: Tensor, *, sweeps: int = 1, block: int = 64, ridge: float = 1e-4) -> None:
    """Minimize Tr(W^T W A) - 2 Tr(W^T B) over W, in place, by block-coordinate descent.

    Each block J of columns is set to its exact minimizer given the others,
    ``W[:, J] <- W[:, J] + (B[:, J] - W A[:, J]) (A[J, J] + eps I)^-1`` (Mairal et al., 2009,
    Algorithm 2, with blocks instead of single columns; ``block=1`` is their update).
    eps = ridge * mean(diag A) keeps never-active inputs (A[j, j] = 0) from dividing by 0.
    """
    n = A.shape[0]
    eps = ridge * float(A.diagonal().mean()) + 1e-12
    starts = range(0, n, block)
    # factor each diagonal block once per call (A does not change during the sweeps)
    inverses = []
    for s in starts:
        A_JJ = A[s:s + block, s:s + block]
        eye = torch.eye(A_JJ.shape[0], dtype=A.dtype, device=A.device)
        inverses.append(torch.linalg.inv(A_JJ + eps * eye))
    for _ in range(sweeps):
        for s, inv in zip(starts, inverses):
            J = slice(s, s + block)
            resid = B[:, J] - W @ A[:, J]
            W[:, J] += resid @ inv
