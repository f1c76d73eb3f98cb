"""Faults on purpose against `amstream serve`: kill -9 at named moments, every checkpoint unreadable,
a full or read-only checkpoint disk, a message too large to dead-letter as it is, a broker that
comes back without the data, a topic deleted under serve, the metrics endpoint's address.

The small versions of `benchmarks/chaos.py`'s scenarios (README "Faults on purpose"). Serve runs as
a forked child (tests/serve_child.py) where a real process must die; in this process otherwise.
"""
from __future__ import annotations

import hashlib
import json
import re
import signal
import time

import numpy as np
import pytest
import torch

from amstream import AMConfig, faults, make_learner
from amstream.checkpoint import CheckpointManager
from amstream.cli import build_parser, main
from amstream.connectors.broker import EmbeddedBroker
from amstream.connectors.codec import BinaryCodec
from amstream.connectors.kafka import KafkaSource, make_producer, produce_samples
from amstream.connectors.testing import TestingSource
from amstream.exceptions import CheckpointError
from amstream.serve import Engine, Runner, RunnerConfig, StreamModel, Telemetry, key_checksum, load_serve_checkpoint
from amstream.serve.runner import RunnerEvents
from serve_child import FAST_GROUP, Serve, learned_in

D, K = 12, 3


def data(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D)).astype(np.float32)
    return x, np.abs(x[:, :K]).argmax(1).astype(np.int64)


def reference(x, y, batch, seed, hidden=8):
    learner = make_learner(AMConfig(arch=(D, hidden, K), algo="am-adam", seed=seed))
    for i in range(0, len(x), batch):
        learner.learn(torch.from_numpy(x[i:i + batch]), torch.from_numpy(y[i:i + batch]))
    return learner


def same_model(a, b):
    return all(torch.equal(va, vb) for va, vb in zip(a.model.state_dict().values(), b.model.state_dict().values()))


@pytest.fixture(scope="module", autouse=True)
def warm_parent():
    make_learner(AMConfig(arch=(2, 2, 2)))  # the children fork with torch.optim imported
    import amstream.commands.serve  # noqa: F401


@pytest.fixture(scope="module")
def broker(tansu):
    with EmbeddedBroker() as b:
        yield b


def write_csv(path, x, y):
    with open(path, "w") as f:
        for row, label in zip(x, y):
            f.write(",".join(f"{v:.6f}" for v in row) + f",{label}\n")


def file_argv(source, ck, *extra):
    return ["serve", "--source", str(source), "--n-classes", str(K), "--arch", "8", "--batch-size", "20",
            "--checkpoint-dir", str(ck), "--log-every", "0", "--json", *extra]


# ---- exposure ------------------------------------------------------------------------------------
def test_metrics_endpoint_listens_on_loopback_unless_told_otherwise():
    args = build_parser().parse_args(["serve", "--topic", "t"])
    assert args.metrics_host == "127.0.0.1"
    telemetry = Telemetry()
    try:
        telemetry.serve_http(0)
        assert telemetry._server.server_address[0] == "127.0.0.1"
    finally:
        telemetry.close()


def test_tls_and_sasl_settings_reach_every_kafka_client():
    from amstream.commands.serve import kafka_configs

    secure = ["security_protocol=SASL_SSL", "sasl_mechanism=SCRAM-SHA-512", "sasl_plain_username=me",
              "sasl_plain_password=secret", "ssl_cafile=/etc/ca.pem", "ssl_check_hostname=true"]
    args = build_parser().parse_args(["serve", "--topic", "t", *[a for kv in secure for a in ("--kafka-config", kv)],
                                      "--consumer-config", "session_timeout_ms=9000",
                                      "--producer-config", "compression_type=zstd"])
    configs = kafka_configs(args)
    wanted = {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "me",
              "sasl_plain_password": "secret", "ssl_cafile": "/etc/ca.pem", "ssl_check_hostname": True}
    for client in ("consumer", "producer", "admin"):
        assert {k: configs[client][k] for k in wanted} == wanted, client
    assert configs["consumer"]["session_timeout_ms"] == 9000 and "session_timeout_ms" not in configs["producer"]
    assert configs["producer"]["compression_type"] == "zstd"
    source = KafkaSource(["t"], bootstrap_servers="localhost:1", group_id="g", consumer_config=configs["consumer"])
    assert {k: source.consumer_config[k] for k in wanted} == wanted  # what `KafkaConsumer(**...)` is given
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient

    for client, cls in (("consumer", KafkaConsumer), ("producer", KafkaProducer), ("admin", KafkaAdminClient)):
        unknown = set(configs[client]) - set(cls.DEFAULT_CONFIG)
        assert not unknown, (client, unknown)  # each a setting that client knows


