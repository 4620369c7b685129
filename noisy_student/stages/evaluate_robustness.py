"""Stage 5: models side by side, on two suites. The test split's (clean, corrupted and
adversarial accuracy, scored against a pinned baseline: mCE) is reported, every accuracy
with its 95% interval, with per-class precision and recall, figures and a Markdown report.
The suite of the split choices are made on (validation where the dataset has one) is read
by the promotion gate and the run's other choices, never reported as a result. Every
image's predicted class is kept (`predictions.parquet`), so models can be compared image
by image."""

from __future__ import annotations

import logging
import time
from typing import Any

import pandas as pd
import pyarrow as pa

from noisy_student import (
    corruptions,
    dataset,
    engine,
    models,
    robustness,
    statistics,
    storage,
    tracking,
)
from noisy_student import robustness_report as report
from noisy_student.config import EvaluationConfig
from noisy_student.errors import UserError
from noisy_student.stages.prepare_data import choice_split
from noisy_student.stages.records import Robustness, TrainedModel

logger = logging.getLogger(__name__)

TABLE = "robustness.parquet"
PREDICTIONS = "predictions.parquet"
REPORT = "robustness.md"
# the two suites a model is judged on: reported (test), and choices are made on
REPORTED, CHOICE = "reported", "choice"


def _table_url(url: str) -> str:
    return url if url.endswith(".parquet") else storage.join(url, TABLE)


def predictions_url(table_url: str) -> str:
    """The per-image predictions beside a robustness table."""
    return storage.join(table_url.rsplit("/", 1)[0], PREDICTIONS)


def _read_table(url: str) -> pd.DataFrame:
    try:
        table = storage.read_parquet(_table_url(url)).to_pandas()
    except FileNotFoundError:
        raise UserError(f"{_table_url(url)}: robustness table not found") from None
    if "suite" not in table.columns:  # written before there was a choice suite
        table = table.assign(suite=REPORTED, split=dataset.TEST)
    return table


