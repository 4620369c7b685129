"""Stage 5: models side by side, on two suites. The test split's (clean, corrupted and
adversarial accuracy, scored against a pinned baseline: mCE) is reported, every accuracy
with its 95% interval, with per-class precision and recall, figures and a Markdown report.
The suite of the split choices are made on (validation where the dataset has one) is read
by the promotion gate and the run's other choices, never reported as a result. Every
image's predicted class is kept (`predictions.parquet`), so models can be compared image
by image."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa

from noisy_student.config import EvaluationConfig
from noisy_student.data import dataset, storage
from noisy_student.errors import UserError
from noisy_student.evaluation import corruptions, robustness, statistics
from noisy_student.evaluation import robustness_report as report
from noisy_student.evaluation.scores import ChoiceScores, ModelScores
from noisy_student.registry import tracking
from noisy_student.stages.prepare_data import choice_split
from noisy_student.stages.records import Robustness, TrainedModel
from noisy_student.training import engine, models

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


@dataclass
class _Suites:
    """The two suites a model is judged on, by name (REPORTED, CHOICE), and the FGSM
    epsilons of each (attacks are reported, not chosen on)."""

    by_name: dict[str, robustness.Suite]
    fgsm: dict[str, list[int]]
    choice_split: str

    @property
    def reported(self) -> robustness.Suite:
        return self.by_name[REPORTED]

    @property
    def choice(self) -> robustness.Suite:
        return self.by_name[CHOICE]


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
    suites = open_suites(cfg, data_root)
    run_id = _start_run(trained, cfg, suites, parent_run_id, iteration)
    with tracking.failed_on_error(run_id):
        earlier_table = pd.concat([_read_table(u) for u in earlier or []] or [pd.DataFrame()])
        earlier_predictions = read_predictions(earlier or [])
        measured = measure(trained, cfg, suites, earlier_table, earlier_predictions)
        table_url, table, predictions = _write_measurements(
            trained, measured, suites, iteration, out_url
        )
        history = (
            pd.concat([earlier_table, table], ignore_index=True) if len(earlier_table) else table
        )
        every_prediction = pd.concat([earlier_predictions, predictions], ignore_index=True)
        baseline_rows, baseline_row, source = _baseline(cfg, history, table)
        class_names = suites.reported.test.class_names
        run = score(history, every_prediction, baseline_rows, cfg, class_names)
        current = _this_stages_models(trained, run, iteration)
        baseline = _baseline_record(baseline_row, source, run)
        report_url, report_text = publish(
            run_id, out_url, iteration, current, run, baseline, cfg, suites
        )
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
            report=report_text,
            suite_url=suites.reported.url,
            baseline=baseline,
            predictions_url=storage.join(out_url, PREDICTIONS),
            chosen_on=suites.choice_split,
            choice_suite_url=suites.choice.url,
        )


def open_suites(cfg: EvaluationConfig, data_root: str) -> _Suites:
    """The test suite (reported) and the suite of the split choices are made on."""
    split = choice_split(data_root)
    reported_suite = robustness.open_suite(
        data_root, cfg.corruptions, cfg.severities, cfg.corruption_images, cfg.seed
    )
    choice_suite = robustness.open_suite(
        data_root, cfg.corruptions, cfg.gate.severities, cfg.gate.corruption_images, cfg.seed,
        split,
    )  # fmt: skip
    return _Suites(
        {REPORTED: reported_suite, CHOICE: choice_suite},
        {REPORTED: cfg.fgsm_epsilons, CHOICE: []},
        split,
    )


def _start_run(
    trained: list[TrainedModel],
    cfg: EvaluationConfig,
    suites: _Suites,
    parent_run_id: str,
    iteration: int,
) -> str:
    return tracking.start_stage_run(
        parent_run_id,
        "evaluate_robustness",
        iteration,
        {
            **cfg.model_dump(),
            "models": [t.mlflow_run_id for t in trained],
            "suite": suites.reported.url,
            "choice_suite": suites.choice.url,
        },
        {
            **{f"{tracking.TAG}{t.role}_run_id": t.mlflow_run_id for t in trained},
            f"{tracking.TAG}chosen_on": suites.choice_split,
        },
    )


Measured = dict[str, dict[str, robustness.Evaluated]]  # by MLflow run id, then suite name


def _measured_before(
    t: TrainedModel,
    cfg: EvaluationConfig,
    suites: _Suites,
    earlier_table: pd.DataFrame,
    earlier_predictions: pd.DataFrame,
) -> dict[str, robustness.Evaluated] | None:
    """A model's measurements of both suites in an earlier iteration (this iteration's
    teacher was the last one's student, judged on the same images), or None."""
    found = {}
    for name, suite in suites.by_name.items():
        kept = _of(earlier_predictions, t.mlflow_run_id, name)
        if not (len(earlier_table) and len(kept)):
            continue
        rows = robustness.earlier_rows(
            earlier_table[earlier_table["suite"] == name],
            t.mlflow_run_id,
            suite,
            suites.fgsm[name],
            cfg.adversarial_images,
        )
        if rows is not None:
            found[name] = robustness.Evaluated(rows, kept[robustness.PREDICTION_COLUMNS])
    return found if len(found) == len(suites.by_name) else None


