"""`amstream serve` against the real embedded broker (Tansu): exactly once through kill -9 and
SIGTERM, malformed messages and the dead-letter topic, a broker that dies and comes back empty,
two learners splitting a group's partitions.

Serve runs as a child process forked from the test process (torch already imported: a fresh
interpreter costs ~15 s here) that calls the same `amstream.cli.main` the console script calls,
so `kill -9` and SIGTERM hit a real, separate process.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import signal
import time

import numpy as np
import pytest
import torch

from amstream import AMConfig, make_learner
from amstream.cli import main
from amstream.connectors.broker import EmbeddedBroker
from amstream.connectors.codec import BinaryCodec, JsonCodec, make_codec
from amstream.connectors.kafka import KafkaSource, make_producer, produce_samples
from amstream.serve import key_checksum, load_serve_checkpoint
from serve_child import FAST_GROUP, Serve, checksum_of, learned_in, read_ids

pytestmark = pytest.mark.kafka

D, K = 54, 7


def data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D)).astype(np.float32)
    return x, (np.abs(x[:, :K]).argmax(1)).astype(np.int64)


@pytest.fixture(scope="module", autouse=True)
def warm_parent():
    """Import in the parent what every child would import again: the first `torch.optim.Adam`
    imports torch._dynamo (and sympy), ~10 s on a busy 2-core machine."""
    make_learner(AMConfig(arch=(2, 2, 2)))
    import amstream.commands.serve  # noqa: F401


@pytest.fixture(scope="module")
def broker(tansu):
    with EmbeddedBroker() as b:
        yield b


def reference(x, y, batch_size, seed, hidden=(16,), predictions=None):
    """The uninterrupted run: the same minibatches in order (optionally the pre-update predictions)."""
    learner = make_learner(AMConfig(arch=(x.shape[1], *hidden, K), algo="am-adam", seed=seed))
    for i in range(0, len(x), batch_size):
        if predictions is not None:
            predictions.extend(learner.predict(torch.from_numpy(x[i:i + batch_size])).tolist())
        learner.learn(torch.from_numpy(x[i:i + batch_size]), torch.from_numpy(y[i:i + batch_size]))
    return learner


def read_topic(bootstrap, topic, n, timeout_s=20):
    src = KafkaSource(partitions=[(topic, 0)], bootstrap_servers=bootstrap, group_id=None,
                      on_assign=lambda parts: {tp: 0 for tp in parts})
    out = []
    with src:
        deadline = time.monotonic() + timeout_s
        while len(out) < n:
            assert time.monotonic() < deadline, f"{len(out)} of {n} messages in `{topic}`"
            out += src.next_batch(1000, 200)
        time.sleep(0.3)
        out += src.next_batch(1000, 200)
    return out


def assert_same_model(a, b):
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


# ---- exactly once ------------------------------------------------------------------------------
def test_kill9_and_sigterm_then_resume_learns_every_sample_exactly_once(broker, tmp_path):
    """kill -9 at three random moments, then SIGTERM, then a run to the end: every sample is
    learned once (count and id checksum), and the model is bit-for-bit the uninterrupted one."""
    n, batch, seed = 6000, 40, 3
    x, y = data(n, 1)
    broker.create_topic("kill", partitions=1)
    # the stream arrives in parts, one before each run, so that no run before the last can
    # reach its end however fast the machine is
    ends = iter([1520, 3000, 4520, 5000, n])  # whole minibatches of 40: the same batches as one run
    produced = [0]

    def produce_next():
        lo, hi = produced[0], next(ends)
        assert produce_samples("kill", x[lo:hi], y[lo:hi], codec=BinaryCodec(D, K),
                               bootstrap_servers=broker.bootstrap_servers) == hi - lo
        produced[0] = hi

    ck = tmp_path / "ck"
    argv = ["--topic", "kill", "--bootstrap-servers", broker.bootstrap_servers, "--group-id", "g-kill",
            "--n-features", str(D), "--n-classes", str(K), "--arch", "16", "--batch-size", str(batch),
            "--seed", str(seed), "--checkpoint-dir", str(ck), "--checkpoint-every-batches", "10",
            "--checkpoint-every-seconds", "0.5", "--flush-after", "1", "--log-every", "0", "--json", *FAST_GROUP]
    rnd = random.Random(0)
    progress = [0]
    for i in range(3):
        produce_next()
        serve = Serve(argv, tmp_path, f"kill{i}")
        try:
            base = learned_in(ck)
            serve.wait_for(lambda: learned_in(ck) > base, 60, "a new checkpoint")
            time.sleep(rnd.uniform(0.0, 0.3))
        finally:
            serve.proc.kill()  # SIGKILL: no checkpoint, no commit, no goodbye
        serve.proc.join(10)
        assert serve.proc.exitcode == -signal.SIGKILL
        progress.append(learned_in(ck))
    assert progress == sorted(progress) and progress[-1] < n, progress  # killed mid-stream, kept progress

    produce_next()
    serve = Serve(argv, tmp_path, "term")
    base = learned_in(ck)
    serve.wait_for(lambda: learned_in(ck) > base, 60, "a new checkpoint")
    serve.proc.terminate()  # SIGTERM: finish the minibatch, checkpoint, commit, exit 0
    assert serve.join() == 0, serve.log()[-2000:]
    term = serve.result()
    assert term["stop_reason"] == "SIGTERM" and term["learned_samples"] == learned_in(ck) < n

    produce_next()
    serve = Serve(argv + ["--idle-exit", "3"], tmp_path, "final")
    assert serve.join(120) == 0, serve.log()[-2000:]
    final = serve.result()
    assert final["learned_samples"] == n and final["bad_messages"] == 0
    assert final["offsets"] == {"kill:0": n} and final["carry"] == 0
    assert final["key_checksum"] == key_checksum("kill", np.zeros(n), np.arange(n), np.zeros(n))
    learner, _, _ = load_serve_checkpoint(ck)
    assert_same_model(learner, reference(x, y, batch, seed))


def test_malformed_messages_are_counted_dead_lettered_and_never_learned(broker, tmp_path, capsys):
    """A corpus of bad messages inside a valid stream: every one counted by reason and written to
    the dead-letter topic with its reason; the model equals the one trained on the valid ones."""
    n = 600
    x, y = data(n, 2)
    codec = JsonCodec(D, K)
    valid = codec.encode_many(x, y)
    row = [0.5] * D
    bad = [
        (b"not json", "malformed"),
        (b'{"x": [1, 2', "malformed"),
        (b"[1, 2, 3]", "malformed"),
        (b'{"y": 1}', "malformed"),
        (b"\xff\xfe\xfd", "malformed"),
        (b"", "malformed"),
        (json.dumps({"x": row[:-1], "y": 1}).encode(), "feature_count"),
        (json.dumps({"x": row[:-1] + [float("nan")], "y": 1}).encode(), "non_finite"),
        (json.dumps({"x": row[:-1] + [float("inf")], "y": 1}).encode(), "non_finite"),
        (json.dumps({"x": row[:-1] + ["a"], "y": 1}).encode(), "non_numeric"),
        (json.dumps({"x": row[:-1] + [None], "y": 1}).encode(), "non_numeric"),
        (json.dumps({"x": row, "y": "cat"}).encode(), "unknown_label"),
        (json.dumps({"x": row, "y": 2.5}).encode(), "unknown_label"),
        (json.dumps({"x": row, "y": 99}).encode(), "label_out_of_range"),
        (json.dumps({"x": row, "y": -1}).encode(), "label_out_of_range"),
        (json.dumps({"x": row}).encode(), "missing_label"),
        (json.dumps({"x": row, "y": 1, "pad": "z" * 3000}).encode(), "oversize"),
        (BinaryCodec(D, K).encode_one(row, 1)[:-4], "malformed"),               # truncated binary
        (BinaryCodec(D, K).encode_one(row[:-1] + [float("nan")], 1), "non_finite"),
        (BinaryCodec(D + 1, K).encode_one(row + [1.0], 1), "feature_count"),     # 55 features
        (BinaryCodec(D, 10).encode_one(row, 9), "label_out_of_range"),
    ]
    stream, positions = list(valid), sorted(random.Random(1).sample(range(n), len(bad)), reverse=True)
    for pos, (value, _) in zip(positions, bad):
        stream.insert(pos, value)
    broker.create_topic("dirty", partitions=1)
    producer = make_producer(broker.bootstrap_servers)
    for i, value in enumerate(stream):
        producer.send("dirty", value=value, key=b"k%d" % i)
    producer.flush()
    producer.close()

    ck = tmp_path / "ck"
    argv = ["serve", "--topic", "dirty", "--bootstrap-servers", broker.bootstrap_servers, "--group-id", "g-dirty",
            "--n-features", str(D), "--n-classes", str(K), "--arch", "16", "--batch-size", "32", "--seed", "5",
            "--max-message-bytes", "2000", "--dead-letter-topic", "dirty.dlq", "--predictions-topic", "dirty.pred",
            "--checkpoint-dir", str(ck),
            "--idle-exit", "3", "--flush-after", "1", "--log-every", "0", "--metrics-port", "0", "--json", *FAST_GROUP]
    assert main(argv) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    expected = {}
    for _, reason in bad:
        expected[reason] = expected.get(reason, 0) + 1
    assert result["learned_samples"] == n and result["bad_messages"] == len(bad)
    assert result["bad_messages_by_reason"] == expected
    assert result["offsets"] == {"dirty:0": len(stream)}
    # each one logged with topic, partition, offset and reason
    bad_offsets = sorted(i for i, v in enumerate(stream) if v in {b for b, _ in bad})
    for off in bad_offsets:
        assert re.search(rf"bad message at dirty:0@{off}: \w+", captured.err), off

    # the dead-letter topic holds each bad message once, unchanged, with its reason in a header
    dead = read_topic(broker.bootstrap_servers, "dirty.dlq", len(bad))
    assert len(dead) == len(bad)
    headers = [dict(r.headers) for r in dead]
    assert [int(h["amstream.offset"]) for h in headers] == bad_offsets
    by_offset = {off: v for off, v in zip(bad_offsets, [stream[o] for o in bad_offsets])}
    reason_of = {v: reason for v, reason in bad}
    for r, h in zip(dead, headers):
        off = int(h["amstream.offset"])
        assert r.value == by_offset[off] and r.key == b"k%d" % off
        assert h["amstream.reason"].decode() == reason_of[r.value] and h["amstream.topic"] == b"dirty"

    # the model is the one trained on the valid messages alone, and each prediction (made before
    # its minibatch was learned) is that model's, with the record's key kept
    expected_pred = []
    learner, _, _ = load_serve_checkpoint(ck)
    assert_same_model(learner, reference(x, y, 32, 5, predictions=expected_pred))
    preds = read_topic(broker.bootstrap_servers, "dirty.pred", n)
    assert len(preds) == n
    values = [json.loads(r.value) for r in preds]
    good_offsets = [i for i, v in enumerate(stream) if v not in {b for b, _ in bad}]
    assert [v["offset"] for v in values] == good_offsets
    assert [r.key for r in preds] == [b"k%d" % o for o in good_offsets]
    assert [v["y_pred"] for v in values] == expected_pred and [v["y"] for v in values] == y.tolist()
    assert [v["step"] for v in values] == [i // 32 for i in range(n)]
    assert all(0 < v["proba"] <= 1 for v in values)


# ---- faults ------------------------------------------------------------------------------------
def test_broker_lost_and_restarted_empty_learner_waits_and_keeps_its_state(tansu, tmp_path):
    """The in-memory broker dies (serve reports and waits), comes back without the topic (serve
    waits), the topic returns with new records at offsets below the checkpoint's (serve reports
    the data loss and, told to with `--on-data-loss continue`, learns them); SIGTERM then exits 0
    with nothing lost. (By default the data loss stops serve: tests/test_serve_faults.py.)"""
    x, y = data(1300, 4)
    codec = BinaryCodec(D, K)
    b = EmbeddedBroker().start()
    port = int(b.bootstrap_servers.rsplit(":", 1)[1])
    servers = b.bootstrap_servers
    serve = None
    try:
        b.create_topic("r", partitions=1)
        produce_samples("r", x[:1000], y[:1000], codec=codec, bootstrap_servers=servers)
        ck = tmp_path / "ck"
        serve = Serve(["--topic", "r", "--bootstrap-servers", servers, "--group-id", "g-r", "--n-features", str(D),
                       "--n-classes", str(K), "--arch", "16", "--batch-size", "50", "--checkpoint-dir", str(ck),
                       "--checkpoint-every-seconds", "0.5", "--flush-after", "0.5", "--log-every", "0", "--json",
                       "--metrics-port", "0", "--on-data-loss", "continue",
                       "--consumer-config", "reconnect_backoff_max_ms=1000", *FAST_GROUP], tmp_path, "restart")
        serve.wait_for(lambda: learned_in(ck) == 1000, 60, "1000 samples learned")
        # the metrics endpoint of the running service
        url = re.search(r"metrics at (http://\S+/metrics)", serve.log()).group(1)
        import urllib.request

        def scrape():
            return urllib.request.urlopen(url, timeout=5).read().decode()

        serve.wait_for(lambda: "amstream_checkpoint_age_seconds NaN" not in (body := scrape())
                       and "amstream_consumer_lag{" in body, 10, "a checkpoint age and the lag")
        body = scrape()
        assert "amstream_model_learned_samples 1000.0" in body and "amstream_learned_samples_total 1000.0" in body
        assert 'amstream_consumer_lag{partition="0",topic="r"} 0.0' in body
        assert "amstream_step_seconds_count 20.0" in body and "amstream_model_step 20.0" in body
        assert float(re.search(r"^amstream_checkpoint_age_seconds (\S+)$", body, re.M).group(1)) >= 0
        for name in ("samples_per_second", 'prequential_accuracy{window="recent"}', 'prequential_loss{window="total"}',
                     "decode_seconds_total", "checkpoint_seconds_bucket", "checkpoints_total"):
            assert f"amstream_{name}" in body, name
        b.stop()
        serve.wait_for(lambda: "Kafka broker unreachable" in serve.log(), 30, "an `unreachable` report")
        assert learned_in(ck) == 1000
        b = EmbeddedBroker(port=port).start()  # the same address, empty: the topic is gone
        time.sleep(2)
        assert serve.proc.is_alive() and learned_in(ck) == 1000
        b.create_topic("r", partitions=1)
        produce_samples("r", x[1000:], y[1000:], codec=codec, bootstrap_servers=servers)
        serve.wait_for(lambda: learned_in(ck) == 1300, 90, "the new records learned")
        assert "the broker lost its data" in serve.log()
        serve.proc.terminate()
        assert serve.join() == 0
        result = serve.result()
        # Tansu may recreate `r` itself, with its default partition count, on the consumer's
        # metadata request: count the new records wherever they went
        assert result["learned_samples"] == 1300 and sum(result["offsets"].values()) == 300
        new_ids = read_ids(servers, "r", len(result["offsets"]), 300, codec)
        assert result["key_checksum"] == (key_checksum("r", np.zeros(1000), np.arange(1000), np.zeros(1000))
                                          + checksum_of("r", new_ids)) % 2**64
    finally:
        if serve is not None:
            serve.stop()
        b.stop()


def test_unreachable_broker_at_start_is_retried(tmp_path):
    """No broker at start: serve logs it clearly and keeps retrying until told to stop."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = Serve(["--topic", "t", "--bootstrap-servers", f"127.0.0.1:{port}", "--n-features", "4", "--n-classes",
                   "2", "--log-every", "0", "--json"], tmp_path, "nobroker")
    try:
        serve.wait_for(lambda: "the source failed" in serve.log(), 30, "a failed connection attempt")
        assert f"cannot reach the Kafka broker at `127.0.0.1:{port}`" in serve.log()
        serve.proc.terminate()
        assert serve.join(30) == 0
        assert serve.result()["learned_samples"] == 0
    finally:
        serve.stop()


