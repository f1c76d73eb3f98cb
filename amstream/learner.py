"""Learners: one interface for online AM (Algorithm 2.1) and the backprop baselines.

Every consumer — the training loop, the streaming service, the River estimators, the
Avalanche strategy, the benchmarks — drives a learner only through this interface::

    learner = make_learner(AMConfig(arch=(784, 500, 500, 10), algo="am-adam"))
    update = learner.learn(x, y)          # exactly one update on this minibatch
    update.loss, update.outputs           # loss and outputs *before* the update (prequential)
    learner.predict(x), learner.predict_proba(x)
    state = learner.state_dict()          # everything needed to continue bit-for-bit
    learner.load_state_dict(state)

The algorithm itself is in :mod:`amstream.functional`; the classes here only hold state
(weights, optimizer states, co-activation memories, counters, RNG) and call it.
"""
from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from amstream import functional as F
from amstream.config import AMConfig
from amstream.exceptions import CheckpointError, ConfigError

__all__ = ["Learner", "AMLearner", "BackpropLearner", "Update", "make_learner", "learner_from_state"]

STATE_VERSION = 1


@dataclass
class Update:
    """What one call to :meth:`Learner.learn` reports.

    ``loss`` is the mean loss on the minibatch *before* the update and ``outputs`` the
    network outputs (logits for classification) *before* the update, so a prequential
    (test-then-train) evaluation needs no second forward pass.
    """

    loss: float
    outputs: Tensor


class _Sign(torch.autograd.Function):
    """sign in the forward pass, straight-through estimator 1{|c| <= 1} in the backward."""

    @staticmethod
    def forward(ctx, c):  # type: ignore[override]
        ctx.save_for_backward(c)
        return torch.where(c >= 0, 1.0, -1.0).to(c.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (c,) = ctx.saved_tensors
        return grad * (c.abs() <= 1.0).to(grad.dtype)


def _activation_module_fn(name: str):
    if name == "sign":
        return _Sign.apply
    return F.ACTIVATIONS[name].fn


class MLP(nn.Module):
    """A stack of Linear layers with per-layer activations (the model of eq. (1))."""

    def __init__(self, arch: tuple[int, ...], activations: tuple[str, ...], bias: bool):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(i, o, bias=bias) for i, o in zip(arch[:-1], arch[1:]))
        self.activations = activations

    def forward(self, x: Tensor) -> Tensor:
        for layer, name in zip(self.layers[:-1], self.activations):
            x = _activation_module_fn(name)(layer(x))
        return self.layers[-1](x)

    def as_layers(self) -> list[F.Layer]:
        return [F.Layer(m.weight, m.bias) for m in self.layers]


