"""The identity of a pipeline run: the same config on the same data is the same run.

Re-running a command after a crash therefore lands in the same run folder, continues the
same MLflow parent run and hands Prefect the same task inputs, so finished work is found
and skipped. New data (another manifest digest) or another config is another run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from noisy_student import dataset, storage
from noisy_student.config import PipelineConfig


def run_identity(config: PipelineConfig, data_root: str) -> str:
    digests = [
        dataset.read_manifest(storage.join(data_root, split)).digest
        for split in (dataset.LABELLED, dataset.UNLABELLED, dataset.TEST)
    ]
    text = json.dumps({"config": config.model_dump(mode="json"), "data": digests}, sort_keys=True)
    return f"{config.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def task_results_folder(run_url: str) -> Path | None:
    """Where Prefect keeps the run's finished task results: inside a local run folder, so
    that deleting the folder also forgets them. For a remote run folder, Prefect's own
    setting decides (PREFECT_DEFAULT_RESULT_STORAGE_BLOCK, e.g. a bucket block)."""
    if "://" in run_url and not run_url.startswith("file://"):
        return None
    return Path(run_url.removeprefix("file://"), "_prefect_results")
