"""`amstream produce`: stream a dataset into a Kafka topic (created if missing).

Each sample becomes one message (JSON ``{"x": [...], "y": 3}`` or the binary codec), or
``--samples-per-message K`` samples become one binary message. Message keys are
``SPLIT-ROW`` (the row in the dataset's split), so the default partitioner spreads rows over
partitions by key.

The broker is ``localhost:9092`` unless ``--bootstrap-servers`` says otherwise (the same place
``amstream serve`` reads by default).

``--benchmark`` streams a continual task sequence instead (the benchmarks of ``amstream
continual``): each task's training samples in turn, in the order ``amstream continual
--benchmark ... --seed S`` learns them (`amstream.continual.training_order`), each message naming
its task (JSON ``"task"``, binary header version 2; ``--no-task-ids`` leaves it out), and
``--eval-file`` writes every task's test samples with their task ids for ``serve --eval-source``.

Examples::

    amstream produce --dataset mnist --topic samples --codec binary
    amstream produce --dataset covertype --limit 100000 --standardize --topic cov --partitions 4 \\
        --bootstrap-servers kafka:9092 --codec binary --samples-per-message 32 --rate 20000 \\
        --producer-config compression_type=zstd
    amstream produce --benchmark split-mnist --topic tasks --codec binary --eval-file runs/split-test.npz
"""
from __future__ import annotations

import argparse

from amstream.commands import common
from amstream.continual import BENCHMARKS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("produce", help="stream a dataset into a Kafka topic (JSON or binary messages)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="dataset name (see `amstream datasets`) or a .csv/.npz path")
    src.add_argument("--benchmark", choices=list(BENCHMARKS),
                     help="a continual task sequence (see `amstream continual`): task by task, with task ids")
    p.add_argument("--topic", required=True)
    p.add_argument("--bootstrap-servers", default="localhost:9092", metavar="HOST:PORT",
                   help="Kafka brokers (default localhost:9092)")
    p.add_argument("--split", default="train", choices=("train", "test", "all"),
                   help="which rows (all: train then test)")
    p.add_argument("--limit", type=int, default=None, help="produce only the first N samples (after shuffling)")
    p.add_argument("--rate", type=float, default=None, help="samples per second (default: as fast as possible)")
    p.add_argument("--codec", default="json", choices=("json", "binary"))
    p.add_argument("--samples-per-message", type=int, default=1, help="binary codec: pack K samples per message")
    p.add_argument("--partitions", type=int, default=1, help="partitions when the topic is created")
    p.add_argument("--shuffle", action="store_true", help="shuffle the rows (with --seed)")
    p.add_argument("--seed", type=int, default=None,
                   help="--shuffle's seed (default 1); with --benchmark, the seed of the subsets and of the order "
                        "(default 0, as `amstream continual`)")
    b = p.add_argument_group("task sequences (--benchmark)")
    b.add_argument("--experiences", type=int, default=None, metavar="N", help="only the first N tasks")
    b.add_argument("--epochs", type=int, default=1, help="passes over each task's samples (default 1)")
    b.add_argument("--train-per-class", type=int, default=None, metavar="N",
                   help="a random subset of N training samples per class (as `amstream continual`)")
    b.add_argument("--test-per-class", type=int, default=None, metavar="N",
                   help="a random subset of N test samples per class, for --eval-file")
    b.add_argument("--no-task-ids", action="store_true", help="messages do not say which task they belong to")
    b.add_argument("--eval-file", default=None, metavar="PATH",
                   help="write every task's test samples with their task ids (.npz) for `serve --eval-source`")
    p.add_argument("--standardize", action="store_true",
                   help="standardize features with the training split's mean and std")
    p.add_argument("--no-keys", action="store_true", help="send messages without keys (sticky partitioning)")
    p.add_argument("--producer-config", action="append", default=[], metavar="KEY=VALUE",
                   help="kafka-python producer setting (repeatable), e.g. acks=1")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _dataset_blocks(args: argparse.Namespace):
    """``(description, n_features, n_classes, n_samples, blocks)`` of ``--dataset``: blocks of
    ``(X, y, tasks, keys)`` in the order they are produced."""
    import numpy as np

    from amstream.datasets import load_dataset
    from amstream.training import Preprocessor

    data = load_dataset(args.dataset)
    if args.split == "train":
        X, y = data.x_train, data.y_train
    elif args.split == "test":
        X, y = data.x_test, data.y_test
    else:
        X, y = data.as_stream()
    rows = np.arange(len(X))
    if args.split == "all":
        names = np.where(rows < data.n_train, "train", "test")
        local = np.where(rows < data.n_train, rows, rows - data.n_train)
    else:
        names, local = np.full(len(X), args.split), rows
    if args.shuffle:
        rows = np.random.default_rng(1 if args.seed is None else args.seed).permutation(len(X))
    if args.limit is not None:
        rows = rows[: args.limit]
    X, y = X[rows], y[rows]
    if args.standardize:
        X = Preprocessor.fit(data.x_train)(X)
    keys = None if args.no_keys else [f"{n}-{i}".encode() for n, i in zip(names[rows], local[rows])]
    return f"{data.name} {args.split}", data.n_features, data.n_classes, len(X), [(X, y, None, keys)]


def _benchmark_blocks(args: argparse.Namespace):
    """As `_dataset_blocks`, for ``--benchmark``: each task's training samples in the order of
    `amstream.continual.training_order`, one block per task and epoch; writes ``--eval-file``."""
    import numpy as np

    from amstream.continual import make_tasks, training_order
    from amstream.exceptions import ConfigError

    if args.split != "train" or args.shuffle or args.limit is not None or args.standardize:
        raise ConfigError("`--benchmark` streams each task's training split in its training order: "
                          "`--split`, `--shuffle`, `--limit` and `--standardize` do not apply")
    if args.epochs < 1 or (args.experiences is not None and args.experiences < 1):
        raise ConfigError("`--epochs` and `--experiences` must be >= 1")
    seed = 0 if args.seed is None else args.seed
    tasks = make_tasks(args.benchmark, train_per_class=args.train_per_class, test_per_class=args.test_per_class,
                       seed=seed)[: args.experiences]
    if args.eval_file:
        from pathlib import Path

        Path(args.eval_file).parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.eval_file, X=np.concatenate([t.inputs("test") for t in tasks]),
                 y=np.concatenate([t.y_test for t in tasks]),
                 task=np.concatenate([np.full(t.n_test, t.label, dtype=np.int64) for t in tasks]))
        common.log(args, f"wrote the test samples of {len(tasks)} tasks to `{args.eval_file}`")

    def blocks():
        for t, task in enumerate(tasks):
            for epoch in range(args.epochs):
                order = training_order(task.n_train, seed=seed, task=t, epoch=epoch)
                ids = None if args.no_task_ids else np.full(len(order), task.label, dtype=np.int64)
                keys = None if args.no_keys else [f"{args.benchmark}-t{t}-e{epoch}-{i}".encode() for i in order]
                yield task.inputs("train")[order], task.y_train[order], ids, keys

    d = int(tasks[0].x_train.shape[1])
    n = sum(t.n_train for t in tasks) * args.epochs
    what = f"{args.benchmark} ({len(tasks)} tasks{', no task ids' if args.no_task_ids else ''}, seed {seed})"
    return what, d, max(c for t in tasks for c in t.classes) + 1, n, blocks()


