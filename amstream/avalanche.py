"""Avalanche adapter: online AM as an Avalanche strategy, local continual benchmarks, baselines.

This is the only module of amstream that imports Avalanche (``import amstream`` does not).

`AMStrategy` is used like Avalanche's own strategies (``Naive``, ``EWC``, ...): Avalanche's
training loop runs unchanged and AM is its update rule (``optimizer_step`` is one call of
:meth:`amstream.learner.Learner.learn`), so plugins (``ReplayPlugin``, ``EWCPlugin``, SI,
LwF), loggers and metrics work as they do with SGD. ``strategy.model`` is a view of the
learner's current weights.

The benchmarks (`split_mnist`, `permuted_mnist`, `split_fashion_mnist`, `make_benchmark`)
are ordinary Avalanche benchmarks built from local data (Avalanche's own MNIST
benchmarks download, which fails offline), from the task lists of `amstream.continual`.

Task-incremental learning with AM goes through an Avalanche ``MultiTaskModule``
(`TaskHeadsModule`) whose head for task t is the outputs ``task_classes[t]`` of the
learner's one output layer (for Split-MNIST the digits' own outputs, 0/1 for task 0, 2/3
for task 1, ...); a task-local label k trains output ``task_classes[t][k]`` and at test time
only the task's outputs compete. Training uses the full softmax (the learner has one output
layer), so AM's task-IL numbers are "class-IL training, task-aware prediction"; Avalanche's
baselines use one ``MultiHeadClassifier`` per task (`make_baseline`).

Examples
--------
>>> from amstream import AMConfig
>>> from amstream.avalanche import AMStrategy, make_benchmark, default_evaluator
>>> bm = make_benchmark("split-mnist", n_experiences=2, train_per_class=100, test_per_class=50)  # doctest: +SKIP
>>> strategy = AMStrategy(learner=AMConfig(arch=(784, 100, 10), algo="am-mem"),
...                       train_mb_size=64, evaluator=default_evaluator())  # doctest: +SKIP
>>> for exp in bm.train_stream:  # doctest: +SKIP
...     strategy.train(exp)
...     metrics = strategy.eval(bm.test_stream)
"""
from __future__ import annotations

import logging
import re
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from avalanche.benchmarks import nc_benchmark
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics, loss_metrics
from avalanche.logging import BaseLogger
from avalanche.models import MultiHeadClassifier, MultiTaskModule
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin, SynapticIntelligencePlugin
from avalanche.training.templates import SupervisedTemplate

from amstream.config import AMConfig
from amstream.continual import BENCHMARKS, Task, make_tasks, summarize, training_order
from amstream.exceptions import ConfigError
from amstream.learner import Learner, make_learner

__all__ = [
    "AMStrategy",
    "LearnerModule",
    "TaskHeadsModule",
    "benchmark_from_tasks",
    "make_benchmark",
    "split_mnist",
    "permuted_mnist",
    "split_fashion_mnist",
    "task_classes_of",
    "default_evaluator",
    "QuietLogger",
    "ProgressPlugin",
    "FixedSynapticIntelligencePlugin",
    "MultiHeadMLP",
    "BASELINES",
    "make_baseline",
    "iter_experiences",
    "accuracy_row",
    "summarize_rows",
]

logger = logging.getLogger(__name__)

