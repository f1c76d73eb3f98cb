"""Epoch training and evaluation on in-memory datasets, shared by the CLI and the benchmarks.

:func:`iter_training` is a generator of progress events (one per minibatch, one per
epoch); :func:`fit` drives it with an optional progress bar and returns the history.
The online algos get one update per minibatch; the offline ones (``am-adam-off``,
``am-mem-off``) get the whole training set as one minibatch, i.e. one AM iteration per
epoch, as in the paper's Section 4.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from amstream.learner import Learner

__all__ = ["evaluate", "iter_training", "fit", "TrainingEvent", "Preprocessor"]


@dataclass
class Preprocessor:
    """Per-feature standardization fitted on training data only (kept in checkpoints)."""

    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    @classmethod
    def fit(cls, x: np.ndarray, *, eps: float = 1e-6) -> "Preprocessor":
        mean = x.mean(0).astype(np.float32)
        std = x.std(0).astype(np.float32)
        return cls(mean, np.where(std < eps, 1.0, std).astype(np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.mean is None:
            return x
        return ((x - self.mean) / self.std).astype(np.float32, copy=False)

    def state_dict(self) -> dict[str, Any]:
        if self.mean is None:
            return {}
        return {"mean": torch.from_numpy(self.mean.copy()), "std": torch.from_numpy(self.std.copy())}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> "Preprocessor":
        if not state:
            return cls()
        return cls(state["mean"].numpy(), state["std"].numpy())


@torch.no_grad()
def evaluate(learner: Learner, x: np.ndarray, y: np.ndarray, *, batch_size: int = 5000) -> dict[str, float]:
    """Accuracy and mean loss (classification) or mean squared error (regression)."""
    n = len(x)
    correct = 0
    loss_sum = 0.0
    for s in range(0, n, batch_size):
        xb = torch.as_tensor(x[s:s + batch_size], device=learner.device)
        out = learner.forward(xb)
        if learner.config.loss == "ce":
            yb = torch.as_tensor(y[s:s + batch_size], device=learner.device).long()
            correct += int((out.argmax(1) == yb).sum())
            loss_sum += float(torch.nn.functional.cross_entropy(out, yb, reduction="sum"))
        else:
            yb = torch.as_tensor(y[s:s + batch_size], dtype=torch.float32, device=learner.device).view(out.shape)
            loss_sum += float(0.5 * (out - yb).pow(2).sum())
    result = {"loss": loss_sum / max(n, 1)}
    if learner.config.loss == "ce":
        result["accuracy"] = correct / max(n, 1)
    return result


@dataclass
class TrainingEvent:
    """One step of :func:`iter_training`: ``kind`` is "minibatch" or "epoch"."""

    kind: str
    epoch: int
    minibatch: int  # minibatches learned so far (over all epochs)
    samples: int
    train_loss: float
    seconds: float  # training time so far, evaluation excluded
    test: dict[str, float] = field(default_factory=dict)


def iter_training(
    learner: Learner,
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    x_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    eval_minibatches: Sequence[int] = (),
    eval_epochs: bool = True,
    shuffle: bool = True,
) -> Iterator[TrainingEvent]:
    """Train for ``epochs`` epochs, yielding an event after every minibatch and epoch.

    Test metrics are attached after the minibatches listed in ``eval_minibatches`` and
    after each epoch (``eval_epochs``). Training time excludes evaluation.
    """
    if learner.config.is_offline:
        batch_size = len(x_train)
    rng = np.random.default_rng(seed)
    xt = torch.as_tensor(x_train, device=learner.device)
    yt = torch.as_tensor(y_train, device=learner.device)
    marks = set(int(m) for m in eval_minibatches)
    n = len(x_train)
    minibatch = 0
    seconds = 0.0
    have_test = x_test is not None and y_test is not None
    for epoch in range(1, epochs + 1):
        order = torch.as_tensor(rng.permutation(n) if shuffle else np.arange(n), device=learner.device)
        loss_sum, seen = 0.0, 0
        for s in range(0, n, batch_size):
            idx = order[s:s + batch_size]
            t0 = time.perf_counter()
            update = learner.learn(xt[idx], yt[idx])
            seconds += time.perf_counter() - t0
            minibatch += 1
            loss_sum += update.loss * len(idx)
            seen += len(idx)
            test = evaluate(learner, x_test, y_test) if (have_test and minibatch in marks) else {}
            yield TrainingEvent("minibatch", epoch, minibatch, learner.n_samples, update.loss, seconds, test)
        test = evaluate(learner, x_test, y_test) if (have_test and eval_epochs) else {}
        yield TrainingEvent("epoch", epoch, minibatch, learner.n_samples, loss_sum / max(seen, 1), seconds, test)


def fit(learner: Learner, x_train, y_train, *, progress: bool = False, desc: str = "train",
        on_epoch: Callable[[TrainingEvent], None] | None = None, **kwargs: Any) -> list[TrainingEvent]:
    """Run :func:`iter_training` to the end; returns the epoch events (and evaluated minibatches).

    With ``progress=True`` a tqdm bar shows minibatches, the running loss and the last
    test accuracy.
    """
    epochs = kwargs["epochs"]
    n_batches = 1 if learner.config.is_offline else -(-len(x_train) // kwargs["batch_size"])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * n_batches, desc=desc, unit="mb", dynamic_ncols=True)
    history = []
    last_acc = None
    for event in iter_training(learner, x_train, y_train, **kwargs):
        if event.test or event.kind == "epoch":
            history.append(event)
            if on_epoch is not None and event.kind == "epoch":
                on_epoch(event)
            last_acc = event.test.get("accuracy", last_acc)
        if bar is not None:
            if event.kind == "minibatch":
                bar.update(1)
            postfix = {"epoch": event.epoch, "loss": f"{event.train_loss:.4f}"}
            if last_acc is not None:
                postfix["test_acc"] = f"{last_acc:.4f}"
            bar.set_postfix(postfix, refresh=False)
    if bar is not None:
        bar.close()
    return history
