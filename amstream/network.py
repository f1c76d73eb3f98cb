"""Network descriptions: which layers, of which shapes, from an ``arch`` spec.

A spec is a string of ``-``-separated tokens (or, for an MLP, a tuple of sizes)::

    784-500-500-10                          an MLP: input features, hidden widths, outputs
    1x28x28-c6k5p2-pool2-c16k5-pool2-120-84-10   LeNet-5 (``lenet5`` names it)
    784-rnn15-10                            an Elman RNN with 15 tanh units read out by ReLU,
                                            over the 784 inputs as 784 steps of one feature
    28x28-rnn50-10                          ... over 28 steps of 28 features

Tokens after the input:

- ``N``: a dense layer of N units (the last one is the output layer);
- ``c{C}k{K}[s{S}][p{P}]``: a 2-D convolution to C channels, K x K kernel, stride S (1),
  zero padding P (0);
- ``pool{K}``: K x K max-pooling (stride K) of the activations before the next layer;
- ``rnn{H}``: an Elman RNN, ``c_t = W_ih x_t + W_hh tanh(c_{t-1}) + b``, first after the input.

The input is ``N`` features, ``T x D`` (a sequence, for an RNN) or ``C x H x W`` (an image).
Every code layer - dense, convolution, each RNN step - has a code: its output before the
activation (Section 2 of the paper; for a CNN the codes are feature maps). Pooling and
flattening belong to the *input map* of the next layer.

This module only describes: :mod:`amstream.functional` runs the algorithm on the layers,
:mod:`amstream.learner` owns their parameters.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from math import prod
from typing import Sequence

from amstream.exceptions import ConfigError

__all__ = ["NAMED", "LayerSpec", "Network", "parse_network"]

#: architectures known by name
NAMED = {"lenet5": "1x28x28-c6k5p2-pool2-c16k5-pool2-120-84-10"}

_CONV = re.compile(r"^c(\d+)k(\d+)(?:s(\d+))?(?:p(\d+))?$")
_POOL = re.compile(r"^pool(\d+)$")
_RNN = re.compile(r"^rnn(\d+)$")
_SHAPE = re.compile(r"^\d+(x\d+){0,2}$")


@dataclass(frozen=True)
class LayerSpec:
    """One layer with parameters: a code layer, or the output layer (the last one)."""

    kind: str  # "dense", "conv" or "rnn"
    in_shape: tuple[int, ...]  # per-sample shape the layer reads, after its input map
    out_shape: tuple[int, ...]  # per-sample shape of its code (or output)
    pool: int = 0  # max-pool K x K of the incoming activations first (0: none)
    flatten: bool = False  # reshape the incoming activations to [B, -1] first
    kernel: int = 0
    stride: int = 1
    padding: int = 0
    steps: int = 0  # rnn: time steps

    def param_shapes(self, bias: bool) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of the layer's parameters, in the order the learner stores them."""
        if self.kind == "rnn":
            d, h = self.in_shape[-1], self.out_shape[-1]
            return [("weight_ih", (h, d)), ("weight_hh", (h, h))] + ([("bias", (h,))] if bias else [])
        if self.kind == "conv":
            shape = (self.out_shape[0], self.in_shape[0], self.kernel, self.kernel)
        else:
            shape = (self.out_shape[0], prod(self.in_shape))
        return [("weight", shape)] + ([("bias", (shape[0],))] if bias else [])

    @property
    def plain(self) -> bool:
        """A dense layer with no input map: ``c = W a + b`` on [B, n] activations."""
        return self.kind == "dense" and not self.pool and not self.flatten


@dataclass(frozen=True)
class Network:
    """A parsed ``arch``: the input shape and the layers with parameters."""

    spec: str
    input_shape: tuple[int, ...]
    layers: tuple[LayerSpec, ...]

    @property
    def n_inputs(self) -> int:
        return prod(self.input_shape)

    @property
    def n_outputs(self) -> int:
        return self.layers[-1].out_shape[0]

    @property
    def is_mlp(self) -> bool:
        return all(layer.plain for layer in self.layers)

    @property
    def is_rnn(self) -> bool:
        return self.layers[0].kind == "rnn"

    @property
    def n_activations(self) -> int:
        """Hidden layers that take the ``activation`` setting (an RNN's own are fixed)."""
        return len(self.layers) - 1 - (1 if self.is_rnn else 0)