def test_two_learners_split_the_partitions_and_hand_over(broker, tmp_path):
    """Two learners in one group each get some partitions and learn them; when one stops, the
    other takes its partitions at the committed offsets. Together: every sample exactly once."""
    servers = broker.bootstrap_servers
    broker.create_topic("split", partitions=4)
    codec = BinaryCodec(D, K)
    x, y = data(4000, 5)

    def args(name):
        return ["--topic", "split", "--bootstrap-servers", servers, "--group-id", "g-split", "--n-features", str(D),
                "--n-classes", str(K), "--arch", "16", "--batch-size", "25", "--checkpoint-dir", str(tmp_path / name),
                "--checkpoint-every-seconds", "0.5", "--flush-after", "0.5", "--log-every", "0", "--json", *FAST_GROUP]

    a = Serve(args("a"), tmp_path, "a")
    b = Serve(args("b"), tmp_path, "b")
    try:
        def split_evenly():
            pa, pb = a.assignments(), b.assignments()
            return pa and pb and len(pa[-1]) == 2 and len(pb[-1]) == 2 and sorted(pa[-1] + pb[-1]) == [0, 1, 2, 3]

        a.wait_for(split_evenly, 60, "two partitions each")
        keys = [b"s%d" % i for i in range(4000)]
        produce_samples("split", x[:2000], y[:2000], codec=codec, bootstrap_servers=servers, keys=keys[:2000])
        a.wait_for(lambda: learned_in(tmp_path / "a") + learned_in(tmp_path / "b") == 2000, 60, "wave 1 learned")
        assert learned_in(tmp_path / "a") > 0 and learned_in(tmp_path / "b") > 0
        a.proc.terminate()  # a leaves: checkpoints, commits its offsets, hands its partitions over
        assert a.join() == 0
        b.wait_for(lambda: len(b.assignments()[-1]) == 4, 60, "b taking all partitions")
        produce_samples("split", x[2000:], y[2000:], codec=codec, bootstrap_servers=servers, keys=keys[2000:])
        b.wait_for(lambda: learned_in(tmp_path / "a") + learned_in(tmp_path / "b") >= 4000, 60, "wave 2 learned")
        time.sleep(1.0)  # nothing more may arrive
        b.proc.terminate()
        assert b.join() == 0
        ra, rb = a.result(), b.result()
        assert ra["learned_samples"] + rb["learned_samples"] == 4000
        assert rb["learned_samples"] > 2000 - ra["learned_samples"]  # b learned a's share of wave 2
        ids = read_ids(servers, "split", 4, 4000, codec)
        assert (ra["key_checksum"] + rb["key_checksum"]) % 2**64 == checksum_of("split", ids)
    finally:
        a.stop()
        b.stop()


