"""How good are a run's pseudo labels, iteration by iteration, and where are they wrong?

Reads what a finished (or stopped) run saved, and trains nothing: the probabilities each
labeller gave every unlabelled image (`iteration-k/pseudo_labels`: the teacher's for k=1,
student k-1's after; `label_queue/scores`: the final student's), scored against the
unlabelled images' true labels, which the pipeline keeps apart and never trains on
(`unlabelled_truth.parquet`, written by `ingest fashion-mnist`). For each labeller: the
accuracy over the whole pool with its 95% interval (before the selection drops unsure
images), the same after distribution alignment (each class's probability scaled until
the mean prediction matches the labelled set's class shares, as in ReMixMatch), and the
recall of every class; then the averages of the latest labellers (does an ensemble of
the chain label better?) and the last labeller's largest confusions.

    uv run python -m benchmarks.pseudo_labels artifacts/runs/RUN --data DATA_ROOT [--out FILE.md]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from noisy_student.data import dataset, storage
from noisy_student.errors import UserError
from noisy_student.evaluation import statistics
from noisy_student.training import selection


@dataclass
class Labeller:
    name: str  # "teacher", "student k"
    url: str  # a folder of pseudo-label shards behind a manifest
    probs: np.ndarray  # images x classes, in the order of `Pool.ids`


@dataclass
class Pool:
    ids: pd.Index
    labels: np.ndarray  # true class of each image
    class_names: list[str]
    prior: np.ndarray  # the labelled set's class shares


def labeller_folders(run_url: str) -> list[tuple[str, str]]:
    """(name, folder) of every labeller the run saved, in the chain's order."""
    found = []
    k = 1
    while storage.exists(
        storage.join(run_url, f"iteration-{k}", "pseudo_labels", dataset.MANIFEST)
    ):
        name = "teacher" if k == 1 else f"student {k - 1}"
        found.append((name, storage.join(run_url, f"iteration-{k}", "pseudo_labels")))
        k += 1
    scores = storage.join(run_url, "label_queue", "scores")
    if found and storage.exists(storage.join(scores, dataset.MANIFEST)):
        found.append((f"student {k - 1}", scores))
    if not found:
        raise UserError(f"{run_url}: no pseudo labels (iteration-1/pseudo_labels) in this folder")
    return found


def read_pool(data_root: str) -> Pool:
    """The unlabelled images' true labels (those still in the pool), their class names and
    the labelled set's class shares."""
    url = storage.join(data_root, dataset.UNLABELLED_TRUTH)
    if not storage.exists(url):
        raise UserError(
            f"{url}: missing; the unlabelled images' true labels are known only for a "
            "dataset ingested with them (`noisy-student ingest fashion-mnist`)"
        )
    unlabelled = dataset.read_manifest(storage.join(data_root, dataset.UNLABELLED))
    truth = dataset.unlabelled_truth(data_root, unlabelled)
    assert truth is not None  # the file exists
    labelled = dataset.read_manifest(storage.join(data_root, dataset.LABELLED))
    counts = np.zeros(labelled.num_classes)
    for url in labelled.shard_urls():
        frame = storage.read_parquet(url, ["id", "label"]).to_pandas()
        frame = frame[~frame["id"].isin(labelled.removed_ids)]
        counts += np.bincount(frame["label"].to_numpy(), minlength=len(counts))
    return Pool(truth.index, truth.to_numpy(), unlabelled.class_names, counts / counts.sum())


def read_probs(url: str, pool: Pool) -> np.ndarray:
    """The folder's probabilities, one row per image of the pool (an image the labeller
    did not see is a one-line error naming the folder)."""
    manifest = storage.read_json(storage.join(url, dataset.MANIFEST))
    ids, rows = [], []
    for part in manifest["shards"]:
        table = storage.read_parquet(storage.join(url, part["file"]), ["id", "probs"])
        column = table.column("probs").combine_chunks()
        ids += table.column("id").to_pylist()
        rows.append(column.values.to_numpy().reshape(len(column), -1))
    frame = pd.DataFrame(np.concatenate(rows), index=pd.Index(ids))
    missing = pool.ids.difference(frame.index)
    if len(missing):
        raise UserError(
            f"{url}: no probabilities for {len(missing)} pool images, e.g. {missing[0]}"
        )
    return frame.loc[pool.ids].to_numpy()


