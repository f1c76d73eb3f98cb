"""Learners: one interface for online AM (Algorithm 2.1) and the backprop baselines.

Every consumer - the training loop, the streaming service, the River estimators, the
Avalanche strategy, the benchmarks - drives a learner only through this interface::

    learner = make_learner(AMConfig(arch=(784, 500, 500, 10), algo="am-adam"))
    update = learner.learn(x, y)          # exactly one update on this minibatch
    update.loss, update.outputs           # loss and outputs *before* the update (prequential)
    learner.predict(x), learner.predict_proba(x)
    state = learner.state_dict()          # everything needed to continue bit-for-bit
    learner.load_state_dict(state)

Arrays go in as NumPy arrays or torch tensors and come out as the same kind.

The algorithm itself is in :mod:`amstream.functional`; the classes here only hold state
(weights, optimizer moments, co-activation memories, counters, RNG) and call it.
"""
from __future__ import annotations

import abc
import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as tF
from torch import Tensor, nn

from amstream import functional as F
from amstream.activations import torch_activation
from amstream.backend import NUMPY, TORCH
from amstream.config import AMConfig
from amstream.exceptions import CheckpointError, ConfigError
from amstream.network import LayerSpec, Network
from amstream.optim import AdamSlot, SGDSlot

__all__ = ["Learner", "AMLearner", "BackpropLearner", "Update", "make_learner", "learner_from_state"]

#: BACKENDS[name] for ``backend=``; "auto" is NumPy on the CPU and torch on other devices
BACKENDS = {"numpy": NUMPY, "torch": TORCH}

#: an update whose largest matrix product has at least this many multiply-adds runs NumPy's
#: BLAS on torch's thread count (threadpoolctl): above it OpenBLAS would use every core, and
#: on a machine whose cores are busy that was seen 10-40x slower than one thread
BLAS_THREADED_WORK = 1 << 18
_blas = None  # threadpoolctl.ThreadpoolController, built on first use (it inspects the process)


def _blas_threads(n: int):
    """A context in which NumPy's BLAS uses at most n threads."""
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController

        _blas = ThreadpoolController()
    return _blas.limit(limits=n, user_api="blas")


class Update:
    """What one call to :meth:`Learner.learn` reports.

    ``loss`` is the mean loss on the minibatch *before* the update and ``outputs`` the
    network outputs (logits for classification) *before* the update, so a prequential
    (test-then-train) evaluation needs no second forward pass. ``losses`` are the per-sample
    losses; ``loss`` is computed from them when first read (on a GPU that read waits for the
    device, so a caller that never reads it never waits).
    """

    __slots__ = ("losses", "outputs", "_loss")

    def __init__(self, losses: Any, outputs: Any):
        self.losses = losses
        self.outputs = outputs
        self._loss: float | None = None

    @property
    def loss(self) -> float:
        if self._loss is None:
            self._loss = float(self.losses.mean()) if len(self.losses) else math.nan
        return self._loss

    def __repr__(self) -> str:
        return f"Update(loss={self.loss:.6g}, outputs={tuple(self.outputs.shape)})"


class _Linear(nn.Linear):
    """``nn.Linear`` that draws nothing from torch's global RNG when built: the learner
    initialises the weights from its own generator (as do the two classes below)."""

    def reset_parameters(self) -> None:
        pass


class _Conv2d(nn.Conv2d):
    def reset_parameters(self) -> None:
        pass


class _Elman(nn.Module):
    """``c_t = W_ih x_t + W_hh tanh(c_{t-1}) + b`` over a [B, T, D] sequence; returns c_T."""

    def __init__(self, d: int, hidden: int, bias: bool, device):
        super().__init__()
        self.weight_ih = nn.Parameter(torch.empty(hidden, d, device=device))
        self.weight_hh = nn.Parameter(torch.empty(hidden, hidden, device=device))
        self.bias = nn.Parameter(torch.empty(hidden, device=device)) if bias else None

    def forward(self, xs: Tensor) -> Tensor:
        inputs = xs @ self.weight_ih.T
        if self.bias is not None:
            inputs = inputs + self.bias
        h = inputs.new_zeros(inputs.shape[0], inputs.shape[2])
        for step in inputs.unbind(1):  # (slicing inputs[:, t] instead makes backprop quadratic in T)
            c = torch.addmm(step, h, self.weight_hh.T)
            h = torch.tanh(c)
        return c


