"""The robustness benchmark: a fixed corrupted copy of a labelled split, and what models
score on it (clean error, error per corruption and severity, CE and mCE against a
baseline model, relative mCE, calibration, FGSM accuracy), each accuracy with its 95%
interval, and every image's predicted class, so that two models can be compared image by
image (`noisy_student.evaluation.statistics`).

Two suites serve a run: the test split's, which is reported, and the one of the split
choices are made on (validation where the dataset has one), which the promotion gate
reads. The corrupted images are generated once per split and kept beside it, in the
dataset format, under `<data root>/<split>-corrupted/<key>/<corruption>-<severity>/`; the
key covers the split's digest, the number of images, the seed and the corruption code's
version, so every model of every run that shares them is judged on the very same images.
Each result row carries the digest of the images it was measured on, and a baseline from
another run is refused unless its digests match.

Nothing holds a set's decoded images: the test set, the cells and the FGSM images are
read a batch at a time (`read_batches`), cells are generated a chunk at a time, and each
batch meets every model being judged (`evaluate_models`), in the very batches the set
sliced whole in memory would give, so the figures do not depend on the streaming.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from noisy_student.data import dataset, dataset_writer, storage
from noisy_student.data.prefetch import prefetch
from noisy_student.errors import UserError
from noisy_student.evaluation import corruptions, statistics
from noisy_student.evaluation.scores import ChoiceScores
from noisy_student.training import augment, engine

SUITE_DIR = "test-corrupted"  # the test split's: suite_dir(split) for any split
SUITE_MANIFEST = "_suite.json"
CLEAN, FGSM = "clean", "fgsm"  # the `corruption` of clean and adversarial rows
INTERVAL_RESAMPLES = 2000  # bootstrap resamples of an interval (p-values take more)
Log = Callable[[str], None]


def suite_dir(split: str) -> str:
    return f"{split}-corrupted"


@dataclass
class Cell:
    corruption: str
    severity: int
    url: str  # the corrupted images, in the dataset format
    digest: str | None  # the cell dataset's manifest digest; None until it is generated

    def manifest(self) -> dataset.Manifest:
        return dataset.read_manifest(self.url)


@dataclass
class Suite:
    url: str
    test: dataset.Manifest  # the clean split (test, or validation), read a batch at a time
    test_labels: torch.Tensor  # of every image of it (labels are small; images are not held)
    subset: torch.Tensor  # indices of the split's images that are corrupted, ascending
    cells: list[Cell]
    built: int  # cells generated now; the others were read from the cache
    seed: int
    split: str = dataset.TEST

    @property
    def test_digest(self) -> str:
        return self.test.digest

    @property
    def labels(self) -> torch.Tensor:
        return self.test_labels[self.subset]

    def adversarial(self, images: int | None) -> torch.Tensor:
        """The test images FGSM attacks: the first `images` of the corrupted ones' seeded
        draw (all of those if None)."""
        if images is None or images >= len(self.subset):
            return self.subset
        return subset_indices(self.test.num_rows, images, self.seed)


def subset_indices(n: int, images: int | None, seed: int) -> torch.Tensor:
    """A fixed, seeded choice of `images` of the n test images (all of them if None)."""
    if images is None or images >= n:
        return torch.arange(n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:images].sort().values


def suite_key(test_digest: str, images: int, seed: int) -> str:
    blob = json.dumps(
        {"test": test_digest, "images": images, "seed": seed, "version": corruptions.VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------- reading


def _cat(parts: list[dataset.ImageSet]) -> dataset.ImageSet:
    if len(parts) == 1:
        return parts[0]
    return dataset.ImageSet(
        [i for p in parts for i in p.ids],
        torch.cat([p.images for p in parts]),
        torch.cat([p.labels for p in parts]),
    )


def _shard_rows(
    manifest: dataset.Manifest, index: int, rows: np.ndarray, batch_size: int
) -> Iterator[dataset.ImageSet]:
    """Rows `rows` (ascending, within the shard) of one shard, decoding only those: the
    file is checked by `dataset.open_shard`, then read a record batch at a time, each run
    of consecutive wanted rows decoded with its own row numbers."""
    with dataset.open_shard(manifest, index) as (url, parquet):
        first = 0
        for batch in parquet.iter_batches(batch_size, columns=dataset.SCHEMA.names):
            local = rows[(rows >= first) & (rows < first + batch.num_rows)] - first
            # runs of consecutive rows: [start, end) pairs
            breaks = np.flatnonzero(np.diff(local) != 1) + 1
            parts = []
            for run in np.split(local, breaks) if len(local) else []:
                a, n = int(run[0]), len(run)
                piece = batch.slice(a, n)
                parts.append(
                    dataset.ImageSet(
                        piece.column("id").to_pylist(),
                        dataset.decode_images(manifest, url, piece, first + a),
                        dataset.labels_of(manifest, url, piece, first + a),
                    )
                )
            if parts:
                yield _cat(parts)
            first += batch.num_rows


class Rebatch:
    """Regroups parts of any sizes into batches of exactly `size` rows (the last one of a
    stream may be smaller): a set judged in parts meets the model in the very batches it
    would have met sliced whole in memory, so the results are the same."""

    def __init__(self, size: int):
        self.size = size
        self._held: list[dataset.ImageSet] = []
        self._count = 0

    def add(self, part: dataset.ImageSet) -> Iterator[dataset.ImageSet]:
        self._held.append(part)
        self._count += len(part)
        while self._count >= self.size:
            whole, n = _cat(self._held), self.size
            yield dataset.ImageSet(whole.ids[:n], whole.images[:n], whole.labels[:n])
            self._count -= n
            rest = dataset.ImageSet(whole.ids[n:], whole.images[n:], whole.labels[n:])
            self._held = [rest] if self._count else []

    def rest(self) -> Iterator[dataset.ImageSet]:
        if self._count:
            yield _cat(self._held)
        self._held, self._count = [], 0


def read_batches(
    manifest: dataset.Manifest, batch_size: int, rows: torch.Tensor | None = None
) -> Iterator[dataset.ImageSet]:
    """The split's images in order (only `rows`, ascending indices over the whole split,
    when given), decoded `batch_size` at a time and regrouped across shard boundaries:
    memory holds a batch or two whatever the split's size."""
    wanted = None if rows is None else rows.numpy()
    batches = Rebatch(batch_size)
    start = 0
    for index, entry in enumerate(manifest.shards):
        if wanted is None:
            parts = dataset.iter_shard_batches(manifest, index, batch_size)
        else:
            local = wanted[(wanted >= start) & (wanted < start + entry["rows"])] - start
            parts = _shard_rows(manifest, index, local, batch_size) if len(local) else iter(())
        for part in parts:
            yield from batches.add(part)
        start += entry["rows"]
    yield from batches.rest()


