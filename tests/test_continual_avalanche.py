"""The Avalanche adapter: AMStrategy end to end, checkpoints across experiences, benchmarks, CLI.

Small and seeded: MNIST subsets of a few hundred samples per class and small MLPs.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("avalanche")

from avalanche.core import SupervisedPlugin  # noqa: E402
from avalanche.training.plugins import EWCPlugin, ReplayPlugin  # noqa: E402

from amstream import AMConfig, make_learner  # noqa: E402
from amstream import avalanche as av  # noqa: E402
from amstream.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from amstream.continual import class_splits, evaluate_task, make_tasks  # noqa: E402
from amstream.exceptions import ConfigError  # noqa: E402
from amstream.learner import learner_from_state  # noqa: E402

TRAIN, TEST = 150, 40  # samples per class


@pytest.fixture(scope="module")
def split_tasks():
    return make_tasks("split-mnist", train_per_class=TRAIN, test_per_class=TEST, seed=0)


@pytest.fixture(scope="module")
def perm_tasks():
    return make_tasks("permuted-mnist", n_tasks=3, train_per_class=30, test_per_class=10, seed=0)


class LabelSpy(SupervisedPlugin):
    """Records the labels of every training minibatch, per experience."""

    def __init__(self):
        super().__init__()
        self.seen: dict[int, set[int]] = {}

    def after_training_iteration(self, strategy, **kwargs):
        exp = strategy.experience.current_experience
        self.seen.setdefault(exp, set()).update(strategy.mb_y.tolist())


# ----------------------------------------------------------------- benchmarks
def test_split_benchmark_class_and_task_incremental(split_tasks):
    bm = av.benchmark_from_tasks(split_tasks[:2])
    assert [e.classes_in_this_experience for e in bm.train_stream] == [[0, 1], [2, 3]]
    assert [len(e.dataset) for e in bm.train_stream] == [2 * TRAIN, 2 * TRAIN]
    x, y, t = bm.test_stream[1].dataset[0]
    assert int(y) in (2, 3) and int(t) == 0 and x.shape == (784,)

    bm_t = av.benchmark_from_tasks(split_tasks, task_labels=True)
    assert [e.task_labels for e in bm_t.train_stream] == [[0], [1], [2], [3], [4]]
    assert all(e.classes_in_this_experience == [0, 1] for e in bm_t.train_stream)
    assert av.task_classes_of(bm_t) == dict(enumerate(class_splits(10, 5)))
    # local label k of task t is the original class task_classes[t][k]
    ds = bm_t.train_stream[3].dataset
    ys = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
    original = torch.tensor(split_tasks[3].y_train)
    assert torch.equal(torch.tensor(split_tasks[3].classes)[ys].sort().values, original.sort().values)


def test_permuted_benchmark_keeps_labels_and_permutes_pixels(perm_tasks):
    bm = av.benchmark_from_tasks(perm_tasks)
    assert len(bm.train_stream) == 3
    for t, exp in enumerate(bm.train_stream):
        assert exp.classes_in_this_experience == list(range(10))  # not 10..19, 20..29
        ds = exp.dataset
        labels = sorted(int(ds[i][1]) for i in range(len(ds)))
        assert labels == sorted(perm_tasks[t].y_train.tolist())
    base = perm_tasks[0].x_test
    perm = np.random.RandomState(2).permutation(784)
    got = np.stack([bm.test_stream[2].dataset[i][0].numpy() for i in range(len(base))])
    want = base[:, perm]
    # same multiset of rows (Avalanche may reorder samples)
    assert sorted(map(bytes, got)) == sorted(map(bytes, want))


# ----------------------------------------------------------------- the strategy
def test_am_strategy_two_experiences_with_avalanche_metrics(split_tasks):
    bm = av.benchmark_from_tasks(split_tasks[:2])
    spy = LabelSpy()
    strategy = av.AMStrategy(learner=AMConfig(arch=(784, 64, 64, 10), algo="am-mem", seed=1),
                             train_mb_size=32, plugins=[spy, ReplayPlugin(mem_size=60)])
    rows, last = [], None
    for item in av.iter_experiences(strategy, bm):
        rows.append(item["accuracies"])
        last = item
    metrics = strategy.evaluator.get_last_metrics()
    for key in ("Top1_Acc_Stream/eval_phase/test_stream/Task000", "Loss_Stream/eval_phase/test_stream/Task000",
                "StreamForgetting/eval_phase/test_stream", "StreamBWT/eval_phase/test_stream",
                "Top1_Acc_Epoch/train_phase/train_stream/Task000"):
        assert key in metrics
    assert rows[0][0] > 0.6  # digits 0/1 are being learned (chance: 0.5)
    scores = av.summarize_rows(rows)
    assert scores["forgetting"] == pytest.approx(last["stream_forgetting"])
    assert scores["bwt"] == pytest.approx(last["stream_bwt"])
    pooled = (rows[-1][0] * 2 * TEST + rows[-1][1] * 2 * TEST) / (4 * TEST)
    assert last["stream_accuracy"] == pytest.approx(pooled)
    # the adapter's accuracies are the learner's own (oracle: the plain evaluation)
    for j, task in enumerate(split_tasks[:2]):
        assert rows[-1][j] == pytest.approx(evaluate_task(strategy.learner, task))
    # ReplayPlugin works: experience 1 also trains on stored digits 0/1
    assert spy.seen[0] == {0, 1} and spy.seen[1] == {0, 1, 2, 3}
    assert strategy.learner.n_samples > 2 * (2 * TRAIN)  # exp 1's minibatches carry replayed samples too
    # strategy.model evaluates with the learner's current weights
    x = torch.from_numpy(split_tasks[0].x_test[:5])
    assert torch.equal(strategy.model(x), strategy.learner.forward(x))


def test_task_aware_am_strategy_masks_to_the_task(split_tasks):
    bm = av.benchmark_from_tasks(split_tasks[:2], task_labels=True)
    strategy = av.AMStrategy(learner=AMConfig(arch=(784, 48, 10), algo="am-adam", seed=0), train_mb_size=32,
                             task_classes=av.task_classes_of(bm))
    rows = [item["accuracies"] for item in av.iter_experiences(strategy, bm)]
    for j, task in enumerate(split_tasks[:2]):
        assert rows[-1][j] == pytest.approx(evaluate_task(strategy.learner, task, task_aware=True))
    out = strategy.model(torch.from_numpy(split_tasks[1].x_test[:4]), torch.tensor([1, 1, 0, 1]))
    full = strategy.learner.forward(torch.from_numpy(split_tasks[1].x_test[:4]))
    assert out.shape == (4, 2)
    assert torch.equal(out[0], full[0, [2, 3]]) and torch.equal(out[2], full[2, [0, 1]])
    with pytest.raises(ConfigError, match="not all in `task_classes`"):
        strategy.model(torch.from_numpy(split_tasks[1].x_test[:1]), 7)


def _weights(learner):
    return [p.detach().clone() for p in learner.model.parameters()]


@pytest.mark.parametrize("algo", ["am-mem", "am-adam"])
def test_ewc_plugin_penalty_reaches_the_am_update(split_tasks, algo):
    """EWC's penalty is back-propagated and stepped after the AM update (penalty_lr); with
    penalty_lr 0 the run is the plain AM run, bit for bit."""
    bm = av.benchmark_from_tasks(split_tasks[:2])
    cfg = AMConfig(arch=(784, 32, 10), algo=algo, seed=2)
    runs = {}
    for name, plugins, lr in (("plain", [], 1e-3), ("ewc-off", [EWCPlugin(ewc_lambda=3000.0)], 0.0),
                              ("ewc", [EWCPlugin(ewc_lambda=3000.0)], 1e-3)):
        strategy = av.AMStrategy(learner=cfg, train_mb_size=32, plugins=plugins, penalty_lr=lr)
        strategy.train(bm.train_stream[0], eval_streams=[])
        after0 = _weights(strategy.learner)
        strategy.train(bm.train_stream[1], eval_streams=[])
        runs[name] = (after0, _weights(strategy.learner), plugins)
    # EWC's Fisher came from strategy.model's gradients: the learner's weights
    fisher = runs["ewc"][2][0].importances[0]
    assert sum(float(v.data.abs().sum()) for v in fisher.values()) > 0
    for a, b in zip(runs["plain"][1], runs["ewc-off"][1]):
        assert torch.equal(a, b)
    # the anchor holds the output layer (where EWC's Fisher is largest) nearer experience 0's weights
    drift = {k: sum(float((w1 - w0).pow(2).sum()) for w0, w1 in list(zip(*runs[k][:2]))[-2:])
             for k in ("plain", "ewc")}
    assert drift["ewc"] < drift["plain"]


def test_lwf_and_si_plugins_compose_with_am(split_tasks):
    from avalanche.training.plugins import LwFPlugin

    bm = av.benchmark_from_tasks(split_tasks[:2])
    weights = {}
    for name, plugins in (("plain", []), ("lwf", [LwFPlugin(alpha=1.0, temperature=2.0)]),
                          ("si", [av.FixedSynapticIntelligencePlugin(si_lambda=10.0)])):
        strategy = av.AMStrategy(learner=AMConfig(arch=(784, 32, 10), algo="am-adam", seed=0), train_mb_size=32,
                                 plugins=plugins)
        rows = [item["accuracies"] for item in av.iter_experiences(strategy, bm)]
        assert rows[0][0] > 0.6, name
        weights[name] = _weights(strategy.learner)
        assert all(torch.isfinite(w).all() for w in weights[name]), name
    # LwF's distillation penalty moved the weights; SI's importances come from .grad, which
    # holds only penalties under AM (zero in the first experience), so SI changes nothing
    assert not all(torch.equal(a, b) for a, b in zip(weights["plain"], weights["lwf"]))
    assert all(torch.equal(a, b) for a, b in zip(weights["plain"], weights["si"]))


@pytest.mark.parametrize("task_labels", [False, True])
def test_am_strategy_trains_in_the_continual_loops_order(split_tasks, task_labels):
    """Without replay AMStrategy sees iter_continual's minibatches: same weights, same matrix."""
    from amstream.continual import iter_continual

    tasks = split_tasks[:3]
    bm = av.benchmark_from_tasks(tasks, task_labels=task_labels)
    cfg = AMConfig(arch=(784, 32, 10), algo="am-mem", seed=4)
    strategy = av.AMStrategy(learner=cfg, train_mb_size=32, train_epochs=2,
                             task_classes=av.task_classes_of(bm) if task_labels else None)
    rows = [item["accuracies"] for item in av.iter_experiences(strategy, bm)]
    plain = make_learner(cfg)
    want = [item["accuracies"] for item in iter_continual(plain, tasks, batch_size=32, epochs=2, seed=4,
                                                          task_aware=task_labels)]
    assert rows == want
    for a, b in zip(_weights(strategy.learner), _weights(plain)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("algo", ["am-mem", "am-adam"])
def test_checkpoint_between_experiences_is_bit_exact(split_tasks, tmp_path, algo):
    bm = av.benchmark_from_tasks(split_tasks[:2])
    cfg = AMConfig(arch=(784, 40, 40, 10), algo=algo, mem_decay=0.9, seed=5)

    one = av.AMStrategy(learner=cfg, train_mb_size=32)
    rows_one = [item["accuracies"] for item in av.iter_experiences(one, bm)]

    first = av.AMStrategy(learner=cfg, train_mb_size=32)
    rows = [next(av.iter_experiences(first, bm))["accuracies"]]
    path = save_checkpoint(tmp_path / "exp0.ckpt", first.learner.state_dict(), metadata={"experiences": 1})
    del first
    torch.manual_seed(12345)  # as in a new process: other global RNG state must not matter
    learner = learner_from_state(load_checkpoint(path)["state"])
    second = av.AMStrategy(learner=learner, train_mb_size=32)
    rows += [item["accuracies"] for item in av.iter_experiences(second, bm, start=1)]

    assert rows == rows_one
    a, b = one.learner.state_dict(), second.learner.state_dict()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    mems_a, mems_b = a.get("memories", []), b.get("memories", [])
    assert len(mems_a) == len(mems_b) == (2 if algo == "am-mem" else 0)
    for (A1, B1), (A2, B2) in zip(mems_a, mems_b):
        assert torch.equal(A1, A2) and torch.equal(B1, B2)
    assert a["n_updates"] == b["n_updates"]


def test_training_leaves_the_global_rng_alone(split_tasks):
    bm = av.benchmark_from_tasks(split_tasks[:1])
    strategy = av.AMStrategy(learner=make_learner(AMConfig(arch=(784, 10), algo="am-adam")), train_mb_size=64)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    strategy.train(bm.train_stream[0], eval_streams=[])
    assert torch.equal(torch.get_rng_state(), before)


# ----------------------------------------------------------------- baselines
def test_fixed_si_learns_importances_where_avalanche_si_does_not(split_tasks):
    from avalanche.training.plugins import SynapticIntelligencePlugin

    bm = av.benchmark_from_tasks(split_tasks[:1])
    importances = {}
    for cls in (SynapticIntelligencePlugin, av.FixedSynapticIntelligencePlugin):
        plugin = cls(si_lambda=1.0)
        strategy = av.make_baseline("naive", arch=(784, 32, 10), train_mb_size=64, plugins=[plugin])
        strategy.train(bm.train_stream[0], eval_streams=[])
        importances[cls] = sum(float(p.data.abs().sum()) for p in plugin.ewc_data[1].values())
    assert importances[SynapticIntelligencePlugin] == 0.0  # the CPU bug of the notes
    assert importances[av.FixedSynapticIntelligencePlugin] > 0.0


def test_baselines_build_and_task_aware_uses_multihead():
    for name in av.BASELINES:
        strategy = av.make_baseline(name, arch=(784, 16, 10))
        assert strategy.train_mb_size == 128
    mh = av.make_baseline("naive", arch=(784, 16, 16, 10), task_aware=True)
    assert isinstance(mh.model, av.MultiHeadMLP)
    with pytest.raises(ConfigError, match="takes no hyperparameters"):
        av.make_baseline("naive", ewc_lambda=3.0)


# ----------------------------------------------------------------- CLI
def test_cli_json_checkpoint_and_resume(tmp_path, capsys):
    from amstream.cli import main

    common = ["continual", "--benchmark", "split-mnist", "--strategy", "am-mem", "--train-per-class", "60",
              "--test-per-class", "20", "--arch", "784-32-10", "--quiet", "--json", "--seed", "3"]
    ckpt = tmp_path / "run.ckpt"
    assert main(common + ["--experiences", "1", "--checkpoint", str(ckpt), "--plot", str(tmp_path / "a.png")]) == 0
    part = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert part["experiences_trained"] == 1 and len(part["accuracy_matrix"]) == 1
    assert main(["continual", "--resume", str(ckpt), "--experiences", "1", "--quiet", "--json",
                 "--plot", str(tmp_path / "b.png")]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(common + ["--experiences", "2", "--plot", "none"]) == 0
    whole = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("accuracy_matrix", "average_accuracy", "forgetting", "bwt", "strategy", "benchmark"):
        assert key in whole
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert resumed["average_accuracy"] == whole["average_accuracy"]
    assert whole["forgetting"] == pytest.approx(whole["avalanche_stream_forgetting"])
    assert (tmp_path / "b.png").stat().st_size > 1000
    assert main(["continual", "--resume", str(ckpt), "--strategy", "am-adam", "--quiet"]) == 1
    assert "the resumed run used `am-mem`" in capsys.readouterr().err


def test_cli_with_nothing_set_uses_amconfig_defaults_and_presets_are_named(capsys):
    from amstream.cli import main
    from amstream.commands.continual import _am_config, register  # noqa: F401
    from amstream.continual import PRESETS, preset_config

    assert preset_config("am-mem") == AMConfig(algo="am-mem")
    assert preset_config("am-mem", "permuted-mnist").mu == PRESETS["permuted-mnist"]["am-mem"]["mu"]
    with pytest.raises(ConfigError, match="`preset` must be one of"):
        preset_config("am-mem", "nope")
    with pytest.raises(SystemExit):
        main(["continual", "--help"])
    assert "--preset {permuted-mnist,replay}" in capsys.readouterr().out


@pytest.mark.kafka
@pytest.mark.slow
def test_cli_and_serve_give_the_same_matrix_on_the_same_sequence(tansu, tmp_path, capsys):
    """`amstream continual` (Avalanche) and `amstream serve` on the sequence `produce --benchmark`
    writes (the same tasks, the same training order): the same accuracy matrix."""
    from serve_child import Serve

    from amstream.cli import main
    from amstream.connectors.broker import EmbeddedBroker

    size = ["--train-per-class", "60", "--test-per-class", "30"]
    assert main(["continual", "--benchmark", "split-mnist", "--strategy", "am-mem", "--arch", "784-32-10",
                 "--batch-size", "32", "--seed", "0", *size, "--quiet", "--json", "--plot", "none"]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with EmbeddedBroker() as broker:
        servers = broker.bootstrap_servers
        assert main(["produce", "--benchmark", "split-mnist", "--topic", "tasks", "--bootstrap-servers", servers,
                     "--codec", "binary", *size, "--seed", "0", "--eval-file", str(tmp_path / "eval.npz"),
                     "--json"]) == 0
        capsys.readouterr()
        serve = Serve(["--topic", "tasks", "--bootstrap-servers", servers, "--group-id", "cli-vs-serve",
                       "--eval-source", str(tmp_path / "eval.npz"), "--idle-exit", "2", "--algo", "am-mem",
                       "--arch", "784-32-10", "--n-classes", "10", "--batch-size", "32", "--seed", "0",
                       "--log-every", "0", "--json"], tmp_path, "serve")
        assert serve.join(120) == 0, serve.log()[-3000:]
    lines = [json.loads(line) for line in serve.out.read_text().splitlines() if line.startswith("{")]
    served = lines[-1]["continual"]["matrix"]
    np.testing.assert_allclose(served, cli["accuracy_matrix"], atol=1e-6)
    assert cli["average_accuracy"] == pytest.approx(np.mean(served[-1]), abs=1e-6)
