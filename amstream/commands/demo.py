"""`amstream demo`: the whole streaming job on one machine, in about a minute.

1. starts the embedded Kafka-protocol broker (Tansu, in memory) on a free port;
2. produces the first ``--samples`` MNIST training images into the topic ``samples``
   (binary codec, 8 images per message), while
3. ``serve`` learns them in a consumer group: AM-Adam, 784-256-256-10, minibatches of 64,
   each predicted before it is learned (prequential accuracy), with checkpoints of state
   and offsets in ``OUT/checkpoints``;
4. evaluates the learned model on the held-out MNIST test set (10,000 images);
5. writes ``OUT/prequential_accuracy.png`` (and ``.csv``) and ``OUT/summary.json``, and stops
   the broker.

Examples::

    amstream demo
    amstream demo --samples 3000 --out /tmp/demo --json
"""
from __future__ import annotations

import argparse

from amstream.commands import common


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="broker + producer + serve on MNIST, then the held-out test accuracy",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=20000, help="MNIST training samples to stream (default 20,000)")
    p.add_argument("--out", default="runs/demo", help="checkpoints, curve PNG/CSV and summary go here")
    p.add_argument("--arch", default="784-256-256-10")
    p.add_argument("--algo", default="am-adam")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--partitions", type=int, default=1, help="partitions of the `samples` topic")
    p.add_argument("--samples-per-message", type=int, default=8,
                   help="images per binary message (1: one message per image)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import threading
    import time
    from pathlib import Path


    from amstream.checkpoint import CheckpointManager
    from amstream.commands.serve import setup_logging
    from amstream.config import AMConfig
    from amstream.connectors.broker import EmbeddedBroker
    from amstream.connectors.codec import BinaryCodec
    from amstream.connectors.kafka import KafkaSource, produce_samples
    from amstream.datasets import load_dataset
    from amstream.exceptions import ConfigError
    from amstream.learner import make_learner
    from amstream.serve import Engine, Runner, RunnerConfig, StreamModel
    from amstream.training import evaluate

    if args.samples < 1:
        raise ConfigError(f"`--samples` must be >= 1, got `{args.samples}`")
    if args.samples_per_message < 1:
        raise ConfigError(f"`--samples-per-message` must be >= 1, got `{args.samples_per_message}`")
    setup_logging("warning")
    device = common.setup_runtime(args)
    t_start = time.perf_counter()
    out = Path(args.out)
    ckpt_dir = out / "checkpoints"
    stale = list(ckpt_dir.glob("step-*.ckpt")) if ckpt_dir.is_dir() else []
    for p in stale:  # a fresh broker starts at offset 0: an old checkpoint's offsets would skip it all
        p.unlink()
    if stale:
        common.log(args, f"removed {len(stale)} checkpoint(s) of an earlier demo from {ckpt_dir}")

    data = load_dataset("mnist")
    n = min(args.samples, data.n_train)
    X, y = data.x_train[:n], data.y_train[:n]
    config = AMConfig(arch=args.arch, algo=args.algo, seed=args.seed)
    if config.arch[0] != 784 or config.arch[-1] != 10:
        raise ConfigError(f"`--arch {args.arch}` must start with 784 and end with 10 for MNIST")
    learner = make_learner(config, device=device)
    codec = BinaryCodec(784, 10)

    with EmbeddedBroker() as broker:
        servers = broker.bootstrap_servers
        broker.create_topic("samples", partitions=args.partitions)
        common.log(args, f"[1/4] embedded Kafka broker at {servers}; topic `samples` "
                         f"({args.partitions} partition{'s' if args.partitions > 1 else ''})")
        produced: dict = {}

        def produce() -> None:
            t0 = time.perf_counter()
            try:
                keys = [b"train-%d" % i for i in range(n)]
                produced["messages"] = produce_samples("samples", X, y, codec=codec, bootstrap_servers=servers,
                                                       keys=keys, samples_per_message=args.samples_per_message)
            except Exception as exc:  # reported below; serve then stops when idle
                produced["error"] = exc
            produced["seconds"] = time.perf_counter() - t0

        producer = threading.Thread(target=produce, name="demo-producer", daemon=True)
        producer.start()
        k = args.samples_per_message
        common.log(args, f"[2/4] producing {n:,} MNIST training images (binary codec, {k} per message of "
                         f"{k * codec.message_size:,} bytes) while serve joins the consumer group")
        source = KafkaSource(["samples"], bootstrap_servers=servers, group_id="amstream-demo",
                             consumer_config={"session_timeout_ms": 6000})
        runner = Runner(Engine(StreamModel(learner, codec), batch_size=args.batch_size, window=1000), source,
                        checkpoints=CheckpointManager(ckpt_dir, keep=2),
                        config=RunnerConfig(checkpoint_every_batches=100, checkpoint_every_seconds=10,
                                            max_samples=n, idle_exit_s=20.0, flush_after_s=1.0))
        common.log(args, f"[3/4] serve: {config.algo} {config.arch_string()}, minibatches of {args.batch_size}, "
                         f"test-then-train, checkpoints in {ckpt_dir}")
        curve: list = []
        bar = None
        if common.show_progress(args):
            from tqdm.auto import tqdm

            bar = tqdm(total=n, unit="img", desc="serve", dynamic_ncols=True)

        def on_step(step) -> None:
            curve.append((step.learned_samples, step.window_accuracy, step.prequential_accuracy))
            if bar is not None:
                bar.update(step.batch)
                if step.model_step % 10 == 0:
                    bar.set_postfix(acc=f"{step.window_accuracy:.3f}", refresh=False)

        try:
            result = runner.run(on_step=on_step)
        finally:
            if bar is not None:
                bar.close()
        producer.join(timeout=60)
    if "error" in produced:
        raise produced["error"]

    common.log(args, "[4/4] evaluating on the held-out MNIST test set (10,000 images)")
    test = evaluate(learner, data.x_test, data.y_test)
    out.mkdir(parents=True, exist_ok=True)
    png = _plot(out / "prequential_accuracy.png", curve, test.get("accuracy"), config.arch_string(),
                args.batch_size)
    with open(out / "prequential_accuracy.csv", "w") as fh:
        fh.write("learned_samples,window_accuracy,cumulative_accuracy\n")
        for row in curve:
            fh.write(f"{row[0]},{row[1]:.6f},{row[2]:.6f}\n")
    summary = {
        "learned_samples": result["learned_samples"],
        "prequential_accuracy": result["prequential_accuracy"],
        "final_window_accuracy": result["window_accuracy"],
        "test_accuracy": test.get("accuracy"),
        "test_loss": test["loss"],
        "bad_messages": result["bad_messages"],
        "samples_per_second": result["samples_per_second"],
        "learn_seconds": result["learn_seconds"],
        "produce_seconds": round(produced.get("seconds", float("nan")), 3),
        "seconds": round(time.perf_counter() - t_start, 3),
        "algo": config.algo, "arch": config.arch_string(), "batch_size": args.batch_size, "seed": config.seed,
        "device": str(device), "threads": args.threads,
        "checkpoint": result["checkpoint"], "plot": str(png), "offsets": result["offsets"],
    }
    with open(out / "summary.json", "w") as fh:
        json.dump(summary, fh, indent=2)
    acc = summary["prequential_accuracy"]
    common.emit(args, summary, human=(
        f"\nlearned {summary['learned_samples']:,} of {n:,} MNIST images from Kafka "
        f"({summary['samples_per_second']:,.0f} images/s)\n"
        f"  prequential (test-then-train) accuracy: {acc:.4f} "
        f"(last 1,000: {summary['final_window_accuracy']:.4f})\n"
        f"  held-out MNIST test accuracy:          {summary['test_accuracy']:.4f}\n"
        f"  checkpoint: {summary['checkpoint']}\n  curve:      {png}\n"
        f"  total time: {summary['seconds']:.1f} s"))
    return 0


def _plot(path, curve, test_accuracy, arch, batch_size):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if curve:
        xs = [c[0] for c in curve]
        ax.plot(xs, [c[1] for c in curve], lw=1.2, label="prequential, last 1,000 samples")
        ax.plot(xs, [c[2] for c in curve], lw=1.8, label="prequential, cumulative")
    if test_accuracy is not None:
        ax.axhline(test_accuracy, color="k", ls="--", lw=1, label=f"held-out test accuracy {test_accuracy:.4f}")
    ax.set_xlabel("samples learned from the stream")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(f"AM-Adam {arch}, minibatch {batch_size}: MNIST streamed through Kafka")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
