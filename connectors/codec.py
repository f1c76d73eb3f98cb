r"""Message codecs: one sample <-> one message's bytes, with validation that names its reason.

A *sample* is a feature vector ``x`` (``n_features`` floats), a label ``y`` (a class
index in ``[0, n_classes)`` when the codec has ``n_classes``, else a real target, or
``None`` when unlabelled) and an optional ``key``. Codecs never import Kafka or the
learner: they turn bytes into arrays and back.

Formats
-------
``json`` (`JsonCodec`)
    A UTF-8 JSON object ``{"x": [0.5, -1.0, ...], "y": 3}``. ``"y"`` may be absent
    or ``null`` (unlabelled); an optional ``"key"`` string is used when the record
    has no key of its own; an optional ``"task"`` (a non-negative integer) names the
    task of a continual sequence the sample belongs to; other fields are ignored. Class
    labels may be written as integral floats (``3.0``).

``binary`` (`BinaryCodec`), version 1, little-endian, ``20 + 4 * n_features`` bytes::

    offset  size  field
    0       3     magic  b"AMS"
    3       1     version, uint8 = 1, or 2 for a sample that names its task
    4       1     label kind, uint8: 0 = no label, 1 = class index (int64), 2 = real target (float64)
    5       3     version 1: reserved, must be zero; version 2: the task id, uint24
    8       4     n_features, uint32
    12      8     label: int64 (kind 1) or float64 (kind 2); zero for kind 0
    20      4*n   features, float32

    236 bytes for 54 features. The header is a multiple of 4 bytes, so the features
    of a batch joined into one buffer are read with one ``numpy.frombuffer``.
    The key is not in the payload: it travels as the Kafka message key.

``csv`` (`CsvCodec`)
    One line of numeric CSV without quoting; the label is the column
    ``label_column`` (default: the last), or there is none (``label_column=None``).

``auto`` (`AutoCodec`)
    Decodes each message as binary when it starts with the magic ``b"AMS"``,
    else as JSON; encodes binary.

Validation
----------
Every rejected message gets exactly one reason, the first that applies in this order:

=====================  =====================================================================
``oversize``           longer than ``max_bytes``
``malformed``          not JSON / not an object / no ``x`` list / a ``task`` that is not a
                       non-negative integer; bad magic, version, reserved bytes or a length
                       that does not match the header; undecodable text
``feature_count``      ``len(x) != n_features``
``non_numeric``        a feature that is not a number (string, bool, null, list, ...)
``non_finite``         a feature (or a real target) that is NaN or infinite as float32
``missing_label``      no label, and the codec has ``require_label=True``
``unknown_label``      a label that is not a number, not integral for a class index, or an
                       unknown binary label kind
``label_out_of_range`` a class index outside ``[0, n_classes)``
=====================  =====================================================================

`Codec.decode_many` never raises for a bad message: it returns the accepted samples and
one `Rejection` (``index``, ``reason``, ``detail``) per bad one, so one bad record never
spoils the batch. `Codec.decode_one` raises `DecodeError` with the same text and a
``reason`` attribute.

Examples
--------
>>> import numpy as np
>>> codec = BinaryCodec(n_features=3, n_classes=2)
>>> msgs = codec.encode_many(np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32), [0, 1])
>>> len(msgs[0])
32
>>> msgs.append(b'{"x": [1, 2, 3], "y": 1}')   # JSON on a binary codec: rejected
>>> batch = codec.decode_many(msgs)
>>> batch.X
array([[1., 2., 3.],
       [4., 5., 6.]], dtype=float32)
>>> batch.y
array([0, 1])
>>> batch.rejections
[Rejection(index=2, reason='malformed', detail='bad magic `b\'{"x\'`, expected `b\'AMS\'`')]
>>> JsonCodec(n_features=3, n_classes=2).decode_one(b'{"x": [1, 2, "a"], "y": 1}')
Traceback (most recent call last):
...
amstream.exceptions.DecodeError: non_numeric: feature `2` is `'a'`, not a number
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import (
    Any,
    ClassVar,
    Dict,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Type,
    Union,
)

import numpy as np

from amstream.exceptions import ConfigError, DecodeError

__all__ = [
    "AutoCodec",
    "BinaryCodec",
    "CODECS",
    "Codec",
    "CsvCodec",
    "DecodedBatch",
    "JsonCodec",
    "REASONS",
    "Rejection",
    "Sample",
    "codec_from_first_valid",
    "encode_binary_rows",
    "make_codec",
]

# ---- reasons, in order of precedence -------------------------------------------------------
OVERSIZE = "oversize"
MALFORMED = "malformed"
FEATURE_COUNT = "feature_count"
NON_NUMERIC = "non_numeric"
NON_FINITE = "non_finite"
MISSING_LABEL = "missing_label"
UNKNOWN_LABEL = "unknown_label"
LABEL_OUT_OF_RANGE = "label_out_of_range"
REASONS = (
    OVERSIZE,
    MALFORMED,
    FEATURE_COUNT,
    NON_NUMERIC,
    NON_FINITE,
    MISSING_LABEL,
    UNKNOWN_LABEL,
    LABEL_OUT_OF_RANGE,
)

# ---- binary layout ----------------------------------------------------------------------------
MAGIC = b"AMS"
VERSION = 1
VERSION_TASK = 2  # the same layout, the reserved bytes holding the sample's task id
MAX_TASK = (1 << 24) - 1
HEADER_SIZE = 20
KIND_NONE, KIND_CLASS, KIND_REAL = 0, 1, 2
_HEADER = struct.Struct("<3sBB3sIq")  # magic, version, kind, reserved, n_features, label bits
_MAGIC_VERSION = int.from_bytes(MAGIC + bytes([VERSION]), "little")
_MAGIC_VERSION_TASK = int.from_bytes(MAGIC + bytes([VERSION_TASK]), "little")

DEFAULT_MAX_BYTES = 1 << 20  # Kafka's default max.message.bytes is about this
_JSON_DECODER = json.JSONDecoder()
_FLOAT32_FMT = "%.9g"  # 9 significant digits identify every float32 (FLT_DECIMAL_DIG)

Value = Union[bytes, bytearray, memoryview]


class Sample(NamedTuple):
    """One decoded sample."""

    x: np.ndarray  # float32 [n_features]
    y: Union[int, float, None]  # class index, real target, or None when unlabelled
    key: Optional[bytes] = None


class Rejection(NamedTuple):
    """Why the message at ``index`` of a decoded batch was rejected."""

    index: int
    reason: str  # one of REASONS
    detail: str

    def to_error(self) -> DecodeError:
        """The `DecodeError` `Codec.decode_one` raises for this rejection (``.reason`` set)."""
        err = DecodeError(f"{self.reason}: {self.detail}")
        err.reason = self.reason  # type: ignore[attr-defined]
        return err


@dataclass(frozen=True)
class DecodedBatch:
    """The accepted samples of a batch of messages, and a `Rejection` per rejected one.

    Row ``i`` of ``X`` came from message ``index[i]`` of the input, so a caller can map
    samples back to their records (offsets, keys) and rejections to theirs. (Several rows
    share an index only when a binary message packs several samples.)
    """

    X: np.ndarray  # float32 [n_accepted, n_features], C-contiguous
    y: np.ndarray  # int64 (class codecs) or float64 [n_accepted]; -1 / NaN where unlabelled
    keys: List[Optional[bytes]]  # per accepted sample
    index: np.ndarray  # int64 [n_accepted]: position in the input of the message each sample came from
    labelled: np.ndarray  # bool [n_accepted]
    rejections: List[Rejection] = field(default_factory=list)
    task: Optional[np.ndarray] = None  # int64 [n_accepted]: the task id a sample names, -1 where none

    def __post_init__(self) -> None:
        if self.task is None:
            object.__setattr__(self, "task", np.full(len(self.X), -1, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_rejected(self) -> int:
        return len(self.rejections)

    def sample(self, i: int) -> Sample:
        """Row ``i`` as a `Sample` (``y`` is ``None`` when unlabelled)."""
        y: Union[int, float, None] = None
        if self.labelled[i]:
            y = self.y[i].item()
        return Sample(self.X[i].copy(), y, self.keys[i])


def _fmt(v: Any) -> str:
    """A value for an error message, short."""
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


class Codec:
    """Base class: validated encode/decode of samples; subclasses set `name` and implement
    `encode_many` and `_decode`.

    Parameters
    ----------
    n_features
        Length of every feature vector; other lengths are rejected (``feature_count``).
    n_classes
        Number of classes: labels are class indices in ``[0, n_classes)`` (int64). ``None``:
        labels are real targets (float64).
    require_label
        Reject unlabelled messages (``missing_label``). With ``False`` they are accepted,
        with ``labelled`` False and ``y`` -1 (classes) or NaN (targets).
    max_bytes
        Longer messages are rejected (``oversize``) before any parsing.
    """

    name: ClassVar[str] = ""

    def __init__(
        self,
        n_features: int,
        n_classes: Optional[int] = None,
        *,
        require_label: bool = True,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if isinstance(n_features, bool) or not isinstance(n_features, (int, np.integer)) or n_features < 1:
            raise ConfigError(f"`n_features` must be an int >= 1, got `{n_features!r}`")
        if n_classes is not None and (
            isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 1
        ):
            raise ConfigError(f"`n_classes` must be an int >= 1 or None, got `{n_classes!r}`")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) or max_bytes < 1:
            raise ConfigError(f"`max_bytes` must be an int >= 1, got `{max_bytes!r}`")
        self.n_features = int(n_features)
        self.n_classes = None if n_classes is None else int(n_classes)
        self.require_label = bool(require_label)
        self.max_bytes = int(max_bytes)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_features={self.n_features}, n_classes={self.n_classes}, "
            f"require_label={self.require_label}, max_bytes={self.max_bytes})"
        )

    # ---- public API ---------------------------------------------------------------------------
    def encode_one(self, x: Any, y: Any = None, *, key: Optional[bytes] = None) -> bytes:
        """Encode one sample. Values are not validated (NaN encodes fine and is rejected on
        decode); the shape is: a wrong length raises ``ValueError``."""
        X = np.asarray(x, dtype=np.float32).reshape(1, -1)
        return self.encode_many(X, None if y is None else [y], keys=None if key is None else [key])[0]

    def encode_many(
        self, X: Any, y: Any = None, *, keys: Optional[Sequence[Optional[bytes]]] = None, tasks: Any = None
    ) -> List[bytes]:
        """Encode rows of ``X`` (with labels ``y`` or none, task ids ``tasks`` or none) into
        one message each."""
        raise NotImplementedError

    def decode_one(self, value: Value, key: Optional[bytes] = None) -> Sample:
        """Decode one message; raises `DecodeError` (with ``.reason``) when it is rejected."""
        batch = self.decode_many([value], None if key is None else [key])
        if batch.rejections:
            raise batch.rejections[0].to_error()
        if len(batch) != 1:
            raise ValueError(f"the message packs {len(batch)} samples: use `decode_many`")
        return batch.sample(0)

    def decode_many(
        self, values: Sequence[Value], keys: Optional[Sequence[Optional[bytes]]] = None
    ) -> DecodedBatch:
        """Decode a batch; never raises for a bad message (see `DecodedBatch`)."""
        if keys is not None and len(keys) != len(values):
            raise ValueError(f"`keys` has {len(keys)} entries for {len(values)} values")
        return self._decode(values, keys)

    def decode_records(self, records: Sequence[Any]) -> DecodedBatch:
        """`decode_many` of ``[r.value for r in records]`` with their keys."""
        return self.decode_many([r.value for r in records], [r.key for r in records])

    @classmethod
    def sniff_n_features(cls, value: Value) -> Optional[int]:
        """The feature count a message of this format claims (None: it does not say, or it is
        not of this format). A claim, not a verdict: decode to validate."""
        return None

    # ---- helpers for subclasses -----------------------------------------------------------------
    def _decode(
        self, values: Sequence[Value], keys: Optional[Sequence[Optional[bytes]]]
    ) -> DecodedBatch:
        raise NotImplementedError

    def _empty_y(self, n: int) -> np.ndarray:
        if self.n_classes is not None:
            return np.full(n, -1, dtype=np.int64)
        return np.full(n, np.nan, dtype=np.float64)

    def _labels_for_encoding(self, y: Any, n: int) -> Optional[np.ndarray]:
        if y is None:
            return None
        arr = np.asarray(y)
        if arr.shape != (n,):
            raise ValueError(f"`y` must have shape `({n},)`, got `{arr.shape}`")
        if self.n_classes is None:
            return arr.astype(np.float64)
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
                raise ValueError("class labels must be integral")
        elif arr.dtype.kind not in "iu":
            raise ValueError(f"class labels must be integers, got dtype `{arr.dtype}`")
        return arr.astype(np.int64)

    @staticmethod
    def _tasks_for_encoding(tasks: Any, n: int) -> Optional[np.ndarray]:
        if tasks is None:
            return None
        arr = np.asarray(tasks)
        if arr.shape != (n,) or arr.dtype.kind not in "iu" or (n and (arr.min() < 0 or arr.max() > MAX_TASK)):
            raise ValueError(f"`tasks` must be {n} integers in [0, {MAX_TASK}]")
        return arr.astype(np.int64)

    def _check_features(self, X: Any) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"`X` must have shape `(n, {self.n_features})`, got `{X.shape}`")
        return X

    def _label(self, y: Any) -> Tuple[Optional[str], str, Union[int, float, None]]:
        """Validate one Python label: ``(reason or None, detail, value)``."""
        if y is None:
            if self.require_label:
                return MISSING_LABEL, "no label", None
            return None, "", None
        if type(y) is bool or not isinstance(y, (int, float)):
            return UNKNOWN_LABEL, f"label `{_fmt(y)}` is not a number", None
        if self.n_classes is None:
            try:
                v = float(y)
            except OverflowError:
                return NON_FINITE, f"label `{_fmt(y)}` overflows float64", None
            if not math.isfinite(v):
                return NON_FINITE, f"label `{v!r}` is not finite", None
            return None, "", v
        if isinstance(y, float):
            if not math.isfinite(y) or not y.is_integer():
                return UNKNOWN_LABEL, f"label `{y!r}` is not an integer class index", None
            y = int(y)
        if not 0 <= y < self.n_classes:
            return (
                LABEL_OUT_OF_RANGE,
                f"label `{_fmt(y)}` is outside `[0, {self.n_classes})`",
                None,
            )
        return None, "", int(y)

    def _assemble(
        self,
        n: int,
        X: np.ndarray,
        rows_index: np.ndarray,
        y: np.ndarray,
        labelled: np.ndarray,
        keys: List[Optional[bytes]],
        rejections: List[Rejection],
        task: Optional[np.ndarray] = None,
    ) -> DecodedBatch:
        rejections.sort(key=lambda r: r.index)
        return DecodedBatch(
            X=np.ascontiguousarray(X, dtype=np.float32).reshape(-1, self.n_features),
            y=y,
            keys=keys,
            index=rows_index.astype(np.int64, copy=False),
            labelled=labelled,
            rejections=rejections,
            task=task,
        )

    def _non_finite_detail(self, row: np.ndarray) -> str:
        j = int(np.flatnonzero(~np.isfinite(row))[0])
        return f"feature `{j}` is `{float(row[j])!r}`"

    def _finish_python_rows(
        self,
        n: int,
        cand_index: List[int],
        cand_rows: List[Any],
        cand_labels: List[Tuple[Optional[str], str, Union[int, float, None]]],
        cand_keys: List[Optional[bytes]],
        rejections: List[Rejection],
        cand_tasks: Optional[List[int]] = None,
    ) -> DecodedBatch:
        """Shared tail of the text codecs: rows of numbers (already type-checked) -> arrays,
        then finiteness, then the label verdicts, in the documented order of reasons."""
        d = self.n_features
        m = len(cand_index)
        X = np.empty((m, d), dtype=np.float32)
        ok = np.ones(m, dtype=bool)
        if m:
            with np.errstate(over="ignore", invalid="ignore"):
                try:
                    X[:] = np.array(cand_rows, dtype=np.float64)
                except (OverflowError, ValueError, TypeError):
                    for i, row in enumerate(cand_rows):
                        try:
                            X[i] = np.array(row, dtype=np.float64)
                        except OverflowError:
                            X[i] = np.inf  # an int beyond float range: reported as non-finite
                        except (ValueError, TypeError) as exc:
                            ok[i] = False
                            rejections.append(Rejection(cand_index[i], NON_NUMERIC, str(exc)))
            finite = np.isfinite(X).all(axis=1)
        else:
            finite = ok
        y = self._empty_y(m)
        labelled = np.zeros(m, dtype=bool)
        for i in range(m):
            if not ok[i]:
                continue
            if not finite[i]:
                ok[i] = False
                rejections.append(
                    Rejection(cand_index[i], NON_FINITE, self._non_finite_detail(X[i]))
                )
                continue
            reason, detail, value = cand_labels[i]
            if reason is not None:
                ok[i] = False
                rejections.append(Rejection(cand_index[i], reason, detail))
            elif value is not None:
                y[i] = value
                labelled[i] = True
        keep = np.flatnonzero(ok)
        return self._assemble(
            n,
            X[keep],
            np.asarray(cand_index, dtype=np.int64)[keep] if m else np.empty(0, np.int64),
            y[keep],
            labelled[keep],
            [cand_keys[i] for i in keep],
            rejections,
            None if cand_tasks is None else np.asarray(cand_tasks, dtype=np.int64)[keep],
        )


# ================================================================================================
class JsonCodec(Codec):
    """``{"x": [...], "y": ...}`` as UTF-8 JSON; see the module docstring for the rules.

    Examples
    --------
    >>> c = JsonCodec(n_features=2, n_classes=3)
    >>> c.encode_one([0.5, 1.0], 2)
    b'{"x":[0.5,1],"y":2}'
    >>> [r.reason for r in c.decode_many([b'{"x":[0.5]}', b'{"x":[1,2],"y":7}', b'nope']).rejections]
    ['feature_count', 'label_out_of_range', 'malformed']
    """

    name = "json"

    def encode_many(
        self, X: Any, y: Any = None, *, keys: Optional[Sequence[Optional[bytes]]] = None, tasks: Any = None
    ) -> List[bytes]:
        X = self._check_features(X)
        n = X.shape[0]
        labels = self._labels_for_encoding(y, n)
        task_ids = self._tasks_for_encoding(tasks, n)
        ts = [None] * n if task_ids is None else task_ids.tolist()
        X32 = X.astype(np.float32)
        rows = X32.tolist()
        finite = np.isfinite(X32).all(axis=1).tolist()
        ys = [None] * n if labels is None else labels.tolist()
        ks: Sequence[Optional[bytes]] = keys if keys is not None else [None] * n
        fmt = "[" + ",".join([_FLOAT32_FMT] * self.n_features) + "]"
        dumps = json.dumps
        out = []
        for row, ok, label, key, task in zip(rows, finite, ys, ks, ts):
            # "%.9g" round-trips every finite float32 and is ~4x faster than json's 17-digit repr;
            # rows with NaN/inf (for producing bad messages on purpose) take json's NaN/Infinity
            parts = ['{"x":', fmt % tuple(row) if ok else dumps(row)]
            if label is not None:
                parts += [',"y":', dumps(label)]
            if key is not None:
                k = key.decode("utf-8") if isinstance(key, (bytes, bytearray)) else str(key)
                parts += [',"key":', dumps(k)]
            if task is not None:
                parts += [',"task":', str(task)]
            parts.append("}")
            out.append("".join(parts).encode("utf-8"))
        return out

    def _decode(
        self, values: Sequence[Value], keys: Optional[Sequence[Optional[bytes]]]
    ) -> DecodedBatch:
        n = len(values)
        d = self.n_features
        max_bytes = self.max_bytes
        scan = _JSON_DECODER.scan_once  # the C scanner, without json.loads' per-call overhead
        numeric = {int, float}
        rejections: List[Rejection] = []
        cand_index: List[int] = []
        cand_rows: List[Any] = []
        cand_labels: List[Tuple[Optional[str], str, Union[int, float, None]]] = []
        cand_keys: List[Optional[bytes]] = []
        cand_tasks: List[int] = []
        for i, v in enumerate(values):
            if len(v) > max_bytes:
                rejections.append(
                    Rejection(i, OVERSIZE, f"message of `{len(v)}` bytes exceeds `max_bytes={max_bytes}`")
                )
                continue
            try:
                text = (v if type(v) is bytes else bytes(v)).decode("utf-8").strip()
                obj, end = scan(text, 0)
                if end != len(text):
                    raise json.JSONDecodeError("extra data", text, end)
            except UnicodeDecodeError as exc:
                rejections.append(Rejection(i, MALFORMED, f"not UTF-8: {exc}"))
                continue
            except json.JSONDecodeError as exc:
                rejections.append(Rejection(i, MALFORMED, f"invalid JSON: {exc}"))
                continue
            except (StopIteration, RecursionError):
                rejections.append(Rejection(i, MALFORMED, "invalid JSON"))
                continue
            if type(obj) is not dict:
                rejections.append(
                    Rejection(i, MALFORMED, f"expected a JSON object, got `{type(obj).__name__}`")
                )
                continue
            x = obj.get("x")
            if type(x) is not list:
                what = "missing field `x`" if x is None else f"field `x` must be a list, got `{type(x).__name__}`"
                rejections.append(Rejection(i, MALFORMED, what))
                continue
            key = None if keys is None else keys[i]
            if key is None and "key" in obj:
                k = obj["key"]
                if type(k) is not str:
                    rejections.append(
                        Rejection(i, MALFORMED, f"field `key` must be a string, got `{type(k).__name__}`")
                    )
                    continue
                key = k.encode("utf-8")
            task = obj.get("task")
            if task is None:
                task = -1
            elif type(task) is float and task.is_integer() and 0 <= task <= MAX_TASK:
                task = int(task)
            elif type(task) is not int or not 0 <= task <= MAX_TASK:
                rejections.append(Rejection(i, MALFORMED, f"field `task` must be an integer in [0, {MAX_TASK}], "
                                                          f"got `{_fmt(task)}`"))
                continue
            if len(x) != d:
                rejections.append(Rejection(i, FEATURE_COUNT, f"expected `{d}` features, got `{len(x)}`"))
                continue
            if not set(map(type, x)) <= numeric:
                j = next(j for j, e in enumerate(x) if type(e) not in numeric)
                rejections.append(Rejection(i, NON_NUMERIC, f"feature `{j}` is `{_fmt(x[j])}`, not a number"))
                continue
            cand_index.append(i)
            cand_rows.append(x)
            cand_labels.append(self._label(obj.get("y")))
            cand_keys.append(key)
            cand_tasks.append(task)
        return self._finish_python_rows(n, cand_index, cand_rows, cand_labels, cand_keys, rejections, cand_tasks)

    @classmethod
    def sniff_n_features(cls, value: Value) -> Optional[int]:
        """``len(x)`` of a JSON object with an ``x`` list."""
        try:
            obj = json.loads(bytes(value))
        except (ValueError, RecursionError):
            return None
        x = obj.get("x") if type(obj) is dict else None
        return len(x) if type(x) is list and x else None


# ================================================================================================
class BinaryCodec(Codec):
    """The compact binary format (``20 + 4 * n_features`` bytes per sample); see the module docstring.

    A message may also hold several samples back to back (``samples_per_message`` in
    `encode_many`), each with its own header: decoding accepts any message whose length is a
    multiple of `message_size`. Per-record work in the Kafka client, not decoding, limits
    throughput (about 30k records/s with kafka-python on 2 cores), so packing is how a
    stream reaches more samples per second. Each sample is validated on its own; ``index``
    and rejections then name the *message* a sample came from, and offsets stay per message.

    A batch is decoded with one ``b"".join`` and one ``numpy.frombuffer``; only rejected
    messages cost per-message Python work.
    """

    name = "binary"

    def __init__(
        self,
        n_features: int,
        n_classes: Optional[int] = None,
        *,
        require_label: bool = True,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        super().__init__(n_features, n_classes, require_label=require_label, max_bytes=max_bytes)
        self.message_size = HEADER_SIZE + 4 * self.n_features
        if self.message_size > self.max_bytes:
            raise ConfigError(
                f"`max_bytes={self.max_bytes}` is below the `{self.message_size}` bytes of one "
                f"binary message with `n_features={self.n_features}`"
            )
        self._dtype = np.dtype(
            {
                "names": ["magic_version", "kind_reserved", "n", "label_i", "label_f", "x"],
                "formats": ["<u4", "<u4", "<u4", "<i8", "<f8", ("<f4", (self.n_features,))],
                "offsets": [0, 4, 8, 12, 12, 20],
                "itemsize": self.message_size,
            }
        )

    def encode_many(
        self,
        X: Any,
        y: Any = None,
        *,
        keys: Optional[Sequence[Optional[bytes]]] = None,
        samples_per_message: int = 1,
        tasks: Any = None,
    ) -> List[bytes]:
        """One message per row, or per ``samples_per_message`` rows (the last may hold fewer);
        with ``tasks``, version-2 headers that carry each sample's task id."""
        X = self._check_features(X)
        if not isinstance(samples_per_message, int) or samples_per_message < 1:
            raise ValueError(f"`samples_per_message` must be an int >= 1, got `{samples_per_message!r}`")
        if samples_per_message * self.message_size > self.max_bytes:
            raise ValueError(
                f"`samples_per_message={samples_per_message}` makes messages of "
                f"`{samples_per_message * self.message_size}` bytes, over `max_bytes={self.max_bytes}`"
            )
        labels = self._labels_for_encoding(y, X.shape[0])
        kind = KIND_NONE if labels is None else (KIND_CLASS if self.n_classes is not None else KIND_REAL)
        return _encode_binary(X, labels, kind, samples_per_message, self._tasks_for_encoding(tasks, X.shape[0]))

    @classmethod
    def sniff_n_features(cls, value: Value) -> Optional[int]:
        """The header's feature count, when the header is valid and the length fits it."""
        if len(value) < HEADER_SIZE:
            return None
        magic, version, _, reserved, n, _ = _HEADER.unpack_from(value)
        if cls._header_reason(magic, version, reserved) or n < 1 or len(value) % (HEADER_SIZE + 4 * n):
            return None
        return int(n)

    def _slow_reason(self, v: Value) -> Rejection:
        """The reason for a message whose length is not a multiple of `message_size`."""
        size = len(v)
        if size > self.max_bytes:
            return Rejection(-1, OVERSIZE, f"message of `{size}` bytes exceeds `max_bytes={self.max_bytes}`")
        if size < HEADER_SIZE:
            return Rejection(-1, MALFORMED, f"message of `{size}` bytes is shorter than the {HEADER_SIZE}-byte header")
        magic, version, kind, reserved, n, _ = _HEADER.unpack_from(v)
        head = self._header_reason(magic, version, reserved)
        if head:
            return Rejection(-1, MALFORMED, head)
        if size % (HEADER_SIZE + 4 * n):
            return Rejection(
                -1,
                MALFORMED,
                f"length `{size}` does not match the header's `{n}` features (`{HEADER_SIZE + 4 * n}` bytes)",
            )
        return Rejection(-1, FEATURE_COUNT, f"expected `{self.n_features}` features, got `{n}`")

    @staticmethod
    def _header_reason(magic: bytes, version: int, reserved: bytes) -> str:
        if magic != MAGIC:
            return f"bad magic `{magic!r}`, expected `{MAGIC!r}`"
        if version not in (VERSION, VERSION_TASK):
            return f"unsupported version `{version}`, expected `{VERSION}` or `{VERSION_TASK}`"
        if version == VERSION and reserved != b"\0\0\0":
            return f"reserved bytes `{reserved!r}` are not zero"
        return ""

    def _decode(
        self, values: Sequence[Value], keys: Optional[Sequence[Optional[bytes]]]
    ) -> DecodedBatch:
        n = len(values)
        d = self.n_features
        L = self.message_size
        rejections: List[Rejection] = []
        lengths = np.fromiter(map(len, values), dtype=np.int64, count=n)
        ok_length = (lengths % L == 0) & (lengths > 0) & (lengths <= self.max_bytes)
        fast = np.flatnonzero(ok_length)
        if len(fast) < n:
            for i in np.flatnonzero(~ok_length).tolist():
                rejections.append(self._slow_reason(values[i])._replace(index=i))
        if len(fast) == n:
            buf = b"".join(values)
        else:
            buf = b"".join([values[i] for i in fast.tolist()])
        rec = np.frombuffer(buf, dtype=self._dtype)
        m = len(rec)
        if m == len(fast):
            msg_of = fast  # one sample per message: the common case
        else:
            msg_of = np.repeat(fast, lengths[fast] // L)

        # reason code per sample; later assignments have higher precedence
        C_MAL, C_COUNT, C_FIN, C_MISS, C_UNK, C_RANGE = 1, 2, 3, 4, 5, 6
        code = np.zeros(m, dtype=np.uint8)
        kind = rec["kind_reserved"] & 0xFF
        label_i = rec["label_i"]
        label_f = rec["label_f"]
        y = self._empty_y(m)
        labelled = kind != KIND_NONE
        if self.n_classes is not None:
            finite_f = np.isfinite(label_f)
            integral_f = finite_f & (label_f == np.trunc(np.where(finite_f, label_f, 0)))
            as_class = np.where(kind == KIND_CLASS, label_i, 0)
            with np.errstate(invalid="ignore", over="ignore"):
                as_class = np.where((kind == KIND_REAL) & integral_f, label_f.astype(np.int64), as_class)
            code[(as_class < 0) | (as_class >= self.n_classes)] = C_RANGE
            code[(kind == KIND_REAL) & ~integral_f] = C_UNK
            np.copyto(y, as_class, where=labelled)
        else:
            target = np.where(kind == KIND_CLASS, label_i.astype(np.float64), label_f)
            code[(kind == KIND_REAL) & ~np.isfinite(label_f)] = C_FIN
            np.copyto(y, target, where=labelled)
        code[kind > KIND_REAL] = C_UNK
        if self.require_label:
            code[kind == KIND_NONE] = C_MISS
        X = rec["x"]
        code[~np.isfinite(X).all(axis=1)] = C_FIN
        code[rec["n"] != d] = C_MAL  # the length fits `d` features, so the header disagrees with it
        with_task = rec["magic_version"] == _MAGIC_VERSION_TASK
        code[~with_task & ((rec["magic_version"] != _MAGIC_VERSION) | (rec["kind_reserved"] >> 8 != 0))] = C_MAL
        task = np.where(with_task, (rec["kind_reserved"] >> 8).astype(np.int64), -1)

        bad = np.flatnonzero(code)
        if len(bad):
            for j in bad.tolist():
                rejections.append(
                    self._fast_rejection(int(msg_of[j]), int(code[j]), rec[j], buf[j * L : j * L + HEADER_SIZE])
                )
            keep = np.flatnonzero(code == 0)
            X, y, labelled, index, task = X[keep], y[keep], labelled[keep], msg_of[keep], task[keep]
        else:
            index = msg_of
        key_list: List[Optional[bytes]]
        if keys is None:
            key_list = [None] * len(index)
        elif len(index) == n:
            key_list = list(keys)
        else:
            key_list = [keys[i] for i in index.tolist()]
        return self._assemble(n, X, index, y, labelled, key_list, rejections, task)

    def _fast_rejection(self, i: int, code: int, rec: Any, header: bytes) -> Rejection:
        magic, version, kind, reserved, n_feat, _ = _HEADER.unpack_from(header)
        if code == 1:
            head = self._header_reason(magic, version, reserved)
            if head:
                return Rejection(i, MALFORMED, head)
            return Rejection(
                i,
                MALFORMED,
                f"length `{self.message_size}` does not match the header's `{n_feat}` features "
                f"(`{HEADER_SIZE + 4 * n_feat}` bytes)",
            )
        if code == 3:
            if np.isfinite(rec["x"]).all():
                return Rejection(i, NON_FINITE, f"label `{float(rec['label_f'])!r}` is not finite")
            return Rejection(i, NON_FINITE, self._non_finite_detail(rec["x"]))
        if code == 4:
            return Rejection(i, MISSING_LABEL, "no label")
        if code == 5:
            if kind > KIND_REAL:
                return Rejection(i, UNKNOWN_LABEL, f"label kind `{kind}` is not 0, 1 or 2")
            return Rejection(i, UNKNOWN_LABEL, f"label `{float(rec['label_f'])!r}` is not an integer class index")
        value = int(rec["label_i"]) if kind == KIND_CLASS else float(rec["label_f"])
        return Rejection(i, LABEL_OUT_OF_RANGE, f"label `{value!r}` is outside `[0, {self.n_classes})`")


def _encode_binary(X: np.ndarray, labels: Optional[np.ndarray], kind: int, per_message: int = 1,
                   tasks: Optional[np.ndarray] = None) -> List[bytes]:
    n, d = X.shape
    L = HEADER_SIZE + 4 * d
    out = np.zeros((n, L), dtype=np.uint8)
    out[:, 0:3] = np.frombuffer(MAGIC, dtype=np.uint8)
    out[:, 3] = VERSION
    out[:, 4] = kind
    if tasks is not None:
        out[:, 3] = VERSION_TASK
        out[:, 5:8] = tasks.astype("<u4").view(np.uint8).reshape(n, 4)[:, :3]
    out[:, 8:12] = np.frombuffer(struct.pack("<I", d), dtype=np.uint8)
    if labels is not None:
        out[:, 12:20] = labels.astype("<i8" if kind == KIND_CLASS else "<f8").view(np.uint8).reshape(n, 8)
    out[:, 20:] = np.ascontiguousarray(X, dtype="<f4").view(np.uint8).reshape(n, 4 * d)
    buf = out.tobytes()
    step = L * per_message
    return [buf[i : i + step] for i in range(0, n * L, step)]


def encode_binary_rows(X: Any, y: Any = None, tasks: Any = None) -> List[bytes]:
    """Binary messages for rows of ``X``, the label kind taken from ``y``'s dtype (integers:
    class index, floats: real target), without validation: NaN, out-of-range or non-integral
    labels encode as they are, for the decoder to reject with a reason. Used for arrays read
    from files (NPZ) so that they go through the same validation as messages. ``tasks``: each
    row's task id (version-2 headers).
    """
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"`X` must be 2-D, got shape `{X.shape}`")
    task_ids = Codec._tasks_for_encoding(tasks, X.shape[0])
    if y is None:
        return _encode_binary(X, None, KIND_NONE, tasks=task_ids)
    labels = np.asarray(y)
    if labels.shape != (X.shape[0],):
        raise ValueError(f"`y` must have shape `({X.shape[0]},)`, got `{labels.shape}`")
    if labels.dtype.kind in "iub":
        return _encode_binary(X, labels.astype(np.int64), KIND_CLASS, tasks=task_ids)
    if labels.dtype.kind == "f":
        return _encode_binary(X, labels.astype(np.float64), KIND_REAL, tasks=task_ids)
    raise ValueError(f"labels must be numeric, got dtype `{labels.dtype}`")


