"""Behaviour of the River estimators (amstream.river) beyond river.checks."""
from __future__ import annotations

import doctest
import io
import math
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("river")

import pandas as pd
import torch
from river import datasets, dummy, evaluate, metrics, preprocessing, stats

import amstream.river
from amstream.exceptions import CheckpointError, ConfigError
from amstream.river import AMClassifier, AMRegressor


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_mem_decay_reaches_the_learner():
    model = AMClassifier(algo="am-mem", mem_decay=0.5, batch_size=1, seed=0)
    model.learn_one({"a": 1.0}, True)
    assert model.learner.config.mem_decay == 0.5
    assert model.learner.config.algo == "am-mem"


def _phishing(n=None):
    return list(datasets.Phishing().take(n)) if n else list(datasets.Phishing())


def test_import_amstream_does_not_import_river():
    code = "import sys, amstream; assert 'river' not in sys.modules, 'river imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_doctests():
    result = doctest.testmod(amstream.river, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


def test_new_features_grow_the_input_layer_without_changing_predictions():
    model = AMClassifier(batch_size=4, warmup=0, seed=0)
    for x, y in _phishing(4):
        model.learn_one({"a": x["long_url"]}, y)
    assert model.n_updates == 1 and model.learner.n_inputs == 1
    before = model.predict_proba_one({"a": 1.0})
    model.learn_one({"a": 1.0, "new": 3.0}, True)  # buffered: no update yet, but the layer grows
    assert model.feature_names == ["a", "new"]
    assert model.learner.n_inputs == 2 and model.n_updates == 1
    assert model.predict_proba_one({"a": 1.0, "new": 5.0}) == pytest.approx(before, rel=1e-12)
    # a missing feature counts as 0, and a feature never learned from is ignored
    assert model.predict_proba_one({"a": 1.0}) == model.predict_proba_one({"a": 1.0, "new": 0.0})
    assert model.predict_proba_one({"a": 1.0, "unseen": 9.0}) == model.predict_proba_one({"a": 1.0})


def test_features_in_any_order_map_to_the_same_columns():
    a, b = AMClassifier(batch_size=2, seed=3), AMClassifier(batch_size=2, seed=3)
    for x, y in _phishing(40):
        a.learn_one(x, y)
        b.learn_one(dict(reversed(list(x.items()))), y)
    assert a.feature_names == b.feature_names == sorted(a.feature_names)
    x = _phishing(41)[-1][0]
    assert a.predict_proba_one(x) == pytest.approx(b.predict_proba_one(x), rel=1e-9)


def test_new_labels_of_any_type_grow_the_output_layer():
    model = AMClassifier(batch_size=1, seed=0)
    stream = [({"u": 1.0}, "cat"), ({"u": -1.0}, 7), ({"u": 0.5}, ("a", 1)), ({"u": 2.0}, None)]
    for i, (x, y) in enumerate(stream, start=1):
        model.learn_one(x, y)
        assert model.learner.n_outputs == i
        proba = model.predict_proba_one({"u": 0.1})
        assert list(proba) == model.classes == [y for _, y in stream[:i]]
        assert math.isclose(sum(proba.values()), 1.0)
    assert model.predict_one({"u": 0.1}) in model.classes


def test_before_any_update():
    model = AMClassifier(batch_size=8, warmup=0)
    assert model.predict_proba_one({"a": 1.0}) == {}
    assert model.predict_one({"a": 1.0}) is None
    model.learn_one({"a": 1.0}, "x")
    model.learn_one({"a": 2.0}, "y")
    assert model.learner is None  # still buffering
    assert model.predict_proba_one({"a": 1.0}) == {"x": 0.5, "y": 0.5}
    assert AMRegressor().predict_one({"a": 1.0}) == 0.0


def test_warmup_doubles_the_batch_size_up_to_batch_size():
    model = AMClassifier(batch_size=8, warmup=2, seed=0)
    points = []
    for i, (x, y) in enumerate(_phishing(60), start=1):
        before = model.n_updates
        model.learn_one(x, y)
        if model.n_updates > before:
            points.append(i)
    # 2 updates each at batch size 1, 2, 4, then batch size 8
    assert points == [1, 2, 4, 6, 10, 14, 22, 30, 38, 46, 54]
    every = AMClassifier(batch_size=1, seed=0)
    for x, y in _phishing(10):
        every.learn_one(x, y)
    assert every.n_updates == 10


@pytest.mark.parametrize("algo", ["am-adam", "am-mem"])
@pytest.mark.parametrize("batch_size, warmup", [(1, 0), (7, 1)])
def test_learn_many_equals_learn_one_with_missing_values(algo, batch_size, warmup):
    rows = _phishing(45)
    dicts = []
    for i, (x, _) in enumerate(rows):  # features come and go; a late one emerges mid-batch
        x = {k: v for j, (k, v) in enumerate(x.items()) if (i + j) % 4}
        if i >= 20:
            x["late"] = float(i % 3)
        dicts.append(x)
    labels = [y for _, y in rows]
    one = AMClassifier(algo=algo, batch_size=batch_size, warmup=warmup, hidden_sizes=(8,), seed=5)
    many = one.clone()
    for x, y in zip(dicts, labels):
        one.learn_one(x, y)
    for lo, hi in [(0, 9), (9, 10), (10, 31), (31, 45)]:
        many.learn_many(pd.DataFrame(dicts[lo:hi]), pd.Series(labels[lo:hi]))
    assert one.feature_names == many.feature_names
    assert one.n_updates == many.n_updates
    X = pd.DataFrame(dicts)
    np.testing.assert_allclose(one.predict_proba_many(X).to_numpy(), many.predict_proba_many(X).to_numpy(),
                               rtol=1e-6)


def test_many_matches_one():
    model = AMClassifier(batch_size=4, warmup=0, seed=0)
    rows = _phishing(60)
    for x, y in rows[:40]:
        model.learn_one(x, y)
    X = pd.DataFrame([x for x, _ in rows[40:]])
    proba = model.predict_proba_many(X)
    assert list(model.predict_many(X)) == [model.predict_one(x) for x, _ in rows[40:]]
    for i, (x, _) in enumerate(rows[40:]):
        one = model.predict_proba_one(x)
        assert one == pytest.approx(proba.iloc[i].to_dict(), rel=1e-9)
        assert max(one, key=one.get) == model.predict_one(x)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh", "sigmoid", "identity", "sign"])
def test_numpy_forward_matches_the_learner(activation):
    model = AMRegressor(hidden_sizes=(6, 5), activation=activation, batch_size=2, warmup=0, seed=1)
    rng = np.random.default_rng(0)
    for _ in range(6):
        model.learn_one(dict(zip("abc", rng.normal(size=3).tolist())), float(rng.normal()))
    X = rng.normal(size=(16, 3))
    ours = model.predict_many(pd.DataFrame(X, columns=list("abc"))).to_numpy()
    theirs = model.learner.forward(torch.as_tensor(X, dtype=torch.float32))[:, 0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("algo", ["am-adam", "am-mem"])
def test_pipeline_learns_phishing_well_above_chance(algo):
    model = preprocessing.StandardScaler() | AMClassifier(algo=algo, seed=0)
    metric = evaluate.progressive_val_score(datasets.Phishing(), model, metrics.Accuracy())
    assert metric.get() > 0.85  # chance is ~0.55
    assert model["AMClassifier"].learner.config.algo == algo


def test_regressor_beats_the_mean_on_trump_approval():
    def mae(model):
        return evaluate.progressive_val_score(datasets.TrumpApproval(), model, metrics.MAE()).get()

    ours = mae(preprocessing.StandardScaler()
               | preprocessing.TargetStandardScaler(AMRegressor(seed=0)))
    baseline = mae(dummy.StatisticRegressor(stats.Mean()))
    assert ours < 0.75 * baseline


@pytest.mark.parametrize("cls", [AMClassifier, AMRegressor])
def test_pickle_and_state_dict_continue_bit_for_bit(cls):
    rows = list(datasets.Phishing().take(50))
    if cls is AMRegressor:
        rows = [(x, float(y)) for x, y in rows]
    model = cls(batch_size=8, warmup=1, seed=0)
    for x, y in rows[:27]:  # leaves samples in the buffer
        model.learn_one(x, y)
    copied = pickle.loads(pickle.dumps(model))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    restored = cls(batch_size=8, warmup=1, seed=0)
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    for x, y in rows[27:]:
        for m in (model, copied, restored):
            m.learn_one(x, y)
    x = rows[0][0]
    assert copied.predict_one(x) == model.predict_one(x) == restored.predict_one(x)
    assert copied.n_updates == restored.n_updates == model.n_updates


def test_state_dict_refuses_other_parameters():
    model = AMClassifier(batch_size=1, seed=0)
    model.learn_one({"a": 1.0}, True)
    with pytest.raises(CheckpointError, match="other parameters"):
        AMClassifier(batch_size=1, seed=0, lr=0.5).load_state_dict(model.state_dict())


def test_pickles_are_stable():
    model = AMClassifier(batch_size=2, seed=0)
    for x, y in _phishing(5):
        model.learn_one(x, y)
    assert pickle.dumps(model) == pickle.dumps(model)


def test_parameters_are_validated():
    with pytest.raises(ConfigError, match=re.escape("`batch_size` must be an integer >= 1, got `0`")):
        AMClassifier(batch_size=0)
    with pytest.raises(ConfigError, match=re.escape("`config` may not set `lr`")):
        AMClassifier(config={"lr": 0.1})
    with pytest.raises(ConfigError, match=re.escape("`algo` must be `am-adam` or `am-mem`, got `'adam'`")):
        AMRegressor(algo="adam")
    AMClassifier(config={"code_iters": 2, "weight_iters": 2})  # other AMConfig fields pass through


def test_non_numeric_features_are_refused():
    model = AMClassifier(batch_size=1, seed=0)
    with pytest.raises(TypeError, match=re.escape("features must be numbers")):
        model.learn_one({"a": 1.0, "colour": "red"}, True)


def _engine_pair(algo, activation, arch, loss, rng):
    """Two copies of one AM learner, warmed up by the engine on minibatches of 8."""
    import copy

    from amstream import AMConfig, make_learner

    cfg = AMConfig(arch=arch, activation=activation, algo=algo, loss=loss, lr=0.01, lr_out=0.02,
                   mem_decay=0.9, mem_ridge=0.1, seed=3)
    learner = make_learner(cfg)
    for _ in range(20):
        x, y = _random_batch(8, arch, loss, rng)
        learner.learn(torch.from_numpy(x), torch.from_numpy(y))
    return learner, copy.deepcopy(learner)


def _random_batch(n, arch, loss, rng):
    x = rng.normal(size=(n, arch[0])).astype(np.float32)
    y = rng.integers(0, arch[-1], n) if loss == "ce" else rng.normal(size=(n, 1)).astype(np.float32)
    return x, y


def test_vanishing_inputs_leave_no_subnormal_numbers():
    # a feature that is 1 on the first samples and 0 afterwards: its Adam moments and memory
    # entries decay geometrically, and would reach float32's slow subnormal range
    for algo in ("am-adam", "am-mem"):
        model = AMClassifier(algo=algo, seed=0)
        for i, (x, y) in enumerate(_phishing(1000)):
            model.learn_one({**x, "early": 1.0 if i < 20 else 0.0}, y)
        state = model.learner.state_dict()
        arrays = [t.numpy() for per_name in state["optimizer"].values() for t in per_name.values()]
        arrays += [m.numpy() for pair in state["memories"] for m in pair]
        tiny = np.finfo(np.float32).tiny
        assert not any(((a != 0) & (np.abs(a) < tiny)).any() for a in arrays)
