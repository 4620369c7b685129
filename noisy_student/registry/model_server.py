"""Serving `models:/NAME@ALIAS` so that it follows the alias: when the promotion gate moves
`champion` to a new version, the server answers from that version without a restart.

Each version is served by MLflow's own scoring app (`mlflow.pyfunc.scoring_server.init`,
what `mlflow models serve` runs), so the REST contract is theirs: `POST /invocations`,
`GET /ping`, `/health`, `/version`. A thread asks the registry where the alias points every
`poll_seconds`; a new version is loaded beside the one serving, then takes the next
requests, while requests already under way finish on the old one: none is dropped. A
version that fails to load is reported once and skipped, and the one serving stays. Each
answer names the version that gave it in the header `X-Model-Version`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from noisy_student.errors import UserError
from noisy_student.registry import tracking

logger = logging.getLogger(__name__)

VERSION_HEADER = b"x-model-version"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class Served:
    version: str
    app: Any  # MLflow's scoring app (FastAPI) for that version


def scoring_app(name: str, version: str) -> Served:
    import mlflow
    from mlflow.pyfunc import scoring_server

    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    return Served(version, scoring_server.init(model))


class AliasFollower:
    """An ASGI app answering from the version `models:/NAME@ALIAS` points at."""

    def __init__(self, name: str, alias: str, poll_seconds: float):
        self.name, self.alias, self.poll_seconds = name, alias, poll_seconds
        self.skipped: str | None = None  # a version that failed to load
        version = self._alias_version()
        if version is None:
            raise UserError(
                f"models:/{name}@{alias}: no such alias (or registered model) at "
                f"{tracking.display_uri()}"
            )
        self.served = scoring_app(name, version)
        logger.info(f"serving models:/{name}/{version} (@{alias})")

    def _alias_version(self) -> str | None:
        found = tracking.model_version_by_alias(self.name, self.alias)
        return None if found is None else str(found.version)

    def refresh(self) -> bool:
        """Ask where the alias points; load and switch to a new version. True if switched."""
        try:
            version = self._alias_version()
        except Exception as e:  # the registry unreachable for a while: keep serving
            logger.warning(f"models:/{self.name}@{self.alias}: registry not reachable ({e})")
            return False
        if version is None or version in (self.served.version, self.skipped):
            return False
        try:
            served = scoring_app(self.name, version)
        except Exception as e:
            logger.error(
                f"models:/{self.name}/{version} does not load ({type(e).__name__}: {e}); "
                f"still serving version {self.served.version}"
            )
            self.skipped = version
            return False
        previous, self.served = self.served.version, served  # one assignment: atomic
        logger.info(f"models:/{self.name}@{self.alias}: version {previous} -> {version}")
        return True

    def follow(self, stop: threading.Event) -> None:
        while not stop.wait(self.poll_seconds):
            self.refresh()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        served = self.served  # the whole request stays with the version it started on
        if scope["type"] != "http":
            await served.app(scope, receive, send)
            return

        async def send_with_version(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (VERSION_HEADER, served.version.encode())]
                message = {**message, "headers": headers}
            await send(message)

        await served.app(scope, receive, send_with_version)


async def _lifespan(receive: Receive, send: Send) -> None:
    # the scoring apps need no start-up or shut-down of their own
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def serve(name: str, alias: str, host: str, port: int, poll_seconds: float) -> None:
    """Serve until stopped (SIGINT or SIGTERM)."""
    import uvicorn

    app = AliasFollower(name, alias, poll_seconds)
    stop = threading.Event()
    poller = threading.Thread(target=app.follow, args=(stop,), name="alias-poller", daemon=True)
    poller.start()
    try:
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info")).run()
    finally:
        stop.set()
