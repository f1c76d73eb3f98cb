"""`amstream serve --distributed`: one rank of several serve processes that learn one model.

Launched by ``torchrun`` (one process per rank, on one machine or several), every rank joins
the same Kafka consumer group and reads the partitions the group gives it; ``torch.distributed``
keeps the ranks' models identical. `DistributedRunner` is the `Runner` of one rank; it steps
in lockstep with the others, one *tick* at a time::

    take records from the source (the group's rebalance hooks may run here)
    tick: all-reduce a few numbers (`lockstep.Report`) ─► the same `lockstep.Plan` on every rank
        roll back to the last group checkpoint        (a rank's partitions changed)
        or: grow the classes, learn k minibatches     (each rank its own samples, maybe none; the
                                                       learner all-reduces the weight step's sums)
            checkpoint                                (gather every rank's offsets and carry;
                                                       rank 0 writes; then each rank commits its own)
        stop                                          (any rank asked to, end of input, idle exit)

The rules that keep every sample learned exactly once are in `amstream.serve.lockstep`; this
module runs them over ``torch.distributed``: `Ranks` holds the collectives (on a gloo group of
their own, with a timeout), `join_group` and `restore` set a rank up, `DistributedRunner` drives it.

A collective that fails (a peer died: gloo sees its connections close) or does not complete
(a peer hangs: the group's timeout) raises `DistributedError`; the rank then exits without a
checkpoint and ``torchrun --max-restarts`` starts the group again from the last one. A rank that
is asked to stop waits at most `Ranks.grace_s` for its peers to reach the next tick, so SIGTERM
ends it within seconds even when a peer is stuck.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import time
from dataclasses import replace
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from amstream import distributed
from amstream.checkpoint import CheckpointManager
from amstream.connectors.base import Sink, Source
from amstream.connectors.records import Offsets, Record, TopicPartition, decode_offsets
from amstream.exceptions import CheckpointError, CheckpointsLostError, ConfigError, DistributedError
from amstream.serve import lockstep
from amstream.serve.engine import Engine, Step, check_state
from amstream.serve.runner import Runner, RunnerConfig, RunnerEvents, _Checkpointer, _DirectFeed

__all__ = ["DistributedRunner", "Ranks", "join_group", "restore"]

log = logging.getLogger("amstream.serve")

RETRY_WINDOW_S = 1.5  # a rank retries a failing poll this long, then ticks (its peers wait meanwhile)


# ---- the collectives ------------------------------------------------------------------------------
class Ranks:
    """This rank's view of the group and the collectives serve needs.

    Parameters
    ----------
    group
        The ``torch.distributed`` process group of the control messages (gloo; see `join_group`).
    model_group
        The group the learner all-reduces its weight step over (gloo on CPUs, nccl on GPUs).
    overlap
        AM-Adam: start each layer's gradient all-reduce as soon as it is known (the default), or
        reduce each one blocking (`amstream.distributed.Reducer`).
    grace_s
        Once a stop is requested, how long a wait for the other ranks may still take.
    """

    def __init__(self, group: Any = None, model_group: Any = None, *, overlap: bool = True,
                 grace_s: float = 5.0) -> None:
        if not dist.is_initialized():
            raise ConfigError("torch.distributed is not initialized: call `amstream.distributed.init_from_env()` first")
        self.group = group
        self.model_group = model_group if model_group is not None else group
        self.overlap = overlap
        self.grace_s = grace_s
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.stopping: Callable[[], bool] = lambda: False  # set by the runner

    def attach(self, learner: Any) -> None:
        """Make ``learner`` learn with the other ranks (`amstream.distributed.attach`)."""
        distributed.attach(learner, self.model_group, overlap=self.overlap)

    def agree(self, report: lockstep.Report) -> lockstep.Report:
        """The tick: every rank's report combined (element-wise maximum, see `lockstep.Report`)."""
        t = torch.tensor(report.encode(), dtype=torch.float64)
        work = self._call("tick", lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group, async_op=True))
        self._wait(work, "tick")
        return lockstep.Report.decode(t.tolist())

    def all_gather(self, obj: Any, what: str) -> List[Any]:
        """``obj`` of every rank, in rank order."""
        out: List[Any] = [None] * self.world_size
        self._call(what, lambda: dist.all_gather_object(out, obj, group=self.group))
        return out

    def broadcast(self, obj: Any, what: str) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        self._call(what, lambda: dist.broadcast_object_list(box, src=0, group=self.group))
        return box[0]

    def check_same(self, facts: Dict[str, Any]) -> None:
        """Refuse to run when the ranks were not started alike (flags, sizes, initial model)."""
        everyone = self.all_gather(facts, "start")
        for r, theirs in enumerate(everyone):
            for key, value in facts.items():
                if theirs.get(key) != value:
                    raise ConfigError(f"rank {r} has `{key}` = `{theirs.get(key)}`, rank {self.rank} `{value}`: "
                                      "every rank must be started with the same flags")

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        with self.collective(what):
            return fn()

    @contextlib.contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """Code that runs collectives (the learner's weight step): their errors as `DistributedError`."""
        try:
            yield
        except RuntimeError as exc:
            raise self._lost(what, exc) from exc

    def _wait(self, work: Any, what: str) -> None:
        """Wait for ``work`` while staying responsive to a stop (a blocking wait would defer
        signal handlers until it returns)."""
        pause, stop_seen = 2e-5, None
        while not work.is_completed():
            if stop_seen is None and self.stopping():
                stop_seen = time.monotonic()
            if stop_seen is not None and time.monotonic() - stop_seen > self.grace_s:
                raise DistributedError(
                    f"rank {self.rank} is stopping, but the other ranks did not reach the next `{what}` within "
                    f"{self.grace_s:g} s (one is stuck or gone): exiting without a checkpoint; the last group "
                    "checkpoint stands")
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)
        try:
            work.wait()
        except RuntimeError as exc:
            raise self._lost(what, exc) from exc

    def _lost(self, what: str, exc: BaseException) -> DistributedError:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return DistributedError(f"rank {self.rank}: the `{what}` collective failed ({first[:300]}): a peer rank "
                                "died or timed out; exiting without a checkpoint (torchrun `--max-restarts` starts "
                                "the group again from the last one)")


