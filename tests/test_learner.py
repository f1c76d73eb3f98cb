"""Learners: they learn real data, resume bit-for-bit, grow, and refuse bad input."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from amstream import AMConfig, ConfigError, make_learner
from amstream.checkpoint import load_checkpoint, save_checkpoint
from amstream.datasets import load_dataset
from amstream.exceptions import CheckpointError
from amstream.learner import learner_from_state
from amstream.training import evaluate, fit


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _train(cfg, data, epochs):
    learner = make_learner(cfg)
    fit(learner, data.x_train, data.y_train, epochs=epochs, batch_size=32, seed=cfg.seed)
    return learner, evaluate(learner, data.x_test, data.y_test)["accuracy"]


@pytest.mark.parametrize("algo, minimum", [("am-adam", 0.85), ("am-mem", 0.80), ("adam", 0.85)])
def test_learns_digits_well_above_chance(digits, algo, minimum):
    cfg = AMConfig(arch=(64, 64, 64, 10), algo=algo, seed=0, mem_decay=0.95)
    _, acc = _train(cfg, digits, epochs=5)
    assert acc > minimum, acc  # chance is 0.1


@pytest.mark.parametrize("algo", ["am-adam-off", "am-mem-off"])
def test_offline_variants_learn(digits, algo):
    cfg = AMConfig(arch=(64, 64, 10), algo=algo, seed=0, weight_iters=5)
    _, acc = _train(cfg, digits, epochs=15)
    assert acc > 0.5, acc


def test_sign_net_trains(digits):
    """The paper's binary net: sign after hidden layer 1, tanh after layer 2."""
    cfg = AMConfig(arch=(64, 128, 64, 10), activation=("sign", "tanh"), algo="am-adam", seed=0)
    learner, acc = _train(cfg, digits, epochs=6)
    assert acc > 0.7, acc
    h = learner.model.layers[0](torch.as_tensor(digits.x_test[:50]))
    assert set(torch.where(h >= 0, 1.0, -1.0).unique().tolist()) <= {-1.0, 1.0}
    ste = AMConfig(arch=(64, 128, 64, 10), activation=("sign", "tanh"), algo="ste", seed=0, lr=1e-3)
    assert _train(ste, digits, epochs=6)[1] > 0.7


def test_regression_with_squared_loss():
    g = np.random.default_rng(0)
    x = g.normal(size=(2000, 5)).astype(np.float32)
    y = (np.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3]).astype(np.float32)
    learner = make_learner(AMConfig(arch=(5, 32, 32, 1), loss="mse", algo="am-adam", seed=0))
    before = evaluate(learner, x, y)["loss"]
    fit(learner, x, y, epochs=10, batch_size=50, seed=0)
    assert evaluate(learner, x, y)["loss"] < 0.3 * before


@pytest.mark.parametrize("algo", ["am-adam", "am-mem", "adam", "sgd"])
def test_state_round_trip_continues_bit_for_bit(digits, algo, tmp_path):
    cfg = AMConfig(arch=(64, 32, 32, 10), algo=algo, seed=3, lr_decay_every=7, mem_decay=0.9, mu_growth=1.01)
    x = torch.as_tensor(digits.x_train[:640])
    y = torch.as_tensor(digits.y_train[:640])
    a = make_learner(cfg)
    for i in range(5):
        a.learn(x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32])
    path = save_checkpoint(tmp_path / "s.ckpt", a.state_dict())
    b = learner_from_state(load_checkpoint(path)["state"])
    for i in range(5, 15):  # the next 10 updates
        ua = a.learn(x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32])
        ub = b.learn(x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32])
        assert ua.loss == ub.loss
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    for (A1, B1), (A2, B2) in zip(sa.get("memories", []), sb.get("memories", [])):
        assert torch.equal(A1, A2) and torch.equal(B1, B2)
    assert (a.n_updates, a.n_samples, a.mu) == (b.n_updates, b.n_samples, b.mu) == (15, 480, a.mu)


def test_load_state_refuses_another_config(digits):
    a = make_learner(AMConfig(arch=(64, 32, 10), seed=0))
    b = make_learner(AMConfig(arch=(64, 16, 10), seed=0))
    with pytest.raises(CheckpointError, match=re.escape("differs in ['arch']")):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("algo", ["am-adam", "am-mem", "adam"])
