"""Helpers for tests that run `amstream serve` against the embedded broker: a serve child process
(forked from the test process, which has torch imported already: a fresh interpreter costs ~15 s
here) that calls the same `amstream.cli.main` the console script calls, so that `kill -9` and
SIGTERM hit a real, separate process."""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import time
import traceback

import numpy as np

from amstream.checkpoint import CheckpointManager
from amstream.cli import main
from amstream.connectors.kafka import KafkaSource
from amstream.serve import key_checksum

FAST_GROUP = ["--consumer-config", "session_timeout_ms=2000", "--consumer-config", "heartbeat_interval_ms=500"]


def _child_main(argv, out_path, err_path, before):  # runs in the forked child
    try:
        if before is not None:
            before()
        import logging
        import sys

        for fd, path in ((1, out_path), (2, err_path)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        logging.getLogger().handlers = []  # pytest's capture handlers
        code = main(argv)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    except BaseException:
        traceback.print_exc()
        os._exit(99)


class Serve:
    """`amstream serve ARGV` in a forked child process, its stdout/stderr in files."""

    def __init__(self, argv, tmp_path, name, *, before=None):
        """``before``: called in the child before `main` (to set up what the child lacks)."""
        self.out, self.err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        self.proc = multiprocessing.get_context("fork").Process(
            target=_child_main, args=(["serve", *argv], str(self.out), str(self.err), before), daemon=True)
        self.proc.start()

    def log(self):
        return self.err.read_text() if self.err.exists() else ""

    def wait_for(self, predicate, timeout_s, what):
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert self.proc.is_alive(), f"serve exited ({self.proc.exitcode}) before {what}:\n{self.log()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} within {timeout_s} s:\n{self.log()[-3000:]}"
            time.sleep(0.2)

    def join(self, timeout_s=60):
        self.proc.join(timeout_s)
        assert not self.proc.is_alive(), f"serve still running after {timeout_s} s:\n{self.log()[-3000:]}"
        return self.proc.exitcode

    def result(self):
        lines = self.out.read_text().strip().splitlines()
        assert lines, f"no JSON result:\n{self.log()[-3000:]}"
        return json.loads(lines[-1])

    def assignments(self):
        """The partition list of each `assigned` line, in order."""
        return [sorted(int(p) for p in re.findall(r"'[^']+', (\d+)", m))
                for m in re.findall(r"partitions (\[.*?\]) assigned", self.log())]

    def stop(self):
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)


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
