"""`noisy-student gc`: remove the shard files no manifest or run names."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    gc = sub.add_parser(
        "gc",
        help="list, then remove, shard files no manifest or run names (what killed writes "
        "leave behind), in a dataset or an artifacts root",
    )
    gc.add_argument("url", metavar="DATASET_OR_ARTIFACTS_URL", help="a folder at any fsspec URL")
    gc.add_argument(
        "--older-than",
        default="1d",
        metavar="AGE",
        help="only files at least this old, e.g. 12h, 30m, 0 (default 1d: a write still in "
        "progress keeps its shards)",
    )
    gc.add_argument("--dry-run", action="store_true", help="list only; remove nothing")
    gc.set_defaults(func=_gc)


def _gc(args: argparse.Namespace) -> None:
    from noisy_student.data import gc

    older_than = gc.parse_age(args.older_than)
    orphans = gc.find_orphans(args.url, older_than)
    for o in orphans:
        print(f"{o.url}  {gc.format_size(o.size)}  {gc.format_age(o.age_seconds)} old  {o.reason}")
    total = gc.format_size(sum(o.size for o in orphans))
    if args.dry_run:
        print(f"{len(orphans)} file(s), {total}, would be removed (--dry-run: nothing removed)")
        return
    gc.remove(orphans)
    print(f"{len(orphans)} file(s), {total}, removed")
