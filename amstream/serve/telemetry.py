"""Telemetry of `amstream serve`: Prometheus metrics and log lines, fed by engine and runner events.

`Telemetry` is a `RunnerEvents` listener. Metrics live in a ``prometheus_client`` registry of
their own (several runs in one process do not collide) and are served by `Telemetry.serve_http`
at ``/metrics``. Counters only go up and count this process; gauges say how things are now;
histograms time each learning step and each checkpoint:

==================================================  =========  =================================================
metric                                              type       what
==================================================  =========  =================================================
``amstream_learned_samples_total``                  counter    samples learned by this process
``amstream_minibatches_total``                      counter    minibatches learned (one update each)
``amstream_records_total``                          counter    records taken from the source
``amstream_bad_messages_total{reason}``             counter    rejected samples, by reason
``amstream_decode_seconds_total``                   counter    time decoding and validating records
``amstream_poll_wait_seconds_total``                counter    time the learner waited for records
``amstream_checkpoints_total``                      counter    checkpoints written
``amstream_checkpoint_failures_total``              counter    checkpoints not written (sink or file errors)
``amstream_commit_failures_total``                  counter    offset commits the group refused
``amstream_offset_rewinds_total{topic,partition}``  counter    partitions restarted because the broker lost data
``amstream_source_errors_total{kind}``              counter    failed reads, ``transient`` or ``permanent``
``amstream_step_seconds``                           histogram  time inside ``learner.learn`` per minibatch
``amstream_checkpoint_seconds``                     histogram  time to write a checkpoint
``amstream_model_learned_samples``                  gauge      samples learned over the model's life
``amstream_model_step``                             gauge      updates the model has made
``amstream_model_classes``                          gauge      output classes (grows as labels appear)
``amstream_prequential_accuracy{window}``           gauge      test-then-train accuracy, ``total`` or ``recent``
``amstream_prequential_loss{window}``               gauge      test-then-train mean loss, ``total`` or ``recent``
``amstream_samples_per_second``                     gauge      learning rate over the last status period
``amstream_consumer_lag{topic,partition}``          gauge      records behind the partition's end
``amstream_buffered_samples``                       gauge      samples taken, waiting for a full minibatch
``amstream_assigned_partitions``                    gauge      partitions this member reads
``amstream_last_checkpoint_timestamp_seconds``      gauge      Unix time of the last checkpoint
``amstream_checkpoint_age_seconds``                 gauge      seconds since then (NaN before the first)
``amstream_current_task``                           gauge      task id of the last learned minibatch (-1: none)
``amstream_task_prequential_accuracy{task}``        gauge      test-then-train accuracy of each task in the stream
``amstream_task_accuracy{task}``                    gauge      accuracy on the task's held-out samples (``--eval-source``)
``amstream_task_forgetting{task}``                  gauge      accuracy the task lost since its experience ended
``amstream_continual_average_accuracy``             gauge      mean held-out accuracy over the tasks trained so far
``amstream_continual_forgetting``                   gauge      mean forgetting over the earlier tasks
``amstream_evaluations_total{reason}``              counter    scorings of the evaluation set (task_end, periodic)
==================================================  =========  =================================================

The task metrics are those of `amstream.serve.continual` (a task sequence: task ids in the
messages, an evaluation set of every task); without task ids and an evaluation set they stay unset.

Log lines go to the ``amstream.serve`` loggers: a progress line every ``log_every_s``, each bad
message (the first 20 of a reason, then at counts that are powers of two), what waits and why
while nothing arrives (with the source's own diagnosis, e.g. "Kafka broker unreachable"),
rebalances, rewinds, failures, and a last line when the run stops.

Examples
--------
>>> t = Telemetry(log_every_s=None)
>>> t.after_source_error(ConnectionError("down"), 1.0, 0)
>>> [line for line in t.render().splitlines() if line.startswith("amstream_source_errors_total")]
['amstream_source_errors_total{kind="transient"} 1.0']
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Dict, List, Optional, Tuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

from amstream.connectors.records import Offsets, TopicPartition
from amstream.serve.engine import Ingested, Step
from amstream.serve.runner import RunnerEvents, Status

__all__ = ["Telemetry"]

log = logging.getLogger("amstream.serve")

_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_CHECKPOINT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Telemetry(RunnerEvents):
    """Metrics and log lines of one run.

    Parameters
    ----------
    log_every_s
        Period of the progress line (None: no progress lines).
    dead_letters
        Whether rejected messages go to a dead-letter sink (said in their log lines).
    registry
        The ``prometheus_client.CollectorRegistry`` to register in (default: a new one).
    """

    def __init__(self, *, log_every_s: Optional[float] = 10.0, dead_letters: bool = False,
                 registry: Optional[CollectorRegistry] = None) -> None:
        self.log_every_s = log_every_s
        self.dead_letters = dead_letters
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.learned = Counter("amstream_learned_samples", "Samples learned by this process.", registry=r)
        self.minibatches = Counter("amstream_minibatches", "Minibatches learned (one update each).", registry=r)
        self.records = Counter("amstream_records", "Records taken from the source.", registry=r)
        self.bad = Counter("amstream_bad_messages", "Rejected samples by reason (counted, logged, dead-lettered).",
                           ["reason"], registry=r)
        self.decode_seconds = Counter("amstream_decode_seconds", "Time decoding and validating records.", registry=r)
        self.poll_wait_seconds = Counter("amstream_poll_wait_seconds", "Time the learner waited for records.",
                                         registry=r)
        self.checkpoints = Counter("amstream_checkpoints", "Checkpoints written.", registry=r)
        self.checkpoint_failures = Counter("amstream_checkpoint_failures", "Checkpoints not written.", registry=r)
        self.commit_failures = Counter("amstream_commit_failures", "Offset commits the group refused.", registry=r)
        self.rewinds = Counter("amstream_offset_rewinds", "Partitions started over because the broker lost their data.",
                               ["topic", "partition"], registry=r)
        self.source_errors = Counter("amstream_source_errors", "Failed reads of the source.", ["kind"], registry=r)
        self.step_seconds = Histogram("amstream_step_seconds", "Time inside learner.learn per minibatch.",
                                      buckets=_STEP_BUCKETS, registry=r)
        self.checkpoint_seconds = Histogram("amstream_checkpoint_seconds", "Time to write a checkpoint.",
                                            buckets=_CHECKPOINT_BUCKETS, registry=r)
        self.model_learned = Gauge("amstream_model_learned_samples",
                                   "Samples learned over the model's life (restored from the checkpoint).", registry=r)
        self.model_step = Gauge("amstream_model_step", "Updates the model has made.", registry=r)
        self.model_classes = Gauge("amstream_model_classes", "Output classes of the model.", registry=r)
        self.accuracy = Gauge("amstream_prequential_accuracy", "Test-then-train accuracy.", ["window"], registry=r)
        self.loss = Gauge("amstream_prequential_loss", "Test-then-train mean loss.", ["window"], registry=r)
        self.rate = Gauge("amstream_samples_per_second", "Learning rate over the last status period.", registry=r)
        self.lag = Gauge("amstream_consumer_lag", "Records behind the partition's end.", ["topic", "partition"],
                         registry=r)
        self.buffered = Gauge("amstream_buffered_samples", "Samples taken, waiting for a full minibatch.", registry=r)
        self.assigned = Gauge("amstream_assigned_partitions", "Partitions this member reads.", registry=r)
        self.checkpoint_time = Gauge("amstream_last_checkpoint_timestamp_seconds", "Unix time of the last checkpoint.",
                                     registry=r)
        self.current_task = Gauge("amstream_current_task", "Task id of the last learned minibatch (-1: none).",
                                  registry=r)
        self.task_prequential = Gauge("amstream_task_prequential_accuracy", "Test-then-train accuracy per task.",
                                      ["task"], registry=r)
        self.task_accuracy = Gauge("amstream_task_accuracy", "Held-out accuracy per task (the evaluation set).",
                                   ["task"], registry=r)
        self.task_forgetting = Gauge("amstream_task_forgetting", "Accuracy a task lost since its experience ended.",
                                     ["task"], registry=r)
        self.continual_accuracy = Gauge("amstream_continual_average_accuracy",
                                        "Mean held-out accuracy over the tasks trained so far.", registry=r)
        self.continual_forgetting = Gauge("amstream_continual_forgetting", "Mean forgetting over the earlier tasks.",
                                          registry=r)
        self.evaluations = Counter("amstream_evaluations", "Scorings of the evaluation set.", ["reason"], registry=r)
        self._last_checkpoint: Optional[float] = None
        age = Gauge("amstream_checkpoint_age_seconds", "Seconds since the last checkpoint (NaN before one).",
                    registry=r)
        age.set_function(lambda: math.nan if self._last_checkpoint is None else time.time() - self._last_checkpoint)
        self._bad_logged: Dict[str, int] = {}
        self._bad_seen: Dict[str, int] = {}
        self._t0 = time.monotonic()
        self._last_line = self._t0
        self._last_status: Optional[Tuple[float, int]] = None
        self._line_learned = 0
        self._last_wait_line = self._t0
        self._wait_every = 10.0
        self._wait_seconds = 0.0
        self._server: Any = None

    # ---- the endpoint ---------------------------------------------------------------------------
    def render(self) -> str:
        """Every metric in the Prometheus text format."""
        return generate_latest(self.registry).decode("utf-8")

    def serve_http(self, port: int = 0, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` from a daemon thread; returns the port (``port=0``: a free one)."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # ---- engine events --------------------------------------------------------------------------
    def after_ingest(self, ingested: Ingested) -> None:
        self.records.inc(len(ingested.records))
        self.decode_seconds.inc(ingested.seconds)
        for rej in ingested.rejections:
            r = ingested.records[rej.index]
            seen = self._bad_seen[rej.reason] = self._bad_seen.get(rej.reason, 0) + 1
            logged = self._bad_logged.get(rej.reason, 0)
            if logged < 20 or seen & (seen - 1) == 0:
                log.warning("bad message at %s:%d@%d: %s: %s%s", r.topic, r.partition, r.offset, rej.reason,
                            rej.detail, " (dead-lettered)" if self.dead_letters else "")
                self._bad_logged[rej.reason] = logged + 1
            self.bad.labels(reason=rej.reason).inc()

    def after_learn(self, step: Step) -> None:
        self.learned.inc(step.batch)
        self.minibatches.inc()
        self.step_seconds.observe(step.seconds)
        self.model_step.set(step.model_step)
        self.model_learned.set(step.learned_samples)
        if step.grown is not None:
            log.info("labels up to %d seen: the model now has %d classes (was %d)", step.grown[1] - 1,
                     step.grown[1], step.grown[0])
        if step.evaluation is not None:
            self.record_evaluation(step.evaluation)

    def record_evaluation(self, ev: Any) -> None:
        """Gauges of one scoring of the evaluation set (`amstream.serve.continual.Evaluation`)."""
        self.evaluations.labels(reason=ev.reason).inc()
        for t, a in ev.accuracies.items():
            self.task_accuracy.labels(task=str(t)).set(a)
        self.task_forgetting.clear()
        for t, f in ev.forgetting.items():
            self.task_forgetting.labels(task=str(t)).set(f)
        self.continual_accuracy.set(ev.average_accuracy)
        self.continual_forgetting.set(ev.average_forgetting)

    # ---- runner events --------------------------------------------------------------------------
    def after_assign(self, partitions: List[TopicPartition], seek: Offsets, absent: List[TopicPartition],
                     absent_policy: str) -> None:
        if seek:
            log.info("assigned %s; resuming at %s", _fmt_tps(partitions), _fmt_offsets(seek))
        if absent and absent_policy == "committed":
            log.info("partitions %s are not in the checkpoint: starting at the group's committed offset, "
                     "or the beginning", _fmt_tps(absent))
        self.assigned.set(len(partitions))

    def after_revoke(self, partitions: List[TopicPartition], offsets: Offsets) -> None:
        log.info("revoking %s at %s", _fmt_tps(partitions), _fmt_offsets(offsets))

    def after_rewind(self, partition: TopicPartition, offset: int, expected: int, why: str) -> None:
        where = (f"restarted at offset {offset}, below the next offset {expected} already taken" if why == "reset"
                 else f"now ends below the next offset {expected} in our state")
        log.warning("partition `%s:%d` %s: the broker lost its data (a restarted in-memory broker, a deleted and "
                    "recreated topic). Its records from offset %d on are new data and will be learned (the model "
                    "keeps everything learned so far)", partition[0], partition[1], where, offset)
        self.rewinds.labels(topic=partition[0], partition=str(partition[1])).inc()

    def after_checkpoint(self, reason: str, path: Optional[str], seconds: float, learned: int,
                         offsets: Offsets) -> None:
        self.checkpoints.inc()
        self.checkpoint_seconds.observe(seconds)
        if path is not None:
            self._last_checkpoint = time.time()
            self.checkpoint_time.set(self._last_checkpoint)
        log.debug("checkpoint %s (%s): %s samples learned, offsets %s", path, reason, f"{learned:,}",
                  _fmt_offsets(offsets))

    def after_checkpoint_failed(self, reason: str, error: BaseException) -> None:
        self.checkpoint_failures.inc()
        if reason == "close":
            log.warning("closing the source failed: %s", error)
        else:
            log.error("checkpoint (%s) not written: %s; the previous checkpoint stands, will retry", reason, error)

    def after_commit_failed(self, offsets: Offsets, error: Optional[BaseException]) -> None:
        self.commit_failures.inc()
        log.warning("offset commit of %s failed%s; the checkpoint holds the offsets", _fmt_offsets(offsets),
                    "" if error is None else f" ({type(error).__name__}: {error})")

    def after_source_error(self, error: BaseException, retry_in_s: Optional[float], learned: int) -> None:
        state = f"state kept: {learned:,} samples learned"
        if retry_in_s is None:
            self.source_errors.labels(kind="permanent").inc()
            log.error("stopping after an error no retry can fix; checkpointing what was learned (%s)", state)
        else:
            self.source_errors.labels(kind="transient").inc()
            log.warning("the source failed (%s); retrying in %.1f s (%s)", error, retry_in_s, state)

    def on_status(self, status: Status) -> None:
        now = time.monotonic()
        p = status.prequential
        if self._last_status is not None:
            t, n = self._last_status
            self.rate.set((status.learned_samples_this_run - n) / max(1e-9, now - t))
        self._last_status = (now, status.learned_samples_this_run)
        self.model_learned.set(status.learned_samples)
        self.model_step.set(status.model_step)
        if status.n_classes is not None:
            self.model_classes.set(status.n_classes)
        for window, acc, loss in (("total", p.accuracy, p.loss), ("recent", p.window_accuracy, p.window_loss)):
            self.accuracy.labels(window=window).set(acc)
            self.loss.labels(window=window).set(loss)
        self.buffered.set(status.buffered)
        if status.continual is not None and status.continual.counts:
            self.current_task.set(status.continual.current)
            for t, a in status.continual.prequential().items():
                self.task_prequential.labels(task=str(t)).set(a)
        wait = status.timers.get("poll_seconds", 0.0)
        self.poll_wait_seconds.inc(max(0.0, wait - self._wait_seconds))
        self._wait_seconds = wait
        self.lag.clear()
        for (topic, part), v in status.lag.items():
            if v is not None:
                self.lag.labels(topic=topic, partition=str(part)).set(v)
        self._progress_line(now, status)
        self._waiting_line(now, status)

    def _progress_line(self, now: float, status: Status) -> None:
        if self.log_every_s is None or now - self._last_line < self.log_every_s:
            return
        period, p = now - self._last_line, status.prequential
        rate = (status.learned_samples_this_run - self._line_learned) / period
        self._line_learned, self._last_line = status.learned_samples_this_run, now
        known = [v for v in status.lag.values() if v is not None]
        age = None if status.checkpoint_time is None else time.time() - status.checkpoint_time
        busy = status.timers.get("learn_seconds", 0.0) / max(1e-9, now - self._t0)
        log.info("learned %s samples (%s/s), prequential accuracy %s (recent %s), loss %s, bad %s, lag %s, "
                 "checkpoint %s, learner busy %.0f%%", f"{status.learned_samples:,}", f"{rate:,.0f}",
                 _fmt_float(p.accuracy), _fmt_float(p.window_accuracy), _fmt_float(p.window_loss),
                 f"{status.bad_messages:,}", f"{int(sum(known)):,}" if known else "?",
                 "none yet" if age is None else f"{age:.0f} s ago", 100 * busy)

    def _waiting_line(self, now: float, status: Status) -> None:
        """While nothing arrives: a line after 5 s, then at growing intervals (10 s doubling to 120 s)."""
        if status.idle_s == 0.0 and status.assigned:
            self._wait_every = 10.0
            return
        idle = status.idle_s if status.assigned else now - self._t0
        if status.exhausted or idle < 5.0 or now - self._last_wait_line < self._wait_every:
            return
        self._last_wait_line = now
        self._wait_every = min(2 * self._wait_every, 120.0)
        try:
            problem = status.health()
        except Exception as exc:  # a diagnosis must never stop the run
            problem = f"health check failed: {exc}"
        state = f"state kept: {status.learned_samples:,} samples learned"
        if problem:
            log.warning("no records for %.0f s: %s; waiting (%s)", idle, problem, state)
        elif not status.assigned:
            log.warning("no partitions assigned for %.0f s (topic missing, or the group is rebalancing); "
                        "waiting (%s)", idle, state)
        else:
            log.info("no new records for %.0f s; waiting (%s)", idle, state)

    def after_stop(self, summary: Dict[str, Any]) -> None:
        log.info("stopped (%s): %s samples learned in this run (%s in all), prequential accuracy %s, "
                 "%s bad messages, offsets %s", summary["stop_reason"] or "done",
                 f"{summary['learned_samples_this_run']:,}", f"{summary['learned_samples']:,}",
                 _fmt_float(summary["prequential_accuracy"]), f"{summary['bad_messages']:,}",
                 "{" + ", ".join(f"{k}={v}" for k, v in summary["offsets"].items()) + "}")


def _fmt_float(v: Optional[float]) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _fmt_tps(tps: List[TopicPartition]) -> str:
    return "[" + ", ".join(f"{t}:{p}" for t, p in sorted(tps)) + "]"


def _fmt_offsets(offsets: Offsets) -> str:
    return "{" + ", ".join(f"{t}:{p}={o}" for (t, p), o in sorted(offsets.items())) + "}"