def join_group(*, timeout_s: float = 120.0, overlap: bool = True, grace_s: float = 5.0) -> Ranks:
    """Initialize ``torch.distributed`` from torchrun's environment (a clear error without it)
    and make the groups serve uses: control messages on gloo, the learner's reductions on the
    default backend (nccl where CUDA is available), both with ``timeout_s``."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        distributed.init_from_env(timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout)
    model_group = control if dist.get_backend() == "gloo" else dist.new_group(timeout=timeout)
    return Ranks(control, model_group, overlap=overlap, grace_s=grace_s)


def restore(ranks: Ranks, directory: Optional[str], *, strict: bool = False) -> Optional[Dict[str, Any]]:
    """The newest valid serve state in rank 0's ``directory`` (None: none), on every rank: only
    rank 0 reads the directory, the others receive the state (``strict``: as
    `CheckpointManager.restore`)."""
    found: Any = None
    if ranks.rank == 0 and directory:
        try:
            loaded = CheckpointManager(directory).restore(strict=strict)
            if loaded is not None:
                check_state(loaded["state"])
                found = loaded["state"]
        except CheckpointError as exc:
            found = (isinstance(exc, CheckpointsLostError), f"`{directory}`: {exc}")
    found = ranks.broadcast(found, "restore")
    if isinstance(found, tuple):
        lost, message = found
        raise (CheckpointsLostError if lost else CheckpointError)(f"rank 0 cannot restore the checkpoint in {message}")
    return found


# ---- the runner of one rank -------------------------------------------------------------------------
class DistributedRunner(Runner):
    """A `Runner` that is one rank of a group learning one model (see the module docstring).

    Takes the `Runner`'s arguments, and:

    Parameters
    ----------
    ranks
        The group (`Ranks`).
    base
        The serve state the group starts from (`restore`), or None: the engine's state now,
        which must be the same on every rank (a new model built from the same seed).
    checkpoints
        Rank 0's `CheckpointManager` (other ranks must pass None: only rank 0 writes).

    Polling is on the runner's thread (no prefetch thread), so rebalance hooks only run while
    the rank takes records, never in a tick.
    """

    def __init__(self, engine: Engine, source: Source, *, ranks: Ranks, base: Optional[Dict[str, Any]] = None,
                 config: Optional[RunnerConfig] = None, checkpoints: Optional[CheckpointManager] = None,
                 predictions: Optional[Sink] = None, dead_letters: Any = None,
                 events: Optional[RunnerEvents] = None) -> None:
        if checkpoints is not None and ranks.rank != 0:
            raise ConfigError(f"only rank 0 writes checkpoints; rank {ranks.rank} was given `{checkpoints}`")
        if not engine.can_snapshot:
            raise ConfigError("`--distributed` needs the feature count up front (`--n-features`, `--dataset` or a "
                              "full `--arch`), or a checkpoint: ranks cannot size the model from their own messages")
        super().__init__(engine, source, config=replace(config or RunnerConfig(), prefetch=False),
                         checkpoints=checkpoints, predictions=predictions, dead_letters=dead_letters, events=events)
        self.ranks = ranks
        ranks.stopping = self._stop.is_set
        self._checkpointer = _GroupCheckpointer(self)
        self.rollbacks = 0
        self._epoch = 0  # partition changes the rebalance hooks saw
        self._rolled_epoch = 0  # ... as of the last rollback
        self._first_seen: Offsets = {}  # where partitions absent from base started (see `_note_records`)
        self._group_assigned_at: Optional[float] = None
        self._set_base(base if base is not None else engine.state_dict())
        self._rollback(partitions=[])

    # ---- the base: the last state the group checkpointed ------------------------------------------
    def _set_base(self, state: Dict[str, Any]) -> None:
        self.base = state
        self._base_offsets = decode_offsets(state.get("offsets", {}))
        self._first_seen = {tp: off for tp, off in self._first_seen.items() if tp not in self._base_offsets}
        c = self.engine.counters
        self._base_this_run = (c.learned_samples_this_run, c.bad_messages_this_run)

    def _rollback(self, partitions: Optional[Sequence[TopicPartition]] = None) -> None:
        """Continue from base with the partitions held now: every rank does this at the same tick."""
        with self.lock:
            epoch = self._epoch
            held = list(self.source.assignment()) if partitions is None else list(partitions)
            engine = self.engine
            engine.load_state_dict(lockstep.share_of(self.base, self.ranks.rank, held))
            c = engine.counters
            c.learned_samples_this_run, c.bad_messages_this_run = self._base_this_run
            self.ranks.attach(engine.learner)
            seek = {tp: self._base_offsets.get(tp, self._first_seen.get(tp)) for tp in held}
            seek = {tp: off for tp, off in seek.items() if off is not None}
            if seek:
                self.source.seek(seek)
            self._rolled_epoch = epoch
        if partitions is None:
            self.rollbacks += 1
            log.info("rank %d: the group's partitions changed: every rank continues from the last group "
                     "checkpoint (%s samples learned), this one with %s", self.ranks.rank,
                     f"{self.base.get('counters', {}).get('learned_samples', 0):,}", _fmt_tps(held))

    # ---- rebalance hooks: note the change, start where base says -----------------------------------
    def on_assign(self, partitions: List[TopicPartition]) -> Offsets:
        with self.lock:
            self._epoch += 1
            seek = {tp: self._base_offsets[tp] for tp in partitions if tp in self._base_offsets}
            absent = [tp for tp in partitions if tp not in self._base_offsets]
            policy = self.config.absent_partitions
            if policy == "earliest":
                seek.update({tp: 0 for tp in absent})
        self.events.after_assign(list(partitions), seek, absent, policy)
        return seek

    def on_revoke(self, partitions: List[TopicPartition]) -> Offsets:
        """Nothing to commit: the group commits only what a group checkpoint holds (the next owner
        starts at the base's offsets, reported here)."""
        with self.lock:
            self._epoch += 1
            base = {tp: self._base_offsets[tp] for tp in partitions if tp in self._base_offsets}
        self.events.after_revoke(list(partitions), base)
        return {}

    # ---- the loop --------------------------------------------------------------------------------------
    def _loop(self) -> Iterator[Step]:
        feed = self._feed = _DirectFeed(self)
        feed.retry_window_s = RETRY_WINDOW_S
        feed.start()
        busy = False
        while True:
            records = feed.take(0 if busy else None)  # while the group learns, nobody waits for records
            now = time.monotonic()
            if records:
                self._note_records(records, now)
            elif not busy:
                self._check_truncation(now)
            self._limit_reached()
            group = self.ranks.agree(self._report(now))
            if group.assigned and self._group_assigned_at is None:
                self._group_assigned_at = now
            todo = lockstep.plan(group, idle_exit_s=self.config.idle_exit_s)
            busy = todo.steps > 0
            if todo.rollback:
                self._rollback()
            else:
                self._grow(todo.n_classes)
                for _ in range(todo.steps):
                    with self.ranks.collective("weight step"):
                        step = self._learn(allow_empty=True)
                    if step.batch:
                        yield step
                if todo.checkpoint:
                    self._group_checkpoint("shutdown" if todo.stop else "periodic")
            if todo.stop:
                self.request_stop(todo.stop if todo.stop != "stop requested" else "another rank stopped")
                return
            self._maybe_status(now)

    def _note_records(self, records: Sequence[Record], now: float) -> None:
        """Remember where a partition absent from base started (its first record since it was
        assigned): a rollback seeks it there again."""
        self._last_record = now
        if self._first_data is None:
            self._first_data = now
        for r in records:
            tp = (r.topic, r.partition)
            if tp not in self._base_offsets and tp not in self._first_seen:
                self._first_seen[tp] = r.offset

    def _report(self, now: float) -> lockstep.Report:
        engine, config = self.engine, self.config
        buffered = engine.buffered
        exhausted = self._feed is not None and self._feed.exhausted
        idle = now - self._last_record
        flush = buffered > 0 and (exhausted or (config.flush_after_s is not None and idle >= config.flush_after_s
                                                and self._caught_up()))
        since = None if self._group_assigned_at is None else max(self._last_record, self._group_assigned_at)
        model = engine.model
        return lockstep.Report(
            stop=self._stop.is_set(), changed=self._epoch != self._rolled_epoch, full=buffered // engine.batch_size,
            flush=flush, due=self._checkpointer.due(), dirty=engine.dirty,
            labels=engine.max_label + 1 if model.grow_classes and model.classification else 0,
            quiet_s=0.0 if since is None else now - since, assigned=bool(self.source.assignment()),
            holding=buffered > 0, finished=exhausted and buffered == 0)

    def _grow(self, n_classes: int) -> None:
        model = self.engine.model
        learner = model.learner
        if model.grow_classes and learner is not None and n_classes > learner.n_outputs:
            before = learner.n_outputs
            model.fit_labels(np.array([n_classes - 1]))
            log.info("labels up to %d seen by the group: the model now has %d classes (was %d)", n_classes - 1,
                     n_classes, before)

    # ---- checkpoints: all ranks at one tick ----------------------------------------------------------
    def _group_checkpoint(self, reason: str) -> None:
        with self.lock:
            saved = self._checkpointer.save(reason)
            offsets = dict(self.engine.offsets)
        if saved and self._feed is not None:
            self._feed.request_commit(offsets)

    def _final_checkpoint(self) -> Tuple[bool, Offsets]:
        """The last checkpoint was the stop's, taken by every rank at one tick; nothing is
        written alone. Committed offsets must be covered: only when nothing changed since."""
        return not self.engine.dirty, dict(self.engine.offsets)

    # ---- what a run reports ------------------------------------------------------------------------
    def summary(self) -> Dict[str, Any]:
        """`Runner.summary` of this rank (its share of the lifetime counters), plus the group's
        totals as of its last checkpoint and a digest of the model (equal on every rank)."""
        out = super().summary()
        learner = self.engine.learner
        base = self.base.get("counters", {})
        out.update(rank=self.ranks.rank, world_size=self.ranks.world_size, rollbacks=self.rollbacks,
                   model_digest=None if learner is None else lockstep.model_digest(learner.state_dict()),
                   group={"learned_samples": int(base.get("learned_samples", 0)),
                          "key_checksum": int(base.get("key_checksum", 0)),
                          "bad_messages": int(base.get("bad_messages", 0)),
                          "offsets": dict(self.base.get("offsets", {}))})
        return out


class _GroupCheckpointer(_Checkpointer):
    """The group's checkpoint: every rank flushes its sinks and sends its part; the parts are
    merged (on every rank: it is the next base); rank 0 writes the result atomically; once every
    rank knows it is written, each commits its own partitions' offsets (`DistributedRunner`)."""

    def save(self, reason: str) -> bool:
        runner = self.runner
        assert isinstance(runner, DistributedRunner)
        engine, ranks, events = runner.engine, runner.ranks, runner.events
        t0 = time.perf_counter()
        flushed: Optional[str] = None
        try:
            for sink in (runner.predictions, runner.dead_letters):
                if sink is not None:
                    sink.flush(timeout_s=runner.config.shutdown_timeout_s * 5)
        except Exception as exc:
            flushed = f"rank {ranks.rank}: {exc}"
        t1 = time.perf_counter()
        runner.timers.sinks += t1 - t0
        state = engine.state_dict()
        learner = state.pop("learner")
        parts = ranks.all_gather({"flush_error": flushed, **state}, "checkpoint")
        errors = [p.pop("flush_error") for p in parts]
        try:
            if any(errors):
                raise CheckpointError("a sink could not deliver: " + "; ".join(e for e in errors if e))
            merged = lockstep.merge_states(runner.base, parts, learner)
        except lockstep.PartitionOverlap as exc:  # every rank sees it: all roll back
            self._failed(reason, exc, t1)
            runner._rollback()
            return False
        except CheckpointError as exc:
            self._failed(reason, exc, t1)
            return False
        path: Optional[str] = None
        error: Optional[str] = None
        if runner.checkpoints is not None:
            try:
                path = str(runner.checkpoints.save(
                    engine.learner.n_updates, merged,
                    metadata={"command": "serve", "reason": reason, "time": time.time(),
                              "world_size": ranks.world_size, "learned_samples": merged["counters"]["learned_samples"],
                              "offsets": merged["offsets"]}))
            except CheckpointError as exc:
                error = str(exc)
        path, error = ranks.broadcast((path, error), "checkpoint")
        if error is not None:
            self._failed(reason, CheckpointError(f"rank 0 could not write it: {error}"), t1)
            return False
        seconds = time.perf_counter() - t1
        runner.timers.checkpoint += seconds
        self.last_mono = time.monotonic()
        if path is not None:
            self.last_path, self.last_time = path, time.time()
        engine.mark_saved()
        self.failures_in_a_row, self.retry_at = 0, 0.0
        self.saved_learned = merged["counters"]["learned_samples"]
        runner._set_base(merged)
        self.saved_offsets = dict(engine.offsets)
        events.after_checkpoint(reason, path, seconds, merged["counters"]["learned_samples"],
                                decode_offsets(merged["offsets"]))
        return True

    def _failed(self, reason: str, error: BaseException, t1: Optional[float] = None) -> None:
        self.last_mono = time.monotonic()
        if t1 is not None:
            self.runner.timers.checkpoint += time.perf_counter() - t1
        super()._failed(reason, error)  # every rank sees the same failures: all stop at the same count


def _fmt_tps(tps: Sequence[TopicPartition]) -> str:
    return "[" + ", ".join(f"{t}:{p}" for t, p in sorted(tps)) + "]" if tps else "no partitions"


def local_rank() -> int:
    """torchrun's LOCAL_RANK (0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))