# ---- checkpoints ---------------------------------------------------------------------------------
def test_every_checkpoint_unreadable_is_an_error_unless_a_fresh_start_is_asked_for(tmp_path, capsys):
    x, y = data(200)
    write_csv(tmp_path / "s.csv", x, y)
    ck = tmp_path / "ck"
    assert main(file_argv(tmp_path / "s.csv", ck, "--keep-checkpoints", "2", "--checkpoint-every-batches", "3")) == 0
    files = CheckpointManager(ck).checkpoints()
    assert len(files) == 2
    for f in files:  # a crash that left both half-written, a disk that lost them
        f.write_bytes(f.read_bytes()[: 100])
    capsys.readouterr()
    assert main(file_argv(tmp_path / "s.csv", ck)) == 1
    err = capsys.readouterr().err
    assert "none of the 2 checkpoint(s)" in err and "--allow-fresh-start" in err and "Nothing was read" in err
    assert [f.stat().st_size for f in files] == [100, 100]  # nothing overwritten
    assert main(file_argv(tmp_path / "s.csv", ck, "--allow-fresh-start")) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["learned_samples"] == 200


class Failures(RunnerEvents):
    def __init__(self):
        self.failed = []

    def after_checkpoint_failed(self, reason, error):
        self.failed.append((time.monotonic(), reason))


def test_a_checkpoint_that_cannot_be_written_is_retried_with_backoff_then_stops_the_run(tmp_path):
    x, y = data(20000)
    codec = BinaryCodec(D, K)
    ck = tmp_path / "ck"
    ck.mkdir()
    engine = Engine(StreamModel(make_learner(AMConfig(arch=(D, 8, K), seed=1)), codec), batch_size=10)
    events = Failures()
    runner = Runner(engine, TestingSource(codec.encode_many(x, y)), checkpoints=CheckpointManager(ck),
                    events=events, config=RunnerConfig(checkpoint_every_batches=1, max_checkpoint_failures=4,
                                                       checkpoint_retry_s=0.02))
    try:
        with faults.read_only_directory(ck):
            with pytest.raises(CheckpointError, match=r"4 checkpoint\(s\) in a row could not be written"):
                runner.run()
    except faults.FaultUnavailable as exc:
        pytest.skip(str(exc))
    summary = runner.summary()
    assert summary["learned_samples"] < 20000
    assert [reason for _, reason in events.failed] == ["periodic"] * 4 + ["shutdown"]  # and one last try
    times = [t for t, _ in events.failed[:4]]
    gaps = np.diff(times)
    assert all(g >= 0.02 * 2 ** i * 0.9 for i, g in enumerate(gaps)), gaps  # 0.02, 0.04, 0.08 s
    assert CheckpointManager(ck).checkpoints() == []


def test_a_full_checkpoint_disk_is_a_clear_error_with_a_non_zero_exit(tmp_path, capsys):
    x, y = data(400)
    write_csv(tmp_path / "s.csv", x, y)
    ck = tmp_path / "ck"
    try:
        with faults.small_filesystem(ck, 8192):  # smaller than one checkpoint of this model
            code = main(file_argv(tmp_path / "s.csv", ck, "--arch", "256", "--checkpoint-every-batches", "1"))
    except faults.FaultUnavailable as exc:
        pytest.skip(str(exc))
    captured = capsys.readouterr()
    assert code == 1
    assert re.search(r"amstream serve: error: \d checkpoint\(s\) in a row could not be written \(no checkpoint in "
                     r"this run\).*No space left on device", captured.err), captured.err[-2000:]
    assert captured.err.count("not written") <= 5  # bounded, not one line per minibatch (20 here)
    assert json.loads(captured.out.strip().splitlines()[-1])["checkpoint"] is None


