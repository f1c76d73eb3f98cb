"""Faults on purpose: what `benchmarks/chaos.py` and the fault tests inject into a serve process.

Kill points
    `kill_point` marks a moment in the product's own code (inside a checkpoint write, before an
    offset commit, at start-up, inside a partition assignment). A process started with
    ``AMSTREAM_KILL_AT=NAME:N`` sends itself SIGKILL the N-th time it passes ``NAME``: a kill -9 at an
    exact moment, which a kill from outside only hits by luck. Without the variable a kill point
    costs one dictionary lookup.

Disks
    `small_filesystem` mounts a size-limited tmpfs (a full disk), `read_only_directory` makes a
    directory unwritable (a read-only bind mount for root, for whom permissions do not count; the
    mode bits otherwise). Both raise `FaultUnavailable` where this machine does not allow them.

Processes
    `ServeProcess` runs ``amstream serve`` in a child forked from the caller (which has torch
    imported already: a fresh interpreter costs seconds to ~15 s on a busy machine), calling the
    same `amstream.cli.main` the console script calls, so that kill -9 and SIGTERM hit a real,
    separate process. `paused` stops a process with SIGSTOP and continues it after (a network
    stall: the broker answers nothing and closes nothing), `rss_bytes` reads a process's resident
    memory.

Examples
--------
>>> import os
>>> os.environ.get("AMSTREAM_KILL_AT") is None and KILL_POINTS == ()
True
>>> kill_point("checkpoint-write")  # not armed: nothing happens
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from amstream.exceptions import AmstreamError, ConfigError

__all__ = ["KILL_POINTS", "FaultUnavailable", "kill_point", "arm", "small_filesystem", "read_only_directory",
           "ServeProcess", "torchrun_workers", "paused", "rss_bytes", "topic_sample_ids"]

NAMES = ("startup", "assign", "checkpoint-write", "checkpoint-rename", "commit")
"""The kill points the product passes (see each call of `kill_point`)."""


class FaultUnavailable(AmstreamError, RuntimeError):
    """This machine cannot inject the fault (no permission to mount, ...)."""


def _parse(spec: str) -> Tuple[Tuple[str, int], ...]:
    out = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, count = item.partition(":")
        if name not in NAMES or not (count or "1").isdigit() or int(count or 1) < 1:
            raise ConfigError(f"`AMSTREAM_KILL_AT={spec}`: want NAME[:N] with NAME one of {', '.join(NAMES)}")
        out.append((name, int(count or 1)))
    return tuple(out)


KILL_POINTS = _parse(os.environ.get("AMSTREAM_KILL_AT", ""))
_armed: Dict[str, int] = dict(KILL_POINTS)
_passed: Dict[str, int] = {}


def arm(spec: str) -> None:
    """Arm kill points in this process (as ``AMSTREAM_KILL_AT=spec`` at start would)."""
    global KILL_POINTS
    KILL_POINTS = _parse(spec)
    _armed.clear()
    _armed.update(KILL_POINTS)
    _passed.clear()


def kill_point(name: str) -> None:
    """SIGKILL this process if ``name`` is armed and this is its N-th pass."""
    if name in _armed:
        n = _passed[name] = _passed.get(name, 0) + 1
        if n == _armed[name]:
            os.kill(os.getpid(), signal.SIGKILL)


# ---- disks ----------------------------------------------------------------------------------------
def _mount(*args: str) -> None:
    if shutil.which("mount") is None:
        raise FaultUnavailable("`mount` is not installed")
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise FaultUnavailable(f"`mount {' '.join(args)}` failed: {done.stderr.strip() or done.returncode}")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def small_filesystem(path: os.PathLike | str, size_bytes: int) -> Iterator[Path]:
    """A tmpfs of ``size_bytes`` mounted at ``path`` (created) for the block: a disk that fills."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={max(4096, int(size_bytes))}", "tmpfs", str(path))
    try:
        yield path
    finally:
        _umount(path)


@contextlib.contextmanager
def read_only_directory(path: os.PathLike | str) -> Iterator[Path]:
    """``path`` (an existing directory) unwritable for the block, its files still readable."""
    path = Path(path)
    if os.geteuid() == 0:  # root writes through mode bits: a read-only bind mount of the directory
        _mount("--bind", str(path), str(path))
        try:
            _mount("-o", "remount,bind,ro", str(path))
        except FaultUnavailable:
            _umount(path)
            raise
        try:
            yield path
        finally:
            _umount(path)
        return
    mode = path.stat().st_mode
    path.chmod(0o555)
    try:
        yield path
    finally:
        path.chmod(mode)