def _module(spec: LayerSpec, bias: bool, device) -> nn.Module:
    if spec.kind == "conv":
        return _Conv2d(spec.in_shape[0], spec.out_shape[0], spec.kernel, spec.stride, spec.padding,
                       bias=bias, device=device)
    if spec.kind == "rnn":
        return _Elman(spec.in_shape[-1], spec.out_shape[0], bias, device)
    return _Linear(math.prod(spec.in_shape), spec.out_shape[0], bias=bias, device=device)


class Net(nn.Module):
    """The network of an ``arch`` (:mod:`amstream.network`) as a ``torch.nn.Module``: dense,
    convolution and Elman layers with per-layer activations (the model of eq. (1)).

    Its forward pass is differentiable (``sign`` through its straight-through estimate): the
    backprop baselines train it with autograd, and for the AM learners it is a view of their
    weights for code that wants a ``torch.nn.Module`` (Avalanche's evaluation, for one).
    """

    def __init__(self, network: Network, activations: tuple[str, ...], bias: bool,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.network = network
        self.layers = nn.ModuleList(_module(spec, bias, device) for spec in network.layers)
        self.activations = ("tanh_relu",) if network.is_rnn else activations
        self._fns = [torch_activation(name) for name in self.activations]

    def forward(self, x: Tensor) -> Tensor:
        B, shape = x.shape[0], self.network.input_shape
        a = x.reshape(B, *shape) if len(shape) > 1 else x
        if self.network.is_rnn:
            a = a.reshape(B, self.network.layers[0].steps, -1)
        for spec, layer, fn in zip(self.network.layers, self.layers, self._fns):
            if spec.pool:
                a = tF.max_pool2d(a, spec.pool)
            if spec.flatten:
                a = a.reshape(B, -1)
            a = fn(layer(a))
        spec = self.network.layers[-1]
        if spec.pool:
            a = tF.max_pool2d(a, spec.pool)
        if spec.flatten:
            a = a.reshape(B, -1)
        return self.layers[-1](a)


class Learner(abc.ABC):
    """Common state and the public interface of every learner."""

    kind = "base"
    state_version = 1

    def __init__(self, config: AMConfig, *, device: str | torch.device = "cpu"):
        if not isinstance(config, AMConfig):
            raise ConfigError(f"`config` must be an AMConfig, got `{type(config).__name__}`")
        self.config = config
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("`device` is `cuda` but torch sees no CUDA device")
        self.n_updates = 0
        self.n_samples = 0
        # every random draw of the learner comes from this generator (CPU, so that
        # CPU and CUDA runs start from the same weights)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.model = Net(config.network, config.activations, config.bias, self.device)
        self._init_weights()

    # -- the interface ------------------------------------------------------------
    @abc.abstractmethod
    def learn(self, x, y) -> Update:
        """Exactly one update on the minibatch (x [B, d], y [B] class ids or [B, m] targets)."""

    def forward(self, x):
        """Network outputs (logits for classification), as the kind of array ``x`` is."""
        if isinstance(x, np.ndarray):
            return self._forward_numpy(self._check_x(x))
        with torch.no_grad():
            return self.model(self._as_x(x))

    def predict_proba(self, x):
        """Class probabilities [B, n_classes] (classification only)."""
        if self.config.loss != "ce":
            raise ConfigError("`predict_proba` needs a classifier (`loss='ce'`)")
        out = self.forward(x)
        if isinstance(out, np.ndarray):
            return NUMPY.exp(NUMPY.log_softmax(out))
        return torch.softmax(out, dim=1)

    def predict(self, x):
        """Class ids [B] for classification, outputs [B, m] for regression."""
        out = self.forward(x)
        return out.argmax(1) if self.config.loss == "ce" else out

    @property
    def mu(self) -> float:
        """The penalty weight at the current update: min(mu0 * growth^t, mu_max)."""
        c = self.config
        if c.mu_growth == 1.0:
            return min(c.mu, c.mu_max)
        return min(c.mu * math.exp(self.n_updates * math.log(c.mu_growth)), c.mu_max)

    @property
    def lr_factor(self) -> float:
        """The learning-rate schedule's factor at the current update."""
        c = self.config
        return c.lr_decay ** (self.n_updates // c.lr_decay_every) if c.lr_decay_every else 1.0

    @property
    def n_inputs(self) -> int:
        return self.config.n_inputs

    @property
    def n_outputs(self) -> int:
        return self.config.n_outputs

    # -- state --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain dict of tensors and python values: safe for ``torch.load(weights_only=True)``."""
        return {
            "version": self.state_version,
            "kind": self.kind,
            "config": self.config.to_dict(),
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            **self._own_state(),
            "n_updates": self.n_updates,
            "n_samples": self.n_samples,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; the config must match this learner's."""
        if state.get("kind") != self.kind:
            raise CheckpointError(f"learner state is for a `{state.get('kind')}` learner, this is `{self.kind}`")
        state = self._upgrade(state)
        version = state.get("version")
        if version != self.state_version:
            raise CheckpointError(f"learner state version `{version}` is not supported "
                                  f"(expected {self.state_version})")
        saved = AMConfig.from_dict(state["config"])
        if saved != self.config:
            diff = [f.name for f in _fields(saved) if getattr(saved, f.name) != getattr(self.config, f.name)]
            raise CheckpointError(f"learner state does not match this learner's config (differs in {diff}); "
                                  "build the learner with `learner_from_state` instead")
        self._load_own_state(state)
        self.n_updates = int(state["n_updates"])
        self.n_samples = int(state["n_samples"])
        self.generator.set_state(state["generator"])

    # -- growth (used by the River estimators and serve) -----------------------------
    @torch.no_grad()
    def expand(self, *, n_inputs: int | None = None, n_outputs: int | None = None) -> None:
        """Grow the input layer (new features) and/or the output layer (new classes).

        New input columns start at zero, so existing predictions do not change; new output
        rows start at zero too. Optimizer moments and memories are padded with zeros.
        """
        grow_in = n_inputs is not None and n_inputs > self.n_inputs
        grow_out = n_outputs is not None and n_outputs > self.n_outputs
        if not (grow_in or grow_out):
            return
        if grow_in and not self.config.network.is_mlp:
            raise ConfigError(f"only an MLP's input layer can grow; `arch` is `{self.config.arch_string()}`")
        state = self.state_dict()
        if isinstance(self.config.arch, tuple):
            arch: Any = (n_inputs if grow_in else self.n_inputs, *self.config.arch[1:-1],
                         n_outputs if grow_out else self.n_outputs)
        else:  # a spec: its last token is the output layer's width
            arch = self.config.arch.rsplit("-", 1)[0] + f"-{n_outputs}"
        last = len(self.config.network.layers) - 1
        self.config = self.config.replace(arch=arch)
        self.model = Net(self.config.network, self.config.activations, self.config.bias, self.device)
        state["config"] = self.config.to_dict()
        for name, tensor in list(_named_tensors(state)):
            index = int(name.split(".")[1])
            if grow_in and index == 0 and tensor.dim() == 2:
                tensor = _pad(tensor, 1, self.n_inputs)
            if grow_out and index == last:
                tensor = _pad(tensor, 0, self.n_outputs)
            _set_named_tensor(state, name, tensor)
        self._pad_extra(state)
        self._build()
        self.load_state_dict(state)

    # -- helpers ------------------------------------------------------------------
    def _init_weights(self) -> None:
        """U(-k, k) for every weight and bias, as PyTorch's own layers: k = 1/sqrt(fan_in), the
        fan-in of a unit (in_features, or channels x kernel area); 1/sqrt(hidden) for an RNN."""
        with torch.no_grad():
            for spec, m in zip(self.config.network.layers, self.model.layers):
                if spec.kind == "rnn":
                    fan_in = spec.out_shape[0]
                elif spec.kind == "conv":
                    fan_in = spec.in_shape[0] * spec.kernel ** 2
                else:
                    fan_in = math.prod(spec.in_shape)
                k = 1.0 / math.sqrt(fan_in)
                for p in m.parameters():
                    p.copy_(torch.rand(p.shape, generator=self.generator) * (2 * k) - k)

    def _check_x(self, x: np.ndarray) -> np.ndarray:
        if x.dtype != np.float32 and x.dtype != np.float64:
            x = x.astype(np.float32)
        if x.ndim != 2 or x.shape[1] != self.n_inputs:
            raise ConfigError(f"inputs must have shape [batch, {self.n_inputs}], got `{list(x.shape)}`")
        return x

    def _as_x(self, x) -> Tensor:
        x = torch.as_tensor(x, dtype=torch.float32, device=self.device)
        if x.dim() != 2 or x.shape[1] != self.n_inputs:
            raise ConfigError(f"inputs must have shape [batch, {self.n_inputs}], got `{list(x.shape)}`")
        return x

    def _check_y(self, y, n: int, xp):
        """Targets as the backend wants them: int64 class ids [B] or float32 [B, m]."""
        if self.config.loss == "ce":
            y = y.reshape(-1)
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.n_outputs):
                raise ConfigError(f"labels must be in [0, {self.n_outputs - 1}], got range "
                                  f"[{int(y.min())}, {int(y.max())}]")
        else:
            y = y.reshape(n, -1)
            if y.shape[1] != self.n_outputs:
                raise ConfigError(f"targets must have {self.n_outputs} columns, got {y.shape[1]}")
        if y.shape[0] != n:
            raise ConfigError(f"{n} inputs but {y.shape[0]} targets")
        return y

    def _as_xy(self, x, y) -> tuple[Tensor, Tensor]:
        x = self._as_x(x)
        if self.config.loss == "ce":
            y = torch.as_tensor(y, device=self.device).long()
        else:
            y = torch.as_tensor(y, dtype=torch.float32, device=self.device)
        return x, self._check_y(y, x.shape[0], TORCH)

    def _forward_numpy(self, x: np.ndarray) -> np.ndarray:
        return self.forward(torch.from_numpy(x)).numpy()

    def _count(self, n: int) -> None:
        self.n_updates += 1
        self.n_samples += n

    @abc.abstractmethod
    def _own_state(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def _load_own_state(self, state: dict[str, Any]) -> None: ...

    def _upgrade(self, state: dict[str, Any]) -> dict[str, Any]:
        return state

    def _pad_extra(self, state: dict[str, Any]) -> None:
        pass

    def _build(self) -> None:
        pass


def _fields(cfg: AMConfig) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cfg) if f.compare]


def _pad(t: Tensor, dim: int, size: int) -> Tensor:
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _named_tensors(state: dict[str, Any]):
    """(``"<group>/layers.i.weight"``, tensor) for every per-parameter tensor of a state."""
    for name, t in state["model"].items():
        yield f"model/{name}", t
    for buffer, tensors in state.get("optimizer", {}).items():
        for name, t in tensors.items():
            yield f"{buffer}/{name}", t


def _set_named_tensor(state: dict[str, Any], key: str, tensor: Tensor) -> None:
    group, name = key.split("/")
    (state["model"] if group == "model" else state["optimizer"][group])[name] = tensor


class AMLearner(Learner):
    """Online alternating minimization, Algorithm 2.1: AM-Adam or AM-mem (Mem = True).

    One :meth:`learn` call is one iteration of the while-loop of Algorithm 2.1 on a
    minibatch: :func:`amstream.functional.am_step`. The ``-off`` algos are the same update;
    the caller feeds the whole training set as one minibatch per iteration.

    The state lives in flat buffers - parameters, gradients, optimizer moments - with one
    view per layer, so that one optimizer call steps every layer it covers. On the CPU the
    buffers are NumPy arrays that torch tensors share (``learner.model``'s parameters are
    such views), so the update can run on either backend of :mod:`amstream.backend`;
    ``backend="auto"`` takes NumPy there, which measured faster than torch at equal thread
    counts from River-sized nets to 784-100-100-10 at minibatch 512
    (``benchmarks/backend_crossover.py``), and torch on other devices. The optimizer steps
    use torch's fused Adam kernel on either backend (:mod:`amstream.optim`).
    """

    kind = "am"
    state_version = 2

    def __init__(self, config: AMConfig, *, device: str | torch.device = "cpu", backend: str = "auto"):
        if not config.is_am:
            raise ConfigError(f"AMLearner needs an am-* algo, got `{config.algo}`")
        super().__init__(config, device=device)
        if backend not in ("auto", *BACKENDS):
            raise ConfigError(f"`backend` must be `auto`, `numpy` or `torch`, got `{backend}`")
        if backend == "numpy" and self.device.type != "cpu":
            raise ConfigError(f"`backend` `numpy` runs on the CPU only, not on `{self.device}`")
        torch_only = any(spec.kind == "conv" or spec.pool for spec in config.network.layers)
        if backend == "numpy" and torch_only:
            raise ConfigError(f"`backend` `numpy` has no convolutions or pooling; `arch` `{config.arch_string()}` needs torch")
        if backend == "auto":
            backend = "numpy" if self.device.type == "cpu" and not torch_only else "torch"
        self.backend = BACKENDS[backend]
        self.reducer: Any = None  # amstream.distributed.Reducer when this is one of several ranks
        initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self._build()
        _copy_named(self._views(TORCH).params, initial, "model")

    # -- buffers and views -----------------------------------------------------------
    def _build(self) -> None:
        """Allocate the flat buffers for the current config and point the model at them."""
        c = self.config
        network = c.network
        shapes = {n: tuple(p.shape) for n, p in self.model.named_parameters()}
        names = list(shapes)  # layer by layer, weight before bias: the output layer is last
        sizes = [math.prod(shapes[n]) for n in names]
        last = f"layers.{len(network.layers) - 1}."
        n_out = sum(size for n, size in zip(names, sizes) if n.startswith(last))
        total = sum(sizes)
        self._hidden_size = total - n_out  # the hidden layers come first in the buffers
        self._max_fan = _work_per_sample(network)  # see BLAS_THREADED_WORK
        hidden_inputs = [spec.in_shape[0] for spec in network.layers[:-1]]
        self._min_block = min(min(c.mem_block, n + c.bias) for n in hidden_inputs) if hidden_inputs else 1
        on_cpu = self.device.type == "cpu"

        def zeros(*shape):
            if on_cpu:
                return np.zeros(shape, dtype=np.float32)
            return torch.zeros(shape, dtype=torch.float32, device=self.device)

        self._names, self._shapes, self._sizes = names, shapes, sizes
        b = {"param": zeros(total), "grad": zeros(total)}
        adam_from = self._hidden_size if c.uses_memory else 0  # where Adam's moments start
        if c.out_optimizer == "sgd":
            b["momentum_buffer"] = zeros(n_out)
            adam_to = self._hidden_size
        else:
            adam_to = total
        if adam_to > adam_from:
            b["exp_avg"], b["exp_avg_sq"] = zeros(adam_to - adam_from), zeros(adam_to - adam_from)
        self._adam_range = (adam_from, adam_to)
        self._buffers = b
        # AM-mem: per hidden layer the memories A, B and the inverses of A's diagonal blocks
        self.memories: list[tuple[Any, Any, list]] = []
        if c.uses_memory:  # an MLP (AMConfig checks)
            for m in self.model.layers[:-1]:
                n_in = m.in_features + (1 if c.bias else 0)
                inverses = [zeros(J.stop - J.start, J.stop - J.start) for J in F.blocks(n_in, c.mem_block)]
                self.memories.append((zeros(n_in, n_in), zeros(m.out_features, n_in), inverses))
        self._mem_age = 0  # updates since the block inverses were computed (0: never)
        self._view_cache: dict[str, Any] = {}
        params = self._views(TORCH).params
        for name, view in params.items():
            layer, attr = name.rsplit(".", 1)
            setattr(self.model.get_submodule(layer), attr, nn.Parameter(view, requires_grad=False))

    def _views(self, xp) -> Any:
        """The buffers as ``xp``'s arrays, cut into per-layer views and optimizer slots."""
        views = self._view_cache.get(xp.name)
        if views is None:
            views = self._view_cache[xp.name] = _Views(self, xp)
        return views

    # -- the update ----------------------------------------------------------------
    def learn(self, x, y) -> Update:
        """Algorithm 2.1 on one minibatch (:func:`amstream.functional.am_step`)."""
        as_numpy = isinstance(x, np.ndarray)
        if as_numpy:
            x = self._check_x(x).astype(np.float32, copy=False)
            y = self._check_y(np.asarray(y, dtype=np.int64 if self.config.loss == "ce" else np.float32),
                              x.shape[0], NUMPY)
        else:
            x, y = self._as_xy(x, y)
        xp = self.backend
        if xp is NUMPY and not as_numpy:
            x, y = x.numpy(), y.numpy()
        elif xp is TORCH and as_numpy:
            x, y = torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)
        n = x.shape[0]
        if self.reducer is not None:  # one of several ranks: the update of all ranks' samples
            n = self.reducer.begin(x.shape[0], self.device)
        if n == 0:  # an empty minibatch (on every rank): no update
            losses, outputs = x[:, 0], x @ x.new_zeros((x.shape[1], self.n_outputs)) if xp is TORCH \
                else x @ np.zeros((x.shape[1], self.n_outputs), x.dtype)
        else:
            h = self._hyper(n)
            if xp is NUMPY and x.shape[0] * self._max_fan >= BLAS_THREADED_WORK:
                with _blas_threads(torch.get_num_threads()):
                    losses, outputs = F.am_step(x, y, self._views(xp).slots, h, reduce=self.reducer)
            else:
                losses, outputs = F.am_step(x, y, self._views(xp).slots, h, reduce=self.reducer)
            if h.uses_memory:
                self._mem_age = 1 if h.mem_refactor else self._mem_age + 1
            self._count(n)
        if as_numpy and xp is TORCH:
            losses, outputs = losses.cpu().numpy(), outputs.cpu().numpy()
        elif not as_numpy and xp is NUMPY:
            losses, outputs = torch.from_numpy(losses), torch.from_numpy(outputs)
        return Update(losses, outputs)

    def _hyper(self, batch: int) -> F.AMHyper:
        c = self.config
        factor = self.lr_factor
        # (distributed: the kept factors would need every rank's samples; A itself is summed)
        refactor = c.uses_memory and (self.reducer is not None or F.memory_refactor_due(
            self._mem_age, batch, c.mem_decay, self._min_block))
        return F.AMHyper(
            loss=c.loss, mu=self.mu, lr=c.lr * factor,
            lr_out=c.lr_out * factor, t=self.n_updates * c.weight_iters,
            code_iters_top=c.code_iters_top, code_iters=c.code_iters, code_solver=c.code_solver,
            code_step=c.code_step, weight_iters=c.weight_iters, uses_memory=c.uses_memory,
            mem_decay=c.mem_decay, mem_sweeps=c.mem_sweeps, mem_block=c.mem_block,
            mem_ridge=c.mem_ridge, mem_refactor=refactor, betas=c.adam_betas, eps=c.adam_eps, momentum=c.momentum)

    def _forward_numpy(self, x: np.ndarray) -> np.ndarray:
        if self.backend is not NUMPY:
            return super()._forward_numpy(x)
        u = self._views(NUMPY).slots.net.unroll(x)
        return F.encode_input(u.x0, u.layers, u.activations).out

    # -- state -----------------------------------------------------------------------
    def _own_state(self) -> dict[str, Any]:
        views = self._views(TORCH)
        optimizer = {key: {n: t.clone() for n, t in per_name.items()}
                     for key, per_name in views.per_param.items()}
        return {"optimizer": optimizer,
                "memories": [[A.clone(), B.clone()] for A, B, _ in views.memories],
                "memory_factors": {"age": self._mem_age,
                                   "inverses": [[P.clone() for P in inverses] for _, _, inverses in views.memories]}}

    def _load_own_state(self, state: dict[str, Any]) -> None:
        views = self._views(TORCH)
        _copy_named(views.params, state["model"], "model")
        saved = state.get("optimizer", {})
        unknown = sorted(set(saved) - set(views.per_param))
        if unknown:
            raise CheckpointError(f"learner state has optimizer buffers {unknown} that this learner "
                                  f"does not use (it has {sorted(views.per_param)})")
        for key, per_name in views.per_param.items():
            if key in saved:
                _copy_named(per_name, saved[key], key)
            else:  # not created yet when the state was saved (a v1 state before any update)
                for t in per_name.values():
                    t.zero_()
        memories = state.get("memories", [])
        if len(memories) != len(self.memories):
            raise CheckpointError(f"learner state has {len(memories)} memories, this learner {len(self.memories)}")
        for (A, B, _), (sA, sB) in zip(views.memories, memories):
            A.copy_(sA)
            B.copy_(sB)
        factors = state.get("memory_factors")
        self._mem_age = 0  # none saved (an older state, a grown layer): computed at the next update
        if factors is not None and memories:
            for (_, _, inverses), saved in zip(views.memories, factors["inverses"]):
                for P, sP in zip(inverses, saved):
                    P.copy_(sP)
            self._mem_age = int(factors["age"])

    def _pad_extra(self, state: dict[str, Any]) -> None:
        """Memories of a grown input layer: zero rows and columns for the new inputs, the
        bias's row and column staying last."""
        if not state["memories"] or self.n_inputs == state["memories"][0][0].shape[0] - self.config.bias:
            return
        A, B = state["memories"][0]
        n_old = A.shape[0] - (1 if self.config.bias else 0)
        n_new = self.n_inputs + (1 if self.config.bias else 0)
        index = torch.cat([torch.arange(n_old), torch.arange(n_new - 1, n_new)]) if self.config.bias \
            else torch.arange(n_old)
        A2, B2 = A.new_zeros(n_new, n_new), B.new_zeros(B.shape[0], n_new)
        A2[index.view(-1, 1), index.view(1, -1)] = A
        B2[:, index] = B
        state["memories"][0] = [A2, B2]
        state.pop("memory_factors", None)  # the grown memory is factored anew

    def _upgrade(self, state: dict[str, Any]) -> dict[str, Any]:
        """Version 1 (amstream 0.1.0: torch.optim state dicts) to version 2 (named buffers)."""
        if state.get("version") != 1:
            return state
        config = AMConfig.from_dict(state["config"])
        names = list(state["model"])
        out_names = names[-2:] if config.bias else names[-1:]
        hidden_names = names[:len(names) - len(out_names)]
        optimizer: dict[str, dict[str, Tensor]] = {}
        for key, opt in state["optimizers"].items():
            order = [i for group in opt["param_groups"] for i in group["params"]]
            if key == "adam":
                owned = hidden_names + (out_names if len(order) > len(hidden_names) else [])
            else:
                owned = out_names
            for index, name in zip(order, owned):
                for buffer, value in opt["state"].get(index, {}).items():
                    if buffer != "step":
                        optimizer.setdefault(buffer, {})[name] = value
        return {**{k: v for k, v in state.items() if k not in ("optimizers", "extra")}, "version": 2,
                "optimizer": optimizer, "memories": state.get("extra", {}).get("memories", [])}

    def memory(self, layer: int) -> tuple[Tensor, Tensor]:
        """The co-activation memories (A, B) of hidden layer ``layer`` (0-based), AM-mem only."""
        A, B, _ = self._views(TORCH).memories[layer]
        return A, B


