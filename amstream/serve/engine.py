"""The exactly-once core of `amstream serve`: records in, minibatches out.

`Engine` turns records (bytes with a partition and an offset) into minibatches and learns each
one with a single update, test-then-train. It knows nothing of threads, clocks, brokers or
checkpoint files: a caller feeds it (`Engine.ingest`), drives it (`Engine.learn`) and saves or
restores it (`Engine.state_dict` / `Engine.load_state_dict`); `amstream.serve.runner` is that
caller for a live source.

    records ─► ingest: decode + validate, advance offsets, buffer the samples
                 └─ rejections: counted by reason, returned (for the dead-letter sink)
    buffer ≥ batch_size ─► learn: grow the output layer for new classes, learner.learn(x, y)
                 (its outputs are the pre-update ones: the prequential score), checksum the ids

Exactly once
------------
A state (`state_dict`) holds, besides the learner state,

* ``offsets``: per partition, the next offset after the last record *taken* (decoded: its
  samples are learned, rejected, or in the carry);
* ``carry``: the samples taken but not learned yet (fewer than a minibatch after a minibatch
  boundary, with their ids), so a restart forms exactly the same minibatches as one run;
* counters: ``learned_samples``, ``key_checksum`` (the sum, mod 2**64, of a 64-bit hash of
  ``(topic, partition, offset, index-in-message)`` of every learned sample: equal sums mean the
  same set of samples whatever the order), bad messages by reason, prequential totals;
* ``sizes``: the feature count and the class count (or cap, when classes grow as labels
  appear), so a restart decodes and grows exactly as the first run did.

Every record before ``offsets`` is thus accounted for in the model, the carry or the bad-message
counts, and nothing after it is: restoring a state and reading on from its offsets learns every
sample exactly once, however the first run ended.

Sizes
-----
`StreamModel` holds the learner and the codec. Given both, sizes are fixed. Given neither, the
feature count comes from the first valid message (its codec's claim, checked by decoding) and the
learner is built then; with ``grow_classes`` the output layer starts at two classes and grows
(`Learner.expand`) right before a minibatch that holds a larger label. Growth happens at
minibatch boundaries only, so it does not depend on how records were polled.

Examples
--------
>>> import numpy as np
>>> from amstream import AMConfig, make_learner
>>> from amstream.connectors.codec import BinaryCodec
>>> from amstream.connectors.records import Record
>>> rng = np.random.default_rng(0)
>>> x = rng.standard_normal((96, 4)).astype(np.float32)
>>> values = BinaryCodec(4, 3).encode_many(x, (x[:, 0] > 0).astype(int) + (x[:, 1] > 1))
>>> records = [Record("t", 0, i, None, v) for i, v in enumerate(values)] + [Record("t", 0, 96, None, b"junk")]
>>> engine = Engine(StreamModel(build=lambda d: make_learner(AMConfig(arch=(d, 8, 2), seed=1)),
...                             codec_name="binary", codec_options={"n_classes": 10}, grow_classes=True),
...                 batch_size=32)
>>> ingested = engine.ingest(records)
>>> ingested.n_samples, [(r.index, r.reason) for r in ingested.rejections]
(96, [(96, 'malformed')])
>>> steps = [engine.learn() for _ in range(3)]
>>> [s.learned_samples for s in steps], engine.learner.n_outputs, engine.offsets
([32, 64, 96], 3, {('t', 0): 97})
>>> restored = Engine(StreamModel(build=lambda d: make_learner(AMConfig(arch=(d, 8, 2), seed=1)),
...                               codec_name="binary", codec_options={"n_classes": 10}, grow_classes=True),
...                   batch_size=32)
>>> restored.load_state_dict(engine.state_dict())
>>> restored.counters.key_checksum == key_checksum("t", [0] * 96, range(96), [0] * 96)
True
"""
from __future__ import annotations

import hashlib
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from amstream.checkpoint import CheckpointManager
from amstream.connectors.codec import CODECS, Codec, Rejection, codec_from_first_valid, make_codec
from amstream.connectors.records import Offsets, Record, TopicPartition, decode_offsets, encode_offsets
from amstream.exceptions import CheckpointError, ConfigError
from amstream.learner import Learner, learner_from_state
from amstream.serve.continual import Continual

