"""Faults on purpose: a chaos and soak benchmark of `amstream serve` against the real embedded broker.

Every scenario runs `amstream serve` as a real process (`amstream.faults.ServeProcess`: forked from
this one, the same `amstream.cli.main` the console script calls) on Covertype (54 features,
standardised with the training split's mean and std, 7 classes), injects its faults, and ends with
the same audit: the samples the final checkpoint says it learned against those produced (count and
an order-free checksum of every sample id: lost = produced but never learned, doubled = learned
twice), the final model against an uninterrupted run on the same minibatches (bit for bit), and
serve's exit code and last log line.

Scenarios (``--scenarios``, all by default):

kills
    ``--kills`` (50) kill -9 over one long run, seeded: half at a random moment 0-4 s after the
    process starts (start-up, group join, learning, checkpoints, idle), half at a named moment the
    product passes (`amstream.faults.kill_point`: start-up, inside the partition assignment, inside a
    checkpoint write, between a checkpoint's rename and its directory sync, before an offset commit).
    The topic grows by one chunk before each run; a last run learns to the end.
kills-distributed
    ``--dist-kills`` (10) kill -9 of a random rank of ``serve --distributed`` with two ranks under
    torchrun, at random moments (start-up included); torchrun restarts the group from its last group
    checkpoint; SIGTERM of one rank then stops both, and a new group learns to the end.
broker
    the broker killed and restarted with the same records (serve waits with backoff, resumes); the
    broker back with the topic shorter, and empty (a clear error naming the offsets, nothing
    re-learned or skipped); network stalls (the broker process paused with SIGSTOP for 10 s and 30
    s); the topic deleted under serve.
disk
    the checkpoint directory full from the start, full in mid-run (then freed: the next run ends
    the stream exactly), read-only; the newest checkpoint truncated while serve is stopped (the
    previous one is used and the log says so); every checkpoint corrupt (an error unless
    ``--allow-fresh-start``).
bad-input
    ``--bad-total`` (100,000) messages of which ``--bad-count`` (10,000) are malformed, of every kind
    (invalid UTF-8 and JSON, wrong width, NaN/inf, unknown, negative and out-of-range labels, a
    10 MB message, another codec, empty, binary garbage, another schema, truncated binary): no
    crash, each counted by reason and in the dead-letter topic, the model the one learned on the
    good messages alone.
soak
    ``--soak-samples`` (10 million) samples (``--soak-per-message`` packed per message) produced
    while serve learns; serve's resident memory and throughput sampled every ``--soak-sample-s``
    (10) seconds; a plot of both.
exposure
    the metrics endpoint's address, TLS and SASL settings reaching every Kafka client, a checkpoint
    crafted to execute code when unpickled.

    python benchmarks/chaos.py                          # everything, ~25 minutes on 2 cores
    python benchmarks/chaos.py --scenarios kills --kills 10 --seed 2
    python benchmarks/chaos.py --quick                  # small sizes (minutes)

Writes ``benchmarks/results/chaos/``: ``chaos.md`` (the table), ``chaos.jsonl`` (every case),
``soak_k<samples per message>.csv`` and ``.png``. The disk scenarios mount a tmpfs or a read-only bind mount and need
root (they are reported as not run otherwise).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from amstream import AMConfig, faults, make_learner
from amstream.checkpoint import CheckpointManager
from amstream.connectors.broker import EmbeddedBroker
from amstream.connectors.codec import BinaryCodec, JsonCodec
from amstream.connectors.kafka import make_producer, produce_samples
from amstream.datasets import load_dataset
from amstream.faults import ServeProcess
from amstream.serve import key_checksum

D, K = 54, 7
HIDDEN = (64, 64)
GROUP = ["--consumer-config", "session_timeout_ms=2000", "--consumer-config", "heartbeat_interval_ms=500",
         "--consumer-config", "reconnect_backoff_max_ms=1000"]
log_lines: List[str] = []


def say(msg: str) -> None:
    print(msg, flush=True)


# ---- data, the reference, the audit -------------------------------------------------------------
class Data:
    """Covertype's training split, standardised; rows cycled past its end (the soak)."""

    def __init__(self) -> None:
        data = load_dataset("covertype")
        x = np.asarray(data.x_train, dtype=np.float32)
        mean, std = x.mean(0), x.std(0)
        self.x = (x - mean) / np.where(std > 0, std, 1)
        self.y = np.asarray(data.y_train, dtype=np.int64)

    def rows(self, lo: int, hi: int):
        idx = np.arange(lo, hi) % len(self.x)
        return self.x[idx], self.y[idx]


def reference(x: np.ndarray, y: np.ndarray, batch: int, seed: int, hidden=HIDDEN):
    """The uninterrupted run: the same minibatches, in order."""
    learner = make_learner(AMConfig(arch=(D, *hidden, K), algo="am-adam", seed=seed))
    for i in range(0, len(x), batch):
        learner.learn(torch.from_numpy(x[i:i + batch]), torch.from_numpy(y[i:i + batch]))
    return learner