def measure(
    trained: list[TrainedModel],
    cfg: EvaluationConfig,
    suites: _Suites,
    earlier_table: pd.DataFrame,
    earlier_predictions: pd.DataFrame,
) -> Measured:
    """Each model's measurements of both suites: read back when an earlier iteration made
    them, else judged now."""
    measured: Measured = {}
    to_judge = []
    for t in trained:
        found = _measured_before(t, cfg, suites, earlier_table, earlier_predictions)
        if found is not None:
            logger.info(f"{t.role} {t.model}: measured in an earlier iteration, not again")
            measured[t.mlflow_run_id] = found
        else:
            to_judge.append(t)
    return measured | _judge(to_judge, cfg, suites)


def _judge(to_judge: list[TrainedModel], cfg: EvaluationConfig, suites: _Suites) -> Measured:
    """The models judged in one pass over each suite's sets: each batch is read (or
    generated, for cells not in the suite yet) once and meets every model."""
    started = time.perf_counter()
    loaded = [models.load(t.url)[0].to(engine.device()) for t in to_judge]
    results = {
        name: robustness.evaluate_models(
            loaded,
            suite,
            cfg.batch_size,
            cfg.precision,
            suites.fgsm[name],
            cfg.adversarial_images,
            cfg.calibration_bins,
        )
        for name, suite in suites.by_name.items()
    }
    for suite in suites.by_name.values():
        logger.info(
            f"{suite.split} corruption suite {suite.url}: {len(suite.cells)} sets of "
            f"{len(suite.subset)} images ({suite.built} generated, "
            f"{len(suite.cells) - suite.built} read back)"
        )
    if to_judge:
        images = sum(r["images"] for name in suites.by_name for r in results[name][0].rows)
        logger.info(
            f"{', '.join(f'{t.role} {t.model}' for t in to_judge)}: {images} images each "
            f"judged in {time.perf_counter() - started:.1f} s"
        )
    return {
        t.mlflow_run_id: {name: results[name][i] for name in suites.by_name}
        for i, t in enumerate(to_judge)
    }


def _write_measurements(
    trained: list[TrainedModel],
    measured: Measured,
    suites: _Suites,
    iteration: int,
    out_url: str,
) -> tuple[str, pd.DataFrame, pd.DataFrame]:
    """The table (a row per model, suite and set) and the per-image predictions, written
    beside each other; returns the table's URL, the table and the predictions."""
    rows, predictions = [], []
    for t in trained:
        identity = {
            "model": t.model,
            "mlflow_run_id": t.mlflow_run_id,
            "iteration": iteration,
            "role": t.role,
        }
        for name, suite in suites.by_name.items():
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
    return table_url, table, kept