__all__ = [
    "Engine",
    "EngineEvents",
    "Ingested",
    "Prequential",
    "STATE_KIND",
    "Step",
    "StreamModel",
    "key_checksum",
    "key_hashes",
    "load_serve_checkpoint",
    "topic_hash",
]

STATE_KIND = "amstream.serve"
STATE_VERSION = 1
_MASK64 = (1 << 64) - 1


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
        return _ratio(self.correct, self.n) if self.classification else math.nan

    @property
    def loss(self) -> float:
        return _ratio(self.loss_sum, self.n)

    @property
    def window_accuracy(self) -> float:
        return _ratio(self._rc, self._rn) if self.classification else math.nan

    @property
    def window_loss(self) -> float:
        return _ratio(self._rl, self._rn)

    def state_dict(self) -> Dict[str, Any]:
        return {"n": self.n, "correct": self.correct, "loss_sum": float(self.loss_sum)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.n = int(state.get("n", 0))
        self.correct = int(state.get("correct", 0))
        self.loss_sum = float(state.get("loss_sum", 0.0))


def _ratio(total: float, n: int) -> float:
    return total / n if n else math.nan


# ---- the sample buffer ------------------------------------------------------------------------
@dataclass
class Chunk:
    """Decoded samples with their ids; ``keys`` only when predictions are written."""

    X: np.ndarray  # float32 [n, d]
    y: np.ndarray  # int64 (classes) or float64 (targets) [n]
    topic: np.ndarray  # int32 [n]: index into Engine.topics
    partition: np.ndarray  # int32 [n]
    offset: np.ndarray  # int64 [n]
    index: np.ndarray  # int32 [n]: position in the message (packed binary messages)
    task: np.ndarray  # int64 [n]: the task id the sample names (continual sequences), -1 where none
    keys: Optional[List[Optional[bytes]]] = None

    _ARRAYS = ("X", "y", "topic", "partition", "offset", "index", "task")

    def __len__(self) -> int:
        return int(self.X.shape[0])

    def slice(self, a: int, b: Optional[int] = None) -> "Chunk":
        s = slice(a, b)
        return Chunk(*(getattr(self, f)[s] for f in self._ARRAYS), keys=None if self.keys is None else self.keys[s])

    def first_task_change(self) -> Optional[int]:
        """The position of the first sample whose task differs from the first one's (None: one task)."""
        t = self.task
        if not len(t) or t[0] == t[-1] and (t == t[0]).all():
            return None
        return int(np.flatnonzero(t != t[0])[0])

    @staticmethod
    def empty(n_features: int, classification: bool) -> "Chunk":
        """No samples (a rank's share of a minibatch when it has none)."""
        return Chunk(np.zeros((0, n_features), np.float32), np.zeros(0, np.int64 if classification else np.float64),
                     np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int32),
                     np.zeros(0, np.int64))

    @staticmethod
    def concat(chunks: Sequence["Chunk"]) -> "Chunk":
        if len(chunks) == 1:
            return chunks[0]
        keys = None
        if all(c.keys is not None for c in chunks):
            keys = [k for c in chunks for k in c.keys]  # type: ignore[union-attr]
        return Chunk(*(np.concatenate([getattr(c, f) for c in chunks]) for f in Chunk._ARRAYS), keys=keys)


class _Buffer:
    """FIFO of decoded samples, taken in minibatches."""

    def __init__(self) -> None:
        self._chunks: Deque[Chunk] = deque()
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def append(self, chunk: Chunk) -> None:
        if len(chunk):
            self._chunks.append(chunk)
            self._n += len(chunk)

    def take(self, n: int, *, one_task: bool = False) -> Chunk:
        """The next ``n`` samples (fewer when fewer are buffered); with ``one_task`` only up to the
        first sample of another task than the first one's."""
        parts: List[Chunk] = []
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
        out = Chunk.concat(parts)
        if one_task:
            cut = out.first_task_change()
            if cut is not None:
                self._chunks.appendleft(out.slice(cut))
                out = out.slice(0, cut)
        self._n -= len(out)
        return out

    def peek_all(self) -> Optional[Chunk]:
        return Chunk.concat(list(self._chunks)) if self._chunks else None

    def max_label(self) -> int:
        """The largest buffered class label, -1 when none is buffered."""
        return max((int(c.y.max()) for c in self._chunks if len(c)), default=-1)


