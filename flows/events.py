"""The new-data and new-labels events and the little state around them, kept light:
`noisy-student ingest append|labels` and `noisy-student results-storage` import this
without torch or the flow."""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Any

from prefect.events import Event
from prefect.variables import Variable

from noisy_student.data import storage

EVENT = "noisy-student.unlabelled-data.landed"
LABELS_EVENT = "noisy-student.labels.landed"  # `ingest labels`: the labelled split grew
RESOURCE_PREFIX = "noisy-student.dataset."
RESULTS_BLOCK = "noisy-student-results"


def _key(root: str) -> str:
    return hashlib.sha256(storage.resolve(root).encode()).hexdigest()[:16]


def dataset_resource(root: str) -> dict[str, str]:
    """The Prefect resource standing for a dataset: its id is derived from the resolved URL
    (so a relative path means the same dataset only from the same working folder)."""
    return {
        "prefect.resource.id": f"{RESOURCE_PREFIX}{_key(root)}",
        "prefect.resource.name": storage.resolve(root),
    }


def announced_variable(root: str) -> str:
    """The Prefect variable holding the last unlabelled-manifest version announced."""
    return f"noisy-student-data-{_key(root)}"


def announce(
    root: str, state: dict[str, Any], previous: dict[str, Any] | None, source: str
) -> Event:
    """Emit the new-data event for the dataset at `root` (its unlabelled manifest is now
    `state`, see `Manifest.state`), then remember that version as announced. Needs
    PREFECT_API_URL."""
    previous = previous or {}
    event = Event(
        event=EVENT,
        resource=dataset_resource(root),
        payload={
            "dataset": storage.resolve(root),
            **state,
            "new_rows": state["rows"] - previous.get("rows", 0),
            "previous_version": previous.get("version"),
            "source": source,
        },
    )
    _emit(event)
    remember(root, state)
    return event


def announce_labels(
    root: str, labelled: dict[str, Any], unlabelled: dict[str, Any], new_labels: int
) -> Event:
    """Emit the new-labels event for the dataset at `root`, whose labelled and unlabelled
    manifests are now `labelled` and `unlabelled` (`Manifest.state`). The unlabelled
    version is remembered as announced: `watch` then sees nothing new in the pool."""
    event = Event(
        event=LABELS_EVENT,
        resource=dataset_resource(root),
        payload={
            "dataset": storage.resolve(root),
            "labelled": labelled,
            "unlabelled": unlabelled,
            "new_labels": new_labels,
            "source": "ingest",
        },
    )
    _emit(event)
    remember(root, unlabelled)
    return event


def _emit(event: Event) -> None:
    from prefect.events.clients import get_events_client
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def send() -> None:
        # A client of our own, opened and closed here: a short-lived command must not
        # exit before a background worker has sent the event.
        async with get_events_client() as client:
            await client.emit(event)

    run_coro_as_sync(send())


def remember(root: str, state: dict[str, Any]) -> None:
    """Record `state` as the last version announced, unless a later one already is.

    Appends running at once announce at once: `Variable.set(overwrite=True)` reads, then
    creates, so two of them can both find no variable and one create fails with a conflict;
    read again and retry. Prefect variables have no compare-and-set, so two announcers can
    still leave the older of their versions recorded: that costs `watch` one extra event
    (a retrain on data already labelled, which resumes the finished run), nothing more."""
    from prefect.exceptions import ObjectAlreadyExists

    name = announced_variable(root)
    for _ in range(10):
        seen = Variable.get(name, default=None)
        if isinstance(seen, dict) and seen.get("version", 0) >= state["version"]:
            return
        try:
            Variable.set(name, state, overwrite=True)
            return
        except ObjectAlreadyExists:
            continue  # another announcer created it between our read and our write
    raise RuntimeError(f"Prefect variable {name}: still contended after 10 attempts")


def check_api() -> str:
    """Ask the Prefect server at PREFECT_API_URL one authenticated question before doing
    anything that needs it, so that a wrong URL or auth string is a one-line error up front
    (not a traceback halfway through). Returns the API URL."""
    import httpx
    from prefect.settings import get_current_settings

    from noisy_student.errors import UserError

    # the environment first, as the commands that call this do; then Prefect's profile
    settings = get_current_settings().api
    url = (os.environ.get("PREFECT_API_URL") or str(settings.url or "")).rstrip("/")
    auth = os.environ.get("PREFECT_API_AUTH_STRING") or (
        settings.auth_string.get_secret_value() if settings.auth_string else None
    )
    if not url:
        raise UserError("PREFECT_API_URL is not set")
    try:
        # /health answers anyone; /admin/version asks for the auth string when the server has one
        answer = httpx.get(f"{url}/admin/version", headers=_basic(auth), timeout=30)
    except httpx.HTTPError as e:
        raise UserError(f"{url}: no Prefect server answers ({type(e).__name__})") from None
    if answer.status_code == 401:
        hint = (
            "PREFECT_API_AUTH_STRING does not match the server's"
            if auth
            else "set PREFECT_API_AUTH_STRING to the server's user:password"
        )
        raise UserError(f"{url}: the Prefect server refused the request (401): {hint}")
    if answer.status_code != 200:
        raise UserError(f"{url}: not a Prefect API (HTTP {answer.status_code} on /admin/version)")
    return url


def _basic(auth_string: str | None) -> dict[str, str]:
    # the server compares the decoded header with its whole string, as Prefect's client sends it
    if not auth_string:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(auth_string.encode()).decode()}


def use_result_storage(url: str) -> str:
    """Keep Prefect's task and flow results under `url` (e.g. s3://bucket/prefect-results):
    save a block without credentials (runs read them from their environment) and make it
    the default for runs started from this process."""
    from prefect.filesystems import RemoteFileSystem

    RemoteFileSystem(basepath=url).save(RESULTS_BLOCK, overwrite=True)
    slug = f"remote-file-system/{RESULTS_BLOCK}"
    os.environ["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] = slug
    os.environ["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] = "true"
    return slug