def _baseline(
    cfg: EvaluationConfig, history: pd.DataFrame, table: pd.DataFrame
) -> tuple[pd.DataFrame, pd.Series, str | None]:
    """The baseline's test rows, the row naming it, and its table's URL (None: this run's)."""
    if cfg.baseline:
        source = _table_url(cfg.baseline)
        baseline_rows, baseline_row = robustness.pick_baseline(
            reported(_read_table(cfg.baseline)), cfg.baseline_mlflow_run_id, source
        )
    else:
        source = None
        baseline_rows, baseline_row = robustness.pick_baseline(
            reported(history), cfg.baseline_mlflow_run_id, "this run (evaluation.baseline unset)"
        )
    robustness.check_baseline(reported(table), baseline_rows, source or "the run's first teacher")
    return baseline_rows, baseline_row, source


def score(
    history: pd.DataFrame,
    every_prediction: pd.DataFrame,
    baseline_rows: pd.DataFrame,
    cfg: EvaluationConfig,
    class_names: list[str],
) -> list[ModelScores]:
    """Each model of the run so far, in the order the run made them, with its scores: the
    test figures against the baseline, the choice split's, and per class."""
    tested = reported(history)
    run: list[ModelScores] = []
    for m in robustness.chain(tested):
        test_predictions = _of(every_prediction, m["mlflow_run_id"], REPORTED)
        run.append(
            ModelScores(
                label=f"{m['role']} {m['iteration']}",
                role=m["role"],
                iteration=int(m["iteration"]),
                model=m["model"],
                mlflow_run_id=m["mlflow_run_id"],
                **robustness.score(
                    _rows_of(tested, m),
                    baseline_rows,
                    cfg.corruptions,
                    cfg.severities,
                    test_predictions if len(test_predictions) else None,
                    cfg.seed,
                ),
                choice=_choice(
                    _rows_of(history[history["suite"] == CHOICE], m),
                    _of(every_prediction, m["mlflow_run_id"], CHOICE),
                    cfg,
                ),
                per_class=robustness.class_report(test_predictions, class_names)
                if len(test_predictions)
                else None,
            )
        )
    return run


def _rows_of(table: pd.DataFrame, m: pd.Series) -> pd.DataFrame:
    """A model's rows of a table, as it was judged in the iteration `m` names."""
    return table[
        (table["mlflow_run_id"] == m["mlflow_run_id"]) & (table["iteration"] == m["iteration"])
    ]


def _this_stages_models(
    trained: list[TrainedModel], run: list[ModelScores], iteration: int
) -> list[ModelScores]:
    """The scores of the models this stage was given, labelled by their role here."""
    by_id = {m.mlflow_run_id: m for m in run}
    current = []
    for t in trained:
        m, label = by_id[t.mlflow_run_id], f"{t.role} {iteration}"
        if m.label != label:  # a teacher after iteration 1: an earlier student
            label = f"{label} (= {m.label})"
        current.append(dataclasses.replace(m, role=t.role, label=label))
    return current


def _baseline_record(
    baseline_row: pd.Series, source: str | None, run: list[ModelScores]
) -> dict[str, Any]:
    by_id = {m.mlflow_run_id: m for m in run}
    return {
        "label": by_id[baseline_row["mlflow_run_id"]].label
        if baseline_row["mlflow_run_id"] in by_id
        else f"{baseline_row['role']} {baseline_row['iteration']}",
        "model": baseline_row["model"],
        "mlflow_run_id": baseline_row["mlflow_run_id"],
        "source": source,
    }