# ---- what the engine reports ------------------------------------------------------------------
@dataclass(frozen=True)
class Ingested:
    """One `Engine.ingest` call: the records taken, their rejections (``index`` into ``records``),
    how many samples were buffered, and the time spent decoding."""

    records: Sequence[Record]
    rejections: List[Rejection]
    n_samples: int
    seconds: float


@dataclass(frozen=True)
class Step:
    """One learned minibatch (`Engine.learn`). ``outputs`` are the learner's pre-update outputs
    and ``predictions`` their argmax (classes) or the outputs themselves (targets)."""

    batch: int
    loss: float
    accuracy: float
    learned_samples: int
    learned_samples_this_run: int
    prequential_accuracy: float
    window_accuracy: float
    window_loss: float
    bad_messages: int
    model_step: int  # updates the model has made, this one included
    seconds: float  # inside learner.learn
    grown: Optional[Tuple[int, int]]  # (classes before, after) when this minibatch grew the output layer
    chunk: Chunk = field(repr=False)
    outputs: torch.Tensor = field(repr=False)
    predictions: torch.Tensor = field(repr=False)
    evaluation: Any = None  # an `amstream.serve.continual.Evaluation` scored at this step, if any


class EngineEvents:
    """What the engine reports as it works; no-ops here (`amstream.serve.telemetry` listens)."""

    def after_ingest(self, ingested: Ingested) -> None:
        """Records were decoded: samples buffered, rejections counted."""

    def after_learn(self, step: Step) -> None:
        """A minibatch was learned."""


@dataclass
class Counters:
    """Lifetime counters (restored from a state); ``*_this_run`` ones count this process only."""

    learned_samples: int = 0
    key_checksum: int = 0
    bad_messages: int = 0
    bad_by_reason: Dict[str, int] = field(default_factory=dict)
    records: int = 0
    minibatches: int = 0
    learned_samples_this_run: int = 0
    bad_messages_this_run: int = 0


