"""A file source: CSV, JSON Lines or NPZ, with the records and offsets of the Kafka source.

`FileSource` hands out `Record`\\ s of one partition, ``(topic, 0)`` with ``topic`` the file's
name, whose offset is the **row index** (data lines, 0-based; a CSV header is not a row), so a
serve loop can checkpoint ``{(topic, 0): next_row}`` and resume there with `FileSource.seek`.
Record values are what the source's `FileSource.codec` decodes, with the same validation as
messages from Kafka:

* ``.jsonl`` / ``.ndjson``: each line, as is (`JsonCodec`);
* ``.csv`` (and ``.tsv``, tab-separated): each line (`CsvCodec`); the label is the column
  ``label_column`` (an index, or a name from the header), or none;
* ``.npz``: arrays ``X`` (2-D), optionally ``y`` and ``task`` (each row's task id, for continual
  sequences); each row becomes one binary message (`BinaryCodec`), its label kind taken from
  ``y``'s dtype.

Blank lines are skipped but keep their row index. Files are read lazily, line by line (NPZ is
loaded whole). Nothing is opened until the first `next_batch`, `seek`, or `codec` access.

Examples
--------
>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "tiny.csv")
>>> _ = open(path, "w").write("a,b,label\\n0.5,1.0,1\\n0.25,x,0\\n2,3,1\\n")
>>> src = FileSource(path, n_classes=2)
>>> records = src.next_batch(max_records=10)
>>> [r.offset for r in records], src.snapshot()
([0, 1, 2], {('tiny.csv', 0): 3})
>>> batch = src.codec.decode_records(records)
>>> batch.y.tolist(), [(r.index, r.reason) for r in batch.rejections]
([1, 1], [(1, 'non_numeric')])
>>> src.seek({("tiny.csv", 0): 2}); [r.offset for r in src.next_batch()]
[2]
>>> src.close()
"""
from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path
from typing import IO, Dict, List, Mapping, Optional, Union

import numpy as np

from amstream.connectors.codec import (
    DEFAULT_MAX_BYTES,
    BinaryCodec,
    Codec,
    CsvCodec,
    JsonCodec,
    encode_binary_rows,
)
from amstream.connectors.base import FixedPartitionSource
from amstream.connectors.records import (
    Offsets,
    OffsetTracker,
    Record,
    TopicPartition,
    check_offsets,
)
from amstream.exceptions import ConfigError, DatasetError, OffsetError

__all__ = ["FORMATS", "FileSource"]

log = logging.getLogger(__name__)

