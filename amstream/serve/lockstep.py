"""Several serve processes (ranks), one model: what they agree on each tick, and the one
checkpoint that holds them all. Plain values only: no threads, no broker, no collectives
(`amstream.serve.distributed` runs this over ``torch.distributed``).

Each rank runs its own `Engine` on the partitions the consumer group gave it and never sends
samples to another rank. What ranks exchange:

* once per *tick*, a `Report` of a few numbers; the element-wise maximum over ranks (one
  all-reduce) is the same on every rank, and `plan` turns it into the same `Plan` everywhere:
  roll back, learn ``k`` minibatches (each rank takes up to one minibatch of its own samples
  per step, possibly none: `Engine.learn` with ``allow_empty``), checkpoint, stop;
* at a checkpoint, each rank's *part*: its `Engine.state_dict` without the learner (which is
  the same on every rank). `merge_states` makes one ordinary serve state of the parts, so a
  group checkpoint restores in one process too, and one process's checkpoint in a group.

Exactly once
------------
Every rank keeps the last checkpoint the group wrote (the *base*). Between two checkpoints a
rank only reads partitions it held at its last rollback (below), so each partition's progress
since base is in one part at most, and the merged state accounts for every sample as a
one-process state does: learned, in the carry, or rejected before ``offsets``; nothing after.
Two things break that premise, and both are answered by a *rollback* of every rank to base
(model, offsets, carry, counters) before anything more is learned or saved:

* a rank's partitions changed (a rebalance: a rank joined, left or was evicted): a partition's
  new owner does not have the progress its old owner made since base (`Report.changed`);
* two parts hold the same partition at a checkpoint (a member that was evicted but still reads,
  until its client notices): that checkpoint is not written (`PartitionOverlap`).

After a rollback each rank continues from its share of base (`share_of`): the offsets and carry
of the partitions it holds now and, on rank 0 only, the lifetime counters, so that the counters
of the next merge add up to the group's.

Examples
--------
Two ranks, each with a full minibatch on some tick, then one rank idle and caught up:

>>> busy = plan(combine([Report(full=2, labels=3), Report(full=1, labels=5, due=True)]))
>>> busy.steps, busy.n_classes, busy.checkpoint, busy.rollback, busy.stop
(2, 5, True, False, None)
>>> plan(combine([Report(flush=True, holding=True, quiet_s=3.0), Report(quiet_s=9.0)])).steps
1
>>> plan(combine([Report(quiet_s=4.0), Report(quiet_s=9.0)]), idle_exit_s=5).stop is None
True
>>> plan(combine([Report(quiet_s=6.0), Report(quiet_s=9.0)]), idle_exit_s=5).stop
'no records for 5 s'
>>> plan(combine([Report(full=3, dirty=True), Report(changed=True)])).rollback
True
"""
from __future__ import annotations

import hashlib
from dataclasses import astuple, dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set

import numpy as np
import torch

from amstream.connectors.records import TopicPartition, decode_offsets, encode_offsets
from amstream.exceptions import CheckpointError

__all__ = ["PartitionOverlap", "Plan", "Report", "combine", "merge_states", "model_digest", "plan", "share_of"]

MAX_STEPS_PER_TICK = 8  # a tick learns at most this many minibatches (a stop waits for them)

# counters that are the group's sums of the ranks' (the others are the same on every rank)
_SUMMED = ("learned_samples", "bad_messages", "records")
_MASK64 = (1 << 64) - 1


# ---- the tick -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Report:
    """What one rank says at a tick. Combined over ranks (`combine`), each field is the maximum,
    except ``quiet_s`` (the minimum: the group is as quiet as its busiest rank) and
    ``finished`` (true only when every rank is finished)."""

    stop: bool = False  # a stop was requested here (signal, limit, error)
    changed: bool = False  # the partitions of this rank changed since its last rollback
    full: int = 0  # full minibatches buffered
    flush: bool = False  # a partial minibatch should be learned now (caught up and quiet, or end of input)
    due: bool = False  # a checkpoint is due by this rank's schedule
    dirty: bool = False  # something changed since the last checkpoint
    labels: int = 0  # largest buffered class label + 1 (0: none, or classes do not grow)
    quiet_s: float = 0.0  # seconds without records since the group had partitions (0 before)
    assigned: bool = False  # this rank holds partitions
    holding: bool = False  # samples are buffered here
    finished: bool = False  # a bounded source ended and nothing is buffered

    def encode(self) -> List[float]:
        """The report as floats whose element-wise maximum over ranks is the combined report."""
        values = [float(v) for v in astuple(self)]
        values[_QUIET] = -values[_QUIET]
        values[_FINISHED] = 1.0 - values[_FINISHED]
        return values

    @classmethod
    def decode(cls, values: Sequence[float]) -> "Report":
        v = list(values)
        v[_QUIET] = -v[_QUIET]
        v[_FINISHED] = 1.0 - v[_FINISHED]
        kinds = [f.type for f in fields(cls)]
        return cls(*(float(x) if kind == "float" else (int(x) if kind == "int" else bool(x)) for x, kind in zip(v, kinds)))


