"""The serve loop: learn from a stream, test-then-train, exactly once per sample.

One loop drives any *source* that hands out records with offsets (`KafkaSource` in a consumer
group, `FileSource` for CSV / JSONL / NPZ files) and one learner::

    poll records ─► decode + validate ─► buffer ─► minibatch of `batch_size` samples
        │                  │                            │
        │                  └─ rejections: counted by reason, logged with topic/partition/offset,
        │                     sent to the dead-letter sink; the model never sees them
        │                                               ▼
        │                          learner.learn(x, y) — one update; its `Update.outputs` are the
        │                          pre-update outputs: the prequential (test-then-train) score
        │                                               ▼
        │                          predictions sink (optional)
        ▼
    every N minibatches / T seconds, on partition revocation and on shutdown:
        flush sinks ─► checkpoint {learner state, next offsets, carry, counters} atomically ─► commit

Exactly once
------------
A checkpoint is taken only between minibatches and holds, besides the learner state,

* ``offsets``: per partition, the next offset after the last record the loop has *taken*
  (decoded: its samples are learned, rejected, or in the carry);
* ``carry``: the samples taken but not learned yet (fewer than a minibatch, with their ids),
  so a restart forms exactly the same minibatches as an uninterrupted run;
* counters: ``learned_samples``, ``key_checksum`` (the sum, mod 2**64, of a 64-bit hash of
  ``(topic, partition, offset, index-in-message)`` of every learned sample: equal sums mean the
  same set of samples whatever the order), bad messages by reason, prequential totals.

Every record before ``offsets`` is thus accounted for in the model, the carry or the bad-message
counts, and nothing after it is; a restart restores the newest valid checkpoint and seeks there,
so after a crash at any moment (``kill -9`` included) every sample is learned exactly once and
every bad message is counted once. Group offsets are committed *after* each checkpoint, for lag
monitoring and hand-over between group members; they are not the source of truth.

Partitions: on assignment, a partition in the checkpoint resumes at its checkpointed offset;
any other one starts at the group's committed offset (the previous owner's last checkpoint),
or at the beginning when the group has none (``absent_partitions="earliest"``: always at the
beginning). On revocation the loop checkpoints and hands the partition's offset to the group;
samples of it already taken stay in the carry and are learned here.

The loop never imports Kafka: the command builds the source (`amstream.connectors`) and passes it
in. Library code logs through `logging`; progress comes out of `ServeLoop.steps` as dicts.
"""
from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Callable, Deque, Dict, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch

from amstream.checkpoint import CheckpointManager
from amstream.connectors.records import Record, decode_offsets, encode_offsets
from amstream.exceptions import CheckpointError, ConfigError, DatasetError, OffsetRewindError
from amstream.learner import Learner, learner_from_state

__all__ = [
    "ServeLoop",
    "Source",
    "Prequential",
    "STATE_KIND",
    "key_checksum",
    "key_hashes",
    "load_serve_checkpoint",
    "topic_hash",
]

log = logging.getLogger(__name__)

TopicPartition = Tuple[str, int]
Offsets = Dict[TopicPartition, int]

STATE_KIND = "amstream.serve"
STATE_VERSION = 1
_MASK64 = (1 << 64) - 1
_TOPIC, _PARTITION, _OFFSET = itemgetter(0), itemgetter(1), itemgetter(2)  # Record fields


class Source(Protocol):
    """What the loop needs from a source (`KafkaSource` and `FileSource` have it).

    Optional: ``open()``; ``exhausted`` (a file at its end); ``on_assign`` / ``on_revoke``
    attributes, which a source that calls rebalance hooks exposes (see `ServeLoop.attach`).
    """

    def poll_batch(self, max_records: int = ..., timeout_ms: int = ...) -> List[Record]: ...

    def seek(self, offsets: Mapping[TopicPartition, int]) -> None: ...

    def snapshot(self) -> Offsets: ...

    def commit(self, offsets: Optional[Mapping[TopicPartition, int]] = None) -> bool: ...

    def lag(self) -> Dict[TopicPartition, Optional[int]]: ...

    def assignment(self) -> List[TopicPartition]: ...

    def close(self) -> None: ...


# ---- sample ids ---------------------------------------------------------------------------------
def topic_hash(topic: str) -> int:
    """A 64-bit hash of a topic name (blake2b), the first ingredient of a sample's key hash."""
    return int.from_bytes(hashlib.blake2b(topic.encode("utf-8"), digest_size=8).digest(), "little")