FORMATS = ("csv", "tsv", "jsonl", "npz")
_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".npz": "npz"}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class FileSource(FixedPartitionSource):
    """Rows of a CSV / JSONL / NPZ file as records with row-index offsets.

    Parameters
    ----------
    path
        The file.
    format
        ``csv``, ``tsv``, ``jsonl`` or ``npz``; default: from the suffix.
    n_features
        Features per row; default: inferred from the file (first data row / ``X.shape[1]``).
    n_classes
        As in `Codec`: class labels in ``[0, n_classes)``, or ``None`` for real targets.
    label_column
        CSV only: the label's column, an index (negative from the end) or a header name;
        ``None``: no label column.
    header
        CSV only: whether the first line is a header; ``None``: it is when none of its fields
        is a number.
    x_key, y_key, task_key
        NPZ only: the arrays' names (``y_key`` may be absent from the file: unlabelled;
        ``task_key`` too: no task ids).
    topic
        Name in records and offsets; default: the file's name.
    require_label, max_bytes
        Passed to the codec.
    """

    def __init__(
        self,
        path: Union[str, os.PathLike[str]],
        *,
        format: Optional[str] = None,
        n_features: Optional[int] = None,
        n_classes: Optional[int] = None,
        label_column: Union[int, str, None] = -1,
        header: Optional[bool] = None,
        x_key: str = "X",
        y_key: str = "y",
        task_key: str = "task",
        topic: Optional[str] = None,
        require_label: bool = True,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.path = Path(path)
        if format is None:
            format = _SUFFIXES.get(self.path.suffix.lower())
            if format is None:
                raise ConfigError(
                    f"cannot tell the format of `{self.path}` from its suffix; pass `format=` "
                    f"(one of `{', '.join(FORMATS)}`)"
                )
        if format not in FORMATS:
            raise ConfigError(f"unknown file format `{format}`; choose one of `{', '.join(FORMATS)}`")
        self.format = format
        self.n_features = n_features
        self.n_classes = n_classes
        self.label_column = label_column
        self.header = header
        self.x_key = x_key
        self.y_key = y_key
        self.task_key = task_key
        self.topic = topic if topic is not None else self.path.name
        self.require_label = require_label
        self.max_bytes = max_bytes
        self._tp: TopicPartition = (self.topic, 0)
        self._tracker = OffsetTracker()
        self._opened = False
        self._codec: Optional[Codec] = None
        self._fh: Optional[IO[bytes]] = None
        self._row = 0  # next row to read
        self._eof = False
        self._header_lines = 0
        self._label_index: Optional[int] = None
        self._n_rows: Optional[int] = None
        self._X: Optional[np.ndarray] = None
        self._y: Optional[np.ndarray] = None
        self._task: Optional[np.ndarray] = None

    def __repr__(self) -> str:
        return f"FileSource({str(self.path)!r}, format={self.format!r}, row={self._row})"

    # ---- opening ----------------------------------------------------------------------------------
    def open(self) -> "FileSource":
        """Check the file, infer what was not given, build the codec; idempotent."""
        if self._opened:
            return self
        if not self.path.is_file():
            raise DatasetError(f"input file `{self.path}` does not exist")
        resume = self._row  # a source closed and opened again continues where it was
        if self.format == "npz":
            self._open_npz()
        else:
            self._open_text()
        self._opened = True
        self._row = 0
        self._tracker.reset(self._tp, 0)
        if resume:
            self.seek({self._tp: resume})
        return self

    def _open_npz(self) -> None:
        with np.load(self.path, allow_pickle=False) as data:
            if self.x_key not in data.files:
                raise ConfigError(
                    f"`{self.path}` has no array `{self.x_key}` (arrays: `{', '.join(data.files)}`); pass `x_key=`"
                )
            X = np.asarray(data[self.x_key])
            y = np.asarray(data[self.y_key]) if self.y_key in data.files else None
            task = np.asarray(data[self.task_key]) if self.task_key in data.files else None
        if X.ndim != 2:
            raise ConfigError(f"array `{self.x_key}` of `{self.path}` must be 2-D, got shape `{X.shape}`")
        if y is not None and y.shape != (X.shape[0],):
            raise ConfigError(
                f"array `{self.y_key}` of `{self.path}` must have shape `({X.shape[0]},)`, got `{y.shape}`"
            )
        if self.n_features is None:
            self.n_features = int(X.shape[1])
        if task is not None and (task.shape != (X.shape[0],) or task.dtype.kind not in "iu"
                                 or (len(task) and task.min() < 0)):
            raise ConfigError(f"array `{self.task_key}` of `{self.path}` must hold `{X.shape[0]}` non-negative "
                              f"integers (task ids), got shape `{task.shape}`, dtype `{task.dtype}`")
        self._X, self._y, self._task = X, y, task
        self._n_rows = int(X.shape[0])
        self._codec = BinaryCodec(
            self.n_features, self.n_classes, require_label=self.require_label, max_bytes=self.max_bytes
        )

    def _open_text(self) -> None:
        if self.format == "jsonl":
            if self.n_features is None:
                self.n_features = self._infer_jsonl_features()
            self._codec = JsonCodec(
                self.n_features, self.n_classes, require_label=self.require_label, max_bytes=self.max_bytes
            )
            self._reopen()
            return
        delimiter = "\t" if self.format == "tsv" else ","

        def split(line: bytes) -> List[str]:
            return line.decode("utf-8", "replace").strip("\r\n").split(delimiter)

        with open(self.path, "rb") as fh:
            first_line = fh.readline()
            second_line = next((line for line in fh if line.strip()), b"")
        first = split(first_line) if first_line.strip() else None
        header = self.header
        if header is None:  # a header is a first line none of whose fields is a number
            header = first is not None and not any(_is_number(f) for f in first)
        self._header_lines = 1 if header else 0
        names = [f.strip() for f in first] if header and first is not None else None
        sample = (split(second_line) if second_line else None) if header else first
        n_fields = len(sample) if sample is not None else len(names) if names is not None else None
        label = self.label_column
        if isinstance(label, str):
            if names is None:
                raise ConfigError(f"`label_column={label!r}` is a name, but `{self.path}` has no header")
            if label not in names:
                raise ConfigError(
                    f"`label_column={label!r}` is not a column of `{self.path}` (columns: `{', '.join(names)}`)"
                )
            label = names.index(label)
        if self.n_features is None:
            if n_fields is None:
                raise ConfigError(f"cannot infer `n_features` from the empty file `{self.path}`; pass it")
            self.n_features = n_fields - (label is not None)
        self._label_index = label
        self._codec = CsvCodec(
            self.n_features,
            self.n_classes,
            label_column=label,
            delimiter=delimiter,
            require_label=self.require_label,
            max_bytes=self.max_bytes,
        )
        self._reopen()

    def _infer_jsonl_features(self) -> int:
        import json

        with open(self.path, "rb") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict) and isinstance(obj.get("x"), list):
                    return len(obj["x"])
        raise ConfigError(f"cannot infer `n_features`: no line of `{self.path}` has an `x` list; pass it")

    def _reopen(self) -> None:
        if self._fh is not None:
            self._fh.close()
        fh = open(self.path, "rb")
        for _ in range(self._header_lines):
            fh.readline()
        self._fh = fh
        self._row = 0
        self._eof = False

    # ---- the source API -------------------------------------------------------------------------
    @property
    def codec(self) -> Codec:
        """The codec that decodes this source's record values."""
        self.open()
        assert self._codec is not None
        return self._codec

    def next_batch(self, max_records: int = 500, timeout_ms: int = 0) -> List[Record]:
        """The next up to ``max_records`` rows as records; ``[]`` at the end of the file.
        ``timeout_ms`` is accepted for symmetry with `KafkaSource` and ignored."""
        if not isinstance(max_records, int) or max_records < 1:
            raise ConfigError(f"`max_records` must be an int >= 1, got `{max_records!r}`")
        self.open()
        topic = self.topic
        out: List[Record] = []
        if self.format == "npz":
            assert self._X is not None and self._n_rows is not None
            start, stop = self._row, min(self._n_rows, self._row + max_records)
            if start < stop:
                values = encode_binary_rows(
                    self._X[start:stop], None if self._y is None else self._y[start:stop],
                    None if self._task is None else self._task[start:stop],
                )
                out = [Record(topic, 0, start + i, None, v) for i, v in enumerate(values)]
            self._row = stop
            self._eof = stop >= self._n_rows
        else:
            fh = self._fh
            assert fh is not None
            row = self._row
            while len(out) < max_records:
                line = fh.readline()
                if not line:
                    self._eof = True
                    break
                value = line.rstrip(b"\r\n")
                if value.strip():
                    out.append(Record(topic, 0, row, None, value))
                row += 1
            self._row = row
        if out:
            self._tracker.advance(self._tp, out[0].offset)  # rows come in order: check the ends
            if len(out) > 1:
                self._tracker.advance(self._tp, out[-1].offset)
        return out

    @property
    def exhausted(self) -> bool:
        """True once a `next_batch` reached the end of the file."""
        return self._eof

    def seek(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Continue at row ``offsets[(topic, 0)]`` (the next row to read); backwards is allowed."""
        offsets = check_offsets(offsets)
        for tp in offsets:
            if tp != self._tp:
                raise OffsetError(f"cannot seek `{tp[0]}:{tp[1]}`: this source has only `{self.topic}:0`")
        if self._tp not in offsets:
            return
        row = offsets[self._tp]
        self.open()
        if self.format == "npz":
            assert self._n_rows is not None
            self._row = min(row, self._n_rows)
            self._eof = self._row >= self._n_rows
        else:
            if row < self._row:
                self._reopen()
            fh = self._fh
            assert fh is not None
            self._row += sum(1 for _ in itertools.islice(fh, row - self._row))
            self._eof = self._row < row  # the file ended first: stay at its end
            if self._eof:
                log.warning("seek to row %d of `%s`: the file has only %d rows", row, self.path, self._row)
        self._tracker.reset(self._tp, self._row)

    def snapshot(self) -> Offsets:
        """``{(topic, 0): next row}``."""
        return {self._tp: self._row}

    def commit(self, offsets: Optional[Mapping[TopicPartition, int]] = None, *,
               timeout_s: Optional[float] = None) -> bool:
        """Files have no group to commit to: only checks that commits do not go backwards."""
        offsets = self.snapshot() if offsets is None else check_offsets(offsets)
        self._tracker.check_commit(offsets)
        self._tracker.mark_committed(offsets)
        return True

    def assignment(self) -> List[TopicPartition]:
        return [self._tp]

    def n_rows(self) -> int:
        """Rows in the file (text files: counted once, blank lines included, header not)."""
        self.open()
        if self._n_rows is None:
            count, last = 0, b"\n"
            with open(self.path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    count += chunk.count(b"\n")
                    last = chunk[-1:]
            if last != b"\n":
                count += 1  # a last line without a newline
            self._n_rows = count - self._header_lines
        return self._n_rows

    def lag(self) -> Dict[TopicPartition, Optional[int]]:
        """Rows left to read."""
        return {self._tp: max(0, self.n_rows() - self._row)}

    def close(self, *, timeout_s: Optional[float] = None) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._opened = False
        self._X = self._y = self._task = None