def run(args: argparse.Namespace) -> int:
    import sys
    import time

    from amstream.commands.serve import setup_logging
    from amstream.connectors.codec import make_codec
    from amstream.connectors.kafka import create_topic, make_producer, produce_samples
    from amstream.exceptions import ConfigError

    setup_logging("warning")
    if args.samples_per_message < 1:
        raise ConfigError(f"`--samples-per-message` must be >= 1, got `{args.samples_per_message}`")
    if args.samples_per_message > 1 and args.codec != "binary":
        raise ConfigError("`--samples-per-message` needs `--codec binary`")
    if args.rate is not None and args.rate <= 0:
        raise ConfigError(f"`--rate` must be > 0, got `{args.rate}`")
    if args.benchmark is None and (args.eval_file or args.no_task_ids or args.experiences is not None
                                   or args.train_per_class is not None or args.test_per_class is not None):
        raise ConfigError("`--eval-file`, `--no-task-ids`, `--experiences` and `--*-per-class` need `--benchmark`")
    what, n_features, n_classes, total, blocks = (_benchmark_blocks if args.benchmark else _dataset_blocks)(args)
    codec = make_codec(args.codec, n_features, n_classes)
    created = create_topic(args.topic, partitions=args.partitions, bootstrap_servers=args.bootstrap_servers)
    common.log(args, f"{'created' if created else 'using existing'} topic `{args.topic}`"
                     f"{f' ({args.partitions} partitions)' if created else ''}; producing {total:,} "
                     f"{what} samples as {args.codec} ({args.samples_per_message} per message) to "
                     f"{args.bootstrap_servers}")
    producer = make_producer(args.bootstrap_servers, **common.parse_key_values(args.producer_config, "--producer-config"))
    k = args.samples_per_message
    chunk = max(k, int(args.rate / 10) // k * k if args.rate else 10000 // k * k)
    bar = None
    if not args.no_progress and not args.json and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="sample", desc="produce")
    n_messages = done = 0
    t0 = time.perf_counter()
    try:
        for X, y, tasks, keys in blocks:
            for start in range(0, len(X), chunk):
                stop = min(len(X), start + chunk)
                n_messages += produce_samples(args.topic, X[start:stop], y[start:stop], codec=codec,
                                              bootstrap_servers=args.bootstrap_servers, producer=producer,
                                              keys=None if keys is None else keys[start:stop],
                                              samples_per_message=k, tasks=None if tasks is None else tasks[start:stop])
                done += stop - start
                if bar is not None:
                    bar.update(stop - start)
                if args.rate:
                    ahead = done / args.rate - (time.perf_counter() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
        producer.flush()
    finally:
        producer.close(timeout=10)
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - t0
    result = {"topic": args.topic, "samples": int(done), "messages": n_messages, "codec": args.codec,
              "samples_per_message": k, "seconds": round(wall, 3),
              "samples_per_second": round(done / wall, 1) if wall > 0 else None,
              "dataset": args.dataset, "benchmark": args.benchmark, "split": args.split, "n_features": n_features,
              "n_classes": n_classes, "eval_file": args.eval_file, "bootstrap_servers": args.bootstrap_servers}
    common.emit(args, result, human=f"produced {done:,} samples in {n_messages:,} messages to `{args.topic}` "
                                    f"in {wall:.1f} s ({done / max(wall, 1e-9):,.0f} samples/s)")
    return 0
