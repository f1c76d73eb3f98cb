"""The runner of `amstream serve`: a source, an `Engine`, checkpoints, signals, retries.

`Runner` drives an `amstream.serve.engine.Engine` from a `amstream.connectors.base.Source`::

    open the source (retrying while the broker is unreachable)
    loop, until a stop (signal, limit, idle, end of a file, a permanent error):
        take records (polled here, or by a prefetch thread that owns the source)
        engine.ingest(records) ─► rejections to the dead-letter sink
        while a minibatch is buffered: engine.learn() ─► predictions sink
        every N minibatches / T seconds:
            flush sinks ─► checkpoint engine.state_dict() atomically ─► commit its offsets
        idle: learn a partial minibatch once caught up; report what is wrong while nothing comes
    shutdown: stop the prefetch thread ─► checkpoint ─► commit ─► close the source

The order in the checkpoint step is quix-streams' ``Checkpoint.commit``: sinks first, then the
state, then the offsets, so a committed offset is always covered by a checkpoint.

Rebalance hooks (`GroupSource`) call `Runner.on_assign` / `Runner.on_revoke` on the Kafka
client's I/O thread while the source is polled; every use of the engine happens under one lock,
so a hook sees the engine between two calls, and ``on_revoke`` checkpoints before the partitions go.

Errors: a transient `StreamError` (broker down) is retried with backoff, forever, with a log line
per attempt; a permanent one (unreadable codec, corrupt batch, refused authorization, missing
topic) stops the run: the runner checkpoints what was learned, then `Runner.run` raises it. A
poll that has not returned after ``stall_timeout_s`` is a permanent error too (a client stuck in
a loop must not look like a quiet stream). A partition that now ends (or restarts) below the next
offset to learn lost data at the broker: permanent too, unless ``on_data_loss="continue"``. A
checkpoint that cannot be written is retried with backoff; ``max_checkpoint_failures`` in a row
(or a failed shutdown checkpoint) stop the run with a `CheckpointError`. Each shutdown step that
talks to a broker is bounded by ``shutdown_timeout_s``, so a signal ends the run within seconds in
every state.

Examples
--------
>>> import numpy as np
>>> from amstream import AMConfig, make_learner
>>> from amstream.connectors.codec import BinaryCodec
>>> from amstream.connectors.testing import Fail, TestingSource
>>> from amstream.serve.engine import Engine, StreamModel
>>> x = np.random.default_rng(0).standard_normal((100, 4)).astype(np.float32)
>>> codec = BinaryCodec(4, 2)
>>> values = codec.encode_many(x, (x[:, 0] > 0).astype(int))
>>> down = Fail(StreamError("broker down", transient=True))
>>> def engine():
...     return Engine(StreamModel(make_learner(AMConfig(arch=(4, 8, 2), seed=1)), codec), batch_size=25)
>>> runner = Runner(engine(), TestingSource(values[:60] + [down] + values[60:]),
...                 config=RunnerConfig(retry_initial_s=0.01))
>>> summary = runner.run()
>>> summary["learned_samples"], summary["stop_reason"], summary["offsets"]
(100, 'end of input', {'test:0': 100})
>>> broken = Fail(StreamError("snappy codec missing", transient=False))
>>> runner = Runner(engine(), TestingSource(values[:60] + [broken] + values[60:]))
>>> runner.run()
Traceback (most recent call last):
...
amstream.exceptions.StreamError: snappy codec missing
>>> runner.summary()["learned_samples"], runner.summary()["carry"], runner.summary()["offsets"]
(50, 10, {'test:0': 60})
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterator, List, NamedTuple, Optional, Sequence, Union

import torch

from amstream.checkpoint import CheckpointManager
from amstream.connectors.base import GroupSource, Sink, Source
from amstream.connectors.records import Offsets, Record, TopicPartition, encode_offsets
from amstream.exceptions import CheckpointError, ConfigError, OffsetRewindError, StreamError
from amstream.faults import kill_point
from amstream.retry import Backoff, Stopped, retry
from amstream.serve.engine import Engine, EngineEvents, Step

__all__ = ["Runner", "RunnerConfig", "RunnerEvents", "Status", "encode_predictions"]


@dataclass(frozen=True)
class RunnerConfig:
    """How a `Runner` schedules, limits and bounds its work (every field keyword-only in use)."""

    checkpoint_every_batches: int = 100  # after this many minibatches, once a take is learned (0: not by count)
    checkpoint_every_seconds: float = 30.0  # ... or this many seconds, whichever comes first (0: not by time)
    max_samples: Optional[int] = None  # stop after learning this many samples in this run
    max_seconds: Optional[float] = None  # stop after running this long
    idle_exit_s: Optional[float] = None  # stop when no record arrived for this long after an assignment
    flush_after_s: Optional[float] = 2.0  # learn a partial minibatch once caught up and idle this long
    absent_partitions: str = "committed"  # partitions not in the state start at the group's offset, or "earliest"
    on_data_loss: str = "stop"  # a partition that lost records we had not read yet: "stop" (an error) or "continue"
    max_poll_records: Optional[int] = None  # records per poll (default: ~2 minibatches; 5000 when prefetching)
    poll_timeout_ms: int = 200  # how long one poll waits for records
    prefetch: Optional[bool] = None  # poll on a thread that owns the source (default: for group sources)
    prefetch_bytes: int = 32 << 20  # the prefetch thread pauses while this many bytes wait to be learned
    stall_timeout_s: float = 120.0  # a poll still running after this long is a permanent error
    shutdown_timeout_s: float = 2.0  # bound on each shutdown step that talks to a broker
    retry_initial_s: float = 0.5  # first wait after a transient source error ...
    retry_max_s: float = 30.0  # ... doubling up to this
    max_checkpoint_failures: int = 5  # stop with an error after this many failed checkpoints in a row
    checkpoint_retry_s: float = 1.0  # first wait after a failed checkpoint, doubling up to `retry_max_s`

    def __post_init__(self) -> None:
        if self.absent_partitions not in ("committed", "earliest"):
            raise ConfigError(f"`absent_partitions` must be `committed` or `earliest`, got `{self.absent_partitions}`")
        if self.on_data_loss not in ("stop", "continue"):
            raise ConfigError(f"`on_data_loss` must be `stop` or `continue`, got `{self.on_data_loss}`")
        for name in ("max_samples", "max_seconds", "idle_exit_s", "flush_after_s"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"`{name}` must be >= 0 or None, got `{value}`")
        if self.max_checkpoint_failures < 1:
            raise ConfigError(f"`max_checkpoint_failures` must be >= 1, got `{self.max_checkpoint_failures}`")
        for name in ("poll_timeout_ms", "stall_timeout_s", "shutdown_timeout_s", "retry_initial_s",
                     "checkpoint_retry_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"`{name}` must be > 0, got `{getattr(self, name)}`")


@dataclass(frozen=True)
class Status:
    """What the runner reports about once a second (`RunnerEvents.on_status`)."""

    learned_samples: int
    learned_samples_this_run: int
    model_step: int
    n_classes: Optional[int]
    buffered: int
    bad_messages: int
    prequential: Any  # the engine's `Prequential`
    lag: Dict[TopicPartition, Optional[int]]
    assigned: bool
    idle_s: float  # since the last record (0 while records arrive)
    exhausted: bool
    checkpoint_time: Optional[float]  # wall clock of the last checkpoint
    timers: Dict[str, float]  # the summary's *_seconds
    health: Callable[[], Optional[str]]  # the source's problem, asked only when worth logging
    continual: Any = None  # the engine's `amstream.serve.continual.Continual`


class RunnerEvents(EngineEvents):
    """What the runner reports, besides the engine's events; no-ops here (see `Telemetry`)."""

    def after_assign(self, partitions: List[TopicPartition], seek: Offsets, absent: List[TopicPartition],
                     absent_policy: str) -> None:
        """Partitions were assigned; ``seek`` are the state's offsets for them."""

    def after_revoke(self, partitions: List[TopicPartition], offsets: Offsets) -> None:
        """Partitions are going; ``offsets`` (checkpointed) are handed to the group."""

    def after_rewind(self, partition: TopicPartition, offset: int, expected: int, why: str) -> None:
        """A partition continues below our next offset: the source lost data (``why``)."""

    def after_checkpoint(self, reason: str, path: Optional[str], seconds: float, learned: int,
                         offsets: Offsets) -> None:
        """A checkpoint was written (``path`` None without a checkpoint directory)."""

    def after_checkpoint_failed(self, reason: str, error: BaseException) -> None:
        """A checkpoint was not written (a sink could not deliver, the file could not be saved)."""

    def after_commit_failed(self, offsets: Offsets, error: Optional[BaseException]) -> None:
        """The group refused (or did not answer) an offset commit; the checkpoint holds them."""

    def after_source_error(self, error: BaseException, retry_in_s: Optional[float], learned: int) -> None:
        """Reading failed: retried after ``retry_in_s``, or (None) a permanent error that stops the run."""

    def on_status(self, status: Status) -> None:
        """About once a second."""

    def after_stop(self, summary: Dict[str, Any]) -> None:
        """The run ended (``summary`` is `Runner.summary`)."""


