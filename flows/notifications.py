"""Telling someone: promotion decisions, failed runs and crashed runs given up on, posted
to a webhook through a Prefect notification block. Light on purpose (Prefect only): the
`resume` flow imports it, and starts faster without torch.

`noisy-student serve --notify URL` (or `noisy-student notifications URL`) saves the block;
every process that runs a flow finds it on the Prefect server by name. Without it, nothing
is sent. The URL is kept as the block's secret (webhook URLs such as Slack's carry a
token), so the UI and the API show it obfuscated.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from prefect.blocks.notifications import CustomWebhookNotificationBlock

if TYPE_CHECKING:  # torch stays out of the resume flow's imports
    from noisy_student.stages.records import PromotionDecision

BLOCK = "noisy-student-notify"

logger = logging.getLogger(__name__)


def save_webhook(url: str) -> str:
    """Save the block that posts `{"subject", "body", "text"}` as JSON to `url` (`text`
    holds both, for Slack, Mattermost and Teams incoming webhooks); returns its slug."""
    CustomWebhookNotificationBlock(
        name="noisy-student",
        url="{{webhook_url}}",
        method="POST",
        json_data={"subject": "{{subject}}", "body": "{{body}}", "text": "{{subject}}\n{{body}}"},
        secrets={"webhook_url": url},
    ).save(BLOCK, overwrite=True)
    return f"{CustomWebhookNotificationBlock.get_block_type_slug()}/{BLOCK}"


def notify(subject: str, body: str) -> bool:
    """Post through the saved block; False when there is none. A webhook that fails is
    logged, not raised: the decision it reports has been made and recorded already, and a
    run must not fail because a chat service is down."""
    import httpx

    try:
        block = CustomWebhookNotificationBlock.load(BLOCK)
    except ValueError:  # no such block: notifications are not configured
        return False
    try:
        block.notify(body, subject)
    except httpx.HTTPError as e:
        # not the exception's text: it names the URL, token and all
        why = f"HTTP {e.response.status_code}" if isinstance(e, httpx.HTTPStatusError) else ""
        logger.warning(f"notification {subject!r} not sent: {type(e).__name__} {why}".rstrip())
        return False
    return True


def flow_run_url(flow_run_id: str) -> str:
    """The flow run's page in the Prefect UI, or its id where the UI's URL is unknown."""
    from prefect.settings import PREFECT_UI_URL

    ui = PREFECT_UI_URL.value()
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui else f"flow run {flow_run_id}"


def notify_promotion(promotion: PromotionDecision) -> bool:
    """The promotion gate's decision, from within the run."""
    from prefect.runtime import flow_run

    model = f"models:/{promotion.registered_model}/{promotion.version}"
    reasons = "\n".join(f"- {r}" for r in promotion.reasons)
    return notify(
        f"noisy-student: {model} is the {promotion.decision}",
        f"{reasons}\n{flow_run_url(str(flow_run.id))}",
    )