class Learner(abc.ABC):
    """Common state and the public interface of every learner."""

    kind = "base"

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
        self.model = MLP(config.arch, config.activations, config.bias)
        self._init_weights()
        self.model.to(self.device)
        self._lr_factor = 1.0

    # -- the interface ------------------------------------------------------------
    @abc.abstractmethod
    def learn(self, x, y) -> Update:
        """Exactly one update on the minibatch (x [B, d], y [B] class ids or [B, m] targets)."""

    @torch.no_grad()
    def forward(self, x) -> Tensor:
        """Network outputs (logits for classification)."""
        return self.model(self._as_x(x))

    def predict_proba(self, x) -> Tensor:
        """Class probabilities [B, n_classes] (classification only)."""
        if self.config.loss != "ce":
            raise ConfigError("`predict_proba` needs a classifier (`loss='ce'`)")
        return torch.softmax(self.forward(x), dim=1)

    def predict(self, x) -> Tensor:
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
    def n_inputs(self) -> int:
        return self.config.arch[0]

    @property
    def n_outputs(self) -> int:
        return self.config.arch[-1]

    # -- state --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain dict of tensors and python values: safe for ``torch.load(weights_only=True)``."""
        return {
            "version": STATE_VERSION,
            "kind": self.kind,
            "config": self.config.to_dict(),
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optimizers": {k: opt.state_dict() for k, opt in self._optimizers().items()},
            "extra": self._extra_state(),
            "n_updates": self.n_updates,
            "n_samples": self.n_samples,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; the config must match this learner's."""
        version = state.get("version")
        if version != STATE_VERSION:
            raise CheckpointError(f"learner state version `{version}` is not supported (expected {STATE_VERSION})")
        if state.get("kind") != self.kind:
            raise CheckpointError(f"learner state is for a `{state.get('kind')}` learner, this is `{self.kind}`")
        saved = AMConfig.from_dict(state["config"])
        if saved != self.config:
            diff = [f.name for f in _fields(saved) if getattr(saved, f.name) != getattr(self.config, f.name)]
            raise CheckpointError(f"learner state does not match this learner's config (differs in {diff}); "
                                  "build the learner with `learner_from_state` instead")
        self.model.load_state_dict(state["model"])
        for name, opt in self._optimizers().items():
            opt.load_state_dict(state["optimizers"][name])
        self._load_extra_state(state.get("extra", {}))
        self.n_updates = int(state["n_updates"])
        self.n_samples = int(state["n_samples"])
        self.generator.set_state(state["generator"])
        self._on_counters_changed()

    # -- growth (used by the River estimators) -------------------------------------
    @torch.no_grad()
    def expand(self, *, n_inputs: int | None = None, n_outputs: int | None = None) -> None:
        """Grow the input layer (new features) and/or the output layer (new classes).

        New input columns start at zero, so existing predictions do not change; new output
        rows start at zero too. Optimizer moments and memories are padded with zeros.
        """
        arch = list(self.config.arch)
        if n_inputs is not None and n_inputs > arch[0]:
            self._grow(0, dim=1, new=n_inputs)
            arch[0] = n_inputs
        if n_outputs is not None and n_outputs > arch[-1]:
            self._grow(len(self.model.layers) - 1, dim=0, new=n_outputs)
            arch[-1] = n_outputs
        self.config = self.config.replace(arch=tuple(arch))

    def _grow(self, index: int, *, dim: int, new: int) -> None:
        layer = self.model.layers[index]
        params = [layer.weight] + ([layer.bias] if (layer.bias is not None and dim == 0) else [])
        for p in params:
            old = p.data
            pad_shape = list(old.shape)
            pad_shape[dim if p.dim() > 1 else 0] = new - old.shape[dim if p.dim() > 1 else 0]
            p.data = torch.cat([old, old.new_zeros(pad_shape)], dim=dim if p.dim() > 1 else 0)
            for opt in self._optimizers().values():
                st = opt.state.get(p)
                for key, val in list((st or {}).items()):
                    if torch.is_tensor(val) and val.shape == old.shape:
                        st[key] = torch.cat([val, val.new_zeros(pad_shape)], dim=dim if p.dim() > 1 else 0)
        if dim == 0:
            layer.out_features = new
        else:
            layer.in_features = new
        self._grow_extra(index, dim=dim, new=new)

    # -- helpers ------------------------------------------------------------------
    def _init_weights(self) -> None:
        """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases (PyTorch's Linear default)."""
        with torch.no_grad():
            for m in self.model.layers:
                k = 1.0 / math.sqrt(m.in_features)
                m.weight.copy_(torch.rand(m.weight.shape, generator=self.generator) * (2 * k) - k)
                if m.bias is not None:
                    m.bias.copy_(torch.rand(m.bias.shape, generator=self.generator) * (2 * k) - k)

    def _as_x(self, x) -> Tensor:
        x = torch.as_tensor(x, dtype=torch.float32, device=self.device)
        if x.dim() != 2 or x.shape[1] != self.n_inputs:
            raise ConfigError(f"inputs must have shape [batch, {self.n_inputs}], got `{list(x.shape)}`")
        return x

    def _as_xy(self, x, y) -> tuple[Tensor, Tensor]:
        x = self._as_x(x)
        if self.config.loss == "ce":
            y = torch.as_tensor(y, device=self.device).long().view(-1)
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.n_outputs):
                raise ConfigError(f"labels must be in [0, {self.n_outputs - 1}], got range "
                                  f"[{int(y.min())}, {int(y.max())}]")
        else:
            y = torch.as_tensor(y, dtype=torch.float32, device=self.device).view(x.shape[0], -1)
            if y.shape[1] != self.n_outputs:
                raise ConfigError(f"targets must have {self.n_outputs} columns, got {y.shape[1]}")
        if y.shape[0] != x.shape[0]:
            raise ConfigError(f"{x.shape[0]} inputs but {y.shape[0]} targets")
        return x, y

    def _set_lr(self) -> None:
        c = self.config
        factor = c.lr_decay ** (self.n_updates // c.lr_decay_every) if c.lr_decay_every else 1.0
        if factor != self._lr_factor:
            for opt in self._optimizers().values():
                for group in opt.param_groups:
                    group["lr"] = group["base_lr"] * factor
            self._lr_factor = factor

    def _on_counters_changed(self) -> None:
        self._lr_factor = float("nan")  # force _set_lr to re-apply
        self._set_lr()

    def _make_optimizer(self, params: list[Tensor], name: str, lr: float) -> torch.optim.Optimizer:
        c = self.config
        if name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=c.momentum)
        else:
            fused = self.device.type in ("cpu", "cuda")
            opt = torch.optim.Adam(params, lr=lr, betas=c.adam_betas, eps=c.adam_eps, fused=fused)
        for group in opt.param_groups:
            group["base_lr"] = lr
        return opt

    @abc.abstractmethod
    def _optimizers(self) -> dict[str, torch.optim.Optimizer]: ...

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        pass

    def _grow_extra(self, index: int, *, dim: int, new: int) -> None:
        pass

    def _count(self, n: int) -> None:
        self.n_updates += 1
        self.n_samples += n


