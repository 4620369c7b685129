"""`noisy-student`: run or serve the pipeline, ingest data, predict with a trained model.

The entry point sits above the flows (it starts them) and so outside the core: one module
per subcommand, each with its parser builder `add_parser` and the command it runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cli import gc, ingest, notifications, predict, results_storage, run, serve, serve_model
from noisy_student.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="noisy-student",
        description="Noisy Student Training as a Prefect pipeline with Parquet artifacts "
        "and MLflow lineage.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (run, serve, serve_model, results_storage, notifications, ingest, gc, predict):
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command in ("run", "predict"):
        from noisy_student.training.engine import flush_denormals

        flush_denormals()
    try:
        args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