class _Views:
    """One backend's views of an AMLearner's flat buffers."""

    def __init__(self, learner: AMLearner, xp):
        def as_torch(a):
            return torch.from_numpy(a) if isinstance(a, np.ndarray) else a

        def as_xp(a):
            if xp is TORCH:
                return as_torch(a)
            return a if isinstance(a, np.ndarray) else a.numpy()

        b = {k: as_xp(v) for k, v in learner._buffers.items()}
        # the optimizers step torch views whatever the backend: on the CPU they share the
        # NumPy buffers' memory, and torch's fused Adam is the fastest at every size
        bt = {k: as_torch(v) for k, v in learner._buffers.items()}
        names, shapes, sizes = learner._names, learner._shapes, learner._sizes
        offsets = np.cumsum([0] + sizes).tolist()
        span = dict(zip(names, zip(offsets[:-1], offsets[1:])))
        self.params = {n: b["param"][s:e].reshape(shapes[n]) for n, (s, e) in span.items()}
        grads = {n: b["grad"][s:e].reshape(shapes[n]) for n, (s, e) in span.items()}
        # per parameter name, the optimizer buffers that cover it (for the state dict)
        self.per_param: dict[str, dict[str, Any]] = {}
        a0, a1 = learner._adam_range
        h = learner._hidden_size
        for key, start in (("exp_avg", a0), ("exp_avg_sq", a0), ("momentum_buffer", h)):
            if key in b:
                self.per_param[key] = {n: b[key][s - start:e - start].reshape(shapes[n])
                                       for n, (s, e) in span.items() if start <= s and e - start <= len(b[key])}

        def adam(s, e):
            return AdamSlot(bt["param"][s:e], bt["grad"][s:e], bt["exp_avg"][s - a0:e - a0],
                            bt["exp_avg_sq"][s - a0:e - a0])

        c = learner.config
        total = len(b["param"])
        hidden = adam(0, h) if (not c.uses_memory and h > 0) else None
        if c.out_optimizer == "sgd":
            out = SGDSlot(bt["param"][h:], bt["grad"][h:], bt["momentum_buffer"])
        else:
            out = adam(h, total)
        self.memories = [(as_xp(A), as_xp(B), [as_xp(P) for P in inverses])
                         for A, B, inverses in learner.memories]
        joint = adam(0, total) if (hidden is not None and isinstance(out, AdamSlot)) else None
        self.slots = F.Slots(net=_functional_net(c, self.params, grads), hidden=hidden, out=out,
                             joint=joint, memories=self.memories)


