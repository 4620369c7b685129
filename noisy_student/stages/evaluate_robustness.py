"""Stage 5: clean, corrupted and adversarial test accuracy, models side by side, scored
against a pinned baseline (mCE), with figures and a Markdown report."""

from __future__ import annotations

import logging
import time

import pandas as pd
import pyarrow as pa

from noisy_student import corruptions, engine, models, robustness, storage, tracking
from noisy_student import robustness_report as report
from noisy_student.config import EvaluationConfig
from noisy_student.errors import UserError
from noisy_student.stages.records import Robustness, TrainedModel

logger = logging.getLogger(__name__)

TABLE = "robustness.parquet"
REPORT = "robustness.md"


def _table_url(url: str) -> str:
    return url if url.endswith(".parquet") else storage.join(url, TABLE)


def _read_table(url: str) -> pd.DataFrame:
    try:
        return storage.read_parquet(_table_url(url)).to_pandas()
    except FileNotFoundError:
        raise UserError(f"{_table_url(url)}: robustness table not found") from None


def evaluate_robustness(
    trained: list[TrainedModel],
    cfg: EvaluationConfig,
    data_root: str,
    out_url: str,
    parent_run_id: str,
    iteration: int,
    earlier: list[str] | None = None,
) -> Robustness:
    """Judge the models on the clean test set, the corruption suite and FGSM; score them
    against the baseline (`cfg.baseline`, else the run's first teacher, found among
    `trained` or in the `earlier` iterations' tables); write the table, figures and report.
    """
    start = time.perf_counter()
    suite = robustness.open_suite(
        data_root, cfg.corruptions, cfg.severities, cfg.corruption_images, cfg.seed
    )
    run_id = tracking.start_stage_run(
        parent_run_id,
        "evaluate_robustness",
        iteration,
        {**cfg.model_dump(), "models": [t.mlflow_run_id for t in trained], "suite": suite.url},
        {f"{tracking.TAG}{t.role}_run_id": t.mlflow_run_id for t in trained},
    )
    with tracking.failed_on_error(run_id):
        before = pd.concat([_read_table(u) for u in earlier or []] or [pd.DataFrame()])
        identities, measured, judge = [], {}, []
        for t in trained:
            identities.append(
                {
                    "model": t.model,
                    "mlflow_run_id": t.mlflow_run_id,
                    "iteration": iteration,
                    "role": t.role,
                }
            )
            # this iteration's teacher was the last one's student, judged on the same images
            earlier_rows = (
                robustness.earlier_rows(
                    before, t.mlflow_run_id, suite, cfg.fgsm_epsilons, cfg.adversarial_images
                )
                if len(before)
                else None
            )
            if earlier_rows is not None:
                logger.info(f"{t.role} {t.model}: measured in an earlier iteration, not again")
                measured[t.mlflow_run_id] = earlier_rows
            else:
                judge.append(t)
        # every model left is judged in one pass over the sets: each batch is read (or
        # generated, for cells not in the suite yet) once and meets every model
        started = time.perf_counter()
        loaded = []
        for t in judge:
            model, _ = models.load(t.url)
            loaded.append(model.to(engine.device()))
        results = robustness.evaluate_models(
            loaded,
            suite,
            cfg.batch_size,
            cfg.precision,
            cfg.fgsm_epsilons,
            cfg.adversarial_images,
            cfg.calibration_bins,
        )
        for t, r in zip(judge, results, strict=True):
            measured[t.mlflow_run_id] = r
        logger.info(
            f"corruption suite {suite.url}: {len(suite.cells)} sets of {len(suite.subset)} "
            f"images ({suite.built} generated, {len(suite.cells) - suite.built} read back)"
        )
        if judge:
            images = sum(r["images"] for r in results[0])
            logger.info(
                f"{', '.join(f'{t.role} {t.model}' for t in judge)}: {images} images each "
                f"judged in {time.perf_counter() - started:.1f} s"
            )
        rows = [
            {**identity, **r}
            for identity, t in zip(identities, trained, strict=True)
            for r in measured[t.mlflow_run_id]
        ]
        table = pd.DataFrame(rows)
        table_url = storage.join(out_url, TABLE)
        storage.write_parquet(table_url, pa.Table.from_pandas(table, preserve_index=False), 65536)

        history = pd.concat([before, table], ignore_index=True) if len(before) else table
        if cfg.baseline:
            source = _table_url(cfg.baseline)
            base_rows, base = robustness.pick_baseline(
                _read_table(cfg.baseline), cfg.baseline_mlflow_run_id, source
            )
        else:
            source = None
            base_rows, base = robustness.pick_baseline(
                history, cfg.baseline_mlflow_run_id, "this run (evaluation.baseline unset)"
            )
        robustness.check_baseline(table, base_rows, source or "the run's first teacher")

        run: list[dict] = []
        for m in robustness.chain(history):
            own = history[
                (history["mlflow_run_id"] == m["mlflow_run_id"])
                & (history["iteration"] == m["iteration"])
            ]
            run.append(
                {
                    "label": f"{m['role']} {m['iteration']}",
                    "role": m["role"],
                    "iteration": int(m["iteration"]),
                    "model": m["model"],
                    "mlflow_run_id": m["mlflow_run_id"],
                    **robustness.score(own, base_rows, cfg.corruptions, cfg.severities),
                }
            )
        by_id = {m["mlflow_run_id"]: m for m in run}
        current = []
        for t in trained:
            m, label = by_id[t.mlflow_run_id], f"{t.role} {iteration}"
            if m["label"] != label:  # a teacher after iteration 1: an earlier student
                label = f"{label} (= {m['label']})"
            current.append({**m, "role": t.role, "label": label})
        baseline = {
            "label": by_id[base["mlflow_run_id"]]["label"]
            if base["mlflow_run_id"] in by_id
            else f"{base['role']} {base['iteration']}",
            "model": base["model"],
            "mlflow_run_id": base["mlflow_run_id"],
            "source": source,
        }

        figures = report.figures(current, run, cfg.corruptions, cfg.severities)
        for name, png in figures.items():
            storage.write_bytes(storage.join(out_url, "figures", name), png)
            tracking.log_bytes(run_id, png, f"figures/{name}")
        text = report.markdown(
            iteration,
            run,
            cfg.corruptions,
            cfg.severities,
            {n: corruptions.group_of(n) for n in cfg.corruptions},
            {
                "url": suite.url,
                "images": len(suite.subset),
                "test_images": suite.test.num_rows,
                "seed": cfg.seed,
                "calibration_bins": cfg.calibration_bins,
                "adversarial_images": len(suite.adversarial(cfg.adversarial_images)),
            },
            baseline,
            list(figures),
        )
        report_url = storage.join(out_url, REPORT)
        storage.write_bytes(report_url, text.encode())
        tracking.log_text(run_id, text, REPORT)

        for m in current:
            metrics = {
                f"{m['role']}_{k}": m[k]
                for k in (
                    "test_accuracy",
                    "corruption_accuracy",
                    "mce",
                    "relative_mce",
                    "ece_clean",
                    "ece_corrupted",
                )
            }
            metrics |= {f"{m['role']}_{k}_accuracy": v for k, v in m["per_corruption"].items()}
            metrics |= {
                f"{m['role']}_fgsm_{e.split('/')[0]}_accuracy": v
                for e, v in m["fgsm_accuracy"].items()
            }
            tracking.log_metrics(run_id, metrics)
            # and on the pipeline run, by iteration: the MLflow UI charts them over the run
            tracking.log_metrics(
                parent_run_id,
                {f"{m['role']}_mce": m["mce"], f"{m['role']}_relative_mce": m["relative_mce"]},
                step=iteration,
            )
            fgsm = ", ".join(f"{e} {v:.1%}" for e, v in m["fgsm_accuracy"].items())
            logger.info(
                f"{m['role']} {m['model']}: clean {m['test_accuracy']:.2%}, corrupted "
                f"{m['corruption_accuracy']:.2%}, mCE {100 * m['mce']:.1f}, relative mCE "
                f"{100 * m['relative_mce']:.1f}, ECE {m['ece_clean']:.3f} clean / "
                f"{m['ece_corrupted']:.3f} corrupted, FGSM {fgsm}"
            )
        tracking.end_run(run_id)
        return Robustness(
            url=out_url,
            mlflow_run_id=run_id,
            seconds=time.perf_counter() - start,
            models=current,
            table_url=table_url,
            report_url=report_url,
            report=text,
            suite_url=suite.url,
            baseline=baseline,
        )
