"""Stage 3: drop unsure pseudo labels, balance the classes, write the student's set."""

from __future__ import annotations

import io
import logging
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from noisy_student import dataset, diagnostics, selection, storage, tracking
from noisy_student.config import SelectionConfig
from noisy_student.errors import UserError
from noisy_student.stages.infer_pseudo_labels import finish_labelling_run, record_labelling
from noisy_student.stages.records import (
    PseudoLabelShard,
    SelectedPseudoLabels,
    TrainedModel,
)

logger = logging.getLogger(__name__)


def _read_shard(shard: PseudoLabelShard, columns: list[str]) -> pa.Table:
    data = storage.read_verified(shard.url, shard.sha256, "the labelling stage's record")
    return pq.read_table(io.BytesIO(data), columns=columns)


def _truth(data_root: str, pool: dataset.Manifest) -> pd.Series | None:
    """True labels of the unlabelled images by id, when known: only to score pseudo labels.
    Images that left the pool (`pool.removed_ids`, labelled since) are not scored."""
    url = storage.join(data_root, dataset.UNLABELLED_TRUTH)
    if not storage.exists(url):
        return None
    truth = storage.read_parquet(url).to_pandas().set_index("id")["label"]
    return truth.drop(index=list(pool.removed_ids), errors="ignore")


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
    """Drop unsure images, balance classes, and write the student's pseudo-labelled set,
    in two passes over the shards (selection.py says how). With `previous_pseudo_url` (the
    last iteration's pseudo labels of the same images), count the labels that changed."""
    start = time.perf_counter()
    shards = sorted(shards, key=lambda s: s.index)
    lineage = {
        f"{tracking.TAG}teacher_run_id": teacher.mlflow_run_id,
        f"{tracking.TAG}teacher_url": teacher.url,
        f"{tracking.TAG}pseudo_labels_url": pseudo_url,
    }
    inference_seconds = max(s.seconds for s in shards) if shards else 0.0
    inference_run = record_labelling(shards, teacher, pseudo_url, parent_run_id, iteration, lineage)

    run_id = tracking.start_stage_run(
        parent_run_id, "filter_and_balance", iteration, cfg.model_dump(), lineage
    )
    with tracking.failed_on_error(run_id, inference_run):
        manifest = dataset.read_manifest(storage.join(data_root, dataset.UNLABELLED))
        k = manifest.num_classes
        truth = _truth(data_root, manifest)
        total = sum(s.rows for s in shards)
        if total == 0:
            raise UserError(f"{manifest.url}: the unlabelled set is empty")

        # pass 1: per-class confidence histograms, two small columns per shard
        histogram = np.zeros((k, selection.NUM_BINS), dtype=np.int64)
        confidence_sum, right_all, scored_all = 0.0, 0, 0
        stats = diagnostics.PseudoLabelStats()
        previous = _previous_shards(previous_pseudo_url)
        for s in shards:
            table = _read_shard(s, ["id", "predicted", "confidence"])
            ids = table.column("id").to_pylist()
            predicted = table.column("predicted").to_numpy()
            confidence = table.column("confidence").to_numpy()
            histogram += selection.class_histogram(predicted, confidence, k, cfg.min_confidence)
            confidence_sum += float(confidence.sum())
            masks = _correct(truth, ids, predicted)
            if masks is not None:
                right_all += int(masks[0].sum())
                scored_all += int(masks[1].sum())
            stats.add(confidence, *(masks or (None, None)))
            before_url = previous.get(s.url.rsplit("/", 1)[-1])
            if before_url:
                before = storage.read_parquet(before_url, ["id", "predicted"]).to_pandas()
                earlier = before.set_index("id")["predicted"].reindex(ids).to_numpy()
                both = ~pd.isna(earlier)
                stats.add_changes(earlier[both].astype(np.int64), predicted[both])
        accuracy_all = right_all / scored_all if scored_all else None
        finish_labelling_run(
            inference_run, total, inference_seconds, confidence_sum, accuracy_all, scored_all
        )
        rule = selection.plan(histogram, cfg.min_confidence, cfg.balance, cfg.per_class_quota)

        # pass 2: apply the plan shard by shard, one selected file per pseudo-label shard
        counts = np.zeros((k, len(selection.COUNTS)), dtype=np.int64)
        files, right_kept, scored_kept = [], 0, 0
        for s in shards:
            table = _read_shard(s, ["id", "probs"])
            ids = np.asarray(table.column("id").to_pylist(), dtype=object)
            column = table.column("probs").combine_chunks()
            probs = column.values.to_numpy().reshape(len(column), k)
            rows, shard_counts = selection.select_shard(
                ids,
                probs,
                rule,
                selection.shard_rng(seed, s.index),
                cfg.labels,
                cfg.temperature,
                cfg.hard_label_smoothing,
            )
            counts += shard_counts
            right, scored = _score(truth, list(rows["id"]), rows["predicted"].to_numpy())
            right_kept, scored_kept = right_kept + right, scored_kept + scored
            targets = np.stack(rows["target"].to_numpy()) if len(rows) else np.zeros((0, k))
            name = f"part-{s.index:05d}.parquet"
            sha256 = storage.write_parquet(
                storage.join(out_url, name),
                pa.table(
                    {
                        "id": rows["id"].astype(str).tolist(),
                        "target": pa.FixedSizeListArray.from_arrays(
                            pa.array(targets.reshape(-1).astype(np.float32)), k
                        ),
                        "confidence": rows["confidence"].to_numpy(),
                        "predicted": rows["predicted"].to_numpy(),
                        "copies": rows["copies"].to_numpy(),
                    }
                ),
                row_group_size=65536,
            )
            files.append({"file": name, "rows": len(rows), "sha256": sha256})

        per_class = selection.counts_frame(counts)
        per_class["name"] = [manifest.class_names[c] for c in per_class["class"]]
        kept, selected = int(per_class["kept"].sum()), int(per_class["final"].sum())
        accuracy = right_kept / scored_kept if scored_kept else None
        report = stats.summary(cfg.min_confidence)
        figure = diagnostics.figure(
            stats, cfg.min_confidence, f"pseudo labels of iteration {iteration}"
        )
        report["figure_url"] = storage.join(out_url, "pseudo_labels.png")
        storage.write_bytes(report["figure_url"], figure)
        storage.write_json(
            storage.join(out_url, dataset.MANIFEST),
            {
                "format": "noisy-student-selection",
                "rows": kept,
                "selected": selected,
                "quota": rule.quota,
                "shards": files,
                "pseudo_labels_url": pseudo_url,
                "per_class": per_class.to_dict(orient="records"),
                "diagnostics": report,
            },
        )
        metrics = {"total": total, "kept": kept, "selected": selected, "dropped": total - kept}
        if accuracy is not None:
            metrics |= {
                "pseudo_label_accuracy": accuracy,
                "pseudo_label_accuracy_all": accuracy_all,
                "pseudo_label_scored": scored_kept,
            }
        tracking.log_bytes(run_id, figure, "figures/pseudo_labels.png")
        tracking.log_dict(run_id, report, "diagnostics.json")
        for key in ("precision_at_min_confidence", "coverage_at_min_confidence"):
            metrics[key] = report.get(key)
        if report["changed_since_previous"] is not None:
            metrics["changed_since_previous"] = report["changed_since_previous"]
            metrics["changed_since_previous_fraction"] = report["changed_since_previous"] / max(
                1, report["compared_with_previous"]
            )
        tracking.log_metrics(run_id, metrics)
        if report["changed_since_previous"] is not None:
            logger.info(
                f"pseudo labels: {report['changed_since_previous']} of "
                f"{report['compared_with_previous']} changed class since the last iteration"
            )
        tracking.log_dict(run_id, per_class.to_dict(orient="records"), "per_class.json")
        tracking.log_dataset(run_id, per_class, out_url, f"selected-{iteration}", "pseudo_labels")
        tracking.set_tags(
            run_id,
            {
                f"{tracking.TAG}inference_run_id": inference_run,
                f"{tracking.TAG}selected_url": out_url,
            },
        )
        tracking.end_run(run_id)
        logger.info(
            f"pseudo labels: {total} images, {kept} kept, {selected} after balancing"
            + (f", {accuracy:.2%} right" if accuracy is not None else "")
            + (
                f" (of the {scored_kept} whose true label is known)"
                if accuracy is not None and scored_kept < kept
                else ""
            )
        )
        return SelectedPseudoLabels(
            out_url,
            pseudo_url,
            run_id,
            inference_run,
            total,
            kept,
            selected,
            accuracy,
            accuracy_all,
            inference_seconds,
            time.perf_counter() - start,
            per_class.to_dict(orient="records"),
            scored_kept,
            scored_all,
        )
