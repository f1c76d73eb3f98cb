"""`amstream serve` as a library: an exactly-once `Engine`, the `Runner` that feeds it from a
source, and `Telemetry` (Prometheus metrics and log lines) fed by their events.

    engine = Engine(StreamModel(learner, codec), batch_size=64)
    runner = Runner(engine, FileSource("data.csv", n_classes=7), config=RunnerConfig(),
                    checkpoints=CheckpointManager("runs/ck"), events=Telemetry())
    summary = runner.run()

Modules: `amstream.serve.engine` (records in, minibatches out, state; no threads, no broker),
`amstream.serve.runner` (source lifecycle, prefetch thread, checkpoint schedule, signals,
retries), `amstream.serve.telemetry` (metrics and logs); for several processes learning one
model, `amstream.serve.lockstep` (what ranks agree on, the group's state; plain values) and
`amstream.serve.distributed` (`DistributedRunner` over ``torch.distributed``, imported on its
own). Importing this package imports torch, not Kafka.
"""
from amstream.serve.engine import (
    STATE_KIND,
    Engine,
    EngineEvents,
    Ingested,
    Prequential,
    Step,
    StreamModel,
    key_checksum,
    key_hashes,
    load_serve_checkpoint,
    topic_hash,
)
from amstream.serve.runner import Runner, RunnerConfig, RunnerEvents, Status
from amstream.serve.telemetry import Telemetry

__all__ = [
    "Engine",
    "EngineEvents",
    "Ingested",
    "Prequential",
    "Runner",
    "RunnerConfig",
    "RunnerEvents",
    "STATE_KIND",
    "Status",
    "Step",
    "StreamModel",
    "Telemetry",
    "key_checksum",
    "key_hashes",
    "load_serve_checkpoint",
    "topic_hash",
]