def _functional_net(config: AMConfig, params: dict[str, Any], grads: dict[str, Any]):
    """The layers of :mod:`amstream.functional` on views of the parameters and gradients."""
    network = config.network

    def layer(store, i, spec):
        W, b = store[f"layers.{i}.weight"], store.get(f"layers.{i}.bias")
        if spec.kind == "conv":
            return F.Conv(W, b, spec.stride, spec.padding, spec.pool)
        return F.Dense(W, b, spec.pool, spec.flatten)

    if network.is_rnn:
        rnn, out = network.layers
        return F.Elman(params["layers.0.weight_ih"], params["layers.0.weight_hh"], params.get("layers.0.bias"),
                       layer(params, 1, out), (grads["layers.0.weight_ih"], grads["layers.0.weight_hh"],
                                               grads.get("layers.0.bias")), layer(grads, 1, out), rnn.steps)
    specs = network.layers
    return F.Stack([layer(params, i, s) for i, s in enumerate(specs)],
                   [layer(grads, i, s) for i, s in enumerate(specs)], config.activations,
                   network.input_shape)


def _work_per_sample(network: Network) -> int:
    """Multiply-adds per sample of the largest matrix product of an update (NumPy layers)."""
    if network.is_rnn:
        rnn = network.layers[0]
        steps, d, h = rnn.steps, rnn.in_shape[-1], rnn.out_shape[0]
        return steps * h * max(d, h)
    return max(math.prod(s.in_shape) * math.prod(s.out_shape) for s in network.layers)


