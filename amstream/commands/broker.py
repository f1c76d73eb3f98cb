"""`amstream broker`: run the embedded Kafka-protocol broker (Tansu, in memory) in the foreground.

Prints the bootstrap address on stdout and runs until Ctrl-C or SIGTERM. Storage is in memory:
stopping the broker loses every topic, message and committed offset (serve's checkpoints keep
the model and its offsets). For tests and demos; use a real Kafka cluster in production.

Examples::

    amstream broker --port 9092
    amstream broker --port 9092 --topic samples:4 --topic samples.dlq
"""
from __future__ import annotations

import argparse

from amstream.commands import common


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("broker", help="run the embedded Kafka-protocol broker (in memory) until Ctrl-C",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=9092, help="TCP port (default 9092; 0: a free one)")
    p.add_argument("--host", default="127.0.0.1", help="listen and advertised address")
    p.add_argument("--topic", action="append", default=[], metavar="NAME[:PARTITIONS]",
                   help="create this topic at start (repeatable)")
    p.add_argument("--json", action="store_true", help="print the address as a JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import signal
    import threading

    from amstream.commands.serve import setup_logging
    from amstream.connectors.broker import EmbeddedBroker
    from amstream.exceptions import ConfigError

    setup_logging("warning")
    topics = []
    for item in args.topic:
        name, _, parts = item.partition(":")
        if not name or (parts and not parts.isdigit()):
            raise ConfigError(f"`--topic` takes NAME or NAME:PARTITIONS, got `{item}`")
        topics.append((name, int(parts or 1)))
    stop = threading.Event()
    received = []

    def on_signal(signum, frame):
        received.append(signal.Signals(signum).name)
        stop.set()

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    broker = EmbeddedBroker(port=args.port or None, host=args.host)
    try:
        broker.start()
        for name, parts in topics:
            broker.create_topic(name, partitions=parts)
        if args.json:
            print(json.dumps({"bootstrap_servers": broker.bootstrap_servers, "pid": broker.pid,
                              "topics": dict(topics)}), flush=True)
        else:
            print(broker.bootstrap_servers, flush=True)
            common.log(args, f"embedded broker (Tansu, in memory) listening at {broker.bootstrap_servers}"
                             f"{'; topics ' + ', '.join(f'{n}:{p}' for n, p in topics) if topics else ''}. "
                             "Ctrl-C stops it (and loses its data).")
        while not stop.wait(0.5):
            if not broker.running:
                common.log(args, "the embedded broker exited unexpectedly; its output ends with:\n"
                                 + broker.output_tail())
                return 1
    finally:
        broker.stop()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    common.log(args, f"broker stopped ({received[0] if received else 'done'})")
    return 0