def _shape(token: str) -> tuple[int, ...]:
    return tuple(int(v) for v in token.split("x"))


def parse_network(arch: str | Sequence[int]) -> Network:
    """Parse an ``arch`` spec (see the module docstring); ConfigError says what is wrong."""
    if not isinstance(arch, str):
        sizes = tuple(int(s) for s in arch)
        text = "-".join(map(str, sizes))
    else:
        text = NAMED.get(arch.strip().lower(), arch.strip()).replace(",", "-")
    tokens = [t.strip().lower() for t in text.split("-") if t.strip()]
    if len(tokens) < 2 or not _SHAPE.match(tokens[0]):
        raise ConfigError(f"`arch` must look like `784-500-500-10`, `1x28x28-c6k5-pool2-10`, "
                          f"`784-rnn15-10` or be one of {sorted(NAMED)}; got `{arch}`")
    shape = _shape(tokens[0])
    if any(v < 1 for v in shape):
        raise ConfigError(f"`arch` sizes must be >= 1, got `{arch}`")
    layers: list[LayerSpec] = []
    pool = 0
    for i, token in enumerate(tokens[1:], start=1):
        where = f"`arch` `{text}`, token {i} `{token}`"
        if token.isdigit():
            n = int(token)
            if n < 1:
                raise ConfigError(f"{where}: a layer needs at least 1 unit")
            in_shape = _pooled(shape, pool, where)
            layers.append(LayerSpec("dense", in_shape, (n,), pool=pool, flatten=len(in_shape) > 1))
            shape, pool = (n,), 0
        elif m := _CONV.match(token):
            c_out, k, s, p = int(m[1]), int(m[2]), int(m[3] or 1), int(m[4] or 0)
            if len(shape) != 3:
                raise ConfigError(f"{where}: a convolution needs an image input (C x H x W) before it")
            c, h, w = _pooled(shape, pool, where)
            out = (c_out, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)
            if min(out) < 1 or c_out < 1 or k < 1:
                raise ConfigError(f"{where}: kernel {k} does not fit a {h} x {w} input")
            layers.append(LayerSpec("conv", (c, h, w), out, pool=pool, kernel=k, stride=s, padding=p))
            shape, pool = out, 0
        elif m := _POOL.match(token):
            if len(shape) != 3 or pool:
                raise ConfigError(f"{where}: pooling needs a convolution's feature maps before it")
            pool = int(m[1])
            _pooled(shape, pool, where)
        elif m := _RNN.match(token):
            if layers:
                raise ConfigError(f"{where}: an rnn layer must come first, right after the input")
            if len(shape) == 1:
                shape = (shape[0], 1)  # N inputs: N steps of one feature
            if len(shape) != 2:
                raise ConfigError(f"{where}: an rnn reads a sequence input (N, or steps x features)")
            hidden = int(m[1])
            layers.append(LayerSpec("rnn", shape, (hidden,), steps=shape[0]))
            shape = (hidden,)
        else:
            raise ConfigError(f"{where}: not a layer (N, cCkK[sS][pP], poolK or rnnH)")
    if pool or layers[-1].kind != "dense" or len(layers) < 2 and layers[0].kind == "rnn":
        raise ConfigError(f"`arch` `{text}` must end with a dense output layer")
    if layers[0].kind == "rnn" and len(layers) != 2:
        raise ConfigError(f"`arch` `{text}`: an rnn layer is read out by the output layer directly "
                          "(`784-rnn15-10`)")
    return Network(text, _shape(tokens[0]), tuple(layers))


def _pooled(shape: tuple[int, ...], pool: int, where: str) -> tuple[int, ...]:
    if not pool:
        return shape
    c, h, w = shape
    if h < pool or w < pool:
        raise ConfigError(f"{where}: pooling {pool} x {pool} does not fit {h} x {w} feature maps")
    return (c, h // pool, w // pool)
