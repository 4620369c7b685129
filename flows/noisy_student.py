"""The flow `noisy-student`: K iterations of teacher -> pseudo labels -> noisy student."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows.labelling import label_unlabelled
from noisy_student import report, storage, tracking
from noisy_student.config import PipelineConfig
from tasks import (
    evaluate_robustness,
    filter_and_balance,
    prepare_data,
    train_student,
    train_teacher,
)


def new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


@flow(name="noisy-student", log_prints=True)
def noisy_student(config: PipelineConfig, run_id: str | None = None) -> dict[str, Any]:
    """Train a teacher, then for every configured student: label the unlabelled images,
    keep the confident ones with classes balanced, train the noised student on labelled
    plus pseudo-labelled images, compare robustness, and make the student the next teacher.
    Returns summary.json's content."""
    start = time.perf_counter()
    run_id = run_id or new_run_id()
    run_url = storage.join(storage.resolve(config.artifacts), "runs", run_id)
    parent = tracking.start_run(
        config.name,
        run_id,
        config.model_dump(),
        {
            f"{tracking.TAG}pipeline_run_id": run_id,
            f"{tracking.TAG}artifacts_url": run_url,
            "prefect.flow_run_id": str(flow_run.id or ""),
        },
    )
    print(f"run {run_id}: artifacts in {run_url}, MLflow run {parent} at {tracking.tracking_uri()}")
    # several training processes: the training stages run under torchrun, from this config
    torchrun = config if config.distributed.nproc_per_node > 1 else None
    try:
        data_root, shard_indices = prepare_data(config.data.root, config.data.fashion_mnist)

        teacher = train_teacher(
            config.teacher,
            data_root,
            storage.join(run_url, "iteration-1", "teacher"),
            parent,
            config.seed,
            torchrun,
        )
        iterations = []
        for k, student_cfg in enumerate(config.students, start=1):
            here = storage.join(run_url, f"iteration-{k}")
            shards = label_unlabelled(
                config.inference,
                shard_indices,
                data_root,
                teacher.url,
                storage.join(here, "pseudo_labels"),
            )
            selected = filter_and_balance(
                shards,
                config.selection,
                data_root,
                storage.join(here, "pseudo_labels"),
                storage.join(here, "selected"),
                teacher,
                parent,
                k,
                config.seed,
            )
            student = train_student(
                student_cfg,
                data_root,
                selected,
                teacher,
                storage.join(here, "student"),
                parent,
                k,
                config.seed,
                config.name,
                torchrun,
            )
            robustness = evaluate_robustness(
                [teacher, student],
                config.evaluation,
                data_root,
                storage.join(here, "robustness"),
                parent,
                k,
            )
            iterations.append(report.iteration_summary(k, teacher, selected, student, robustness))
            teacher = student  # the student labels the next round

        summary = report.summary(
            run_id, run_url, config, data_root, parent, iterations, time.perf_counter() - start
        )
        storage.write_json(summary["summary_url"], summary)
        tracking.log_dict(parent, summary, "summary.json")
        tracking.log_dict(parent, report.lineage(iterations), "lineage.json")
        final = iterations[-1]
        tracking.log_metrics(
            parent,
            {
                "final_student_test_accuracy": final["student"]["test_accuracy"],
                "first_teacher_test_accuracy": iterations[0]["teacher"]["test_accuracy"],
            },
        )
        tracking.set_tags(parent, {f"{tracking.TAG}summary_url": summary["summary_url"]})
        tracking.end_run(parent)
        return summary
    except BaseException:
        tracking.end_run(parent, failed=True)
        raise
