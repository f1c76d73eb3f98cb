"""`TestingSource`: an in-memory source with markers, for testing what reads sources.

After bytewax's ``bytewax.testing.TestingSource``: a list of message values, one partition,
offsets = positions in the list, and markers in the list that make the source misbehave the way
real ones do, at exactly that point:

* `Fail` ``(error)``: the next `TestingSource.next_batch` that reaches it raises ``error`` (once:
  the records before it in the same batch are handed out first, the error on the next call;
  permanent errors keep raising, as a poisoned client does);
* `Hang` ``(event)``: ``next_batch`` blocks until ``event`` is set (a client stuck in a poll);
* `Pause` ``(n)``: the next ``n`` calls return nothing (a quiet stream).

Markers take no offset. The source is bounded (`exhausted` at the end of the list) unless
``bounded=False``, when it keeps answering ``[]`` like a live stream.

Examples
--------
>>> from amstream.exceptions import StreamError
>>> src = TestingSource([b"a", b"b", Fail(StreamError("broker down", transient=True)), b"c"], batch=10)
>>> [r.value for r in src.next_batch()]
[b'a', b'b']
>>> src.next_batch()
Traceback (most recent call last):
...
amstream.exceptions.StreamError: broker down
>>> [(r.offset, r.value) for r in src.next_batch()], src.snapshot(), src.exhausted
([(2, b'c')], {('test', 0): 3}, True)
"""
from __future__ import annotations

import threading
import time
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Union

from amstream.connectors.base import FixedPartitionSource
from amstream.connectors.records import Offsets, Record, TopicPartition, check_offsets

__all__ = ["Fail", "Hang", "Pause", "TestingSource"]


class Fail(NamedTuple):
    """Raise ``error`` when reached (a permanent `StreamError` keeps being raised)."""

    error: BaseException


class Hang(NamedTuple):
    """Block in ``next_batch`` until ``event`` is set."""

    event: threading.Event


class Pause(NamedTuple):
    """Return nothing for the next ``n`` calls."""

    n: int


Item = Union[bytes, Fail, Hang, Pause]


class TestingSource(FixedPartitionSource):
    """Message values (and markers) as one partition ``(topic, 0)``.

    Parameters
    ----------
    items
        Values (bytes) and markers, in order.
    topic
        The partition's topic name.
    batch
        At most this many records per call (and at most ``max_records``).
    bounded
        End (`exhausted`) after the last item; False: keep returning ``[]``.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, items: Sequence[Item], *, topic: str = "test", batch: int = 100, bounded: bool = True) -> None:
        self.items = list(items)
        self.topic = topic
        self.batch = batch
        self.bounded = bounded
        self.polls = 0
        self.opened = self.closed = 0
        self._at: List[int] = []  # item index of each value (offset = position in this list)
        self._before = [0]  # values before item i
        for i, item in enumerate(self.items):
            if isinstance(item, (bytes, bytearray)):
                self._at.append(i)
            self._before.append(len(self._at))
        self._item = 0  # next item
        self._failed: Optional[BaseException] = None
        self._pause = 0

    def open(self) -> "TestingSource":
        self.opened += 1
        return self

    def next_batch(self, max_records: int = 500, timeout_ms: int = 0) -> List[Record]:
        self.polls += 1
        if self._failed is not None:
            raise self._failed
        if self._pause:
            self._pause -= 1
            return []
        out: List[Record] = []
        while self._item < len(self.items) and len(out) < min(max_records, self.batch):
            item = self.items[self._item]
            if isinstance(item, (bytes, bytearray)):
                out.append(Record(self.topic, 0, self._offset_of(self._item), None, bytes(item)))
                self._item += 1
                continue
            if out:
                break  # what came before the marker first
            self._item += 1
            if isinstance(item, Fail):
                if not getattr(item.error, "transient", True):
                    self._failed = item.error
                raise item.error
            if isinstance(item, Hang):
                item.event.wait()
            elif isinstance(item, Pause):
                self._pause = item.n
                return []
        if not out and timeout_ms and not self.exhausted:
            time.sleep(min(timeout_ms, 50) / 1000)  # a live stream's poll waits a little
        return out

    def _offset_of(self, item_index: int) -> int:
        return self._before[item_index]

    def snapshot(self) -> Offsets:
        return {(self.topic, 0): self._offset_of(self._item)}

    def seek(self, offsets: Mapping[TopicPartition, int]) -> None:
        offsets = check_offsets(offsets)
        if (self.topic, 0) in offsets:
            off = offsets[(self.topic, 0)]
            self._item = self._at[off] if off < len(self._at) else len(self.items)

    def assignment(self) -> List[TopicPartition]:
        return [(self.topic, 0)]

    def lag(self) -> Dict[TopicPartition, Optional[int]]:
        return {(self.topic, 0): len(self._at) - self._offset_of(self._item)}

    @property
    def exhausted(self) -> bool:
        return self.bounded and self._item >= len(self.items)

    def close(self, *, timeout_s: Optional[float] = None) -> None:
        self.closed += 1
