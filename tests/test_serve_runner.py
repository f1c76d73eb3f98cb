"""The runner without a broker, on `TestingSource`: transient errors retried with backoff, a
permanent error that checkpoints and stops, a poll that never returns, stops that end a stuck or
failing run within seconds (SIGTERM in a real child process), and the retry helper."""
from __future__ import annotations

import multiprocessing
import os
import re
import signal
import threading
import time

import numpy as np
import pytest
import torch

from amstream import AMConfig, make_learner
from amstream.checkpoint import CheckpointManager, load_checkpoint
from amstream.connectors.base import GroupSource
from amstream.connectors.codec import BinaryCodec
from amstream.connectors.testing import Fail, Hang, Pause, TestingSource
from amstream.exceptions import ConfigError, StreamError
from amstream.retry import Backoff, Stopped, retry
from amstream.serve import Engine, Runner, RunnerConfig, RunnerEvents, StreamModel, load_serve_checkpoint

D, K, B, N = 5, 3, 20, 300
X = np.random.default_rng(8).standard_normal((N, D)).astype(np.float32)
Y = (np.abs(X[:, :K]).argmax(1)).astype(np.int64)
CODEC = BinaryCodec(D, K)
VALUES = CODEC.encode_many(X, Y)


def engine():
    return Engine(StreamModel(make_learner(AMConfig(arch=(D, 8, K), seed=2)), CODEC), batch_size=B)


def reference():
    learner = make_learner(AMConfig(arch=(D, 8, K), seed=2))
    for i in range(0, N, B):
        learner.learn(torch.from_numpy(X[i:i + B]), torch.from_numpy(Y[i:i + B]))
    return learner