# ================================================================================================
class CsvCodec(Codec):
    """One line of numeric CSV per message (no quoting; surrounding whitespace is fine).

    Parameters
    ----------
    label_column
        Index of the label among the line's fields (negative counts from the end;
        default: the last); ``None``: lines have no label and ``n_features`` fields.
    delimiter
        Field separator.

    Examples
    --------
    >>> c = CsvCodec(n_features=2, n_classes=2)
    >>> b = c.decode_many([b"0.5,1,1", b"0.5,x,1", b"0.5,1,"])
    >>> b.X, b.y, [(r.index, r.reason) for r in b.rejections]
    (array([[0.5, 1. ]], dtype=float32), array([1]), [(1, 'non_numeric'), (2, 'missing_label')])
    """

    name = "csv"

    def __init__(
        self,
        n_features: int,
        n_classes: Optional[int] = None,
        *,
        label_column: Optional[int] = -1,
        delimiter: str = ",",
        require_label: bool = True,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        super().__init__(n_features, n_classes, require_label=require_label, max_bytes=max_bytes)
        n_fields = self.n_features + (label_column is not None)
        if label_column is not None:
            if isinstance(label_column, bool) or not isinstance(label_column, (int, np.integer)) or not (
                -n_fields <= label_column < n_fields
            ):
                raise ConfigError(
                    f"`label_column` must be an int in `[{-n_fields}, {n_fields})` or None, got `{label_column!r}`"
                )
            label_column = int(label_column) % n_fields
        if not isinstance(delimiter, str) or len(delimiter) != 1:
            raise ConfigError(f"`delimiter` must be one character, got `{delimiter!r}`")
        self.label_column = label_column
        self.delimiter = delimiter
        self.n_fields = n_fields

    def encode_many(
        self, X: Any, y: Any = None, *, keys: Optional[Sequence[Optional[bytes]]] = None, tasks: Any = None
    ) -> List[bytes]:
        if tasks is not None:
            raise ValueError("CSV lines carry no task id: use the JSON or binary codec")
        X = self._check_features(X)
        n = X.shape[0]
        labels = self._labels_for_encoding(y, n)
        rows = [[_FLOAT32_FMT % v for v in row] for row in X.astype(np.float32).tolist()]
        if self.label_column is not None:
            ys = [""] * n if labels is None else [repr(v) for v in labels.tolist()]
            for row, lab in zip(rows, ys):
                row.insert(self.label_column, lab)
        return [self.delimiter.join(row).encode("ascii") for row in rows]

    def _decode(
        self, values: Sequence[Value], keys: Optional[Sequence[Optional[bytes]]]
    ) -> DecodedBatch:
        n = len(values)
        d, lc, delim = self.n_features, self.label_column, self.delimiter
        rejections: List[Rejection] = []
        cand_index: List[int] = []
        cand_rows: List[Any] = []
        cand_labels: List[Tuple[Optional[str], str, Union[int, float, None]]] = []
        cand_keys: List[Optional[bytes]] = []
        for i, v in enumerate(values):
            if len(v) > self.max_bytes:
                rejections.append(
                    Rejection(i, OVERSIZE, f"message of `{len(v)}` bytes exceeds `max_bytes={self.max_bytes}`")
                )
                continue
            try:
                text = bytes(v).decode("utf-8")
            except UnicodeDecodeError as exc:
                rejections.append(Rejection(i, MALFORMED, f"not UTF-8: {exc}"))
                continue
            fields = text.strip("\r\n").split(delim)
            if len(fields) != self.n_fields:
                what = f"`{d}` features and a label" if lc is not None else f"`{d}` features"
                rejections.append(
                    Rejection(i, FEATURE_COUNT, f"expected `{self.n_fields}` fields ({what}), got `{len(fields)}`")
                )
                continue
            label_text = None
            if lc is not None:
                label_text = fields.pop(lc).strip()
            try:
                row = [float(f) for f in fields]
            except ValueError:
                j = next(j for j, f in enumerate(fields) if not _is_float(f))
                rejections.append(Rejection(i, NON_NUMERIC, f"feature `{j}` is `{_fmt(fields[j])}`, not a number"))
                continue
            if not label_text:
                label: Any = None
            else:
                try:
                    label = float(label_text)
                except ValueError:
                    label = label_text  # reported as unknown_label
            cand_index.append(i)
            cand_rows.append(row)
            cand_labels.append(self._label(label))
            cand_keys.append(None if keys is None else keys[i])
        return self._finish_python_rows(n, cand_index, cand_rows, cand_labels, cand_keys, rejections)


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


# ================================================================================================
class AutoCodec(Codec):
    """Binary for messages that start with ``b"AMS"``, JSON for the others; encodes binary."""

    name = "auto"

    def __init__(
        self,
        n_features: int,
        n_classes: Optional[int] = None,
        *,
        require_label: bool = True,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        super().__init__(n_features, n_classes, require_label=require_label, max_bytes=max_bytes)
        kw = dict(require_label=require_label, max_bytes=max_bytes)
        self.binary = BinaryCodec(n_features, n_classes, **kw)  # type: ignore[arg-type]
        self.json = JsonCodec(n_features, n_classes, **kw)  # type: ignore[arg-type]

    def encode_many(
        self,
        X: Any,
        y: Any = None,
        *,
        keys: Optional[Sequence[Optional[bytes]]] = None,
        samples_per_message: int = 1,
        tasks: Any = None,
    ) -> List[bytes]:
        return self.binary.encode_many(X, y, keys=keys, samples_per_message=samples_per_message, tasks=tasks)

    @classmethod
    def sniff_n_features(cls, value: Value) -> Optional[int]:
        return (BinaryCodec if value[:3] == MAGIC else JsonCodec).sniff_n_features(value)

    def _decode(
        self, values: Sequence[Value], keys: Optional[Sequence[Optional[bytes]]]
    ) -> DecodedBatch:
        n = len(values)
        is_bin = np.fromiter((v[:3] == MAGIC for v in values), dtype=bool, count=n)
        if is_bin.all():
            return self.binary.decode_many(values, keys)
        if not is_bin.any():
            return self.json.decode_many(values, keys)
        parts = []
        for mask, codec in ((is_bin, self.binary), (~is_bin, self.json)):
            idx = np.flatnonzero(mask)
            sub_keys = None if keys is None else [keys[i] for i in idx.tolist()]
            parts.append((idx, codec.decode_many([values[i] for i in idx.tolist()], sub_keys)))
        index = np.concatenate([idx[b.index] for idx, b in parts])
        order = np.argsort(index, kind="stable")
        keys_all = [k for _, b in parts for k in b.keys]
        rejections = [r._replace(index=int(idx[r.index])) for idx, b in parts for r in b.rejections]
        return self._assemble(
            n,
            np.concatenate([b.X for _, b in parts])[order],
            index[order],
            np.concatenate([b.y for _, b in parts])[order],
            np.concatenate([b.labelled for _, b in parts])[order],
            [keys_all[i] for i in order.tolist()],
            rejections,
            np.concatenate([b.task for _, b in parts])[order],
        )


CODECS: Dict[str, Type[Codec]] = {
    "json": JsonCodec,
    "binary": BinaryCodec,
    "csv": CsvCodec,
    "auto": AutoCodec,
}


def _codec_class(name: str) -> Type[Codec]:
    try:
        return CODECS[name]
    except KeyError:
        raise ConfigError(f"unknown codec `{name}`; choose one of `{', '.join(CODECS)}`") from None


def make_codec(name: str, n_features: int, n_classes: Optional[int] = None, **kwargs: Any) -> Codec:
    """Build a codec by name (``json``, ``binary``, ``csv``, ``auto``)."""
    return _codec_class(name)(n_features, n_classes, **kwargs)


def codec_from_first_valid(values: Sequence[Value], name: str, n_classes: Optional[int] = None,
                           **kwargs: Any) -> Optional[Codec]:
    """The codec sized by the first message that decodes to a valid sample, or None.

    For streams whose feature count is not given: each message's claimed size
    (`Codec.sniff_n_features`) is tried until one message is accepted by a codec of that size.

    >>> codec = codec_from_first_valid([b"junk", b'{"x": [1, "a"], "y": 0}', b'{"x": [1, 2, 3], "y": 1}'],
    ...                                "auto", n_classes=10)
    >>> codec.n_features, codec.n_classes
    (3, 10)
    """
    cls = _codec_class(name)
    for value in values:
        n = cls.sniff_n_features(value)
        if n is not None:
            codec = cls(n, n_classes, **kwargs)
            if len(codec.decode_many([value])):
                return codec
    return None
