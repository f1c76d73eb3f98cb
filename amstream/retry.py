"""One retry loop with exponential backoff, for every call that may fail for a while.

`retry` calls a function until it returns. Errors that ``transient`` accepts are retried after a
`Backoff` delay; any other error is raised at once (a bad setting, a permanent broker error).
It gives up after ``attempts`` tries or ``timeout_s`` seconds (raising the last error), and stops
early when a ``stop`` event is set (raising `Stopped`): the waits are ``Event.wait`` calls, so a
signal handler that sets the event ends a retry within one wait, never after the full backoff.

Used for connecting clients to a broker (`amstream.connectors.kafka`), opening a source and
polling it (`amstream.serve.runner`).

Examples
--------
>>> calls = []
>>> def flaky():
...     calls.append(len(calls))
...     if len(calls) < 3:
...         raise ConnectionError("not yet")
...     return "ok"
>>> retry(flaky, transient=ConnectionError, backoff=Backoff(0.001, 0.002))
'ok'
>>> calls
[0, 1, 2]
>>> def down():
...     raise ConnectionError("broker down")
>>> retry(down, transient=ConnectionError, attempts=2, backoff=Backoff(0.001, 0.001))
Traceback (most recent call last):
...
ConnectionError: broker down
>>> b = Backoff(0.5, 4.0)
>>> [b.next() for _ in range(5)]
[0.5, 1.0, 2.0, 4.0, 4.0]
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional, Tuple, Type, TypeVar, Union

from amstream.exceptions import AmstreamError, ConfigError

__all__ = ["Backoff", "Stopped", "retry"]

T = TypeVar("T")
Transient = Union[Type[BaseException], Tuple[Type[BaseException], ...], Callable[[BaseException], bool]]


class Stopped(AmstreamError):
    """A stop was requested while `retry` was waiting or before an attempt."""


class Backoff:
    """Delays that start at ``initial_s`` and grow by ``factor`` up to ``max_s``; `reset` after a success."""

    def __init__(self, initial_s: float = 0.5, max_s: float = 30.0, factor: float = 2.0) -> None:
        if not 0 < initial_s <= max_s or factor < 1:
            raise ConfigError(f"backoff needs 0 < `initial_s` <= `max_s` and `factor` >= 1, got "
                              f"`{initial_s}`, `{max_s}`, `{factor}`")
        self.initial_s = float(initial_s)
        self.max_s = float(max_s)
        self.factor = float(factor)
        self._next = self.initial_s

    def next(self) -> float:
        """The delay to wait now; the following one is longer."""
        delay = self._next
        self._next = min(self.max_s, self._next * self.factor)
        return delay

    def reset(self) -> None:
        self._next = self.initial_s


def _is_transient(transient: Transient, exc: BaseException) -> bool:
    if isinstance(transient, type) or isinstance(transient, tuple):
        return isinstance(exc, transient)
    return bool(transient(exc))


def retry(
    fn: Callable[[], T],
    *,
    transient: Transient,
    backoff: Optional[Backoff] = None,
    attempts: Optional[int] = None,
    timeout_s: Optional[float] = None,
    stop: Optional[threading.Event] = None,
    on_retry: Optional[Callable[[BaseException, int, float], None]] = None,
) -> T:
    """``fn()``, retried while it raises what ``transient`` accepts.

    Parameters
    ----------
    fn
        The call to make.
    transient
        An exception type, a tuple of them, or a predicate: the errors worth retrying.
    backoff
        The delays between attempts (default `Backoff()`: 0.5 s doubling to 30 s).
    attempts
        Tries in all (None: no limit).
    timeout_s
        Give up once this much time has passed since the first attempt (None: no limit);
        the last wait is shortened to end at the deadline.
    stop
        An event; once set, no new attempt starts and a wait ends at once with `Stopped`.
    on_retry
        Called as ``on_retry(error, attempt, delay_s)`` before each wait.
    """
    if attempts is not None and attempts < 1:
        raise ConfigError(f"`attempts` must be >= 1 or None, got `{attempts!r}`")
    backoff = backoff or Backoff()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    attempt = 0
    while True:
        if stop is not None and stop.is_set():
            raise Stopped("stopped before the next attempt")
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            if not _is_transient(transient, exc):
                raise
            delay = backoff.next()
            if deadline is not None:
                delay = min(delay, deadline - time.monotonic())
            if (attempts is not None and attempt >= attempts) or delay <= 0:
                raise
            if on_retry is not None:
                on_retry(exc, attempt, delay)
            if stop is None:
                time.sleep(delay)
            elif stop.wait(delay):
                raise Stopped(f"stopped while waiting to retry after: {exc}") from exc
