"""Service metrics: a tiny thread-safe registry, Prometheus text exposition, an HTTP endpoint.

Only the standard library: `MetricsRegistry` holds counters and gauges (with labels),
`render()` writes them in the Prometheus text format (version 0.0.4), and `MetricsServer`
serves ``GET /metrics`` from a daemon thread (``http.server``).

Examples
--------
>>> m = MetricsRegistry(prefix="demo_")
>>> m.describe("samples_total", "counter", "Samples learned.")
>>> m.inc("samples_total", 3)
>>> m.set("lag", 5, topic="t", partition="0")
>>> print(m.render().strip())
# TYPE demo_lag gauge
demo_lag{partition="0",topic="t"} 5
# HELP demo_samples_total Samples learned.
# TYPE demo_samples_total counter
demo_samples_total 3
"""
from __future__ import annotations

import logging
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Optional, Tuple

__all__ = ["MetricsRegistry", "MetricsServer"]

log = logging.getLogger(__name__)

LabelKey = Tuple[Tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class MetricsRegistry:
    """Named counters and gauges with optional labels; safe to update from any thread.

    Parameters
    ----------
    prefix
        Prepended to every metric name (``"amstream_"``).
    """

    def __init__(self, prefix: str = "amstream_") -> None:
        self.prefix = prefix
        self._lock = threading.Lock()
        self._values: Dict[str, Dict[LabelKey, float]] = {}
        self._meta: Dict[str, Tuple[str, str]] = {}  # name -> (type, help)

    def describe(self, name: str, kind: str, help_text: str = "") -> None:
        """Declare ``name`` as a ``counter`` or ``gauge`` with a help line."""
        if kind not in ("counter", "gauge"):
            raise ValueError(f"metric kind must be `counter` or `gauge`, got `{kind}`")
        with self._lock:
            self._meta[name] = (kind, help_text)
            self._values.setdefault(name, {})

    @staticmethod
    def _key(labels: Dict[str, object]) -> LabelKey:
        return tuple(sorted((k, str(v)) for k, v in labels.items()))

    def set(self, name: str, value: float, **labels: object) -> None:
        with self._lock:
            self._values.setdefault(name, {})[self._key(labels)] = value

    def inc(self, name: str, amount: float = 1, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            series = self._values.setdefault(name, {})
            series[key] = series.get(key, 0) + amount

    def remove(self, name: str, **labels: object) -> None:
        with self._lock:
            self._values.get(name, {}).pop(self._key(labels), None)

    def clear(self, name: str) -> None:
        """Drop every labelled series of ``name`` (e.g. the lag of partitions no longer owned)."""
        with self._lock:
            if name in self._values:
                self._values[name] = {}

    def get(self, name: str, **labels: object) -> Optional[float]:
        with self._lock:
            return self._values.get(name, {}).get(self._key(labels))

    def render(self) -> str:
        """All metrics in the Prometheus text exposition format."""
        lines = []
        with self._lock:
            for name in sorted(self._values):
                series = self._values[name]
                full = self.prefix + name
                kind, help_text = self._meta.get(name, ("gauge", ""))
                if help_text:
                    lines.append(f"# HELP {full} {help_text}")
                lines.append(f"# TYPE {full} {kind}")
                for key in sorted(series):
                    labels = ",".join(f'{k}="{_escape(v)}"' for k, v in key)
                    lines.append(f"{full}{{{labels}}} {_fmt(series[key])}" if labels
                                 else f"{full} {_fmt(series[key])}")
        return "\n".join(lines) + "\n"


class MetricsServer:
    """Serves ``registry.render()`` at ``http://host:port/metrics`` from a daemon thread.

    ``port=0`` picks a free port (read it back from `port` after `start`).
    """

    def __init__(self, registry: MetricsRegistry, *, port: int = 0, host: str = "0.0.0.0") -> None:
        self.registry = registry
        self.host = host
        self._requested_port = port
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> int:
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    def start(self) -> "MetricsServer":
        registry = self.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                    self.send_error(404, "only /metrics is served")
                    return
                body = registry.render().encode("utf-8")
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: object) -> None:
                log.debug("metrics %s: " + fmt, self.address_string(), *args)

        self._server = ThreadingHTTPServer((self.host, self._requested_port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="amstream-metrics", daemon=True)
        self._thread.start()
        log.info("metrics at http://%s:%d/metrics", self.host, self.port)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "MetricsServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