def _fields(cfg: AMConfig) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cfg) if f.compare]


class AMLearner(Learner):
    """Online alternating minimization, Algorithm 2.1: AM-Adam or AM-mem (Mem = True).

    One :meth:`learn` call is one iteration of the while-loop of Algorithm 2.1 on a
    minibatch: encodeInput, updateCodes, updateWeights (see :mod:`amstream.functional`).
    The ``-off`` algos are the same update; the caller feeds the whole training set as
    one minibatch per iteration.
    """

    kind = "am"

    def __init__(self, config: AMConfig, *, device: str | torch.device = "cpu"):
        if not config.is_am:
            raise ConfigError(f"AMLearner needs an am-* algo, got `{config.algo}`")
        super().__init__(config, device=device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        layers = self.model.layers
        out_params = list(layers[-1].parameters())
        hidden_params = [p for m in layers[:-1] for p in m.parameters()]
        self.memories: list[tuple[Tensor, Tensor]] = []
        self.opt = None      # AM-Adam: hidden layers (and the output layer when it uses Adam)
        self.out_opt = None  # the output layer's own optimizer otherwise
        if config.uses_memory:
            for m in layers[:-1]:
                n_in = m.in_features + (1 if config.bias else 0)
                self.memories.append((torch.zeros(n_in, n_in, device=self.device),
                                      torch.zeros(m.out_features, n_in, device=self.device)))
        elif hidden_params:
            # one Adam per hidden layer, held as param groups of one optimizer: the same
            # arithmetic (Adam is elementwise, each layer sees only its own gradients) in a
            # single fused kernel call
            self.opt = self._make_optimizer(hidden_params, "adam", config.lr)
        if self.opt is not None and config.out_optimizer == "adam":
            self.opt.add_param_group({"params": out_params, "lr": config.lr_out, "base_lr": config.lr_out})
        else:
            self.out_opt = self._make_optimizer(out_params, config.out_optimizer, config.lr_out)

    def _optimizers(self):
        opts = {}
        if self.opt is not None:
            opts["adam"] = self.opt
        if self.out_opt is not None:
            opts["out"] = self.out_opt
        return opts

    @torch.no_grad()
    def learn(self, x, y) -> Update:
        x, y = self._as_xy(x, y)
        c = self.config
        self._set_lr()
        layers = self.model.as_layers()
        acts = c.activations
        mu = self.mu

        # Algorithm 2.1, line 3: encodeInput (forward pass; the codes are the pre-activations)
        enc = F.encode_input(x, layers, acts)
        loss_before, g_out = F.output_loss_grad(enc.out, y, c.loss)
        update = Update(float(loss_before.mean()), enc.out)
        if not enc.codes:  # no hidden layer: only the output layer learns
            self._step_output(x, y, layers[-1])
            self._count(x.shape[0])
            return update

        # line 4: updateCodes, top-down: problem (4) for c[L], problem (5) for l = L-1..1
        codes, acts_new, residuals = F.update_codes(
            enc, y, layers, acts, mu, c.loss, iters_top=c.code_iters_top, iters=c.code_iters,
            solver=c.code_solver, step=c.code_step, g_out_fwd=g_out)

        # line 5: updateWeights (Algorithm 2.3); layer inputs are the activations of the new codes
        a_in = [x] + acts_new
        if c.uses_memory:
            self._step_output(a_in[-1], y, layers[-1])                               # line 1
            for l, (A, B) in enumerate(self.memories):                               # lines 3-5
                F.update_memory(A, B, F.augment(a_in[l], c.bias), codes[l], c.mem_decay)
                self._fit_memory(self.model.layers[l], A, B)
        else:                                                                        # lines 1, 8-10
            residuals[0] = codes[0] - enc.codes[0]  # W[1] x + b[1] is the forward code
            for it in range(c.weight_iters):
                for l, layer in enumerate(layers[:-1]):
                    r = residuals[l] if it == 0 else F.lsq_residual(codes[l], a_in[l], layer)
                    layer.weight.grad, g_b = F.local_lsq_grad(a_in[l], r, mu, layer.bias is not None)
                    if layer.bias is not None:
                        layer.bias.grad = g_b
                self._output_grads(a_in[-1], y, layers[-1])
                self.opt.step()
                if self.out_opt is not None:
                    self.out_opt.step()
        self._count(x.shape[0])
        return update

    def _output_grads(self, a_top: Tensor, y: Tensor, out_layer: F.Layer) -> None:
        g_w, g_b, _ = F.output_grad(a_top, y, out_layer, self.config.loss)
        out_layer.weight.grad = g_w
        if out_layer.bias is not None:
            out_layer.bias.grad = g_b

    def _step_output(self, a_top: Tensor, y: Tensor, out_layer: F.Layer) -> None:
        """Algorithm 2.3, line 1: W[L+1] <- W[L+1] - eta grad L(y, sigma(c[L]), W[L+1])."""
        for _ in range(self.config.weight_iters):
            self._output_grads(a_top, y, out_layer)
            (self.out_opt or self.opt).step()

    def _fit_memory(self, layer: nn.Linear, A: Tensor, B: Tensor) -> None:
        """W[l] = argmin Tr(W^T W A) - 2 Tr(W^T B), approximately, by BCD (line 5)."""
        c = self.config
        if layer.bias is None:
            F.bcd(layer.weight, A, B, sweeps=c.mem_sweeps, block=c.mem_block, ridge=c.mem_ridge)
            return
        W = torch.cat([layer.weight, layer.bias.view(-1, 1)], dim=1)
        F.bcd(W, A, B, sweeps=c.mem_sweeps, block=c.mem_block, ridge=c.mem_ridge)
        layer.weight.copy_(W[:, :-1])
        layer.bias.copy_(W[:, -1])

    def _extra_state(self):
        return {"memories": [[A.clone(), B.clone()] for A, B in self.memories]}

    def _load_extra_state(self, extra):
        saved = extra.get("memories", [])
        if len(saved) != len(self.memories):
            raise CheckpointError(f"learner state has {len(saved)} memories, this learner {len(self.memories)}")
        for (A, B), (sA, sB) in zip(self.memories, saved):
            A.copy_(sA)
            B.copy_(sB)

    def _grow_extra(self, index, *, dim, new):
        if not self.memories or index >= len(self.memories) or dim != 1:
            return
        A, B = self.memories[index]
        n_old = A.shape[0] - (1 if self.config.bias else 0)
        add = new - n_old
        keep = slice(0, n_old)
        A2 = A.new_zeros(A.shape[0] + add, A.shape[0] + add)
        B2 = B.new_zeros(B.shape[0], B.shape[1] + add)
        A2[keep, keep] = A[keep, keep]
        B2[:, keep] = B[:, keep]
        if self.config.bias:  # the constant column stays last
            A2[-1, -1] = A[-1, -1]
            A2[-1, keep] = A[-1, keep]
            A2[keep, -1] = A[keep, -1]
            B2[:, -1] = B[:, -1]
        self.memories[index] = (A2, B2)

    def memory(self, layer: int) -> tuple[Tensor, Tensor]:
        """The co-activation memories (A, B) of hidden layer ``layer`` (0-based), AM-mem only."""
        return self.memories[layer]


class BackpropLearner(Learner):
    """The baselines: one SGD or Adam backprop step per minibatch (``ste``: Adam + STE)."""

    kind = "backprop"

    def __init__(self, config: AMConfig, *, device: str | torch.device = "cpu"):
        if config.is_am:
            raise ConfigError(f"BackpropLearner needs sgd, adam or ste, got `{config.algo}`")
        super().__init__(config, device=device)
        name = "sgd" if config.algo == "sgd" else "adam"
        self.opt = self._make_optimizer(list(self.model.parameters()), name, config.lr)

    def _optimizers(self):
        return {"opt": self.opt}

    def learn(self, x, y) -> Update:
        x, y = self._as_xy(x, y)
        self._set_lr()
        with torch.enable_grad():  # callers may hold torch.no_grad()
            out = self.model(x)
            if self.config.loss == "ce":
                loss = nn.functional.cross_entropy(out, y)
            else:
                loss = 0.5 * (out - y).pow(2).sum(1).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        self.opt.step()
        self._count(x.shape[0])
        return Update(float(loss.detach()), out.detach())


def make_learner(config: AMConfig | None = None, *, device: str | torch.device = "cpu", **kwargs: Any) -> Learner:
    """Build the learner for ``config.algo`` (keyword arguments build the config)."""
    if config is None:
        config = AMConfig(**kwargs)
    elif kwargs:
        config = config.replace(**kwargs)
    cls = AMLearner if config.is_am else BackpropLearner
    return cls(config, device=device)


def learner_from_state(state: dict[str, Any], *, device: str | torch.device = "cpu") -> Learner:
    """Rebuild a learner from :meth:`Learner.state_dict` output (config included)."""
    try:
        config = AMConfig.from_dict(state["config"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"learner state has no valid `config`: {exc}") from None
    learner = make_learner(config, device=device)
    learner.load_state_dict(state)
    return learner

