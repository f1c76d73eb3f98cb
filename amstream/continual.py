"""Continual learning without Avalanche: task sequences, a train-then-test loop, and scores.

A continual benchmark is a list of `Task` objects built from a local `Dataset`:

- **Split** (``split_tasks``): the classes are cut into groups (``0 1 | 2 3 | ... | 8 9``
  for Split-MNIST) and task t holds the samples of group t. Class-incremental
  (``task_aware=False``): one 10-way head, no task id at test time. Task-incremental
  (``task_aware=True``): the task id is known, so a prediction only chooses between the
  task's own classes (the logits of the other classes are masked out).
- **Permuted** (``permuted_tasks``): every task holds all classes, with the pixels
  shuffled by a fixed permutation: task 0 is the identity, task t >= 1 uses
  ``np.random.RandomState(t).permutation(784)`` (domain-incremental, one shared head).

`iter_continual` trains a learner (any :class:`~amstream.learner.Learner`: AM-Adam,
AM-mem, the backprop baselines) on the tasks in order and, after each task, tests on
every task; the rows form the accuracy matrix ``R[i, j]`` = accuracy on task j after
training on tasks 0..i. `summarize` turns the matrix into the usual scores. The Avalanche
adapter (`amstream.avalanche`) builds Avalanche benchmarks from the same `Task` lists.

Examples
--------
>>> import numpy as np
>>> summarize(np.array([[0.9, 0.1], [0.6, 0.8]]))["forgetting"]
0.30000000000000004
>>> task_permutation(0, 5).tolist(), task_permutation(1, 5).tolist()
([0, 1, 2, 3, 4], [2, 1, 4, 0, 3])
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from amstream.exceptions import ConfigError

__all__ = [
    "BENCHMARKS",
    "BenchmarkSpec",
    "Task",
    "class_splits",
    "task_permutation",
    "split_tasks",
    "permuted_tasks",
    "make_tasks",
    "subsample_per_class",
    "summarize",
    "iter_continual",
    "evaluate_task",
    "accuracy",
    "training_order",
    "plot_accuracy_matrix",
    "PRESETS",
    "preset_config",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- benchmarks
@dataclass(frozen=True)
class BenchmarkSpec:
    """A named task sequence: which dataset, how it is cut, whether task ids are given."""

    name: str
    dataset: str
    kind: str  # "split" or "permuted"
    n_tasks: int
    task_aware: bool
    description: str


#: The benchmarks `make_tasks` (and ``amstream continual --benchmark``) know.
BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec("split-mnist", "mnist", "split", 5, False,
                      "Split-MNIST, class-incremental: 5 tasks of 2 digits, one 10-way head"),
        BenchmarkSpec("split-mnist-task", "mnist", "split", 5, True,
                      "Split-MNIST, task-incremental: 5 tasks of 2 digits, task id known at test time"),
        BenchmarkSpec("permuted-mnist", "mnist", "permuted", 10, False,
                      "Permuted-MNIST: 10 pixel permutations (task 0 = identity), all 10 digits each"),
        BenchmarkSpec("split-fashion-mnist", "fashion_mnist", "split", 5, False,
                      "Split-Fashion-MNIST, class-incremental: 5 tasks of 2 classes, one 10-way head"),
    )
}


#: Named AM settings for ``amstream continual --preset NAME`` (and `preset_config`): the
#: best of the validation grid of ``benchmarks/continual_benchmark.py --tune`` (Permuted-MNIST,
#: 5 tasks, a validation split of the training set; benchmarks/results/continual_tuning.md).
#: With no preset every strategy uses `~amstream.config.AMConfig`'s defaults, as
#: ``amstream serve --algo ...`` does.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "permuted-mnist": {"am-mem": {"mu": 10.0, "lr_out": 3e-3, "mem_decay": 1.0, "mem_sweeps": 1},
                       "am-adam": {"mu": 1.0, "lr": 1e-3, "lr_out": 1e-3}},
    # AM-mem with a replay buffer (`--replay 500`): the best of ``continual_benchmark.py --tune-replay``
    # on Split-Fashion-MNIST (benchmarks/results/continual_tuning_replay.md)
    "replay": {"am-mem": {"mu": 1.0, "lr_out": 1e-2, "mem_decay": 0.99}},
}


def preset_config(algo: str, preset: str | None = None, **overrides: Any) -> Any:
    """The `~amstream.config.AMConfig` of ``algo`` (``am-mem``, ``am-adam``) under ``preset``
    (a key of `PRESETS`; None: AMConfig's defaults), with ``overrides`` on top."""
    from amstream.config import AMConfig

    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"`preset` must be one of {', '.join(PRESETS)}; got `{preset}`")
    hyper = dict(PRESETS[preset].get(algo, {})) if preset else {}
    return AMConfig(**{"algo": algo, **hyper, **overrides})


