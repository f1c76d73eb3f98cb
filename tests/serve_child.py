"""Helpers for tests that run `amstream serve` against the embedded broker: `Serve`, the serve child
process of `amstream.faults.ServeProcess` (forked from the test process, which has torch imported
already), and readers of what a run left (checkpoints, the ids of the samples in a topic)."""
from __future__ import annotations

import re

from amstream.checkpoint import CheckpointManager
from amstream.faults import ServeProcess, topic_sample_ids
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
    return topic_sample_ids(bootstrap, topic, partitions, n_messages, codec, timeout_s=30)


def checksum_of(topic, ids):
    return key_checksum(topic, ids[:, 0], ids[:, 1], ids[:, 2])
