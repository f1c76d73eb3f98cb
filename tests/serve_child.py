"""Helpers for tests that run `amstream serve` against the embedded broker: `Serve`, the serve child
process of `amstream.faults.ServeProcess` (forked from the test process, which has torch imported
already), and readers of what a run left (checkpoints, the ids of the samples in a topic)."""
from __future__ import annotations

import re
import time

import numpy as np

from amstream.checkpoint import CheckpointManager
from amstream.connectors.kafka import KafkaSource
from amstream.faults import ServeProcess
from amstream.serve import key_checksum

FAST_GROUP = ["--consumer-config", "session_timeout_ms=2000", "--consumer-config", "heartbeat_interval_ms=500"]


class Serve(ServeProcess):
    """`amstream.faults.ServeProcess`, with the assignments it logged."""

    def assignments(self):
        """The partition list of each `assigned` line, in order."""
        return [sorted(int(p) for p in re.findall(r"'[^']+', (\d+)", m))
                for m in re.findall(r"partitions (\[.*?\]) assigned", self.log())]


def learned_in(ckpt_dir):
    loaded = CheckpointManager(ckpt_dir).restore()
    return 0 if loaded is None else loaded["state"]["counters"]["learned_samples"]


def read_ids(bootstrap, topic, partitions, n_messages, codec):
    """(partition, offset, index-in-message) of every sample in the topic, read back."""
    src = KafkaSource(partitions=[(topic, p) for p in range(partitions)], bootstrap_servers=bootstrap,
                      group_id=None, on_assign=lambda parts: {tp: 0 for tp in parts})
    ids = []
    with src:
        seen = 0
        deadline = time.monotonic() + 30
        while seen < n_messages:
            assert time.monotonic() < deadline
            records = src.next_batch(1000, 200)
            seen += len(records)
            batch = codec.decode_records(records)
            for i in range(len(batch)):
                r = records[int(batch.index[i])]
                ids.append((r.partition, r.offset, int(np.sum(batch.index[:i] == batch.index[i]))))
    return np.array(ids, dtype=np.int64).reshape(-1, 3)


def checksum_of(topic, ids):
    return key_checksum(topic, ids[:, 0], ids[:, 1], ids[:, 2])