# ---- bad input -------------------------------------------------------------------------------------
def test_a_message_over_the_brokers_limit_is_dead_lettered_cut_with_its_length_and_digest(broker, tmp_path):
    x, y = data(100, 1)
    codec = BinaryCodec(D, K)
    huge = b"\x00garbage" * 700_000  # 5.6 MB: more than the producer's 4 MiB request and the broker's 1 MB
    broker.create_topic("huge", partitions=1)
    producer = make_producer(broker.bootstrap_servers, max_request_size=8 << 20)
    for i, value in enumerate(codec.encode_many(x[:50], y[:50]) + [huge] + codec.encode_many(x[50:], y[50:])):
        producer.send("huge", value=value, key=b"k%d" % i)
    producer.flush()
    producer.close()
    serve = Serve(["--topic", "huge", "--bootstrap-servers", broker.bootstrap_servers, "--group-id", "g-huge",
                   "--n-features", str(D), "--n-classes", str(K), "--arch", "8", "--batch-size", "10",
                   "--dead-letter-topic", "huge.dlq", "--checkpoint-dir", str(tmp_path / "ck"), "--idle-exit", "3",
                   "--log-every", "0", "--json", *FAST_GROUP], tmp_path, "huge")
    assert serve.join(90) == 0, serve.log()[-3000:]
    result = serve.result()
    assert result["learned_samples"] == 100 and result["bad_messages_by_reason"] == {"oversize": 1}
    assert result["offsets"] == {"huge:0": 101}
    src = KafkaSource(partitions=[("huge.dlq", 0)], bootstrap_servers=broker.bootstrap_servers, group_id=None,
                      on_assign=lambda parts: {tp: 0 for tp in parts})
    with src:
        dead, deadline = [], time.monotonic() + 20
        while not dead and time.monotonic() < deadline:
            dead = src.next_batch(10, 500)
    assert len(dead) == 1
    h = dict(dead[0].headers)
    assert h["amstream.reason"] == b"oversize" and h["amstream.offset"] == b"50" and dead[0].key == b"k50"
    assert int(h["amstream.truncated"]) == len(huge) and h["amstream.sha256"] == hashlib.sha256(huge).hexdigest().encode()
    assert len(dead[0].value) < 1_000_000 and huge.startswith(dead[0].value)


# ---- the broker loses the data ----------------------------------------------------------------------
def test_a_partition_that_comes_back_shorter_stops_serve_with_the_offsets_nothing_relearned(tansu, tmp_path):
    x, y = data(700, 2)
    codec = BinaryCodec(D, K)
    b = EmbeddedBroker().start()
    port, servers = int(b.bootstrap_servers.rsplit(":", 1)[1]), b.bootstrap_servers
    ck = tmp_path / "ck"
    serve = None
    try:
        b.create_topic("lost", partitions=1)
        produce_samples("lost", x[:500], y[:500], codec=codec, bootstrap_servers=servers)
        serve = Serve(["--topic", "lost", "--bootstrap-servers", servers, "--group-id", "g-lost", "--n-features",
                       str(D), "--n-classes", str(K), "--arch", "8", "--batch-size", "50", "--checkpoint-dir", str(ck),
                       "--checkpoint-every-seconds", "0.5", "--log-every", "0", "--json",
                       "--consumer-config", "reconnect_backoff_max_ms=1000", *FAST_GROUP], tmp_path, "lost")
        serve.wait_for(lambda: learned_in(ck) == 500, 60, "500 samples learned")
        b.stop()
        b = EmbeddedBroker(port=port).start()  # in-memory: the topic is gone
        b.create_topic("lost", partitions=1)
        produce_samples("lost", x[500:], y[500:], codec=codec, bootstrap_servers=servers)  # offsets 0..199
        assert serve.join(90) == 1
        log = serve.log()
        # (Tansu may have recreated `lost` itself, with 4 partitions, on serve's metadata request: then
        # partition 0 holds only part of the 200, and the other partitions are new to the model)
        assert re.search(r"amstream serve: error: partition `lost:0` (now ends at offset \d+|restarted at offset 0), "
                         r"below offset 500", log), log[-3000:]
        assert "--on-data-loss continue" in log
        state = load_serve_checkpoint(ck)[1]
        assert state["offsets"]["lost:0"] == 500  # nothing of partition 0 re-learned, nothing skipped
        assert state["counters"]["learned_samples"] == 500 + sum(v for k, v in state["offsets"].items() if k != "lost:0")
        assert serve.result()["learned_samples"] == state["counters"]["learned_samples"]
    finally:
        if serve is not None:
            serve.stop()
        b.stop()