@dataclass(frozen=True, eq=False)
class Task:
    """One task of a continual benchmark.

    Attributes
    ----------
    label
        The task's index in the sequence (its task id in task-incremental settings).
    classes
        The class ids the task holds, in the order they are numbered inside the task
        (``classes[k]`` is the global class of the task-local class k).
    x_train, y_train, x_test, y_test
        The samples *before* the permutation (float32 ``[n, d]``, int64 ``[n]`` global
        class ids); several tasks of a permuted benchmark share the same arrays. Use
        `inputs` for the task's actual inputs, or `apply` on a minibatch.
    permutation
        Feature permutation of a permuted task (``None`` for split tasks).
    """

    label: int
    classes: tuple[int, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    permutation: np.ndarray | None = None

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    def apply(self, x: Any) -> Any:
        """The task's view of raw inputs ``x`` (numpy or torch, ``[n, d]``): permuted columns."""
        return x if self.permutation is None else x[:, self.permutation]

    def inputs(self, split: str = "train") -> np.ndarray:
        """The task's inputs for ``split`` (``"train"`` or ``"test"``), permutation applied."""
        if split not in ("train", "test"):
            raise ConfigError(f"`split` must be `train` or `test`, got `{split}`")
        return self.apply(self.x_train if split == "train" else self.x_test)

    def __repr__(self) -> str:
        perm = "" if self.permutation is None else ", permuted"
        return f"Task(label={self.label}, classes={self.classes}, n_train={self.n_train}, n_test={self.n_test}{perm})"


def class_splits(n_classes: int = 10, n_tasks: int = 5, class_order: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """Cut ``class_order`` (default ``0 .. n_classes-1``) into ``n_tasks`` equal groups.

    >>> class_splits(10, 5)
    [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    """
    order = list(range(n_classes)) if class_order is None else [int(c) for c in class_order]
    if sorted(order) != list(range(n_classes)):
        raise ConfigError(f"`class_order` must be a permutation of 0..{n_classes - 1}, got `{order}`")
    if n_tasks < 1 or n_classes % n_tasks:
        raise ConfigError(f"`n_tasks` must divide the {n_classes} classes, got `{n_tasks}`")
    size = n_classes // n_tasks
    return [tuple(order[i:i + size]) for i in range(0, n_classes, size)]


def task_permutation(task: int, n_features: int = 784) -> np.ndarray:
    """The pixel permutation of permuted task ``task``: identity for 0, else RandomState(task)."""
    if task < 0:
        raise ConfigError(f"`task` must be >= 0, got `{task}`")
    if task == 0:
        return np.arange(n_features)
    return np.random.RandomState(task).permutation(n_features)


def subsample_per_class(y: np.ndarray, n_per_class: int | None, *, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``n_per_class`` samples of each class (all when None)."""
    if n_per_class is None:
        return np.arange(len(y))
    if n_per_class < 1:
        raise ConfigError(f"`n_per_class` must be >= 1 or None, got `{n_per_class}`")
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        keep.append(idx if len(idx) <= n_per_class else rng.choice(idx, n_per_class, replace=False))
    return np.sort(np.concatenate(keep))


def _by_class(dataset: Any) -> Any:
    """``dataset`` with its training samples grouped by class (a stable sort): the order the
    experiences of Avalanche's benchmarks keep, so `training_order` picks the same samples
    from a `Task` and from its Avalanche experience."""
    order = np.argsort(dataset.y_train, kind="stable")
    if np.array_equal(order, np.arange(len(order))):
        return dataset
    return dataclasses.replace(dataset, x_train=dataset.x_train[order], y_train=dataset.y_train[order])


def split_tasks(dataset: Any, n_tasks: int = 5, *, class_order: Sequence[int] | None = None) -> list[Task]:
    """Split ``dataset`` (a `~amstream.datasets.Dataset`) into tasks of disjoint classes
    (each task's training samples grouped by class, in the order of ``class_order``'s sort)."""
    dataset = _by_class(dataset)
    n_classes = int(dataset.n_classes)
    tasks = []
    for t, classes in enumerate(class_splits(n_classes, n_tasks, class_order)):
        tr = np.isin(dataset.y_train, classes)
        te = np.isin(dataset.y_test, classes)
        tasks.append(Task(t, tuple(classes), dataset.x_train[tr], dataset.y_train[tr],
                          dataset.x_test[te], dataset.y_test[te]))
    return tasks


def permuted_tasks(dataset: Any, n_tasks: int = 10) -> list[Task]:
    """``n_tasks`` pixel-permuted copies of ``dataset`` (views of one array, its training
    samples grouped by class)."""
    if n_tasks < 1:
        raise ConfigError(f"`n_tasks` must be >= 1, got `{n_tasks}`")
    dataset = _by_class(dataset)
    classes = tuple(range(int(dataset.n_classes)))
    d = int(dataset.x_train.shape[1])
    return [Task(t, classes, dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test,
                 None if t == 0 else task_permutation(t, d))
            for t in range(n_tasks)]


def make_tasks(
    benchmark: str,
    *,
    n_tasks: int | None = None,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    data_dir: Any = None,
    seed: int = 0,
    dataset: Any = None,
) -> list[Task]:
    """The task list of a benchmark in `BENCHMARKS`, from local data.

    Parameters
    ----------
    benchmark
        ``split-mnist``, ``split-mnist-task``, ``permuted-mnist`` or ``split-fashion-mnist``.
    n_tasks
        Number of tasks (default: the benchmark's, 5 or 10).
    train_per_class, test_per_class
        Keep at most this many samples per class of each split (a random subset drawn
        with ``seed``; the same subset for every task of a permuted benchmark). None
        keeps everything.
    data_dir
        Where the dataset files are (see `amstream.datasets.load_dataset`).
    dataset
        A `~amstream.datasets.Dataset` to use instead of loading ``spec.dataset``.
    """
    spec = _spec(benchmark)
    if dataset is None:
        from amstream.datasets import load_dataset

        dataset = load_dataset(spec.dataset, data_dir=data_dir)
    if train_per_class is not None or test_per_class is not None:
        tr = subsample_per_class(dataset.y_train, train_per_class, seed=seed)
        te = subsample_per_class(dataset.y_test, test_per_class, seed=seed + 1)
        dataset = dataclasses.replace(dataset, x_train=dataset.x_train[tr], y_train=dataset.y_train[tr],
                                      x_test=dataset.x_test[te], y_test=dataset.y_test[te])
    n = spec.n_tasks if n_tasks is None else int(n_tasks)
    if spec.kind == "permuted":
        return permuted_tasks(dataset, n)
    return split_tasks(dataset, n)


def _spec(benchmark: str) -> BenchmarkSpec:
    try:
        return BENCHMARKS[benchmark]
    except KeyError:
        raise ConfigError(f"`benchmark` must be one of {', '.join(BENCHMARKS)}; got `{benchmark}`") from None


# --------------------------------------------------------------------------- scores
def summarize(matrix: Any) -> dict[str, Any]:
    """Scores of an accuracy matrix ``R`` (rows: after training task i; columns: test task j).

    Returns ``average_accuracy`` (mean of the last row), ``forgetting`` (mean over the
    tasks before the last of ``R[j, j] - R[-1, j]``: the accuracy lost since the task was
    learned, as Avalanche's ``StreamForgetting``), ``bwt`` (backward transfer, Lopez-Paz &
    Ranzato 2017: the mean of ``R[-1, j] - R[j, j]``, so ``bwt == -forgetting``),
    ``max_forgetting`` (Chaudhry et al. 2018: the drop from the *best* earlier accuracy)
    and ``learning_accuracy`` (mean of the diagonal: how well each task was learned).
    Rows may be fewer than columns (a run in progress); the scores use the rows there are.
    """
    R = np.asarray(matrix, dtype=float)
    if R.ndim != 2 or R.shape[0] < 1 or R.shape[0] > R.shape[1]:
        raise ConfigError(f"`matrix` must be [n_trained, n_tasks] with 1 <= n_trained <= n_tasks, got shape {R.shape}")
    k = R.shape[0]  # tasks trained so far
    last = R[k - 1, :k]
    diag = np.diagonal(R)[:k]
    drop = diag[:-1] - last[:-1]
    best_drop = (R[:k - 1, :k - 1].max(axis=0) - last[:-1]) if k > 1 else np.zeros(0)
    return {
        "average_accuracy": float(last.mean()),
        "forgetting": float(drop.mean()) if k > 1 else 0.0,
        "bwt": float(-drop.mean()) if k > 1 else 0.0,
        "max_forgetting": float(best_drop.mean()) if k > 1 else 0.0,
        "learning_accuracy": float(diag.mean()),
    }


# --------------------------------------------------------------------------- the loop
def _task_mask(tasks: Sequence[Task], n_outputs: int) -> Any:
    import torch

    mask = torch.zeros(len(tasks), n_outputs, dtype=torch.bool)
    for t, task in enumerate(tasks):
        mask[t, list(task.classes)] = True
    return mask


def accuracy(learner: Any, x: Any, y: Any, *, classes: Sequence[int] | None = None, batch_size: int = 1000) -> float:
    """Accuracy of ``learner`` on samples ``x`` [n, d], labels ``y`` [n] (torch tensors), in
    minibatches of ``batch_size``; with ``classes`` the prediction is the best of those outputs
    only (task-aware). Every continual score of amstream (`evaluate_task`, serve's continual
    metrics) is this function."""
    import torch

    cols = None if classes is None else torch.as_tensor(list(classes))
    correct = 0
    for s in range(0, len(y), batch_size):
        logits = learner.forward(x[s:s + batch_size])
        pred = logits.argmax(1).cpu() if cols is None else cols[logits[:, cols].argmax(1).cpu()]
        correct += int((pred == y[s:s + batch_size]).sum())
    return correct / max(len(y), 1)


def training_order(n: int, *, seed: int, task: int, epoch: int = 0) -> np.ndarray:
    """The order in which the ``n`` training samples of ``task`` are learned in ``epoch``:
    ``numpy.random.default_rng([seed, task, epoch]).permutation(n)``. `iter_continual` trains in
    this order and ``amstream produce --benchmark`` writes a task sequence in it, so a served
    sequence forms the minibatches of the loop."""
    return np.random.default_rng([seed, task, epoch]).permutation(n)


def evaluate_task(learner: Any, task: Task, *, task_aware: bool = False, batch_size: int = 1000,
                  n_outputs: int | None = None) -> float:
    """Accuracy of ``learner`` on ``task``'s test split (task-aware: among its classes only)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(task.inputs("test")))
    return accuracy(learner, x, torch.from_numpy(task.y_test), classes=task.classes if task_aware else None,
                    batch_size=batch_size)


def iter_continual(
    learner: Any,
    tasks: Sequence[Task],
    *,
    epochs: int = 1,
    batch_size: int = 128,
    task_aware: bool = False,
    seed: int = 0,
    eval_tasks: Sequence[Task] | None = None,
    start: int = 0,
) -> Iterator[dict[str, Any]]:
    """Train ``learner`` on ``tasks[start:]`` in order; after each, test on every task.

    Each task's training data is shuffled anew every epoch (`training_order`), so a run that stops after task i
    and resumes (``start=i + 1``, learner restored from its ``state_dict``) sees exactly
    the minibatches of an uninterrupted run. Training ignores the task id (one shared
    head); ``task_aware`` only restricts the test predictions to each task's classes.

    Yields one dict per trained task: ``task`` (its index), ``accuracies`` (one per
    task of ``eval_tasks``, default ``tasks``), ``n_updates`` and ``loss`` (the mean
    minibatch loss before each update, i.e. prequential).
    """
    import torch

    if epochs < 1:
        raise ConfigError(f"`epochs` must be >= 1, got `{epochs}`")
    eval_tasks = tasks if eval_tasks is None else eval_tasks
    for t in range(start, len(tasks)):
        task = tasks[t]
        x_all = torch.from_numpy(task.x_train)
        y_all = torch.from_numpy(task.y_train)
        perm = None if task.permutation is None else torch.from_numpy(task.permutation)
        losses = []
        for epoch in range(epochs):
            order = torch.from_numpy(training_order(task.n_train, seed=seed, task=t, epoch=epoch))
            for s in range(0, task.n_train, batch_size):
                idx = order[s:s + batch_size]
                xb = x_all[idx] if perm is None else x_all[idx][:, perm]
                losses.append(learner.learn(xb, y_all[idx]).loss)
        accs = [evaluate_task(learner, e, task_aware=task_aware) for e in eval_tasks]
        logger.info("task %d: accuracies %s", t, " ".join(f"{a:.3f}" for a in accs))
        yield {"task": t, "accuracies": accs, "n_updates": learner.n_updates,
               "loss": float(np.mean(losses)) if losses else float("nan")}


# --------------------------------------------------------------------------- plots
def plot_accuracy_matrix(matrix: Any, path: Any, *, title: str = "", labels: Sequence[str] | None = None) -> Any:
    """Save the accuracy matrix as an annotated heat map (PNG); returns the path.

    Rows: after training on task i; columns: test task j. Rows not trained yet are
    left blank. Uses matplotlib's Agg backend (no display needed).
    """
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R = np.asarray(matrix, dtype=float)
    n_rows, n_cols = R.shape
    labels = list(labels) if labels is not None else [str(j) for j in range(n_cols)]
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * n_cols, 1.2 + 0.55 * n_rows))
    im = ax.imshow(R, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for i in range(n_rows):
        for j in range(n_cols):
            ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if R[i, j] > 0.6 else "white")
    ax.set_xticks(range(n_cols), labels[:n_cols], fontsize=7)
    ax.set_yticks(range(n_rows), [f"after {labels[i]}" for i in range(n_rows)], fontsize=7)
    ax.set_xlabel("test task")
    ax.set_ylabel("trained through task")
    if title:
        ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
