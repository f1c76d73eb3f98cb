"""Base classes every source and sink subclasses (after bytewax's ``inputs`` / ``outputs``).

A *source* hands out `Record`\\ s in batches and says where it is: `Source.snapshot` is the next
offset of each partition it has handed records out of, and `Source.seek` continues from such a
snapshot. Two kinds, by how partitions come to it:

* `FixedPartitionSource`: its partitions are known once it is open (a file is one partition).
  The caller seeks them to where it resumes, right after `Source.open`.
* `GroupSource`: partitions are assigned and revoked while it runs (a Kafka consumer group).
  It calls ``on_assign(partitions) -> offsets`` when it gets partitions (and seeks to the offsets
  returned) and ``on_revoke(partitions) -> offsets`` before it gives them up (and commits the
  offsets returned). See `amstream.connectors.kafka` for when the hooks run.

A *sink* takes messages in batches (`Sink.write_batch`) and delivers them by `Sink.flush`.

Errors a source or sink cannot hide raise `amstream.exceptions.StreamError`, whose ``transient``
attribute says whether waiting and trying again can help (a broker that is down) or not (records
compressed with a codec this machine cannot read, a refused authorization).

Examples
--------
>>> class Numbers(FixedPartitionSource):
...     '''The integers 0..n-1 as one partition, values as decimal bytes.'''
...     def __init__(self, n):
...         self.n, self.next = n, 0
...     def next_batch(self, max_records=500, timeout_ms=0):
...         stop = min(self.n, self.next + max_records)
...         out = [Record("numbers", 0, i, None, b"%d" % i) for i in range(self.next, stop)]
...         self.next = stop
...         return out
...     def snapshot(self):
...         return {("numbers", 0): self.next}
...     def seek(self, offsets):
...         self.next = offsets.get(("numbers", 0), self.next)
...     def assignment(self):
...         return [("numbers", 0)]
...     @property
...     def exhausted(self):
...         return self.next >= self.n
>>> with Numbers(5) as src:
...     src.seek({("numbers", 0): 2})
...     [r.value for r in src.next_batch()], src.snapshot(), src.exhausted
([b'2', b'3', b'4'], {('numbers', 0): 5}, True)
"""
from __future__ import annotations

import abc
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from amstream.connectors.records import Headers, Offsets, Record, TopicPartition

__all__ = ["AssignHook", "FixedPartitionSource", "GroupSource", "RevokeHook", "Sink", "Source"]

AssignHook = Callable[[List[TopicPartition]], Optional[Mapping[TopicPartition, int]]]
"""``on_assign(partitions) -> offsets to start them at (or None)``."""
RevokeHook = Callable[[List[TopicPartition]], Optional[Mapping[TopicPartition, int]]]
"""``on_revoke(partitions) -> offsets to commit for them before they go (or None)``."""


class Source(abc.ABC):
    """Records with per-partition offsets, read in batches: ``open``, ``next_batch``..., ``close``.

    Subclasses implement `next_batch`, `snapshot`, `seek` and `assignment`; the other methods
    have defaults for a source that has nothing to commit, no lag to report and never ends.
    """

    def open(self) -> "Source":
        """Connect / open files; idempotent. Nothing should connect before this."""
        return self

    @abc.abstractmethod
    def next_batch(self, max_records: int = 500, timeout_ms: int = 0) -> List[Record]:
        """Up to ``max_records`` records, waiting at most ``timeout_ms`` for the first; ``[]`` if none."""

    @abc.abstractmethod
    def snapshot(self) -> Offsets:
        """The next offset of each partition records were handed out of (or sought to)."""

    @abc.abstractmethod
    def seek(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Continue these partitions at these next offsets (backwards too)."""

    @abc.abstractmethod
    def assignment(self) -> List[TopicPartition]:
        """The partitions this source reads now."""

    def commit(self, offsets: Optional[Mapping[TopicPartition, int]] = None, *,
               timeout_s: Optional[float] = None) -> bool:
        """Tell the upstream system these offsets are processed; False when it refused. Default: nothing to tell."""
        return True

    def lag(self) -> Dict[TopicPartition, Optional[int]]:
        """Records left behind the next offset, per partition (None where unknown)."""
        return {}

    def highwater(self) -> Dict[TopicPartition, Optional[int]]:
        """The offset the next record written to each partition will get (None where unknown)."""
        return {}

    def health(self) -> Optional[str]:
        """A problem worth reporting while no records arrive (e.g. an unreachable broker), or None."""
        return None

    @property
    def exhausted(self) -> bool:
        """True once a bounded source (a file) has handed out its last record."""
        return False

    def close(self, *, timeout_s: Optional[float] = None) -> None:
        """Release connections and files; idempotent."""

    def __enter__(self) -> "Source":
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FixedPartitionSource(Source):
    """A source whose partitions are known once it is open: seek them right after `open`."""


class GroupSource(Source):
    """A source whose partitions are assigned and revoked while it runs; it calls the hooks.

    ``on_assign`` and ``on_revoke`` may be set until the source opens (see the module docstring).
    """

    on_assign: Optional[AssignHook] = None
    on_revoke: Optional[RevokeHook] = None


class Sink(abc.ABC):
    """Messages out, in batches; delivery is confirmed (or fails) at `flush`."""

    @abc.abstractmethod
    def write_batch(self, values: Sequence[bytes], keys: Optional[Sequence[Optional[bytes]]] = None,
                    headers: Optional[Sequence[Optional[Headers]]] = None) -> int:
        """Queue one message per value; returns how many were queued."""

    def flush(self, timeout_s: Optional[float] = None) -> None:
        """Wait until everything queued is delivered; raise `StreamError` if anything was not."""

    def close(self, timeout_s: Optional[float] = 10.0) -> None:
        """Flush, then release connections."""
        self.flush(timeout_s)

    def __enter__(self) -> "Sink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
