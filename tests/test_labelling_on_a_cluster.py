"""Sharded pseudo-labelling on a Dask (or Ray) cluster through the flow's sub-flow, against
the same shards labelled in one process."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flows.labelling import label_unlabelled, task_runner
from noisy_student import config, stages
from noisy_student.config import InferenceConfig, PipelineConfig
from noisy_student.data import dataset, storage
from noisy_student.errors import UserError
from noisy_student.stages.infer_pseudo_labels import cached_teacher
from noisy_student.training import models
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture()
def teacher_url(tiny_dataset, tmp_path) -> str:
    manifest = dataset.read_manifest(storage.join(tiny_dataset, dataset.LABELLED))
    torch.manual_seed(0)
    model = models.create("test_resnet", manifest.num_classes, manifest.channels)
    meta = models.ModelMeta(
        "test_resnet", manifest.num_classes, 1, manifest.class_names, 28, 28, manifest.mode
    )
    return models.save(model, meta, str(tmp_path / "teacher"))


@pytest.fixture()
def counted_loads(monkeypatch) -> list[str]:
    """Every checkpoint models.load reads in this process."""
    loads: list[str] = []
    real = models.load

    def load(url, *args, **kwargs):
        loads.append(url)
        return real(url, *args, **kwargs)

    monkeypatch.setattr(models, "load", load)
    return loads


def _labels(shards: list[stages.PseudoLabelShard]) -> pa.Table:
    table = pa.concat_tables(pq.read_table(s.url) for s in shards)
    return table.sort_by("id")


@pytest.mark.slow  # starts a two-worker Dask cluster: 45 s
def test_a_two_worker_dask_cluster_labels_each_image_once_as_one_process_does(
    prefect_harness, tiny_dataset, teacher_url, counted_loads, tmp_path
):
    from distributed import LocalCluster

    shard_indices = stages.unlabelled_shards(tiny_dataset)
    assert len(shard_indices) == 3  # more shards than workers: some worker labels two
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False) as cluster:
        cfg = InferenceConfig(batch_size=64, runner="dask", address=cluster.scheduler_address)
        on_dask = label_unlabelled(
            cfg, shard_indices, tiny_dataset, teacher_url, str(tmp_path / "dask")
        )
    # the workers share this process: one load for the three shards
    assert counted_loads == [teacher_url]
    in_process = label_unlabelled(
        InferenceConfig(batch_size=64),
        shard_indices,
        tiny_dataset,
        teacher_url,
        str(tmp_path / "local"),
    )

    manifest = dataset.read_manifest(storage.join(tiny_dataset, dataset.UNLABELLED))
    ids = [i for part in dataset.iter_shards(manifest) for i in part.ids]
    dask_labels, local_labels = _labels(on_dask), _labels(in_process)
    assert dask_labels.column("id").to_pylist() == sorted(ids)  # each image exactly once
    assert dask_labels.column("predicted").equals(local_labels.column("predicted"))
    torch.testing.assert_close(
        torch.tensor(dask_labels.column("probs").combine_chunks().values.to_numpy()),
        torch.tensor(local_labels.column("probs").combine_chunks().values.to_numpy()),
        rtol=0,
        atol=1e-6,
    )


def test_the_teacher_is_loaded_once_per_process_and_again_when_rewritten(
    tiny_dataset, teacher_url, counted_loads, tmp_path
):
    for i in stages.unlabelled_shards(tiny_dataset):
        stages.infer_pseudo_labels(tiny_dataset, i, teacher_url, str(tmp_path / "p"), 64)
    assert counted_loads == [teacher_url]

    first = cached_teacher(teacher_url)
    model, meta = models.load(teacher_url)
    torch.nn.init.zeros_(model.get_classifier().weight)
    models.save(model, meta, teacher_url)  # a new checkpoint at the same URL
    assert cached_teacher(teacher_url) is not first
    assert len(counted_loads) == 3  # the explicit load above and the reload


@pytest.mark.slow  # needs the session's Prefect test harness, a server that takes 30 s to start
def test_runner_settings_build_prefects_task_runners(prefect_harness):
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    assert isinstance(task_runner(InferenceConfig()), ThreadPoolTaskRunner)
    remote = task_runner(InferenceConfig(runner="dask", address="tcp://head:8786"))
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://head:8786"
    local = task_runner(InferenceConfig(runner="dask", local_workers=3))
    assert local.address is None and local.cluster_kwargs["n_workers"] == 3
    assert local.cluster_kwargs["env"]["PREFECT_API_URL"].startswith("http")


def test_the_ray_runner_needs_the_extra_or_builds_prefects_ray_runner():
    overrides = ["inference.runner=ray", "inference.address=ray://head:10001"]
    try:
        import prefect_ray  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="inference: .*runner ray needs the 'ray' extra"):
            config.load(REPO / "pipeline_config/smoke.yaml", overrides)
    else:
        cfg = config.load(REPO / "pipeline_config/smoke.yaml", overrides)
        assert task_runner(cfg.inference).address == "ray://head:10001"


def test_an_address_without_a_cluster_runner_is_a_config_error():
    with pytest.raises(UserError, match="inference: .*address is for runner dask or ray"):
        config.load(REPO / "pipeline_config/smoke.yaml", ["inference.address=tcp://head:8786"])
    assert PipelineConfig.model_fields["inference"].default.runner == "local"
