"""One AM model learned by several processes: the weight step's sums, added over ranks.

Each rank runs Algorithm 2.1 on its own samples. The code updates (Algorithm 2.2) are
separable over samples, so they need nothing from the other ranks; the weight update
(Algorithm 2.3) only needs sums over samples, which ``torch.distributed`` all-reduces:

- AM-Adam: each layer's local least-squares gradient and the output layer's gradient, each
  a mean over the rank's samples, weighted by the rank's share of the minibatch and summed,
  is the gradient of the whole minibatch; every rank then takes the same Adam step. A
  layer's reduction starts (asynchronously) as soon as its gradient is known, while the
  layers below are still being computed: the paper's layer-parallel weight update.
- AM-mem: the memory increments ``sum a a^T`` and ``sum c a^T`` are plain sums, so after the
  all-reduce every rank holds the memories of all samples, exactly those of one process that
  saw them all, and BCD gives every rank the same weights.

So N ranks with minibatches ``x_1..x_N`` take the update of one process on their union (to
float rounding). A rank with no samples passes an empty minibatch and still joins every
reduction, in the same order, so no rank waits forever; when the whole minibatch is empty,
no rank updates. Ranks launch with ``torchrun`` (see :func:`init_from_env`); gloo runs on CPUs,
nccl on GPUs.

    learner = make_learner(config)
    distributed.attach(learner)            # after torch.distributed.init_process_group
    learner.learn(x_mine, y_mine)          # every rank, every step: one update of the union
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from amstream.exceptions import ConfigError

__all__ = ["Reducer", "attach", "init_from_env", "rank", "world_size"]


def init_from_env(backend: str | None = None, *, timeout: datetime.timedelta | None = None) -> None:
    """``init_process_group`` from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...):
    gloo on CPUs, nccl where CUDA is available, unless ``backend`` says otherwise.

    The keys go into a namespace of this torchrun attempt: torchrun shares its rendezvous store
    with the workers and keeps it over restarts (``--max-restarts``), and without a namespace a
    restarted group reads the addresses its killed predecessors left there and cannot connect
    (pytorch/pytorch#135712)."""
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"not launched by torchrun: {', '.join(f'`{k}`' for k in missing)} not set "
                          "(run `torchrun --nproc-per-node N .venv/bin/amstream serve --distributed ...`)")
    timeout = timeout or datetime.timedelta(minutes=10)
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"),
                            store=dist.PrefixStore(f"amstream/attempt-{attempt}", store), rank=rank,
                            world_size=world, timeout=timeout)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


class Reducer:
    """The ``reduce`` hook of :func:`amstream.functional.update_weights` for a process group.

    ``overlap=True`` starts each gradient's all-reduce as soon as it is known and waits for them
    all before the optimizer step; ``False`` reduces each one when it is known, blocking (the
    comparison for ``benchmarks/distributed_scaling.py``).
    """

    def __init__(self, group: Any = None, *, overlap: bool = True):
        self.group = group
        self.overlap = overlap
        self.share = 1.0  # this rank's fraction of the minibatch, set by begin()
        self._pending: list[Any] = []

    def begin(self, n_local: int, device: torch.device) -> int:
        """All-reduce the minibatch size; returns the whole minibatch's."""
        n = torch.tensor([float(n_local)], dtype=torch.float64, device=device)
        dist.all_reduce(n, group=self.group)
        total = int(n.item())
        self.share = n_local / total if total else 0.0
        return total

    def __call__(self, what: str, arrays: Sequence[Any]) -> None:
        if what == "wait":
            for work in self._pending:
                work.wait()
            self._pending.clear()
            return
        for a in _tensors(arrays):
            if what == "grad" and self.share != 1.0:
                a *= self.share  # a mean over this rank's samples -> its part of the minibatch mean
            work = dist.all_reduce(a, group=self.group, async_op=self.overlap)
            if work is not None:
                self._pending.append(work)


def _tensors(arrays: Sequence[Any]):
    """The arrays of a layer's gradient (or of a memory increment) as torch tensors that share
    their memory (NumPy arrays are viewed, not copied)."""
    for a in arrays:  # (a layer's gradient is a Dense/Conv tuple: its other fields are not arrays)
        if isinstance(a, np.ndarray):
            yield torch.from_numpy(a)
        elif isinstance(a, torch.Tensor):
            yield a


def attach(learner: Any, group: Any = None, *, overlap: bool = True) -> Reducer:
    """Make ``learner`` (an AM learner) one of the ranks of a model learned by ``group``."""
    from amstream.learner import AMLearner

    if not isinstance(learner, AMLearner):
        raise ConfigError(f"distributed learning needs an AM learner, got `{type(learner).__name__}`")
    if not dist.is_initialized():
        raise ConfigError("torch.distributed is not initialized: call `amstream.distributed.init_from_env()` first")
    reducer = Reducer(group, overlap=overlap)
    learner.reducer = reducer
    return reducer