# =========================================================================== benchmarks
class _TaskDataset(torch.utils.data.Dataset):
    """Samples of one array pair, columns permuted on the fly (no copy per task)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, permutation: np.ndarray | None = None):
        self.x = torch.from_numpy(np.ascontiguousarray(x))
        self.targets = torch.from_numpy(np.ascontiguousarray(y))
        self.permutation = None if permutation is None else torch.from_numpy(np.asarray(permutation))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        x = self.x[i]
        return (x if self.permutation is None else x[self.permutation]), self.targets[i]


def benchmark_from_tasks(tasks: Sequence[Task], *, task_labels: bool = False):
    """An Avalanche benchmark with one experience per `~amstream.continual.Task`.

    Tasks with disjoint classes (split benchmarks) become an ``nc_benchmark`` with the
    tasks' class order fixed; with ``task_labels`` each experience gets its task id and
    task-local class ids ``0..n-1`` (``task_classes_of`` maps them back). Tasks that share
    classes (permuted benchmarks) become one dataset per experience with
    ``class_ids_from_zero_in_each_exp=True``, so every experience keeps labels 0..9
    (without it Avalanche renumbers each experience's classes: 10..19, 20..29, ...).
    """
    if not tasks:
        raise ConfigError("`tasks` is empty")
    seen: set[int] = set()
    disjoint = True
    for task in tasks:
        disjoint = disjoint and not (seen & set(task.classes))
        seen |= set(task.classes)
    if disjoint and all(t.permutation is None for t in tasks):
        x_tr = np.concatenate([t.x_train for t in tasks])
        y_tr = np.concatenate([t.y_train for t in tasks])
        x_te = np.concatenate([t.x_test for t in tasks])
        y_te = np.concatenate([t.y_test for t in tasks])
        order = [c for t in tasks for c in t.classes]
        sizes = {len(t.classes) for t in tasks}
        per_exp = None if len(sizes) == 1 else {i: len(t.classes) for i, t in enumerate(tasks)}
        return nc_benchmark(
            _TaskDataset(x_tr, y_tr), _TaskDataset(x_te, y_te), n_experiences=len(tasks),
            task_labels=task_labels, shuffle=False, fixed_class_order=order, per_exp_classes=per_exp,
            class_ids_from_zero_in_each_exp=task_labels)
    return nc_benchmark(
        [_TaskDataset(t.x_train, t.y_train, t.permutation) for t in tasks],
        [_TaskDataset(t.x_test, t.y_test, t.permutation) for t in tasks],
        n_experiences=len(tasks), task_labels=task_labels, shuffle=False,
        one_dataset_per_exp=True, class_ids_from_zero_in_each_exp=True)


def make_benchmark(
    name: str,
    *,
    n_experiences: int | None = None,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    data_dir: Any = None,
    seed: int = 0,
    dataset: Any = None,
):
    """An Avalanche benchmark from `amstream.continual.BENCHMARKS` (local data, no download).

    ``split-mnist`` (class-IL), ``split-mnist-task`` (task-IL: task labels, class ids from
    0 in each experience), ``permuted-mnist``, ``split-fashion-mnist``. ``train_per_class``
    / ``test_per_class`` keep a random subset (drawn with ``seed``) for quick runs.
    """
    spec = BENCHMARKS.get(name)
    if spec is None:
        raise ConfigError(f"`benchmark` must be one of {', '.join(BENCHMARKS)}; got `{name}`")
    tasks = make_tasks(name, n_tasks=n_experiences, train_per_class=train_per_class,
                       test_per_class=test_per_class, data_dir=data_dir, seed=seed, dataset=dataset)
    return benchmark_from_tasks(tasks, task_labels=spec.task_aware)


def split_mnist(*, task_labels: bool = False, **kwargs: Any):
    """Split-MNIST: 5 experiences of digits 0 1 | 2 3 | 4 5 | 6 7 | 8 9 (see `make_benchmark`)."""
    return make_benchmark("split-mnist-task" if task_labels else "split-mnist", **kwargs)


def permuted_mnist(*, n_experiences: int = 10, **kwargs: Any):
    """Permuted-MNIST: task 0 identity, task t ``RandomState(t).permutation(784)``."""
    return make_benchmark("permuted-mnist", n_experiences=n_experiences, **kwargs)


def split_fashion_mnist(**kwargs: Any):
    """Split-Fashion-MNIST (class-IL): 5 experiences of 2 classes each."""
    return make_benchmark("split-fashion-mnist", **kwargs)


def task_classes_of(benchmark: Any) -> dict[int, tuple[int, ...]]:
    """For a task-incremental benchmark: task label -> the original class of each local id.

    With ``class_ids_from_zero_in_each_exp`` the local class k of an experience is the
    k-th class of that experience in the benchmark's class order.
    """
    order = [int(c) for c in benchmark.classes_order_original_ids]
    out: dict[int, tuple[int, ...]] = {}
    start = 0
    for exp in benchmark.train_stream:
        n = len(exp.classes_in_this_experience)
        classes = tuple(order[start:start + n])
        start += n
        for t in exp.task_labels:
            if t in out and out[t] != classes:
                raise ConfigError(f"task {t} appears with classes {out[t]} and {classes}")
            out[int(t)] = classes
    return out


# =========================================================================== modules
class LearnerModule(nn.Module):
    """``strategy.model`` of a shared-head `AMStrategy`: the learner's network, for evaluation.

    Its parameters *are* the learner's (``self.net is learner.model``), so it always
    evaluates with the current weights; training goes through ``learner.learn`` only.
    """

    def __init__(self, learner: Learner):
        super().__init__()
        self.net = learner.model
        object.__setattr__(self, "learner", learner)  # not a submodule: net is

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.reshape(x.shape[0], -1))


class TaskHeadsModule(MultiTaskModule):
    """``strategy.model`` of a task-aware `AMStrategy`: task t sees the outputs ``task_classes[t]``.

    ``forward(x, task_labels)`` returns ``[B, n]`` task-local logits (``n`` = the largest
    task; shorter tasks are padded with ``-inf``), so the argmax is a task-local class.
    """

    def __init__(self, learner: Learner, task_classes: Mapping[int, Sequence[int]]):
        super().__init__()
        self.net = learner.model
        object.__setattr__(self, "learner", learner)
        if not task_classes:
            raise ConfigError("`task_classes` is empty")
        n_out = learner.n_outputs
        width = max(len(c) for c in task_classes.values())
        table = torch.full((max(task_classes) + 1, width), -1, dtype=torch.long)
        for t, classes in task_classes.items():
            bad = [c for c in classes if not 0 <= int(c) < n_out]
            if bad or t < 0:
                raise ConfigError(f"`task_classes[{t}]` = `{list(classes)}` is not a list of outputs in "
                                  f"[0, {n_out - 1}]")
            table[t, :len(classes)] = torch.as_tensor([int(c) for c in classes])
        self.register_buffer("table", table.to(learner.device), persistent=False)
        self.known_train_tasks_labels = set(int(t) for t in task_classes)
        self.max_class_label = width

    def _rows(self, task_labels: Tensor | int, n: int) -> Tensor:
        t = torch.as_tensor(task_labels, device=self.table.device).long().reshape(-1).expand(n)
        if int(t.min()) < 0 or int(t.max()) >= self.table.shape[0] or bool((self.table[t, 0] < 0).any()):
            raise ConfigError(f"task labels `{sorted(set(t.tolist()))}` are not all in `task_classes` "
                              f"({sorted(self.known_train_tasks_labels)})")
        return self.table[t]

    def local_logits(self, logits: Tensor, task_labels: Tensor | int) -> Tensor:
        """Task-local logits ``[B, n]`` from full logits ``[B, n_outputs]``."""
        rows = self._rows(task_labels, logits.shape[0])
        out = logits.gather(1, rows.clamp_min(0))
        return out.masked_fill(rows < 0, float("-inf"))

    def global_labels(self, y: Tensor, task_labels: Tensor | int) -> Tensor:
        """The shared-head output of each task-local label."""
        rows = self._rows(task_labels, y.shape[0])
        out = rows.gather(1, y.long().reshape(-1, 1)).squeeze(1)
        if bool((out < 0).any()):
            raise ConfigError("a task-local label is larger than its task's number of classes")
        return out

    def forward(self, x: Tensor, task_labels: Tensor | int) -> Tensor:  # type: ignore[override]
        return self.local_logits(self.net(x.reshape(x.shape[0], -1)), task_labels)

    def adaptation(self, experience: Any) -> None:  # the heads are fixed: nothing to grow
        pass


# =========================================================================== the strategy
class _TrainingOrder(torch.utils.data.Sampler):
    """Epoch e of an experience visits its samples in `amstream.continual.training_order` order."""

    def __init__(self, n: int, *, seed: int, task: int):
        self.n, self.seed, self.task, self.epoch = n, seed, task, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = training_order(self.n, seed=self.seed, task=self.task, epoch=self.epoch)
        self.epoch += 1
        return iter(order.tolist())


class AMStrategy(SupervisedTemplate):
    """Online alternating minimization (AM-Adam, AM-mem) as the update rule of an Avalanche strategy.

    Avalanche's own training loop runs unchanged (``SGDUpdate.training_epoch``: forward,
    criterion, ``backward``, ``optimizer_step``, with every plugin callback); AM replaces
    only the update: `optimizer_step` is one call of :meth:`amstream.learner.Learner.learn`
    on the minibatch (forward, code update, weight update: Algorithm 2.1). ``strategy.model``
    is a differentiable view of the learner's weights, so evaluation, metrics, loggers and
    plugins that read the model (EWC's Fisher, LwF's old model) work unchanged.

    Parameters
    ----------
    learner
        A :class:`~amstream.learner.Learner` (from `make_learner` or `learner_from_state`),
        or an `AMConfig` to build one (``AMConfig(algo="am-mem")``: the rule the README reports
        for AM-mem, as ``amstream serve --algo am-mem``). Its state (weights, optimizer moments, AM-mem's
        co-activation memories) carries over from experience to experience.
    train_mb_size, train_epochs, eval_mb_size, plugins, evaluator, eval_every, peval_mode
        As in Avalanche (``eval_mb_size`` defaults to 512).
    task_classes
        For task-incremental benchmarks (task labels, class ids from 0 in each
        experience): task label -> the learner's outputs that form that task's head
        (`task_classes_of` gives them). ``None``: one shared head.
    penalty_lr
        Step size of the plugins' penalties (see Notes).
    data_seed
        Seeds the training order (default ``learner.config.seed``).

    Notes
    -----
    **Penalties of plugins** (EWC, SI, LwF, ...) reach the AM update in one defined way.
    The cross-entropy ``criterion()`` is AM's own objective and is not back-propagated:
    before the plugins' ``before_backward`` the loss is detached, so whatever the plugins
    add to ``strategy.loss`` is exactly their penalty; ``backward()`` back-propagates that
    penalty into the weights' ``.grad``, and ``optimizer_step()`` first runs the AM update
    and then one SGD step of size ``penalty_lr`` along the penalty's gradient
    (``strategy.optimizer``, a ``torch.optim.SGD`` over the learner's weights). With no
    penalty the SGD step does nothing. ``strategy.loss`` as logged is criterion + penalty,
    as in Avalanche. SI's importance reads ``.grad``, which holds only the penalty's
    gradient here (AM's own update has no gradient of the loss w.r.t. hidden weights).

    **Data order**: with no data plugin, epoch e of experience i presents its samples in
    ``amstream.continual.training_order(n, seed=data_seed, task=i, epoch=e)`` order, the
    order of `amstream.continual.iter_continual` and ``amstream produce --benchmark``, so the
    three give the same minibatches. Plugins that replace the dataloader (``ReplayPlugin``)
    draw from the global torch RNG, which is seeded per experience from ``(data_seed,
    experience, learner.n_updates)`` and restored afterwards: a run split across processes
    (learner state saved with `amstream.checkpoint.save_checkpoint`, reloaded with
    `learner_from_state`) gives bit-identical weights and memories.

    **Task-incremental** (``task_classes``): ``strategy.model`` is a `TaskHeadsModule`
    (an Avalanche ``MultiTaskModule``); task t's head is the outputs ``task_classes[t]`` of
    the learner's output layer. Training maps the task-local label to its output and runs
    the AM update with the full softmax (the learner has one output layer); prediction
    compares only the task's outputs.
    """

    def __init__(
        self,
        *,
        learner: Learner | AMConfig,
        train_mb_size: int = 128,
        train_epochs: int = 1,
        eval_mb_size: int | None = 512,
        device: str | torch.device | None = None,
        plugins: Sequence[Any] | None = None,
        evaluator: Any = None,
        eval_every: int = -1,
        peval_mode: str = "epoch",
        task_classes: Mapping[int, Sequence[int]] | None = None,
        penalty_lr: float = 1e-3,
        data_seed: int | None = None,
    ):
        if isinstance(learner, AMConfig):
            learner = make_learner(learner, device=device or "cpu")
        if not isinstance(learner, Learner):
            raise ConfigError(f"`learner` must be a Learner or an AMConfig, got `{type(learner).__name__}`")
        if device is not None and torch.device(device) != learner.device:
            raise ConfigError(f"`device` is `{device}` but the learner lives on `{learner.device}`")
        if train_mb_size < 1 or train_epochs < 1:
            raise ConfigError(f"`train_mb_size` and `train_epochs` must be >= 1, got `{train_mb_size}`, "
                              f"`{train_epochs}`")
        if not penalty_lr >= 0:
            raise ConfigError(f"`penalty_lr` must be >= 0, got `{penalty_lr}`")
        self.learner = learner
        for param in learner.model.parameters():  # plugins' penalties and EWC's Fisher need gradients
            param.requires_grad_(True)
        self.data_seed = int(learner.config.seed if data_seed is None else data_seed)
        model: nn.Module = LearnerModule(learner) if task_classes is None else TaskHeadsModule(learner, task_classes)
        super().__init__(
            model=model, optimizer=torch.optim.SGD(learner.model.parameters(), lr=penalty_lr),
            criterion=nn.CrossEntropyLoss(), train_mb_size=train_mb_size, train_epochs=train_epochs,
            eval_mb_size=eval_mb_size, device=learner.device, plugins=plugins,
            evaluator=default_evaluator() if evaluator is None else evaluator,
            eval_every=eval_every, peval_mode=peval_mode)
        self._outer_rng: Tensor | None = None

    # -- the optimizer is the penalties' SGD: keep it across experiences -------------
    def make_optimizer(self, **kwargs: Any) -> None:
        pass

    # -- data order ----------------------------------------------------------------------
    def _exp_id(self) -> int:
        return int(getattr(self.experience, "current_experience", 0))

    def make_train_dataloader(self, num_workers: int = 0, shuffle: bool = True, pin_memory: Any = None,
                              persistent_workers: bool = False, drop_last: bool = False, **kwargs: Any) -> None:
        args = self._obtain_common_dataloader_parameters(
            batch_size=self.train_mb_size, num_workers=num_workers, shuffle=False, pin_memory=pin_memory,
            persistent_workers=persistent_workers, drop_last=drop_last)
        args.pop("shuffle", None)
        sampler = _TrainingOrder(len(self.adapted_dataset), seed=self.data_seed, task=self._exp_id())
        self.dataloader = torch.utils.data.DataLoader(self.adapted_dataset, sampler=sampler, **args)

    def _before_training_exp(self, **kwargs: Any) -> None:
        self._outer_rng = torch.get_rng_state()
        seq = np.random.SeedSequence([self.data_seed, self._exp_id(), int(self.learner.n_updates)])
        torch.manual_seed(int(seq.generate_state(1, np.uint64)[0] % (2**63 - 1)))
        super()._before_training_exp(**kwargs)

    def _after_training_exp(self, **kwargs: Any) -> None:
        try:
            super()._after_training_exp(**kwargs)
        finally:
            if self._outer_rng is not None:
                torch.set_rng_state(self._outer_rng)
                self._outer_rng = None

    # -- the update: AM, then the plugins' penalty ---------------------------------------
    def _before_backward(self, **kwargs: Any) -> None:
        self.loss = self.loss.detach()  # AM minimizes the criterion itself: only penalties flow back
        super()._before_backward(**kwargs)

    def backward(self) -> None:
        if self.loss.requires_grad:
            self.loss.backward(retain_graph=self.retain_graph)

    def optimizer_step(self) -> None:
        x = self.mb_x.reshape(self.mb_x.shape[0], -1)
        if isinstance(self.model, TaskHeadsModule):
            y = self.model.global_labels(self.mb_y, self.mb_task_id)
        else:
            y = self.mb_y
        with torch.no_grad():
            self.learner.learn(x, y)
        self.optimizer.step()


# =========================================================================== evaluation
class QuietLogger(BaseLogger):
    """A logger that logs nothing (an ``EvaluationPlugin`` without loggers warns)."""


def default_evaluator(loggers: Sequence[Any] | None = None) -> EvaluationPlugin:
    """Accuracy, loss, forgetting and BWT per experience and per stream (silent by default)."""
    return EvaluationPlugin(
        accuracy_metrics(epoch=True, experience=True, stream=True),
        loss_metrics(epoch=True, experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        bwt_metrics(experience=True, stream=True),
        loggers=list(loggers) if loggers else [QuietLogger()],
    )


class ProgressPlugin(SupervisedPlugin):
    """A tqdm bar per training experience (minibatches done / minibatches in all epochs)."""

    def __init__(self, *, disable: bool = False, leave: bool = False):
        super().__init__()
        self.disable = disable
        self.leave = leave
        self._bar = None

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        if self._bar is None:
            from tqdm.auto import tqdm

            exp = strategy.experience.current_experience
            total = len(strategy.dataloader) * strategy.train_epochs
            self._bar = tqdm(total=total, desc=f"experience {exp}", unit="mb", disable=self.disable,
                             leave=self.leave, dynamic_ncols=True, position=1)

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.update(1)
            if self._bar.n % 20 == 0:
                self._bar.set_postfix(loss=f"{float(strategy.loss):.3f}", refresh=False)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


_ACC_KEY = re.compile(r"^Top1_Acc_Exp/eval_phase/test_stream/Task(\d+)/Exp(\d+)$")


def accuracy_row(metrics: Mapping[str, Any], n_experiences: int) -> list[float]:
    """Per-experience test accuracies from ``strategy.eval(test_stream)``'s result.

    Reads ``Top1_Acc_Exp/eval_phase/test_stream/Task<t>/Exp<e>``; every experience of the
    test stream must be there (the stream keys, by contrast, keep stale task suffixes).
    """
    row: list[float | None] = [None] * n_experiences
    for key, value in metrics.items():
        m = _ACC_KEY.match(key)
        if m and int(m.group(2)) < n_experiences:
            row[int(m.group(2))] = float(value)
    missing = [i for i, v in enumerate(row) if v is None]
    if missing:
        raise ConfigError(f"no test accuracy for experiences {missing}: evaluate on the whole test stream")
    return row  # type: ignore[return-value]


def _stream_value(metrics: Mapping[str, Any], prefix: str) -> float | None:
    # the stream keys carry the task of the last evaluated experience; take the newest one
    found = [(k, v) for k, v in metrics.items() if k.startswith(prefix)]
    return float(found[-1][1]) if found else None


def iter_experiences(strategy: Any, benchmark: Any, *, start: int = 0, **train_kwargs: Any) -> Iterator[dict[str, Any]]:
    """Train ``strategy`` on ``benchmark.train_stream[start:]``; test on the whole test stream after each.

    Yields one dict per experience: ``experience``, ``accuracies`` (one per test
    experience: a row of the accuracy matrix), and Avalanche's own ``stream_accuracy``
    (pooled over all test samples), ``stream_forgetting`` and ``stream_bwt``.
    """
    test_stream = benchmark.test_stream
    n = len(test_stream)
    for exp in list(benchmark.train_stream)[start:]:
        strategy.train(exp, eval_streams=[], **train_kwargs)
        metrics = strategy.eval(test_stream)
        yield {
            "experience": int(exp.current_experience),
            "accuracies": accuracy_row(metrics, n),
            "stream_accuracy": _stream_value(metrics, "Top1_Acc_Stream/eval_phase/test_stream"),
            "stream_forgetting": _stream_value(metrics, "StreamForgetting/eval_phase/test_stream"),
            "stream_bwt": _stream_value(metrics, "StreamBWT/eval_phase/test_stream"),
        }


# =========================================================================== baselines
class FixedSynapticIntelligencePlugin(SynapticIntelligencePlugin):
    """Avalanche 0.6.0's SI with its CPU bug fixed.

    ``SynapticIntelligencePlugin.extract_weights`` stores ``param.detach().cpu().flatten()``:
    on the CPU that is a *view* of the live parameter, so the "old" weights move with the
    new ones, every weight change reads as 0 and SI reduces to Naive. This subclass clones
    the stored start-of-experience and start-of-iteration weights after the parent has
    extracted them (on a GPU ``.cpu()`` already copies, and the clone changes nothing).
    """

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        super().before_training_exp(strategy, **kwargs)
        for t in self.ewc_data[0].values():
            t.data = t.data.clone()

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        super().before_training_iteration(strategy, **kwargs)
        for t in self.syn_data["old_theta"].values():
            t.data = t.data.clone()


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(nn.Flatten(), *layers)


class MultiHeadMLP(MultiTaskModule):
    """A ReLU MLP trunk with Avalanche's ``MultiHeadClassifier`` (one head per task)."""

    def __init__(self, sizes: Sequence[int], head_classes: int = 2):
        super().__init__()
        self.trunk = _mlp(sizes[:-1]) if len(sizes) > 2 else nn.Sequential(nn.Flatten())
        if len(sizes) > 2:
            self.trunk.append(nn.ReLU())
        self.classifier = MultiHeadClassifier(sizes[-2], head_classes)

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        return self.classifier(self.trunk(x), task_label)


#: Avalanche baselines `make_baseline` knows, with their default hyperparameters.
BASELINES: dict[str, dict[str, Any]] = {
    "naive": {},
    "ewc": {"ewc_lambda": 5e3},
    "si": {"si_lambda": 100.0},
    "lwf": {"alpha": 1.0, "temperature": 2.0},
    "replay": {"mem_size": 500},
    "cumulative": {},
}


def make_baseline(
    name: str,
    *,
    arch: Sequence[int] = (784, 400, 400, 10),
    task_aware: bool = False,
    lr: float = 1e-3,
    train_mb_size: int = 128,
    train_epochs: int = 1,
    eval_mb_size: int = 512,
    device: str | torch.device = "cpu",
    seed: int = 0,
    plugins: Sequence[Any] | None = None,
    evaluator: Any = None,
    **hyper: Any,
) -> SupervisedTemplate:
    """An Avalanche strategy with an MLP and Adam: naive, ewc, si (CPU bug fixed), lwf, replay,
    cumulative (retrains on all experiences so far: the upper bound).

    The MLP is ``arch`` with ReLU (PyTorch's default init, seeded with ``seed``); with
    ``task_aware`` the last layer is a ``MultiHeadClassifier`` (one head per task, each as
    wide as its task's classes; ``arch[-1]`` is then unused). ``hyper`` overrides `BASELINES` defaults (``ewc_lambda``, ``si_lambda``,
    ``alpha``, ``temperature``, ``mem_size``).
    """
    from avalanche.training.supervised import EWC, Cumulative, LwF, Naive

    if name not in BASELINES:
        raise ConfigError(f"`strategy` must be one of {', '.join(BASELINES)}; got `{name}`")
    unknown = set(hyper) - set(BASELINES[name])
    if unknown:
        raise ConfigError(f"`{name}` takes no hyperparameters {sorted(unknown)}")
    h = {**BASELINES[name], **hyper}
    torch.manual_seed(seed)
    model: nn.Module = MultiHeadMLP(arch, head_classes=2) if task_aware else _mlp(arch)
    common = dict(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=lr),
                  criterion=nn.CrossEntropyLoss(), train_mb_size=train_mb_size, train_epochs=train_epochs,
                  eval_mb_size=eval_mb_size, device=device, plugins=list(plugins or []),
                  evaluator=default_evaluator() if evaluator is None else evaluator)
    if name == "ewc":
        return EWC(ewc_lambda=h["ewc_lambda"], **common)
    if name == "cumulative":
        return Cumulative(**common)
    if name == "lwf":
        return LwF(alpha=h["alpha"], temperature=h["temperature"], **common)
    if name == "si":
        common["plugins"].append(FixedSynapticIntelligencePlugin(si_lambda=h["si_lambda"]))
    if name == "replay":
        common["plugins"].append(ReplayPlugin(mem_size=int(h["mem_size"])))
    return Naive(**common)


def summarize_rows(rows: Sequence[Sequence[float]]) -> dict[str, Any]:
    """`amstream.continual.summarize` of accuracy-matrix rows."""
    return summarize(np.asarray(rows))
