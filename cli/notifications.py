"""`noisy-student notifications`: the webhook block for workers of prefect.yaml."""

from __future__ import annotations

import argparse
from typing import Any

from cli.prefect_setup import prefect_defaults


def add_parser(sub: Any) -> None:
    ntf = sub.add_parser(
        "notifications",
        help="save the Prefect notification block that posts promotion decisions, failed "
        "runs and crashed runs given up on to URL (what `serve --notify` does)",
    )
    ntf.add_argument("url", help="a webhook that takes a JSON POST, e.g. a Slack incoming webhook")
    ntf.set_defaults(func=_notifications)


def _notifications(args: argparse.Namespace) -> None:
    from flows.events import check_api
    from flows.notifications import save_webhook

    prefect_defaults()
    check_api()
    print(f"block {save_webhook(args.url)} saved: runs post their news to it")