class _Rewind(NamedTuple):
    partition: TopicPartition
    offset: int
    expected: int
    why: str


class _Failure(NamedTuple):
    error: BaseException


_Item = Union[List[Record], _Rewind, _Failure]


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, StreamError) and exc.transient


class _Timers:
    """Seconds spent, by activity (the summary's ``*_seconds``)."""

    NAMES = ("poll", "fetch", "decode", "learn", "sinks", "checkpoint")

    def __init__(self) -> None:
        for name in self.NAMES:
            setattr(self, name, 0.0)

    def as_dict(self) -> Dict[str, float]:
        return {f"{name}_seconds": round(getattr(self, name), 4) for name in self.NAMES}


# ---- feeding records to the runner ---------------------------------------------------------------
class _Feed:
    """Polls the source (retrying transient errors) and hands the runner items in order:
    record lists, rewinds (the source continues below our offsets) and failures."""

    def __init__(self, runner: "Runner") -> None:
        self.runner = runner
        self.source = runner.source
        self.halt = threading.Event()  # stop polling (set by the runner's stop, or at shutdown)
        self.poll_started: Optional[float] = None  # monotonic start of the poll in progress
        self.retry_window_s: Optional[float] = None  # give a transient error back as "no records" after this long
        self._backoff = Backoff(runner.config.retry_initial_s, max(runner.config.retry_initial_s,
                                                                     runner.config.retry_max_s))

    def poll(self, max_records: int, timeout_ms: Optional[int] = None) -> List[_Item]:
        runner, source = self.runner, self.source
        wait_ms = runner.config.poll_timeout_ms if timeout_ms is None else timeout_ms

        def attempt() -> List[Record]:
            self.poll_started = time.monotonic()
            try:
                return source.next_batch(max_records=max_records, timeout_ms=wait_ms)
            finally:
                self.poll_started = None

        def on_retry(exc: BaseException, n: int, delay: float) -> None:
            runner.events.after_source_error(exc, delay, runner.engine.counters.learned_samples)

        try:
            records = retry(attempt, transient=_is_transient, backoff=self._backoff, stop=self.halt,
                            on_retry=on_retry, timeout_s=self.retry_window_s)
        except Stopped:
            return []
        except OffsetRewindError as exc:  # the source restarted a partition below our offset: accept it
            source.seek({exc.partition: exc.offset})
            return [_Rewind(exc.partition, exc.offset, exc.expected, "reset")]
        except Exception as exc:
            if _is_transient(exc):  # retried for `retry_window_s`: the next poll tries again
                return []
            return [_Failure(exc)]
        return [records] if records else []

    def commit(self, offsets: Offsets) -> None:
        """Commit the offsets of partitions the source still has (on the thread that owns it)."""
        assigned = set(self.source.assignment())
        mine = {tp: off for tp, off in offsets.items() if tp in assigned}
        if not mine:
            return
        kill_point("commit")
        error: Optional[BaseException] = None
        try:
            ok = self.source.commit(mine, timeout_s=self.runner.config.shutdown_timeout_s)
        except Exception as exc:  # a commit is for monitoring and hand-over: the checkpoint holds them
            ok, error = False, exc
        if not ok:
            self.runner.commit_failures += 1
            self.runner.events.after_commit_failed(mine, error)

    def seek_items(self, seeks: Offsets) -> List[_Item]:
        """Seek the source (on the thread that owns it) and the rewinds for the engine, in order."""
        assigned = set(self.source.assignment())
        seeks = {tp: off for tp, off in seeks.items() if tp in assigned}
        if seeks:
            self.source.seek(seeks)
        return [_Rewind(tp, off, self.runner.engine.offsets.get(tp, off), "truncated") for tp, off in seeks.items()]


