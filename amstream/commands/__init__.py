"""Subcommands of the `amstream` CLI; see `amstream.cli`."""
