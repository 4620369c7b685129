"""`noisy-student run`: the flow in this process, on Prefect's temporary API."""

from __future__ import annotations

import argparse
from typing import Any

from cli.prefect_setup import prefect_defaults, temporary_server_stops_with_us


def add_parser(sub: Any) -> None:
    run = sub.add_parser("run", help="run the pipeline locally (Prefect's temporary API)")
    run.add_argument(
        "-c", "--config", required=True, help="YAML config, e.g. pipeline_config/fashion_mnist.yaml"
    )
    run.add_argument(
        "--set",
        action="append",
        metavar="KEY.PATH=VALUE",
        help="override a config value (YAML syntax), e.g. students.0.epochs=1; repeatable",
    )
    run.add_argument(
        "--run-id",
        help="name of this run (default: derived from the config and the data, so that "
        "running the same command again after a crash resumes the run)",
    )
    run.add_argument(
        "--teacher",
        help="start from this model instead of training a teacher: champion (the registered "
        "model's champion, if any), models:/NAME@ALIAS, an MLflow run id or a checkpoint URL",
    )
    run.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    from noisy_student import config as config_mod
    from noisy_student import stages

    cfg = config_mod.load(args.config, args.set or [])
    stages.check_data(cfg.data.root, cfg.data.fashion_mnist)
    prefect_defaults()
    temporary_server_stops_with_us()
    from flows.noisy_student import noisy_student
    from noisy_student import results

    summary = noisy_student(cfg, teacher=args.teacher, run_id=args.run_id)
    print()
    print(results.table(summary))
    if "label_queue" in summary:
        queue = summary["label_queue"]
        print(f"label queue: {queue['size']} images by {queue['strategy']}: {queue['url']}")
    print(f"summary: {summary['summary_url']}")