class _DirectFeed(_Feed):
    """Polls on the runner's own thread (files; Kafka with ``prefetch=False``)."""

    def start(self) -> None:
        pass

    def take(self, timeout_ms: Optional[int] = None) -> List[Record]:
        runner = self.runner
        t0 = time.perf_counter()
        items = self.poll(runner.poll_size(), timeout_ms)
        runner.timers.poll += time.perf_counter() - t0
        return runner.process(items)

    def request_commit(self, offsets: Offsets) -> None:
        self.commit(offsets)

    def request_seek(self, seeks: Offsets) -> None:
        self.runner.process(self.seek_items(seeks))

    @property
    def exhausted(self) -> bool:
        return self.source.exhausted

    @property
    def queued(self) -> int:
        return 0

    def drop(self, partitions: Sequence[TopicPartition]) -> None:
        pass

    def stop(self, timeout_s: float) -> bool:
        return True


class _PrefetchFeed(_Feed):
    """Polls on a thread that owns the source, so that fetching overlaps learning (the Kafka client
    keeps one fetch in flight and sends the next only when a poll drains the last one). The runner
    takes items about two minibatches ahead of learning: what is taken but not learned goes into
    each checkpoint's carry, which should stay small."""

    def __init__(self, runner: "Runner") -> None:
        super().__init__(runner)
        self._cond = threading.Condition()
        self._queue: Deque[_Item] = deque()
        self._queued_records = 0
        self._queued_bytes = 0
        self._commit_request: Optional[Offsets] = None
        self._seek_request: Offsets = {}
        self._done = False  # a bounded source ended; everything it read is queued
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="amstream-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        config = self.runner.config
        max_records = config.max_poll_records or 5000  # big polls keep a fetch in flight
        while not self.halt.is_set():
            with self._cond:
                while self._queued_bytes >= config.prefetch_bytes and not self.halt.is_set():
                    self._cond.wait(0.05)
                request, self._commit_request = self._commit_request, None
                seeks, self._seek_request = self._seek_request, {}
            if seeks:
                self._push(self.seek_items(seeks))
            if request is not None:
                self.commit(request)
            if self.halt.is_set():
                break
            t0 = time.perf_counter()
            items = self.poll(max_records)
            self.runner.timers.fetch += time.perf_counter() - t0
            if not items and self.source.exhausted:
                with self._cond:
                    self._done = True
                    self._cond.notify_all()
                break
            self._push(items)
            if any(isinstance(item, _Failure) for item in items):
                break  # never poll a source again after it failed for good

    def _push(self, items: List[_Item]) -> None:
        if not items:
            return
        with self._cond:
            for item in items:
                self._queue.append(item)
                if isinstance(item, list):
                    self._queued_records += len(item)
                    self._queued_bytes += sum(len(r.value) for r in item)
            self._cond.notify_all()

    def take(self) -> List[Record]:
        runner = self.runner
        t0 = time.perf_counter()
        with self._cond:
            if not self._queue and runner.engine.buffered < runner.engine.batch_size:
                self._cond.wait(runner.config.poll_timeout_ms / 1000)
        runner.timers.poll += time.perf_counter() - t0
        out: List[Record] = []
        engine = runner.engine
        with runner.lock:  # taking and ingesting are one step for the rebalance hooks
            while engine.buffered < 2 * engine.batch_size:
                with self._cond:
                    if not self._queue:
                        break
                    item = self._queue.popleft()
                    if isinstance(item, list):
                        # about two minibatches at a time, the rest stays queued: a big poll is not
                        # taken whole, so checkpoints keep their schedule and carry little
                        want = max(1, math.ceil((2 * engine.batch_size - engine.buffered) / engine.samples_per_record))
                        if len(item) > want:
                            self._queue.appendleft(item[want:])
                            item = item[:want]
                        self._queued_records -= len(item)
                        self._queued_bytes -= sum(len(r.value) for r in item)
                    self._cond.notify_all()
                out += runner.process([item])
                if isinstance(item, _Failure):
                    break
        return out

    def request_commit(self, offsets: Offsets) -> None:
        with self._cond:
            self._commit_request = offsets

    def request_seek(self, seeks: Offsets) -> None:
        with self._cond:
            self._seek_request.update(seeks)

    @property
    def exhausted(self) -> bool:
        with self._cond:
            return self._done and not self._queue

    @property
    def queued(self) -> int:
        return len(self._queue)

    def drop(self, partitions: Sequence[TopicPartition]) -> None:
        """Forget fetched records of revoked partitions: their next owner reads them."""
        gone = set(partitions)
        with self._cond:
            self._commit_request = None
            kept: Deque[_Item] = deque()
            for item in self._queue:
                if isinstance(item, list):
                    item = [r for r in item if (r.topic, r.partition) not in gone]
                    if not item:
                        continue
                kept.append(item)
            self._queue = kept
            self._queued_records = sum(len(i) for i in kept if isinstance(i, list))
            self._queued_bytes = sum(len(r.value) for i in kept if isinstance(i, list) for r in i)
            self._cond.notify_all()

    def stop(self, timeout_s: float) -> bool:
        """Stop the thread; False when it did not end within ``timeout_s`` (a poll that hangs)."""
        self.halt.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                return False
        return True


