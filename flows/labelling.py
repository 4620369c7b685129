"""The sharded stage as a sub-flow, so that its shards can run on a cluster while the
rest of the pipeline stays in the flow's process.

Which cluster is configuration (`inference.runner`, `inference.address`): Prefect's own
task runners for Dask and Ray do the distributing; nothing here schedules work itself.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, unmapped
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from noisy_student import stages
from noisy_student.config import InferenceConfig
from tasks import infer_pseudo_labels


def task_runner(cfg: InferenceConfig) -> TaskRunner:
    """Prefect's task runner for `inference.runner`: threads here, or a Dask or Ray cluster
    (the one at `address`, else a temporary local one of `local_workers` processes)."""
    if cfg.runner == "dask":
        from prefect_dask import DaskTaskRunner

        if cfg.address:
            return DaskTaskRunner(address=cfg.address)
        # One thread per worker (torch in it then uses one core too); workers report to
        # this flow's Prefect API, the temporary one included.
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": cfg.local_workers,
                "threads_per_worker": 1,
                "dashboard_address": None,
                "env": _prefect_api_env(),
            }
        )
    if cfg.runner == "ray":
        from prefect_ray import RayTaskRunner  # the config checked that it is installed

        if cfg.address:
            return RayTaskRunner(address=cfg.address)
        return RayTaskRunner(
            init_kwargs={
                "num_cpus": cfg.local_workers,
                "runtime_env": {"env_vars": _prefect_api_env()},
            }
        )
    return ThreadPoolTaskRunner()


def _prefect_api_env() -> dict[str, str]:
    """PREFECT_API_URL for the worker processes of a temporary local cluster: the API this
    process talks to, even when it is Prefect's temporary one (a worker without it would
    start a temporary server of its own). A real cluster's workers get it from their own
    environment."""
    from prefect.client.orchestration import get_client

    # the flow's own client when called in a flow: not entered, so not closed either
    return {"PREFECT_API_URL": str(get_client(sync_client=True).api_url)}


@flow(name="infer-pseudo-labels", log_prints=True)
def label_shards(
    shard_indices: list[int],
    data_root: str,
    teacher_url: str,
    out_url: str,
    batch_size: int,
    precision: str,
    tta: str = "off",
) -> list[stages.PseudoLabelShard]:
    """One task per shard; each writes part-<shard>.parquet keyed by image id, so every
    image is labelled exactly once however the shards are spread over workers (a retried
    shard rewrites its own file)."""
    return infer_pseudo_labels.map(
        shard_index=shard_indices,
        data_root=unmapped(data_root),
        teacher_url=unmapped(teacher_url),
        out_url=unmapped(out_url),
        batch_size=unmapped(batch_size),
        precision=unmapped(precision),
        tta=unmapped(tta),
    ).result()


def label_unlabelled(
    cfg: InferenceConfig,
    shard_indices: list[int],
    data_root: str,
    teacher_url: str,
    out_url: str,
    result_storage: Any = None,
) -> list[stages.PseudoLabelShard]:
    """Run `label_shards` on the task runner the configuration names; finished shards'
    results go to `result_storage` (the run folder), where a resumed run finds them."""
    labelling = label_shards.with_options(
        task_runner=task_runner(cfg), result_storage=result_storage
    )
    return labelling(
        shard_indices, data_root, teacher_url, out_url, cfg.batch_size, cfg.precision, cfg.tta
    )
