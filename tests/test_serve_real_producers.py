"""`amstream serve` against producers that are not amstream's, on the real embedded broker: every
Kafka compression codec, errors no retry can fix (a codec library missing, a corrupt record batch,
a missing topic with auto-create off) stopping with one message after a checkpoint, SIGTERM while
polling and during a broker outage, and the bare command on the default port 9092."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from amstream import AMConfig, make_learner
from amstream.cli import main
from amstream.connectors.broker import EmbeddedBroker
from amstream.connectors.codec import BinaryCodec, JsonCodec
from amstream.serve import key_checksum
from serve_child import FAST_GROUP, Serve, learned_in

pytestmark = pytest.mark.kafka

D, K = 10, 4
X = np.random.default_rng(21).standard_normal((400, D)).astype(np.float32)
Y = (np.abs(X[:, :K]).argmax(1)).astype(np.int64)


@pytest.fixture(scope="module", autouse=True)
def warm_parent():
    """Import in the parent what every forked child would import again (torch._dynamo, ~10 s)."""
    make_learner(AMConfig(arch=(2, 2, 2)))
    import amstream.commands.serve  # noqa: F401


@pytest.fixture(scope="module")
def broker(tansu):
    with EmbeddedBroker() as b:
        yield b


def produce(servers, topic, values, **config):
    """With kafka-python itself, the way a foreign producer would (``compression_type`` etc.)."""
    from kafka import KafkaProducer  # after amstream.connectors.kafka, which quiets its import warnings

    producer = KafkaProducer(bootstrap_servers=servers, linger_ms=20, **config)
    for v in values:
        producer.send(topic, v)
    producer.flush()
    producer.close()


def serve_args(topics, servers, *extra):
    return ["--topic", topics, "--bootstrap-servers", servers, "--batch-size", "50", "--arch", "16",
            "--log-every", "0", "--flush-after", "0.5", "--json", *FAST_GROUP, *extra]


def ids_checksum(topic, n):
    return key_checksum(topic, np.zeros(n), np.arange(n), np.zeros(n))


def test_every_compression_codec_is_learned(broker, capsys):
    """gzip, snappy, lz4 and zstd batches, produced by kafka-python, all learned; sizes and classes
    taken from the stream (no size flags)."""
    codecs = ("gzip", "snappy", "lz4", "zstd")
    servers = broker.bootstrap_servers
    values = BinaryCodec(D, K).encode_many(X[:300], Y[:300]) + JsonCodec(D, K).encode_many(X[300:], Y[300:])
    for codec in codecs:
        broker.create_topic(f"z-{codec}")
        produce(servers, f"z-{codec}", values, compression_type=codec)
    topics = ",".join(f"z-{c}" for c in codecs)
    assert main(["serve", *serve_args(topics, servers, "--group-id", "g-codecs", "--idle-exit", "3")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["offsets"] == {f"z-{c}:0": 400 for c in codecs}
    assert out["learned_samples"] == 1600 and out["bad_messages"] == 0
    assert out["key_checksum"] == sum(ids_checksum(f"z-{c}", 400) for c in codecs) % 2**64
    assert (out["n_features"], out["n_classes"], out["arch"]) == (D, K, f"{D}-16-{K}")


def _without_snappy():  # in the child: as on a machine where python-snappy is not installed
    import kafka.codec

    kafka.codec.snappy = None


def test_a_missing_codec_library_stops_with_one_message_and_the_restart_resumes(broker, tmp_path, capsys):
    """The issue's case: snappy batches where the library is missing. Serve learns what came before,
    checkpoints, stops with one error line and exit 1 (it used to log a warning and wait forever);
    with the library back, a restart learns the rest, each sample once."""
    servers = broker.bootstrap_servers
    broker.create_topic("snappy-late")
    values = BinaryCodec(D, K).encode_many(X, Y)
    produce(servers, "snappy-late", values[:300])
    produce(servers, "snappy-late", values[300:], compression_type="snappy")
    ck = tmp_path / "ck"
    args = serve_args("snappy-late", servers, "--group-id", "g-snappy", "--n-features", str(D), "--n-classes",
                      str(K), "--checkpoint-dir", str(ck), "--idle-exit", "3")
    serve = Serve(args, tmp_path, "nosnappy", before=_without_snappy)
    try:
        assert serve.join(60) == 1
    finally:
        serve.stop()
    errors = [line for line in serve.log().splitlines() if line.startswith("amstream serve: error:")]
    assert len(errors) == 1, serve.log()[-3000:]
    assert "UnsupportedCodecError" in errors[0] and "snappy" in errors[0] and "kafka-python[" in errors[0]
    failed = serve.result()
    assert failed["learned_samples"] == 300 and failed["offsets"] == {"snappy-late:0": 300}
    assert failed["error"] and failed["stop_reason"].startswith("error:")
    assert learned_in(ck) == 300

    assert main(["serve", *args]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["learned_samples"] == 400 and out["learned_samples_this_run"] == 100
    assert out["key_checksum"] == ids_checksum("snappy-late", 400)


def _corrupt_next_batches():
    """Flip a byte of every record batch kafka-python builds after its CRC is computed: the broker
    stores what it gets, and consumers find a batch that fails its CRC check."""
    import kafka.record.default_records as records

    build = records.DefaultRecordBatchBuilder.build

    def corrupt(self):
        buf = build(self)
        buf[-3] ^= 0xFF
        return buf

    records.DefaultRecordBatchBuilder.build = corrupt
    return build


def test_a_corrupt_record_batch_stops_cleanly(broker, tmp_path, capsys):
    import kafka.record.default_records as records

    servers = broker.bootstrap_servers
    broker.create_topic("corrupt")
    values = BinaryCodec(D, K).encode_many(X, Y)
    produce(servers, "corrupt", values[:200])
    original = _corrupt_next_batches()
    try:
        produce(servers, "corrupt", values[200:220])
    finally:
        records.DefaultRecordBatchBuilder.build = original
    produce(servers, "corrupt", values[220:])
    ck = tmp_path / "ck"
    serve = Serve(serve_args("corrupt", servers, "--group-id", "g-corrupt", "--checkpoint-dir", str(ck),
                             "--idle-exit", "3"), tmp_path, "corrupt")
    try:
        assert serve.join(60) == 1
    finally:
        serve.stop()
    error = [line for line in serve.log().splitlines() if line.startswith("amstream serve: error:")]
    assert len(error) == 1 and "CorruptRecordError" in error[0] and "failed crc check" in error[0], serve.log()
    assert "cannot be read past it" in error[0]
    assert serve.result()["learned_samples"] == 200 and learned_in(ck) == 200


def test_a_missing_topic_with_auto_create_off_stops_at_once(broker, capsys):
    t0 = time.monotonic()
    argv = serve_args("never-made", broker.bootstrap_servers, "--group-id", "g-none", "--consumer-config",
                      "allow_auto_create_topics=false")
    assert main(["serve", *argv]) == 1
    assert time.monotonic() - t0 < 20
    err = capsys.readouterr().err
    assert re.search(r"amstream serve: error: topic `never-made` does not exist at `127\.0\.0\.1:\d+` and "
                     r"auto-create is off \(`allow_auto_create_topics=False`\)", err), err


def test_sigterm_while_polling_and_during_a_broker_outage(tansu, tmp_path):
    """A quiet stream (connected, polling) and a dead broker (reconnecting): SIGTERM ends serve within
    seconds, exit 0, with the checkpoint of everything learned."""
    b = EmbeddedBroker().start()
    try:
        servers = b.bootstrap_servers
        b.create_topic("quiet")
        produce(servers, "quiet", BinaryCodec(D, K).encode_many(X[:200], Y[:200]))
        for state in ("polling", "outage"):
            ck = tmp_path / f"ck-{state}"
            serve = Serve(serve_args("quiet", servers, "--group-id", f"g-{state}", "--n-features", str(D),
                                     "--n-classes", str(K), "--checkpoint-dir", str(ck),
                                     "--checkpoint-every-seconds", "0.5"), tmp_path, state)
            try:
                serve.wait_for(lambda: learned_in(ck) == 200, 60, "200 samples learned")
                if state == "outage":
                    b.stop()  # while serve polls: its client now reconnects, and serve says why nothing comes
                    serve.wait_for(lambda: "Kafka broker unreachable" in serve.log(), 30, "the outage reported")
                else:
                    time.sleep(1.0)
                t0 = time.monotonic()
                serve.proc.terminate()  # SIGTERM
                assert serve.join(20) == 0, serve.log()[-3000:]
                assert time.monotonic() - t0 < 8, f"{state}: {time.monotonic() - t0:.1f} s after SIGTERM"
                result = serve.result()
                assert result["stop_reason"] == "SIGTERM" and result["learned_samples_this_run"] == 200
                assert learned_in(ck) == 200
            finally:
                serve.stop()
    finally:
        b.stop()


def test_the_bare_command_on_the_default_port(tansu, tmp_path):
    """Exactly `amstream produce --dataset digits --topic samples` and `amstream serve --topic samples`
    (bounded by `--idle-exit`), the console scripts in subprocesses, against a broker on localhost:9092."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 9092))
        except OSError as exc:
            pytest.skip(f"port 9092 is held by another process ({exc}); this test needs it free for the "
                        "embedded broker")
    amstream = Path(sys.executable).with_name("amstream")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with EmbeddedBroker(port=9092):
        produced = subprocess.run([str(amstream), "produce", "--dataset", "digits", "--topic", "samples"],
                                  cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert produced.returncode == 0, produced.stderr
        n = int(re.search(r"produced ([\d,]+) samples", produced.stdout).group(1).replace(",", ""))
        assert "to localhost:9092" in produced.stderr
        served = subprocess.run([str(amstream), "serve", "--topic", "samples", "--idle-exit", "5"],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert served.returncode == 0, served.stderr[-3000:]
    assert re.search(rf"learned {n:,} samples in this run \({n:,} in all", served.stdout), served.stdout
    assert "0 bad messages" in served.stdout
    assert "from samples @ localhost:9092 (group amstream)" in served.stderr
    assert "sized by the first valid message" in served.stderr
    assert "the model now has 10 classes" in served.stderr  # digits: labels 0..9, grown as they came