class _Checkpointer:
    """The checkpoint schedule and the save: flush the sinks, then write the engine's state
    atomically, then remember the offsets it holds (only those may be committed).

    A failed checkpoint (a sink that cannot deliver, a full or read-only disk) is retried after a
    backoff, not at every minibatch; after ``max_checkpoint_failures`` in a row the run stops with
    a `CheckpointError`, as learning on would only pile up work that a restart must redo."""

    def __init__(self, runner: "Runner") -> None:
        self.runner = runner
        engine = runner.engine
        self.saved_offsets: Offsets = dict(engine.offsets) if not engine.dirty else {}
        self.last_mono = time.monotonic()
        self.last_time: Optional[float] = None  # wall clock of the last checkpoint file
        self.last_path: Optional[str] = None
        self.failures = 0  # in all
        self.failures_in_a_row = 0
        self.last_error: Optional[BaseException] = None
        self.retry_at = 0.0  # monotonic time before which no new attempt is due after a failure
        config = runner.config
        self.backoff = Backoff(config.checkpoint_retry_s, max(config.checkpoint_retry_s, config.retry_max_s))
        self.saved_learned = engine.counters.learned_samples  # the learned-sample count the checkpoint holds

    def due(self) -> bool:
        engine, config = self.runner.engine, self.runner.config
        if not engine.dirty or not engine.can_snapshot or time.monotonic() < self.retry_at:
            return False
        by_count = config.checkpoint_every_batches and engine.batches_since_saved >= config.checkpoint_every_batches
        by_time = config.checkpoint_every_seconds and time.monotonic() - self.last_mono >= config.checkpoint_every_seconds
        return bool(by_count or by_time)

    def save(self, reason: str) -> bool:
        """True when the engine's current offsets are safely checkpointed (call under the runner's lock)."""
        runner = self.runner
        engine, timers, events = runner.engine, runner.timers, runner.events
        if not engine.can_snapshot:
            return False
        t0 = time.perf_counter()
        timeout = runner.config.shutdown_timeout_s * (1 if reason == "shutdown" else 5)
        try:
            for sink in (runner.predictions, runner.dead_letters):
                if sink is not None:
                    sink.flush(timeout_s=timeout)
        except Exception as exc:
            timers.sinks += time.perf_counter() - t0
            self._failed(reason, exc)
            return False
        t1 = time.perf_counter()
        timers.sinks += t1 - t0
        self.last_mono = time.monotonic()
        path = None
        if runner.checkpoints is not None:
            learner = engine.learner
            assert learner is not None
            try:
                path = runner.checkpoints.save(
                    learner.n_updates, engine.state_dict(),
                    metadata={"command": "serve", "reason": reason, "time": time.time(),
                              "learned_samples": engine.counters.learned_samples,
                              "offsets": encode_offsets(engine.offsets)})
            except CheckpointError as exc:
                timers.checkpoint += time.perf_counter() - t1
                self._failed(reason, exc)
                return False
            self.last_path, self.last_time = str(path), time.time()
        seconds = time.perf_counter() - t1
        timers.checkpoint += seconds
        engine.mark_saved()
        self.failures_in_a_row, self.retry_at = 0, 0.0
        self.saved_learned = engine.counters.learned_samples
        self.saved_offsets = dict(engine.offsets)
        events.after_checkpoint(reason, self.last_path if path is not None else None, seconds,
                                engine.counters.learned_samples, dict(engine.offsets))
        return True

    def _failed(self, reason: str, exc: BaseException) -> None:
        runner, config = self.runner, self.runner.config
        self.failures += 1
        self.failures_in_a_row += 1
        self.last_error = exc
        self.retry_at = time.monotonic() + self.backoff.delay(self.failures_in_a_row)
        runner.events.after_checkpoint_failed(reason, exc)
        if self.failures_in_a_row >= config.max_checkpoint_failures and runner.error is None:
            runner.error = self.give_up(exc)
            runner.request_stop(f"error: {runner.error}")

    def give_up(self, exc: BaseException) -> CheckpointError:
        engine = self.runner.engine
        saved = "no checkpoint in this run" if self.last_path is None else f"the last one is `{self.last_path}`"
        error = CheckpointError(
            f"{self.failures_in_a_row} checkpoint(s) in a row could not be written ({saved}); the last error: "
            f"{exc}. Stopping without committing offsets past the last checkpoint: the "
            f"{engine.counters.learned_samples - self.saved_learned:,} samples learned after it will be learned "
            "again by the next run. Free the disk or fix its permissions, then restart")
        error.__cause__ = exc
        return error