def reported(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of the reported (test) suite."""
    return table[table["suite"] == REPORTED]


def read_predictions(table_urls: list[str]) -> pd.DataFrame:
    """The predictions kept beside these robustness tables (those that have them)."""
    frames = [
        storage.read_parquet(url).to_pandas()
        for url in map(predictions_url, map(_table_url, table_urls))
        if storage.exists(url)
    ]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _of(predictions: pd.DataFrame, run_id: str, suite: str) -> pd.DataFrame:
    if predictions.empty:
        return predictions
    own = predictions[(predictions["mlflow_run_id"] == run_id) & (predictions["suite"] == suite)]
    return own[own["iteration"] == own["iteration"].min()] if len(own) else own


def evaluate_robustness(
    trained: list[TrainedModel],
    cfg: EvaluationConfig,
    data_root: str,
    out_url: str,
    parent_run_id: str,
    iteration: int,
    earlier: list[str] | None = None,
) -> Robustness:
    """Judge the models on the test suite (clean, corrupted, FGSM) and on the choice
    suite (clean and `cfg.gate`'s corruptions of the split choices are made on); score the
    test figures against the baseline (`cfg.baseline`, else the run's first teacher, found
    among `trained` or in the `earlier` iterations' tables); write the table, the
    predictions, figures and report."""
    start = time.perf_counter()
    split = choice_split(data_root)
    suites = {
        REPORTED: robustness.open_suite(
            data_root, cfg.corruptions, cfg.severities, cfg.corruption_images, cfg.seed
        ),
        CHOICE: robustness.open_suite(
            data_root,
            cfg.corruptions,
            cfg.gate.severities,
            cfg.gate.corruption_images,
            cfg.seed,
            split,
        ),
    }
    fgsm = {REPORTED: cfg.fgsm_epsilons, CHOICE: []}  # attacks are reported, not chosen on
    run_id = tracking.start_stage_run(
        parent_run_id,
        "evaluate_robustness",
        iteration,
        {
            **cfg.model_dump(),
            "models": [t.mlflow_run_id for t in trained],
            "suite": suites[REPORTED].url,
            "choice_suite": suites[CHOICE].url,
        },
        {
            **{f"{tracking.TAG}{t.role}_run_id": t.mlflow_run_id for t in trained},
            f"{tracking.TAG}chosen_on": split,
        },
    )
    with tracking.failed_on_error(run_id):
        before = pd.concat([_read_table(u) for u in earlier or []] or [pd.DataFrame()])
        before_predictions = read_predictions(earlier or [])
        identities, measured, judge = [], {}, []
        for t in trained:
            identity = {
                "model": t.model,
                "mlflow_run_id": t.mlflow_run_id,
                "iteration": iteration,
                "role": t.role,
            }
            identities.append(identity)
            # this iteration's teacher was the last one's student, judged on the same images
            found = {}
            for name, suite in suites.items():
                rows = None
                kept = _of(before_predictions, t.mlflow_run_id, name)
                if len(before) and len(kept):
                    rows = robustness.earlier_rows(
                        before[before["suite"] == name],
                        t.mlflow_run_id,
                        suite,
                        fgsm[name],
                        cfg.adversarial_images,
                    )
                if rows is not None:
                    found[name] = robustness.Evaluated(rows, kept[robustness.PREDICTION_COLUMNS])
            if len(found) == len(suites):
                logger.info(f"{t.role} {t.model}: measured in an earlier iteration, not again")
                measured[t.mlflow_run_id] = found
            else:
                judge.append(t)
        # every model left is judged in one pass over each suite's sets: each batch is read
        # (or generated, for cells not in the suite yet) once and meets every model
        started = time.perf_counter()
        loaded = []
        for t in judge:
            model, _ = models.load(t.url)
            loaded.append(model.to(engine.device()))
        results = {
            name: robustness.evaluate_models(
                loaded,
                suite,
                cfg.batch_size,
                cfg.precision,
                fgsm[name],
                cfg.adversarial_images,
                cfg.calibration_bins,
            )
            for name, suite in suites.items()
        }
        for i, t in enumerate(judge):
            measured[t.mlflow_run_id] = {name: results[name][i] for name in suites}
        for suite in suites.values():
            logger.info(
                f"{suite.split} corruption suite {suite.url}: {len(suite.cells)} sets of "
                f"{len(suite.subset)} images ({suite.built} generated, "
                f"{len(suite.cells) - suite.built} read back)"
            )
        if judge:
            images = sum(r["images"] for name in suites for r in results[name][0].rows)
            logger.info(
                f"{', '.join(f'{t.role} {t.model}' for t in judge)}: {images} images each "
                f"judged in {time.perf_counter() - started:.1f} s"
            )
        rows, predictions = [], []
        for identity, t in zip(identities, trained, strict=True):
            for name, suite in suites.items():
                where = {**identity, "suite": name, "split": suite.split}
                evaluated = measured[t.mlflow_run_id][name]
                rows += [{**where, **r} for r in evaluated.rows]
                predictions.append(evaluated.predictions.assign(**where))
        table = pd.DataFrame(rows)
        table_url = storage.join(out_url, TABLE)
        storage.write_parquet(table_url, pa.Table.from_pandas(table, preserve_index=False), 65536)
        kept = pd.concat(predictions, ignore_index=True)
        storage.write_parquet(
            storage.join(out_url, PREDICTIONS),
            pa.Table.from_pandas(kept, preserve_index=False),
            1 << 20,
        )
        all_predictions = pd.concat([before_predictions, kept], ignore_index=True)

        history = pd.concat([before, table], ignore_index=True) if len(before) else table
        tested = reported(history)
        if cfg.baseline:
            source = _table_url(cfg.baseline)
            base_rows, base = robustness.pick_baseline(
                reported(_read_table(cfg.baseline)), cfg.baseline_mlflow_run_id, source
            )
        else:
            source = None
            base_rows, base = robustness.pick_baseline(
                tested, cfg.baseline_mlflow_run_id, "this run (evaluation.baseline unset)"
            )
        robustness.check_baseline(reported(table), base_rows, source or "the run's first teacher")

        class_names = suites[REPORTED].test.class_names
        run: list[dict] = []
        for m in robustness.chain(tested):
            own = tested[
                (tested["mlflow_run_id"] == m["mlflow_run_id"])
                & (tested["iteration"] == m["iteration"])
            ]
            test_predictions = _of(all_predictions, m["mlflow_run_id"], REPORTED)
            choice = history[
                (history["mlflow_run_id"] == m["mlflow_run_id"])
                & (history["iteration"] == m["iteration"])
                & (history["suite"] == CHOICE)
            ]
            run.append(
                {
                    "label": f"{m['role']} {m['iteration']}",
                    "role": m["role"],
                    "iteration": int(m["iteration"]),
                    "model": m["model"],
                    "mlflow_run_id": m["mlflow_run_id"],
                    **robustness.score(
                        own,
                        base_rows,
                        cfg.corruptions,
                        cfg.severities,
                        test_predictions if len(test_predictions) else None,
                        cfg.seed,
                    ),
                    **_choice_and_classes(
                        choice,
                        _of(all_predictions, m["mlflow_run_id"], CHOICE),
                        test_predictions,
                        cfg,
                        class_names,
                    ),
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

        figures = report.figures(current, run, cfg.corruptions, cfg.severities, class_names)
        for name, png in figures.items():
            storage.write_bytes(storage.join(out_url, "figures", name), png)
            tracking.log_bytes(run_id, png, f"figures/{name}")
        choice_suite = suites[CHOICE]
        text = report.markdown(
            iteration,
            run,
            cfg.corruptions,
            cfg.severities,
            {n: corruptions.group_of(n) for n in cfg.corruptions},
            {
                "url": suites[REPORTED].url,
                "images": len(suites[REPORTED].subset),
                "test_images": suites[REPORTED].test.num_rows,
                "seed": cfg.seed,
                "calibration_bins": cfg.calibration_bins,
                "adversarial_images": len(suites[REPORTED].adversarial(cfg.adversarial_images)),
                "choice_split": split,
                "choice_images": choice_suite.test.num_rows,
                "choice_corrupted": len(choice_suite.subset),
                "choice_severities": cfg.gate.severities,
            },
            baseline,
            list(figures),
            class_names,
        )
        report_url = storage.join(out_url, REPORT)
        storage.write_bytes(report_url, text.encode())
        tracking.log_text(run_id, text, REPORT)

        for m in current:
            _log_model(run_id, parent_run_id, iteration, m)
        tracking.end_run(run_id)
        return Robustness(
            url=out_url,
            mlflow_run_id=run_id,
            seconds=time.perf_counter() - start,
            models=current,
            table_url=table_url,
            report_url=report_url,
            report=text,
            suite_url=suites[REPORTED].url,
            baseline=baseline,
            predictions_url=storage.join(out_url, PREDICTIONS),
            chosen_on=split,
            choice_suite_url=choice_suite.url,
        )


def _choice_and_classes(
    choice_rows: pd.DataFrame,
    choice_predictions: pd.DataFrame,
    test_predictions: pd.DataFrame,
    cfg: EvaluationConfig,
    class_names: list[str],
) -> dict[str, Any]:
    """A model's figures on the choice split (what the gate reads), and its per-class
    precision and recall on the test split (reported)."""
    out: dict[str, Any] = {}
    if len(choice_rows) and len(choice_predictions):
        out["choice"] = robustness.choice_score(
            choice_rows["split"].iloc[0],
            choice_rows,
            choice_predictions,
            cfg.corruptions,
            cfg.gate.severities,
            cfg.seed,
        )
    if len(test_predictions):
        out["per_class"] = robustness.class_report(test_predictions, class_names)
    return out


def _log_model(run_id: str, parent_run_id: str, iteration: int, m: dict[str, Any]) -> None:
    """A model's figures as metrics of the stage's run (and a few on the pipeline run, by
    iteration, so the MLflow UI charts them over the run), its per-class figures as a
    JSON artifact, and one log line."""
    role = m["role"]
    metrics = {
        f"{role}_{k}": m[k]
        for k in (
            "test_accuracy",
            "corruption_accuracy",
            "mce",
            "relative_mce",
            "ece_clean",
            "ece_corrupted",
        )
    }
    metrics |= {f"{role}_{k}_accuracy": v for k, v in m["per_corruption"].items()}
    metrics |= {f"{role}_fgsm_{e.split('/')[0]}_accuracy": v for e, v in m["fgsm_accuracy"].items()}
    low, high = m["test_accuracy_interval"]
    metrics |= {f"{role}_test_accuracy_low": low, f"{role}_test_accuracy_high": high}
    choice = m.get("choice")
    if choice:
        split = choice["split"]
        metrics |= {
            f"{role}_{split}_accuracy": choice["accuracy"],
            f"{role}_{split}_corruption_accuracy": choice["corruption_accuracy"],
        }
    tracking.log_metrics(run_id, metrics)
    tracking.log_metrics(
        parent_run_id,
        {f"{role}_mce": m["mce"], f"{role}_relative_mce": m["relative_mce"]},
        step=iteration,
    )
    if "per_class" in m:
        tracking.log_dict(run_id, m["per_class"], f"per_class/{role}.json")
    fgsm = ", ".join(f"{e} {v:.1%}" for e, v in m["fgsm_accuracy"].items())
    percent = statistics.percent
    chosen = (
        f"; {choice['split']} {percent(choice['accuracy'], choice['accuracy_interval'])}"
        if choice
        else ""
    )
    logger.info(
        f"{role} {m['model']}: clean {percent(m['test_accuracy'], m['test_accuracy_interval'])}, "
        f"corrupted {m['corruption_accuracy']:.2%}, mCE {100 * m['mce']:.1f}, relative mCE "
        f"{100 * m['relative_mce']:.1f}, ECE {m['ece_clean']:.3f} clean / "
        f"{m['ece_corrupted']:.3f} corrupted, FGSM {fgsm}{chosen}"
    )
