"""Data-parallel training: two processes under torchrun on CPU (gloo) against one process
with the same global batch."""

from __future__ import annotations

import pytest
import torch

from noisy_student import config, stages, torchrun_stage
from noisy_student.data import training_data
from noisy_student.errors import UserError
from noisy_student.registry import tracking
from noisy_student.training import distributed, engine, models
from tests.conftest import REPO, noise, schedule

# A model without batch norm (group norm instead): with batch norm each rank would normalise
# its own half of the batch, which is ordinary DDP but not the single-process computation.
# No input noise either, so the two runs see the very same pixels.
SAME_COMPUTATION = [
    "teacher.model=test_efficientnet_gn",
    "teacher.epochs=3",
    "teacher.batch_size=10",
    "teacher.lr=0.02",
    "teacher.hflip=false",
    "teacher.crop_padding=0",
    "teacher.eval_every=3",
]


def _losses(run_id: str) -> list[float]:
    history = tracking.client().get_metric_history(run_id, "train_loss")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def _stage_runs(parent: str) -> list:
    c = tracking.client()
    experiment = c.get_run(parent).info.experiment_id
    return c.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'")


@pytest.mark.slow  # 77-106 s on 2 cores at load 8-14, nearly all of it 3 processes importing torch
def test_two_torchrun_processes_follow_the_single_process_loss_trajectory(
    tiny_dataset, mlflow_uri, tmp_path, torch_one_thread
):
    cfg = config.load(
        REPO / "pipeline_config/smoke.yaml", [*SAME_COMPUTATION, "distributed.nproc_per_node=2"]
    )
    one = tracking.start_run("ddp-test", "one-process")
    torch.manual_seed(cfg.seed)  # the initial weights torchrun's ranks start from
    single = stages.train_teacher(cfg.teacher, tiny_dataset, str(tmp_path / "one"), one, cfg.seed)
    two = tracking.start_run("ddp-test", "two-processes")
    parallel = torchrun_stage.launch(
        cfg, "teacher", tiny_dataset, str(tmp_path / "two"), two, log=lambda line: None
    )

    # 50 labelled images, 10 per global batch: 15 steps in 3 epochs, 5 images per rank
    reference, trajectory = _losses(single.mlflow_run_id), _losses(parallel.mlflow_run_id)
    assert len(reference) == len(trajectory) == 3
    assert reference[0] > reference[-1]  # it learns, so the comparison means something
    torch.testing.assert_close(trajectory, reference, rtol=1e-4, atol=1e-5)

    # rank 0 alone: one stage run under the parent, one checkpoint, same weights as one process
    assert [r.info.run_id for r in _stage_runs(two)] == [parallel.mlflow_run_id]
    a, _ = models.load(single.url)
    b, _ = models.load(parallel.url)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(y, x, rtol=1e-3, atol=1e-4, msg=name)


def test_a_batch_that_does_not_split_evenly_over_the_processes_is_refused(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)  # as under torchrun, 2 ranks
    images = torch.zeros(20, 1, 28, 28, dtype=torch.uint8)
    targets = engine.one_hot(torch.zeros(20, dtype=torch.long), 10)
    with pytest.raises(UserError, match="batch_size 9 .* does not split evenly over 2"):
        engine.fit(
            models.create("test_efficientnet_gn", 10, 1),
            training_data.TensorRows(images, targets),
            schedule(epochs=1, batch_size=9, lr=0.01),
            noise(),
            seed=0,
        )


def test_outside_torchrun_the_world_is_one_process():
    batch = torch.arange(10)
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.local_part(batch) is batch
    assert distributed.sum_over_ranks(2.0, 3.0) == [2.0, 3.0]


def test_the_student_stage_needs_its_teacher_and_selection(tiny_dataset, mlflow_uri, capsys):
    with pytest.raises(SystemExit) as exit_info:
        torchrun_stage.main(
            [
                *("-c", str(REPO / "pipeline_config/smoke.yaml")),
                *("--stage", "student", "--out", "unused", "--data-root", tiny_dataset),
            ]
        )
    assert exit_info.value.code == 2
    assert "--stage student needs --teacher and --selected" in capsys.readouterr().err
