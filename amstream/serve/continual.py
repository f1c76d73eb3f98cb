"""Continual metrics of `amstream serve`: per-task accuracy and forgetting on a task sequence.

A stream whose distribution changes in steps (a *task sequence*: Split-MNIST's digit pairs,
Permuted-MNIST's permutations, ...) is served like any other; `Continual` watches it:

* **Task ids in the stream** (a JSON ``"task"`` field, a binary v2 header, an NPZ ``task``
  array) mark which task a sample belongs to. The engine then keeps each minibatch within one
  task, counts the prequential accuracy per task, and treats a change of task as the end of an
  *experience*.
* **A held-out evaluation set** (``--eval-source``: samples of every task with their task ids)
  is scored per task at the end of each experience, before the first minibatch of the next
  task is learned: that is row i of the accuracy matrix ``R[i, j]`` (accuracy on task j after
  training through experience i), the matrix ``amstream continual`` prints. It is also scored
  every ``eval_every`` learned samples, so the gauges move while a task is being learned.

Forgetting of task j is the accuracy it had when its last experience ended minus its accuracy
now (Avalanche's ``StreamForgetting`` on a plain task sequence); without task ids in the
stream there are no experiences, and forgetting is the drop from the best accuracy seen on that
task (Chaudhry et al., 2018). The average accuracy is over the tasks trained so far (every
evaluation task when the stream names none). `Continual.summary` gives the matrix and scores
(the scores of `amstream.continual.summarize` on a plain task sequence).

Everything here but the evaluation set is part of the serve state (rows, best accuracies, the
current task, per-task counts), so after ``kill -9`` a restart continues the same matrix.

Examples
--------
>>> import numpy as np
>>> from amstream import AMConfig, make_learner
>>> rng = np.random.default_rng(0)
>>> x = rng.standard_normal((40, 3)).astype(np.float32)
>>> evals = EvalSet.from_arrays(x, (x[:, 0] > 0).astype(np.int64), np.repeat([0, 1], 20))
>>> c = Continual(evals, eval_every=None)
>>> learner = make_learner(AMConfig(arch=(3, 4, 2), seed=0))
>>> c.before_learn(learner, np.zeros(8, np.int64)) is None      # the first task starts
True
>>> c.after_learn(learner, np.zeros(8, np.int64), np.ones(8, bool)) is None
True
>>> ev = c.before_learn(learner, np.ones(8, np.int64))            # task 0 ended: row 0
>>> ev.reason, ev.after_task, sorted(ev.accuracies)
('task_end', 0, [0, 1])
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from amstream.exceptions import ConfigError

__all__ = ["Continual", "EvalSet", "Evaluation"]

log = logging.getLogger("amstream.serve")

NO_TASK = -1


@dataclass(frozen=True)
class EvalSet:
    """Held-out samples of each task: ``tasks[t] = (x [n, d] float32, y [n] int64)``."""

    tasks: Dict[int, tuple]

    @staticmethod
    def from_arrays(x: Any, y: Any, task: Any, *, per_task: Optional[int] = None) -> "EvalSet":
        """Group samples by task id (every id must be >= 0); ``per_task`` keeps the first N of each."""
        x, y, task = np.asarray(x, np.float32), np.asarray(y), np.asarray(task)
        if not (len(x) == len(y) == len(task)) or not len(x):
            raise ConfigError("the evaluation set is empty or its arrays differ in length")
        if (task < 0).any():
            raise ConfigError(f"{int((task < 0).sum())} evaluation samples name no task: every sample of "
                              "`--eval-source` needs its task id (JSON `task`, binary v2, NPZ array `task`)")
        out = {}
        for t in np.unique(task).tolist():
            idx = np.flatnonzero(task == t)[:per_task]
            out[int(t)] = (torch.from_numpy(np.ascontiguousarray(x[idx])), torch.from_numpy(y[idx].astype(np.int64)))
        return EvalSet(out)

    @staticmethod
    def from_file(path: Any, *, n_features: Optional[int], n_classes: Optional[int],
                  per_task: Optional[int] = None) -> "EvalSet":
        """Read a .jsonl / .npz file (the formats of ``serve --source``) of labelled samples with task ids."""
        from amstream.connectors.files import FileSource

        source = FileSource(path, n_features=n_features, n_classes=n_classes)
        try:
            records = []
            while True:
                batch = source.next_batch(max_records=10000)
                if not batch:
                    break
                records.extend(batch)
            decoded = source.codec.decode_records(records)
        finally:
            source.close()
        if decoded.rejections:
            r = decoded.rejections[0]
            raise ConfigError(f"`{path}`: {len(decoded.rejections)} evaluation samples are invalid (row {r.index}: "
                              f"{r.reason}: {r.detail})")
        return EvalSet.from_arrays(decoded.X, decoded.y, decoded.task, per_task=per_task)

    @property
    def n_features(self) -> int:
        return int(next(iter(self.tasks.values()))[0].shape[1])

    def describe(self) -> str:
        sizes = {t: int(len(y)) for t, (_, y) in sorted(self.tasks.items())}
        return f"{len(sizes)} tasks, {sum(sizes.values()):,} samples"

    def accuracies(self, learner: Any) -> Dict[int, float]:
        """The learner's accuracy on each task's samples."""
        from amstream.continual import accuracy

        return {t: accuracy(learner, x, y) for t, (x, y) in sorted(self.tasks.items())}


@dataclass(frozen=True)
class Evaluation:
    """One scoring of the evaluation set (`Step.evaluation`)."""

    reason: str  # "task_end" (a row of the matrix), "periodic" or "final"
    after_task: Optional[int]  # the task whose experience just ended ("task_end"), or the current one
    experience: int  # experiences ended before this scoring
    learned_samples: int
    accuracies: Dict[int, float]
    forgetting: Dict[int, float]
    average_accuracy: float
    average_forgetting: float

    def as_dict(self) -> Dict[str, Any]:
        return {"event": "evaluation", "reason": self.reason, "after_task": self.after_task,
                "experience": self.experience, "learned_samples": self.learned_samples,
                "accuracies": {str(t): round(a, 6) for t, a in self.accuracies.items()},
                "forgetting": {str(t): round(f, 6) for t, f in self.forgetting.items()},
                "average_accuracy": _round(self.average_accuracy), "average_forgetting": _round(self.average_forgetting)}


@dataclass
class _TaskCounts:
    n: int = 0
    correct: int = 0


@dataclass
class Continual:
    """Per-task prequential counts and, with an `EvalSet`, per-task accuracy and forgetting.

    Parameters
    ----------
    eval_set
        Held-out samples per task (None: per-task prequential accuracy only).
    eval_every
        Also score the evaluation set every this many learned samples (None: only at task ends).
    """

    eval_set: Optional[EvalSet] = None
    eval_every: Optional[int] = None
    current: int = NO_TASK  # the task of the last learned minibatch
    rows: List[Dict[str, Any]] = field(default_factory=list)  # the matrix: {"after_task", "learned", "accuracies"}
    ended: Dict[int, float] = field(default_factory=dict)  # task -> its accuracy when its last experience ended
    best: Dict[int, float] = field(default_factory=dict)  # task -> its best accuracy so far
    counts: Dict[int, _TaskCounts] = field(default_factory=dict)
    learned: int = 0
    since_eval: int = 0
    last: Optional[Evaluation] = None

    def __post_init__(self) -> None:
        if self.eval_every is not None and self.eval_every < 1:
            raise ConfigError(f"`eval_every` must be >= 1 or None, got `{self.eval_every}`")

    @property
    def active(self) -> bool:
        """Whether there is anything to report (task ids seen, or an evaluation set)."""
        return self.eval_set is not None or bool(self.counts)

    # ---- the engine's calls ------------------------------------------------------------------------
    def before_learn(self, learner: Any, task: np.ndarray) -> Optional[Evaluation]:
        """Before a minibatch of tasks ``task`` is learned: when its task differs from the last
        minibatch's, the experience of that task ended; score it (a row of the matrix)."""
        new = int(task[-1]) if len(task) else NO_TASK
        if new == NO_TASK or new == self.current:
            return None
        ended, self.current = self.current, new
        if ended == NO_TASK or self.eval_set is None:
            return None
        return self._evaluate(learner, "task_end", ended)

    def after_learn(self, learner: Any, task: np.ndarray, correct: np.ndarray) -> Optional[Evaluation]:
        """After a minibatch is learned: count its prequential hits per task; score the evaluation
        set when ``eval_every`` samples have been learned since the last scoring."""
        n = len(task)
        self.learned += n
        self.since_eval += n
        if n and task.max() >= 0:
            for t in np.unique(task[task >= 0]).tolist():
                mask = task == t
                c = self.counts.setdefault(int(t), _TaskCounts())
                c.n += int(mask.sum())
                c.correct += int(correct[mask].sum())
        if self.eval_set is not None and self.eval_every is not None and self.since_eval >= self.eval_every:
            return self._evaluate(learner, "periodic", None)
        return None

    def finish(self, learner: Any) -> Optional[Evaluation]:
        """Score the evaluation set as the model is now (the last row, when the stream ended)."""
        if self.eval_set is None:
            return None
        return self._evaluate(learner, "final", None)

    # ---- scores --------------------------------------------------------------------------------
    def _evaluate(self, learner: Any, reason: str, ended: Optional[int]) -> Evaluation:
        assert self.eval_set is not None
        acc = self.eval_set.accuracies(learner)
        self.since_eval = 0
        if ended is not None:
            self.rows.append({"after_task": ended, "learned": self.learned, "accuracies": dict(acc)})
            self.ended[ended] = acc.get(ended, math.nan)
        if self.ended:  # experiences are known: forgetting since a task's end, over the tasks trained
            forgetting = {t: self.ended[t] - a for t, a in acc.items() if t in self.ended and t != self.current}
            trained = [a for t, a in acc.items() if t in self.ended or t == self.current]
        else:  # no task ids: forgetting from the best accuracy seen
            forgetting = {t: self.best[t] - a for t, a in acc.items() if t in self.best}
            trained = list(acc.values()) if self.current == NO_TASK else [acc.get(self.current, math.nan)]
        for t, a in acc.items():
            self.best[t] = max(a, self.best.get(t, -math.inf))
        self.last = Evaluation(
            reason=reason, after_task=ended if ended is not None else (None if self.current == NO_TASK else self.current),
            experience=len(self.rows), learned_samples=self.learned, accuracies=acc, forgetting=forgetting,
            average_accuracy=float(np.mean(trained)) if trained else math.nan,
            average_forgetting=float(np.mean(list(forgetting.values()))) if forgetting else math.nan)
        log.info("evaluation (%s%s): accuracy per task %s; average %s, forgetting %s", reason,
                 "" if ended is None else f", task {ended} ended",
                 " ".join(f"{t}:{a:.3f}" for t, a in acc.items()), _fmt(self.last.average_accuracy),
                 _fmt(self.last.average_forgetting))
        return self.last

    def prequential(self) -> Dict[int, float]:
        """Test-then-train accuracy of each task named in the stream."""
        return {t: c.correct / c.n for t, c in sorted(self.counts.items()) if c.n}

    def summary(self) -> Dict[str, Any]:
        """What serve reports: the accuracy matrix (rows at task ends, then the last scoring when it
        is later than the last row), its scores, and per-task prequential accuracy."""
        out: Dict[str, Any] = {"prequential_accuracy": {str(t): round(a, 6) for t, a in self.prequential().items()},
                               "current_task": None if self.current == NO_TASK else self.current}
        if self.eval_set is None:
            return out
        tasks = sorted(self.eval_set.tasks)
        rows = [[r["accuracies"].get(t, math.nan) for t in tasks] for r in self.rows]
        trained = [r["after_task"] for r in self.rows]
        last = self.last
        if last is not None and last.reason != "task_end" and last.learned_samples > (self.rows[-1]["learned"] if self.rows else 0):
            rows.append([last.accuracies.get(t, math.nan) for t in tasks])
            trained.append(last.after_task)
        out.update(tasks=tasks, trained_tasks=trained, matrix=[[round(a, 6) for a in row] for row in rows])
        if last is not None:
            out.update(average_accuracy=_round(last.average_accuracy), forgetting=_round(last.average_forgetting),
                       accuracies={str(t): round(a, 6) for t, a in last.accuracies.items()},
                       task_forgetting={str(t): round(f, 6) for t, f in last.forgetting.items()})
        if rows and trained == list(range(len(rows))) and tasks[:len(rows)] == trained:
            from amstream.continual import summarize  # a plain task sequence 0, 1, 2, ...: the usual scores

            out["scores"] = {k: round(v, 6) for k, v in summarize(np.asarray(rows)).items()}
        return out

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"current": self.current, "rows": [dict(r, accuracies={int(t): float(a) for t, a in r["accuracies"].items()})
                                                  for r in self.rows],
                "ended": dict(self.ended), "best": dict(self.best),
                "counts": {t: [c.n, c.correct] for t, c in self.counts.items()},
                "learned": self.learned, "since_eval": self.since_eval}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.current = int(state.get("current", NO_TASK))
        self.rows = [{"after_task": int(r["after_task"]), "learned": int(r["learned"]),
                      "accuracies": {int(t): float(a) for t, a in r["accuracies"].items()}} for r in state.get("rows", [])]
        self.ended = {int(t): float(a) for t, a in state.get("ended", {}).items()}
        self.best = {int(t): float(a) for t, a in state.get("best", {}).items()}
        self.counts = {int(t): _TaskCounts(int(v[0]), int(v[1])) for t, v in state.get("counts", {}).items()}
        self.learned = int(state.get("learned", 0))
        self.since_eval = int(state.get("since_eval", 0))
        self.last = None


def _round(v: float) -> Optional[float]:
    return None if v is None or v != v else round(float(v), 6)


def _fmt(v: float) -> str:
    return "n/a" if v != v else f"{v:.4f}"