def ids_checksum(topic: str, n: int, per_message: int, offset0: int = 0) -> int:
    i = np.arange(n)
    return key_checksum(topic, np.zeros(n), offset0 + i // per_message, i % per_message)


def saved_state(ck: Path) -> Optional[Dict[str, Any]]:
    loaded = CheckpointManager(ck).restore()
    return None if loaded is None else loaded["state"]


def learned_in(ck: Path) -> int:
    state = saved_state(ck)
    return 0 if state is None else int(state["counters"]["learned_samples"])


def audit(ck: Path, produced: int, checksum: int, ref=None) -> Dict[str, Any]:
    """Lost / doubled samples and the model check, from the newest checkpoint."""
    state = saved_state(ck)
    learned = 0 if state is None else int(state["counters"]["learned_samples"])
    got = 0 if state is None else int(state["counters"]["key_checksum"])
    out = {"produced": produced, "learned": learned, "lost": max(0, produced - learned),
           "doubled": max(0, learned - produced), "checksum_ok": got == checksum}
    if learned == produced and got != checksum:
        out["lost"] = out["doubled"] = "some (checksum differs)"
    if ref is not None and state is not None:
        from amstream.learner import learner_from_state

        model = learner_from_state(state["learner"]).model.state_dict()
        out["model_equal"] = all(torch.equal(a, b) for a, b in zip(model.values(), ref.model.state_dict().values()))
    return out


def last_line(proc: ServeProcess) -> str:
    """serve's error line if it printed one, else its last log line."""
    lines = [ln for ln in proc.log().strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("amstream serve: error:")]
    return (errors or lines or [""])[-1][:300]


def serve_argv(broker: EmbeddedBroker, topic: str, ck: Path, *extra: str, batch: int = 100, seed: int = 1) -> List[str]:
    return ["--topic", topic, "--bootstrap-servers", broker.bootstrap_servers, "--group-id", f"g-{topic}",
            "--n-features", str(D), "--n-classes", str(K), "--algo", "am-adam",
            "--arch", "-".join(map(str, HIDDEN)), "--batch-size", str(batch), "--seed", str(seed),
            "--checkpoint-dir", str(ck), "--flush-after", "3600", "--log-every", "0", "--json", *GROUP, *extra]


def produce(broker: EmbeddedBroker, topic: str, data: Data, lo: int, hi: int, per_message: int) -> None:
    x, y = data.rows(lo, hi)
    produce_samples(topic, x, y, codec=BinaryCodec(D, K), bootstrap_servers=broker.bootstrap_servers,
                    samples_per_message=per_message)


def row(scenario: str, case: str, **fields: Any) -> Dict[str, Any]:
    out = {"scenario": scenario, "case": case, **fields}
    say(f"  {scenario}/{case}: " + ", ".join(f"{k}={v}" for k, v in fields.items() if k != "last_line"))
    return out


# ---- 1. kill -9 ------------------------------------------------------------------------------------
def scenario_kills(args, data: Data, work: Path) -> List[Dict[str, Any]]:
    rng = random.Random(args.seed)
    chunk, batch, per_message = args.kill_chunk, 100, 10
    n = chunk * args.kills
    t0 = time.monotonic()
    out = []
    with EmbeddedBroker() as broker:
        broker.create_topic("kills", partitions=1)
        ck = work / "kills"
        argv = serve_argv(broker, "kills", ck, "--checkpoint-every-batches", "2", "--checkpoint-every-seconds", "0.5",
                          batch=batch, seed=args.seed)
        moments: Dict[str, int] = {}
        not_reached = 0
        for i in range(args.kills):
            produce(broker, "kills", data, i * chunk, (i + 1) * chunk, per_message)
            if i % 2 == 0:
                moment, spec = "random", None
            else:
                name = rng.choice(faults.NAMES)
                once = name in ("startup", "assign")  # passed once per run (one assignment here)
                spec = f"{name}:{1 if once else rng.randint(1, 3)}"
                moment = name
            proc = ServeProcess(argv, work, f"kill{i}", before=(lambda s=spec: faults.arm(s)) if spec else None)
            if spec is None:
                time.sleep(rng.uniform(0.0, 4.0))
                proc.proc.kill()
            else:
                proc.proc.join(30)
                if proc.proc.is_alive():  # the moment did not come (an idle run): kill it anyway
                    not_reached += 1
                    moment = "random"
                    proc.proc.kill()
            proc.proc.join(10)
            if proc.proc.exitcode != -signal.SIGKILL:
                moment = f"exited {proc.proc.exitcode} first"
            moments[moment] = moments.get(moment, 0) + 1
            say(f"    kill {i + 1}/{args.kills} ({spec or 'random moment'}): {learned_in(ck):,} learned")
        final = ServeProcess(argv + ["--idle-exit", "5"], work, "kills-final")
        code = final.join(600)
        x, y = data.rows(0, n)
        res = audit(ck, n, ids_checksum("kills", n, per_message), reference(x, y, batch, args.seed))
        out.append(row("kills", f"{args.kills} kill -9, single process", runs=args.kills + 1,
                       faults=f"{args.kills} kill -9: " + ", ".join(f"{k} {v}" for k, v in sorted(moments.items())),
                       exit_code=code, **res, seconds=round(time.monotonic() - t0, 1), last_line=last_line(final),
                       notes=f"{not_reached} named moments not reached in 30 s (killed anyway)"))
    return out


def _torchrun(argv: List[str], log_dir: Path, restarts: int):
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", str(restarts), "--monitor-interval", "0.2", "--log-dir", str(log_dir), "--redirects", "3",
           "-m", "amstream", "serve", "--distributed", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=env)


