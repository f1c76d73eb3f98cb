"""Kafka source and sinks over kafka-python 3.x.

`KafkaSource` (a `GroupSource`) reads records in a consumer group with auto-commit off; the
caller commits the offsets it has checkpointed. `KafkaSink` (a `Sink`) writes messages
(predictions); `DeadLetterSink` writes rejected records with their reason in headers.
`make_producer` / `produce_samples` serve ``amstream produce``.

Offsets are always the **next** offset to read (see `amstream.connectors.records`).

The loop a service runs on top (the order matters: quix-streams' ``Checkpoint.commit``)::

    source = KafkaSource(["samples"], bootstrap_servers=..., group_id="amstream",
                         on_assign=load_offsets_from_checkpoint, on_revoke=checkpoint_now)
    while running:
        records = source.next_batch(max_records=512, timeout_ms=500)
        batch = codec.decode_records(records)        # accepted samples + rejections
        dead_letters.write_rejections(records, batch.rejections)
        ... predict, learn, predictions.write_batch(...) ...
        every N batches:
            predictions.flush(); dead_letters.flush()  # sinks first
            offsets = source.snapshot()               # next offsets of everything handed out
            write checkpoint {state, offsets}         # atomically
            source.commit(offsets)                    # then commit; a failed commit only logs

Rebalances: the hooks run inside ``next_batch`` (on kafka-python's I/O thread, while the caller
waits in ``next_batch``), so they see the caller's state at a batch boundary.

* ``on_revoke(partitions) -> offsets or None``: called before ``partitions`` go to another
  member (and on `close`). Checkpoint there and *return* the offsets to commit; the source commits
  them before giving the partitions up. ``source.snapshot()`` and ``assignment()`` are fine in a
  hook; blocking calls (``commit``, ``committed``, ``next_batch``) are not: kafka-python cannot
  block on its own I/O thread. Records of revoked partitions not yet returned are dropped, so
  the batch ``next_batch`` returns never mixes in partitions this member no longer owns.
* ``on_assign(partitions) -> offsets or None``: called with newly assigned partitions; return the
  offsets to start from (e.g. those of the newest checkpoint). Partitions not in the returned dict
  start at the group's committed offset, or at the beginning when it has none.
* Partitions *lost* (the member was evicted) go to ``on_revoke`` too, but nothing is committed.

Errors: `next_batch` raises `StreamError` (see `as_stream_error`): ``transient`` for what waiting
can fix (a broker that is down), permanent for the rest (a codec library missing, a corrupt batch,
a refused authorization, a missing topic while ``allow_auto_create_topics=False``).

Kafka-side quirks of the embedded broker (Tansu) are listed in `amstream.connectors.broker`.
"""
from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
import warnings
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from amstream.connectors.records import (
    Headers,
    Offsets,
    OffsetTracker,
    Record,
    TopicPartition,
    check_offsets,
)
from amstream.connectors.base import AssignHook, GroupSource, RevokeHook, Sink
from amstream.exceptions import ConfigError, OffsetError, OffsetRewindError, StreamError
from amstream.retry import Backoff, retry

with warnings.catch_warnings():
    # kafka-python 3.0.12 loads its protocol schemas with importlib.resources' deprecated
    # read_text/open_text at import: ~200 DeprecationWarnings that are not ours to fix
    warnings.filterwarnings("ignore", r"(read|open)_text is deprecated", DeprecationWarning)
    import kafka.errors as kerrors
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
    from kafka.structs import OffsetAndMetadata
    from kafka.structs import TopicPartition as KafkaTopicPartition

__all__ = [
    "CONSUMER_DEFAULTS",
    "DeadLetterSink",
    "KafkaSink",
    "KafkaSource",
    "PRODUCER_DEFAULTS",
    "connect_with_retry",
    "create_topic",
    "make_producer",
    "parse_bootstrap_servers",
    "probe_brokers",
    "produce_samples",
]

log = logging.getLogger(__name__)


CONSUMER_DEFAULTS: Dict[str, Any] = {
    "enable_auto_commit": False,  # the service commits what it has checkpointed
    "auto_offset_reset": "earliest",  # Tansu's "latest" is wrong; checkpoints give the rest
    "session_timeout_ms": 6000,  # Tansu joins take ~session_timeout/2; Kafka's minimum is 6000
    "heartbeat_interval_ms": 1500,
    "max_poll_records": 5000,
    "max_partition_fetch_bytes": 2 * 1024 * 1024,  # bigger: no faster, longer I/O-thread stalls
    "fetch_max_bytes": 32 * 1024 * 1024,
    "fetch_max_wait_ms": 100,
    "request_timeout_ms": 30000,
}
"""Consumer settings `KafkaSource` starts from (``consumer_config`` overrides them)."""

PRODUCER_DEFAULTS: Dict[str, Any] = {
    "linger_ms": 20,
    "batch_size": 256 * 1024,
    "max_request_size": 4 * 1024 * 1024,
}
"""Producer settings `make_producer` starts from (acks=all and idempotence stay kafka-python's)."""

