"""Stage 3: drop unsure pseudo labels, balance the classes, write the student's set."""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from noisy_student.config import SelectionConfig
from noisy_student.data import dataset, storage
from noisy_student.errors import UserError
from noisy_student.evaluation import diagnostics
from noisy_student.registry import tracking
from noisy_student.stages.infer_pseudo_labels import finish_labelling_run, record_labelling
from noisy_student.stages.records import (
    PseudoLabelShard,
    SelectedPseudoLabels,
    TrainedModel,
)
from noisy_student.training import selection

logger = logging.getLogger(__name__)


def _read_shard(shard: PseudoLabelShard, columns: list[str]) -> pa.Table:
    data = storage.read_verified(shard.url, shard.sha256, "the labelling stage's record")
    return pq.read_table(io.BytesIO(data), columns=columns)


def _probs(table: pa.Table, k: int) -> np.ndarray:
    column = table.column("probs").combine_chunks()
    return column.values.to_numpy().reshape(len(column), k)


def _correct(
    truth: pd.Series | None, ids: list[str], predicted: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """(correct, known) masks: pseudo label equals the true label; the true label is known.
    Images appended later (`ingest append`) have none: not scored. None without truth."""
    if truth is None:
        return None
    true = truth.reindex(ids).to_numpy()
    known = ~pd.isna(true)
    return (true == np.asarray(predicted)) & known, known


def _score(truth: pd.Series | None, ids: list[str], predicted: np.ndarray) -> tuple[int, int]:
    """(right, scored): how many pseudo labels equal the true label, among the images whose
    true label is known."""
    masks = _correct(truth, ids, predicted)
    return (0, 0) if masks is None else (int(masks[0].sum()), int(masks[1].sum()))


def _previous_shards(previous_pseudo_url: str | None) -> dict[str, str]:
    """The previous iteration's pseudo-label shards by file name (none in iteration 1)."""
    if not previous_pseudo_url:
        return {}
    url = storage.join(previous_pseudo_url, dataset.MANIFEST)
    if not storage.exists(url):
        raise UserError(f"{url}: the previous iteration's pseudo labels are missing")
    shards = storage.read_json(url)["shards"]
    return {s["file"]: storage.join(previous_pseudo_url, s["file"]) for s in shards}


def filter_and_balance(
    shards: list[PseudoLabelShard],
    cfg: SelectionConfig,
    data_root: str,
    pseudo_url: str,
    out_url: str,
    teacher: TrainedModel,
    parent_run_id: str,
    iteration: int,
    seed: int,
    previous_pseudo_url: str | None = None,
) -> SelectedPseudoLabels:
    """Drop unsure images, balance classes, write the student's pseudo-labelled set, in two
    passes over the shards (selection.py says how; aligned first where `cfg.align`); count
    labels changed since `previous_pseudo_url`; record the labelling run (from pass 1)."""
    start = time.perf_counter()
    shards = sorted(shards, key=lambda s: s.index)
    lineage = _lineage(teacher, pseudo_url)
    inference_seconds = max(s.seconds for s in shards) if shards else 0.0
    inference_run = record_labelling(shards, teacher, pseudo_url, parent_run_id, iteration, lineage)
    run_id = tracking.start_stage_run(
        parent_run_id, "filter_and_balance", iteration, cfg.model_dump(), lineage
    )
    with tracking.failed_on_error(run_id, inference_run):
        pool = dataset.read_manifest(storage.join(data_root, dataset.UNLABELLED))
        truth = dataset.unlabelled_truth(data_root, pool)
        total = sum(s.rows for s in shards)
        if total == 0:
            raise UserError(f"{pool.url}: the unlabelled set is empty")
        alignment = _align(shards, data_root, pool.num_classes) if cfg.align else None
        survey = _survey(shards, cfg, pool.num_classes, truth, previous_pseudo_url, alignment)
        finish_labelling_run(inference_run, total, inference_seconds, survey.confidence_sum,
                             survey.accuracy_all, survey.scored_all)  # fmt: skip
        rule = selection.plan(survey.histogram, cfg.min_confidence, cfg.balance,
                              cfg.per_class_quota, alignment and alignment.log_weights)  # fmt: skip
        chosen = _select(shards, cfg, rule, pool.num_classes, truth, seed, out_url)
        per_class = selection.counts_frame(chosen.counts).assign(
            name=lambda f: [pool.class_names[c] for c in f["class"]]
        )
        diagnosis, figure = _diagnose(survey.stats, cfg, iteration, out_url)
        aligning = _alignment_record(alignment, survey, pool.class_names)
        _write_manifest(out_url, pseudo_url, rule, chosen.files, per_class, diagnosis, aligning)
        result = SelectedPseudoLabels(
            url=out_url,
            probabilities_url=pseudo_url,
            mlflow_run_id=run_id,
            inference_run_id=inference_run,
            total=total,
            kept=int(per_class["kept"].sum()),
            selected=int(per_class["final"].sum()),
            accuracy=chosen.right / chosen.scored if chosen.scored else None,
            accuracy_all=survey.labels_accuracy_all,
            inference_seconds=inference_seconds,
            seconds=0.0,
            per_class=per_class.to_dict(orient="records"),
            scored_kept=chosen.scored,
            scored_all=survey.scored_all,
        )
        _record(run_id, result, per_class, diagnosis, figure, iteration, aligning)
        return dataclasses.replace(result, seconds=time.perf_counter() - start)


def _lineage(teacher: TrainedModel, pseudo_url: str) -> dict[str, str]:
    return {
        f"{tracking.TAG}teacher_run_id": teacher.mlflow_run_id,
        f"{tracking.TAG}teacher_url": teacher.url,
        f"{tracking.TAG}pseudo_labels_url": pseudo_url,
    }


def _align(shards: list[PseudoLabelShard], data_root: str, k: int) -> selection.Alignment:
    """Distribution alignment's class weights: passes over the shards' probabilities until
    their aligned mean matches the labelled set's class shares."""
    labelled = dataset.read_manifest(storage.join(data_root, dataset.LABELLED))
    prior = dataset.class_shares(labelled)
    alignment = selection.align(lambda: (_probs(_read_shard(s, ["probs"]), k) for s in shards),
                                prior)  # fmt: skip
    if alignment.deviation > selection.ALIGN_TOLERANCE:
        logger.warning(
            f"distribution alignment: after {alignment.passes} passes a class's mean "
            f"prediction is still {alignment.deviation:.2%} off its labelled share"
        )
    return alignment


@dataclass
class _Survey:
    """Pass 1 over the shards: what the plan and the labelling run's figures need. The
    labelling run's figures are the teacher's own; the histogram and the statistics are of
    the labels the student gets (aligned, where aligned)."""

    histogram: np.ndarray  # per class and confidence bin
    stats: diagnostics.PseudoLabelStats
    confidence_sum: float = 0.0
    right_all: int = 0
    scored_all: int = 0  # images whose true label is known
    right_labels: int = 0  # of those, right after alignment (= right_all without)
    changed_by_alignment: int = 0

    @property
    def accuracy_all(self) -> float | None:
        return self.right_all / self.scored_all if self.scored_all else None

    @property
    def labels_accuracy_all(self) -> float | None:
        return self.right_labels / self.scored_all if self.scored_all else None


def _survey(
    shards: list[PseudoLabelShard],
    cfg: SelectionConfig,
    k: int,
    truth: pd.Series | None,
    previous_pseudo_url: str | None,
    alignment: selection.Alignment | None = None,
) -> _Survey:
    """Pass 1: per-class confidence histograms, two small columns per shard (and the
    probabilities, to align them)."""
    survey = _Survey(np.zeros((k, selection.NUM_BINS), dtype=np.int64),
                     diagnostics.PseudoLabelStats())  # fmt: skip
    previous = _previous_shards(previous_pseudo_url)
    extra = [] if alignment is None else ["probs"]
    for s in shards:
        table = _read_shard(s, ["id", "predicted", "confidence", *extra])
        ids = table.column("id").to_pylist()
        predicted = table.column("predicted").to_numpy()
        confidence = table.column("confidence").to_numpy()
        survey.confidence_sum += float(confidence.sum())
        masks = _correct(truth, ids, predicted)
        if masks is not None:
            survey.right_all += int(masks[0].sum())
            survey.scored_all += int(masks[1].sum())
        label, sure = predicted, confidence
        if alignment is not None:
            q = selection.aligned(_probs(table, k), alignment.log_weights)
            label, sure = q.argmax(1), q.max(1)
            survey.changed_by_alignment += int((label != predicted).sum())
            masks = _correct(truth, ids, label)
        if masks is not None:
            survey.right_labels += int(masks[0].sum())
        survey.histogram += selection.class_histogram(label, sure, k, cfg.min_confidence)
        survey.stats.add(sure, *(masks or (None, None)))
        before_url = previous.get(s.url.rsplit("/", 1)[-1])
        if before_url:
            before = storage.read_parquet(before_url, ["id", "predicted"]).to_pandas()
            earlier = before.set_index("id")["predicted"].reindex(ids).to_numpy()
            both = ~pd.isna(earlier)
            survey.stats.add_changes(earlier[both].astype(np.int64), predicted[both])
    return survey


@dataclass
class _Chosen:
    """Pass 2: the selected files, the counts per class, and the kept labels' score."""

    counts: np.ndarray  # per class and selection.COUNTS
    files: list[dict[str, Any]] = field(default_factory=list)
    right: int = 0
    scored: int = 0  # kept images whose true label is known


def _select(
    shards: list[PseudoLabelShard],
    cfg: SelectionConfig,
    rule: selection.Plan,
    k: int,
    truth: pd.Series | None,
    seed: int,
    out_url: str,
) -> _Chosen:
    """Pass 2: apply the plan shard by shard, one selected file per pseudo-label shard."""
    chosen = _Chosen(np.zeros((k, len(selection.COUNTS)), dtype=np.int64))
    for s in shards:
        table = _read_shard(s, ["id", "probs"])
        ids = np.asarray(table.column("id").to_pylist(), dtype=object)
        probs = _probs(table, k)
        rows, shard_counts = selection.select_shard(
            ids,
            probs,
            rule,
            selection.shard_rng(seed, s.index),
            cfg.labels,
            cfg.temperature,
            cfg.hard_label_smoothing,
        )
        chosen.counts += shard_counts
        right, scored = _score(truth, list(rows["id"]), rows["predicted"].to_numpy())
        chosen.right, chosen.scored = chosen.right + right, chosen.scored + scored
        name = f"part-{s.index:05d}.parquet"
        sha256 = storage.write_parquet(
            storage.join(out_url, name), _selected_table(rows, k), row_group_size=65536
        )
        chosen.files.append({"file": name, "rows": len(rows), "sha256": sha256})
    return chosen


def _selected_table(rows: pd.DataFrame, k: int) -> pa.Table:
    targets = np.stack(rows["target"].to_numpy()) if len(rows) else np.zeros((0, k))
    return pa.table(
        {
            "id": rows["id"].astype(str).tolist(),
            "target": pa.FixedSizeListArray.from_arrays(
                pa.array(targets.reshape(-1).astype(np.float32)), k
            ),
            "confidence": rows["confidence"].to_numpy(),
            "predicted": rows["predicted"].to_numpy(),
            "copies": rows["copies"].to_numpy(),
        }
    )


def _diagnose(
    stats: diagnostics.PseudoLabelStats, cfg: SelectionConfig, iteration: int, out_url: str
) -> tuple[dict[str, Any], bytes]:
    """The pseudo labels' precision and coverage, and their figure, written beside them."""
    diagnosis = stats.summary(cfg.min_confidence)
    figure = diagnostics.figure(
        stats, cfg.min_confidence, f"pseudo labels of iteration {iteration}"
    )
    diagnosis["figure_url"] = storage.join(out_url, "pseudo_labels.png")
    storage.write_bytes(diagnosis["figure_url"], figure)
    return diagnosis, figure


def _write_manifest(
    out_url: str,
    pseudo_url: str,
    rule: selection.Plan,
    files: list[dict[str, Any]],
    per_class: pd.DataFrame,
    diagnosis: dict[str, Any],
    alignment: dict[str, Any] | None,
) -> None:
    storage.write_json(
        storage.join(out_url, dataset.MANIFEST),
        {
            "format": "noisy-student-selection",
            "rows": int(per_class["kept"].sum()),
            "selected": int(per_class["final"].sum()),
            "quota": rule.quota,
            "shards": files,
            "pseudo_labels_url": pseudo_url,
            "per_class": per_class.to_dict(orient="records"),
            "diagnostics": diagnosis,
            "alignment": alignment,
        },
    )


def _alignment_record(
    alignment: selection.Alignment | None, survey: _Survey, class_names: list[str]
) -> dict[str, Any] | None:
    """What alignment did, for the manifest and the run: weights by class, passes, labels
    changed, and the labels' accuracy before and after where the truth is known."""
    if alignment is None:
        return None
    return {
        "prior": dict(zip(class_names, alignment.prior.round(6).tolist(), strict=True)),
        "weights": dict(
            zip(class_names, np.exp(alignment.log_weights).round(6).tolist(), strict=True)
        ),
        "passes": alignment.passes,
        "deviation": alignment.deviation,
        "changed": survey.changed_by_alignment,
        "accuracy_before": survey.accuracy_all,
        "accuracy_after": survey.labels_accuracy_all,
    }


def _record(
    run_id: str,
    result: SelectedPseudoLabels,
    per_class: pd.DataFrame,
    diagnosis: dict[str, Any],
    figure: bytes,
    iteration: int,
    alignment: dict[str, Any] | None = None,
) -> None:
    """The selection's figures, files and lineage in its MLflow run, and one log line."""
    total, kept, accuracy = result.total, result.kept, result.accuracy
    metrics = {"total": total, "kept": kept, "selected": result.selected,
               "dropped": total - kept}  # fmt: skip
    if accuracy is not None:
        metrics |= {
            "pseudo_label_accuracy": accuracy,
            "pseudo_label_accuracy_all": result.accuracy_all,
            "pseudo_label_scored": result.scored_kept,
        }
    tracking.log_bytes(run_id, figure, "figures/pseudo_labels.png")
    tracking.log_dict(run_id, diagnosis, "diagnostics.json")
    for key in ("precision_at_min_confidence", "coverage_at_min_confidence"):
        metrics[key] = diagnosis.get(key)
    changed = diagnosis["changed_since_previous"]
    if changed is not None:
        metrics["changed_since_previous"] = changed
        metrics["changed_since_previous_fraction"] = changed / max(
            1, diagnosis["compared_with_previous"]
        )
    if alignment is not None:
        metrics |= _record_alignment(run_id, alignment, total)
    tracking.log_metrics(run_id, metrics)
    if changed is not None:
        logger.info(
            f"pseudo labels: {changed} of {diagnosis['compared_with_previous']} changed class "
            "since the last iteration"
        )
    tracking.log_dict(run_id, per_class.to_dict(orient="records"), "per_class.json")
    tracking.log_dataset(run_id, per_class, result.url, f"selected-{iteration}", "pseudo_labels")
    tracking.set_tags(
        run_id,
        {
            f"{tracking.TAG}inference_run_id": result.inference_run_id,
            f"{tracking.TAG}selected_url": result.url,
        },
    )
    tracking.end_run(run_id)
    logger.info(
        f"pseudo labels: {total} images, {kept} kept, {result.selected} after balancing"
        + (f", {accuracy:.2%} right" if accuracy is not None else "")
        + (
            f" (of the {result.scored_kept} whose true label is known)"
            if accuracy is not None and result.scored_kept < kept
            else ""
        )
    )


def _record_alignment(run_id: str, alignment: dict[str, Any], total: int) -> dict[str, float]:
    """Distribution alignment's record in the selection's run, and one log line; its
    metrics."""
    tracking.log_dict(run_id, alignment, "alignment.json")
    logger.info(
        f"distribution alignment: {alignment['changed']} of {total} labels changed class "
        f"({alignment['passes']} passes over the probabilities)"
        + (
            f", {alignment['accuracy_before']:.2%} -> {alignment['accuracy_after']:.2%} right"
            if alignment["accuracy_before"] is not None
            else ""
        )
    )
    return {f"alignment_{key}": alignment[key] for key in ("passes", "deviation", "changed")}