def _end(agent) -> None:
    if agent.poll() is None:
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait(10)


def scenario_kills_distributed(args, data: Data, work: Path) -> List[Dict[str, Any]]:
    """kill -9 of a random rank of two under torchrun (which restarts the group from its last
    group checkpoint), ``--dist-kills`` times at random moments, then a new group to the end."""
    rng = random.Random(args.seed)
    n, per_message, kills = args.dist_samples, 10, args.dist_kills
    t0 = time.monotonic()
    with EmbeddedBroker() as b:
        topic = "dkills"
        b.create_topic(topic, partitions=4)
        x, y = data.rows(0, n)
        produce_samples(topic, x, y, codec=BinaryCodec(D, K), bootstrap_servers=b.bootstrap_servers,
                        samples_per_message=per_message, keys=[b"%d" % i for i in range(n)])
        ck = work / topic
        argv = serve_argv(b, topic, ck, "--checkpoint-every-seconds", "0.3", "--dist-timeout", "30",
                          "--consumer-config", "max_poll_interval_ms=5000", seed=args.seed)
        argv[argv.index("--flush-after") + 1] = "0.5"
        agent = _torchrun(argv, work / "logs1", restarts=kills)
        killed: Dict[int, int] = {}
        progress = []
        try:
            for attempt in range(kills + 1):
                deadline = time.monotonic() + 180
                while not (len(w := faults.torchrun_workers(agent.pid)) == 2
                           and all(c == attempt for _, c in w.values())):
                    if agent.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"torchrun attempt {attempt} did not start (exit {agent.poll()})")
                    time.sleep(0.05)
                time.sleep(rng.uniform(0.0, 25.0))  # start-up (~10 s: a fresh interpreter), joining, learning
                victim = rng.randint(0, 1)
                workers = faults.torchrun_workers(agent.pid)
                if attempt == kills:  # the last attempt: SIGTERM of one rank stops both
                    os.kill(workers[victim][0], signal.SIGTERM)
                    break
                os.kill(workers[victim][0], signal.SIGKILL)
                killed[victim] = killed.get(victim, 0) + 1
                progress.append(learned_in(ck))
                say(f"    kill {attempt + 1}/{kills} (rank {victim}): {progress[-1]:,} learned by the group")
            code1 = agent.wait(120)
        finally:
            _end(agent)
        again = list(argv)
        again[again.index("--group-id") + 1] = f"g-{topic}-2"  # Tansu hands a killed group's partitions over slowly
        agent = _torchrun(again + ["--idle-exit", "5"], work / "logs2", restarts=0)
        try:
            code2 = agent.wait(600)
        finally:
            _end(agent)
        ids = faults.topic_sample_ids(b.bootstrap_servers, topic, 4, n // per_message, BinaryCodec(D, K))
        checksum = key_checksum(topic, ids[:, 0], ids[:, 1], ids[:, 2])
    logs = sorted((work / "logs2").rglob("stdout.log"))
    final = [json.loads(p.read_text().strip().splitlines()[-1]) for p in logs if p.read_text().strip()]
    same = len(final) == 2 and final[0]["model_digest"] == final[1]["model_digest"]
    return [row("kills", f"{kills} kill -9, --distributed with 2 ranks", runs=kills + 2,
                faults=f"{kills} kill -9 of a random rank under torchrun (rank 0: {killed.get(0, 0)}, rank 1: "
                       f"{killed.get(1, 0)}), then SIGTERM of one rank", exit_code=f"{code1}, then {code2}",
                **audit(ck, n, checksum), seconds=round(time.monotonic() - t0, 1),
                notes=f"group progress at the kills {progress}; the ranks' final models "
                      f"{'identical' if same else 'DIFFER'}; minibatches differ from one process's, so no model "
                      "comparison with an uninterrupted run")]


# ---- 2. broker faults ---------------------------------------------------------------------------------
def _first_part(broker, topic, ck, data, n, per_message, args, *extra):
    produce(broker, topic, data, 0, n, per_message)
    proc = ServeProcess(serve_argv(broker, topic, ck, "--checkpoint-every-seconds", "0.5", *extra, seed=args.seed),
                        ck.parent, topic)
    return proc


def scenario_broker(args, data: Data, work: Path) -> List[Dict[str, Any]]:
    out = []
    n, per_message, batch = args.broker_samples, 10, 100
    x, y = data.rows(0, n)
    ref = reference(x, y, batch, args.seed)
    checksum = ids_checksum("b-same", n, per_message)

    # a) killed, restarted, the same records back (a replica took over)
    t0 = time.monotonic()
    b = EmbeddedBroker().start()
    port = int(b.bootstrap_servers.rsplit(":", 1)[1])
    ck = work / "b-same"
    try:
        b.create_topic("b-same", partitions=1)
        proc = _first_part(b, "b-same", ck, data, n // 2, per_message, args, "--idle-exit", "40")
        proc.wait_for(lambda: learned_in(ck) == n // 2, 120, "the first half learned")
        b.stop()
        time.sleep(15)  # serve reports what is wrong after 10 s of nothing
        b = EmbeddedBroker(port=port).start()
        b.create_topic("b-same", partitions=1)
        produce(b, "b-same", data, 0, n, per_message)  # the first half at the same offsets, then the rest
        code = proc.join(300)
        waited = "unreachable" in proc.log()
        out.append(row("broker", "killed, restarted with the same records", runs=1, faults="broker SIGKILL, 15 s down",
                       exit_code=code, **audit(ck, n, checksum, ref), seconds=round(time.monotonic() - t0, 1),
                       last_line=last_line(proc), notes="serve reported the broker unreachable and retried"
                       if waited else "no unreachable report"))
    finally:
        b.stop()

    # b) back shorter, c) back empty: an error naming the offsets, the checkpoint untouched
    for case, back in (("restarted with the topic shorter", n // 8), ("restarted empty", 0)):
        t0 = time.monotonic()
        b = EmbeddedBroker().start()
        port = int(b.bootstrap_servers.rsplit(":", 1)[1])
        topic = "b-short" if back else "b-empty"
        ck = work / topic
        try:
            b.create_topic(topic, partitions=1)
            proc = _first_part(b, topic, ck, data, n, per_message, args)
            proc.wait_for(lambda: learned_in(ck) == n, 300, "everything learned")
            before = saved_state(ck)["counters"]
            b.stop()
            time.sleep(2)
            b = EmbeddedBroker(port=port).start()
            b.create_topic(topic, partitions=1)
            if back:
                produce(b, topic, data, 0, back, per_message)
            code = proc.join(120)
            after = saved_state(ck)["counters"]
            res = audit(ck, n, ids_checksum(topic, n, per_message))
            named = bool(re.search(rf"error: partition `{topic}:0` .*below offset {n // per_message:,}", proc.log()))
            out.append(row("broker", case, runs=1, faults=f"broker restarted, {back:,} of {n:,} samples back",
                           exit_code=code, **res, seconds=round(time.monotonic() - t0, 1), last_line=last_line(proc),
                           notes=("error names the partition and offsets" if named else "error does not name the "
                                  "offsets") + ("; state unchanged" if after == before else "; state CHANGED")))
        finally:
            b.stop()

    # d) network stalls: the broker paused 10 s and 30 s mid-stream
    t0 = time.monotonic()
    topic = "b-stall"
    with EmbeddedBroker() as b:
        ck = work / topic
        b.create_topic(topic, partitions=1)
        x2, y2 = data.rows(0, 2 * n)
        proc = _first_part(b, topic, ck, data, 2 * n, per_message, args, "--idle-exit", "15")
        for pause, at in ((10, 0.25), (30, 0.5)):
            proc.wait_for(lambda at=at: learned_in(ck) >= at * 2 * n, 300, f"{at:.0%} learned")
            with faults.paused(b.pid):
                time.sleep(pause)
        code = proc.join(300)
        out.append(row("broker", "network stalls (broker paused)", runs=1, faults="SIGSTOP 10 s, then 30 s",
                       exit_code=code, **audit(ck, 2 * n, ids_checksum(topic, 2 * n, per_message),
                                               reference(x2, y2, batch, args.seed)),
                       seconds=round(time.monotonic() - t0, 1), last_line=last_line(proc), notes=""))

    # e) the topic deleted under serve
    t0 = time.monotonic()
    topic = "b-deleted"
    with EmbeddedBroker() as b:
        from kafka.admin import KafkaAdminClient

        ck = work / topic
        b.create_topic(topic, partitions=1)
        proc = _first_part(b, topic, ck, data, n, per_message, args)
        proc.wait_for(lambda: learned_in(ck) == n, 300, "everything learned")
        admin = KafkaAdminClient(bootstrap_servers=b.bootstrap_servers)
        admin.delete_topics([topic])
        admin.close()
        code = proc.join(120)
        named = bool(re.search(rf"error: partition `{topic}:0` .*below offset", proc.log()))
        out.append(row("broker", "topic deleted under serve", runs=1, faults="delete_topics", exit_code=code,
                       **audit(ck, n, ids_checksum(topic, n, per_message)), seconds=round(time.monotonic() - t0, 1),
                       last_line=last_line(proc), notes="error names the partition and offsets" if named else
                       "error does not name the offsets"))
    return out


# ---- 3. disk faults -----------------------------------------------------------------------------------
def scenario_disk(args, data: Data, work: Path) -> List[Dict[str, Any]]:
    out = []
    n, per_message, batch = args.broker_samples, 10, 100
    x, y = data.rows(0, n)
    ref = reference(x, y, batch, args.seed)
    if not faults.can_mount():
        return [row("disk", "all", runs=0, faults="not run: mounting a tmpfs is not allowed here", exit_code=None,
                    notes="needs root")]
    with EmbeddedBroker() as b:
        def run(topic, ck, *extra, name=None, timeout=300):
            proc = ServeProcess(serve_argv(b, topic, ck, "--idle-exit", "5", "--checkpoint-every-batches", "5",
                                           *extra, seed=args.seed), work, name or topic)
            return proc, proc.join(timeout)

        def bounded(proc):
            return proc.log().count("not written")

        # a) full from the start
        t0 = time.monotonic()
        topic = "d-full"
        b.create_topic(topic, partitions=1)
        produce(b, topic, data, 0, n, per_message)
        ck = work / topic
        with faults.small_filesystem(ck, 64 << 10):
            proc, code = run(topic, ck)
        out.append(row("disk", "checkpoint disk full from the start", runs=1, faults="64 KiB tmpfs", exit_code=code,
                       errors_logged=bounded(proc), seconds=round(time.monotonic() - t0, 1),
                       last_line=last_line(proc), notes="nothing committed; the next run learns everything"))

        # b) full in mid-run (a ballast file takes the space left), then freed
        t0 = time.monotonic()
        topic = "d-fills"
        b.create_topic(topic, partitions=1)
        produce(b, topic, data, 0, n // 2, per_message)
        ck = work / topic
        with faults.small_filesystem(ck, 256 << 20):
            proc = ServeProcess(serve_argv(b, topic, ck, "--idle-exit", "5", "--checkpoint-every-batches", "5",
                                           seed=args.seed), work, topic)
            proc.wait_for(lambda: learned_in(ck) == n // 2, 120, "the first half learned")
            ballast = ck / "ballast"
            with open(ballast, "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * (1 << 20))
                        f.flush()
                except OSError:
                    pass
            produce(b, topic, data, n // 2, n, per_message)
            code1 = proc.join(300)
            during = learned_in(ck)
            ballast.unlink()
            proc2, code2 = run(topic, ck, name="d-fills-2")
            res = audit(ck, n, ids_checksum(topic, n, per_message), ref)
        out.append(row("disk", "checkpoint disk fills mid-run, then freed", runs=2, faults="a ballast file fills a "
                       "256 MiB tmpfs after half the stream", exit_code=f"{code1}, then {code2}",
                       errors_logged=bounded(proc), **res, seconds=round(time.monotonic() - t0, 1),
                       last_line=last_line(proc),
                       notes=f"{during:,} samples in the last checkpoint written before the disk filled"))

        # c) read-only
        t0 = time.monotonic()
        topic = "d-ro"
        b.create_topic(topic, partitions=1)
        produce(b, topic, data, 0, n // 2, per_message)
        ck = work / topic
        _, code0 = run(topic, ck, name="d-ro-0")
        produce(b, topic, data, n // 2, n, per_message)
        with faults.read_only_directory(ck):
            proc, code1 = run(topic, ck, name="d-ro-1")
        proc2, code2 = run(topic, ck, name="d-ro-2")
        out.append(row("disk", "checkpoint directory read-only", runs=3, faults="read-only bind mount on run 2",
                       exit_code=f"{code0}, {code1}, then {code2}", errors_logged=bounded(proc),
                       **audit(ck, n, ids_checksum(topic, n, per_message), ref),
                       seconds=round(time.monotonic() - t0, 1), last_line=last_line(proc), notes=""))

        # d) the newest checkpoint truncated while stopped
        t0 = time.monotonic()
        topic = "d-trunc"
        b.create_topic(topic, partitions=1)
        produce(b, topic, data, 0, n // 2, per_message)
        ck = work / topic
        _, code0 = run(topic, ck, name="d-trunc-0")
        newest = CheckpointManager(ck).checkpoints()[-1]
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
        produce(b, topic, data, n // 2, n, per_message)
        proc, code1 = run(topic, ck, name="d-trunc-1")
        said = "skipping checkpoint" in proc.log()
        out.append(row("disk", "newest checkpoint truncated while stopped", runs=2, faults="newest file cut in half",
                       exit_code=f"{code0}, then {code1}", **audit(ck, n, ids_checksum(topic, n, per_message), ref),
                       seconds=round(time.monotonic() - t0, 1), last_line=last_line(proc),
                       notes="the log names the skipped file; the one before is used" if said else "NOT logged"))

        # e) every checkpoint corrupt
        t0 = time.monotonic()
        for p in CheckpointManager(ck).checkpoints():
            p.write_bytes(b"\0" * 64)
        proc, code1 = run(topic, ck, name="d-corrupt-1")
        proc2, code2 = run(topic, ck, "--allow-fresh-start", name="d-corrupt-2")
        out.append(row("disk", "every checkpoint corrupt", runs=2, faults="every file overwritten",
                       exit_code=f"{code1}, with --allow-fresh-start {code2}", seconds=round(time.monotonic() - t0, 1),
                       last_line=last_line(proc), notes="the model is lost: an error unless a fresh start is asked "
                       "for (then from the group's committed offsets)"))
    return out


# ---- 4. bad input at scale ------------------------------------------------------------------------------
def bad_messages(rng: np.random.Generator) -> List[tuple]:
    """One of each kind: (kind, value, the reason serve should give)."""
    row_ = [0.5] * D
    good = BinaryCodec(D, K).encode_one(row_, 1)
    return [
        ("invalid UTF-8", b"\xff\xfe\xfd{\"x\": 1}", "malformed"),
        ("invalid JSON", b'{"x": [1, 2', "malformed"),
        ("JSON, not an object", b"[1, 2, 3]", "malformed"),
        ("another schema", json.dumps({"features": row_, "target": 1}).encode(), "malformed"),
        ("wrong width", json.dumps({"x": row_[:-3], "y": 1}).encode(), "feature_count"),
        ("NaN", json.dumps({"x": row_[:-1] + [float("nan")], "y": 1}).encode(), "non_finite"),
        ("inf", json.dumps({"x": row_[:-1] + [float("inf")], "y": 1}).encode(), "non_finite"),
        ("non-numeric feature", json.dumps({"x": row_[:-1] + ["a"], "y": 1}).encode(), "non_numeric"),
        ("unknown label", json.dumps({"x": row_, "y": "cat"}).encode(), "unknown_label"),
        ("negative label", json.dumps({"x": row_, "y": -1}).encode(), "label_out_of_range"),
        ("label out of range", json.dumps({"x": row_, "y": 99}).encode(), "label_out_of_range"),
        ("no label", json.dumps({"x": row_}).encode(), "missing_label"),
        ("empty", b"", "malformed"),
        ("binary garbage", rng.bytes(200), "malformed"),
        ("another codec (gzip of JSON)", __import__("gzip").compress(json.dumps({"x": row_, "y": 1}).encode()),
         "malformed"),
        ("truncated binary", good[:-5], "malformed"),
        ("binary, wrong width", BinaryCodec(D + 2, K).encode_one(row_ + [1.0, 1.0], 1), "feature_count"),
        ("binary, NaN", BinaryCodec(D, K).encode_one(row_[:-1] + [float("nan")], 1), "non_finite"),
    ]


def scenario_bad_input(args, data: Data, work: Path) -> List[Dict[str, Any]]:
    t0 = time.monotonic()
    rng = np.random.default_rng(args.seed)
    total, n_bad, huge_n = args.bad_total, args.bad_count, 3
    n_good = total - n_bad
    x, y = data.rows(0, n_good)
    good = BinaryCodec(D, K).encode_many(x, y)
    kinds = bad_messages(rng)
    huge = (b'{"x": [' + b"0.5, " * 2_000_000 + b'0.5], "y": 1}')  # 10 MB
    bad = [kinds[i % len(kinds)] for i in range(n_bad - huge_n)] + [("10 MB message", huge, "oversize")] * huge_n
    positions = set(rng.choice(total, size=n_bad, replace=False).tolist())
    order = iter(rng.permutation(len(bad)).tolist())
    stream, g = [], iter(good)
    for i in range(total):
        stream.append(bad[next(order)] if i in positions else (None, next(g), None))
    expected: Dict[str, int] = {}
    for kind, _, reason in bad:
        expected[reason] = expected.get(reason, 0) + 1
    with EmbeddedBroker() as b:
        topic = "bad"
        b.create_topic(topic, partitions=1)
        producer = make_producer(b.bootstrap_servers, max_request_size=16 << 20)
        for i, (_, value, _) in enumerate(stream):
            producer.send(topic, value=value, key=b"%d" % i)
        producer.flush()
        producer.close()
        ck = work / topic
        proc = ServeProcess(serve_argv(b, topic, ck, "--idle-exit", "5", "--dead-letter-topic", "bad.dlq",
                                       batch=100, seed=args.seed), work, topic)
        code = proc.join(900)
        result = proc.result()
        from amstream.connectors.kafka import KafkaSource

        dead: Dict[str, int] = {}
        truncated = 0
        src = KafkaSource(partitions=[("bad.dlq", 0)], bootstrap_servers=b.bootstrap_servers, group_id=None,
                          on_assign=lambda parts: {tp: 0 for tp in parts})
        with src:
            seen, deadline = 0, time.monotonic() + 60
            while seen < n_bad and time.monotonic() < deadline:
                for r in src.next_batch(5000, 500):
                    h = dict(r.headers)
                    reason = h["amstream.reason"].decode()
                    dead[reason] = dead.get(reason, 0) + 1
                    truncated += "amstream.truncated" in h
                    seen += 1
    good_offsets = np.array([i for i in range(total) if i not in positions])
    res = audit(ck, n_good, key_checksum(topic, np.zeros(n_good), good_offsets, np.zeros(n_good)),
                reference(x, y, 100, args.seed))
    return [row("bad-input", f"{total:,} messages, {n_bad:,} bad of {len(kinds) + 1} kinds", runs=1,
                faults=", ".join(sorted({k for k, _, _ in bad})), exit_code=code, **res,
                counted_ok=result["bad_messages_by_reason"] == expected, dead_lettered=sum(dead.values()),
                dead_letter_ok=dead == expected, truncated=truncated, seconds=round(time.monotonic() - t0, 1),
                last_line=last_line(proc),
                notes=f"by reason: {json.dumps(result['bad_messages_by_reason'])}" + (
                    "" if result["bad_messages_by_reason"] == expected else f"; expected {json.dumps(expected)}"))]


# ---- 5. soak ---------------------------------------------------------------------------------------------
def scenario_soak(args, data: Data, work: Path) -> List[Dict[str, Any]]:
    t0 = time.monotonic()
    n, per_message, batch = args.soak_samples, args.soak_per_message, 1000
    samples = []
    with EmbeddedBroker() as b:
        topic = "soak"
        b.create_topic(topic, partitions=1)
        produced = [0]
        for lo in range(0, n, 500_000):  # produced first: the rate is serve's, not the producer's
            produce(b, topic, data, lo, min(n, lo + 500_000), per_message)
            produced[0] = min(n, lo + 500_000)
        say(f"    produced {n:,} samples in {time.monotonic() - t0:.0f} s")
        ck = work / topic
        proc = ServeProcess(serve_argv(b, topic, ck, "--metrics-port", "0", "--checkpoint-every-seconds", "30",
                                       batch=batch, seed=args.seed), work, topic)
        proc.wait_for(lambda: "metrics at" in proc.log(), 120, "the metrics endpoint")
        url = re.search(r"metrics at (http://\S+/metrics)", proc.log()).group(1)
        start = time.monotonic()
        while proc.proc.is_alive():
            try:
                body = urllib.request.urlopen(url, timeout=5).read().decode()
                learned = float(re.search(r"^amstream_model_learned_samples (\S+)$", body, re.M).group(1))
                samples.append({"t": round(time.monotonic() - start, 1), "rss_mb": faults.rss_bytes(proc.pid) / 2**20,
                                "broker_rss_mb": faults.rss_bytes(b.pid) / 2**20, "learned": learned,
                                "produced": produced[0]})
                say(f"    soak t={samples[-1]['t']:.0f} s: {learned:,.0f} learned, rss {samples[-1]['rss_mb']:.0f} MB")
                if learned >= n:
                    proc.proc.terminate()  # SIGTERM: checkpoint, commit, exit 0
                    break
            except Exception:
                pass
            proc.proc.join(args.soak_sample_s)
        code = proc.join(60)
    rates = [(b_["learned"] - a["learned"]) / max(1e-9, b_["t"] - a["t"]) for a, b_ in zip(samples, samples[1:])]
    for s, r in zip(samples[1:], rates):
        s["samples_per_s"] = r
    warm = [s["rss_mb"] for s in samples[len(samples) // 5:]] or [0.0]
    res = audit(ck, n, ids_checksum(topic, n, per_message))
    write_soak(samples, args.out / f"soak_k{per_message}", f"{per_message} per message, seed {args.seed}")
    steady = [s["samples_per_s"] for s in samples[len(samples) // 5:-1] if "samples_per_s" in s]
    return [row("soak", f"{n:,} samples, {per_message} per message", runs=1, faults="none (length)", exit_code=code,
                **res, seconds=round(time.monotonic() - t0, 1), last_line=last_line(proc),
                rss_mb_after_warmup=f"{min(warm):.0f}-{max(warm):.0f}",
                samples_per_s=f"{np.mean(steady):,.0f} ± {np.std(steady):,.0f}" if steady else "n/a",
                notes=f"{len(samples)} samples every {args.soak_sample_s:g} s; RSS after the first fifth "
                      f"{min(warm):.0f}-{max(warm):.0f} MB")]


def write_soak(samples: List[Dict[str, Any]], stem: Path, what: str = "") -> None:
    """``stem``.csv (every sample) and ``stem``.png (resident memory and throughput over time)."""
    if not samples:
        return
    with open(stem.with_suffix(".csv"), "w") as f:
        keys = ["t", "learned", "produced", "rss_mb", "broker_rss_mb", "samples_per_s"]
        f.write(",".join(keys) + "\n")
        for s in samples:
            f.write(",".join(str(round(s.get(k, float("nan")), 2)) for k in keys) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    t = [s["t"] for s in samples]
    a1.plot(t, [s["rss_mb"] for s in samples], "o-", label="serve")
    a1.set_ylabel("resident memory (MB)")
    a1.legend()
    a1.set_ylim(bottom=0)
    a1.set_title(f"soak: {samples[-1]['learned']:,.0f} samples through amstream serve ({what})")
    a2.plot(t[1:], [s.get("samples_per_s", float("nan")) / 1000 for s in samples[1:]], "o-")
    a2.set_ylabel("learned samples/s (thousands)")
    a2.set_xlabel("seconds")
    a2.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    plt.close(fig)


# ---- 6. exposure ----------------------------------------------------------------------------------------
def listening_addresses(port: int) -> List[str]:
    """Local addresses listening on TCP ``port`` (from /proc/net/tcp)."""
    found = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(path).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:
                if len(addr) == 8:
                    found.append(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
                else:
                    found.append(addr)
    return found


def scenario_exposure(args, data: Data, work: Path) -> List[Dict[str, Any]]:
    out = []
    with EmbeddedBroker() as b:
        b.create_topic("exp", partitions=1)
        produce(b, "exp", data, 0, 1000, 10)
        ck = work / "exp"
        proc = ServeProcess(serve_argv(b, "exp", ck, "--metrics-port", "0", "--idle-exit", "5"), work, "exp")
        proc.wait_for(lambda: "metrics at" in proc.log(), 120, "the metrics endpoint")
        port = int(re.search(r"metrics at http://[^:]+:(\d+)/", proc.log()).group(1))
        addresses = listening_addresses(port)
        code = proc.join(120)
        out.append(row("exposure", "metrics endpoint address", runs=1, faults="-", exit_code=code,
                       notes=f"listening on {', '.join(addresses) or '?'} (default `--metrics-host 127.0.0.1`)"))
        # a checkpoint crafted to run code when unpickled
        marker = work / "pwned"

        class Exploit:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        bad = work / "exp-evil"
        bad.mkdir(exist_ok=True)
        from amstream.checkpoint import _HEADER, FORMAT_VERSION, MAGIC

        buffer = io.BytesIO()
        torch.save({"state": {"learner": Exploit()}, "metadata": {}}, buffer)  # a valid header and checksum
        payload = buffer.getvalue()
        (bad / "step-000000999.ckpt").write_bytes(
            _HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), hashlib.sha256(payload).hexdigest().encode()) + payload)
        proc = ServeProcess(serve_argv(b, "exp", bad, "--idle-exit", "5"), work, "exp-evil")
        code = proc.join(120)
        out.append(row("exposure", "checkpoint that runs code when unpickled", runs=1, faults="os.system in __reduce__",
                       exit_code=code, last_line=last_line(proc),
                       notes=("refused (`weights_only` unpickling), code not run" if "unsupported GLOBAL" in proc.log()
                              else "refused") if not marker.exists() else "CODE RAN"))
    from amstream.cli import build_parser
    from amstream.commands.serve import kafka_configs

    secure = {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "u",
              "sasl_plain_password": "p", "ssl_cafile": "/etc/ca.pem"}
    argv = ["serve", "--topic", "t"] + [a for k, v in secure.items() for a in ("--kafka-config", f"{k}={v}")]
    configs = kafka_configs(build_parser().parse_args(argv))
    reached = [c for c, cfg in configs.items() if all(cfg.get(k) == v for k, v in secure.items())]
    out.append(row("exposure", "TLS and SASL settings", runs=0, faults="-", exit_code=None,
                   notes=f"`--kafka-config` reaches: {', '.join(reached)} (no secured broker runs here)"))
    return out


SCENARIOS = {"kills": scenario_kills, "kills-distributed": scenario_kills_distributed, "broker": scenario_broker, "disk": scenario_disk,
             "bad-input": scenario_bad_input, "soak": scenario_soak, "exposure": scenario_exposure}


# ---- the report ----------------------------------------------------------------------------------------
def write_report(rows: List[Dict[str, Any]], args, header: str) -> None:
    out = args.out
    with open(out / "chaos.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps({**r, "seed": args.seed}, default=str) + "\n")
    every = [json.loads(line) for line in open(out / "chaos.jsonl")]
    latest: Dict[tuple, Dict[str, Any]] = {}
    for r in every:
        latest[(r["scenario"], r["case"])] = r
    lines = ["# Chaos and soak (benchmarks/chaos.py)", "", header, "",
             "| scenario | case | runs | faults injected | lost / doubled | model = uninterrupted | exit codes | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in latest.values():
        lost = "—" if "lost" not in r else f"{r['lost']} / {r['doubled']}"
        model = {True: "yes", False: "NO"}.get(r.get("model_equal"), "—")
        notes = r.get("notes", "")
        for key in ("errors_logged", "counted_ok", "dead_lettered", "dead_letter_ok", "truncated",
                    "rss_mb_after_warmup", "samples_per_s"):
            if key in r:
                notes = f"{key}={r[key]}; {notes}"
        lines.append(f"| {r['scenario']} | {r['case']} | {r.get('runs', '')} | {r.get('faults', '')} | {lost} | "
                     f"{model} | {r.get('exit_code', '')} | {notes} (seed {r['seed']}, {r.get('seconds', '—')} s) |")
    lines += ["", "Last log lines:", ""]
    for r in latest.values():
        if r.get("last_line"):
            lines.append(f"- {r['scenario']}/{r['case']}: `{r['last_line'].replace('`', '')[:240]}`")
    (out / "chaos.md").write_text("\n".join(lines) + "\n")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--kills", type=int, default=50)
    p.add_argument("--kill-chunk", type=int, default=2000, help="samples produced before each killed run")
    p.add_argument("--dist-kills", type=int, default=10, help="kill -9 of a rank under torchrun")
    p.add_argument("--dist-samples", type=int, default=400_000)
    p.add_argument("--broker-samples", type=int, default=20000)
    p.add_argument("--bad-total", type=int, default=100_000)
    p.add_argument("--bad-count", type=int, default=10_000)
    p.add_argument("--soak-samples", type=int, default=10_000_000)
    p.add_argument("--soak-per-message", type=int, default=10)
    p.add_argument("--soak-sample-s", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="small sizes: 6 kills, 10,000 bad-input messages, "
                                                           "500,000 soak samples")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "chaos")
    args = p.parse_args(argv)
    if args.quick:
        args.kills, args.bad_total, args.bad_count, args.soak_samples, args.soak_sample_s = 6, 10_000, 1_000, 500_000, 2
        args.dist_kills, args.dist_samples = 2, 40_000
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    args.out.mkdir(parents=True, exist_ok=True)
    make_learner(AMConfig(arch=(2, 2, 2)))  # the children fork with torch.optim imported
    import amstream.commands.serve  # noqa: F401

    header = (f"seed {args.seed}, torch threads {args.threads}, device cpu, {os.cpu_count()} CPUs, Python "
              f"{platform.python_version()}, torch {torch.__version__}, embedded Tansu broker on the same machine; "
              f"load average {os.getloadavg()[0]:.2f} at the start; {time.strftime('%Y-%m-%d')}")
    say(header)
    data = Data()
    rows = []
    with tempfile.TemporaryDirectory(prefix="amstream-chaos-") as tmp:
        for name in args.scenarios:
            say(f"== {name}")
            work = Path(tmp) / name
            work.mkdir()
            got = SCENARIOS[name](args, data, work)
            rows += got
            write_report(got, args, header)
    failed = [r for r in rows if r.get("lost") not in (None, 0) or r.get("doubled") not in (None, 0)
              or r.get("model_equal") is False]
    say(f"{len(rows)} cases, {len(failed)} with samples lost, doubled or a different model; "
        f"table in {args.out / 'chaos.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