_NAMES = [f.name for f in fields(Report)]
_QUIET, _FINISHED = _NAMES.index("quiet_s"), _NAMES.index("finished")
N_REPORT = len(_NAMES)


def combine(reports: Sequence[Report]) -> Report:
    """What the all-reduce (max) of the encoded reports gives; for tests and docs."""
    return Report.decode(np.max([r.encode() for r in reports], axis=0).tolist())


@dataclass(frozen=True)
class Plan:
    """What every rank does after a tick, in this order: roll back (then nothing else), grow
    the output layer to ``n_classes``, learn ``steps`` minibatches, checkpoint, stop (why)."""

    rollback: bool = False
    n_classes: int = 0
    steps: int = 0
    checkpoint: bool = False
    stop: Optional[str] = None


def plan(group: Report, *, idle_exit_s: Optional[float] = None) -> Plan:
    """The plan every rank follows after a tick whose combined report is ``group``."""
    stop = None
    if group.stop:
        stop = "stop requested"
    elif group.finished:
        stop = "end of input"
    elif idle_exit_s is not None and not group.holding and group.quiet_s >= idle_exit_s:
        stop = f"no records for {idle_exit_s:g} s"
    if group.changed:  # the state since base may count a partition twice or miss it: drop it
        return Plan(rollback=True, stop=stop)
    steps = 0 if stop else min(MAX_STEPS_PER_TICK, group.full) or int(group.flush)
    return Plan(n_classes=group.labels, steps=steps, checkpoint=group.due or (stop is not None and group.dirty),
                stop=stop)


# ---- the group's state --------------------------------------------------------------------------
class PartitionOverlap(CheckpointError):
    """Two ranks hold the progress of one partition: their parts cannot be merged."""

    def __init__(self, partition: TopicPartition, ranks: Sequence[int]) -> None:
        super().__init__(f"ranks {ranks[0]} and {ranks[1]} both read `{partition[0]}:{partition[1]}` since the "
                         "last checkpoint (a member the group evicted was still reading): not writing this state")
        self.partition = partition
        self.ranks = tuple(ranks)


def merge_states(base: Mapping[str, Any], parts: Sequence[Mapping[str, Any]],
                 learner: Mapping[str, Any]) -> Dict[str, Any]:
    """One serve state from the ranks' ``parts`` (their `Engine.state_dict` without ``learner``,
    in rank order) and the ``learner`` state they share.

    A partition in a part takes that part's offset and carry; any other partition keeps
    ``base``'s. Counters are the sums of the parts' (rank 0's part holds base's lifetime
    counters, see `share_of`), except ``minibatches``, which every rank counts alike. Raises
    `PartitionOverlap` when two parts hold one partition.
    """
    owner: Dict[TopicPartition, int] = {}
    for r, part in enumerate(parts):
        for tp in decode_offsets(part.get("offsets", {})):
            if tp in owner:
                raise PartitionOverlap(tp, (owner[tp], r))
            owner[tp] = r
    offsets = {tp: off for tp, off in decode_offsets(base.get("offsets", {})).items() if tp not in owner}
    for part in parts:
        offsets.update(decode_offsets(part.get("offsets", {})))
    left = set(_carry_partitions(base.get("carry") or {})) - set(owner)
    carry = _concat_carries([_carry_of(base.get("carry") or {}, left)] + [p.get("carry") or {} for p in parts])
    out = dict(parts[0])
    out.update(learner=dict(learner), offsets=encode_offsets(offsets), carry=carry,
               counters=_sum_counters([p.get("counters", {}) for p in parts]))
    return out


