"""One retry policy for every call that may fail for a while, on top of ``tenacity``.

`retry` calls a function until it returns. Errors that ``transient`` accepts are retried after
exponential `Backoff` delays; any other error is raised at once (a bad setting, a permanent
broker error). It gives up after ``attempts`` tries or ``timeout_s`` seconds (raising the last
error), and stops early when a ``stop`` event is set (raising `Stopped`): the waits are
``Event.wait`` calls, so a signal handler that sets the event ends a retry within one wait, never
after the full backoff.

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
>>> Backoff(0.5, 4.0).delays(5)
[0.5, 1.0, 2.0, 4.0, 4.0]
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple, Type, TypeVar, Union

import tenacity

from amstream.exceptions import AmstreamError, ConfigError

__all__ = ["Backoff", "Stopped", "retry"]

T = TypeVar("T")
Transient = Union[Type[BaseException], Tuple[Type[BaseException], ...], Callable[[BaseException], bool]]


class Stopped(AmstreamError):
    """A stop was requested while `retry` was waiting or before an attempt."""


@dataclass(frozen=True)
class Backoff:
    """Delays that start at ``initial_s`` and grow by ``factor`` up to ``max_s``."""

    initial_s: float = 0.5
    max_s: float = 30.0
    factor: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s or self.factor < 1:
            raise ConfigError(f"backoff needs 0 < `initial_s` <= `max_s` and `factor` >= 1, got "
                              f"`{self.initial_s}`, `{self.max_s}`, `{self.factor}`")

    def wait(self) -> tenacity.wait.wait_base:
        return tenacity.wait_exponential(multiplier=self.initial_s, exp_base=self.factor, max=self.max_s)

    def delay(self, attempt: int) -> float:
        """The delay after the ``attempt``-th failure (1, 2, ...)."""
        return float(self.wait()(_state(attempt)))

    def delays(self, n: int) -> List[float]:
        """The first ``n`` delays (for documentation and tests)."""
        return [self.delay(attempt) for attempt in range(1, n + 1)]


def _state(attempt: int) -> tenacity.RetryCallState:
    state = tenacity.RetryCallState(None, None, (), {})
    state.attempt_number = attempt
    return state


def _accepts(transient: Transient, exc: BaseException) -> bool:
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
        No new attempt once this much time has passed since the first one (None: no limit).
    stop
        An event; once set, no new attempt starts and a wait ends at once with `Stopped`.
    on_retry
        Called as ``on_retry(error, attempt, delay_s)`` before each wait.
    """
    if attempts is not None and attempts < 1:
        raise ConfigError(f"`attempts` must be >= 1 or None, got `{attempts!r}`")
    limits = ([tenacity.stop_after_attempt(attempts)] if attempts is not None else []) + (
        [tenacity.stop_after_delay(timeout_s)] if timeout_s is not None else [])

    def sleep(seconds: float) -> None:
        if stop is None:
            time.sleep(seconds)
        elif stop.wait(seconds):
            raise Stopped("stopped while waiting to retry")

    def before_sleep(state: tenacity.RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None and state.next_action is not None:
            on_retry(state.outcome.exception(), state.attempt_number, state.next_action.sleep)

    if stop is not None and stop.is_set():
        raise Stopped("stopped before the first attempt")
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(lambda exc: _accepts(transient, exc)),
        wait=(backoff or Backoff()).wait(),
        stop=tenacity.stop_any(*limits) if limits else tenacity.stop_never,
        sleep=sleep, before_sleep=before_sleep, reraise=True)
    return retrying(fn)
