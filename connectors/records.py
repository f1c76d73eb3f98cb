"""Records, offsets and the next-offset bookkeeping shared by every source.

A *record* is what a source hands out before decoding: where it came from
(``topic``, ``partition``, ``offset``), its ``key`` and ``value`` bytes, a
``timestamp`` in milliseconds (``None`` for files) and ``headers``.

An *offset* is always the **next** offset to read, never the last one read: after
handing out the record at offset 41 of ``("samples", 0)``, a source's
``snapshot()`` says ``{("samples", 0): 42}``. Checkpoints store that dict; on
resume a source ``seek()``\\ s to it and the first record it hands out is the
one at offset 42 (the same convention as Kafka's committed offsets and
bytewax's ``snapshot``).

`OffsetTracker` keeps the next offset per partition and raises `OffsetError`
when a delivered record or a commit would move it backwards.

Examples
--------
>>> t = OffsetTracker()
>>> t.advance(("samples", 0), 41)
>>> t.snapshot()
{('samples', 0): 42}
>>> t.advance(("samples", 0), 40)
Traceback (most recent call last):
...
amstream.exceptions.OffsetError: offset of `samples:0` went backwards: got `40`, expected at least `42`
>>> decode_offsets(encode_offsets({("samples", 3): 7}))
{('samples', 3): 7}
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from amstream.exceptions import OffsetError

__all__ = [
    "Headers",
    "Offsets",
    "OffsetTracker",
    "Record",
    "TopicPartition",
    "decode_offsets",
    "encode_offsets",
]

TopicPartition = Tuple[str, int]
"""``(topic, partition)``; files use ``(name, 0)``."""

Offsets = Dict[TopicPartition, int]
"""Next offset to read, per partition."""

Headers = Sequence[Tuple[str, bytes]]


class Record(NamedTuple):
    """One raw message as a source hands it out (value not yet decoded)."""

    topic: str
    partition: int
    offset: int
    key: Optional[bytes]
    value: bytes
    timestamp: Optional[int] = None  # milliseconds since the epoch; None for files
    headers: Headers = ()

    @property
    def next_offset(self) -> int:
        """The offset to resume from once this record has been processed."""
        return self.offset + 1


def encode_offsets(offsets: Mapping[TopicPartition, int]) -> Dict[str, int]:
    """``{("t", 0): 5}`` -> ``{"t:0": 5}``: JSON-friendly, sorted, for checkpoints and logs.

    Kafka topic names cannot contain ``:``, so the last ``:`` splits it unambiguously.
    """
    return {f"{topic}:{partition}": int(off) for (topic, partition), off in sorted(offsets.items())}


def decode_offsets(encoded: Mapping[str, int]) -> Offsets:
    """Inverse of `encode_offsets`; raises `OffsetError` on a malformed entry."""
    out: Offsets = {}
    for name, off in encoded.items():
        topic, sep, part = str(name).rpartition(":")
        if not sep or not topic or not part.isdigit():
            raise OffsetError(f"malformed offsets key `{name}`: expected `topic:partition`")
        if not isinstance(off, int) or isinstance(off, bool) or off < 0:
            raise OffsetError(f"offset of `{name}` must be an int >= 0, got `{off!r}`")
        out[(topic, int(part))] = off
    return out


def _name(tp: TopicPartition) -> str:
    return f"{tp[0]}:{tp[1]}"


def check_offsets(offsets: Mapping[TopicPartition, int]) -> Offsets:
    """Validate a ``{(topic, partition): next_offset}`` mapping and return a plain dict copy."""
    out: Offsets = {}
    for tp, off in offsets.items():
        if (
            not isinstance(tp, tuple)
            or len(tp) != 2
            or not isinstance(tp[0], str)
            or not isinstance(tp[1], int)
        ):
            raise OffsetError(f"offsets keys must be `(topic, partition)` tuples, got `{tp!r}`")
        if not isinstance(off, int) or isinstance(off, bool) or off < 0:
            raise OffsetError(f"offset of `{_name(tp)}` must be an int >= 0, got `{off!r}`")
        out[(tp[0], int(tp[1]))] = int(off)
    return out


class OffsetTracker:
    """Next offset per partition, for delivered records and for commits; never backwards.

    * `advance` is called for each record handed out; a record whose offset is
      below the partition's next offset (a duplicate or a rewind nobody asked
      for) raises `OffsetError`. Gaps are fine (compaction, transaction markers).
    * `check_commit` / `mark_committed`: a commit may not go below the last
      commit of the same partition.
    * `reset` is the explicit rewind (a `seek`): it sets the next offset and
      forgets the partition's last commit, so later commits are checked from there.
    * `forget` drops partitions (revoked in a rebalance).
    """

    def __init__(self) -> None:
        self._next: Offsets = {}
        self._committed: Offsets = {}

    def advance(self, tp: TopicPartition, offset: int) -> None:
        nxt = self._next.get(tp)
        if nxt is not None and offset < nxt:
            raise OffsetError(
                f"offset of `{_name(tp)}` went backwards: got `{offset}`, expected at least `{nxt}`"
            )
        self._next[tp] = offset + 1

    def reset(self, tp: TopicPartition, next_offset: int) -> None:
        self._next[tp] = next_offset
        self._committed.pop(tp, None)

    def check_commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        for tp, off in offsets.items():
            last = self._committed.get(tp)
            if last is not None and off < last:
                raise OffsetError(
                    f"commit of `{_name(tp)}` went backwards: `{off}` after `{last}`"
                )

    def mark_committed(self, offsets: Mapping[TopicPartition, int]) -> None:
        self._committed.update(offsets)

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self._next.pop(tp, None)
            self._committed.pop(tp, None)

    def next_offset(self, tp: TopicPartition) -> Optional[int]:
        return self._next.get(tp)

    def snapshot(self) -> Offsets:
        """Next offset of every partition that has one (a copy)."""
        return dict(self._next)

    def committed(self) -> Offsets:
        return dict(self._committed)

    def partitions(self) -> List[TopicPartition]:
        return sorted(self._next)