def _ids_and_labels(manifest: dataset.Manifest) -> tuple[list[str], torch.Tensor]:
    """Every row's id and label, without touching the images: two columns read, the file
    not checksummed (the images are, by `read_batches`, when they are judged)."""
    ids, labels = [], []
    for url in manifest.shard_urls():
        try:
            table = storage.read_parquet(url, columns=["id", "label"])
        except FileNotFoundError:
            raise UserError(f"{url}: shard listed in the manifest is missing") from None
        ids += table.column("id").to_pylist()
        labels.append(dataset.labels_of(manifest, url, table))
    return ids, torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64)


# ------------------------------------------------------------------------- the suite


OnBatch = Callable[[Cell, dataset.ImageSet], None]


def _write_cells(
    suite: Suite, cells: list[Cell], batch_size: int, on_batch: OnBatch | None
) -> None:
    """Corrupted sets of one corruption, streamed: the clean subset is read once, a
    corruption chunk at a time, and each chunk is corrupted at every severity asked, seeded
    by its position (so the images are exactly those of corrupting the whole subset at
    once), and written. Each image is handed to `on_batch` as stored, in batches of
    `batch_size`, so that models are judged on the sets as they are generated, without
    reading them back. Cells are stored as the test set is: PNG keeps small images'
    corrupted pixels exact; a JPEG test set of photos gets JPEG cells at its quality, as
    ImageNet-C's are, at a fifth of PNG's size."""
    manifest = suite.test
    with ExitStack() as stack:
        writers = [
            stack.enter_context(
                dataset_writer.DatasetWriter(
                    cell.url,
                    suite.split,
                    manifest.class_names,
                    manifest.height,
                    manifest.width,
                    manifest.mode,
                    encoding=manifest.encoding,
                    quality=manifest.quality,
                )
            )
            for cell in cells
        ]
        batches = [Rebatch(batch_size) for _ in cells]
        first = 0
        for batch in read_batches(manifest, corruptions.CHUNK, suite.subset):
            for cell, writer, rebatch in zip(cells, writers, batches, strict=True):
                x = corruptions.corrupt(
                    batch.images, cell.corruption, cell.severity, suite.seed, first
                )
                arrays = x.permute(0, 2, 3, 1).numpy()
                if manifest.mode == "L":
                    arrays = arrays[..., 0]
                blobs = [
                    dataset_writer.encode_image(
                        np.ascontiguousarray(a), writer.encoding, writer.quality
                    )
                    for a in arrays
                ]
                for id, blob, label in zip(batch.ids, blobs, batch.labels.tolist(), strict=True):
                    writer.add(id, blob, label)
                if on_batch is not None:
                    if manifest.encoding != "png":  # lossy: judge what later runs will read
                        table = pa.table({"id": batch.ids, "image": blobs})
                        x = dataset.decode_images(manifest, cell.url, table, first)
                    for part in rebatch.add(dataset.ImageSet(batch.ids, x, batch.labels)):
                        on_batch(cell, part)
            first += len(batch)
        if on_batch is not None:
            for cell, rebatch in zip(cells, batches, strict=True):
                for part in rebatch.rest():
                    on_batch(cell, part)
    # the writers' manifests are written as the block ends, each cell's last
    for cell in cells:
        cell.digest = dataset.read_manifest(cell.url).digest