# ---- the broker and produce commands -------------------------------------------------------------
def _broker_child(out_path):
    import sys

    f = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(f, 1)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    os._exit(main(["broker", "--port", "0", "--topic", "d:2", "--json"]))


def test_broker_and_produce_commands(tansu, tmp_path, capsys):
    out = tmp_path / "broker.out"
    proc = multiprocessing.get_context("fork").Process(target=_broker_child, args=(str(out),), daemon=True)
    proc.start()
    try:
        deadline = time.monotonic() + 30
        while not (out.exists() and out.read_text().strip()):
            assert proc.is_alive() and time.monotonic() < deadline
            time.sleep(0.1)
        info = json.loads(out.read_text())
        servers = info["bootstrap_servers"]
        assert info["topics"] == {"d": 2}
        argv = ["produce", "--dataset", "digits", "--topic", "d", "--bootstrap-servers", servers, "--codec",
                "binary", "--samples-per-message", "8", "--limit", "200", "--shuffle", "--json"]
        assert main(argv) == 0
        produced = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert produced["samples"] == 200 and produced["messages"] == 25 and produced["n_features"] == 64
        ids = read_ids(servers, "d", 2, 25, make_codec("binary", 64, 10))
        assert len(ids) == 200 and set(ids[:, 0]) == {0, 1}  # keys spread the messages over both partitions
        assert main(["serve", "--topic", "d", "--bootstrap-servers", servers, "--dataset", "digits", "--arch", "32",
                     "--batch-size", "16", "--idle-exit", "2", "--flush-after", "0.5", "--log-every", "0", "--json",
                     *FAST_GROUP]) == 0
        served = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert served["learned_samples"] == 200 and served["arch"] == "64-32-10"
        assert served["key_checksum"] == checksum_of("d", ids)
        proc.terminate()
        proc.join(15)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