# ---- the runner ---------------------------------------------------------------------------------
class Runner:
    """Learn from ``source`` with ``engine``, checkpointing state and offsets together.

    Parameters
    ----------
    engine
        The `Engine` (new, or loaded from a checkpoint's state).
    source
        Any `Source`. A `GroupSource`'s rebalance hooks are pointed at this runner; any other
        source is sought to the engine's offsets right after it opens.
    config
        `RunnerConfig`: checkpoint schedule, limits, polling, timeouts.
    checkpoints
        A `CheckpointManager`, or None (nothing survives a restart).
    predictions
        A `Sink` for one JSON prediction per learned sample (its record's key kept).
    dead_letters
        A `DeadLetterSink` for rejected records.
    events
        Told what happens (`RunnerEvents`, e.g. `amstream.serve.telemetry.Telemetry`); it also
        becomes the engine's listener, so one object hears both.
    """

    def __init__(
        self,
        engine: Engine,
        source: Source,
        *,
        config: Optional[RunnerConfig] = None,
        checkpoints: Optional[CheckpointManager] = None,
        predictions: Optional[Sink] = None,
        dead_letters: Any = None,
        events: Optional[RunnerEvents] = None,
    ) -> None:
        if not isinstance(source, Source):
            raise ConfigError(f"`source` must be an `amstream.connectors.base.Source`, got `{type(source).__name__}`")
        if predictions is not None and not engine.keep_keys:
            raise ConfigError("writing predictions needs an engine with `keep_keys=True`")
        self.engine = engine
        self.source = source
        self.config = config or RunnerConfig()
        self.checkpoints = checkpoints
        self.predictions = predictions
        self.dead_letters = dead_letters
        self.events = events or RunnerEvents()
        engine.events = self.events
        self.lock = threading.RLock()
        self.timers = _Timers()
        self.commit_failures = 0
        self.error: Optional[BaseException] = None  # the permanent error that stopped the run
        self._stop = threading.Event()
        self._stop_reason = ""
        self._checkpointer = _Checkpointer(self)
        self._feed: Optional[Union[_DirectFeed, _PrefetchFeed]] = None
        self._t0 = time.monotonic()
        self._first_data: Optional[float] = None
        self._last_learn: Optional[float] = None
        if isinstance(source, GroupSource):
            for name in ("on_assign", "on_revoke"):
                hook = getattr(source, name)
                if hook is not None and hook != getattr(self, name):
                    raise ConfigError(f"the source's `{name}` hook is already set: the runner needs it "
                                      "(leave it None)")
                setattr(source, name, getattr(self, name))

    # ---- control --------------------------------------------------------------------------------
    def request_stop(self, reason: str = "stop requested") -> None:
        """Stop after the current minibatch (thread- and signal-safe)."""
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()
            if self._feed is not None:
                self._feed.halt.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @contextlib.contextmanager
    def signals_handled(self) -> Iterator[None]:
        """SIGTERM / SIGINT stop the run after the current minibatch (checkpoint, commit, close:
        each step bounded); a second signal interrupts whatever is left (``KeyboardInterrupt``).
        Main thread only."""

        signalled = []

        def on_signal(signum: int, frame: Any) -> None:
            name = signal.Signals(signum).name
            if signalled:  # the shutdown the first one started is bounded; this one cuts it short
                raise KeyboardInterrupt(f"second signal ({name})")
            signalled.append(name)
            self.request_stop(name)  # when already stopping (a limit, an error) the shutdown just goes on

        old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    # ---- rebalance hooks (may run on the Kafka client's I/O thread, between engine calls) ---------
    def on_assign(self, partitions: List[TopicPartition]) -> Offsets:
        """Offsets to start newly assigned ``partitions`` at (see `Engine.assign`)."""
        with self.lock:
            absent_policy = self.config.absent_partitions
            seek = self.engine.assign(partitions, absent_at_zero=absent_policy == "earliest")
            absent = [tp for tp in partitions if tp not in self.engine.offsets]
            kill_point("assign")
        self.events.after_assign(list(partitions), seek, absent, absent_policy)
        return seek

    def on_revoke(self, partitions: List[TopicPartition]) -> Offsets:
        """Checkpoint, then return the revoked partitions' checkpointed offsets for the source to commit."""
        with self.lock:
            if self.engine.dirty:
                self._checkpointer.save("revoke")
            saved = self._checkpointer.saved_offsets
            out = {tp: saved[tp] for tp in partitions if tp in saved}
            self.engine.revoke(partitions)
            if self._feed is not None:
                self._feed.drop(partitions)
        self.events.after_revoke(list(partitions), out)
        return out

    # ---- running --------------------------------------------------------------------------------
    def run(self, *, on_step: Optional[Callable[[Step], None]] = None) -> Dict[str, Any]:
        """Drive `steps` to the end; returns `summary`. Raises the permanent error that stopped
        the run, if one did (after checkpointing)."""
        for step in self.steps():
            if on_step is not None:
                on_step(step)
        return self.summary()

    def steps(self) -> Iterator[Step]:
        """Run, yielding each learned minibatch's `Step`.

        Ends on `request_stop`, a limit of the config, idleness, the end of a bounded source or a
        permanent error; then checkpoints, commits and closes the source (also when the consumer
        of the generator stops early). A permanent error is raised once that is done.
        """
        self._t0 = time.monotonic()
        self._last_record = self._t0
        self._had_assignment = False
        self._last_status = 0.0
        self._last_truncation_check = 0.0
        try:
            if self._open():
                yield from self._loop()
        finally:
            self._shutdown()
        if self.error is not None:
            raise self.error

    def _loop(self) -> Iterator[Step]:
        """The run between opening the source and shutting down (see `steps`)."""
        threaded = self.config.prefetch if self.config.prefetch is not None else isinstance(self.source, GroupSource)
        self._feed = _PrefetchFeed(self) if threaded else _DirectFeed(self)
        if self._stop.is_set():
            self._feed.halt.set()
        self._feed.start()
        while not self._stop.is_set() and not self._limit_reached():
            records = self._feed.take()
            now = time.monotonic()
            if records:
                self._last_record = now
                if self._first_data is None:
                    self._first_data = now
            while self.engine.ready and not self._stop.is_set() and not self._limit_reached():
                yield self._learn()
            # a checkpoint due mid-take waits for the take (about two minibatches) to be learned:
            # it then carries fewer than a minibatch of samples
            if not records and not self._feed.queued:  # nothing arrived, not merely: nothing taken yet
                step = self._when_idle(now)
                if step is not None:
                    yield step
            self._maybe_checkpoint()
            self._maybe_status(now)
            self._check_stall(now)

    def summary(self) -> Dict[str, Any]:
        """What a run reports (lifetime counters come from the restored state)."""
        engine, c, p = self.engine, self.engine.counters, self.engine.prequential
        active = self._active_seconds()
        learner = engine.learner
        return {
            "learned_samples": c.learned_samples,
            "learned_samples_this_run": c.learned_samples_this_run,
            "bad_messages": c.bad_messages,
            "bad_messages_by_reason": dict(sorted(c.bad_by_reason.items())),
            "bad_messages_this_run": c.bad_messages_this_run,
            "prequential_accuracy": _nan_to_none(p.accuracy),
            "prequential_loss": _nan_to_none(p.loss),
            "window_accuracy": _nan_to_none(p.window_accuracy),
            "window_loss": _nan_to_none(p.window_loss),
            "samples_per_second": round(c.learned_samples_this_run / active, 1) if active > 0 else 0.0,
            "seconds": round(time.monotonic() - self._t0, 3),
            "active_seconds": round(active, 3),
            "offsets": encode_offsets(engine.offsets),
            "key_checksum": c.key_checksum,
            "model_step": 0 if learner is None else learner.n_updates,
            "n_features": None if learner is None else learner.n_inputs,
            "n_classes": None if learner is None or not p.classification else learner.n_outputs,
            "minibatches": c.minibatches,
            "records": c.records,
            "carry": engine.buffered,
            "batch_size": engine.batch_size,
            "checkpoint": self._checkpointer.last_path,
            "commit_failures": self.commit_failures,
            "checkpoint_failures": self._checkpointer.failures,
            "stop_reason": self._stop_reason,
            "error": None if self.error is None else str(self.error),
            **self.timers.as_dict(),
        }

    # ---- internals: the source ----------------------------------------------------------------------
    def _open(self) -> bool:
        """Open the source, retrying transient errors until it works or a stop is requested."""
        source = self.source

        def on_retry(exc: BaseException, n: int, delay: float) -> None:
            self.events.after_source_error(exc, delay, self.engine.counters.learned_samples)

        try:
            retry(source.open, transient=_is_transient, stop=self._stop, on_retry=on_retry,
                  backoff=Backoff(1.0, max(1.0, self.config.retry_max_s)))
        except Stopped:
            return False
        except StreamError as exc:  # permanent: nothing was learned here, nothing to checkpoint
            self._fail(exc)
            return False
        kill_point("startup")
        if not isinstance(source, GroupSource):
            seek = self.on_assign(source.assignment())
            if seek:
                source.seek(seek)
        return True

    def poll_size(self) -> int:
        """Records per poll on the runner's thread: about two minibatches."""
        return self.config.max_poll_records or max(1, int(2 * self.engine.batch_size / self.engine.samples_per_record))

    def process(self, items: Sequence[_Item]) -> List[Record]:
        """Apply fed items to the engine, in order; returns the records ingested."""
        out: List[Record] = []
        with self.lock:
            for item in items:
                if isinstance(item, list):
                    ingested = self.engine.ingest(item)
                    self.timers.decode += ingested.seconds
                    if ingested.rejections and self.dead_letters is not None:
                        t0 = time.perf_counter()
                        self.dead_letters.write_rejections(item, ingested.rejections)
                        self.timers.sinks += time.perf_counter() - t0
                    out += item
                elif isinstance(item, _Rewind):
                    if self.config.on_data_loss == "stop":
                        self._fail(data_loss_error(item))
                        break
                    self.events.after_rewind(item.partition, item.offset, item.expected, item.why)
                    self.engine.rewind(item.partition, item.offset)
                else:
                    self._fail(item.error)
        return out

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
            self.events.after_source_error(error, None, self.engine.counters.learned_samples)
            self.request_stop(f"error: {error}")

    def _check_stall(self, now: float) -> None:
        started = self._feed.poll_started if self._feed is not None else None
        if started is not None and now - started > self.config.stall_timeout_s:
            self._fail(StreamError(
                f"the source has not returned from a poll for {now - started:.0f} s (over `stall_timeout_s="
                f"{self.config.stall_timeout_s:g}`): its client is stuck; stopping rather than waiting silently",
                transient=False))

    def _check_truncation(self, now: float) -> None:
        """A partition that ends below the next offset we hold lost its data (a restarted in-memory
        broker, a recreated topic): stop (``on_data_loss="stop"``), or start that partition over at 0."""
        if now - self._last_truncation_check < 2.0:
            return
        self._last_truncation_check = now
        highwater = _ask(self.source.highwater, {})
        with self.lock:
            lost = {tp: 0 for tp, hw in highwater.items()
                    if hw is not None and tp in self.engine.offsets and hw < self.engine.offsets[tp]}
        if lost and self.config.on_data_loss == "stop":
            tp = min(lost)
            self._fail(data_loss_error(_Rewind(tp, highwater[tp], self.engine.offsets[tp], "truncated")))
        elif lost and self._feed is not None:
            self._feed.request_seek(lost)

    # ---- internals: learning --------------------------------------------------------------------------
    def _limit_reached(self) -> bool:
        config = self.config
        if config.max_samples is not None and self.engine.counters.learned_samples_this_run >= config.max_samples:
            self.request_stop(f"max_samples={config.max_samples} reached")
            return True
        if config.max_seconds is not None and time.monotonic() - self._t0 >= config.max_seconds:
            self.request_stop(f"max_seconds={config.max_seconds:g} reached")
            return True
        return False

    def _learn(self, *, allow_empty: bool = False) -> Step:
        with self.lock:
            step = self.engine.learn(allow_empty=allow_empty)
            self.timers.learn += step.seconds
            self._last_learn = time.monotonic()
            if self.predictions is not None and step.batch:
                t0 = time.perf_counter()
                values = encode_predictions(step, self.engine.topics)
                self.predictions.write_batch(values, step.chunk.keys)
                self.timers.sinks += time.perf_counter() - t0
        return step

    def _when_idle(self, now: float) -> Optional[Step]:
        """Nothing arrived in the last poll: learn a waiting partial minibatch, or stop."""
        assert self._feed is not None
        exhausted = self._feed.exhausted
        self._check_truncation(now)
        if self.source.assignment() and not self._had_assignment:
            self._had_assignment = True  # idle time counts from the first assignment (a join takes seconds)
            self._last_record = now
        idle_for = now - self._last_record
        idle_exit = (self.config.idle_exit_s is not None and self._had_assignment
                     and idle_for >= self.config.idle_exit_s)
        step = None
        if self.engine.buffered and not self._limit_reached():
            flush_after = self.config.flush_after_s
            if exhausted or idle_exit or (flush_after is not None and idle_for >= flush_after and self._caught_up()):
                step = self._learn()
        if exhausted and not self.engine.buffered:
            self.request_stop("end of input")
        elif idle_exit and not self.engine.buffered:
            self.request_stop(f"no records for {self.config.idle_exit_s:g} s")
        return step

    def _caught_up(self) -> bool:
        """No lag, and every record the source handed out has been ingested (not still queued)."""
        try:
            lag = self.source.lag()
            delivered = self.source.snapshot()
        except Exception:
            return False
        if not lag or any(v != 0 for v in lag.values()):
            return False
        with self.lock:
            return self.engine.has_taken(delivered)

    # ---- internals: checkpoints ---------------------------------------------------------------------
    def _maybe_checkpoint(self) -> None:
        if not self._checkpointer.due():
            return
        with self.lock:
            saved = self._checkpointer.save("periodic")
            offsets = dict(self.engine.offsets)
        if saved and self._feed is not None:
            self._feed.request_commit(offsets)  # the thread that owns the source commits, after the checkpoint

    def _shutdown(self) -> None:
        feed, timeout = self._feed, self.config.shutdown_timeout_s
        clean = feed is None or feed.stop(timeout)  # from here on this thread owns the source
        saved, offsets = self._final_checkpoint()
        if not clean:  # its poll never returned: the client is unusable; leave it to the process exit
            self._fail(StreamError(f"the source's poll did not return within {timeout:g} s of the stop: "
                                   "not committing, not closing it", transient=False))
        else:
            if saved and offsets and feed is not None:
                feed.commit(offsets)
            try:
                self.source.close(timeout_s=timeout)
            except Exception as exc:  # the state is checkpointed; the group takes the partitions back anyway
                self.events.after_checkpoint_failed("close", exc)
        self.events.after_stop(self.summary())

    def _final_checkpoint(self) -> tuple:
        """``(saved, offsets)``: checkpoint what is not saved yet; whether the offsets are covered.
        A final checkpoint that fails is the run's error (unless it has one already)."""
        with self.lock:
            checkpointer = self._checkpointer
            saved = checkpointer.save("shutdown") if self.engine.dirty else True
            if not saved and self.engine.can_snapshot and self.error is None and checkpointer.last_error is not None:
                self.error = checkpointer.give_up(checkpointer.last_error)
            return saved, dict(self.engine.offsets)

    # ---- internals: status --------------------------------------------------------------------------
    def _active_seconds(self) -> float:
        if self._first_data is None:
            return 0.0
        return max(0.0, (self._last_learn or time.monotonic()) - self._first_data)

    def _maybe_status(self, now: float) -> None:
        if now - self._last_status < 1.0:
            return
        self._last_status = now
        lag = _ask(self.source.lag, {})
        engine, learner = self.engine, self.engine.learner
        self.events.on_status(Status(
            learned_samples=engine.counters.learned_samples,
            learned_samples_this_run=engine.counters.learned_samples_this_run,
            model_step=0 if learner is None else learner.n_updates,
            n_classes=None if learner is None else learner.n_outputs,
            buffered=engine.buffered, bad_messages=engine.counters.bad_messages, prequential=engine.prequential,
            lag=lag, assigned=bool(self.source.assignment()),
            idle_s=now - self._last_record if self._had_assignment else 0.0,
            exhausted=self._feed.exhausted if self._feed is not None else False,
            checkpoint_time=self._checkpointer.last_time, timers=self.timers.as_dict(), health=self.source.health,
            continual=engine.continual))