def open_suite(
    data_root: str,
    names: list[str],
    severities: list[int],
    images: int | None,
    seed: int,
    split: str = dataset.TEST,
) -> Suite:
    """The corrupted copy of a labelled split (the test split by default): its place and
    its cells, the cached ones with their digests; the missing ones are generated by
    `complete_suite` (or `evaluate_models`, which judges them as they are made). Nothing
    is decoded here."""
    test_url = storage.join(data_root, split)
    manifest = dataset.read_manifest(test_url)
    test_ids, test_labels = _ids_and_labels(manifest)
    dataset.require_labels(manifest, dataset.ImageSet(test_ids, torch.empty(0), test_labels))
    subset = subset_indices(len(test_ids), images, seed)
    key = suite_key(manifest.digest, len(subset), seed)
    url = storage.join(data_root, suite_dir(split), key)
    ids = [test_ids[i] for i in subset.tolist()]
    cells = []
    for name in names:
        for severity in severities:
            cell_url = storage.join(url, f"{name}-{severity}")
            digest = None
            if storage.exists(storage.join(cell_url, dataset.MANIFEST)):
                cell_manifest = dataset.read_manifest(cell_url)
                if _ids_and_labels(cell_manifest)[0] != ids:
                    raise UserError(f"{cell_url}: cached corrupted images are not of {test_url}")
                digest = cell_manifest.digest
            cells.append(Cell(name, severity, cell_url, digest))
    return Suite(url, manifest, test_labels, subset, cells, 0, seed, split)


def complete_suite(
    suite: Suite, batch_size: int = corruptions.CHUNK, on_batch: OnBatch | None = None
) -> None:
    """Generate the missing cells (handing their images to `on_batch`, see `_write_cells`),
    then write the suite's own manifest: what is there, for people and tools browsing."""
    missing: dict[str, list[Cell]] = {}
    for cell in suite.cells:
        if cell.digest is None:
            missing.setdefault(cell.corruption, []).append(cell)
    for cells in missing.values():
        _write_cells(suite, cells, batch_size, on_batch)
        suite.built += len(cells)
    manifest_url = storage.join(suite.url, SUITE_MANIFEST)
    known = storage.read_json(manifest_url)["cells"] if storage.exists(manifest_url) else []
    listed = {(c["corruption"], c["severity"]): c for c in known}
    for c in suite.cells:
        listed[(c.corruption, c.severity)] = {
            "corruption": c.corruption,
            "severity": c.severity,
            "path": f"{c.corruption}-{c.severity}",
            "digest": c.digest,
        }
    if suite.built or len(listed) != len(known):
        storage.write_json(
            manifest_url,
            {
                "format": "noisy-student-corruption-suite",
                "corruptions_version": corruptions.VERSION,
                "split": suite.split,
                "test_url": suite.test.url,
                "test_digest": suite.test.digest,
                "images": len(suite.subset),
                "seed": suite.seed,
                "cells": [listed[k] for k in sorted(listed)],
            },
        )