def test_expand_keeps_predictions_and_keeps_learning(digits, algo):
    learner = make_learner(AMConfig(arch=(60, 32, 8), algo=algo, seed=0))
    mask = digits.y_train < 8
    x, y = digits.x_train[mask][:400, :60], digits.y_train[mask][:400]
    for s in range(0, 400, 40):
        learner.learn(x[s:s + 40], y[s:s + 40])
    before = learner.forward(x[:50])
    learner.expand(n_inputs=64, n_outputs=10)
    assert learner.config.arch == (64, 32, 10)
    x64 = np.concatenate([x, np.zeros((len(x), 4), np.float32)], axis=1)
    torch.testing.assert_close(learner.forward(x64[:50])[:, :8], before)
    for s in range(0, 800, 40):
        learner.learn(digits.x_train[s:s + 40], digits.y_train[s:s + 40])
    assert evaluate(learner, digits.x_test, digits.y_test)["accuracy"] > 0.5
    learner_from_state(learner.state_dict())  # the grown state reloads


def test_bad_inputs_are_refused_with_clear_messages():
    learner = make_learner(AMConfig(arch=(4, 8, 3), seed=0))
    with pytest.raises(ConfigError, match=re.escape("inputs must have shape [batch, 4], got `[2, 5]`")):
        learner.learn(np.zeros((2, 5), np.float32), [0, 1])
    with pytest.raises(ConfigError, match=re.escape("labels must be in [0, 2], got range [0, 3]")):
        learner.learn(np.zeros((2, 4), np.float32), [0, 3])
    with pytest.raises(ConfigError, match=re.escape("`algo` must be one of")):
        AMConfig(algo="backprop")
    with pytest.raises(ConfigError, match=re.escape("`activation` must be one of")):
        AMConfig(activation="swish")
    with pytest.raises(ConfigError, match=re.escape("`mem_decay` must be in (0, 1], got `0`")):
        AMConfig(mem_decay=0)


def test_config_round_trips_through_dict():
    cfg = AMConfig(arch="784-500-500-10", activation=("sign", "tanh"), algo="am-mem", mu_max=float("inf"))
    assert AMConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.arch == (784, 500, 500, 10)


def test_mu_schedule_grows_to_its_cap():
    learner = make_learner(AMConfig(arch=(4, 3, 2), mu=0.01, mu_growth=2.0, mu_max=0.1, seed=0))
    x, y = np.zeros((2, 4), np.float32), [0, 1]
    seen = []
    for _ in range(6):
        seen.append(learner.mu)
        learner.learn(x, y)
    assert seen == pytest.approx([0.01, 0.02, 0.04, 0.08, 0.1, 0.1])


def test_lr_decay_schedule():
    learner = make_learner(AMConfig(arch=(4, 3, 2), lr=0.01, lr_out=0.02, lr_decay=0.5, lr_decay_every=2, seed=0))
    x, y = np.zeros((2, 4), np.float32), [0, 1]
    factors = []
    for _ in range(6):
        factors.append(learner.lr_factor)
        learner.learn(x, y)
    assert factors == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]  # update t runs with 0.5 ** (t // 2)




