"""`noisy-student serve`: the deployments on the Prefect server at PREFECT_API_URL."""

from __future__ import annotations

import argparse
import os
from typing import Any

from cli.prefect_setup import prefect_defaults
from noisy_student.errors import UserError


def add_parser(sub: Any) -> None:
    srv = sub.add_parser(
        "serve",
        help="serve the deployments noisy-student/iterate, noisy-student-resume/resume and "
        "noisy-student-watch/watch on the Prefect server at PREFECT_API_URL (runs until "
        "stopped)",
    )
    srv.add_argument("-c", "--config", required=True, help="YAML config path or URL")
    srv.add_argument(
        "--set", action="append", metavar="KEY.PATH=VALUE", help="override a config value"
    )
    srv.add_argument(
        "--teacher",
        default="champion",
        help="first teacher of each run: champion (default; trains one while there is "
        "none), none (always train), or a model reference as for `run --teacher`",
    )
    _when_options(srv)
    _operations_options(srv)
    srv.set_defaults(func=_serve)


def _when_options(srv: argparse.ArgumentParser) -> None:
    """When a retrain starts: on a schedule, after new data lands."""
    srv.add_argument("--cron", help='also run on this schedule (UTC), e.g. "0 3 * * *"')
    srv.add_argument(
        "--batch-window",
        type=float,
        default=600,
        metavar="SECONDS",
        help="a retrain starts this long after new data first lands; data landing "
        "meanwhile joins it (default 600)",
    )
    srv.add_argument(
        "--watch-every",
        type=float,
        default=300,
        metavar="SECONDS",
        help="look for data that landed by other means this often; 0: never (default 300)",
    )


def _operations_options(srv: argparse.ArgumentParser) -> None:
    """Where results go, what happens to crashed runs, who hears, where training runs."""
    srv.add_argument(
        "--results",
        metavar="URL",
        help="keep Prefect's results there, e.g. s3://bucket/prefect-results",
    )
    srv.add_argument(
        "--max-resumes",
        type=int,
        default=3,
        metavar="N",
        help="a crashed run is started again by itself, resuming where it stopped, at most "
        "N times (default 3; 0: never)",
    )
    srv.add_argument(
        "--notify",
        metavar="URL",
        help="post promotion decisions, failed runs and crashed runs given up on to this "
        "webhook (JSON: subject, body, text), e.g. a Slack incoming webhook",
    )
    srv.add_argument(
        "--training-pool",
        metavar="NAME",
        help="run the training stages on this work pool (e.g. gpu; create it first), as "
        "runs of noisy-student-train/NAME, which the pool's own workers run",
    )
    srv.add_argument(
        "--gpu-limit",
        type=int,
        metavar="N",
        help="with --training-pool: at most N trainings at once (the global concurrency "
        "limit gpu; created with 1 where there is none)",
    )


def _serve(args: argparse.Namespace) -> None:
    from datetime import timedelta

    from noisy_student import config as config_mod
    from noisy_student.overrides import override_pairs

    overrides = dict(override_pairs(args.set or []))
    config_mod.load(args.config, overrides)  # one-line error before anything starts
    if args.max_resumes < 0:
        raise UserError(f"--max-resumes {args.max_resumes}: must be 0 or more")
    if args.gpu_limit is not None and (args.gpu_limit < 1 or not args.training_pool):
        raise UserError(f"--gpu-limit {args.gpu_limit}: needs --training-pool, and 1 or more")
    if not os.environ.get("PREFECT_API_URL"):
        raise UserError(
            "PREFECT_API_URL is not set: start `prefect server start` and export "
            "PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    prefect_defaults()
    from flows.events import check_api

    check_api()
    _check_mlflow_server()
    from flows.deployments import serve

    serve(
        args.config,
        overrides,
        teacher=None if args.teacher == "none" else args.teacher,
        cron=args.cron,
        window=timedelta(seconds=args.batch_window),
        watch_every=args.watch_every or None,
        results=args.results,
        training_pool=args.training_pool,
        gpu_limit=args.gpu_limit,
        max_resumes=args.max_resumes,
        notify=args.notify,
    )


def _check_mlflow_server() -> None:
    """The runs `serve` starts log to MLFLOW_TRACKING_URI: when that is a server, ask it
    one authenticated question now, so that missing or wrong credentials
    (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) fail here in one line, not in
    every run."""
    import httpx

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    try:
        answer = httpx.post(
            f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search",
            json={"max_results": 1},
            auth=httpx.BasicAuth(user, password or "") if user else None,
            timeout=30,
        )
    except httpx.HTTPError as e:
        raise UserError(f"{uri}: no MLflow server answers ({type(e).__name__})") from None
    if answer.status_code in (401, 403):
        hint = (
            "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD were refused"
            if user
            else "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
        raise UserError(
            f"{uri}: the MLflow server refused the request ({answer.status_code}): {hint}"
        )
    if answer.status_code != 200:
        raise UserError(f"{uri}: not an MLflow server (HTTP {answer.status_code})")