def load_suite(
    data_root: str,
    names: list[str],
    severities: list[int],
    images: int | None,
    seed: int,
    log: Log = print,
) -> Suite:
    """The corrupted test set, every cell generated (and cached) if missing."""
    started = time.perf_counter()
    suite = open_suite(data_root, names, severities, images, seed)
    complete_suite(suite)
    log(
        f"corruption suite {suite.url}: {len(suite.cells)} sets of {len(suite.subset)} images "
        f"({suite.built} generated, {len(suite.cells) - suite.built} read back) in "
        f"{time.perf_counter() - started:.1f} s"
    )
    return suite


# ------------------------------------------------------------------------- metrics


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """sum over equal-width confidence bins of (bin share) x |accuracy - mean confidence|,
    the confidence being the top class probability (Guo et al., 2017)."""
    confidence, predicted = probs.max(1)
    return _ece(confidence, predicted, labels, bins)


def _ece(
    confidence: torch.Tensor, predicted: torch.Tensor, labels: torch.Tensor, bins: int
) -> float:
    correct = (predicted == labels).double()
    # bins are (i/B, (i+1)/B]; a confidence of exactly 0 joins the first
    index = (confidence.double() * bins).ceil().long().sub(1).clamp(0, bins - 1)
    gap = torch.zeros(bins, dtype=torch.float64)
    gap.index_add_(0, index, correct - confidence.double())
    return (gap.abs().sum() / max(len(labels), 1)).item()


Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (uint8 images, labels)


def fgsm_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    epsilons: list[int],
    batch_size: int,
    precision: str = "auto",
) -> dict[int, float]:
    """Accuracy under FGSM (Goodfellow et al., 2015) of images held in memory; see
    `fgsm_batches`."""
    batches = (
        (images[i : i + batch_size], labels[i : i + batch_size])
        for i in range(0, len(images), batch_size)
    )
    return fgsm_batches(model, batches, epsilons, batch_size, precision)


def fgsm_batches(
    model: nn.Module, batches: Batches, epsilons: list[int], batch_size: int, precision: str
) -> dict[int, float]:
    """Accuracy under FGSM: every image moved by epsilon/255 per pixel in the direction
    that raises the model's loss on its true label, a batch at a time.

    Epsilons are whole steps of 1/255, so the attacked images are exact uint8 images: the
    attack is on what the model would really be given."""
    model.eval()
    dev = next(model.parameters()).device
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # only the input's gradient is needed
    correct, seen = dict.fromkeys(epsilons, 0), 0
    try:
        for images, labels in batches:
            clean, y = images.to(dev), labels.to(dev)
            x = augment.to_float(clean).requires_grad_(True)
            with torch.enable_grad(), engine.autocast(dev, precision):
                loss = F.cross_entropy(model(x).float(), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x)
            step = grad.sign().to(torch.int16)
            for eps in epsilons:
                attacked = (clean.to(torch.int16) + eps * step).clamp(0, 255).to(torch.uint8)
                probs = engine.predict_probs(model, attacked, batch_size, precision)
                correct[eps] += (probs.argmax(1) == y.cpu()).sum().item()
            seen += len(labels)
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    return {eps: correct[eps] / max(seen, 1) for eps in epsilons}


