"""Beyond MLPs: LeNet-5, Elman RNNs and the binary net learn real data through the one learner
interface, keep their state exactly, and run the same update on both backends."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from amstream import AMConfig, ConfigError, make_learner
from amstream.datasets import load_dataset
from amstream.learner import learner_from_state
from amstream.training import evaluate, fit


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist", limit=2000)


@pytest.mark.parametrize("algo, minimum", [("am-adam", 0.75), ("adam", 0.6)])
def test_lenet5_learns_an_mnist_slice(mnist, algo, minimum):
    learner = make_learner(AMConfig(arch="lenet5", algo=algo, seed=0, lr=1e-3 if algo == "adam" else 3e-3))
    assert learner.backend.name == "torch" if algo == "am-adam" else True
    fit(learner, mnist.x_train, mnist.y_train, epochs=2, batch_size=100, seed=0)
    acc = evaluate(learner, mnist.x_test[:1000], mnist.y_test[:1000])["accuracy"]
    assert acc > minimum, acc  # chance is 0.1


@pytest.mark.parametrize("algo", ["am-adam", "adam"])
def test_row_by_row_rnn_learns_an_mnist_slice(mnist, algo):
    learner = make_learner(AMConfig(arch="28x28-rnn32-10", algo=algo, seed=0, lr=3e-3 if algo == "am-adam" else 1e-2))
    fit(learner, mnist.x_train, mnist.y_train, epochs=3, batch_size=100, seed=0)
    acc = evaluate(learner, mnist.x_test[:1000], mnist.y_test[:1000])["accuracy"]
    assert acc > 0.25, acc


def test_pixel_by_pixel_rnn_takes_an_update(mnist):
    """Sequential MNIST's net (784 steps, 15 units): one update, outputs of the right shape."""
    learner = make_learner(AMConfig(arch="784-rnn15-10", seed=0))
    update = learner.learn(mnist.x_train[:64], mnist.y_train[:64])
    assert update.outputs.shape == (64, 10) and np.isfinite(update.loss)
    assert learner.forward(mnist.x_train[:3]).shape == (3, 10)


def test_rnn_update_is_the_same_on_both_backends():
    cfg = AMConfig(arch="12x3-rnn8-4", seed=2, code_iters=2)
    a, b = make_learner(cfg, backend="numpy"), make_learner(cfg, backend="torch")
    rng = np.random.default_rng(0)
    for _ in range(4):
        x = rng.normal(size=(16, 36)).astype(np.float32)
        y = rng.integers(0, 4, 16)
        np.testing.assert_allclose(a.learn(x, y).outputs, b.learn(x, y).outputs, rtol=1e-4, atol=1e-5)
    for k, v in a.state_dict()["model"].items():
        torch.testing.assert_close(v, b.state_dict()["model"][k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("arch, algo", [("lenet5", "am-adam"), ("12x3-rnn8-4", "am-adam"), ("lenet5", "sgd")])
def test_state_round_trip_continues_bit_for_bit(arch, algo):
    cfg = AMConfig(arch=arch, algo=algo, seed=1)
    rng = np.random.default_rng(1)
    x = rng.random((64, cfg.n_inputs), dtype=np.float32)
    y = rng.integers(0, cfg.n_outputs, 64)
    a = make_learner(cfg)
    a.learn(x[:32], y[:32])
    b = learner_from_state(a.state_dict())
    assert a.learn(x[32:], y[32:]).loss == b.learn(x[32:], y[32:]).loss
    for k, v in a.state_dict()["model"].items():
        assert torch.equal(v, b.state_dict()["model"][k]), k


def test_a_cnn_grows_its_outputs_but_not_its_inputs(mnist):
    learner = make_learner(AMConfig(arch="1x28x28-c4k5-pool2-8", seed=0))
    mask = mnist.y_train < 8
    learner.learn(mnist.x_train[mask][:100], mnist.y_train[mask][:100])
    before = learner.forward(mnist.x_test[:20])
    learner.expand(n_outputs=10)
    assert learner.config.arch_string() == "1x28x28-c4k5-pool2-10"
    np.testing.assert_allclose(learner.forward(mnist.x_test[:20])[:, :8], before, rtol=1e-6, atol=1e-6)
    learner.learn(mnist.x_train[:100], mnist.y_train[:100])  # all ten classes now
    with pytest.raises(ConfigError, match=re.escape("only an MLP's input layer can grow")):
        learner.expand(n_inputs=800)


def test_am_mem_needs_an_mlp():
    with pytest.raises(ConfigError, match=re.escape("`algo` `am-mem` needs a dense network (an MLP)")):
        AMConfig(arch="lenet5", algo="am-mem")
    with pytest.raises(ConfigError, match=re.escape("`backend` `numpy` has no convolutions")):
        make_learner(AMConfig(arch="lenet5"), backend="numpy")


def test_backprop_net_matches_the_am_forward_pass(mnist):
    """Net (the torch module) and functional.encode_input compute the same outputs."""
    for arch in ("lenet5", "28x28-rnn16-10"):
        learner = make_learner(AMConfig(arch=arch, seed=3))
        x = mnist.x_test[:8]
        via_module = learner.model(torch.from_numpy(x)).detach()
        via_views = learner.forward(x)
        np.testing.assert_allclose(via_module.numpy(), via_views, rtol=1e-5, atol=1e-6)