_BOOTSTRAP_ERRORS = (kerrors.KafkaTimeoutError, kerrors.KafkaConnectionError)
_COMMIT_ERRORS = (
    kerrors.CommitFailedError,
    kerrors.RebalanceInProgressError,
    kerrors.IllegalGenerationError,
    kerrors.UnknownMemberIdError,
    kerrors.CoordinatorNotAvailableError,
    kerrors.NotCoordinatorError,
    kerrors.KafkaTimeoutError,
)

_HINTS = (
    (kerrors.UnsupportedCodecError,
     "the records are compressed with a codec whose library is missing here; amstream depends on "
     "kafka-python's codec extras: `pip install 'kafka-python[crc32c,lz4,snappy,zstd]'`"),
    (kerrors.CorruptRecordError, "a record batch is corrupt (failed its CRC check): the partition cannot be "
                                 "read past it"),
    (kerrors.AuthorizationError, "the broker refused this client: grant it Read on the topic and the group"),
    (kerrors.UnsupportedVersionError, "the broker does not speak a protocol version this client needs"),
)


def _describe(exc: BaseException) -> str:
    """``"Name: message"`` once (kafka-python's errors already start with their class name)."""
    text, name = str(exc), type(exc).__name__
    return text if text.startswith(name) else f"{name}: {text}"


def as_stream_error(exc: BaseException, what: str) -> StreamError:
    """The `StreamError` for an exception a kafka-python call raised.

    Retriable Kafka errors (timeouts, a node not ready, a leader moving, a rebalance) are
    transient, and so is ``IllegalStateError`` (a rebalance race). Everything else is permanent:
    kafka-python cannot get past a record batch it failed to unpack (a codec library missing, a
    failed CRC, a corrupt batch; kafka-python 3.0.12's next ``poll()`` then spins on that batch
    forever), and authorization, version or configuration errors do not change by waiting.
    """
    if isinstance(exc, StreamError):
        return exc
    if isinstance(exc, (kerrors.IllegalStateError,)) or (isinstance(exc, kerrors.KafkaError) and exc.retriable):
        return StreamError(f"{what}: {_describe(exc)}", transient=True)
    hint = next((text for kind, text in _HINTS if isinstance(exc, kind)), "")
    cause = exc.__cause__ if isinstance(exc, kerrors.KafkaError) and exc.__cause__ is not None else None
    detail = _describe(exc) + (f" (from {_describe(cause)})" if cause else "")
    return StreamError(f"{what}: {detail}" + (f"; {hint}" if hint else ""), transient=False)



def _tp(t: KafkaTopicPartition) -> TopicPartition:
    return (t.topic, t.partition)


def _ktp(tp: TopicPartition) -> KafkaTopicPartition:
    return KafkaTopicPartition(tp[0], tp[1])


def parse_bootstrap_servers(bootstrap_servers: str | Sequence[str]) -> List[tuple[str, int]]:
    """``"a:9092,b"`` or ``["a:9092", "b"]`` -> ``[("a", 9092), ("b", 9092)]`` (port 9092 when
    absent; a ``scheme://`` prefix and IPv6 brackets are dropped).

    >>> parse_bootstrap_servers("PLAINTEXT://[::1]:9093, localhost")
    [('::1', 9093), ('localhost', 9092)]
    """
    items = [bootstrap_servers] if isinstance(bootstrap_servers, str) else list(bootstrap_servers)
    out = []
    for item in items:
        for server in str(item).split(","):
            server = server.strip()
            if not server:
                continue
            if "://" in server:
                server = server.split("://", 1)[1]
            host, sep, port = server.rpartition(":")
            if not sep or "]" in port or (not host.endswith("]") and ":" in host):
                host, port = server, "9092"  # no port (or a bare IPv6 address)
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"bad bootstrap server `{server}` in `{bootstrap_servers}`: the port must be 1-65535")
            out.append((host.strip("[]") or "localhost", int(port)))
    if not out:
        raise ConfigError(f"no bootstrap server in `{bootstrap_servers!r}`")
    return out


def _connect_any(servers: List[tuple[str, int]], timeout_s: float) -> None:
    """One TCP connection to the first server that accepts; OSError naming each failure otherwise."""
    errors = []
    for host, port in servers:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            return
        except OSError as exc:
            errors.append(f"{host}:{port}: {exc}")
    raise ConnectionError("; ".join(errors))


def probe_brokers(bootstrap_servers: str | Sequence[str]) -> Optional[str]:
    """None when a bootstrap server accepts a TCP connection within a second, else what failed."""
    try:
        _connect_any(parse_bootstrap_servers(bootstrap_servers), 1.0)
        return None
    except OSError as exc:
        return f"Kafka broker unreachable ({exc})"


