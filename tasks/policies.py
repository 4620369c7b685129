"""How the tasks cache and retry.

Resume: a finished task's result is persisted (as JSON: reading it back runs no pickled
code) under a key made of its inputs, its own source and the core package's source, so a
re-run of the same command, which gets the same run id and so the same inputs, finds
the stages and shards already done and skips them. Retries: only I/O tasks retry, and
only on failures that may pass (`StorageUnavailable`); training is never retried blindly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

import noisy_student
from noisy_student.data.storage import is_transient


@cache
def _core_digest() -> str:
    root = Path(noisy_student.__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@dataclass
class CoreSource(CachePolicy):
    """The source of `noisy_student/`: the work happens there, not in the thin task."""

    def compute_key(self, task_ctx: Any, inputs: Any, flow_parameters: Any, **kwargs: Any) -> str:
        return _core_digest()


RESUMABLE = INPUTS + TASK_SOURCE + CoreSource()
CACHED: dict[str, Any] = dict(cache_policy=RESUMABLE, persist_result=True, result_serializer="json")


def transient_failure(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only what may pass: a storage hiccup that outlasted the in-call retries."""
    exc = state.data
    return isinstance(exc, BaseException) and is_transient(exc)


IO_RETRIES: dict[str, Any] = dict(
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_jitter_factor=0.5,
    retry_condition_fn=transient_failure,
)