@dataclass
class Judged:
    """What a model said of a set, image by image: its top class and that class's
    probability (all the metrics need; the full probabilities are not kept)."""

    confidence: list[torch.Tensor] = field(default_factory=list)
    predicted: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)

    def add(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        top = probs.max(1)
        self.confidence.append(top.values)
        self.predicted.append(top.indices)
        self.labels.append(labels)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.labels:
            return torch.empty(0), torch.empty(0, dtype=torch.int64), torch.empty(0)
        return torch.cat(self.confidence), torch.cat(self.predicted), torch.cat(self.labels)


def _row(corruption: str, severity: int, judged: Judged, digest: str, bins: int) -> dict[str, Any]:
    confidence, predicted, labels = judged.tensors()
    correct = int((predicted == labels).sum())
    accuracy = correct / max(len(labels), 1)
    low, high = statistics.wilson_interval(correct, len(labels))
    return {
        "corruption": corruption,
        "group": CLEAN if corruption == CLEAN else corruptions.group_of(corruption),
        "severity": severity,
        "epsilon": 0.0,
        "images": len(labels),
        "accuracy": accuracy,
        "accuracy_low": low,
        "accuracy_high": high,
        "error": 1.0 - accuracy,
        "ece": _ece(confidence, predicted, labels, bins),
        "mean_confidence": confidence.double().mean().item(),
        "images_digest": digest,
    }


@dataclass
class Evaluated:
    """One model's measurements of a suite: a row per set (`MEASUREMENT_COLUMNS`), and the
    class it predicted for every image (`PREDICTION_COLUMNS`), the images numbered by
    their row in the clean split."""

    rows: list[dict[str, Any]]
    predictions: pd.DataFrame


PREDICTION_COLUMNS = ["corruption", "severity", "row", "label", "predicted"]


def _predictions(key: tuple[str, int], judged: Judged, rows: torch.Tensor) -> pd.DataFrame:
    _, predicted, labels = judged.tensors()
    return pd.DataFrame(
        {
            "corruption": key[0],
            "severity": np.int16(key[1]),
            "row": rows.numpy().astype(np.int32),
            "label": labels.numpy().astype(np.int16),
            "predicted": predicted.numpy().astype(np.int16),
        }
    )


def evaluate_models(
    models: list[nn.Module],
    suite: Suite,
    batch_size: int,
    precision: str,
    fgsm_epsilons: list[int],
    adversarial_images: int | None,
    calibration_bins: int = 15,
) -> list[Evaluated]:
    """For each model, one row per measurement (the clean split, every corrupted set,
    every epsilon) and its predictions. Every set is streamed a batch at a time, and each
    batch, once decoded (or corrupted), meets every model: a cell missing from the suite
    is generated here and judged as it is written, never read back."""
    if not models:
        complete_suite(suite)
        return []
    answers: list[dict[tuple[str, int], Judged]] = [{} for _ in models]

    def judge(key: tuple[str, int], batch: dataset.ImageSet) -> None:
        for model, own in zip(models, answers, strict=True):
            probs = engine.predict_probs(model, batch.images, batch_size, precision)
            own.setdefault(key, Judged()).add(probs, batch.labels)

    def stream(key: tuple[str, int], manifest: dataset.Manifest) -> None:
        with prefetch(read_batches(manifest, batch_size)) as batches:
            for batch in batches:
                judge(key, batch)

    stream((CLEAN, 0), suite.test)
    for cell in suite.cells:
        if cell.digest is not None:
            stream((cell.corruption, cell.severity), cell.manifest())
    complete_suite(suite, batch_size, lambda c, b: judge((c.corruption, c.severity), b))

    attacked = suite.adversarial(adversarial_images)
    fgsm = [
        _attacked(model, suite, attacked, fgsm_epsilons, batch_size, precision) for model in models
    ]
    return [
        _evaluated(own, accuracy, suite, len(attacked), calibration_bins)
        for own, accuracy in zip(answers, fgsm, strict=True)
    ]


def _attacked(
    model: nn.Module,
    suite: Suite,
    attacked: torch.Tensor,
    fgsm_epsilons: list[int],
    batch_size: int,
    precision: str,
) -> dict[int, float]:
    """The model's accuracy on the attacked images, by epsilon (none without epsilons)."""
    if not fgsm_epsilons:
        return {}
    with prefetch(read_batches(suite.test, batch_size, attacked)) as batches:
        return fgsm_batches(
            model, ((b.images, b.labels) for b in batches), fgsm_epsilons, batch_size, precision
        )


def _evaluated(
    own: dict[tuple[str, int], Judged],
    fgsm_accuracy: dict[int, float],
    suite: Suite,
    attacked_images: int,
    calibration_bins: int,
) -> Evaluated:
    """One model's rows and predictions from what it answered on every set of the suite."""
    clean = own.get((CLEAN, 0), Judged())
    rows = [_row(CLEAN, 0, clean, suite.test_digest, calibration_bins)]
    predictions = [_predictions((CLEAN, 0), clean, torch.arange(suite.test.num_rows))]
    for c in suite.cells:
        judged = own.get((c.corruption, c.severity), Judged())
        rows.append(_row(c.corruption, c.severity, judged, c.digest, calibration_bins))
        predictions.append(_predictions((c.corruption, c.severity), judged, suite.subset))
    for eps, acc in fgsm_accuracy.items():
        low, high = statistics.accuracy_interval(acc, attacked_images)
        rows.append(
            {
                "corruption": FGSM,
                "group": FGSM,
                "severity": eps,
                "epsilon": eps / 255.0,
                "images": attacked_images,
                "accuracy": acc,
                "accuracy_low": low,
                "accuracy_high": high,
                "error": 1.0 - acc,
                "ece": math.nan,
                "mean_confidence": math.nan,
                "images_digest": suite.test_digest,
            }
        )
    return Evaluated(rows, pd.concat(predictions, ignore_index=True))


MEASUREMENT_COLUMNS = [
    "corruption",
    "group",
    "severity",
    "epsilon",
    "images",
    "accuracy",
    "accuracy_low",
    "accuracy_high",
    "error",
    "ece",
    "mean_confidence",
    "images_digest",
]


def earlier_rows(
    table: pd.DataFrame,
    mlflow_run_id: str,
    suite: Suite,
    fgsm_epsilons: list[int],
    adversarial_images: int | None,
) -> list[dict[str, Any]] | None:
    """A model's measurements from an earlier iteration (a student is the next teacher),
    if they were made on exactly these images with these settings; else None."""
    own = table[table["mlflow_run_id"] == mlflow_run_id]
    if own.empty or not set(MEASUREMENT_COLUMNS) <= set(own.columns):
        return None  # not measured, or by an older version without intervals
    own = own[own["iteration"] == own["iteration"].min()]
    wanted = {(CLEAN, 0): suite.test_digest}
    wanted |= {(c.corruption, c.severity): c.digest for c in suite.cells}
    have = {
        (c, int(s)): d
        for c, s, d in zip(own["corruption"], own["severity"], own["images_digest"], strict=True)
    }
    if any(have.get(k) != d for k, d in wanted.items()):
        return None
    fgsm = own[own["corruption"] == FGSM]
    attacked = len(suite.adversarial(adversarial_images))
    if (
        sorted(fgsm["severity"].astype(int)) != sorted(fgsm_epsilons)
        or (fgsm["images"] != attacked).any()
    ):
        return None
    keep = own.apply(lambda r: (r["corruption"], int(r["severity"])) in wanted, axis=1)
    return pd.concat([own[keep], fgsm])[MEASUREMENT_COLUMNS].to_dict("records")


# ------------------------------------------------------------------------- scores


def corruption_errors(
    errors: dict[tuple[str, int], float],
    baseline: dict[tuple[str, int], float],
    names: list[str],
    severities: list[int],
    clean_error: float | None = None,
    baseline_clean_error: float | None = None,
) -> dict[str, float]:
    """CE per corruption: the model's errors summed over severities over the baseline's
    (Hendrycks & Dietterich, 2019). With clean errors given, the relative CE: the same
    ratio of the errors' rises above clean error. NaN where the baseline's sum is not
    positive (it made no error, or got no worse under the corruption)."""
    out = {}
    for name in names:
        num = sum(errors[(name, s)] - (clean_error or 0.0) for s in severities)
        den = sum(baseline[(name, s)] - (baseline_clean_error or 0.0) for s in severities)
        out[name] = num / den if den > 0 else math.nan
    return out


def mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _errors(rows: pd.DataFrame) -> dict[tuple[str, int], float]:
    cells = rows[~rows["corruption"].isin([CLEAN, FGSM])]
    return {
        (c, int(s)): float(e)
        for c, s, e in zip(cells["corruption"], cells["severity"], cells["error"], strict=True)
    }


def _clean(rows: pd.DataFrame) -> pd.Series:
    return rows[rows["corruption"] == CLEAN].iloc[0]


def check_baseline(rows: pd.DataFrame, baseline: pd.DataFrame, source: str) -> None:
    """The baseline must have been judged on the same images, cell by cell."""
    theirs = {
        (c, int(s)): d
        for c, s, d in zip(
            baseline["corruption"], baseline["severity"], baseline["images_digest"], strict=True
        )
    }
    for c, s, d in zip(rows["corruption"], rows["severity"], rows["images_digest"], strict=True):
        if c == FGSM:
            continue
        if (c, int(s)) not in theirs:
            raise UserError(f"{source}: the baseline has no result for {c} severity {s}")
        if theirs[(c, int(s))] != d:
            raise UserError(
                f"{source}: the baseline saw other images for {c} severity {s} (another test "
                "set, evaluation.seed or evaluation.corruption_images)"
            )


def pick_baseline(
    table: pd.DataFrame, mlflow_run_id: str | None, source: str
) -> tuple[pd.DataFrame, pd.Series]:
    """The baseline's rows and a row naming it: the given model, else the table's first
    teacher (its lowest iteration's)."""
    if mlflow_run_id is None:
        teachers = table[table["role"] == "teacher"].sort_values("iteration", kind="stable")
        if teachers.empty:
            raise UserError(f"{source}: no teacher to serve as the baseline")
        mlflow_run_id = teachers.iloc[0]["mlflow_run_id"]
    rows = table[table["mlflow_run_id"] == mlflow_run_id]
    if rows.empty:
        raise UserError(
            f"{source}: no model with MLflow run id {mlflow_run_id!r} "
            "(evaluation.baseline_mlflow_run_id)"
        )
    rows = rows[rows["iteration"] == rows["iteration"].min()]
    return rows, rows.iloc[0]


def chain(table: pd.DataFrame) -> list[pd.Series]:
    """Each model once, in the order the run made them: the first teacher, then the
    students (a student teaches the next iteration, so it appears twice in the table)."""
    order = table.assign(_r=(table["role"] != "teacher").astype(int)).sort_values(
        ["iteration", "_r"], kind="stable"
    )
    firsts = order.drop_duplicates("mlflow_run_id")
    return [row for _, row in firsts.iterrows()]


def _interval(row: pd.Series) -> list[float] | None:
    """The 95% interval of a row's accuracy (Wilson, over its images); None for a row
    that does not say over how many images it was measured."""
    if "accuracy_low" in row and not pd.isna(row["accuracy_low"]):
        return [float(row["accuracy_low"]), float(row["accuracy_high"])]
    if "images" in row and not pd.isna(row["images"]):
        return list(statistics.accuracy_interval(float(row["accuracy"]), int(row["images"])))
    return None


def per_image_accuracy(
    predictions: pd.DataFrame, names: list[str], severities: list[int]
) -> pd.Series:
    """Each image's accuracy over the corrupted sets `names` x `severities`, by its row in
    the clean split: the unit a bootstrap resamples, since an image's corrupted copies are
    not independent trials."""
    cells = predictions[
        predictions["corruption"].isin(names) & predictions["severity"].isin(severities)
    ]
    return (cells["predicted"] == cells["label"]).groupby(cells["row"]).mean()


def clean_correct(predictions: pd.DataFrame) -> pd.Series:
    """Right (True) or wrong per image of the clean split, by row."""
    clean = predictions[predictions["corruption"] == CLEAN]
    return (clean["predicted"] == clean["label"]).set_axis(clean["row"].to_numpy())


def _bootstrap(values: pd.Series, seed: int) -> list[float]:
    return list(statistics.bootstrap_interval(values.to_numpy(), INTERVAL_RESAMPLES, seed))


def class_report(predictions: pd.DataFrame, class_names: list[str]) -> dict[str, Any]:
    """Per class, on the clean split: precision, recall and images, and the confusion
    matrix (rows: true class, columns: predicted). Precision is None for a class never
    predicted."""
    clean = predictions[predictions["corruption"] == CLEAN]
    k = len(class_names)
    matrix = np.bincount(
        clean["label"].to_numpy(np.int64) * k + clean["predicted"].to_numpy(np.int64),
        minlength=k * k,
    ).reshape(k, k)
    right, truly, said = np.diag(matrix), matrix.sum(1), matrix.sum(0)
    return {
        "classes": [
            {
                "class": name,
                "images": int(truly[c]),
                "precision": float(right[c] / said[c]) if said[c] else None,
                "recall": float(right[c] / truly[c]) if truly[c] else None,
            }
            for c, name in enumerate(class_names)
        ],
        "confusion_matrix": matrix.tolist(),
    }


def score(
    rows: pd.DataFrame,
    baseline: pd.DataFrame,
    names: list[str],
    severities: list[int],
    predictions: pd.DataFrame | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Every headline figure of one model, from its rows and the baseline's, with the 95%
    interval of each accuracy: Wilson over a set's images, and, for accuracies averaged
    over corrupted sets of the same images, a bootstrap over images (which needs the
    model's `predictions`; without them those intervals are None)."""
    errors, base_errors = _errors(rows), _errors(baseline)
    clean, base_clean = _clean(rows), _clean(baseline)
    ce = corruption_errors(errors, base_errors, names, severities)
    relative = corruption_errors(
        errors, base_errors, names, severities, clean["error"], base_clean["error"]
    )
    cells = rows[rows["corruption"].isin(names) & rows["severity"].isin(severities)]
    by_cell = {
        (c, int(sev)): r for (c, sev), r in cells.set_index(["corruption", "severity"]).iterrows()
    }
    fgsm = rows[rows["corruption"] == FGSM].sort_values("severity")
    per_severity = {name: [1.0 - errors[(name, s)] for s in severities] for name in names}
    corrupted = per_corruption = None
    if predictions is not None:
        corrupted = _bootstrap(per_image_accuracy(predictions, names, severities), seed)
        per_corruption = {
            n: _bootstrap(per_image_accuracy(predictions, [n], severities), seed) for n in names
        }
    return {
        "test_accuracy": float(clean["accuracy"]),
        "test_accuracy_interval": _interval(clean),
        "test_images": int(clean["images"]) if "images" in clean else None,
        "clean_error": float(clean["error"]),
        "corruption_accuracy": float(cells["accuracy"].mean()),
        "corruption_accuracy_interval": corrupted,
        "per_corruption": {n: float(np.mean(v)) for n, v in per_severity.items()},
        "per_corruption_interval": per_corruption,
        "per_severity": per_severity,
        "per_severity_interval": {
            n: [_interval(by_cell[(n, s)]) for s in severities] for n in names
        },
        "ce": ce,
        "relative_ce": relative,
        "mce": mean(list(ce.values())),
        "relative_mce": mean(list(relative.values())),
        "ece_clean": float(clean["ece"]),
        "ece_corrupted": float(cells["ece"].mean()),
        "fgsm_accuracy": {
            f"{int(s)}/255": float(a)
            for s, a in zip(fgsm["severity"], fgsm["accuracy"], strict=True)
        },
        "fgsm_accuracy_interval": {
            f"{int(r['severity'])}/255": _interval(r) for _, r in fgsm.iterrows()
        },
    }


def choice_score(
    split: str,
    rows: pd.DataFrame,
    predictions: pd.DataFrame,
    names: list[str],
    severities: list[int],
    seed: int = 0,
) -> ChoiceScores:
    """What a model scores on the suite choices are made on: its clean accuracy and its
    accuracy under the gate's corruptions, with 95% intervals."""
    clean = _clean(rows)
    corrupted = per_image_accuracy(predictions, names, severities)
    return ChoiceScores(
        split=split,
        images=int(clean["images"]),
        accuracy=float(clean["accuracy"]),
        accuracy_interval=_interval(clean),
        corruption_accuracy=float(corrupted.mean()),
        corruption_accuracy_interval=_bootstrap(corrupted, seed),
    )
