"""The flow `noisy-student`: K iterations of teacher -> pseudo labels -> noisy student."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

import tasks
from flows.labelling import label_unlabelled
from flows.parameters import ConfigSource, Overrides
from noisy_student import config as config_mod
from noisy_student import report, runs, storage, tracking
from noisy_student.engine import flush_denormals
from tasks import existing_teacher, prepare_data, promote
from tasks.artifacts import link_mlflow_run, publish_results


@flow(name="noisy-student", log_prints=True)
def noisy_student(
    config: ConfigSource,
    overrides: Overrides = None,
    teacher: str | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Train a teacher (or start from an existing model), then for every configured
    student: label the unlabelled images, keep the confident ones with classes balanced,
    train the noised student on labelled plus pseudo-labelled images, compare robustness,
    and make the student the next teacher. The final student goes through the promotion
    gate. Returns summary.json's content.

    Args:
        config: The pipeline config: a YAML path or URL.
        overrides: Config values to change, by dotted key, e.g. {"teacher.epochs": 3}.
        teacher: Start from this model instead of training a teacher: "champion" (the
            registered model's champion, when there is one), models:/NAME@ALIAS, an MLflow
            run id or a checkpoint URL. None trains one.
        run_id: Name of this run. The default is derived from the config and the data,
            so running the same command again after a crash resumes the run: finished
            stages and shards are reused, training continues from its last saved state.
    """
    # A deployment's run starts in a fresh process that `noisy-student` did not set up.
    flush_denormals()
    start = time.perf_counter()
    config = config_mod.resolve(config, overrides)
    data_root, shard_indices = prepare_data(config.data.root, config.data.fashion_mnist)
    first = existing_teacher(teacher, config.name) if teacher else None
    # a run from an existing teacher is another run than one that trains its own
    run_id = run_id or runs.run_identity(config, data_root) + (
        f"-from-{(first.mlflow_run_id or first.url)[-8:]}" if first else ""
    )
    run_url = storage.join(storage.resolve(config.artifacts), "runs", run_id)
    parent = tracking.start_pipeline_run(
        config.name,
        run_id,
        config.model_dump(),
        {
            f"{tracking.TAG}artifacts_url": run_url,
            f"{tracking.TAG}teacher_source": teacher or "trained",
            "prefect.flow_run_id": str(flow_run.id or ""),
        },
    )
    print(f"run {run_id}: artifacts in {run_url}, MLflow run {parent} at {tracking.display_uri()}")
    link_mlflow_run(config.name, parent)  # only where the tracking URI is a server
    # finished tasks' results live in the run folder: found again by a resumed run
    results = runs.task_results_folder(run_url)
    train_teacher, filter_and_balance, train_student, evaluate_robustness = (
        t.with_options(result_storage=results)
        for t in (
            tasks.train_teacher,
            tasks.filter_and_balance,
            tasks.train_student,
            tasks.evaluate_robustness,
        )
    )
    # several training processes: the training stages run under torchrun, from this config
    torchrun = config if config.distributed.nproc_per_node > 1 else None
    try:
        teacher = first or train_teacher(
            config.teacher,
            data_root,
            storage.join(run_url, "iteration-1", "teacher"),
            parent,
            config.seed,
            torchrun,
        )
        iterations, tables, evaluations = [], [], []
        for k, student_cfg in enumerate(config.students, start=1):
            here = storage.join(run_url, f"iteration-{k}")
            shards = label_unlabelled(
                config.inference,
                shard_indices,
                data_root,
                teacher.url,
                storage.join(here, "pseudo_labels"),
                results,
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
                # the last iteration's labels of the same images: how many changed class
                storage.join(run_url, f"iteration-{k - 1}", "pseudo_labels") if k > 1 else None,
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
                # a teacher after iteration 1 is the last student: it is judged as the teacher
                [replace(teacher, role="teacher"), student],
                config.evaluation,
                data_root,
                storage.join(here, "robustness"),
                parent,
                k,
                tables,  # earlier iterations': the baseline and the mCE per iteration
            )
            tables = [*tables, robustness.table_url]
            iterations.append(report.iteration_summary(k, teacher, selected, student, robustness))
            evaluations.append(robustness)
            teacher = student  # the student labels the next round

        promotion = promote(
            student,
            evaluations,
            config.name,
            config.evaluation,
            data_root,
            run_url,
            parent,
            len(config.students),
        )
        summary = report.summary(
            run_id, run_url, config, data_root, parent, iterations, time.perf_counter() - start
        )
        summary["robustness"] = report.robustness_summary(run_url, robustness)
        # the last report covers every model of the run; it goes beside summary.json
        storage.write_bytes(summary["robustness"]["report_url"], robustness.report.encode())
        summary["promotion"] = promotion
        storage.write_json(summary["summary_url"], summary)
        tracking.log_dict(parent, summary, "summary.json")
        publish_results(summary, config.name)
        tracking.log_dict(parent, report.lineage(iterations), "lineage.json")
        tracking.log_text(parent, robustness.report, "robustness.md")
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
