"""Find the dataset, or ingest Fashion-MNIST into it on first use; open its splits.

The validation split is optional: where it is present every choice is made on it, and
where it is not, on the test split (`choice_split` says which).
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

from noisy_student.config import FashionMnistSource
from noisy_student.data import dataset, storage, training_data
from noisy_student.errors import UserError

logger = logging.getLogger(__name__)


def _missing_split(root: str) -> str | None:
    for split in (dataset.LABELLED, dataset.UNLABELLED, dataset.TEST):
        url = storage.join(root, split, dataset.MANIFEST)
        if not storage.exists(url):
            return url
    return None


def has_validation(root: str) -> bool:
    return storage.exists(storage.join(root, dataset.VALIDATION, dataset.MANIFEST))


def choice_split(root: str) -> str:
    """The split a run makes its choices on: validation where the dataset has one, else
    test (and every record of a choice says so)."""
    return dataset.VALIDATION if has_validation(root) else dataset.TEST


def _validation_per_class(root: str) -> list[int]:
    """How many validation images each class present has (none: [])."""
    if not has_validation(root):
        return []
    manifest = dataset.read_manifest(storage.join(root, dataset.VALIDATION))
    labels = [
        label
        for url in manifest.shard_urls()
        for label in storage.read_parquet(url, columns=["label"]).column("label").to_pylist()
    ]
    return sorted(set(Counter(labels).values()))


def _check_validation(root: str, fashion_mnist: FashionMnistSource) -> None:
    """A dataset found at `root` must have the validation split `data.fashion_mnist` asks
    for: an older ingest without one (or with another size) is not silently reused."""
    asked = fashion_mnist.validation_per_class
    found = _validation_per_class(root)
    if found != ([asked] if asked else []):
        held = "no validation split"
        if found:
            counts = str(found[0]) if len(found) == 1 else f"{found[0]} to {found[-1]}"
            held = f"{counts} images per class"
        raise UserError(
            f"{root}: the dataset holds {held}, data.fashion_mnist.validation_per_class "
            f"asks {asked} (it was ingested with other settings: point data.root at a new "
            "folder, or delete this one to ingest it again)"
        )


def check_data(root: str, fashion_mnist: FashionMnistSource | None) -> None:
    """Fail before any work starts if there is no dataset and nothing to ingest it from,
    or if the dataset found is not the one `fashion_mnist` describes."""
    root = storage.resolve(root)
    missing = _missing_split(root)
    if missing is None:
        if fashion_mnist is not None:
            _check_validation(root, fashion_mnist)
        return
    if fashion_mnist is None:
        raise UserError(
            f"{missing}: dataset split missing (data.root; run `noisy-student "
            "ingest` first or set data.fashion_mnist)"
        )
    if not storage.exists(
        storage.join(storage.resolve(fashion_mnist.source), "train-images-idx3-ubyte.gz")
    ):
        raise UserError(
            f"{fashion_mnist.source}: no Fashion-MNIST IDX files "
            "(data.fashion_mnist.source; apt-get install dataset-fashion-mnist)"
        )


def prepare_data(root: str, fashion_mnist: FashionMnistSource | None) -> str:
    """The dataset root, ingesting Fashion-MNIST into it first when it holds no dataset."""
    from noisy_student.data import ingest

    root = storage.resolve(root)
    check_data(root, fashion_mnist)
    if _missing_split(root) is None:
        logger.info(f"dataset found at {root}")
        logger.info(f"choices are made on its {choice_split(root)} split")
        return root
    logger.info(f"ingesting Fashion-MNIST from {fashion_mnist.source} into {root}")
    ingest.fashion_mnist(root, **fashion_mnist.model_dump())  # its keys are the parameters
    return root


def unlabelled_shards(root: str) -> list[int]:
    return list(range(len(dataset.read_manifest(storage.join(root, dataset.UNLABELLED)).shards)))


def labelled_rows(
    root: str, smoothing: float = 0.0, cache: training_data.DecodedCache | None = None
) -> training_data.ShardRows:
    """The labelled split, streamed: every row, its target one-hot (or smoothed)."""
    return training_data.labelled_rows(
        dataset.read_manifest(storage.join(root, dataset.LABELLED)), smoothing, cache
    )


def test_batches(
    root: str, batch_size: int, split: str = dataset.TEST
) -> training_data.TestBatches:
    """A labelled split (test by default) in (images, labels) batches, read afresh on
    every pass."""
    return training_data.TestBatches(
        dataset.read_manifest(storage.join(root, split)),
        batch_size,
        torch.cuda.is_available(),
    )
