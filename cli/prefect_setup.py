"""What every command that talks to Prefect sets up first."""

from __future__ import annotations

import logging
import os

from noisy_student.errors import UserError


def _one_line_user_errors(record: logging.LogRecord) -> bool:
    """Bad input is reported in one line; Prefect would add a traceback to its log."""
    if record.exc_info and isinstance(record.exc_info[1], UserError):
        record.exc_info, record.exc_text = None, None
    return True


def prefect_defaults() -> None:
    # Prefect's server (temporary or not) needs no network; don't let it try.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary one starts in ~20 s on an idle 2-core machine; give a busy one more time.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # The core's log in the runs' logs, as pyproject.toml's [tool.prefect.logging] says for
    # processes started in the repository (tests, a worker); the CLI may run from elsewhere.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "noisy_student")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_one_line_user_errors)


def temporary_server_stops_with_us() -> None:
    """Without PREFECT_API_URL, Prefect starts a temporary server of its own and stops it
    at exit. Start it here instead (Prefect then uses this same one) and have a watchdog
    stop it if this process is killed before it can."""
    if os.environ.get("PREFECT_API_URL"):
        return
    from prefect.server.api.server import SubprocessASGIServer

    from noisy_student import watchdog

    server = SubprocessASGIServer()
    server.start()
    if server.server_process is not None:
        watchdog.start(server.server_process.pid)