def share_of(base: Mapping[str, Any], rank: int, partitions: Sequence[TopicPartition]) -> Dict[str, Any]:
    """The state rank ``rank`` continues from after a rollback to ``base`` while holding
    ``partitions``: their offsets and carry, and (rank 0) base's lifetime counters; other ranks
    start their counters at zero (``minibatches`` excepted: every rank counts the group's)."""
    keep = set(partitions)
    out = dict(base)
    out["offsets"] = encode_offsets({tp: o for tp, o in decode_offsets(base.get("offsets", {})).items() if tp in keep})
    out["carry"] = _carry_of(base.get("carry") or {}, keep)
    if rank != 0:
        counters = dict(base.get("counters", {}))
        out["counters"] = {"minibatches": counters.get("minibatches", 0)}
    return out


def _sum_counters(all_counters: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {name: sum(int(c.get(name, 0)) for c in all_counters) for name in _SUMMED}
    out["key_checksum"] = sum(int(c.get("key_checksum", 0)) for c in all_counters) & _MASK64
    out["minibatches"] = max(int(c.get("minibatches", 0)) for c in all_counters)
    reasons: Dict[str, int] = {}
    for c in all_counters:
        for reason, n in c.get("bad_by_reason", {}).items():
            reasons[reason] = reasons.get(reason, 0) + int(n)
    out["bad_by_reason"] = dict(sorted(reasons.items()))
    preq = [c.get("prequential", {}) for c in all_counters]
    out["prequential"] = {"n": sum(int(p.get("n", 0)) for p in preq), "correct": sum(int(p.get("correct", 0)) for p in preq),
                          "loss_sum": float(sum(float(p.get("loss_sum", 0.0)) for p in preq))}
    return out


# ---- carries: samples taken but not learned, with their ids -----------------------------------------
_CARRY_ARRAYS = ("X", "y", "topic", "partition", "offset", "index", "task")


def _carry_array(carry: Mapping[str, Any], name: str) -> torch.Tensor:
    if name == "task" and name not in carry:  # a carry of a state written before task ids
        return torch.full((len(carry["offset"]),), -1, dtype=torch.int64)
    return carry[name]


def _carry_partitions(carry: Mapping[str, Any]) -> List[TopicPartition]:
    if not carry:
        return []
    topics = carry["topics"]
    return [(topics[int(t)], int(p)) for t, p in zip(carry["topic"].tolist(), carry["partition"].tolist())]


def _carry_of(carry: Mapping[str, Any], partitions: Set[TopicPartition]) -> Dict[str, Any]:
    """The samples of ``carry`` that belong to ``partitions``, in their order."""
    if not carry:
        return {}
    mask = torch.tensor([tp in partitions for tp in _carry_partitions(carry)], dtype=torch.bool)
    if not bool(mask.any()):
        return {}
    out: Dict[str, Any] = {"topics": list(carry["topics"])}
    for name in _CARRY_ARRAYS:
        out[name] = _carry_array(carry, name)[mask].clone()
    keys = carry.get("keys")
    out["keys"] = None if keys is None else [k for k, m in zip(keys, mask.tolist()) if m]
    return out


def _concat_carries(carries: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """One carry of several, in order; topic codes renumbered into one topic list."""
    carries = [c for c in carries if c]
    if not carries:
        return {}
    topics: List[str] = []
    codes: List[torch.Tensor] = []
    for c in carries:
        remap = []
        for name in c["topics"]:
            if name not in topics:
                topics.append(name)
            remap.append(topics.index(name))
        codes.append(torch.tensor(remap, dtype=c["topic"].dtype)[c["topic"].long()])
    out: Dict[str, Any] = {"topics": topics, "topic": torch.cat(codes)}
    for name in _CARRY_ARRAYS:
        if name != "topic":
            out[name] = torch.cat([_carry_array(c, name) for c in carries])
    keys = [c.get("keys") for c in carries]
    out["keys"] = None if any(k is None for k in keys) else [k for ks in keys for k in ks]  # type: ignore[union-attr]
    return out


def model_digest(learner_state: Mapping[str, Any]) -> str:
    """A short sha256 of a learner state's weights: equal on ranks that hold the same model."""
    h = hashlib.sha256()
    for name, tensor in sorted(learner_state["model"].items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