def encode_predictions(step: Step, topics: Sequence[str]) -> List[bytes]:
    """One JSON prediction per sample of a learned minibatch: the model step that made it (the
    update before this minibatch's), the prediction, its probability (classes), the label and the
    sample's id."""
    chunk, step_before = step.chunk, step.model_step - 1
    ids = zip(chunk.y.tolist(), chunk.topic.tolist(), chunk.partition.tolist(), chunk.offset.tolist(),
              chunk.index.tolist())
    if step.outputs.dim() == 2 and step.predictions.dim() == 1:  # classes
        proba = torch.softmax(step.outputs, dim=1).max(1).values.cpu().tolist()
        return [('{"step":%d,"y_pred":%d,"proba":%.6g,"y":%d,"topic":"%s","partition":%d,"offset":%d,"index":%d}'
                 % (step_before, p, q, y, topics[t], part, off, i)).encode()
                for p, q, (y, t, part, off, i) in zip(step.predictions.cpu().tolist(), proba, ids)]
    return [json.dumps({"step": step_before, "y_pred": row if len(row) > 1 else row[0], "y": y, "topic": topics[t],
                        "partition": part, "offset": off, "index": i}).encode()
            for row, (y, t, part, off, i) in zip(step.outputs.cpu().tolist(), ids)]


def data_loss_error(rewind: _Rewind) -> StreamError:
    """The error that stops a run when a partition lost records (``on_data_loss="stop"``)."""
    (topic, partition), expected = rewind.partition, rewind.expected
    where = (f"restarted at offset {rewind.offset}" if rewind.why == "reset"
             else f"now ends at offset {rewind.offset}" if rewind.offset else "is now empty")
    return StreamError(
        f"partition `{topic}:{partition}` {where}, below offset {expected:,}, the next one this model would learn "
        f"(everything below it is learned): the broker lost data (a restarted in-memory broker, a deleted or "
        f"recreated topic, retention). Stopped rather than re-learn or skip records; nothing was committed past "
        f"offset {expected:,}. To learn what the partition holds now as new data, run again with "
        f"`--on-data-loss continue`", transient=False)


def _ask(question: Callable[[], Any], default: Any) -> Any:
    """A source's answer to a question asked for reporting only: ``default`` if it fails."""
    try:
        return question()
    except Exception:
        return default


def _nan_to_none(v: float) -> Optional[float]:
    return None if v is None or v != v else round(float(v), 6)