def same_model(a, b):
    return all(torch.equal(u, v) for u, v in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def carried(state):
    """Samples a serve state holds taken but not learned (its carry)."""
    return len((state.get("carry") or {}).get("offset", []))


class Recorder(RunnerEvents):
    def __init__(self):
        self.errors = []

    def after_source_error(self, error, retry_in_s, learned):
        self.errors.append((str(error), retry_in_s, learned))


FAST = dict(retry_initial_s=0.01, retry_max_s=0.04, poll_timeout_ms=20, shutdown_timeout_s=0.5)


@pytest.mark.parametrize("prefetch", [False, True])
def test_transient_errors_are_retried_with_backoff_and_nothing_is_lost(prefetch):
    down = Fail(StreamError("broker down", transient=True))
    source = TestingSource(VALUES[:90] + [down, down, down, Pause(3)] + VALUES[90:], batch=25)
    events = Recorder()
    runner = Runner(engine(), source, events=events, config=RunnerConfig(prefetch=prefetch, **FAST))
    summary = runner.run()
    assert summary["learned_samples"] == N and summary["stop_reason"] == "end of input" and summary["error"] is None
    assert [(e[0], e[1]) for e in events.errors] == [("broker down", 0.01), ("broker down", 0.02),
                                                     ("broker down", 0.04)]
    assert same_model(runner.engine.learner, reference())
    assert source.closed == 1


@pytest.mark.parametrize("prefetch", [False, True])
def test_a_permanent_error_checkpoints_what_was_learned_and_a_fixed_restart_is_exact(tmp_path, prefetch):
    broken = Fail(StreamError("records compressed with snappy: library missing", transient=False))
    source = TestingSource(VALUES[:130] + [broken] + VALUES[130:], batch=40)
    events = Recorder()
    runner = Runner(engine(), source, events=events, checkpoints=CheckpointManager(tmp_path),
                    config=RunnerConfig(prefetch=prefetch, **FAST))
    with pytest.raises(StreamError, match="records compressed with snappy: library missing"):
        runner.run()
    assert events.errors[-1][1] is None  # reported as permanent: no retry
    summary = runner.summary()
    assert summary["error"] == "records compressed with snappy: library missing"
    assert summary["offsets"] == {"test:0": 130} and summary["learned_samples"] == 120 and summary["carry"] == 10
    assert source.polls <= 6  # it stopped polling at the error
    learner, state, meta = load_serve_checkpoint(tmp_path)
    assert meta["reason"] == "shutdown" and state["offsets"] == {"test:0": 130}
    assert state["counters"]["learned_samples"] == 120 and len(state["carry"]["X"]) == 10
    # the cause fixed, a restart from the checkpoint learns the rest: the model of one clean run
    again = engine()
    again.load_state_dict(state)
    summary = Runner(again, TestingSource(VALUES, batch=40), config=RunnerConfig(**FAST)).run()
    assert summary["learned_samples"] == N and summary["learned_samples_this_run"] == N - 120
    assert same_model(again.learner, reference())


def test_a_poll_that_never_returns_is_an_error_not_a_quiet_stream(tmp_path):
    release = threading.Event()
    source = TestingSource(VALUES[:100] + [Hang(release)] + VALUES[100:], batch=50)
    runner = Runner(engine(), source, checkpoints=CheckpointManager(tmp_path),
                    config=RunnerConfig(prefetch=True, stall_timeout_s=1.0, **FAST))
    t0 = time.monotonic()
    try:
        with pytest.raises(StreamError, match=re.escape("the source has not returned from a poll for 1 s")):
            runner.run()
        assert time.monotonic() - t0 < 10
        assert source.closed == 0  # a client stuck in a poll is not touched again
        _, state, _ = load_serve_checkpoint(tmp_path)
        assert state["counters"]["learned_samples"] == 100 and state["offsets"] == {"test:0": 100}
    finally:
        release.set()


def test_a_stop_during_a_stuck_poll_ends_the_run_within_the_shutdown_bound():
    release = threading.Event()
    source = TestingSource(VALUES[:40] + [Hang(release)], batch=50)
    runner = Runner(engine(), source, config=RunnerConfig(prefetch=True, **FAST))
    threading.Timer(1.0, runner.request_stop, args=("SIGTERM",)).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(StreamError, match="poll did not return within 0.5 s of the stop"):
            runner.run()
        assert time.monotonic() - t0 < 4
        assert runner.summary()["stop_reason"] == "SIGTERM" and runner.summary()["learned_samples"] == 40
    finally:
        release.set()


# ---- signals in a real process -------------------------------------------------------------------
def _run_child(kind, ckpt, ready_path):
    """A child process: a runner with signals handled, on a source that quiets down (``idle``),
    hangs in a poll (``stuck``) or fails for good while its shutdown is slow (``failing``)."""
    import logging

    logging.getLogger().handlers = []
    release = threading.Event()
    if kind == "idle":
        source = TestingSource(VALUES[:100], batch=50, bounded=False)
    elif kind == "stuck":
        source = TestingSource(VALUES[:100] + [Hang(release)], batch=50)
    else:  # failing: a permanent error, then a close that takes longer than anyone should wait
        source = TestingSource(VALUES[:100] + [Fail(StreamError("corrupt batch", transient=False))], batch=50)
        source.close = lambda timeout_s=None: time.sleep(600)

    class Ready(RunnerEvents):
        def on_status(self, status):
            if status.learned_samples == 100:
                open(ready_path, "w").close()

        def after_source_error(self, error, retry_in_s, learned):
            open(ready_path, "w").close()  # now failing: the shutdown is under way

    runner = Runner(engine(), source, checkpoints=CheckpointManager(ckpt), events=Ready(),
                    config=RunnerConfig(prefetch=True, poll_timeout_ms=50, shutdown_timeout_s=1.0))
    try:
        with runner.signals_handled():
            runner.run()
        os._exit(0)
    except StreamError:
        os._exit(3)
    except KeyboardInterrupt:
        os._exit(130)


@pytest.mark.parametrize("kind,expected", [("idle", 0), ("stuck", 3), ("failing", 130)])
def test_sigterm_ends_the_process_within_seconds(tmp_path, kind, expected):
    """SIGTERM while polling a quiet stream (exit 0), during a poll that never returns (exit 3: the
    source is broken, the checkpoint is written), and during a failing run's shutdown that blocks
    (the first signal is part of the stop already under way, a second one cuts it short)."""
    ready = tmp_path / "ready"
    proc = multiprocessing.get_context("fork").Process(target=_run_child, args=(kind, str(tmp_path / "ck"), str(ready)))
    proc.start()
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.is_alive() and time.monotonic() < deadline, "the child never got ready"
            time.sleep(0.05)
        time.sleep(0.3)
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        if kind == "failing":
            time.sleep(1.5)
            assert proc.is_alive()  # the first SIGTERM did not cut the shutdown short ...
            os.kill(proc.pid, signal.SIGTERM)  # ... a second one does
        proc.join(10)
        assert not proc.is_alive(), f"still running {time.monotonic() - t0:.1f} s after SIGTERM"
        assert time.monotonic() - t0 < 5
        assert proc.exitcode == expected
        _, state, _ = load_serve_checkpoint(tmp_path / "ck")
        assert state["counters"]["learned_samples"] + carried(state) == 100  # the carry: a restart learns it
    finally:
        if proc.is_alive():
            proc.kill()


# ---- wiring and the retry helper --------------------------------------------------------------------
def test_runner_refuses_a_group_source_whose_hooks_are_taken():
    class Group(GroupSource):
        def next_batch(self, max_records=500, timeout_ms=0):
            return []

        def snapshot(self):
            return {}

        def seek(self, offsets):
            pass

        def assignment(self):
            return []

    source = Group()
    source.on_assign = lambda parts: None
    with pytest.raises(ConfigError, match=re.escape("the source's `on_assign` hook is already set")):
        Runner(engine(), source)
    source = Group()
    runner = Runner(engine(), source)
    assert source.on_assign == runner.on_assign and source.on_revoke == runner.on_revoke
    with pytest.raises(ConfigError, match="must be an `amstream.connectors.base.Source`"):
        Runner(engine(), object())


def test_retry_stops_at_once_when_told_and_gives_up_at_its_limits():
    stop = threading.Event()
    calls = []

    def down():
        calls.append(time.monotonic())
        raise ConnectionError("down")

    threading.Timer(0.2, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(Stopped):
        retry(down, transient=ConnectionError, backoff=Backoff(30, 30), stop=stop)
    assert time.monotonic() - t0 < 2 and len(calls) == 1  # the 30 s wait ended with the stop
    with pytest.raises(ConnectionError):
        retry(down, transient=ConnectionError, backoff=Backoff(0.01, 0.01), timeout_s=0.1)
    with pytest.raises(ValueError):  # not transient: raised at once
        retry(lambda: int("x"), transient=ConnectionError)
    assert retry(lambda: 7, transient=lambda e: True) == 7
    with pytest.raises(ConfigError, match=re.escape("0 < `initial_s` <= `max_s`")):
        Backoff(2, 1)
    seen = []
    with pytest.raises(ConnectionError):
        retry(down, transient=ConnectionError, backoff=Backoff(0.001, 0.004), attempts=5,
              on_retry=lambda exc, n, delay: seen.append((str(exc), n, delay)))
    assert seen == [("down", 1, 0.001), ("down", 2, 0.002), ("down", 3, 0.004), ("down", 4, 0.004)]


@pytest.mark.parametrize("prefetch", [False, True])
def test_checkpoints_carry_less_than_a_minibatch_when_a_poll_brings_many(tmp_path, prefetch):
    """Polls of 150 records, minibatches of 20: a take holds about two minibatches of a poll (the
    rest stays queued) and a checkpoint due in the middle waits for the take to be learned, so it
    carries fewer than a minibatch, not the rest of the poll."""
    manager = CheckpointManager(tmp_path, keep=1000)
    source = TestingSource(VALUES, batch=150)
    runner = Runner(engine(), source, checkpoints=manager,
                    config=RunnerConfig(prefetch=prefetch, checkpoint_every_batches=2, **FAST))
    summary = runner.run()
    assert summary["learned_samples"] == N
    carries = [carried(load_checkpoint(path)["state"]) for path in sorted(tmp_path.glob("*.ckpt"))]
    assert len(carries) >= 2 and max(carries) < B, carries
    assert same_model(runner.engine.learner, reference())
