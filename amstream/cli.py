"""The `amstream` command line: one subcommand per job, each a thin wrapper.

Each subcommand lives in `amstream/commands/<name>.py` and exposes
``register(subparsers)``, which adds its parser and sets ``func``.  Command modules
import only argparse at module level; torch, Kafka, River and Avalanche are imported
inside the command functions, so ``amstream --version`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from amstream import __version__

# Modules under amstream.commands, in the order `amstream --help` lists them.
COMMANDS = (
    "demo",
    "train",
    "evaluate",
    "datasets",
    "serve",
    "produce",
    "broker",
    "continual",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amstream",
        description="Online alternating minimization (AM-Adam, AM-mem) for streams and continual learning.",
    )
    parser.add_argument("--version", action="version", version=f"amstream {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"amstream.commands.{name}")
        except ModuleNotFoundError as exc:  # a command still being built
            if exc.name != f"amstream.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line for amstream's own errors, full trace otherwise
        from amstream.exceptions import AmstreamError

        if isinstance(exc, AmstreamError):
            print(f"amstream {args.command}: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
