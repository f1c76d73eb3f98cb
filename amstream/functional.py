"""The algorithm of Choromanska et al. (ICML 2019), Algorithms 2.1-2.3, as pure functions.

Read this file next to Section 2 of the paper. Notation (one minibatch of B samples):

- ``W[l], b[l]`` for l = 1..L+1 are the linear maps; layer l computes
  ``c[l] = W[l] a[l-1] + b[l]`` and ``a[l] = sigma_l(c[l])`` with ``a[0] = x``.
- ``c[1..L]`` are the *codes* (hidden pre-activations), the auxiliary variables of eq. (3).
  The output pre-activation (logits) is not a code.
- A layer may be dense or a convolution, with max-pooling or flattening of its input
  (:mod:`amstream.layers`: the code problems use its linearization and adjoint); an Elman
  RNN is the same chain unrolled in time, each step a layer with shared weights
  (:class:`Elman`).

Algorithm 2.1 (one online AM step) is :func:`am_step`:

1. :func:`encode_input`   (Algorithm 2.2, forward)  codes from the current weights;
2. :func:`update_codes`   (Algorithm 2.2, backward) top code by problem (4), then hidden codes
   by problem (5) from l = L-1 down to 1;
3. :func:`update_weights` (Algorithm 2.3)           output layer by one SGD/Adam step on the
   loss; each hidden layer independently: AM-Adam takes Adam steps on the local least
   squares loss (6) with t' = t, AM-mem updates the co-activation memories A, B
   (:func:`update_memory`) and minimizes the surrogate (7) (:func:`fit_memory`).

Every function takes NumPy arrays or torch tensors (all of one kind) and works on what it
is given: the code is written once against the small array API of :mod:`amstream.backend`.
All gradients are derived by hand (no autograd graph), and every code problem is separable
over samples, so the code solvers work on the whole minibatch at once.

Code solver. Problems (4) and (5) are, per sample, a smooth loss of ``sigma(c)`` plus
``mu * ||c - c_fwd||^2``. The default solver (``linesearch``) is steepest descent where each
sample takes the step that exactly minimizes the problem's Gauss-Newton model along the
gradient (linearizing sigma around the current code). It is scale free - no step size to
tune, whatever mu, the batch size or the layer widths - and each step lowers the model
objective; it costs one extra matrix product per step. The ``momentum`` solver is the
authors' choice (gradient steps with Nesterov momentum and a fixed rate), kept for
comparison (``benchmarks/code_solvers.py`` measures both).

Non-differentiable ``sign``: the forward pass and the weight fits use the true sign; inside
the code problems its derivative is replaced by the straight-through ``1{|c| <= 1}``
(:mod:`amstream.activations`).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

from amstream import optim
from amstream.activations import ACTIVATIONS
from amstream.backend import Backend, backend_of
from amstream.layers import Conv, Dense

__all__ = [
    "Layer",
    "Dense",
    "Conv",
    "Stack",
    "Elman",
    "Unrolled",
    "Encoding",
    "Slots",
    "AMHyper",
    "am_step",
    "encode_input",
    "output_loss_grad",
    "top_code_objective",
    "hidden_code_objective",
    "solve_top_code",
    "solve_hidden_code",
    "update_codes",
    "update_weights",
    "output_grad",
    "lsq_residual",
    "local_lsq_grad",
    "augment",
    "update_memory",
    "mem_objective",
    "blocks",
    "factor_blocks",
    "update_factors",
    "memory_refactor_due",
    "bcd",
    "fit_memory",
    "LOSS_CURVATURE",
]

Array = Any  # a NumPy array or a torch tensor
Reduce = Callable[[str, Sequence[Array]], None]  # (what, arrays) -> None, in place


Layer = Dense  # a plain dense layer, Layer(weight, bias)


# ---------------------------------------------------------------------------------------
# Algorithm 2.2, encodeInput: the forward pass
# ---------------------------------------------------------------------------------------
class Encoding(NamedTuple):
    codes: list  # c[1..L]
    acts: list  # a[0..L], a[0] = x
    out: Array  # output pre-activation (logits for ce)


def encode_input(x: Array, layers: Sequence[Layer], activations: Sequence[str]) -> Encoding:
    """c[l] = W[l] sigma_{l-1}(c[l-1]) for l = 1..L, and the network output."""
    xp = backend_of(x)
    acts = [x]
    codes = []
    for layer, name in zip(layers[:-1], activations):
        c = layer.forward(acts[-1])
        codes.append(c)
        acts.append(ACTIVATIONS[name].fn(xp, c))
    return Encoding(codes, acts, layers[-1].forward(acts[-1]))


# ---------------------------------------------------------------------------------------
# The loss of eq. (2) (or squared loss) and its gradient w.r.t. the output
# ---------------------------------------------------------------------------------------
#: curvature bound of the loss w.r.t. the output: softmax Hessian <= 1/2, squared loss = 1
LOSS_CURVATURE = {"ce": 0.5, "mse": 1.0}


def output_loss_grad(out: Array, y: Array, loss: str, *, with_loss: bool = True) -> tuple[Array, Array]:
    """Per-sample loss [B] (None unless ``with_loss``) and its gradient w.r.t. the output
    pre-activation [B, m].

    ``ce``: multinomial loss, y holds class indices; ``mse``: 0.5 ||out - y||^2.
    """
    if loss == "ce":
        return backend_of(out).softmax_xent(out, y, with_loss)
    diff = out - y.reshape(out.shape)
    return (0.5 * (diff * diff).sum(1) if with_loss else None), diff


# ---------------------------------------------------------------------------------------
# Algorithm 2.2, updateCodes: problems (4) and (5)
# ---------------------------------------------------------------------------------------
def top_code_objective(c, c_fwd, y, out_layer: Layer, act: str, mu: float, loss: str):
    """Problem (4), summed over the minibatch: L(y, sigma(c), W[L+1]) + mu ||c - c_fwd||^2."""
    out = out_layer.forward(ACTIVATIONS[act].fn(backend_of(c), c))
    d = c - c_fwd
    return output_loss_grad(out, y, loss)[0].sum() + mu * (d * d).sum()


def hidden_code_objective(c, c_fwd, c_next, next_layer: Layer, act: str, mu: float):
    """Problem (5), summed: mu ||c[l+1] - W[l+1] sigma(c)||^2 + mu ||c - c_fwd||^2."""
    r = c_next - next_layer.forward(ACTIVATIONS[act].fn(backend_of(c), c))
    d = c - c_fwd
    return mu * ((r * r).sum() + (d * d).sum())


def solve_top_code(
    c_fwd, y, out_layer: Layer, act: str, mu: float, loss: str, *, iters: int,
    solver: str = "linesearch", step: float = 1.0, a_fwd=None, g_out_fwd=None,
) -> tuple[Array, Array]:
    """Problem (4): c[L] = argmin_c L(y, sigma_L(c), W[L+1]) + mu ||c - W[L] a[L-1]||^2.

    Per sample, the gradient is ``g = sigma'(c) * (dL/dout @ W[L+1]) + 2 mu (c - c_fwd)``.
    ``linesearch`` steps along -g by the minimizer of the Gauss-Newton model of the
    objective, ``alpha = |g|^2 / (k |W (sigma' g)|^2 + 2 mu |g|^2)``, where k bounds the loss
    curvature (1/2 for the softmax, 1 for squared loss): one matrix product with the
    small output matrix per step, and a descent step whatever mu, the widths or the scale.
    ``a_fwd = sigma(c_fwd)`` and ``g_out_fwd`` (the loss gradient at the forward output)
    may be passed when the caller has them. Returns the new code and its activation.
    """
    xp = backend_of(c_fwd)
    sigma = ACTIVATIONS[act]
    c = c_fwd
    a = sigma.fn(xp, c) if a_fwd is None else a_fwd
    if iters == 0:
        return c + 0.0, a
    kappa = LOSS_CURVATURE[loss]
    velocity = xp.zeros_like(c) if solver == "momentum" else None
    for it in range(iters):
        d = sigma.grad(xp, c, a)
        W = out_layer.at(a)  # the output layer linearized in its input at a
        if it == 0 and g_out_fwd is not None:
            g_out = g_out_fwd
        else:
            g_out = output_loss_grad(out_layer.forward(a), y, loss, with_loss=False)[1]
        grad = W.adjoint(g_out)
        grad *= d
        if it > 0:  # at c = c_fwd the penalty's gradient is 0
            grad += (2.0 * mu) * (c - c_fwd)
        if velocity is None:
            gg = xp.rowsq(grad)
            # sigma' * g; at it = 0 with a 0/1 derivative it is g itself
            d_grad = grad if (it == 0 and sigma.binary_grad) else grad * d
            Jg = W.apply(d_grad)  # first-order change of the output along g
            den = xp.rowsq(Jg).reshape(gg.shape)  # (the output may have another shape than c)
            den *= kappa
            den += (2.0 * mu) * gg
            alpha = gg / xp.clamp_min(den, 1e-30)
            if step != 1.0:
                alpha *= step
            grad *= alpha
            c = c - grad
        else:
            c = _momentum_step(c, grad, velocity, step)
        a = sigma.fn(xp, c)
    return c, a


def solve_hidden_code(
    c_fwd, c_next, c_next_fwd, next_layer: Layer, act: str, mu: float, *, iters: int,
    solver: str = "linesearch", step: float = 1.0, a_fwd=None,
) -> tuple[Array, Array, Array]:
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

    One step moves each sample's code by at most half the norm of the residual above
    (``|alpha g| = |g|^3 / (|J g|^2 + |g|^2) <= |r| / 2`` with ``g = J^T r``), whatever the
    weights: down a long chain, an unrolled RNN, a move shrinks at least as ``2^-k`` over k
    layers, where backprop's gradient keeps its size along directions with singular value 1
    (``benchmarks/rnn_credit.py`` measures it).
    """
    xp = backend_of(c_fwd)
    sigma = ACTIVATIONS[act]
    c = c_fwd
    a = sigma.fn(xp, c) if a_fwd is None else a_fwd
    residual = c_next - c_next_fwd
    if iters == 0:
        return c + 0.0, a, residual
    velocity = xp.zeros_like(c) if solver == "momentum" else None
    for it in range(iters):
        d = sigma.grad(xp, c, a)
        W = next_layer.at(a)  # the layer above linearized in its input at a
        descent = W.adjoint(residual)  # minus the gradient
        descent *= d
        if it > 0:  # at c = c_fwd the penalty's gradient is 0
            descent -= c - c_fwd
        if velocity is not None:
            c = _momentum_step(c, -descent, velocity, step)
            a = sigma.fn(xp, c)
            residual = lsq_residual(c_next, a, next_layer)
            continue
        # sigma' * descent; at it = 0 with a 0/1 derivative it is descent itself
        d_desc = descent if (it == 0 and sigma.binary_grad) else descent * d
        J_desc = W.apply(d_desc)  # first-order change of W sigma(c) along the descent direction
        dd = xp.rowsq(descent)
        den = xp.rowsq(J_desc).reshape(dd.shape)
        den += dd
        alpha = dd / xp.clamp_min(den, 1e-30)
        if step != 1.0:
            alpha *= step
        descent *= alpha
        c_new = c + descent
        a_new = sigma.fn(xp, c_new)
        residual = _residual_after_step(xp, sigma.piecewise_linear, c_next, residual, a, a_new,
                                        d_desc, J_desc, alpha, next_layer)
        c, a = c_new, a_new
    return c, a, residual


def _residual_after_step(xp: Backend, piecewise_linear, c_next, residual, a, a_new, d_desc, J_desc,
                         alpha, layer: Layer):
    """The residual c[l+1] - W sigma(c_new) - b after a linesearch step c_new = c + alpha g.

    For a piecewise-linear sigma, ``W sigma(c_new) = W a + alpha J_desc + W corr``, where corr
    is nonzero only on the units whose code crossed 0: the exact new residual for the price
    of a product over those few columns instead of a full matrix product.
    """
    W = layer.weight
    if piecewise_linear and a.shape[0] > 1 and layer.plain and layer.bias is not None and layer.bias.ndim == 1:
        corr = a_new - a
        corr -= d_desc * alpha
        crossed = xp.active_columns(corr)
        if 4 * len(crossed) < W.shape[1]:
            residual = residual - J_desc * alpha
            if len(crossed):
                residual -= corr[:, crossed] @ W[:, crossed].T
            return residual
    return lsq_residual(c_next, a_new, layer)


def _momentum_step(c, grad, velocity, lr: float):
    """Nesterov momentum 0.9 (as torch.optim.SGD(nesterov=True)): the authors' code solver."""
    velocity *= 0.9
    velocity += grad
    return c - lr * (grad + 0.9 * velocity)


def update_codes(
    enc: Encoding, y, layers: Sequence[Layer], activations: Sequence[str], mu: float, loss: str,
    *, iters_top: int, iters: int, solver: str = "linesearch", step: float = 1.0, g_out_fwd=None,
) -> tuple[list, list, list]:
    """Algorithm 2.2, updateCodes: solve (4) for c[L], then (5) for l = L-1, ..., 1.

    Returns the new codes c[1..L], their activations, and for each hidden layer
    l = 1..L the residual ``c[l] - W[l] sigma(c[l-1]) - b[l]`` at the new codes where a code
    solver already computed it (``None`` for layer 1: the caller has it for free).
    """
    L = len(enc.codes)
    codes: list = [None] * L
    acts: list = [None] * L
    residuals: list = [None] * L
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
def output_grad(a_top, y, out_layer: Layer, loss: str, grad: Layer) -> None:
    """Gradient of the mean loss w.r.t. W[L+1], b[L+1], with input sigma(c[L]) (line 1),
    written into ``grad``."""
    g = output_loss_grad(out_layer.forward(a_top), y, loss, with_loss=False)[1]
    g *= 1.0 / max(1, a_top.shape[0])  # (an empty minibatch: a zero gradient)
    out_layer.grad_into(a_top, g, grad)


def lsq_residual(c, a_in, layer: Layer):
    """c - W a - b: the residual of eq. (6) for one layer."""
    return c - layer.forward(a_in)


def local_lsq_grad(layer: Layer, a_in, residual, mu: float, grad: Layer) -> None:
    """Gradient of eq. (6) with t' = t, mean over the minibatch: mu/B sum ||c - W a - b||^2,
    written into ``grad``.

    ``residual`` is ``c - W a - b`` at the new codes; the gradient is -2 mu/B r^T a.
    """
    layer.grad_into(a_in, residual * (-2.0 * mu / max(1, a_in.shape[0])), grad)


def augment(a, has_bias: bool):
    """[a, 1]: the bias becomes the last column of the weight matrix (AM-mem)."""
    return backend_of(a).append_ones(a) if has_bias else a


def update_memory(A, B, a_in, c, decay: float = 1.0, *, reduce: Reduce | None = None) -> None:
    """updateMemory (Algorithm 2.3), in place: A <- decay A + sum a a^T, B <- decay B + sum c a^T.

    With decay = 1 these are the plain sums A_t, B_t of eq. (7); decay < 1 is a forgetting
    factor (Mairal et al., 2009, Sec. 3.4). ``reduce`` (see :func:`update_weights`) sees the
    two sums of this minibatch before they are added.
    """
    dA, dB = a_in.T @ a_in, c.T @ a_in
    if reduce is not None:
        reduce("memory", (dA, dB))
        reduce("wait", ())
    if decay != 1.0:
        A *= decay
        B *= decay
    A += dA
    B += dB


def mem_objective(W, A, B):
    """The surrogate of eq. (7): Tr(W^T W A) - 2 Tr(W^T B)."""
    return ((W @ A) * W).sum() - 2.0 * (W * B).sum()


def blocks(n: int, block: int) -> list[slice]:
    """The diagonal blocks J of an n x n memory that BCD updates together."""
    return [slice(s, min(s + block, n)) for s in range(0, n, block)]


def factor_blocks(A, inverses: Sequence, *, block: int, ridge: float) -> None:
    """``inverses[j][...] = (A[J, J] + eps I)^-1`` for each diagonal block J, in place, with
    eps = ridge * mean(diag A), which keeps never-active inputs (A[j, j] = 0) from dividing by 0."""
    xp = backend_of(A)
    eps = ridge * xp.mean_diag(A) + 1e-12
    for J, inv in zip(blocks(A.shape[0], block), inverses):
        inv[...] = xp.inv(A[J, J] + eps * xp.eye(J.stop - J.start, A))


def update_factors(inverses: Sequence, U, decay: float, *, block: int) -> None:
    """After ``A <- decay A + U^T U`` (a minibatch of k inputs U), turn each block inverse
    ``P = S^-1`` into ``(decay S + U_J^T U_J)^-1`` in place, by the Woodbury identity
    ``(1/decay) (P - V^T (decay I + V U_J^T)^-1 V)`` with ``V = U_J P``: O(k b^2) instead of
    the O(b^3) of a new inverse. The ridge inside S decays with A until the next
    :func:`factor_blocks` (see :func:`memory_refactor_due`)."""
    xp = backend_of(U)
    for J, P in zip(blocks(U.shape[1], block), inverses):
        UJ = U[:, J]
        V = UJ @ P  # P is symmetric
        M = V @ UJ.T
        if U.shape[0] == 1:  # one sample: Sherman-Morrison, a scalar instead of a k x k solve
            M += decay
            P -= (V.T * (1.0 / M)) @ V
        else:
            M += decay * xp.eye(U.shape[0], U)
            P -= V.T @ (xp.inv(M) @ V)
        if decay != 1.0:
            P *= 1.0 / decay


def memory_refactor_due(age: int, batch: int, decay: float, block: int) -> bool:
    """Whether AM-mem factors its memories' diagonal blocks anew this update, rather than
    updating the factors it keeps (:func:`update_factors`); ``age`` counts the updates since
    the last factoring (0: there are none). Anew when the minibatch is not small next to a
    block (the Woodbury solve would then cost as much), when the ridge inside the kept
    factors has decayed below half of a fresh one's, and every 64 updates (rounding drift)."""
    return age == 0 or age >= 64 or 4 * batch > block or decay ** age < 0.5


def bcd(W, A, B, *, sweeps: int = 1, block: int = 64, ridge: float = 1e-4, inverses=None) -> None:
    """Minimize Tr(W^T W A) - 2 Tr(W^T B) over W, in place, by block-coordinate descent.

    Each block J of columns is set to its exact minimizer given the others,
    ``W[:, J] <- W[:, J] + (B[:, J] - W A[:, J]) (A[J, J] + eps I)^-1`` (Mairal et al., 2009,
    Algorithm 2, with blocks instead of single columns; ``block=1`` is their update).
    ``inverses`` are the block inverses (:func:`factor_blocks`, :func:`update_factors`);
    without them they are computed here, once for all the sweeps.
    """
    xp = backend_of(W)
    J_all = blocks(A.shape[0], block)
    if inverses is None:
        inverses = [xp.zeros_like(A[J, J]) for J in J_all]
        factor_blocks(A, inverses, block=block, ridge=ridge)
    for _ in range(sweeps):
        for J, inv in zip(J_all, inverses):
            W[:, J] += (B[:, J] - W @ A[:, J]) @ inv


def fit_memory(layer: Layer, A, B, U, inverses, *, refactor: bool, decay: float, sweeps: int,
               block: int, ridge: float) -> None:
    """Algorithm 2.3, line 5: W[l] = argmin Tr(W^T W A) - 2 Tr(W^T B), approximately, in place
    on the layer's weight and bias (the bias is the last column of [W | b]). ``U`` are this
    minibatch's (augmented) inputs, which :func:`update_memory` has just added to A."""
    if refactor:
        factor_blocks(A, inverses, block=block, ridge=ridge)
    else:
        update_factors(inverses, U, decay, block=block)
    if layer.bias is None:
        bcd(layer.weight, A, B, sweeps=sweeps, block=block, inverses=inverses)
        return
    Wb = backend_of(A).append_column(layer.weight, layer.bias)
    bcd(Wb, A, B, sweeps=sweeps, block=block, inverses=inverses)
    layer.weight[...] = Wb[:, :-1]
    layer.bias[...] = Wb[:, -1]


class Unrolled(NamedTuple):
    """A network laid out for one minibatch: the first layer's input, the layers (the last
    one the output layer) and the activations of the codes."""

    x: Array  # the minibatch
    x0: Array  # what the first layer reads (x itself, or an RNN's initial state)
    layers: list
    activations: tuple


class Stack(NamedTuple):
    """A feed-forward network (MLP, CNN): its layers, the last one the output layer, and
    their gradient buffers (views the learner owns)."""

    layers: list
    grads: list
    activations: tuple
    input_shape: tuple = ()  # per sample: an image's C x H x W (a flat x is reshaped to it)

    @property
    def out_grad(self):
        return self.grads[-1]

    def unroll(self, x) -> Unrolled:
        x0 = x.reshape(x.shape[0], *self.input_shape) if len(self.input_shape) > 1 else x
        return Unrolled(x, x0, self.layers, self.activations)

    def hidden_grads(self, u: Unrolled, a_in, codes, residuals, mu: float, reduce: Reduce | None) -> None:
        """Each hidden layer's gradient of its own least squares (6), into its buffers;
        ``residuals`` are the code solvers' (None: computed at the current weights)."""
        layers = u.layers
        for l in range(len(layers) - 1):
            r = residuals[l] if residuals is not None else lsq_residual(codes[l], a_in[l], layers[l])
            local_lsq_grad(layers[l], a_in[l], r, mu, self.grads[l])
            if reduce is not None:
                reduce("grad", self.grads[l])


class Elman(NamedTuple):
    """An Elman RNN, ``c_t = W_ih x_t + W_hh tanh(c_{t-1}) + b`` over T steps (``c_0`` gives
    ``tanh = 0``), whose last state is read out by ``out(relu(tanh(c_T)))``.

    Unrolled, it is the chain of Algorithm 2.1 with one code per step: step t is a dense layer
    ``W_hh`` whose bias is the step's input term ``W_ih x_t + b``, so the code problems are
    those of an MLP; the steps share W_ih, W_hh and b, so their local least squares (6) are
    summed into one gradient (:meth:`hidden_grads`).
    """

    weight_ih: Array
    weight_hh: Array
    bias: Array | None
    out: Dense
    grads: tuple  # (weight_ih, weight_hh, bias) gradient buffers
    out_grad: Dense
    steps: int

    @property
    def layers(self) -> list:
        return [self.out]

    def unroll(self, x) -> Unrolled:
        B, T = x.shape[0], self.steps
        inputs = x.reshape(B, T, x.shape[1] // T) @ self.weight_ih.T  # [B, T, H]: all steps' input terms at once
        if self.bias is not None:
            inputs += self.bias
        steps = [Dense(self.weight_hh, inputs[:, t]) for t in range(T)]
        h0 = backend_of(x).zeros_like(inputs[:, 0])
        return Unrolled(x, h0, steps + [self.out], ("tanh",) * (T - 1) + ("tanh_relu",))

    def hidden_grads(self, u: Unrolled, a_in, codes, residuals, mu: float, reduce: Reduce | None) -> None:
        """The steps' least squares (6) summed: W_hh's, W_ih's and b's gradients."""
        B, T = u.x.shape[0], self.steps
        g_ih, g_hh, g_b = self.grads
        if residuals is None:
            residuals = [lsq_residual(codes[t], a_in[t], u.layers[t]) for t in range(T)]
        xp = backend_of(u.x)
        scale = -2.0 * mu / max(1, B)
        R = xp.stack(residuals, 1) * scale  # [B, T, H]
        H_prev = xp.stack(a_in[:T], 1)  # tanh(c_{t-1}), [B, T, H]
        H, D = g_hh.shape[0], g_ih.shape[1]
        R = R.reshape(B * T, H)
        xp.matmul_into(g_hh, R.T, H_prev.reshape(B * T, H))
        xp.matmul_into(g_ih, R.T, u.x.reshape(B * T, D))
        if g_b is not None:
            xp.colsum_into(g_b, R)
        if reduce is not None:
            reduce("grad", self.grads)


class Slots(NamedTuple):
    """What an AM step reads and writes besides the data: views that the learner owns.

    ``net`` holds the layers and gradient buffers, views of one flat parameter and one flat
    gradient buffer (so that one optimizer call steps all the layers it covers); ``hidden``
    and ``out`` are the optimizer states of the hidden layers (AM-Adam; None for AM-mem) and
    of the output layer, and ``joint`` both at once where both are Adam (one call when their
    steps are equal); ``memories`` are AM-mem's (A, B, block inverses) per hidden layer.
    """

    net: Any  # Stack or Elman
    hidden: Any
    out: Any
    joint: Any
    memories: list


class AMHyper(NamedTuple):
    """The hyperparameters of one step (from :class:`amstream.AMConfig` and the schedules)."""

    loss: str
    mu: float
    lr: float  # hidden layers (AM-Adam)
    lr_out: float
    t: int  # optimizer steps taken so far
    code_iters_top: int = 1
    code_iters: int = 1
    code_solver: str = "linesearch"
    code_step: float = 1.0
    weight_iters: int = 1
    uses_memory: bool = False
    mem_decay: float = 1.0
    mem_sweeps: int = 1
    mem_block: int = 64
    mem_ridge: float = 1e-4
    mem_refactor: bool = True  # factor the memories' blocks anew (see memory_refactor_due)
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9


def update_weights(u: Unrolled, y, codes: list, acts: list, residuals: list, slots: Slots,
                   h: AMHyper, *, reduce: Reduce | None = None) -> None:
    """Algorithm 2.3, updateWeights, given the new codes c[1..L], their activations and the
    residuals the code solvers left (layer inputs are the activations of the new codes).

    ``reduce(what, arrays)`` is called, when given, on each set of sums that a step adds up
    over the samples - ``"grad"``: the output layer's gradient, then each hidden layer's as soon
    as it is known; ``"memory"``: AM-mem's memory increments - and with ``"wait"`` before the
    optimizer steps use the gradients; it may sum them over processes in place
    (:mod:`amstream.distributed`), in the same order on every process, whatever its share of the
    minibatch (an empty one included).
    """
    net, layers, out_grad = slots.net, u.layers, slots.net.out_grad
    a_in = [u.x0] + list(acts)
    for it in range(h.weight_iters):
        # line 1: W[L+1] <- W[L+1] - eta grad L(y, sigma(c[L]), W[L+1])
        output_grad(a_in[-1], y, layers[-1], h.loss, out_grad)
        if reduce is not None:
            reduce("grad", out_grad)
        if not h.uses_memory:
            # lines 8-10: each hidden layer's own Adam step on its local least squares (6)
            if codes:
                net.hidden_grads(u, a_in, codes, residuals if it == 0 else None, h.mu, reduce)
        if reduce is not None:
            reduce("wait", ())
        if not h.uses_memory:
            if slots.joint is not None and h.lr == h.lr_out:  # every layer in one call
                _optimizer_step(slots.joint, h.lr, h, h.t + it + 1)
                continue
            if slots.hidden is not None:
                _optimizer_step(slots.hidden, h.lr, h, h.t + it + 1)
        _optimizer_step(slots.out, h.lr_out, h, h.t + it + 1)
    if h.uses_memory:
        # lines 3-5: updateMemory, then W[l] = argmin Tr(W^T W A) - 2 Tr(W^T B)
        for l, (A, B, inverses) in enumerate(slots.memories):
            U = augment(a_in[l], layers[l].bias is not None)
            update_memory(A, B, U, codes[l], h.mem_decay, reduce=reduce)
            if h.mem_decay != 1.0 and (h.t // h.weight_iters + 1) % optim.FLUSH_EVERY == 0:
                optim.flush(A, B)  # entries of inputs that stay 0 decay towards subnormals
            fit_memory(layers[l], A, B, U, inverses, refactor=h.mem_refactor, decay=h.mem_decay,
                       sweeps=h.mem_sweeps, block=h.mem_block, ridge=h.mem_ridge)


def _optimizer_step(state, lr: float, h: AMHyper, t: int) -> None:
    if isinstance(state, optim.AdamSlot):
        optim.adam_step(state, t, lr=lr, betas=h.betas, eps=h.eps)
    else:
        optim.sgd_step(state, lr=lr, momentum=h.momentum)


def am_step(x, y, slots: Slots, h: AMHyper, *, reduce: Reduce | None = None) -> tuple[Array, Array]:
    """Algorithm 2.1: one online AM iteration on the minibatch (x, y), in place on ``slots``.

    Returns the per-sample loss and the network output, both *before* the update.
    """
    u = slots.net.unroll(x)  # an RNN unrolls into one layer per step
    # line 3: encodeInput (forward pass; the codes are the pre-activations)
    enc = encode_input(u.x0, u.layers, u.activations)
    losses, g_out = output_loss_grad(enc.out, y, h.loss)
    if not enc.codes:  # no hidden layer: only the output layer learns
        update_weights(u, y, [], [], [], slots, h, reduce=reduce)
        return losses, enc.out
    # line 4: updateCodes, top-down: problem (4) for c[L], problem (5) for l = L-1..1
    codes, acts, residuals = update_codes(
        enc, y, u.layers, u.activations, h.mu, h.loss, iters_top=h.code_iters_top,
        iters=h.code_iters, solver=h.code_solver, step=h.code_step, g_out_fwd=g_out)
    residuals[0] = codes[0] - enc.codes[0]  # W[1] x + b[1] is the forward code
    # line 5: updateWeights (Algorithm 2.3)
    update_weights(u, y, codes, acts, residuals, slots, h, reduce=reduce)
    return losses, enc.out
