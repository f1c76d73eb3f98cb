"""Layers and network specs: the linearizations and adjoints the code problems use, against
autograd, and the arch grammar."""
from __future__ import annotations

import re

import pytest
import torch

from amstream.exceptions import ConfigError
from amstream.layers import Conv, Dense
from amstream.network import parse_network


def _layers():
    g = torch.Generator().manual_seed(0)
    conv = Conv(torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64),
                torch.randn(5, generator=g, dtype=torch.float64), stride=1, padding=1, pool=2)
    strided = Conv(torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64), None, stride=2, padding=0)
    dense = Dense(torch.randn(7, 3 * 4 * 4, generator=g, dtype=torch.float64),
                  torch.randn(7, generator=g, dtype=torch.float64), pool=2, flatten=True)
    a = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    return a, {"conv+pool": conv, "strided conv": strided, "pool+flatten+dense": dense}


@pytest.mark.parametrize("name", ["conv+pool", "strided conv", "pool+flatten+dense"])
def test_linearization_and_adjoint_match_autograd(name):
    a, layers = _layers()
    layer = layers[name]
    g = torch.Generator().manual_seed(1)
    v = torch.randn(a.shape, generator=g, dtype=torch.float64)
    out = layer.forward(a)
    r = torch.randn(out.shape, generator=g, dtype=torch.float64)
    # forward-mode: the change of the output along v (max-pooling's selection fixed at a)
    _, jvp = torch.func.jvp(layer.forward, (a,), (v,))
    torch.testing.assert_close(layer.at(a).apply(v), jvp)
    # reverse-mode: r carried back to the input
    a_req = a.clone().requires_grad_(True)
    (vjp,) = torch.autograd.grad((layer.forward(a_req) * r).sum(), a_req)
    torch.testing.assert_close(layer.at(a).adjoint(r), vjp)


@pytest.mark.parametrize("name", ["conv+pool", "strided conv", "pool+flatten+dense"])
def test_weight_gradient_matches_autograd(name):
    a, layers = _layers()
    layer = layers[name]
    r = torch.randn(layer.forward(a).shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    W = layer.weight.clone().requires_grad_(True)
    b = None if layer.bias is None else layer.bias.clone().requires_grad_(True)
    ((layer._replace(weight=W, bias=b).forward(a) * r).sum()).backward()
    grad = layer._replace(weight=torch.empty_like(W), bias=None if b is None else torch.empty_like(b))
    layer.grad_into(a, r, grad)
    torch.testing.assert_close(grad.weight, W.grad)
    if b is not None:
        torch.testing.assert_close(grad.bias, b.grad)


def test_lenet5_spec():
    net = parse_network("lenet5")
    assert net.input_shape == (1, 28, 28) and net.n_inputs == 784 and net.n_outputs == 10
    assert [(s.kind, s.in_shape, s.out_shape, s.pool, s.flatten) for s in net.layers] == [
        ("conv", (1, 28, 28), (6, 28, 28), 0, False),
        ("conv", (6, 14, 14), (16, 10, 10), 2, False),
        ("dense", (16, 5, 5), (120,), 2, True),
        ("dense", (120,), (84,), 0, False),
        ("dense", (84,), (10,), 0, False),
    ]
    assert sum(torch.Size(shape).numel() for s in net.layers for _, shape in s.param_shapes(True)) == 61_706


def test_rnn_spec():
    net = parse_network("784-rnn15-10")
    assert net.is_rnn and net.layers[0].steps == 784 and net.layers[0].in_shape == (784, 1)
    assert parse_network("28x28-rnn50-10").layers[0].param_shapes(True) == [
        ("weight_ih", (50, 28)), ("weight_hh", (50, 50)), ("bias", (50,))]


@pytest.mark.parametrize("spec, message", [
    ("784-c6k5-10", "a convolution needs an image input (C x H x W) before it"),
    ("1x28x28-c6k5-pool2", "must end with a dense output layer"),
    ("1x4x4-c2k5-10", "kernel 5 does not fit a 4 x 4 input"),
    ("784-100-rnn15-10", "an rnn layer must come first"),
    ("784-rnn15-32-10", "an rnn layer is read out by the output layer directly"),
    ("784-x7-10", "not a layer (N, cCkK[sS][pP], poolK or rnnH)"),
    ("banana", "`arch` must look like"),
])
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_network(spec)
