"""`AMConfig`: every hyperparameter of a learner, in one frozen dataclass.

The same config drives the AM learners and the backprop baselines, so a benchmark
that changes only ``algo`` compares like with like.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from functools import lru_cache

from amstream.exceptions import ConfigError
from amstream.network import Network, parse_network

__all__ = ["AMConfig", "ALGOS", "ACTIVATION_NAMES", "parse_arch"]

#: Online AM, their offline (full-batch) variants, and backprop baselines.
ALGOS = ("am-adam", "am-mem", "am-adam-off", "am-mem-off", "sgd", "adam", "ste")
ACTIVATION_NAMES = ("relu", "leaky_relu", "tanh", "sigmoid", "identity", "sign")


def parse_arch(text: str | tuple[int, ...] | list[int]) -> tuple[int, ...] | str:
    """An MLP's sizes as a tuple (``"784-500-500-10"`` -> ``(784, 500, 500, 10)``); any other
    network (convolutions, an RNN, a named one such as ``lenet5``) as its spec string
    (:mod:`amstream.network`), checked."""
    if not isinstance(text, str):
        return tuple(int(s) for s in text)
    try:
        return tuple(int(s) for s in text.replace(",", "-").split("-") if s.strip())
    except ValueError:
        return _network(text).spec


@lru_cache(maxsize=64)
def _network(arch: str | tuple[int, ...]) -> Network:
    return parse_network(arch)


@dataclass(frozen=True)
class AMConfig:
    """Hyperparameters of one learner (AM or backprop).

    Parameters
    ----------
    arch
        An MLP's layer sizes, input first and output last: ``(784, 500, 500, 10)`` is two
        hidden layers of 500 (``"784-500-500-10"`` is accepted too); or a network spec with
        convolutions, pooling or an Elman RNN, e.g. ``"lenet5"`` or ``"784-rnn15-10"`` (see
        :mod:`amstream.network`).
    activation
        One name for every hidden layer, or one per hidden layer: relu, leaky_relu, tanh,
        sigmoid, identity, sign. (An RNN's are fixed: tanh states, a ReLU readout.) ``sign`` is not differentiable: the AM code update uses the
        straight-through derivative ``1{|c| <= 1}`` inside the code subproblems only (the
        forward pass, predictions and the weight fits use the true sign); backprop baselines
        use the same straight-through estimator.
    bias
        Linear layers with a bias. AM-mem handles it by augmenting activations with a 1.
    loss
        ``"ce"`` multinomial loss of eq. (2) (classification), ``"mse"`` squared loss
        ``0.5 * ||f(x) - y||^2`` (regression).
    algo
        am-adam, am-mem (online AM), am-adam-off, am-mem-off (the same updates, meant to be
        fed the whole training set as one minibatch), sgd, adam, ste (backprop baselines;
        ste is Adam backprop through sign activations with the straight-through estimator).
    mu, mu_growth, mu_max
        Penalty weight of eq. (3): ``mu_t = min(mu * mu_growth**t, mu_max)`` after t updates.
    code_iters_top, code_iters
        Inner iterations for the top code problem (4) and for each hidden code problem (5).
    code_solver
        ``"linesearch"``: steepest descent with a per-sample exact line search on the
        Gauss-Newton model of the problem (scale free, no step size to tune);
        ``"momentum"``: plain gradient steps with Nesterov momentum, as in the authors' code.
    code_step
        Damping of the linesearch step (1.0 = full step), or the learning rate of the
        momentum solver.
    lr
        Step of each hidden layer's Adam in AM-Adam, and of the backprop baselines.
    lr_out
        Step eta of the output layer (Algorithm 2.3, line 1).
    out_optimizer
        ``"adam"`` or ``"sgd"`` for the output layer of the AM learners.
    lr_decay, lr_decay_every
        Multiply every learning rate by ``lr_decay`` each ``lr_decay_every`` updates
        (0 disables).
    weight_iters
        Optimizer steps per minibatch on each layer-local weight problem (AM-Adam).
    momentum
        Momentum of plain SGD (the ``sgd`` baseline and an ``sgd`` output layer).
    mem_sweeps, mem_decay, mem_block, mem_ridge
        AM-mem: block-coordinate-descent sweeps per minibatch; forgetting factor gamma in
        ``A <- gamma * A + sum a a^T`` (1.0 = plain sums, as in the paper); columns per BCD
        block (1 = Mairal et al.'s column-by-column updates); ridge added to each diagonal
        block, relative to the mean diagonal of A.
    seed
        Seeds weight initialisation (and every later random draw of the learner).
    """

    arch: tuple[int, ...] = (784, 100, 100, 10)
    activation: str | tuple[str, ...] = "relu"
    bias: bool = True
    loss: str = "ce"
    algo: str = "am-adam"
    # quadratic penalty schedule
    mu: float = 1.0
    mu_growth: float = 1.0
    mu_max: float = math.inf
    # code subproblems (4)-(5)
    code_iters_top: int = 1
    code_iters: int = 1
    code_solver: str = "linesearch"
    code_step: float = 1.0
    # weight subproblems (6)-(7)
    lr: float = 3e-3
    lr_out: float = 3e-3
    out_optimizer: str = "adam"
    lr_decay: float = 0.5
    lr_decay_every: int = 0
    weight_iters: int = 1
    momentum: float = 0.9
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    # co-activation memory (AM-mem)
    mem_sweeps: int = 1
    mem_decay: float = 1.0
    mem_block: int = 64
    mem_ridge: float = 1e-4
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "arch", parse_arch(self.arch))
        if isinstance(self.activation, list):
            object.__setattr__(self, "activation", tuple(self.activation))
        object.__setattr__(self, "adam_betas", tuple(self.adam_betas))
        self.validate()

    # -- validation -------------------------------------------------------------
    def validate(self) -> None:
        if isinstance(self.arch, tuple) and (len(self.arch) < 2 or any(n < 1 for n in self.arch)):
            raise ConfigError(f"`arch` needs at least an input and an output size >= 1, got `{self.arch}`")
        network = self.network
        if self.uses_memory and not network.is_mlp:
            raise ConfigError(f"`algo` `{self.algo}` needs a dense network (an MLP); `arch` `{self.arch_string()}` "
                              "has convolutions or an RNN: use am-adam")
        if self.algo not in ALGOS:
            raise ConfigError(f"`algo` must be one of {', '.join(ALGOS)}; got `{self.algo}`")
        for name in self.activations:
            if name not in ACTIVATION_NAMES:
                raise ConfigError(f"`activation` must be one of {', '.join(ACTIVATION_NAMES)}; got `{name}`")
        if isinstance(self.activation, tuple) and len(self.activation) != self.n_hidden:
            raise ConfigError(
                f"`activation` lists {len(self.activation)} names for {self.n_hidden} hidden layers"
            )
        if self.loss not in ("ce", "mse"):
            raise ConfigError(f"`loss` must be `ce` or `mse`, got `{self.loss}`")
        if self.code_solver not in ("linesearch", "momentum"):
            raise ConfigError(f"`code_solver` must be `linesearch` or `momentum`, got `{self.code_solver}`")
        if self.out_optimizer not in ("adam", "sgd"):
            raise ConfigError(f"`out_optimizer` must be `adam` or `sgd`, got `{self.out_optimizer}`")
        positive = {"mu": self.mu, "lr": self.lr, "lr_out": self.lr_out, "code_step": self.code_step,
                    "mu_growth": self.mu_growth, "mu_max": self.mu_max, "lr_decay": self.lr_decay}
        for key, value in positive.items():
            if not value > 0:
                raise ConfigError(f"`{key}` must be > 0, got `{value}`")
        counts = {"code_iters_top": self.code_iters_top, "code_iters": self.code_iters,
                  "weight_iters": self.weight_iters, "mem_sweeps": self.mem_sweeps,
                  "mem_block": self.mem_block, "lr_decay_every": self.lr_decay_every}
        for key, value in counts.items():
            minimum = 0 if key in ("code_iters_top", "code_iters", "lr_decay_every") else 1
            if int(value) != value or value < minimum:
                raise ConfigError(f"`{key}` must be an integer >= {minimum}, got `{value}`")
        if not 0.0 < self.mem_decay <= 1.0:
            raise ConfigError(f"`mem_decay` must be in (0, 1], got `{self.mem_decay}`")
        if self.mem_ridge < 0:
            raise ConfigError(f"`mem_ridge` must be >= 0, got `{self.mem_ridge}`")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"`momentum` must be in [0, 1), got `{self.momentum}`")

    # -- derived ----------------------------------------------------------------
    @property
    def network(self) -> Network:
        """The parsed ``arch``: input shape and layers (:mod:`amstream.network`)."""
        return _network(self.arch)

    @property
    def n_inputs(self) -> int:
        return self.network.n_inputs

    @property
    def n_outputs(self) -> int:
        return self.network.n_outputs

    @property
    def n_hidden(self) -> int:
        """Hidden layers that take an ``activation``."""
        return self.network.n_activations

    @property
    def activations(self) -> tuple[str, ...]:
        if isinstance(self.activation, str):
            return (self.activation,) * self.n_hidden
        return tuple(self.activation)

    @property
    def is_am(self) -> bool:
        return self.algo.startswith("am-")

    @property
    def uses_memory(self) -> bool:
        return self.algo in ("am-mem", "am-mem-off")

    @property
    def is_offline(self) -> bool:
        return self.algo.endswith("-off")

    def arch_string(self) -> str:
        return self.network.spec

    def replace(self, **changes: Any) -> "AMConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain python values only (safe for `torch.load(weights_only=True)` and JSON)."""
        out = dataclasses.asdict(self)
        out["arch"] = list(self.arch) if isinstance(self.arch, tuple) else self.arch
        out["activation"] = self.activation if isinstance(self.activation, str) else list(self.activation)
        out["adam_betas"] = list(self.adam_betas)
        if math.isinf(out["mu_max"]):
            out["mu_max"] = "inf"
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(f'`{k}`' for k in unknown)}")
        data = dict(data)
        if data.get("mu_max") == "inf":
            data["mu_max"] = math.inf
        return cls(**data)
