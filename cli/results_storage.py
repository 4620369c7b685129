"""`noisy-student results-storage`: a Prefect block for workers' task results."""

from __future__ import annotations

import argparse
from typing import Any

from cli.prefect_setup import prefect_defaults


def add_parser(sub: Any) -> None:
    res = sub.add_parser(
        "results-storage",
        help="save a Prefect block that keeps results at URL, for workers of prefect.yaml",
    )
    res.add_argument("url", help="e.g. s3://bucket/prefect-results")
    res.set_defaults(func=_results_storage)


def _results_storage(args: argparse.Namespace) -> None:
    from flows.events import use_result_storage

    prefect_defaults()
    slug = use_result_storage(args.url)
    print(f"block {slug} saved; give workers these variables:")
    print(f"PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK={slug}")
    print("PREFECT_RESULTS_PERSIST_BY_DEFAULT=true")
