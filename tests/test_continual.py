"""Task sequences, scores and the plain continual loop (`amstream.continual`): no Avalanche here."""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from amstream import AMConfig, make_learner
from amstream.continual import (
    BENCHMARKS,
    class_splits,
    evaluate_task,
    iter_continual,
    make_tasks,
    permuted_tasks,
    split_tasks,
    subsample_per_class,
    summarize,
    task_permutation,
)
from amstream.datasets import Dataset
from amstream.exceptions import ConfigError
from amstream.learner import learner_from_state


def _toy(n_per_class: int = 12, d: int = 16, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(10), n_per_class)
    x = (rng.random((len(y), d)) * 0.2 + np.eye(10, d)[y] * 0.8).astype(np.float32)
    yt = np.repeat(np.arange(10), 3)
    xt = (rng.random((len(yt), d)) * 0.2 + np.eye(10, d)[yt] * 0.8).astype(np.float32)
    return Dataset("toy", x, y.astype(np.int64), xt, yt.astype(np.int64), 10)


def test_import_amstream_does_not_import_avalanche():
    code = ("import sys, amstream, amstream.continual, amstream.commands.continual, amstream.cli; "
            "amstream.cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('avalanche', 'matplotlib')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_class_splits_and_errors():
    assert class_splits(10, 5) == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert class_splits(4, 2, class_order=[3, 1, 0, 2]) == [(3, 1), (0, 2)]
    with pytest.raises(ConfigError, match=re.escape("`n_tasks` must divide the 10 classes, got `3`")):
        class_splits(10, 3)
    with pytest.raises(ConfigError, match="`class_order` must be a permutation"):
        class_splits(4, 2, class_order=[0, 0, 1, 2])


def test_permutations_are_the_notes_permutations():
    assert np.array_equal(task_permutation(0), np.arange(784))
    for t in (1, 2, 9):
        assert np.array_equal(task_permutation(t), np.random.RandomState(t).permutation(784))
    assert not np.array_equal(task_permutation(1), task_permutation(2))


def test_split_tasks_hold_their_classes_only():
    ds = _toy()
    tasks = split_tasks(ds, 5)
    assert [t.classes for t in tasks] == class_splits(10, 5)
    for t in tasks:
        assert set(np.unique(t.y_train)) == set(t.classes) == set(np.unique(t.y_test))
        assert t.permutation is None and t.n_train == 24 and t.n_test == 6
    assert sum(t.n_train for t in tasks) == ds.n_train


def test_permuted_tasks_share_arrays_and_permute_columns():
    ds = _toy(d=784)
    tasks = permuted_tasks(ds, 3)
    assert tasks[0].permutation is None
    assert all(t.x_train is ds.x_train for t in tasks)  # views, not copies
    perm = np.random.RandomState(2).permutation(784)
    assert np.array_equal(tasks[2].inputs("test"), ds.x_test[:, perm])
    assert np.array_equal(tasks[2].apply(torch.from_numpy(ds.x_train[:4])).numpy(), ds.x_train[:4, perm])
    assert all(t.classes == tuple(range(10)) for t in tasks)


def test_subsample_per_class_is_seeded_and_balanced():
    y = np.repeat(np.arange(3), [5, 7, 2])
    idx = subsample_per_class(y, 3, seed=1)
    assert np.array_equal(idx, subsample_per_class(y, 3, seed=1))
    assert np.bincount(y[idx]).tolist() == [3, 3, 2]
    assert np.array_equal(subsample_per_class(y, None), np.arange(14))


def test_make_tasks_on_mnist_subsets():
    tasks = make_tasks("split-mnist", train_per_class=20, test_per_class=5)
    assert [t.classes for t in tasks] == class_splits(10, 5)
    assert [t.n_train for t in tasks] == [40] * 5 and [t.n_test for t in tasks] == [10] * 5
    perm = make_tasks("permuted-mnist", train_per_class=20, test_per_class=5)
    assert len(perm) == 10 and perm[3].x_train.shape == (200, 784)
    assert set(BENCHMARKS) == {"split-mnist", "split-mnist-task", "permuted-mnist", "split-fashion-mnist"}
    with pytest.raises(ConfigError, match="`benchmark` must be one of"):
        make_tasks("split-cifar")


def test_summarize_matches_hand_computation():
    R = np.array([[0.9, 0.2, 0.1],
                  [0.7, 0.8, 0.1],
                  [0.5, 0.9, 0.6]])
    s = summarize(R)
    assert s["average_accuracy"] == pytest.approx((0.5 + 0.9 + 0.6) / 3)
    assert s["forgetting"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.9)) / 2)
    assert s["bwt"] == pytest.approx(-s["forgetting"])
    assert s["max_forgetting"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.9)) / 2)
    assert s["learning_accuracy"] == pytest.approx((0.9 + 0.8 + 0.6) / 3)
    partial = summarize(R[:2])  # a run in progress: scores over the tasks seen
    assert partial["average_accuracy"] == pytest.approx(0.75)
    assert summarize(R[:1])["forgetting"] == 0.0
    with pytest.raises(ConfigError):
        summarize(np.zeros((3, 2)))


def test_task_aware_evaluation_masks_other_classes():
    ds = _toy()
    tasks = split_tasks(ds, 5)
    learner = make_learner(AMConfig(arch=(16, 10), algo="adam", seed=0))
    with torch.no_grad():  # a model that always prefers class 9
        learner.model.layers[0].weight.zero_()
        learner.model.layers[0].bias.copy_(torch.arange(10.0))
    assert evaluate_task(learner, tasks[0]) == 0.0
    assert evaluate_task(learner, tasks[0], task_aware=True) == 0.5  # always class 1 of (0, 1)


@pytest.mark.parametrize("algo", ["am-mem", "am-adam"])
def test_iter_continual_resume_is_bit_exact(algo):
    ds = _toy(n_per_class=20)
    tasks = split_tasks(ds, 5)[:3]
    cfg = AMConfig(arch=(16, 12, 10), algo=algo, mem_decay=0.95, seed=4)
    one = make_learner(cfg)
    rows_one = [r["accuracies"] for r in iter_continual(one, tasks, batch_size=8, seed=7, epochs=2)]

    first = make_learner(cfg)
    rows = [r["accuracies"] for r in iter_continual(first, tasks[:1], eval_tasks=tasks, batch_size=8, seed=7, epochs=2)]
    torch.manual_seed(999)  # a new process has other global RNG state; it must not matter
    resumed = learner_from_state(first.state_dict())
    rows += [r["accuracies"] for r in iter_continual(resumed, tasks, start=1, batch_size=8, seed=7, epochs=2)]
    assert rows == rows_one
    a, b = one.state_dict(), resumed.state_dict()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k])
    for (A1, B1), (A2, B2) in zip(a.get("memories", []), b.get("memories", [])):
        assert torch.equal(A1, A2) and torch.equal(B1, B2)
    assert a["n_updates"] == b["n_updates"] == 3 * 2 * 5