def _mix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer on uint64 arrays (arithmetic wraps mod 2**64)."""
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def key_hashes(topic_hashes: Any, partitions: Any, offsets: Any, indices: Any) -> np.ndarray:
    """uint64 hashes of sample ids ``(topic, partition, offset, index-in-message)``.

    ``topic_hashes`` are `topic_hash` values (one, or one per sample).
    """
    t = np.asarray(topic_hashes, dtype=np.uint64)
    h = _mix64(t ^ np.asarray(partitions, dtype=np.int64).astype(np.uint64))
    h = _mix64(h ^ np.asarray(offsets, dtype=np.int64).astype(np.uint64))
    return _mix64(h ^ np.asarray(indices, dtype=np.int64).astype(np.uint64))


def key_checksum(topic: str, partitions: Any, offsets: Any, indices: Any) -> int:
    """Order-independent checksum of a set of sample ids of one topic: the sum of their
    `key_hashes` mod 2**64, as a Python int (sums of several topics add up mod 2**64).

    >>> a = key_checksum("t", [0, 0, 1], [5, 6, 5], [0, 0, 0])
    >>> b = (key_checksum("t", [1], [5], [0]) + key_checksum("t", [0, 0], [6, 5], [0, 0])) % 2**64
    >>> a == b, a == key_checksum("t", [0, 0, 1], [5, 7, 5], [0, 0, 0])
    (True, False)
    """
    h = key_hashes(np.uint64(topic_hash(topic)), partitions, offsets, indices)
    return int(h.sum(dtype=np.uint64)) if h.size else 0


# ---- prequential score ------------------------------------------------------------------------
class Prequential:
    """Test-then-train totals and a sliding window of the most recent ``window`` samples.

    >>> p = Prequential(window=4)
    >>> p.update(2, 2, 0.2); p.update(2, 0, 3.0); p.update(2, 1, 1.0)
    >>> p.n, round(p.accuracy, 3), p.window_accuracy
    (6, 0.5, 0.25)
    """

    def __init__(self, window: int = 1000, *, classification: bool = True) -> None:
        if window < 1:
            raise ConfigError(f"`window` must be >= 1, got `{window}`")
        self.window = int(window)
        self.classification = classification
        self.n = 0
        self.correct = 0
        self.loss_sum = 0.0
        self._recent: Deque[Tuple[int, int, float]] = deque()
        self._rn = 0
        self._rc = 0
        self._rl = 0.0

    def update(self, n: int, correct: int, loss_sum: float) -> None:
        self.n += n
        self.correct += correct
        self.loss_sum += loss_sum
        self._recent.append((n, correct, loss_sum))
        self._rn += n
        self._rc += correct
        self._rl += loss_sum
        while len(self._recent) > 1 and self._rn - self._recent[0][0] >= self.window:
            n0, c0, l0 = self._recent.popleft()
            self._rn -= n0
            self._rc -= c0
            self._rl -= l0

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if (self.n and self.classification) else math.nan

    @property
    def loss(self) -> float:
        return self.loss_sum / self.n if self.n else math.nan

    @property
    def window_accuracy(self) -> float:
        return self._rc / self._rn if (self._rn and self.classification) else math.nan

    @property
    def window_loss(self) -> float:
        return self._rl / self._rn if self._rn else math.nan

    def state_dict(self) -> Dict[str, Any]:
        return {"n": self.n, "correct": self.correct, "loss_sum": float(self.loss_sum)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.n = int(state.get("n", 0))
        self.correct = int(state.get("correct", 0))
        self.loss_sum = float(state.get("loss_sum", 0.0))


# ---- the sample buffer ------------------------------------------------------------------------
@dataclass
class _Chunk:
    """Decoded samples with their ids; ``keys`` only when predictions are written."""

    X: np.ndarray  # float32 [n, d]
    y: np.ndarray  # int64 (classes) or float64 (targets) [n]
    topic: np.ndarray  # int32 [n]: index into ServeLoop._topics
    partition: np.ndarray  # int32 [n]
    offset: np.ndarray  # int64 [n]
    index: np.ndarray  # int32 [n]: position in the message (packed binary messages)
    keys: Optional[List[Optional[bytes]]] = None

    def __len__(self) -> int:
        return int(self.X.shape[0])

    def slice(self, a: int, b: Optional[int] = None) -> "_Chunk":
        s = slice(a, b)
        return _Chunk(self.X[s], self.y[s], self.topic[s], self.partition[s], self.offset[s], self.index[s],
                      None if self.keys is None else self.keys[s])

    @staticmethod
    def concat(chunks: Sequence["_Chunk"]) -> "_Chunk":
        if len(chunks) == 1:
            return chunks[0]
        keys = None
        if all(c.keys is not None for c in chunks):
            keys = [k for c in chunks for k in c.keys]  # type: ignore[union-attr]
        return _Chunk(*(np.concatenate([getattr(c, f) for c in chunks])
                        for f in ("X", "y", "topic", "partition", "offset", "index")), keys=keys)


class _Buffer:
    """FIFO of decoded samples, taken in minibatches."""

    def __init__(self) -> None:
        self._chunks: Deque[_Chunk] = deque()
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def append(self, chunk: _Chunk) -> None:
        if len(chunk):
            self._chunks.append(chunk)
            self._n += len(chunk)

    def take(self, n: int) -> _Chunk:
        parts: List[_Chunk] = []
        need = min(n, self._n)
        while need:
            head = self._chunks[0]
            if len(head) <= need:
                parts.append(self._chunks.popleft())
                need -= len(head)
            else:
                parts.append(head.slice(0, need))
                self._chunks[0] = head.slice(need)
                need = 0
        out = _Chunk.concat(parts)
        self._n -= len(out)
        return out

    def peek_all(self) -> Optional[_Chunk]:
        return _Chunk.concat(list(self._chunks)) if self._chunks else None


# ---- the loop ---------------------------------------------------------------------------------
@dataclass
class _Timers:
    poll: float = 0.0  # the learning thread waiting for records
    fetch: float = 0.0  # the poller thread inside poll_batch (prefetching; overlaps learning)
    decode: float = 0.0
    learn: float = 0.0
    sinks: float = 0.0
    checkpoint: float = 0.0

    def as_dict(self) -> Dict[str, float]:
        return {f"{k}_seconds": round(v, 4) for k, v in self.__dict__.items()}


@dataclass
class _Counters:
    learned_samples: int = 0
    key_checksum: int = 0
    bad_messages: int = 0
    bad_by_reason: Dict[str, int] = field(default_factory=dict)
    records: int = 0
    minibatches: int = 0


class ServeLoop:
    """Learn from a source, one update per minibatch, checkpointing state and offsets together.

    Parameters
    ----------
    learner
        The learner (new, or from `load_serve_checkpoint`).
    codec
        Decodes record values (`amstream.connectors.codec`); its ``n_features`` and
        ``n_classes`` must match the learner.
    batch_size
        Samples per minibatch (one AM update each).
    checkpoints
        A `CheckpointManager`, or ``None`` for no checkpoints (nothing survives a restart).
    resume
        The ``state`` of a checkpoint written by this loop (see `load_serve_checkpoint`).
    checkpoint_every_batches, checkpoint_every_seconds
        Checkpoint after this many minibatches or this many seconds (when anything changed),
        whichever comes first; 0 disables that trigger. Checkpoints are also taken on
        partition revocation and on shutdown.
    predictions, dead_letters
        Optional sinks: a `KafkaSink` for predictions (one JSON message per learned sample,
        its key kept), a `DeadLetterSink` for rejected records.
    metrics
        A `amstream.metrics.MetricsRegistry` to update.
    window
        Samples in the windowed prequential score.
    max_samples, max_seconds
        Stop after learning this many samples / running this long in this run (None: never),
        at the first minibatch boundary at or after the limit.
    idle_exit_s
        Stop when no record arrived for this long since partitions were assigned (None: never);
        buffered samples are learned first.
    flush_after_s
        Learn a partial minibatch once the source has been caught up (no lag) and idle for
        this long, so a slow stream does not keep samples waiting (None: never).
    absent_partitions
        Where an assigned partition that is not in the checkpoint starts: ``"committed"``
        (the group's committed offset, else the beginning) or ``"earliest"``.
    max_poll_records
        Records per poll (default: about two minibatches).
    poll_timeout_ms
        How long one poll waits for records.
    log_every_s
        Period of the progress log line (None: no periodic lines).
    health_check
        Called while no records arrive; returns a problem description (e.g. "broker
        unreachable") or None. Used for clear logs only.
    prefetch
        Poll the source on a background thread that owns it, so fetching overlaps learning
        (the Kafka client keeps one fetch in flight and sends the next only when a poll drains
        the last one). Default: on for sources with rebalance hooks (Kafka), off for files.
    prefetch_bytes
        The prefetching thread pauses while this many bytes of records wait to be learned.
    """

    def __init__(
        self,
        learner: Learner,
        codec: Any,
        *,
        batch_size: int = 256,
        checkpoints: Optional[CheckpointManager] = None,
        resume: Optional[Mapping[str, Any]] = None,
        checkpoint_every_batches: int = 100,
        checkpoint_every_seconds: float = 30.0,
        predictions: Any = None,
        dead_letters: Any = None,
        metrics: Any = None,
        window: int = 1000,
        max_samples: Optional[int] = None,
        max_seconds: Optional[float] = None,
        idle_exit_s: Optional[float] = None,
        flush_after_s: Optional[float] = 2.0,
        absent_partitions: str = "committed",
        max_poll_records: Optional[int] = None,
        poll_timeout_ms: int = 200,
        log_every_s: Optional[float] = 10.0,
        health_check: Optional[Callable[[], Optional[str]]] = None,
        prefetch: Optional[bool] = None,
        prefetch_bytes: int = 32 << 20,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"`batch_size` must be an int >= 1, got `{batch_size!r}`")
        if absent_partitions not in ("committed", "earliest"):
            raise ConfigError(f"`absent_partitions` must be `committed` or `earliest`, got `{absent_partitions}`")
        if codec.n_features != learner.n_inputs:
            raise ConfigError(f"the codec expects `{codec.n_features}` features, the learner `{learner.n_inputs}`")
        self.classification = learner.config.loss == "ce"
        if self.classification and codec.n_classes != learner.n_outputs:
            raise ConfigError(f"the codec expects `{codec.n_classes}` classes, the learner `{learner.n_outputs}`")
        for name, value in (("max_samples", max_samples), ("max_seconds", max_seconds),
                            ("idle_exit_s", idle_exit_s), ("flush_after_s", flush_after_s)):
            if value is not None and value < 0:
                raise ConfigError(f"`{name}` must be >= 0 or None, got `{value}`")
        self.learner = learner
        self.codec = codec
        self.batch_size = batch_size
        self.checkpoints = checkpoints
        self.checkpoint_every_batches = int(checkpoint_every_batches or 0)
        self.checkpoint_every_seconds = float(checkpoint_every_seconds or 0)
        self.predictions = predictions
        self.dead_letters = dead_letters
        self.metrics = metrics
        self.max_samples = max_samples
        self.max_seconds = max_seconds
        self.idle_exit_s = idle_exit_s
        self.flush_after_s = flush_after_s
        self.absent_partitions = absent_partitions
        self.max_poll_records = max_poll_records
        self.poll_timeout_ms = int(poll_timeout_ms)
        self.log_every_s = log_every_s
        self.health_check = health_check
        self.prefetch = prefetch
        self.prefetch_bytes = int(prefetch_bytes)

        self.prequential = Prequential(window, classification=self.classification)
        self.counters = _Counters()
        self.timers = _Timers()
        self.offsets: Offsets = {}
        self.buffer = _Buffer()
        self._topics: List[str] = []
        self._topic_code: Dict[str, int] = {}
        self._topic_hash: List[int] = []
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._stop_reason = ""
        self._dirty = False
        self._batches_since_ckpt = 0
        self._last_ckpt_time: Optional[float] = None  # wall clock (time.time) of the last save
        self._last_ckpt_mono = time.monotonic()
        self._last_saved_offsets: Offsets = {}
        self._last_ckpt_path: Optional[str] = None
        self._revoked_pending: set = set()
        self._samples_per_record = 1.0
        self._run_learned = 0
        self._run_bad = 0
        self._bad_logged: Dict[str, int] = {}
        self._first_data_mono: Optional[float] = None
        self._last_learn_mono: Optional[float] = None
        self._commit_failures = 0
        self._checkpoint_failures = 0
        self._hooks_attached = False
        # prefetching: the poller thread's queue of record lists and ("rewind", tp, offset) events
        self._threaded = False
        self._queue: Deque[Any] = deque()
        self._queued_records = 0
        self._queued_bytes = 0
        self._cond = threading.Condition()
        self._poller: Optional[threading.Thread] = None
        self._poller_stop = threading.Event()
        self._source_done = False
        self._commit_request: Optional[Offsets] = None
        self._seek_request: Offsets = {}
        self._last_truncation_check = 0.0
        if resume is not None:
            self._load_state(resume)
        self._init_metrics()

    # ---- public control ---------------------------------------------------------------------------
    def request_stop(self, reason: str = "stop requested") -> None:
        """Stop after the current minibatch (thread- and signal-safe)."""
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def attach(self, source: Any) -> None:
        """Point a source's rebalance hooks (``on_assign`` / ``on_revoke`` attributes) at this loop.

        Build a `KafkaSource` with ``on_assign=loop.on_assign, on_revoke=loop.on_revoke``, or
        let `steps` set them on a source that has those attributes and has not opened yet.
        Sources without them (files) get the checkpoint's offsets by `seek` once opened.
        """
        if hasattr(source, "on_assign") and hasattr(source, "on_revoke"):
            if source.on_assign is None:
                source.on_assign = self.on_assign
            if source.on_revoke is None:
                source.on_revoke = self.on_revoke
            self._hooks_attached = source.on_assign == self.on_assign
        else:
            self._hooks_attached = False

    # ---- rebalance hooks (may run on the Kafka client's I/O thread, between minibatches) -----------
    def on_assign(self, partitions: List[TopicPartition]) -> Dict[TopicPartition, int]:
        """Offsets to start the newly assigned ``partitions`` at: the checkpoint's, where it has
        them (and, with ``absent_partitions="earliest"``, 0 for the others)."""
        with self._lock:
            for tp in self._revoked_pending - set(partitions):
                self.offsets.pop(tp, None)  # handed to another member: its offset is no longer ours
            self._revoked_pending.clear()
            seek = {tp: self.offsets[tp] for tp in partitions if tp in self.offsets}
            absent = [tp for tp in partitions if tp not in self.offsets]
            if self.absent_partitions == "earliest":
                seek.update({tp: 0 for tp in absent})
            if seek:
                log.info("assigned %s; resuming at %s", _fmt_tps(partitions), _fmt_offsets(seek))
            if absent and self.absent_partitions == "committed":
                log.info("partitions %s are not in the checkpoint: starting at the group's committed "
                         "offset, or the beginning", _fmt_tps(absent))
            self._update_assignment_metrics(partitions)
            return seek

    def on_revoke(self, partitions: List[TopicPartition]) -> Dict[TopicPartition, int]:
        """Checkpoint, then return the revoked partitions' offsets for the source to commit."""
        with self._lock:
            if self._dirty:
                self._checkpoint("revoke")
            # only offsets that a checkpoint holds may be committed
            out = {tp: self._last_saved_offsets[tp] for tp in partitions if tp in self._last_saved_offsets}
            self._revoked_pending |= set(partitions)
            if self._threaded:  # fetched but not taken: the next owner reads them from `out`
                gone = set(partitions)
                with self._cond:
                    self._commit_request = None
                    kept: Deque[Any] = deque()
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
            log.info("revoking %s at %s", _fmt_tps(partitions), _fmt_offsets(out))
            return out

    # ---- running --------------------------------------------------------------------------------
    def run(self, source: Any, *, on_step: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
        """Drive `steps` to the end; returns `summary`."""
        for event in self.steps(source):
            if on_step is not None:
                on_step(event)
        return self.summary()

    def steps(self, source: Any) -> Iterator[Dict[str, Any]]:
        """Run the loop, yielding one progress dict per learned minibatch (see `_event`).

        Ends on `request_stop`, ``max_samples``, ``max_seconds``, ``idle_exit_s`` or the end of a
        file; then checkpoints, commits and closes the source (also when the consumer of the
        generator stops early).
        """
        self.attach(source)
        self._t0 = time.monotonic()
        self._last_record_mono = self._t0
        self._last_log = self._t0
        self._logged_learned = 0
        self._last_wait_log = self._t0
        self._wait_log_every = 10.0
        self._poll_errors = 0
        self._had_assignment = False
        try:
            if not self._open(source):
                return
            self._threaded = self.prefetch if self.prefetch is not None else self._hooks_attached
            if self._threaded:
                self._start_poller(source)
            while not self._stop.is_set():
                if self._limit_reached():
                    break
                records = self._take_records(source)
                now = time.monotonic()
                if records:
                    self._last_record_mono = now
                    if self._first_data_mono is None:
                        self._first_data_mono = now
                while len(self.buffer) >= self.batch_size and not self._stop.is_set() and not self._limit_reached():
                    yield self._learn_batch(self._next_batch_size())
                    self._maybe_checkpoint(source)
                if not records and not self._queue:  # nothing arrived (not merely: nothing taken yet)
                    event = self._when_idle(source, now)
                    if event is not None:
                        yield event
                self._maybe_checkpoint(source)
                self._maybe_log(source)
        finally:
            self._shutdown(source)

    def summary(self) -> Dict[str, Any]:
        """What a run reports (lifetime counters are restored from the checkpoint)."""
        elapsed = time.monotonic() - getattr(self, "_t0", time.monotonic())
        active = self._active_seconds()
        c = self.counters
        return {
            "learned_samples": c.learned_samples,
            "learned_samples_this_run": self._run_learned,
            "bad_messages": c.bad_messages,
            "bad_messages_by_reason": dict(sorted(c.bad_by_reason.items())),
            "bad_messages_this_run": self._run_bad,
            "prequential_accuracy": _nan_to_none(self.prequential.accuracy),
            "prequential_loss": _nan_to_none(self.prequential.loss),
            "window_accuracy": _nan_to_none(self.prequential.window_accuracy),
            "window_loss": _nan_to_none(self.prequential.window_loss),
            "samples_per_second": round(self._run_learned / active, 1) if active > 0 else 0.0,
            "seconds": round(elapsed, 3),
            "active_seconds": round(active, 3),
            "offsets": encode_offsets(self.offsets),
            "key_checksum": c.key_checksum,
            "model_step": self.learner.n_updates,
            "minibatches": c.minibatches,
            "records": c.records,
            "carry": len(self.buffer),
            "batch_size": self.batch_size,
            "checkpoint": self._last_ckpt_path,
            "commit_failures": self._commit_failures,
            "checkpoint_failures": self._checkpoint_failures,
            "stop_reason": self._stop_reason,
            **self.timers.as_dict(),
        }

    # ---- state ------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The checkpoint: learner state, offsets, carry and counters (plain values only)."""
        c = self.counters
        return {
            "kind": STATE_KIND,
            "version": STATE_VERSION,
            "learner": self.learner.state_dict(),
            "config": self.learner.config.to_dict(),
            "offsets": encode_offsets(self.offsets),
            "carry": self._carry_state(),
            "counters": {
                "learned_samples": c.learned_samples,
                "key_checksum": c.key_checksum,
                "bad_messages": c.bad_messages,
                "bad_by_reason": dict(c.bad_by_reason),
                "records": c.records,
                "minibatches": c.minibatches,
                "prequential": self.prequential.state_dict(),
            },
        }

    def _carry_state(self) -> Dict[str, Any]:
        chunk = self.buffer.peek_all()
        if chunk is None:
            return {}
        return {
            "topics": list(self._topics),
            "X": torch.from_numpy(np.ascontiguousarray(chunk.X)),
            "y": torch.from_numpy(np.ascontiguousarray(chunk.y)),
            "topic": torch.from_numpy(np.ascontiguousarray(chunk.topic)),
            "partition": torch.from_numpy(np.ascontiguousarray(chunk.partition)),
            "offset": torch.from_numpy(np.ascontiguousarray(chunk.offset)),
            "index": torch.from_numpy(np.ascontiguousarray(chunk.index)),
            "keys": None if chunk.keys is None else list(chunk.keys),
        }

    def _load_state(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != STATE_KIND:
            raise CheckpointError(f"checkpoint is a `{state.get('kind')}` state, not `{STATE_KIND}` (serve)")
        if state.get("version") != STATE_VERSION:
            raise CheckpointError(f"serve state version `{state.get('version')}` is not supported "
                                  f"(expected {STATE_VERSION})")
        self.offsets = decode_offsets(state.get("offsets", {}))
        counters = state.get("counters", {})
        c = self.counters
        c.learned_samples = int(counters.get("learned_samples", 0))
        c.key_checksum = int(counters.get("key_checksum", 0))
        c.bad_messages = int(counters.get("bad_messages", 0))
        c.bad_by_reason = {str(k): int(v) for k, v in counters.get("bad_by_reason", {}).items()}
        c.records = int(counters.get("records", 0))
        c.minibatches = int(counters.get("minibatches", 0))
        self.prequential.load_state_dict(counters.get("prequential", {}))
        carry = state.get("carry") or {}
        if carry:
            codes = {i: self._code(name) for i, name in enumerate(carry["topics"])}
            topic = np.array([codes[int(i)] for i in carry["topic"].tolist()], dtype=np.int32)
            X = carry["X"].numpy()
            if X.shape[1] != self.learner.n_inputs:
                raise CheckpointError(f"checkpoint carry has `{X.shape[1]}` features, the learner `{self.learner.n_inputs}`")
            self.buffer.append(_Chunk(X, carry["y"].numpy(), topic, carry["partition"].numpy(),
                                      carry["offset"].numpy(), carry["index"].numpy(),
                                      carry.get("keys") if self.predictions is not None else None))
            if self.predictions is not None and carry.get("keys") is None:
                self.buffer = _rekey(self.buffer)
        self._last_saved_offsets = dict(self.offsets)
        log.info("resumed: %s samples learned, %d buffered, offsets %s", f"{c.learned_samples:,}",
                 len(self.buffer), _fmt_offsets(self.offsets))

    # ---- internals: source ------------------------------------------------------------------------
    def _open(self, source: Any) -> bool:
        """Open the source, retrying with backoff until it works or a stop is requested."""
        delay = 1.0
        while not self._stop.is_set():
            try:
                if hasattr(source, "open"):
                    source.open()
                break
            except (ConfigError, DatasetError):  # a bad setting or a missing file: no use retrying
                raise
            except Exception as exc:  # broker unreachable: keep trying, keep the state
                log.warning("cannot open the source (%s); retrying in %.0f s (state kept: %s samples learned)",
                            exc, delay, f"{self.counters.learned_samples:,}")
                self._stop.wait(delay)
                delay = min(delay * 2, 30.0)
        else:
            return False
        if not self._hooks_attached:
            parts = list(source.assignment())
            seek = self.on_assign(parts)
            if seek:
                source.seek(seek)
        return True

    def _take_records(self, source: Any) -> List[Record]:
        """The next records, already ingested (decoded, offsets advanced, samples buffered)."""
        if not self._threaded:
            records = self._poll(source)
            if records:
                with self._lock:
                    self._ingest(records)
            if self._commit_request is not None:
                offsets, self._commit_request = self._commit_request, None
                self._commit(source, offsets)
            if self._seek_request:
                seeks, self._seek_request = self._seek_request, {}
                self._rewind(source, seeks)
            return records
        t0 = time.perf_counter()
        with self._cond:
            if not self._queue and len(self.buffer) < self.batch_size:
                self._cond.wait(self.poll_timeout_ms / 1000)
        self.timers.poll += time.perf_counter() - t0
        out: List[Record] = []
        # take (decode, advance offsets) only about two minibatches ahead of learning: what is
        # taken but not learned goes into each checkpoint's carry, which should stay small
        with self._lock:  # taking and ingesting are one step for the rebalance hooks
            while len(self.buffer) < 2 * self.batch_size:
                with self._cond:
                    if not self._queue:
                        break
                    item = self._queue.popleft()
                    if isinstance(item, list):
                        self._queued_records -= len(item)
                        self._queued_bytes -= sum(len(r.value) for r in item)
                    self._cond.notify_all()
                if isinstance(item, list):
                    self._ingest(item)
                    out.extend(item)
                else:
                    _, tp, offset = item
                    self.offsets[tp] = offset
                    self._dirty = True
        return out

    def _start_poller(self, source: Any) -> None:
        # big polls: kafka-python sends the next fetch only once a poll has drained the last one,
        # so taking everything fetched keeps a fetch in flight while the learner works
        max_records = self.max_poll_records or 5000

        def poll_forever() -> None:
            while not self._poller_stop.is_set():
                with self._cond:
                    while self._queued_bytes >= self.prefetch_bytes and not self._poller_stop.is_set():
                        self._cond.wait(0.05)
                    request, self._commit_request = self._commit_request, None
                    seeks, self._seek_request = self._seek_request, {}
                if seeks:
                    self._rewind(source, seeks)
                if request is not None:
                    self._commit(source, request)
                if self._poller_stop.is_set():
                    break
                records = self._poll(source, max_records)
                if not records and getattr(source, "exhausted", False):
                    with self._cond:  # a file at its end: everything read is queued
                        self._source_done = True
                        self._cond.notify_all()
                    break
                if records:
                    size = sum(len(r.value) for r in records)
                    with self._cond:
                        self._queue.append(records)
                        self._queued_records += len(records)
                        self._queued_bytes += size
                        self._cond.notify_all()

        self._poller_stop.clear()
        self._poller = threading.Thread(target=poll_forever, name="amstream-poller", daemon=True)
        self._poller.start()

    def _stop_poller(self) -> None:
        if self._poller is not None:
            self._poller_stop.set()
            with self._cond:
                self._cond.notify_all()
            self._poller.join()
            self._poller = None
        self._threaded = False

    def _poll(self, source: Any, max_records: Optional[int] = None) -> List[Record]:
        if max_records is None:  # about two minibatches
            max_records = self.max_poll_records or max(1, int(2 * self.batch_size / self._samples_per_record))
        t0 = time.perf_counter()
        try:
            records = source.poll_batch(max_records=max_records, timeout_ms=self.poll_timeout_ms)
            self._poll_errors = 0
        except OffsetRewindError as exc:
            self._accept_rewind(source, exc)
            records = []
        except Exception as exc:  # the client reports a broker problem: log, back off, keep the state
            self._poll_errors += 1
            delay = min(30.0, 0.5 * 2 ** min(self._poll_errors, 6))
            log.warning("polling the source failed (%s: %s); retrying in %.1f s (state kept: %s samples learned)",
                        type(exc).__name__, exc, delay, f"{self.counters.learned_samples:,}",
                        exc_info=self._poll_errors == 1 and log.isEnabledFor(logging.DEBUG))
            self._stop.wait(delay)
            records = []
        if not self._threaded:
            self.timers.poll += time.perf_counter() - t0
        else:
            self.timers.fetch += time.perf_counter() - t0
        return records

    def _check_truncation(self, source: Any, now: float) -> None:
        """A partition that ends below the next offset we hold lost its data (a restarted
        in-memory broker, a recreated topic): report it and start that partition over at 0."""
        if now - self._last_truncation_check < 2.0 or not hasattr(source, "highwater"):
            return
        self._last_truncation_check = now
        try:
            highwater = source.highwater()
        except Exception:
            return
        with self._lock:
            lost = {tp: hw for tp, hw in highwater.items()
                    if hw is not None and tp in self.offsets and hw < self.offsets[tp]}
            for tp, hw in lost.items():
                log.warning(
                    "partition `%s:%d` now ends at offset %d, below the next offset %d in our state: the broker "
                    "lost its data (a restarted in-memory broker, a deleted and recreated topic). Its records "
                    "are new data: starting it over at offset 0 (the model keeps everything learned so far)",
                    tp[0], tp[1], hw, self.offsets[tp])
        if lost:
            with self._cond:
                self._seek_request.update({tp: 0 for tp in lost})

    def _rewind(self, source: Any, seeks: Offsets) -> None:
        """Seek (on the thread that owns the source) and move our offsets back, in order."""
        assigned = set(source.assignment())
        seeks = {tp: off for tp, off in seeks.items() if tp in assigned}
        if not seeks:
            return
        source.seek(seeks)
        if self._threaded:
            with self._cond:
                for tp, off in seeks.items():
                    self._queue.append(("rewind", tp, off))
                self._cond.notify_all()
        else:
            with self._lock:
                self.offsets.update(seeks)
                self._dirty = True
        if self.metrics is not None:
            for tp in seeks:
                self.metrics.inc("offset_rewinds_total", topic=tp[0], partition=tp[1])

    def _accept_rewind(self, source: Any, exc: OffsetRewindError) -> None:
        tp = exc.partition
        log.warning(
            "partition `%s:%d` restarted at offset %d, below the next offset %d already taken: the "
            "broker lost this partition's data (a restarted in-memory broker, a deleted and recreated "
            "topic); its records from offset %d on are new data and will be learned",
            tp[0], tp[1], exc.offset, exc.expected, exc.offset)
        self._rewind(source, {tp: exc.offset})

    def _commit(self, source: Any, offsets: Offsets) -> None:
        assigned = set(source.assignment())
        mine = {tp: off for tp, off in offsets.items() if tp in assigned}
        if not mine:
            return
        try:
            ok = source.commit(mine)
        except Exception as exc:
            ok = False
            log.warning("offset commit failed (%s: %s); the checkpoint holds the offsets", type(exc).__name__, exc)
        if not ok:
            self._commit_failures += 1
            if self.metrics is not None:
                self.metrics.inc("commit_failures_total")

    # ---- internals: records -> samples ------------------------------------------------------------
    def _code(self, topic: str) -> int:
        code = self._topic_code.get(topic)
        if code is None:
            code = self._topic_code[topic] = len(self._topics)
            self._topics.append(topic)
            self._topic_hash.append(topic_hash(topic))
        return code

    def _ingest(self, records: List[Record]) -> None:
        t0 = time.perf_counter()
        n = len(records)
        batch = self.codec.decode_records(records)
        parts = np.fromiter(map(_PARTITION, records), dtype=np.int32, count=n)
        offs = np.fromiter(map(_OFFSET, records), dtype=np.int64, count=n)
        topics = set(map(_TOPIC, records))
        if len(topics) == 1:  # the usual case: next offset of each partition from the arrays
            topic = records[0].topic
            codes = np.full(n, self._code(topic), dtype=np.int32)
            if parts[0] == parts[-1] and (parts == parts[0]).all():
                self.offsets[(topic, int(parts[0]))] = int(offs.max()) + 1
            else:
                for p in np.unique(parts).tolist():
                    self.offsets[(topic, p)] = int(offs[parts == p].max()) + 1
        else:
            codes = np.fromiter((self._code(r.topic) for r in records), dtype=np.int32, count=n)
            for r in records:  # records of a partition come in increasing offset order
                self.offsets[(r.topic, r.partition)] = r.offset + 1
        self.counters.records += n
        self._dirty = True
        if batch.rejections:
            self._reject(records, batch.rejections)
        m = len(batch)
        if m:
            idx = batch.index
            if m == n and not batch.rejections:  # one sample per message
                pos = np.zeros(m, dtype=np.int32)
            else:  # packed messages: a sample's rank among its message's accepted samples
                new_msg = np.r_[True, idx[1:] != idx[:-1]]
                starts = np.flatnonzero(new_msg)
                pos = (np.arange(m) - starts[np.cumsum(new_msg) - 1]).astype(np.int32)
            keys = list(batch.keys) if self.predictions is not None else None
            self.buffer.append(_Chunk(batch.X, batch.y, codes[idx], parts[idx], offs[idx], pos, keys))
            self._samples_per_record = 0.8 * self._samples_per_record + 0.2 * (m / n)
        self.timers.decode += time.perf_counter() - t0

    def _reject(self, records: List[Record], rejections: Sequence[Any]) -> None:
        c = self.counters
        for rej in rejections:
            r = records[rej.index]
            c.bad_messages += 1
            self._run_bad += 1
            c.bad_by_reason[rej.reason] = c.bad_by_reason.get(rej.reason, 0) + 1
            logged = self._bad_logged.get(rej.reason, 0)
            if logged < 20 or (c.bad_by_reason[rej.reason] & (c.bad_by_reason[rej.reason] - 1)) == 0:
                log.warning("bad message at %s:%d@%d: %s: %s%s", r.topic, r.partition, r.offset, rej.reason,
                            rej.detail, "" if self.dead_letters is None else " (dead-lettered)")
                self._bad_logged[rej.reason] = logged + 1
            if self.metrics is not None:
                self.metrics.inc("bad_messages_total", reason=rej.reason)
        if self.dead_letters is not None:
            t0 = time.perf_counter()
            self.dead_letters.write_rejections(records, rejections)
            self.timers.sinks += time.perf_counter() - t0

    # ---- internals: learning ------------------------------------------------------------------------
    def _next_batch_size(self) -> int:
        # always full minibatches (``max_samples`` stops at the first boundary at or after it), so
        # a run cut into pieces forms the same minibatches as an uninterrupted one
        return self.batch_size

    def _limit_reached(self) -> bool:
        if self.max_samples is not None and self._run_learned >= self.max_samples:
            self.request_stop(f"max_samples={self.max_samples} reached")
            return True
        if self.max_seconds is not None and time.monotonic() - self._t0 >= self.max_seconds:
            self.request_stop(f"max_seconds={self.max_seconds:g} reached")
            return True
        return False

    def _learn_batch(self, n: int) -> Dict[str, Any]:
        with self._lock:
            chunk = self.buffer.take(n)
            n = len(chunk)
            learner = self.learner
            step = learner.n_updates
            x = torch.from_numpy(chunk.X)
            y = torch.from_numpy(chunk.y)
            t0 = time.perf_counter()
            update = learner.learn(x, y)
            out = update.outputs
            if self.classification:
                pred = out.argmax(1)
                correct = int((pred.cpu() == y).sum())
            else:
                pred = out
                correct = 0
            dt = time.perf_counter() - t0
            self.timers.learn += dt
            self.prequential.update(n, correct, float(update.loss) * n)
            c = self.counters
            th = np.asarray(self._topic_hash, dtype=np.uint64)[chunk.topic]
            h = key_hashes(th, chunk.partition, chunk.offset, chunk.index)
            c.key_checksum = (c.key_checksum + int(h.sum(dtype=np.uint64))) & _MASK64
            c.learned_samples += n
            c.minibatches += 1
            self._run_learned += n
            self._batches_since_ckpt += 1
            self._dirty = True
            self._last_learn_mono = time.monotonic()
            if self.predictions is not None:
                self._write_predictions(chunk, step, out, pred)
            if self.metrics is not None:
                m = self.metrics
                m.inc("learned_samples_total", n)
                m.inc("minibatches_total")
                m.inc("learner_seconds_total", dt)
                m.set("model_step", learner.n_updates)
            return self._event(n, update.loss, correct)

    def _write_predictions(self, chunk: _Chunk, step: int, out: torch.Tensor, pred: torch.Tensor) -> None:
        t0 = time.perf_counter()
        topics = self._topics
        if self.classification:
            proba = torch.softmax(out, dim=1).max(1).values.cpu().tolist()
            preds = pred.cpu().tolist()
            values = [
                ('{"step":%d,"y_pred":%d,"proba":%.6g,"y":%d,"topic":"%s","partition":%d,"offset":%d,"index":%d}'
                 % (step, p, q, yy, topics[t], part, off, i)).encode()
                for p, q, yy, t, part, off, i in zip(preds, proba, chunk.y.tolist(), chunk.topic.tolist(),
                                                     chunk.partition.tolist(), chunk.offset.tolist(),
                                                     chunk.index.tolist())
            ]
        else:
            import json

            rows = out.cpu().tolist()
            values = [json.dumps({"step": step, "y_pred": row if len(row) > 1 else row[0], "y": yy,
                                  "topic": topics[t], "partition": part, "offset": off, "index": i}).encode()
                      for row, yy, t, part, off, i in zip(rows, chunk.y.tolist(), chunk.topic.tolist(),
                                                          chunk.partition.tolist(), chunk.offset.tolist(),
                                                          chunk.index.tolist())]
        self.predictions.write_many(values, chunk.keys)
        self.timers.sinks += time.perf_counter() - t0

    def _event(self, n: int, loss: float, correct: int) -> Dict[str, Any]:
        p = self.prequential
        return {
            "learned_samples": self.counters.learned_samples,
            "learned_samples_this_run": self._run_learned,
            "batch": n,
            "loss": float(loss),
            "accuracy": correct / n if (n and self.classification) else math.nan,
            "prequential_accuracy": p.accuracy,
            "window_accuracy": p.window_accuracy,
            "window_loss": p.window_loss,
            "bad_messages": self.counters.bad_messages,
            "model_step": self.learner.n_updates,
            "seconds": time.monotonic() - self._t0,
        }

    def _when_idle(self, source: Any, now: float) -> Optional[Dict[str, Any]]:
        """Nothing arrived in the last poll: flush a waiting partial minibatch, or stop, or log."""
        if self._threaded:
            with self._cond:
                exhausted = self._source_done and not self._queue
        else:
            exhausted = bool(getattr(source, "exhausted", False))
        idle_for = now - self._last_record_mono
        self._check_truncation(source, now)
        assigned = bool(source.assignment())
        if assigned and not self._had_assignment:
            self._had_assignment = True
            self._last_record_mono = now  # idle time counts from the first assignment
            idle_for = 0.0
        # idle time counts only once something was assigned (a group join can take seconds)
        idle_exit = self.idle_exit_s is not None and idle_for >= self.idle_exit_s and self._had_assignment
        event = None
        if len(self.buffer) and not self._limit_reached():
            flush = exhausted or idle_exit or (
                self.flush_after_s is not None and idle_for >= self.flush_after_s and self._caught_up(source))
            if flush:
                event = self._learn_batch(self._next_batch_size())
        if exhausted and not len(self.buffer):
            self.request_stop("end of input")
        elif idle_exit and not len(self.buffer):
            self.request_stop(f"no records for {self.idle_exit_s:g} s")
        elif not exhausted and now - self._last_wait_log >= self._wait_log_every and idle_for >= 5.0:
            self._last_wait_log = now
            self._wait_log_every = min(self._wait_log_every * 2, 120.0)
            problem = None
            if self.health_check is not None:
                try:
                    problem = self.health_check()
                except Exception as exc:  # a health check must never stop the loop
                    problem = f"health check failed: {exc}"
            state = f"state kept: {self.counters.learned_samples:,} samples learned"
            if problem:
                log.warning("no records for %.0f s: %s; waiting (%s)", idle_for, problem, state)
            elif not assigned:
                log.warning("no partitions assigned for %.0f s (topic missing, or the group is rebalancing); "
                            "waiting (%s)", idle_for, state)
            else:
                log.info("no new records for %.0f s; waiting (%s)", idle_for, state)
        if not idle_for:
            self._wait_log_every = 10.0
        return event

    def _caught_up(self, source: Any) -> bool:
        """No lag, and every record the source handed out has been taken (not still queued)."""
        try:
            lag = source.lag()
            delivered = source.snapshot()
        except Exception:
            return False
        if not lag or any(v != 0 for v in lag.values()):
            return False
        with self._lock:
            return all(self.offsets.get(tp, off) == off for tp, off in delivered.items())

    # ---- internals: checkpoints ---------------------------------------------------------------------
    def _maybe_checkpoint(self, source: Any) -> None:
        if not self._dirty:
            return
        due = (self.checkpoint_every_batches and self._batches_since_ckpt >= self.checkpoint_every_batches) or (
            self.checkpoint_every_seconds and time.monotonic() - self._last_ckpt_mono >= self.checkpoint_every_seconds)
        if not due:
            return
        with self._lock:
            saved = self._checkpoint("periodic")
            offsets = dict(self.offsets)
        if saved:
            with self._cond:  # the thread that owns the source commits (after this checkpoint)
                self._commit_request = offsets

    def _checkpoint(self, reason: str) -> bool:
        """Flush the sinks, then save; True when the current offsets are safely checkpointed."""
        t0 = time.perf_counter()
        try:
            for sink in (self.predictions, self.dead_letters):
                if sink is not None:
                    sink.flush(timeout_s=30.0)
        except Exception as exc:
            self._checkpoint_failures += 1
            log.error("not checkpointing (%s): a sink could not deliver: %s", reason, exc)
            self.timers.sinks += time.perf_counter() - t0
            return False
        t1 = time.perf_counter()
        self.timers.sinks += t1 - t0
        self._batches_since_ckpt = 0
        self._last_ckpt_mono = time.monotonic()
        if self.checkpoints is None:
            self._dirty = False
            self._last_saved_offsets = dict(self.offsets)
            return True
        try:
            path = self.checkpoints.save(
                self.learner.n_updates, self.state_dict(),
                metadata={"command": "serve", "reason": reason, "time": time.time(),
                          "learned_samples": self.counters.learned_samples,
                          "offsets": encode_offsets(self.offsets)})
        except CheckpointError as exc:
            self._checkpoint_failures += 1
            log.error("checkpoint (%s) failed: %s; will retry", reason, exc)
            return False
        finally:
            self.timers.checkpoint += time.perf_counter() - t1
        self._dirty = False
        self._last_ckpt_time = time.time()
        self._last_saved_offsets = dict(self.offsets)
        self._last_ckpt_path = str(path)
        log.debug("checkpoint %s (%s): %s samples learned, offsets %s", path.name, reason,
                  f"{self.counters.learned_samples:,}", _fmt_offsets(self.offsets))
        if self.metrics is not None:
            self.metrics.inc("checkpoints_total")
            self.metrics.set("checkpoint_timestamp_seconds", self._last_ckpt_time)
        return True

    def _shutdown(self, source: Any) -> None:
        self._stop_poller()  # from here on this thread owns the source
        self._commit_request = None
        try:
            with self._lock:
                saved = self._checkpoint("shutdown") if self._dirty else True
                offsets = dict(self.offsets)
            if saved and offsets:
                try:
                    self._commit(source, offsets)
                except Exception as exc:  # the source may never have opened
                    log.debug("final commit skipped: %s", exc)
        finally:
            try:
                source.close()
            except Exception as exc:
                log.warning("closing the source failed: %s", exc)
        s = self.summary()
        log.info("stopped (%s): %s samples learned in this run (%s in all), prequential accuracy %s, "
                 "%s bad messages, offsets %s", self._stop_reason or "done", f"{self._run_learned:,}",
                 f"{s['learned_samples']:,}", _fmt_float(s["prequential_accuracy"]), f"{s['bad_messages']:,}",
                 _fmt_offsets(self.offsets))

    # ---- internals: metrics and logs ----------------------------------------------------------------
    def _active_seconds(self) -> float:
        if self._first_data_mono is None:
            return 0.0
        end = self._last_learn_mono or time.monotonic()
        return max(0.0, end - self._first_data_mono)

    def _init_metrics(self) -> None:
        m = self.metrics
        if m is None:
            return
        for name, kind, text in (
            ("learned_samples_total", "counter", "Samples learned by this process."),
            ("learned_samples", "gauge", "Samples learned over the model's life (restored from the checkpoint)."),
            ("minibatches_total", "counter", "Minibatches learned (one update each) by this process."),
            ("bad_messages_total", "counter", "Rejected samples by reason (counted, logged, dead-lettered)."),
            ("samples_per_second", "gauge", "Learning throughput over the last log period."),
            ("prequential_accuracy", "gauge", "Test-then-train accuracy: window=total or window=recent."),
            ("prequential_loss", "gauge", "Test-then-train mean loss: window=total or window=recent."),
            ("consumer_lag", "gauge", "Records behind the partition's high watermark."),
            ("checkpoint_age_seconds", "gauge", "Seconds since the last checkpoint was written."),
            ("checkpoint_timestamp_seconds", "gauge", "Unix time of the last checkpoint."),
            ("checkpoints_total", "counter", "Checkpoints written."),
            ("commit_failures_total", "counter", "Offset commits the group refused."),
            ("learner_seconds_total", "counter", "Time spent in learner.learn."),
            ("decode_seconds_total", "counter", "Time spent decoding and validating records."),
            ("poll_seconds_total", "counter", "Time spent waiting for and fetching records."),
            ("model_step", "gauge", "Updates the model has made."),
            ("buffered_samples", "gauge", "Samples taken from the source, waiting for a full minibatch."),
            ("assigned_partitions", "gauge", "Partitions this member reads."),
            ("offset_rewinds_total", "counter", "Partitions started over because the broker lost their data."),
        ):
            m.describe(name, kind, text)
        m.set("learned_samples", self.counters.learned_samples)
        m.set("model_step", self.learner.n_updates)
        for reason, count in self.counters.bad_by_reason.items():
            m.set("bad_messages_total", count, reason=reason)

    def _update_assignment_metrics(self, partitions: List[TopicPartition]) -> None:
        if self.metrics is not None:
            self.metrics.set("assigned_partitions", len(partitions))

    def _maybe_log(self, source: Any) -> None:
        """Metrics every second (when there is a registry); a log line every `log_every_s`."""
        now = time.monotonic()
        period = now - self._last_log
        line_due = self.log_every_s is not None and period >= self.log_every_s
        if not line_due and (self.metrics is None or now - getattr(self, "_last_metrics", 0.0) < 1.0):
            return
        self._last_metrics = now
        lag_total: Optional[int] = None
        try:
            lag = source.lag()
        except Exception:
            lag = {}
        known = [v for v in lag.values() if v is not None]
        if known:
            lag_total = int(sum(known))
        rate = (self._run_learned - self._logged_learned) / period if period > 0 else 0.0
        age = None if self._last_ckpt_time is None else time.time() - self._last_ckpt_time
        p = self.prequential
        if self.metrics is not None:
            m = self.metrics
            m.set("learned_samples", self.counters.learned_samples)
            m.set("samples_per_second", rate)
            m.set("prequential_accuracy", p.accuracy, window="total")
            m.set("prequential_accuracy", p.window_accuracy, window="recent")
            m.set("prequential_loss", p.loss, window="total")
            m.set("prequential_loss", p.window_loss, window="recent")
            m.set("buffered_samples", len(self.buffer))
            m.set("decode_seconds_total", self.timers.decode)
            m.set("poll_seconds_total", self.timers.poll)
            m.clear("consumer_lag")
            for (topic, part), v in lag.items():
                if v is not None:
                    m.set("consumer_lag", v, topic=topic, partition=part)
            if age is not None:
                m.set("checkpoint_age_seconds", age)
        if line_due:
            self._logged_learned = self._run_learned
            self._last_log = now
            busy = self.timers.learn / max(1e-9, now - self._t0)
            log.info("learned %s samples (%s/s), prequential accuracy %s (recent %s), loss %s, bad %s, lag %s, "
                     "checkpoint %s, learner busy %.0f%%",
                     f"{self.counters.learned_samples:,}", f"{rate:,.0f}", _fmt_float(p.accuracy),
                     _fmt_float(p.window_accuracy), _fmt_float(p.window_loss), f"{self.counters.bad_messages:,}",
                     "?" if lag_total is None else f"{lag_total:,}",
                     "none yet" if age is None else f"{age:.0f} s ago", 100 * busy)


def load_serve_checkpoint(directory: Any, *, device: Any = "cpu") -> Optional[Tuple[Learner, Dict[str, Any], Dict[str, Any]]]:
    """``(learner, state, metadata)`` from the newest valid serve checkpoint in ``directory``,
    or None when there is none. Pass ``state`` to ``ServeLoop(..., resume=state)``."""
    loaded = CheckpointManager(directory).restore()
    if loaded is None:
        return None
    state = loaded["state"]
    if state.get("kind") != STATE_KIND:
        raise CheckpointError(f"`{loaded['path']}` is not a serve checkpoint (kind `{state.get('kind')}`)")
    learner = learner_from_state(state["learner"], device=device)
    log.info("restored %s (%s samples learned)", loaded["path"],
             f"{int(state.get('counters', {}).get('learned_samples', 0)):,}")
    return learner, state, loaded["metadata"]


# ---- small helpers --------------------------------------------------------------------------------
def _rekey(buffer: _Buffer) -> _Buffer:
    out = _Buffer()
    chunk = buffer.peek_all()
    if chunk is not None:
        chunk.keys = [None] * len(chunk)
        out.append(chunk)
    return out


def _nan_to_none(v: float) -> Optional[float]:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 6)


def _fmt_float(v: Optional[float]) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _fmt_tps(tps: Sequence[TopicPartition]) -> str:
    return "[" + ", ".join(f"{t}:{p}" for t, p in sorted(tps)) + "]"


def _fmt_offsets(offsets: Mapping[TopicPartition, int]) -> str:
    return "{" + ", ".join(f"{t}:{p}={o}" for (t, p), o in sorted(offsets.items())) + "}"