def aligned(probs: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Distribution alignment as `filter_and_balance` applies it (`selection.align: true`):
    each class's probabilities scaled, and each row renormalised, so that the mean
    prediction over the pool matches `prior`."""
    return selection.align(lambda: [probs], prior).aligned(probs)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean())


def _percent(acc: float, n: int) -> str:
    return statistics.percent(acc, statistics.accuracy_interval(acc, n))


def report(run_url: str, data_root: str) -> tuple[str, dict]:
    """The markdown report and its figures."""
    pool = read_pool(storage.resolve(data_root))
    folders = labeller_folders(storage.resolve(run_url))
    chain = [Labeller(n, u, read_probs(u, pool)) for n, u in folders]
    y, n = pool.labels, len(pool.labels)
    figures: dict = {"images": n, "labellers": {}, "averages": {}}
    lines = [
        f"# Pseudo labels of `{run_url}`",
        "",
        f"{n} unlabelled images scored against their true labels (`{data_root}`, kept apart "
        "from training), every image before selection. Written "
        f"{datetime.now(UTC).date()} by `python -m benchmarks.pseudo_labels {run_url} --data "
        f"{data_root}`.",
        "",
        "| labeller | right [95% interval] | change | aligned to the labelled class shares |",
        "|---|---|---|---|",
    ]
    before = None
    for lab in chain:
        acc, acc_aligned = accuracy(lab.probs, y), accuracy(aligned(lab.probs, pool.prior), y)
        change = "" if before is None else f"{100 * (acc - before):+.2f}"
        lines.append(
            f"| {lab.name} | {_percent(acc, n)} | {change} | {100 * acc_aligned:.2f}% "
            f"({100 * (acc_aligned - acc):+.2f}) |"
        )
        figures["labellers"][lab.name] = {"accuracy": acc, "aligned": acc_aligned}
        before = acc
    if len(chain) > 1:
        lines += ["", "Averaged probabilities of the latest labellers:", ""]
        for k in range(2, len(chain) + 1):
            names = [lab.name for lab in chain[-k:]]
            acc = accuracy(np.mean([lab.probs for lab in chain[-k:]], axis=0), y)
            figures["averages"][" + ".join(names)] = acc
            lines.append(f"- {' + '.join(names)}: {100 * acc:.2f}%")
    lines += [
        "",
        "Recall of each class (% of its images labelled as it):",
        "",
        "| labeller | " + " | ".join(pool.class_names) + " |",
        "|---|" + "---|" * len(pool.class_names),
    ]
    for lab in chain:
        predicted = lab.probs.argmax(1)
        recall = [(predicted[y == c] == c).mean() for c in range(len(pool.class_names))]
        lines.append(f"| {lab.name} | " + " | ".join(f"{100 * r:.1f}" for r in recall) + " |")
        figures["labellers"][lab.name]["recall"] = dict(zip(pool.class_names, recall, strict=True))
    last = chain[-1]
    confusion = np.zeros((len(pool.class_names),) * 2, dtype=int)
    np.add.at(confusion, (y, last.probs.argmax(1)), 1)
    errors = int(confusion.sum() - np.trace(confusion))
    pairs = sorted(
        (
            (confusion[i, j], i, j)
            for i in range(len(confusion))
            for j in range(len(confusion))
            if i != j
        ),
        reverse=True,
    )[:6]
    lines += [
        "",
        f"{last.name}'s {errors} errors, the largest confusions (true -> labelled): "
        + ", ".join(f"{pool.class_names[i]} -> {pool.class_names[j]} {c}" for c, i, j in pairs)
        + ".",
    ]
    figures["errors"] = errors
    return "\n".join(lines) + "\n", figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="the run folder (artifacts/runs/RUN_ID), local or a URL")
    parser.add_argument("--data", required=True, help="the run's dataset root")
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    try:
        text, _ = report(args.run, args.data)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
