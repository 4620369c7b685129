"""Find the dataset, or ingest Fashion-MNIST into it on first use; open its splits."""

from __future__ import annotations

import logging

import torch

from noisy_student import dataset, storage, training_data
from noisy_student.config import FashionMnistSource
from noisy_student.errors import UserError

logger = logging.getLogger(__name__)


def _missing_split(root: str) -> str | None:
    for split in (dataset.LABELLED, dataset.UNLABELLED, dataset.TEST):
        url = storage.join(root, split, dataset.MANIFEST)
        if not storage.exists(url):
            return url
    return None


def check_data(root: str, fashion_mnist: FashionMnistSource | None) -> None:
    """Fail before any work starts if there is no dataset and nothing to ingest it from."""
    missing = _missing_split(storage.resolve(root))
    if missing is None:
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
    from noisy_student import ingest

    root = storage.resolve(root)
    if _missing_split(root) is None:
        logger.info(f"dataset found at {root}")
        return root
    check_data(root, fashion_mnist)
    logger.info(f"ingesting Fashion-MNIST from {fashion_mnist.source} into {root}")
    ingest.fashion_mnist(
        root,
        fashion_mnist.source,
        fashion_mnist.labelled_per_class,
        fashion_mnist.unlabelled_limit,
        fashion_mnist.test_limit,
        fashion_mnist.seed,
        fashion_mnist.rows_per_shard,
    )
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


def test_batches(root: str, batch_size: int) -> training_data.TestBatches:
    """The test split in (images, labels) batches, read afresh on every pass."""
    return training_data.TestBatches(
        dataset.read_manifest(storage.join(root, dataset.TEST)),
        batch_size,
        torch.cuda.is_available(),
    )