def _copy_named(dest: dict[str, Any], src: dict[str, Any], what: str) -> None:
    if set(dest) != set(src):
        raise CheckpointError(f"learner state's `{what}` has {sorted(src)}, this learner {sorted(dest)}")
    for name, t in dest.items():
        if tuple(src[name].shape) != tuple(t.shape):
            raise CheckpointError(f"learner state's `{what}` `{name}` has shape {list(src[name].shape)}, "
                                  f"this learner {list(t.shape)}")
        t.copy_(src[name])


class BackpropLearner(Learner):
    """The baselines: one SGD or Adam backprop step per minibatch (``ste``: Adam + STE)."""

    kind = "backprop"

    def __init__(self, config: AMConfig, *, device: str | torch.device = "cpu"):
        if config.is_am:
            raise ConfigError(f"BackpropLearner needs sgd, adam or ste, got `{config.algo}`")
        super().__init__(config, device=device)
        self._build()
        self._lr_factor = 1.0

    def _build(self) -> None:
        c = self.config
        params = list(self.model.parameters())
        if c.algo == "sgd":
            self.opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=c.lr, momentum=c.momentum)
        else:
            fused = self.device.type in ("cpu", "cuda")
            self.opt = torch.optim.Adam(params, lr=c.lr, betas=c.adam_betas, eps=c.adam_eps, fused=fused)

    def learn(self, x, y) -> Update:
        as_numpy = isinstance(x, np.ndarray)
        x, y = self._as_xy(x, y)
        factor = self.lr_factor
        for group in self.opt.param_groups:
            group["lr"] = self.config.lr * factor
        with torch.enable_grad():  # callers may hold torch.no_grad()
            out = self.model(x)
            if self.config.loss == "ce":
                losses = nn.functional.cross_entropy(out, y, reduction="none")
            else:
                losses = 0.5 * (out - y).pow(2).sum(1)
            self.opt.zero_grad(set_to_none=True)
            losses.mean().backward()
        self.opt.step()
        self._count(x.shape[0])
        losses, out = losses.detach(), out.detach()
        if as_numpy:
            losses, out = losses.cpu().numpy(), out.cpu().numpy()
        return Update(losses, out)

    def _own_state(self) -> dict[str, Any]:
        # a copy: torch.optim's state_dict holds the live moment tensors, which a learner loading
        # it would then share with this one
        return {"optimizers": {"opt": copy.deepcopy(self.opt.state_dict())}}

    def _load_own_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizers"]["opt"])

    def _pad_extra(self, state: dict[str, Any]) -> None:
        """torch.optim's state is keyed by position: pad each moment to its parameter's shape."""
        shapes = [p.shape for p in self.model.parameters()]
        for index, st in state["optimizers"]["opt"]["state"].items():
            for key, value in list(st.items()):
                if torch.is_tensor(value) and value.dim() and value.shape != shapes[index]:
                    for dim, size in enumerate(shapes[index]):
                        value = _pad(value, dim, size) if value.shape[dim] < size else value
                    st[key] = value


def make_learner(config: AMConfig | None = None, *, device: str | torch.device = "cpu",
                 backend: str = "auto", **kwargs: Any) -> Learner:
    """Build the learner for ``config.algo`` (keyword arguments build the config).

    ``backend`` (AM learners): ``"numpy"``, ``"torch"`` or ``"auto"`` (NumPy on the CPU, torch
    on other devices); the backprop baselines always run on torch.
    """
    if config is None:
        config = AMConfig(**kwargs)
    elif kwargs:
        config = config.replace(**kwargs)
    if config.is_am:
        return AMLearner(config, device=device, backend=backend)
    return BackpropLearner(config, device=device)


def learner_from_state(state: dict[str, Any], *, device: str | torch.device = "cpu",
                       backend: str = "auto") -> Learner:
    """Rebuild a learner from :meth:`Learner.state_dict` output (config included)."""
    try:
        config = AMConfig.from_dict(state["config"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"learner state has no valid `config`: {exc}") from None
    learner = make_learner(config, device=device, backend=backend)
    learner.load_state_dict(state)
    return learner
