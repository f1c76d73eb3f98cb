"""`amstream serve`: learn from a Kafka topic (or a file), test-then-train, exactly once.

Each minibatch is predicted before it is learned (prequential score), then learned with one
update. The learner state and the offsets are checkpointed together, atomically; a restart
resumes from the newest valid checkpoint, so every sample is learned exactly once even after
``kill -9``. SIGTERM / Ctrl-C finish the minibatch, checkpoint, commit and exit 0 (a second
one interrupts at once). An error no retry can fix (records in a codec this machine cannot
read, a corrupt batch, a refused authorization, a missing topic with auto-create off) stops
serve after checkpointing, with one message and exit code 1, and so do a partition that lost
records at the broker (``--on-data-loss``), checkpoints that cannot be written
(``--max-checkpoint-failures``) and a checkpoint directory whose checkpoints are all unreadable
(``--allow-fresh-start``); a broker that is down is retried with backoff.

Examples::

    amstream broker &                                   # or any Kafka cluster on localhost:9092
    amstream produce --dataset mnist --topic samples --codec binary
    amstream serve --topic samples                      # sizes from the first valid message,
                                                        # classes grown as labels appear
    amstream serve --topic samples --bootstrap-servers kafka:9092 --group-id mnist \\
        --n-features 784 --n-classes 10 --arch 784-256-256-10 --batch-size 64 \\
        --checkpoint-dir runs/serve --metrics-port 9100 --dead-letter-topic samples.dlq --json

    # two processes in one consumer group learning one model (README "Several processes"):
    torchrun --nproc-per-node 2 --max-restarts 3 .venv/bin/amstream serve --distributed \\
        --topic samples --n-features 784 --n-classes 10 --checkpoint-dir runs/dist

    # the same loop on a file, resumable:
    amstream serve --source covtype.csv --n-classes 7 --checkpoint-dir runs/covtype

    # a task sequence (continual learning): per-task accuracy and forgetting on held-out samples
    amstream produce --benchmark permuted-mnist --topic tasks --eval-file runs/permuted-test.npz
    amstream serve --topic tasks --algo am-mem --n-features 784 --n-classes 10 \
        --eval-source runs/permuted-test.npz --checkpoint-dir runs/permuted --json

Messages are JSON ``{"x": [...], "y": 3}`` or the binary codec (see README "Message formats"),
compressed or not (gzip, snappy, lz4, zstd); ``--codec auto`` (default) takes both formats. A
restart needs only ``--checkpoint-dir`` and the input flags: the model and its sizes come from
the checkpoint.
"""
from __future__ import annotations

import argparse