# ---- the learner and the codec ----------------------------------------------------------------
class StreamModel:
    """The learner and the codec the engine feeds: given, or built from the first valid message.

    Parameters
    ----------
    learner, codec
        Given both, the sizes are fixed by them (with ``grow_classes``, ``codec.n_classes`` is the
        cap on class labels and the learner grows up to it).
    build
        ``build(n_features) -> Learner``: makes the learner once the feature count is known
        (needed when ``learner`` is not given).
    codec_name, codec_options
        How to make the codec once the feature count is known (when ``codec`` is not given):
        ``make_codec(codec_name, n_features, **codec_options)``.
    grow_classes
        Grow the learner's output layer to ``label + 1`` before a minibatch holding a larger label.
    device
        Where a learner restored from a state goes when there is no learner yet.
    """

    def __init__(
        self,
        learner: Optional[Learner] = None,
        codec: Optional[Codec] = None,
        *,
        build: Optional[Callable[[int], Learner]] = None,
        codec_name: str = "auto",
        codec_options: Optional[Mapping[str, Any]] = None,
        grow_classes: bool = False,
        device: Any = "cpu",
    ) -> None:
        if learner is None and build is None:
            raise ConfigError("give a `learner`, or `build` to make one once the feature count is known")
        if learner is not None and codec is None:
            raise ConfigError("a given `learner` needs its `codec` (its feature count fixes the codec's)")
        self.build = build
        self.codec_name = codec_name
        self.codec_options = dict(codec_options or {})
        self.grow_classes = bool(grow_classes)
        self.device = device  # where a learner rebuilt from a state goes (see `Engine.load_state_dict`)
        self.learner: Optional[Learner] = None
        self.codec: Optional[Codec] = None
        if codec is not None:
            self.attach(learner if learner is not None else self._build(codec.n_features), codec)

    def _build(self, n_features: int) -> Learner:
        assert self.build is not None
        return self.build(n_features)

    def attach(self, learner: Learner, codec: Codec) -> None:
        """Use this learner and codec (their sizes must agree)."""
        if codec.n_features != learner.n_inputs:
            raise ConfigError(f"the codec expects `{codec.n_features}` features, the learner `{learner.n_inputs}`")
        if learner.config.loss == "ce":
            cap = codec.n_classes  # the class count, or with grow_classes the largest it may grow to
            fits = cap is not None and (cap >= learner.n_outputs if self.grow_classes else cap == learner.n_outputs)
            if not fits:
                raise ConfigError(f"the codec expects `{cap}` classes, the learner `{learner.n_outputs}`")
        self.learner, self.codec = learner, codec

    @property
    def ready(self) -> bool:
        return self.codec is not None

    @property
    def classification(self) -> bool:
        return self.learner is None or self.learner.config.loss == "ce"

    def size_from(self, records: Sequence[Record]) -> bool:
        """Build the codec and the learner from the first valid record, if any; True once ready."""
        if self.codec is None:
            codec = codec_from_first_valid([r.value for r in records], self.codec_name, **self.codec_options)
            if codec is not None:
                self.attach(self._build(codec.n_features), codec)
        return self.ready

    def reject_unsized(self, records: Sequence[Record]) -> List[Rejection]:
        """Why each record is invalid, before any valid one fixed the sizes: each is judged by a
        codec of the size it claims itself (so `feature_count` cannot happen yet)."""
        out = []
        for i, r in enumerate(records):
            n = CODECS[self.codec_name].sniff_n_features(r.value) or 1
            rej = make_codec(self.codec_name, n, **self.codec_options).decode_many([r.value]).rejections
            out.append(rej[0]._replace(index=i) if rej else Rejection(i, "malformed", "no valid sample"))
        return out

    def fit_labels(self, y: np.ndarray) -> Optional[Tuple[int, int]]:
        """Grow the output layer for labels beyond it; ``(before, after)`` when it grew."""
        learner = self.learner
        assert learner is not None
        if not self.grow_classes or not len(y):
            return None
        need = int(y.max()) + 1
        if need <= learner.n_outputs:
            return None
        before = learner.n_outputs
        learner.expand(n_outputs=need)
        return before, need

    def sizes(self) -> Dict[str, Any]:
        """What a state records so that a restart decodes and grows the same way."""
        assert self.codec is not None
        return {"n_features": self.codec.n_features, "n_classes": self.codec.n_classes,
                "grow_classes": self.grow_classes}