def publish(
    run_id: str,
    out_url: str,
    iteration: int,
    current: list[ModelScores],
    run: list[ModelScores],
    baseline: dict[str, Any],
    cfg: EvaluationConfig,
    suites: _Suites,
) -> tuple[str, str]:
    """The figures and the Markdown report, on storage and in the stage's MLflow run;
    returns the report's URL and text."""
    class_names = suites.reported.test.class_names
    figures = report.figures(current, run, cfg.corruptions, cfg.severities, class_names)
    for name, png in figures.items():
        storage.write_bytes(storage.join(out_url, "figures", name), png)
        tracking.log_bytes(run_id, png, f"figures/{name}")
    text = report.markdown(
        iteration,
        run,
        cfg.corruptions,
        cfg.severities,
        {n: corruptions.group_of(n) for n in cfg.corruptions},
        _suite_description(cfg, suites),
        baseline,
        list(figures),
        class_names,
    )
    report_url = storage.join(out_url, REPORT)
    storage.write_bytes(report_url, text.encode())
    tracking.log_text(run_id, text, REPORT)
    return report_url, text


def _suite_description(cfg: EvaluationConfig, suites: _Suites) -> dict[str, Any]:
    reported_suite, choice_suite = suites.reported, suites.choice
    return {
        "url": reported_suite.url,
        "images": len(reported_suite.subset),
        "test_images": reported_suite.test.num_rows,
        "seed": cfg.seed,
        "calibration_bins": cfg.calibration_bins,
        "adversarial_images": len(reported_suite.adversarial(cfg.adversarial_images)),
        "choice_split": suites.choice_split,
        "choice_images": choice_suite.test.num_rows,
        "choice_corrupted": len(choice_suite.subset),
        "choice_severities": cfg.gate.severities,
    }


def _choice(
    choice_rows: pd.DataFrame, choice_predictions: pd.DataFrame, cfg: EvaluationConfig
) -> ChoiceScores | None:
    """A model's figures on the choice split (what the gate reads), where it was judged."""
    if not (len(choice_rows) and len(choice_predictions)):
        return None
    return robustness.choice_score(
        choice_rows["split"].iloc[0],
        choice_rows,
        choice_predictions,
        cfg.corruptions,
        cfg.gate.severities,
        cfg.seed,
    )


def _log_model(run_id: str, parent_run_id: str, iteration: int, m: ModelScores) -> None:
    """A model's figures as metrics of the stage's run (and a few on the pipeline run, by
    iteration, so the MLflow UI charts them over the run), its per-class figures as a
    JSON artifact, and one log line."""
    role = m.role
    metrics = {
        f"{role}_{k}": getattr(m, k)
        for k in (
            "test_accuracy",
            "corruption_accuracy",
            "mce",
            "relative_mce",
            "ece_clean",
            "ece_corrupted",
        )
    }
    metrics |= {f"{role}_{k}_accuracy": v for k, v in m.per_corruption.items()}
    metrics |= {f"{role}_fgsm_{e.split('/')[0]}_accuracy": v for e, v in m.fgsm_accuracy.items()}
    low, high = m.test_accuracy_interval
    metrics |= {f"{role}_test_accuracy_low": low, f"{role}_test_accuracy_high": high}
    choice = m.choice
    if choice:
        split = choice.split
        metrics |= {
            f"{role}_{split}_accuracy": choice.accuracy,
            f"{role}_{split}_corruption_accuracy": choice.corruption_accuracy,
        }
    tracking.log_metrics(run_id, metrics)
    tracking.log_metrics(
        parent_run_id,
        {f"{role}_mce": m.mce, f"{role}_relative_mce": m.relative_mce},
        step=iteration,
    )
    if m.per_class is not None:
        tracking.log_dict(run_id, m.per_class, f"per_class/{role}.json")
    fgsm = ", ".join(f"{e} {v:.1%}" for e, v in m.fgsm_accuracy.items())
    percent = statistics.percent
    chosen = (
        f"; {choice.split} {percent(choice.accuracy, choice.accuracy_interval)}" if choice else ""
    )
    logger.info(
        f"{role} {m.model}: clean {percent(m.test_accuracy, m.test_accuracy_interval)}, "
        f"corrupted {m.corruption_accuracy:.2%}, mCE {100 * m.mce:.1f}, relative mCE "
        f"{100 * m.relative_mce:.1f}, ECE {m.ece_clean:.3f} clean / "
        f"{m.ece_corrupted:.3f} corrupted, FGSM {fgsm}{chosen}"
    )