@pytest.mark.parametrize("algo", ["am-adam", "am-mem"])
@pytest.mark.parametrize("activation, arch, loss, extra", [
    ("relu", (7, 12, 3), "ce", {}),
    ("tanh", (5, 6, 4, 3), "ce", {"code_iters": 2, "code_iters_top": 2}),
    ("leaky_relu", (4, 5, 1), "mse", {"out_optimizer": "sgd"}),
    ("sigmoid", (6, 5, 2), "ce", {"weight_iters": 2, "lr_out": 0.01}),
    ("identity", (3, 4, 1), "mse", {"code_solver": "momentum", "code_step": 0.1}),
    (("sign", "relu"), (6, 8, 8, 3), "ce", {"mem_block": 3, "mem_sweeps": 2, "bias": False}),
])
@pytest.mark.parametrize("batch", [1, 5])
def test_numpy_and_torch_backends_take_the_same_update(algo, activation, arch, loss, extra, batch):
    """One algorithm, two backends: after the same updates, the same weights, optimizer
    moments and memories, up to float32 rounding (which the memories of a few samples, inverted
    at every update, amplify to ~1e-4)."""
    # mem_ridge 0.1 (as the River estimators): with plain 1e-4 the memories of a few samples are
    # so ill-conditioned that float32 rounding alone moves the solve by 1e-3
    cfg = AMConfig(arch=arch, activation=activation, algo=algo, loss=loss, seed=1, mem_decay=0.9,
                   mem_ridge=0.1, **extra)
    on_numpy, on_torch = make_learner(cfg, backend="numpy"), make_learner(cfg, backend="torch")
    rng = np.random.default_rng(0)
    for _ in range(6):
        x = rng.normal(size=(batch, arch[0])).astype(np.float32)
        y = rng.integers(0, arch[-1], batch) if loss == "ce" else rng.normal(size=(batch, 1)).astype(np.float32)
        u_np, u_t = on_numpy.learn(x, y), on_torch.learn(x, y)
        np.testing.assert_allclose(u_np.outputs, u_t.outputs, rtol=1e-3, atol=1e-4)
    a, b = on_numpy.state_dict(), on_torch.state_dict()
    for group in ("model", *a["optimizer"]):
        ga = a[group] if group == "model" else a["optimizer"][group]
        gb = b[group] if group == "model" else b["optimizer"][group]
        for k in ga:
            torch.testing.assert_close(ga[k], gb[k], rtol=1e-3, atol=1e-4, msg=f"{group} {k}")
    for (A, B), (A2, B2) in zip(a["memories"], b["memories"]):
        torch.testing.assert_close(A, A2, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(B, B2, rtol=1e-4, atol=1e-4)
    assert a["n_updates"] == b["n_updates"] == 6


def test_backend_choice():
    cfg = AMConfig(arch=(9, 32, 2), seed=0)
    assert make_learner(cfg).backend.name == "numpy"  # auto, on the CPU
    assert make_learner(cfg, backend="torch").backend.name == "torch"
    with pytest.raises(ConfigError, match=re.escape("`backend` must be `auto`, `numpy` or `torch`, got `jax`")):
        make_learner(cfg, backend="jax")


def test_large_numpy_updates_run_blas_on_torchs_thread_count(monkeypatch):
    """Above BLAS_THREADED_WORK the NumPy update holds OpenBLAS to torch's threads."""
    from threadpoolctl import threadpool_info

    import amstream.learner as L

    seen = []
    real = L.F.am_step

    def spy(*args, **kwargs):
        seen.append({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
        return real(*args, **kwargs)

    monkeypatch.setattr(L.F, "am_step", spy)
    learner = make_learner(AMConfig(arch=(784, 100, 10), seed=0))
    x = np.zeros((200, 784), np.float32)
    with L._blas_threads(2):
        outer = {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
        if outer == {torch.get_num_threads()}:
            pytest.skip(f"BLAS allows only {outer} threads here: nothing to tell apart")
        learner.learn(x, np.zeros(200, np.int64))  # 200 x 78,400 multiply-adds: limited
        learner.learn(x[:1], np.zeros(1, np.int64))  # 78,400: left alone
    assert seen == [{torch.get_num_threads()}, outer]


@pytest.mark.parametrize("name", ["am_adam", "am_adam_sgd_out", "am_mem"])
def test_states_of_amstream_0_1_load_and_continue(name):
    """tests/data/learner_state_v1.pt holds version-1 states (torch.optim's layout) written by
    amstream 0.1.0, with the weights that 0.1.0 reached one update later."""
    saved = torch.load("tests/data/learner_state_v1.pt", weights_only=True)[name]
    learner = learner_from_state(saved["state"])
    assert learner.state_dict()["version"] == 2
    learner.learn(saved["x"], saved["y"])
    for k, v in saved["after"].items():
        torch.testing.assert_close(learner.model.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu_closely(digits):
    cfg = AMConfig(arch=(64, 32, 32, 10), algo="am-adam", seed=0)
    cpu, gpu = make_learner(cfg), make_learner(cfg, device="cuda")
    for s in range(0, 320, 32):
        cpu.learn(digits.x_train[s:s + 32], digits.y_train[s:s + 32])
        gpu.learn(digits.x_train[s:s + 32], digits.y_train[s:s + 32])
    torch.testing.assert_close(gpu.forward(digits.x_test).cpu(), cpu.forward(digits.x_test), atol=1e-3, rtol=1e-3)