# ---- the engine -------------------------------------------------------------------------------
class Engine:
    """Records in, minibatches out: offsets, carry, key checksum, prequential score, state.

    Parameters
    ----------
    model
        The learner and codec (`StreamModel`).
    batch_size
        Samples per minibatch (one update each).
    window
        Samples in the windowed prequential score.
    keep_keys
        Keep record keys with the samples (to write predictions under the same keys).
    events
        Told what happens (`EngineEvents`).
    continual
        Per-task metrics of a task sequence (`amstream.serve.continual.Continual`; default: one
        without an evaluation set, which counts prequential accuracy per task id).
    mixed_tasks
        Let a minibatch hold samples of several tasks. By default a change of the task id in the
        stream ends the minibatch (a minibatch belongs to one task, as in a continual benchmark);
        streams without task ids are not affected.
    """

    def __init__(self, model: StreamModel, *, batch_size: int = 256, window: int = 1000, keep_keys: bool = False,
                 events: Optional[EngineEvents] = None, continual: Optional[Continual] = None,
                 mixed_tasks: bool = False) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigError(f"`batch_size` must be an int >= 1, got `{batch_size!r}`")
        self.model = model
        self.batch_size = batch_size
        self.keep_keys = bool(keep_keys)
        self.events = events or EngineEvents()
        self.prequential = Prequential(window, classification=model.classification)
        self.continual = continual if continual is not None else Continual()
        self.mixed_tasks = bool(mixed_tasks)
        self.counters = Counters()
        self.offsets: Offsets = {}
        self.topics: List[str] = []  # topic names by code (Chunk.topic)
        self.dirty = False  # changed since `mark_saved`
        self.batches_since_saved = 0
        self.samples_per_record = 1.0  # a running mean, for sizing polls
        self._buffer = _Buffer()
        self._topic_code: Dict[str, int] = {}
        self._topic_hash: List[int] = []
        self._revoked: set = set()

    # ---- views ----------------------------------------------------------------------------------
    @property
    def learner(self) -> Optional[Learner]:
        return self.model.learner

    @property
    def buffered(self) -> int:
        """Samples taken but not learned yet (the carry)."""
        return len(self._buffer)

    @property
    def ready(self) -> bool:
        """A full minibatch is buffered."""
        return len(self._buffer) >= self.batch_size

    @property
    def max_label(self) -> int:
        """The largest class label among the buffered samples (-1 when none is buffered)."""
        return self._buffer.max_label()

    def has_taken(self, delivered: Mapping[TopicPartition, int]) -> bool:
        """Whether every record a source handed out (its ``snapshot()``) has been ingested."""
        return all(self.offsets.get(tp, off) == off for tp, off in delivered.items())

    # ---- partitions -----------------------------------------------------------------------------
    def assign(self, partitions: Sequence[TopicPartition], *, absent_at_zero: bool = False) -> Offsets:
        """Offsets to start newly assigned ``partitions`` at: this state's, where it has them, and
        with ``absent_at_zero`` 0 for the others (else the others start wherever the source puts
        them). Partitions revoked since the last call and not assigned again are forgotten here:
        another reader owns their offsets now."""
        for tp in self._revoked - set(partitions):
            self.offsets.pop(tp, None)
        self._revoked.clear()
        seek = {tp: self.offsets[tp] for tp in partitions if tp in self.offsets}
        if absent_at_zero:
            seek.update({tp: 0 for tp in partitions if tp not in self.offsets})
        return seek

    def revoke(self, partitions: Sequence[TopicPartition]) -> None:
        """``partitions`` are going; samples of them already taken stay in the carry and are learned."""
        self._revoked |= set(partitions)

    def rewind(self, partition: TopicPartition, offset: int) -> None:
        """Accept that ``partition`` continues at ``offset`` (below ours: the source lost data and
        its records from there on are new)."""
        self.offsets[partition] = int(offset)
        self.dirty = True

    # ---- records -> samples ---------------------------------------------------------------------
    def _code(self, topic: str) -> int:
        code = self._topic_code.get(topic)
        if code is None:
            code = self._topic_code[topic] = len(self.topics)
            self.topics.append(topic)
            self._topic_hash.append(topic_hash(topic))
        return code

    def ingest(self, records: Sequence[Record]) -> Ingested:
        """Decode ``records`` (of any partitions, each partition's in offset order), advance the
        offsets past them, buffer the accepted samples, count the rejected ones."""
        t0 = time.perf_counter()
        n = len(records)
        if not n:
            return Ingested(records, [], 0, 0.0)
        parts = np.fromiter([r.partition for r in records], dtype=np.int32, count=n)
        offs = np.fromiter([r.offset for r in records], dtype=np.int64, count=n)
        topic = records[0].topic
        if all(r.topic == topic for r in records):  # the usual case: next offsets from the arrays
            codes = np.full(n, self._code(topic), dtype=np.int32)
            if parts[0] == parts[-1] and (parts == parts[0]).all():
                self.offsets[(topic, int(parts[0]))] = int(offs.max()) + 1
            else:
                for p in np.unique(parts).tolist():
                    self.offsets[(topic, p)] = int(offs[parts == p].max()) + 1
        else:
            codes = np.fromiter([self._code(r.topic) for r in records], dtype=np.int32, count=n)
            for r in records:  # records of a partition come in increasing offset order
                self.offsets[(r.topic, r.partition)] = r.offset + 1
        c = self.counters
        c.records += n
        self.dirty = True
        if not self.model.size_from(records):
            rejections = self.model.reject_unsized(records)
            self._count_rejections(rejections)
            return self._ingested(records, rejections, 0, t0)
        self.prequential.classification = self.model.classification
        assert self.model.codec is not None
        batch = self.model.codec.decode_records(records)
        self._count_rejections(batch.rejections)
        m = len(batch)
        if m:
            idx = batch.index
            if m == n and not batch.rejections:  # one sample per message
                pos = np.zeros(m, dtype=np.int32)
            else:  # packed messages: a sample's rank among its message's accepted samples
                new_msg = np.r_[True, idx[1:] != idx[:-1]]
                starts = np.flatnonzero(new_msg)
                pos = (np.arange(m) - starts[np.cumsum(new_msg) - 1]).astype(np.int32)
            keys = list(batch.keys) if self.keep_keys else None
            self._buffer.append(Chunk(batch.X, batch.y, codes[idx], parts[idx], offs[idx], pos, batch.task, keys))
            self.samples_per_record = 0.8 * self.samples_per_record + 0.2 * (m / n)
        return self._ingested(records, batch.rejections, m, t0)

    def _ingested(self, records: Sequence[Record], rejections: List[Rejection], m: int, t0: float) -> Ingested:
        out = Ingested(records, rejections, m, time.perf_counter() - t0)
        self.events.after_ingest(out)
        return out

    def _count_rejections(self, rejections: Sequence[Rejection]) -> None:
        c = self.counters
        for rej in rejections:
            c.bad_by_reason[rej.reason] = c.bad_by_reason.get(rej.reason, 0) + 1
        c.bad_messages += len(rejections)
        c.bad_messages_this_run += len(rejections)

    # ---- learning -------------------------------------------------------------------------------
    def learn(self, *, allow_empty: bool = False) -> Step:
        """Learn the next minibatch: ``batch_size`` samples, or all buffered ones when fewer.

        ``allow_empty``: with nothing buffered, call the learner with no samples all the same
        (one rank of several, `amstream.serve.distributed`: it joins the update of the others'
        samples); the `Step` then has ``batch == 0``.
        """
        learner = self.model.learner
        if not len(self._buffer) and not (allow_empty and learner is not None):
            raise ConfigError("nothing to learn: no samples are buffered")
        assert learner is not None
        chunk = (self._buffer.take(self.batch_size, one_task=not self.mixed_tasks) if len(self._buffer)
                 else Chunk.empty(learner.n_inputs, self.prequential.classification))
        n = len(chunk)
        grown = self.model.fit_labels(chunk.y) if self.prequential.classification else None
        evaluation = self.continual.before_learn(learner, chunk.task)  # a task ended: score it first
        x, y = torch.from_numpy(chunk.X), torch.from_numpy(chunk.y)
        t0 = time.perf_counter()
        update = learner.learn(x, y)
        out = update.outputs
        if self.prequential.classification:
            pred = out.argmax(1)
            hits = (pred.cpu() == y).numpy()
            correct = int(hits.sum())
        else:
            pred, correct, hits = out, 0, np.zeros(n, dtype=bool)
        seconds = time.perf_counter() - t0
        evaluation = self.continual.after_learn(learner, chunk.task, hits) or evaluation
        if n:
            self.prequential.update(n, correct, float(update.loss) * n)
        c = self.counters
        th = np.asarray(self._topic_hash, dtype=np.uint64)[chunk.topic]
        h = key_hashes(th, chunk.partition, chunk.offset, chunk.index)
        c.key_checksum = (c.key_checksum + int(h.sum(dtype=np.uint64))) & _MASK64
        c.learned_samples += n
        c.learned_samples_this_run += n
        c.minibatches += 1
        self.batches_since_saved += 1
        self.dirty = True
        p = self.prequential
        step = Step(
            batch=n, loss=float(update.loss), accuracy=correct / n if p.classification and n else math.nan,
            learned_samples=c.learned_samples, learned_samples_this_run=c.learned_samples_this_run,
            prequential_accuracy=p.accuracy, window_accuracy=p.window_accuracy, window_loss=p.window_loss,
            bad_messages=c.bad_messages, model_step=learner.n_updates, seconds=seconds, grown=grown,
            chunk=chunk, outputs=out, predictions=pred, evaluation=evaluation)
        self.events.after_learn(step)
        return step

    # ---- state ----------------------------------------------------------------------------------
    @property
    def can_snapshot(self) -> bool:
        """False until the first valid message built the learner (there is no model to save)."""
        return self.model.learner is not None

    def mark_saved(self) -> None:
        """The current state is safely stored (checkpointed)."""
        self.dirty = False
        self.batches_since_saved = 0

    def state_dict(self) -> Dict[str, Any]:
        """Learner state, offsets, carry, counters and sizes: plain values and tensors only."""
        learner = self.model.learner
        if learner is None:
            raise CheckpointError("no state yet: no valid message has sized the learner")
        c = self.counters
        return {
            "kind": STATE_KIND,
            "version": STATE_VERSION,
            "learner": learner.state_dict(),
            "config": learner.config.to_dict(),
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
            "sizes": self.model.sizes(),
            "continual": self.continual.state_dict(),
        }

    def _carry_state(self) -> Dict[str, Any]:
        chunk = self._buffer.peek_all()
        if chunk is None:
            return {}
        out: Dict[str, Any] = {"topics": list(self.topics)}
        for name in Chunk._ARRAYS:
            out[name] = torch.from_numpy(np.ascontiguousarray(getattr(chunk, name)))
        out["keys"] = None if chunk.keys is None else list(chunk.keys)
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a `state_dict`. The learner is rebuilt from the state (its classes may have
        grown), on the device of the model's learner if it has one, and the state's sizes decide
        the codec and whether classes grow."""
        check_state(state)
        model = self.model
        device = model.learner.device if model.learner is not None else model.device
        learner = learner_from_state(state["learner"], device=device)
        ce = learner.config.loss == "ce"
        sizes = state.get("sizes") or {"n_features": learner.n_inputs, "grow_classes": False,
                                       "n_classes": learner.n_outputs if ce else None}
        model.grow_classes = bool(sizes["grow_classes"])
        codec = model.codec
        if codec is None or (codec.n_features, codec.n_classes) != (learner.n_inputs, sizes["n_classes"]):
            options = dict(model.codec_options, n_classes=sizes["n_classes"])
            codec = make_codec(model.codec_name, learner.n_inputs, **options)
        model.attach(learner, codec)
        self.prequential.classification = model.classification
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
        self.continual.load_state_dict(state.get("continual") or {})
        carry = state.get("carry") or {}
        self._buffer = _Buffer()
        if carry:
            codes = {i: self._code(name) for i, name in enumerate(carry["topics"])}
            topic = np.array([codes[int(i)] for i in carry["topic"].tolist()], dtype=np.int32)
            X = carry["X"].numpy()
            assert model.learner is not None
            if X.shape[1] != model.learner.n_inputs:
                raise CheckpointError(f"checkpoint carry has `{X.shape[1]}` features, the learner "
                                      f"`{model.learner.n_inputs}`")
            keys = carry.get("keys") if self.keep_keys else None
            if self.keep_keys and keys is None:
                keys = [None] * X.shape[0]
            task = carry["task"].numpy() if "task" in carry else np.full(X.shape[0], -1, np.int64)  # (older states)
            self._buffer.append(Chunk(X, carry["y"].numpy(), topic, carry["partition"].numpy(),
                                      carry["offset"].numpy(), carry["index"].numpy(), task, keys))
        self.mark_saved()


def check_state(state: Mapping[str, Any]) -> None:
    """Raise `CheckpointError` unless ``state`` is a serve state of a version this code reads."""
    if state.get("kind") != STATE_KIND:
        raise CheckpointError(f"checkpoint is a `{state.get('kind')}` state, not `{STATE_KIND}` (serve)")
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"serve state version `{state.get('version')}` is not supported "
                              f"(expected {STATE_VERSION})")


def load_serve_checkpoint(directory: Any, *, device: Any = "cpu",
                          strict: bool = False) -> Optional[Tuple[Learner, Dict[str, Any], Dict[str, Any]]]:
    """``(learner, state, metadata)`` from the newest valid serve checkpoint in ``directory``, or
    None when there is none (``strict``: a `CheckpointError` when there are checkpoints but none
    can be read). Give the learner to a `StreamModel` and the state to `Engine.load_state_dict`."""
    loaded = CheckpointManager(directory).restore(strict=strict)
    if loaded is None:
        return None
    state = loaded["state"]
    try:
        check_state(state)
    except CheckpointError as exc:
        raise CheckpointError(f"`{loaded['path']}`: {exc}") from None
    return learner_from_state(state["learner"], device=device), state, loaded["metadata"]