def test_a_stalled_broker_is_waited_for_and_nothing_is_lost(tansu, tmp_path):
    """The broker process paused (SIGSTOP: sockets open, no answers) for 4 s mid-stream."""
    n, batch, seed = 1000, 50, 6
    x, y = data(n, 6)
    ck = tmp_path / "ck"
    with EmbeddedBroker() as b:
        b.create_topic("stall", partitions=1)
        produce_samples("stall", x[:500], y[:500], codec=BinaryCodec(D, K), bootstrap_servers=b.bootstrap_servers)
        serve = Serve(["--topic", "stall", "--bootstrap-servers", b.bootstrap_servers, "--group-id", "g-stall",
                       "--n-features", str(D), "--n-classes", str(K), "--arch", "8", "--batch-size", str(batch),
                       "--seed", str(seed), "--checkpoint-dir", str(ck), "--checkpoint-every-seconds", "0.5",
                       "--flush-after", "60", "--log-every", "0", "--json", *FAST_GROUP], tmp_path, "stall")
        try:
            serve.wait_for(lambda: learned_in(ck) == 500, 60, "the first 500 learned")
            with faults.paused(b.pid):
                time.sleep(4)
            produce_samples("stall", x[500:], y[500:], codec=BinaryCodec(D, K), bootstrap_servers=b.bootstrap_servers)
            serve.wait_for(lambda: learned_in(ck) == n, 60, "the rest learned")
            serve.proc.terminate()
            assert serve.join(30) == 0, serve.log()[-3000:]
        finally:
            serve.stop()
    result = serve.result()
    assert result["learned_samples"] == n and result["offsets"] == {"stall:0": n}
    assert result["key_checksum"] == key_checksum("stall", np.zeros(n), np.arange(n), np.zeros(n))
    assert same_model(load_serve_checkpoint(ck)[0], reference(x, y, batch, seed))


def test_a_topic_deleted_under_serve_is_an_error_naming_the_offsets(broker, tmp_path):
    from kafka.admin import KafkaAdminClient

    x, y = data(300, 3)
    broker.create_topic("doomed", partitions=1)
    produce_samples("doomed", x, y, codec=BinaryCodec(D, K), bootstrap_servers=broker.bootstrap_servers)
    ck = tmp_path / "ck"
    serve = Serve(["--topic", "doomed", "--bootstrap-servers", broker.bootstrap_servers, "--group-id", "g-doomed",
                   "--n-features", str(D), "--n-classes", str(K), "--arch", "8", "--batch-size", "50",
                   "--checkpoint-dir", str(ck), "--checkpoint-every-seconds", "0.5", "--log-every", "0", "--json",
                   *FAST_GROUP], tmp_path, "doomed")
    try:
        serve.wait_for(lambda: learned_in(ck) == 300, 60, "300 samples learned")
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
        admin.delete_topics(["doomed"])
        admin.close()
        assert serve.join(60) == 1
        assert re.search(r"error: partition `doomed:0` .*below offset 300", serve.log()), serve.log()[-3000:]
        assert "Traceback" not in serve.log()
    finally:
        serve.stop()


# ---- kill -9 at named moments ----------------------------------------------------------------------
def test_kill9_at_each_named_moment_then_resume_learns_every_sample_once(broker, tmp_path):
    """SIGKILL at start-up, inside the partition assignment, inside a checkpoint write (half a file
    on disk), between a checkpoint's rename and its directory sync, and before an offset commit;
    then a run to the end: every sample learned once, the model the uninterrupted one's."""
    n, batch, seed = 6000, 50, 4
    x, y = data(n, 4)
    broker.create_topic("moments", partitions=1)
    produce_samples("moments", x, y, codec=BinaryCodec(D, K), bootstrap_servers=broker.bootstrap_servers)
    ck = tmp_path / "ck"
    argv = ["--topic", "moments", "--bootstrap-servers", broker.bootstrap_servers, "--group-id", "g-moments",
            "--n-features", str(D), "--n-classes", str(K), "--arch", "8", "--batch-size", str(batch), "--seed",
            str(seed), "--checkpoint-dir", str(ck), "--checkpoint-every-batches", "1", "--flush-after", "60",
            "--log-every", "0", "--json", *FAST_GROUP]
    progress = []
    # each moment comes on the first pass, with most of the stream still to learn (a later pass may
    # never come: a run that has learned everything idles without checkpoints)
    for spec in ("startup:1", "assign:1", "checkpoint-write:1", "checkpoint-rename:1", "commit:1"):
        serve = Serve(argv, tmp_path, spec.replace(":", "-"), before=lambda spec=spec: faults.arm(spec))
        serve.proc.join(60)
        assert serve.proc.exitcode == -signal.SIGKILL, (spec, serve.proc.exitcode, serve.log()[-2000:])
        progress.append(learned_in(ck))
    assert progress == sorted(progress) and 0 < progress[-1] <= n, progress  # the commit comes late: all learned
    serve = Serve(argv + ["--idle-exit", "3"], tmp_path, "final")
    assert serve.join(120) == 0, serve.log()[-2000:]
    final = serve.result()
    assert final["learned_samples"] == n and final["offsets"] == {"moments:0": n}
    assert final["key_checksum"] == key_checksum("moments", np.zeros(n), np.arange(n), np.zeros(n))
    assert same_model(load_serve_checkpoint(ck)[0], reference(x, y, batch, seed))
    assert not list(ck.glob(".*.tmp"))  # the half-written file of the killed write was cleaned up