def _wait_for_tcp(bootstrap_servers: str | Sequence[str], timeout_s: float,
                  stop: Optional[threading.Event] = None) -> None:
    """Until one bootstrap server accepts a TCP connection; ``KafkaTimeoutError`` after ``timeout_s``.

    Probing before building a client matters: a ``KafkaConsumer`` whose bootstrap fails in
    its constructor leaves its I/O thread running (kafka-python 3.0.12), one per retry.
    """
    servers = parse_bootstrap_servers(bootstrap_servers)
    try:
        retry(lambda: _connect_any(servers, min(1.0, max(0.05, timeout_s))), transient=OSError,
              backoff=Backoff(0.05, 0.2), timeout_s=timeout_s, stop=stop)
    except OSError as exc:
        raise kerrors.KafkaTimeoutError(
            f"Unable to bootstrap from {bootstrap_servers} (no TCP connection: {exc})"
        ) from None


def connect_with_retry(
    factory: Callable[[], Any],
    *,
    bootstrap_servers: str | Sequence[str],
    what: str,
    attempts: int = 5,
    backoff_s: float = 0.5,
    max_backoff_s: float = 10.0,
    probe_timeout_s: Optional[float] = 10.0,
    stop: Optional[threading.Event] = None,
) -> Any:
    """Call ``factory()`` (which builds a kafka-python client) once the broker answers.

    Each attempt first waits up to ``probe_timeout_s`` for a bootstrap server to accept a TCP
    connection (``None``: no probe), then calls ``factory()``; kafka-python 3.x itself raises
    ``KafkaTimeoutError("Unable to bootstrap ...")`` after the client's ``bootstrap_timeout_ms``.
    Failed attempts are retried ``attempts`` times in all, with exponential backoff (`retry`);
    then this raises a transient `StreamError` naming the servers, the attempts and the time spent.
    """
    start = time.monotonic()
    reached = []  # attempts whose TCP probe got through (the Kafka handshake failed after it)

    def attempt() -> Any:
        if probe_timeout_s is not None:
            _wait_for_tcp(bootstrap_servers, probe_timeout_s, stop)
            reached.append(True)
        return factory()

    def on_retry(exc: BaseException, n: int, delay: float) -> None:
        log.warning("%s: Kafka broker `%s` unreachable (attempt %d of %d: %s); retrying in %.1f s",
                    what, bootstrap_servers, n, attempts, exc, delay)

    try:
        return retry(attempt, transient=_BOOTSTRAP_ERRORS, attempts=attempts, stop=stop,
                     backoff=Backoff(backoff_s, max(backoff_s, max_backoff_s)), on_retry=on_retry)
    except _BOOTSTRAP_ERRORS as exc:
        hint = ("; it accepts TCP connections but drops the Kafka handshake: a broker still starting, or "
                "one that needs TLS or SASL (set `security_protocol`, `sasl_mechanism`, ... in the client's "
                "config)") if reached else ""
        raise StreamError(
            f"{what}: cannot reach the Kafka broker at `{bootstrap_servers}` after {attempts} "
            f"attempt(s) in {time.monotonic() - start:.1f} s: {exc}{hint}", transient=True
        ) from exc


def create_topic(
    name: str,
    *,
    partitions: int = 1,
    bootstrap_servers: str | Sequence[str],
    replication_factor: int = 1,
    exist_ok: bool = True,
    timeout_ms: int = 10000,
    **client_config: Any,
) -> bool:
    """Create a topic with kafka-python's admin client (``client_config``: its settings, e.g. TLS
    and SASL); False when it already existed."""
    if not isinstance(partitions, int) or partitions < 1:
        raise ConfigError(f"`partitions` must be an int >= 1, got `{partitions!r}`")
    admin = connect_with_retry(
        lambda: KafkaAdminClient(
            bootstrap_servers=bootstrap_servers,
            **{"client_id": "amstream-admin", "bootstrap_timeout_ms": timeout_ms, **client_config},
        ),
        bootstrap_servers=bootstrap_servers,
        what="create_topic",
        attempts=2,
        probe_timeout_s=timeout_ms / 1000,
    )
    try:
        admin.create_topics(
            [NewTopic(name, partitions, replication_factor)], timeout_ms=timeout_ms
        )
        log.info("created topic `%s` with %d partition(s)", name, partitions)
        return True
    except kerrors.TopicAlreadyExistsError:
        if not exist_ok:
            raise
        return False
    finally:
        admin.close()


# ================================================================================================
class _Listener(AsyncConsumerRebalanceListener):
    """Bridges kafka-python's rebalance callbacks to the source's hooks (runs on the I/O thread)."""

    def __init__(self, source: "KafkaSource") -> None:
        self.source = source

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.source._handle_revoke(sorted(_tp(t) for t in revoked), lost=False)

    async def on_partitions_lost(self, lost: Any) -> None:
        await self.source._handle_revoke(sorted(_tp(t) for t in lost), lost=True)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.source._handle_assign(sorted(_tp(t) for t in assigned))