def can_mount() -> bool:
    """Whether `small_filesystem` works here (tried on a scratch directory)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with small_filesystem(Path(tmp) / "m", 1 << 16):
                return True
        except FaultUnavailable:
            return False


# ---- processes ------------------------------------------------------------------------------------
def _child_main(argv: List[str], out_path: str, err_path: str, before: Optional[Callable[[], Any]]) -> None:
    try:  # runs in the forked child
        if before is not None:
            before()
        import logging
        import sys

        from amstream.cli import main

        for fd, path in ((1, out_path), (2, err_path)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        logging.getLogger().handlers = []  # whatever the parent had (pytest's capture handlers, ...)
        code = main(argv)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    except BaseException:
        traceback.print_exc()
        os._exit(99)


class ServeProcess:
    """``amstream serve ARGV`` in a forked child process, its stdout and stderr in
    ``directory/NAME.out`` and ``NAME.err``; ``before`` is called in the child first (e.g. `arm`)."""

    def __init__(self, argv: Sequence[str], directory: os.PathLike | str, name: str, *,
                 before: Optional[Callable[[], Any]] = None) -> None:
        directory = Path(directory)
        self.out, self.err = directory / f"{name}.out", directory / f"{name}.err"
        self.proc = multiprocessing.get_context("fork").Process(
            target=_child_main, args=(["serve", *argv], str(self.out), str(self.err), before), daemon=True)
        self.proc.start()

    @property
    def pid(self) -> int:
        return int(self.proc.pid or 0)

    def log(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Wait until ``predicate()``; AssertionError if serve exits first or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert self.proc.is_alive(), f"serve exited ({self.proc.exitcode}) before {what}:\n{self.log()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} within {timeout_s} s:\n{self.log()[-3000:]}"
            time.sleep(0.2)

    def join(self, timeout_s: float = 60) -> Optional[int]:
        """The exit code (negative: the signal that killed it); AssertionError if still running."""
        self.proc.join(timeout_s)
        assert not self.proc.is_alive(), f"serve still running after {timeout_s} s:\n{self.log()[-3000:]}"
        return self.proc.exitcode

    def result(self) -> Dict[str, Any]:
        """The JSON summary serve printed last (``--json``)."""
        lines = self.out.read_text().strip().splitlines() if self.out.exists() else []
        assert lines, f"no JSON result:\n{self.log()[-3000:]}"
        return json.loads(lines[-1])

    def stop(self) -> None:
        """kill -9, if still running."""
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    """The process ``pid`` stopped (SIGSTOP) for the block, continued after: it holds its sockets
    open and answers nothing, as a network stall does."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def torchrun_workers(agent_pid: int) -> Dict[int, Tuple[int, int]]:
    """``{rank: (pid, restart count)}`` of the workers a torchrun agent (``agent_pid``) runs now."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except (OSError, ValueError, IndexError):
            continue
        if b"RANK" in env:
            out[int(env[b"RANK"])] = (int(entry), int(env.get(b"TORCHELASTIC_RESTART_COUNT", b"0")))
    return out


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` in bytes (Linux ``/proc``)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---- the audit ------------------------------------------------------------------------------------
def topic_sample_ids(bootstrap_servers: str, topic: str, partitions: int, n_records: int, codec: Any,
                     timeout_s: float = 60.0):
    """``(partition, offset, index in its message)`` of every valid sample in the first
    ``n_records`` records of ``topic``, read back (an ``(n, 3)`` int64 array): what
    `amstream.serve.key_checksum` of a complete run must cover."""
    import numpy as np

    from amstream.connectors.kafka import KafkaSource

    src = KafkaSource(partitions=[(topic, p) for p in range(partitions)], bootstrap_servers=bootstrap_servers,
                      group_id=None, on_assign=lambda parts: {tp: 0 for tp in parts})
    ids = []
    with src:
        seen, deadline = 0, time.monotonic() + timeout_s
        while seen < n_records:
            if time.monotonic() > deadline:
                raise TimeoutError(f"read {seen} of {n_records} records of `{topic}` in {timeout_s:g} s")
            records = src.next_batch(1000, 200)
            seen += len(records)
            batch = codec.decode_records(records)
            index = np.asarray(batch.index)
            for i in range(len(batch)):
                r = records[int(index[i])]
                ids.append((r.partition, r.offset, int(np.sum(index[:i] == index[i]))))
    return np.array(ids, dtype=np.int64).reshape(-1, 3)