from amstream.commands import common


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="learn from a Kafka topic or a file, exactly once, with checkpoints",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--topic", action="append", default=[], metavar="NAME",
                   help="Kafka topic to learn from (repeatable, or comma-separated)")
    g.add_argument("--bootstrap-servers", default="localhost:9092", metavar="HOST:PORT",
                   help="Kafka brokers (default localhost:9092)")
    g.add_argument("--group-id", default="amstream", help="consumer group (default amstream)")
    g.add_argument("--source", default=None, metavar="PATH",
                   help="learn from a .csv/.tsv/.jsonl/.npz file instead of Kafka")
    g.add_argument("--label-column", default="-1",
                   help="CSV: the label's column, an index or a header name (default: the last)")
    g.add_argument("--codec", default="auto", choices=("auto", "json", "binary"),
                   help="Kafka message format; auto accepts JSON and binary (default)")
    g.add_argument("--max-message-bytes", type=int, default=1 << 20,
                   help="longer messages are rejected as oversize (default 1 MiB)")
    g.add_argument("--kafka-config", action="append", default=[], metavar="KEY=VALUE",
                   help="kafka-python setting for every client serve makes (consumer, producers, admin; "
                        "repeatable): TLS and SASL, e.g. security_protocol=SASL_SSL sasl_mechanism=SCRAM-SHA-512 "
                        "sasl_plain_username=me sasl_plain_password=... ssl_cafile=ca.pem")
    g.add_argument("--consumer-config", action="append", default=[], metavar="KEY=VALUE",
                   help="kafka-python consumer setting (repeatable), e.g. session_timeout_ms=10000")
    g.add_argument("--producer-config", action="append", default=[], metavar="KEY=VALUE",
                   help="kafka-python setting of the predictions / dead-letter producer (repeatable)")
    g.add_argument("--absent-partitions", default="committed", choices=("committed", "earliest"),
                   help="where partitions not in the checkpoint start: the group's committed offset "
                        "(else the beginning; default), or always the beginning")
    g.add_argument("--on-data-loss", default="stop", choices=("stop", "continue"),
                   help="a partition that ends below (or restarts below) the next offset to learn lost records: "
                        "stop with an error naming the offsets (default), or learn what it holds now as new data")
    s = p.add_argument_group("data sizes (default: from the stream; a checkpoint keeps them)")
    s.add_argument("--dataset", default=None, help="take the sizes from a known dataset (e.g. mnist, covertype)")
    s.add_argument("--n-features", type=int, default=None,
                   help="features per sample (default: from the first valid message)")
    s.add_argument("--n-classes", type=int, default=None,
                   help="classes, labels 0..n-1 (default: grown as labels appear, up to --max-classes)")
    s.add_argument("--max-classes", type=int, default=1000,
                   help="when classes grow: larger labels are rejected as label_out_of_range (default 1000)")
    s.add_argument("--task", default="classification", choices=("classification", "regression"))
    common.add_model_args(p)
    lp = p.add_argument_group("loop")
    lp.add_argument("--batch-size", type=int, default=64, help="samples per minibatch (one update each)")
    lp.add_argument("--max-samples", type=int, default=None, help="stop after learning this many samples in this run")
    lp.add_argument("--max-seconds", type=float, default=None, help="stop after this many seconds")
    lp.add_argument("--idle-exit", type=float, default=None, metavar="SECONDS",
                    help="stop when no record arrived for this long (default: run forever)")
    lp.add_argument("--flush-after", type=float, default=2.0, metavar="SECONDS",
                    help="learn a partial minibatch once caught up and idle this long (default 2)")
    lp.add_argument("--window", type=int, default=1000, help="samples in the windowed prequential score")
    ct = p.add_argument_group("task sequences (continual learning; README \"Task sequences\")")
    ct.add_argument("--eval-source", default=None, metavar="PATH",
                    help="held-out samples of every task with their task ids (.jsonl with a `task` field, .npz "
                         "with a `task` array; `amstream produce --benchmark ... --eval-file` writes one): scored "
                         "per task at the end of each task and every --eval-every samples, giving per-task "
                         "accuracy, forgetting and the accuracy matrix")
    ct.add_argument("--eval-every", type=int, default=50000, metavar="N",
                    help="also score the evaluation set every N learned samples (0: only when a task ends; "
                         "default 50000)")
    ct.add_argument("--eval-per-task", type=int, default=None, metavar="N",
                    help="score only the first N evaluation samples of each task (default: all)")
    ct.add_argument("--mixed-task-batches", action="store_true",
                    help="let a minibatch hold samples of several tasks (default: a change of the task id in the "
                         "stream ends the minibatch)")
    d = p.add_argument_group("several processes (see README \"Several processes\")")
    d.add_argument("--distributed", action="store_true",
                   help="be one rank of a group launched by torchrun that learns one model: "
                        "`torchrun --nproc-per-node N --max-restarts 3 .venv/bin/amstream serve --distributed ...`")
    d.add_argument("--dist-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="a collective that waits longer for a peer rank fails (default 120)")
    c = p.add_argument_group("checkpoints")
    c.add_argument("--checkpoint-dir", default=None, help="checkpoints (state + offsets); resume from here")
    c.add_argument("--checkpoint-every-batches", type=int, default=100,
                   help="checkpoint once this many minibatches are learned (0: not by count; default 100), "
                        "at the end of the minibatch or two taken at a time")
    c.add_argument("--checkpoint-every-seconds", type=float, default=30.0,
                   help="... or this many seconds after the last one, whichever comes first (0: not by time; "
                        "default 30)")
    c.add_argument("--keep-checkpoints", type=int, default=3)
    c.add_argument("--allow-fresh-start", action="store_true",
                   help="when every checkpoint in --checkpoint-dir is unreadable, start a new model from the "
                        "group's committed offsets (default: stop with an error, as the model is lost)")
    c.add_argument("--max-checkpoint-failures", type=int, default=5, metavar="N",
                   help="stop with an error after N checkpoints in a row could not be written (a full or "
                        "read-only disk), retried with backoff in between (default 5)")
    o = p.add_argument_group("outputs")
    o.add_argument("--predictions-topic", default=None, help="write one JSON prediction per sample here")
    o.add_argument("--dead-letter-topic", default=None, help="write rejected messages here, with the reason")
    o.add_argument("--dead-letter-max-bytes", type=int, default=1_000_000, metavar="BYTES",
                   help="a rejected message larger than this is dead-lettered with its value cut to fit and "
                        "headers amstream.truncated (its full length) and amstream.sha256 (default 1000000, "
                        "under Kafka's default message.max.bytes)")
    o.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (0: a free port)")
    o.add_argument("--metrics-host", default="127.0.0.1", metavar="ADDRESS",
                   help="address the metrics endpoint listens on (default 127.0.0.1, this machine only; "
                        "0.0.0.0 for every interface)")
    o.add_argument("--log-every", type=float, default=10.0, metavar="SECONDS", help="progress log period")
    o.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    common.add_run_args(p)
    p.set_defaults(func=run)


def setup_logging(level: str = "info") -> None:
    """Log lines to stderr; kafka-python's own loggers only from WARNING (ERROR unless debugging)."""
    import logging

    import sys

    class StderrHandler(logging.StreamHandler):
        """Writes to whatever `sys.stderr` is when a record is logged (not when it was made)."""

        _amstream = True

        @property  # type: ignore[override]
        def stream(self):
            return sys.stderr

        @stream.setter
        def stream(self, value) -> None:
            pass

    lvl = getattr(logging, level.upper())
    root = logging.getLogger()
    if not any(getattr(h, "_amstream", False) for h in root.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(lvl)
    # amstream's own loggers follow the level asked for now, whatever an earlier call in this
    # process (e.g. `demo`'s quieter setting) left on them
    logging.getLogger("amstream").setLevel(lvl)
    kafka = logging.getLogger("kafka")
    kafka.setLevel(logging.DEBUG if lvl <= logging.DEBUG else logging.ERROR)
    if lvl > logging.DEBUG and not any(isinstance(f, _Throttle) for f in kafka.filters):
        kafka.addFilter(_Throttle())


class _Throttle:
    """Lets each kafka-python message template through once a minute: a lost broker makes the
    client log the same connection errors many times a second (serve logs its own summary)."""

    def __init__(self, period_s: float = 60.0) -> None:
        self.period_s = period_s
        self.last: dict = {}

    def filter(self, record) -> bool:
        import re
        import time

        key = (record.name, re.sub(r"[\d<>\[\]().:_-]+|node_id=\S+", "", record.getMessage())[:80])
        now = time.monotonic()
        if now - self.last.get(key, -1e9) < self.period_s:
            return False
        self.last[key] = now
        return True


def _sizes(args: argparse.Namespace):
    """(n_features or None, n_classes or None) from --dataset / --n-features / --n-classes."""
    from amstream.exceptions import ConfigError

    n_features, n_classes = args.n_features, args.n_classes
    if args.dataset:
        from amstream.datasets import DATASETS

        spec = DATASETS.get(args.dataset.replace("-", "_").lower())
        if spec is None:
            from amstream.datasets import load_dataset

            data = load_dataset(args.dataset, limit=10)
            nf, nc = data.n_features, data.n_classes
        else:
            nf, nc = spec.n_features, spec.n_classes
        if n_features is not None and n_features != nf:
            raise ConfigError(f"`--n-features {n_features}` contradicts `--dataset {args.dataset}` ({nf} features)")
        n_features = nf
        n_classes = n_classes if n_classes is not None else nc
        if nc is None:
            args.task = "regression"
    if args.task == "classification" and n_classes is not None and n_classes < 1:
        raise ConfigError(f"`--n-classes` must be >= 1, got `{n_classes}`")
    return n_features, n_classes


def _classes(args: argparse.Namespace, restored, n_features, n_classes):
    """``(classification, grow, cap)``: whether classes grow as labels appear and the codec's class
    count (the cap on labels when they grow); a checkpoint's sizes win over the flags, which must
    agree with them."""
    from amstream.exceptions import ConfigError

    if restored is None:
        classification = args.task == "classification"
        grow = classification and n_classes is None
        if grow and args.max_classes < 2:
            raise ConfigError(f"`--max-classes` must be >= 2, got `{args.max_classes}`")
        return classification, grow, (args.max_classes if grow else n_classes) if classification else None
    learner, state, _ = restored
    classification = learner.config.loss == "ce"
    sizes = state.get("sizes") or {"n_features": learner.n_inputs, "grow_classes": False,
                                   "n_classes": learner.n_outputs if classification else None}
    for flag, given, kept in (("--n-features", n_features, sizes["n_features"]),
                              ("--n-classes", n_classes, None if sizes["grow_classes"] else sizes["n_classes"])):
        if given is not None and given != kept:
            raise ConfigError(f"`{flag} {given}` contradicts the checkpoint in `{args.checkpoint_dir}` "
                              f"({'classes grown as labels appear' if kept is None else kept})")
    return classification, bool(sizes["grow_classes"]), sizes["n_classes"]


def _model(args: argparse.Namespace, device, restored, n_features, n_classes, classes, file_source):
    """The `StreamModel`: from the checkpoint, from the flags, or sized by the stream itself."""
    from amstream.config import parse_arch
    from amstream.connectors.codec import make_codec
    from amstream.network import parse_network
    from amstream.learner import make_learner
    from amstream.serve import StreamModel

    classification, grow, cap = classes
    learner = restored[0] if restored is not None else None

    def build(d: int):
        k0 = (n_classes or 2) if classification else 1
        full = parse_arch(common.expand_arch(args.arch, d, k0)) if args.arch else ()
        if grow and isinstance(full, str):
            k0 = parse_network(full).n_outputs  # a network spec (lenet5, ...) names its outputs
        elif grow and len(full) > 2 and full[0] == d:
            k0 = full[-1]  # a full --arch names the classes to start with
        config = common.config_from_args(args, n_inputs=d, n_outputs=k0, loss="ce" if classification else "mse")
        return make_learner(config, device=device)

    codec = file_source.codec if file_source is not None else None
    if codec is None and (learner is not None or n_features is not None):
        codec = make_codec(args.codec, learner.n_inputs if learner is not None else n_features, cap,
                           max_bytes=args.max_message_bytes)
    return StreamModel(learner, codec, build=build, codec_name=args.codec,
                       codec_options={"n_classes": cap, "max_bytes": args.max_message_bytes}, grow_classes=grow)


def _join(args: argparse.Namespace, device, topics):
    """``(ranks, device, restored)`` of a rank: the group joined, this rank's device, and the
    group's checkpoint (read by rank 0, sent to the others) as ``load_serve_checkpoint`` gives it."""
    import torch

    from amstream.exceptions import ConfigError
    from amstream.learner import learner_from_state
    from amstream.serve.distributed import join_group, local_rank, restore

    if not topics:
        raise ConfigError("`--distributed` learns Kafka topics (`--topic`) in one consumer group: a file is one "
                          "partition, which one rank would read alone")
    ranks = join_group(timeout_s=args.dist_timeout)
    if device.type == "cuda":  # one GPU per rank on a machine
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    state = restore(ranks, args.checkpoint_dir, strict=not args.allow_fresh_start)
    return ranks, device, None if state is None else (learner_from_state(state["learner"], device=device), state, {})


def _facts(args: argparse.Namespace, engine, topics) -> dict:
    """What every rank of a group must have alike."""
    from amstream.serve.lockstep import model_digest

    learner = engine.learner
    return {"topics": sorted(topics), "group_id": args.group_id, "batch_size": args.batch_size,
            "config": None if learner is None else learner.config.to_dict(),
            "model": None if learner is None else model_digest(learner.state_dict())}


def kafka_configs(args: argparse.Namespace) -> dict:
    """The settings of each Kafka client serve makes: ``{"consumer": ..., "producer": ..., "admin": ...}``,
    each ``--kafka-config`` (security) updated by its own flag's."""
    shared = common.parse_key_values(args.kafka_config, "--kafka-config")
    return {"consumer": {**shared, **common.parse_key_values(args.consumer_config, "--consumer-config")},
            "producer": {**shared, **common.parse_key_values(args.producer_config, "--producer-config")},
            "admin": dict(shared)}


def _continual(args: argparse.Namespace, restored, n_features, classes):
    """The engine's `Continual`: with the evaluation set of ``--eval-source`` when given."""
    from amstream.serve.continual import Continual, EvalSet

    if not args.eval_source:
        return Continual()
    if restored is not None:
        n_features = restored[0].n_inputs
    eval_set = EvalSet.from_file(args.eval_source, n_features=n_features, n_classes=classes[2],
                                 per_task=args.eval_per_task)
    if n_features is not None and eval_set.n_features != n_features:
        from amstream.exceptions import ConfigError

        raise ConfigError(f"`--eval-source {args.eval_source}` has `{eval_set.n_features}` features, the model "
                          f"`{n_features}`")
    import logging

    logging.getLogger("amstream.serve").info("evaluation set `%s`: %s", args.eval_source, eval_set.describe())
    return Continual(eval_set, eval_every=args.eval_every or None)


def run(args: argparse.Namespace) -> int:
    import functools
    import json
    import logging

    from amstream.checkpoint import CheckpointManager
    from amstream.exceptions import CheckpointError, CheckpointsLostError, ConfigError, StreamError
    from amstream.serve import Engine, Runner, RunnerConfig, Telemetry, load_serve_checkpoint

    setup_logging(args.log_level)
    log = logging.getLogger("amstream.serve")
    device = common.setup_runtime(args)
    topics = [t.strip() for item in args.topic for t in item.split(",") if t.strip()]
    if bool(topics) == bool(args.source):
        raise ConfigError("give `--topic` (Kafka) or `--source PATH` (a file), not both and not neither")
    n_features, n_classes = _sizes(args)
    if args.eval_source and args.distributed:
        raise ConfigError("`--eval-source` is not supported with `--distributed`")
    if args.eval_every < 0 or (args.eval_per_task is not None and args.eval_per_task < 1):
        raise ConfigError("`--eval-every` must be >= 0 and `--eval-per-task` >= 1")

    # 1. the model: from the checkpoint when there is one, else from the flags or the stream
    ranks = None
    try:
        if args.distributed:
            ranks, device, restored = _join(args, device, topics)
        else:
            restored = load_serve_checkpoint(args.checkpoint_dir, device=device, strict=not args.allow_fresh_start) \
                if args.checkpoint_dir else None
    except CheckpointsLostError as exc:
        raise CheckpointsLostError(f"{exc}. Nothing was read from the stream. To start a new model from the group's "
                              f"committed offsets anyway, pass `--allow-fresh-start`") from None
    classes = _classes(args, restored, n_features, n_classes)
    source = None
    if args.source:
        from amstream.connectors.files import FileSource

        if args.predictions_topic or args.dead_letter_topic:
            raise ConfigError("`--predictions-topic` and `--dead-letter-topic` need Kafka (`--topic`)")
        label = args.label_column
        label_column = None if label.lower() == "none" else (int(label) if label.lstrip("-").isdigit() else label)
        source = FileSource(args.source, n_features=restored[0].n_inputs if restored else n_features,
                            n_classes=classes[2], label_column=label_column, max_bytes=args.max_message_bytes)
    continual = _continual(args, restored, n_features, classes)
    if continual.eval_set is not None and n_features is None and restored is None:
        n_features = continual.eval_set.n_features  # the evaluation set fixes the feature count
    model = _model(args, device, restored, n_features, n_classes, classes, source)
    engine = Engine(model, batch_size=args.batch_size, window=args.window, keep_keys=bool(args.predictions_topic),
                    continual=continual, mixed_tasks=args.mixed_task_batches)
    if restored is not None:
        if ranks is None:  # (a rank takes its share of the state from its runner)
            engine.load_state_dict(restored[1])
        log.info("resuming %s %s from `%s` (%s samples learned)", model.learner.config.algo,
                 model.learner.config.arch_string(), args.checkpoint_dir,
                 f"{restored[1].get('counters', {}).get('learned_samples', 0):,}")

    # 2. sinks, telemetry
    producer = predictions = dead_letters = None
    clients = kafka_configs(args)
    if topics and (args.predictions_topic or args.dead_letter_topic):
        from amstream.connectors.kafka import DeadLetterSink, KafkaSink, create_topic, make_producer

        producer = make_producer(args.bootstrap_servers, connect_attempts=60, connect_backoff_s=1.0,
                                 **clients["producer"])
        for name in (args.predictions_topic, args.dead_letter_topic):
            if name:
                create_topic(name, partitions=1, bootstrap_servers=args.bootstrap_servers, **clients["admin"])
        if args.predictions_topic:
            predictions = KafkaSink(args.predictions_topic, bootstrap_servers=args.bootstrap_servers, producer=producer)
        if args.dead_letter_topic:
            dead_letters = DeadLetterSink(args.dead_letter_topic, bootstrap_servers=args.bootstrap_servers,
                                          producer=producer, max_bytes=args.dead_letter_max_bytes)
    telemetry = Telemetry(log_every_s=args.log_every or None, dead_letters=dead_letters is not None)
    if args.metrics_port is not None:
        port = args.metrics_port
        if ranks is not None and port:  # ranks on one machine: one port each, counted up from the one given
            from amstream.serve.distributed import local_rank

            port += local_rank()
        port = telemetry.serve_http(port, args.metrics_host)
        log.info("metrics at http://%s:%d/metrics", args.metrics_host, port)
    if not args.checkpoint_dir:
        log.warning("no `--checkpoint-dir`: the model is not saved, and a restart starts a new one")

    # 3. the source
    if source is None:
        from amstream.connectors.kafka import KafkaSource

        # a rank polls at every tick; a short poll interval bounds how long a rebalance waits for a
        # member that was killed (the group's rebalance timeout)
        consumer_config = {"max_poll_interval_ms": 30000} if ranks is not None else {}
        consumer_config.update(clients["consumer"])
        source = KafkaSource(topics, bootstrap_servers=args.bootstrap_servers, group_id=args.group_id,
                             consumer_config=consumer_config, connect_attempts=1, bootstrap_timeout_ms=2000)
    learner = model.learner
    log.info("serving %s %s (%s) from %s, batch %d, seed %d, device %s, threads %d",
             args.algo if learner is None else learner.config.algo,
             "sized by the first valid message" if learner is None else learner.config.arch_string(),
             "classes grown as labels appear" if model.grow_classes else "fixed classes",
             args.source or f"{','.join(topics)} @ {args.bootstrap_servers} (group {args.group_id})",
             args.batch_size, args.seed if learner is None else learner.config.seed, device, args.threads)
    writes = args.checkpoint_dir and (ranks is None or ranks.rank == 0)  # of a group, rank 0 writes
    if ranks is None:
        make_runner = Runner
    else:
        from amstream.serve.distributed import DistributedRunner

        ranks.check_same(_facts(args, engine, topics))
        make_runner = functools.partial(DistributedRunner, ranks=ranks, base=restored and restored[1])
    runner = make_runner(engine, source, checkpoints=CheckpointManager(args.checkpoint_dir, keep=args.keep_checkpoints)
                    if writes else None, predictions=predictions, dead_letters=dead_letters,
                    events=telemetry, config=RunnerConfig(
                        checkpoint_every_batches=args.checkpoint_every_batches,
                        checkpoint_every_seconds=args.checkpoint_every_seconds, max_samples=args.max_samples,
                        max_seconds=args.max_seconds, idle_exit_s=args.idle_exit, flush_after_s=args.flush_after,
                        absent_partitions=args.absent_partitions,
                        max_checkpoint_failures=args.max_checkpoint_failures, on_data_loss=args.on_data_loss))

    # 4. run, with SIGTERM / SIGINT handled (the first stops after the minibatch)
    failure = None
    bar = None

    def on_step(step):
        if bar is not None:
            bar.update(step.batch)
            if step.model_step % 10 == 0:
                bar.set_postfix(acc=f"{step.window_accuracy:.3f}", bad=step.bad_messages, refresh=False)
        if step.evaluation is not None and args.json:  # JSON lines: one per scoring, the summary last
            print(json.dumps(step.evaluation.as_dict()), flush=True)

    try:
        with runner.signals_handled():
            try:
                if common.show_progress(args):
                    from tqdm.auto import tqdm
                    from tqdm.contrib.logging import logging_redirect_tqdm

                    bar = tqdm(total=args.max_samples, unit="sample", desc="serve", dynamic_ncols=True, smoothing=0.1)
                    with logging_redirect_tqdm():
                        result = runner.run(on_step=on_step)
                else:
                    result = runner.run(on_step=on_step)
            except (StreamError, CheckpointError) as exc:  # permanent: reported after the summary
                failure, result = exc, runner.summary()
    finally:
        if bar is not None:
            bar.close()
        if producer is not None:
            producer.close(timeout=2)  # the runner flushed the sinks at its last checkpoint
        telemetry.close()
    learner = model.learner
    if engine.continual.active:
        final = engine.continual.finish(learner) if learner is not None else None
        if final is not None and args.json:
            print(json.dumps(final.as_dict()), flush=True)
        result["continual"] = engine.continual.summary()
    result.update(algo=args.algo if learner is None else learner.config.algo,
                  arch=None if learner is None else learner.config.arch_string(),
                  seed=args.seed if learner is None else learner.config.seed, device=str(device), threads=args.threads)
    acc = result["prequential_accuracy"]
    group = (f"rank {ranks.rank} of {ranks.world_size} (the group: {result['group']['learned_samples']:,} samples "
             f"learned in all, model {result['model_digest']}): ") if ranks is not None else ""
    common.emit(args, result, human=(
        f"{group}learned {result['learned_samples_this_run']:,} samples in this run ({result['learned_samples']:,} in "
        f"all, {result['samples_per_second']:,.0f}/s), prequential accuracy "
        f"{'n/a' if acc is None else f'{acc:.4f}'}, {result['bad_messages']:,} bad messages"))
    if failure is not None:
        raise failure
    return 0
