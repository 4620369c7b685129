"""The flow `noisy-student`: K iterations of teacher -> pseudo labels -> noisy student."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from prefect import Task, flow
from prefect.runtime import flow_run

import tasks
from flows.label_queue import queue_for_annotators
from flows.labelling import label_unlabelled
from flows.notifications import notify_promotion
from flows.parameters import ConfigSource, Overrides, RunName, TeacherRef, TrainingPool
from flows.resume import tag_pipeline_run
from flows.training import on_pool
from noisy_student import config as config_mod
from noisy_student import runs
from noisy_student.stages import TrainedModel
from noisy_student.training.engine import flush_denormals
from tasks import existing_teacher, prepare_data, promote
from tasks.artifacts import link_mlflow_run, publish_results


def resumable(run: runs.PipelineRun, training_pool: str | None) -> Iterator[Task | Callable]:
    """The stages whose finished results are kept in the run folder, where a resumed run
    finds them; with a training pool, the training stages run there."""
    for t in (
        tasks.train_teacher,
        tasks.filter_and_balance,
        tasks.train_student,
        tasks.evaluate_robustness,
    ):
        t = t.with_options(result_storage=run.task_results)
        yield on_pool(t, training_pool) if training_pool and t.name.startswith("train_") else t


@contextmanager
def _pipeline_run(
    config: config_mod.PipelineConfig,
    data_root: str,
    first: TrainedModel | None,
    teacher: str | None,
    run_id: str | None,
    start: float,
) -> Iterator[runs.PipelineRun]:
    """The pipeline's run (its MLflow parent run and folder), tied to this flow run."""
    flow_tags = {"prefect.flow_run_id": str(flow_run.id or "")}
    with runs.PipelineRun.start(config, data_root, first, teacher, run_id, flow_tags, start) as run:
        link_mlflow_run(config.name, run.parent_run_id)  # only where MLflow is a server
        tag_pipeline_run(run.run_id)  # a resumed run is given the same pipeline run id
        yield run


@flow(name="noisy-student", log_prints=True)
def noisy_student(
    config: ConfigSource,
    overrides: Overrides = None,
    teacher: TeacherRef = None,
    run_id: RunName = None,
    training_pool: TrainingPool = None,
) -> dict[str, Any]:
    """Noisy Student Training: a teacher (trained, or an existing model), then per student:
    label, select, train the noised student, evaluate; the student teaches the next round.
    The last student meets the promotion gate. Returns summary.json's content."""
    flush_denormals()  # a deployment's run starts in a process `noisy-student` did not set up
    start = time.perf_counter()
    config = config_mod.resolve(config, overrides)
    data = config.data
    data_root, shard_indices = prepare_data(root=data.root, fashion_mnist=data.fashion_mnist)
    first = existing_teacher(ref=teacher, registered_model=config.name) if teacher else None
    with _pipeline_run(config, data_root, first, teacher, run_id, start) as run:
        stages = resumable(run, training_pool)
        train_teacher, filter_and_balance, train_student, evaluate_robustness = stages
        common = {"data_root": data_root, "parent_run_id": run.parent_run_id}
        torchrun = config if config.distributed.nproc_per_node > 1 else None  # in N processes
        teacher = first or train_teacher(
            cfg=config.teacher, out_url=run.at(1, "teacher"), seed=config.seed, torchrun=torchrun,
            **common,
        )  # fmt: skip
        for k, student_cfg in enumerate(config.students, start=1):
            shards = label_unlabelled(
                cfg=config.inference, shard_indices=shard_indices, data_root=data_root,
                teacher_url=teacher.url, out_url=run.at(k, "pseudo_labels"),
                result_storage=run.task_results,
            )  # fmt: skip
            selected = filter_and_balance(
                shards=shards, cfg=config.selection, pseudo_url=run.at(k, "pseudo_labels"),
                out_url=run.at(k, "selected"), teacher=teacher, iteration=k, seed=config.seed,
                previous_pseudo_url=run.previous_pseudo_labels(k), **common,
            )  # fmt: skip
            student = train_student(
                cfg=student_cfg, selected=selected, teacher=teacher, out_url=run.at(k, "student"),
                iteration=k, seed=config.seed, registered_model=config.name, torchrun=torchrun,
                **common,
            )  # fmt: skip
            robustness = evaluate_robustness(
                # a teacher after iteration 1 is the last student: it is judged as the teacher
                trained=[replace(teacher, role="teacher"), student], cfg=config.evaluation,
                out_url=run.at(k, "robustness"), iteration=k, earlier=run.robustness_tables(),
                **common,
            )  # fmt: skip
            run.record(k, teacher, selected, student, robustness)
            teacher = student  # the student labels the next round
        promotion = promote(
            student=student, robustness=run.evaluations, registered_model=config.name,
            evaluation=config.evaluation, run_url=run.url, iteration=len(config.students),
            config=config.model_dump(), **common,
        )  # fmt: skip
        notify_promotion(promotion)  # the webhook, where one is configured
        # the unlabelled images whose human labels would help the next run most
        queue = queue_for_annotators(run, data_root, shard_indices, student, shards)
        summary = run.finish(promotion, queue)
        publish_results(summary, config.name)
    return summary