class KafkaSource(GroupSource):
    """Records from Kafka topics, in a consumer group, with offsets the caller commits.

    Parameters
    ----------
    topics
        Topics to subscribe to (group-managed assignment).
    bootstrap_servers
        ``"host:port"`` or a list of them.
    group_id
        Consumer group; commits are stored under it.
    on_assign, on_revoke
        Rebalance hooks, see the module docstring.
    partitions
        Instead of subscribing, read exactly these ``(topic, partition)``\\ s (no group
        membership, no rebalances; commits still go to ``group_id``). ``on_assign`` is called
        once with them when the source opens.
    consumer_config
        kafka-python ``KafkaConsumer`` settings over `CONSUMER_DEFAULTS`.
    connect_attempts, connect_backoff_s, bootstrap_timeout_ms
        Retry when the broker is unreachable at start: ``connect_attempts`` tries of
        ``bootstrap_timeout_ms`` each, with exponential backoff from ``connect_backoff_s``.

    Nothing connects until `open` (or the first `next_batch`, or ``with``).
    """

    def __init__(
        self,
        topics: Sequence[str] = (),
        *,
        bootstrap_servers: str | Sequence[str],
        group_id: Optional[str],
        on_assign: Optional[AssignHook] = None,
        on_revoke: Optional[RevokeHook] = None,
        partitions: Optional[Sequence[TopicPartition]] = None,
        consumer_config: Optional[Mapping[str, Any]] = None,
        connect_attempts: int = 5,
        connect_backoff_s: float = 0.5,
        bootstrap_timeout_ms: int = 10000,
        client_id: str = "amstream",
    ) -> None:
        if isinstance(topics, str):
            raise ConfigError(f"`topics` must be a list of topic names, got the string `{topics}`")
        if not topics and not partitions:
            raise ConfigError("give `topics` to subscribe to or `partitions` to read")
        if topics and partitions:
            raise ConfigError("give either `topics` (group-managed) or `partitions` (manual), not both")
        config = dict(CONSUMER_DEFAULTS)
        config.update(consumer_config or {})
        if config.get("enable_auto_commit"):
            raise ConfigError("`enable_auto_commit` must stay False: the service commits checkpointed offsets")
        for key in ("key_deserializer", "value_deserializer"):
            if config.get(key) is not None:
                raise ConfigError(f"`{key}` is not supported: records carry bytes, codecs decode them")
        self.topics = list(topics)
        self.partitions = None if partitions is None else [tuple(tp) for tp in partitions]
        self.bootstrap_servers = bootstrap_servers
        self.group_id = group_id
        self.on_assign = on_assign
        self.on_revoke = on_revoke
        self.consumer_config = config
        self.connect_attempts = connect_attempts
        self.connect_backoff_s = connect_backoff_s
        self.bootstrap_timeout_ms = bootstrap_timeout_ms
        self.client_id = client_id
        self._consumer: Optional[KafkaConsumer] = None
        self._tracker = OffsetTracker()
        self._assigned: List[TopicPartition] = []
        self._pending: List[Record] = []
        self.n_commit_failures = 0
        self._closing = False
        self._close_error: Optional[BaseException] = None
        self._failure: Optional[StreamError] = None  # a permanent error: never poll again

    # ---- lifecycle ------------------------------------------------------------------------------
    def open(self) -> "KafkaSource":
        """Connect (with retries) and subscribe/assign; idempotent."""
        if self._consumer is not None:
            return self
        config = dict(self.consumer_config)
        config.setdefault("bootstrap_timeout_ms", self.bootstrap_timeout_ms)
        try:
            return self._open(config)
        except (StreamError, ConfigError):
            raise
        except Exception as exc:  # e.g. a setting kafka-python does not know: say so, as one error
            raise as_stream_error(exc, f"KafkaSource: opening `{self.bootstrap_servers}`") from exc

    def _open(self, config: Dict[str, Any]) -> "KafkaSource":
        consumer = connect_with_retry(
            lambda: KafkaConsumer(
                bootstrap_servers=self.bootstrap_servers,
                group_id=self.group_id,
                client_id=self.client_id,
                **config,
            ),
            bootstrap_servers=self.bootstrap_servers,
            what="KafkaSource",
            attempts=self.connect_attempts,
            backoff_s=self.connect_backoff_s,
            probe_timeout_s=config["bootstrap_timeout_ms"] / 1000,
        )
        if not config.get("allow_auto_create_topics", True) and self.topics:
            # the broker creates a missing topic on the subscription's first metadata request
            # unless told not to; when it may not, a missing topic is an error no retry fixes
            try:
                missing = sorted(set(self.topics) - set(consumer.topics()))
            except Exception:
                consumer.close(autocommit=False, timeout_ms=1000)
                raise
            if missing:
                consumer.close(autocommit=False, timeout_ms=1000)
                raise StreamError(
                    f"topic `{', '.join(missing)}` does not exist at `{self.bootstrap_servers}` and auto-create is "
                    "off (`allow_auto_create_topics=False`): create it first, or allow auto-create", transient=False)
        self._consumer = consumer
        self._failure = None
        if self.partitions is not None:
            consumer.assign([_ktp(tp) for tp in self.partitions])
            self._handle_assign(list(self.partitions))
        else:
            consumer.subscribe(self.topics, listener=_Listener(self))
        return self

    def close(self, *, timeout_s: Optional[float] = None) -> None:
        """Leave the group (``on_revoke`` runs first and may commit) and disconnect; idempotent.
        ``timeout_s`` bounds the time spent on the group and the connections (default: the
        consumer's ``request_timeout_ms``)."""
        consumer = self._consumer
        if consumer is None:
            return
        self._closing = True
        self._close_error = None
        try:  # runs the revoke hook, which may commit
            consumer.close(autocommit=False, timeout_ms=None if timeout_s is None else int(timeout_s * 1000))
        finally:
            self._closing = False
            self._consumer = None
            self._assigned = []
            self._pending = []
        if self._close_error is not None:
            error, self._close_error = self._close_error, None
            raise error

    @property
    def consumer(self) -> KafkaConsumer:
        """The underlying kafka-python consumer (opens the source)."""
        self.open()
        assert self._consumer is not None
        return self._consumer

    # ---- reading --------------------------------------------------------------------------------
    def next_batch(self, max_records: int = 500, timeout_ms: int = 1000) -> List[Record]:
        """Up to ``max_records`` records: waits at most ``timeout_ms`` for the first, then takes
        what is already fetched, without waiting again. ``[]`` when nothing arrived.

        Raises `OffsetRewindError` if a partition delivers an offset below one already handed
        out without a `seek` in between, and `StreamError` when the client fails (see
        `as_stream_error`): records fetched before the failure are handed out first and the
        error comes with the next call. After a permanent error every call raises it again
        without touching the consumer.
        """
        if not isinstance(max_records, int) or max_records < 1:
            raise ConfigError(f"`max_records` must be an int >= 1, got `{max_records!r}`")
        if self._failure is not None:
            error = self._failure
            if error.transient:
                self._failure = None  # deferred once, behind the records fetched before it
            raise error
        consumer = self.consumer
        self._pending = []
        wait = max(0, int(timeout_ms))
        while len(self._pending) < max_records:
            try:
                polled = consumer.poll(timeout_ms=wait, max_records=max_records - len(self._pending))
            except Exception as exc:
                error = as_stream_error(exc, f"reading `{','.join(self.topics) or self.partitions}` from "
                                             f"`{self.bootstrap_servers}`")
                if not self._pending:
                    if not error.transient:
                        self._failure = error
                    raise error from exc
                self._failure = error  # after handing out what came before it
                break
            if not polled:
                break
            wait = 0
            self._check_not_backwards(polled)
            pending = self._pending  # the revoke hook may have filtered it during poll()
            advance = self._tracker.advance
            for ktp, msgs in polled.items():
                if not msgs:
                    continue
                tp = (ktp.topic, ktp.partition)
                # kafka-python hands out each partition's records in increasing offset order:
                # checking the first against the tracker and the order of the ends suffices
                advance(tp, msgs[0].offset)
                if len(msgs) > 1:
                    advance(tp, msgs[-1].offset)
                pending.extend(
                    [Record(m.topic, m.partition, m.offset, m.key, m.value, m.timestamp, m.headers) for m in msgs]
                )
        out, self._pending = self._pending, []
        return out

    def _check_not_backwards(self, polled: Mapping[Any, Sequence[Any]]) -> None:
        """Raise `OffsetRewindError` *before* handing out anything when a partition restarts
        below its next offset (the consumer reset it, e.g. after ``OffsetOutOfRange`` when a
        broker lost its data). Every record of this `next_batch` call is put back first (the
        consumer is sought to the first of them), so nothing is lost: the caller accepts the
        new position with ``seek({tp: error.offset})`` or insists on ``error.expected``."""
        bad = None
        for ktp, msgs in polled.items():
            if msgs:
                nxt = self._tracker.next_offset((ktp.topic, ktp.partition))
                if nxt is not None and msgs[0].offset < nxt:
                    bad = ((ktp.topic, ktp.partition), msgs[0].offset, nxt)
                    break
        if bad is None:
            return
        firsts: Dict[TopicPartition, int] = {}
        for r in self._pending:
            firsts.setdefault((r.topic, r.partition), r.offset)
        for ktp, msgs in polled.items():
            if msgs:
                firsts.setdefault((ktp.topic, ktp.partition), msgs[0].offset)
        consumer = self._consumer
        assert consumer is not None
        for tp, off in firsts.items():
            consumer.seek(_ktp(tp), off)
            if tp != bad[0]:
                self._tracker.reset(tp, off)
        self._pending = []
        tp, got, expected = bad
        raise OffsetRewindError(tp, got, expected)

    def seek(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Make the next records of these partitions start at these (next) offsets.

        Only assigned partitions can be sought (in group mode, do it from ``on_assign`` by
        returning the offsets). The offset tracker is reset for them: seeking backwards is allowed.
        """
        offsets = check_offsets(offsets)
        consumer = self.consumer
        assigned = set(self._assigned)
        for tp, off in offsets.items():
            if tp not in assigned:
                raise OffsetError(
                    f"cannot seek `{tp[0]}:{tp[1]}`: not assigned to this consumer "
                    f"(assigned: `{sorted(assigned)}`)"
                )
            consumer.seek(_ktp(tp), off)
            self._tracker.reset(tp, off)

    # ---- offsets --------------------------------------------------------------------------------
    def snapshot(self) -> Offsets:
        """Next offset of every assigned partition that has one (delivered or sought)."""
        assigned = set(self._assigned)
        return {tp: off for tp, off in self._tracker.snapshot().items() if tp in assigned}

    def commit(self, offsets: Optional[Mapping[TopicPartition, int]] = None, *,
               timeout_s: Optional[float] = None) -> bool:
        """Commit next offsets to the group (default: `snapshot`); False if the group refused or
        did not answer within ``timeout_s`` (default: the consumer's ``request_timeout_ms``).

        A commit the group refuses (``CommitFailedError``: it has rebalanced) is logged and
        counted in ``n_commit_failures``, not raised: the checkpoint holds the offsets and the
        new owner resumes from its last good commit. A commit below this source's previous
        commit of the same partition raises `OffsetError`.
        """
        if self.group_id is None:
            raise ConfigError("`commit` needs a consumer group: this source has `group_id=None`")
        offsets = self.snapshot() if offsets is None else check_offsets(offsets)
        if not offsets:
            return True
        self._tracker.check_commit(offsets)
        try:
            self.consumer.commit({_ktp(tp): OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()},
                                 timeout_ms=None if timeout_s is None else int(timeout_s * 1000))
        except _COMMIT_ERRORS as exc:
            self.n_commit_failures += 1
            log.warning("offset commit of %s failed (%s); continuing", _fmt_offsets(offsets), exc)
            return False
        self._tracker.mark_committed(offsets)
        return True

    def committed(self, partitions: Optional[Iterable[TopicPartition]] = None) -> Offsets:
        """The group's committed offsets (a broker round trip); partitions without one are left out."""
        consumer = self.consumer
        out: Offsets = {}
        for tp in (self._assigned if partitions is None else partitions):
            off = consumer.committed(_ktp(tp))
            if off is not None:
                out[tuple(tp)] = int(off)  # type: ignore[index]
        return out

    def health(self) -> Optional[str]:
        """``"Kafka broker unreachable (...)"`` when no bootstrap server accepts a TCP connection."""
        return probe_brokers(self.bootstrap_servers)

    def assignment(self) -> List[TopicPartition]:
        """Partitions this member reads now (empty before the first group join completes)."""
        return list(self._assigned)

    def lag(self) -> Dict[TopicPartition, Optional[int]]:
        """``highwater - next offset`` per assigned partition; None until both are known.

        Uses ``highwater()`` from the last fetch (Tansu's ``end_offsets`` is wrong).
        """
        consumer = self.consumer
        out: Dict[TopicPartition, Optional[int]] = {}
        for tp in self._assigned:
            try:
                hw = consumer.highwater(_ktp(tp))
            except kerrors.IllegalStateError:
                hw = None
            nxt = self._tracker.next_offset(tp)
            out[tp] = None if hw is None or nxt is None else max(0, hw - nxt)
        return out

    def highwater(self) -> Dict[TopicPartition, Optional[int]]:
        """The high watermark (offset of the next record to be written) of each assigned
        partition, from the last fetch; None until a fetch has reported it. A value below the
        next offset to read means the partition lost data (a restarted in-memory broker, a
        recreated topic): Tansu then answers fetches with nothing rather than OffsetOutOfRange."""
        consumer = self.consumer
        out: Dict[TopicPartition, Optional[int]] = {}
        for tp in self._assigned:
            try:
                out[tp] = consumer.highwater(_ktp(tp))
            except kerrors.IllegalStateError:
                out[tp] = None
        return out

    # ---- rebalance hooks (I/O thread) -------------------------------------------------------------
    async def _handle_revoke(self, partitions: List[TopicPartition], *, lost: bool) -> None:
        if not partitions:
            return
        gone = set(partitions)
        # records fetched for these partitions but not handed out yet are dropped below: the
        # snapshot a hook reads must not count them as delivered
        firsts: Dict[TopicPartition, int] = {}
        for r in self._pending:
            if (r.topic, r.partition) in gone:
                firsts.setdefault((r.topic, r.partition), r.offset)
        for tp, off in firsts.items():
            self._tracker.reset(tp, off)
        try:
            offsets: Optional[Mapping[TopicPartition, int]] = None
            if self.on_revoke is not None:
                offsets = self.on_revoke(list(partitions))
            if offsets:
                offsets = check_offsets(offsets)
                if lost:
                    log.warning(
                        "partitions %s were lost (evicted); not committing %s", partitions, _fmt_offsets(offsets)
                    )
                else:
                    await self._commit_async(offsets)
        except Exception as exc:
            if not self._closing:
                raise  # kafka-python re-raises it from poll() as KafkaError(...) from exc
            # while closing, finish closing first (kafka-python would leak its I/O thread); close() re-raises
            if isinstance(exc, kerrors.KafkaError):  # the broker refused the hand-over commit: said once
                log.warning("committing the revoked partitions' offsets while closing failed: %r", exc)
            else:
                log.exception("on_revoke hook failed while closing")
            self._close_error = exc
        finally:
            self._tracker.forget(partitions)
            self._assigned = [tp for tp in self._assigned if tp not in gone]
            self._pending = [r for r in self._pending if (r.topic, r.partition) not in gone]
        log.info("partitions %s %s", partitions, "lost" if lost else "revoked")

    async def _commit_async(self, offsets: Offsets) -> None:
        assert self._consumer is not None
        try:
            self._tracker.check_commit(offsets)
            await self._consumer.commit_async(
                {_ktp(tp): OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()}
            )
            self._tracker.mark_committed(offsets)
        except _COMMIT_ERRORS as exc:
            self.n_commit_failures += 1
            log.warning("offset commit on revoke of %s failed (%s)", _fmt_offsets(offsets), exc)

    def _handle_assign(self, partitions: List[TopicPartition]) -> None:
        for tp in partitions:
            if tp not in self._assigned:
                self._assigned.append(tp)
        self._assigned.sort()
        log.info("partitions %s assigned", partitions)
        if self.on_assign is None or not partitions:
            return
        offsets = self.on_assign(list(partitions))
        if offsets:
            offsets = check_offsets(offsets)
            consumer = self._consumer
            assert consumer is not None
            for tp, off in offsets.items():
                if tp in partitions:
                    consumer.seek(_ktp(tp), off)
                    self._tracker.reset(tp, off)
                else:
                    log.warning("on_assign returned an offset for `%s:%d`, which is not assigned", *tp)


def _fmt_offsets(offsets: Mapping[TopicPartition, int]) -> str:
    return "{" + ", ".join(f"{t}:{p}={o}" for (t, p), o in sorted(offsets.items())) + "}"


# ================================================================================================
def make_producer(
    bootstrap_servers: str | Sequence[str],
    *,
    connect_attempts: int = 5,
    connect_backoff_s: float = 0.5,
    bootstrap_timeout_ms: int = 10000,
    **config: Any,
) -> KafkaProducer:
    """A ``KafkaProducer`` with `PRODUCER_DEFAULTS` (``config`` overrides), retrying the connection."""
    settings = dict(PRODUCER_DEFAULTS)
    settings.update(config)
    settings.setdefault("bootstrap_timeout_ms", bootstrap_timeout_ms)
    settings.setdefault("client_id", "amstream-producer")
    return connect_with_retry(
        lambda: KafkaProducer(bootstrap_servers=bootstrap_servers, **settings),
        bootstrap_servers=bootstrap_servers,
        what="KafkaProducer",
        attempts=connect_attempts,
        backoff_s=connect_backoff_s,
        probe_timeout_s=settings["bootstrap_timeout_ms"] / 1000,
    )


class KafkaSink(Sink):
    """Writes messages to one topic; delivery errors surface at `flush`.

    Parameters
    ----------
    topic
        Destination topic.
    bootstrap_servers
        ``"host:port"`` or a list of them.
    producer
        An existing ``KafkaProducer`` to share (not closed by `close`); default: `make_producer`.
    producer_config
        ``KafkaProducer`` settings over `PRODUCER_DEFAULTS`.
    """

    def __init__(
        self,
        topic: str,
        *,
        bootstrap_servers: str | Sequence[str],
        producer: Optional[KafkaProducer] = None,
        producer_config: Optional[Mapping[str, Any]] = None,
        connect_attempts: int = 5,
    ) -> None:
        self.topic = topic
        self.bootstrap_servers = bootstrap_servers
        self.producer_config = dict(producer_config or {})
        self.connect_attempts = connect_attempts
        self._producer = producer
        self._owns_producer = producer is None
        self._errors: List[BaseException] = []
        self.n_written = 0

    @property
    def producer(self) -> KafkaProducer:
        if self._producer is None:
            self._producer = make_producer(
                self.bootstrap_servers, connect_attempts=self.connect_attempts, **self.producer_config
            )
        return self._producer

    def _on_error(self, exc: BaseException) -> None:
        self._errors.append(exc)

    def write_batch(
        self,
        values: Sequence[bytes],
        keys: Optional[Sequence[Optional[bytes]]] = None,
        headers: Optional[Sequence[Optional[Headers]]] = None,
    ) -> int:
        """Queue one message per value (asynchronous: `flush` waits for delivery); returns how many."""
        producer = self.producer
        send, topic, on_error = producer.send, self.topic, self._on_error
        for i, value in enumerate(values):
            h = None if headers is None else headers[i]
            try:
                future = send(
                    topic, value=value, key=None if keys is None else keys[i], headers=list(h) if h else None
                )
            except kerrors.KafkaError as exc:  # refused before sending (too large, ...): `flush` reports it
                on_error(exc)
                continue
            future.add_errback(on_error)
        self.n_written += len(values)
        return len(values)

    def flush(self, timeout_s: Optional[float] = None) -> None:
        """Wait until everything queued is delivered; raise a transient `StreamError` if a send
        failed or ``timeout_s`` passed first."""
        if self._producer is not None:
            try:
                self._producer.flush(timeout=timeout_s)
            except kerrors.KafkaTimeoutError as exc:
                raise StreamError(f"messages to topic `{self.topic}` not delivered within {timeout_s} s: {exc}",
                                  transient=True) from exc
        if self._errors:
            errors, self._errors = self._errors, []
            raise StreamError(
                f"{len(errors)} message(s) to topic `{self.topic}` were not delivered; first error: {errors[0]!r}",
                transient=True,
            ) from errors[0]

    def close(self, timeout_s: Optional[float] = 10.0) -> None:
        """Flush, then close the producer if this sink created it."""
        try:
            self.flush(timeout_s)
        finally:
            if self._owns_producer and self._producer is not None:
                self._producer.close(timeout=timeout_s)
                self._producer = None


class DeadLetterSink(KafkaSink):
    """Writes rejected records unchanged (key and value) to a dead-letter topic.

    Headers say why and where from: ``amstream.reason`` (one of the codec's reasons),
    ``amstream.detail``, ``amstream.topic``, ``amstream.partition``, ``amstream.offset``
    (UTF-8 text). A record larger than ``max_bytes`` (key, value and headers; brokers refuse
    messages over about 1 MB by default) is written with its value cut to fit, and two more
    headers: ``amstream.truncated`` (the value's full length in bytes) and ``amstream.sha256``
    (the full value's digest), so that it can be found in the source topic at its offset.
    """

    def __init__(self, topic: str, *, max_bytes: int = 1_000_000, **kwargs: Any) -> None:
        if max_bytes < 4096:
            raise ConfigError(f"`max_bytes` of a dead-letter sink must be >= 4096, got `{max_bytes}`")
        super().__init__(topic, **kwargs)
        self.max_bytes = max_bytes
        self.n_truncated = 0

    def write_rejections(self, records: Sequence[Record], rejections: Iterable[Any]) -> int:
        """One message per rejected record, from a decoded batch's rejections (``index``,
        ``reason``, ``detail``); returns how many were written. A record with several rejected
        samples (a packed binary message) is written once: the first reason, and every detail
        joined with ``"; "``."""
        by_record: Dict[int, List[Any]] = {}
        for r in rejections:
            by_record.setdefault(int(r.index), []).append(r)
        values, keys, headers = [], [], []
        for i, rs in by_record.items():
            record = records[i]
            value, h = record.value, self.headers_for(record, rs[0].reason, "; ".join(r.detail for r in rs)[:2000])
            room = self.max_bytes - len(record.key or b"") - sum(len(k) + len(v) for k, v in h) - 512
            if len(value) > room:
                h += [("amstream.truncated", str(len(value)).encode("ascii")),
                      ("amstream.sha256", hashlib.sha256(value).hexdigest().encode("ascii"))]
                value = value[:max(0, room)]
                self.n_truncated += 1
            values.append(value)
            keys.append(record.key)
            headers.append(h)
        return self.write_batch(values, keys, headers)

    @staticmethod
    def headers_for(record: Record, reason: str, detail: str = "") -> List[tuple[str, bytes]]:
        return [
            ("amstream.reason", reason.encode("utf-8")),
            ("amstream.detail", detail.encode("utf-8")),
            ("amstream.topic", str(record.topic).encode("utf-8")),
            ("amstream.partition", str(record.partition).encode("ascii")),
            ("amstream.offset", str(record.offset).encode("ascii")),
        ]


def produce_samples(
    topic: str,
    X: Any,
    y: Any = None,
    *,
    codec: Any,
    bootstrap_servers: str | Sequence[str],
    keys: Optional[Sequence[Optional[bytes]]] = None,
    samples_per_message: int = 1,
    producer: Optional[KafkaProducer] = None,
    chunk_size: int = 10000,
    tasks: Any = None,
    **producer_config: Any,
) -> int:
    """Encode rows of ``X`` (labels ``y``, task ids ``tasks``) with ``codec`` and send them; flushes.

    One message per row, or per ``samples_per_message`` rows with the binary codec (a packed
    message's key is its first row's). Returns the number of messages delivered; raises
    `StreamError` if any was not.
    """
    from amstream.connectors.codec import AutoCodec, BinaryCodec

    if samples_per_message != 1 and not isinstance(codec, (BinaryCodec, AutoCodec)):
        raise ConfigError(
            f"`samples_per_message={samples_per_message}` needs the binary codec, not `{codec.name}`"
        )
    encode_kw = {} if samples_per_message == 1 else {"samples_per_message": samples_per_message}
    chunk = max(1, chunk_size // samples_per_message) * samples_per_message
    own = producer is None
    sink = KafkaSink(
        topic,
        bootstrap_servers=bootstrap_servers,
        producer=producer,
        producer_config=producer_config,
    )
    n = len(X)
    try:
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            if tasks is not None:
                encode_kw["tasks"] = tasks[start:stop]
            values = codec.encode_many(X[start:stop], None if y is None else y[start:stop], **encode_kw)
            sink.write_batch(values, None if keys is None else keys[start:stop:samples_per_message])
        sink.flush()
    finally:
        if own:
            sink.close()
    return sink.n_written
