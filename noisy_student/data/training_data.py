"""What the training loop reads: labelled and pseudo-labelled rows streamed from the shards,
and the test set in batches. No split's decoded images are ever held at once, so memory is
flat in data size; what is held per row is its place and its target (at 10 classes about
50 bytes a row, against 27 KB for a decoded 96 px RGB image).

The order of an epoch. Rows live in blocks: a shard's Parquet row groups (an in-memory set,
for tests, is cut into blocks alike). Every epoch draws a seeded permutation of the blocks;
consecutive runs of `window` blocks in that order are decoded together, and the items of a
window (a row appears as many times as balancing's `copies` say, so duplicates are honoured
exactly) are permuted within it. Both permutations come from generators seeded by (seed,
epoch, window), so the order is a pure function of (seed, epoch): a resumed run finds its
place by counting items, without decoding any row it skips. Why this and not the others:
a global permutation of rows would touch a different row group for nearly every row of a
batch (a whole group decoded for one image); shard order plus a shuffle buffer mixes a row
only with its neighbours in the same shard and visits shards in the same order every epoch.
The window mixes rows from `window` random places of the whole set and costs `window` row
groups of decoded images (double-buffered: the next window decodes while this one trains).
Rows ingested in class order (an ImageFolder walked folder by folder) give windows of few
classes; Fashion-MNIST's ingest keeps its shuffled order.

Decoded blocks are kept between epochs up to a byte budget (`DecodedCache`): the first
blocks decoded stay, the rest are decoded again on every visit. Memory is bounded by the
budget, whatever the data's size, and a set that fits (Fashion-MNIST's 59,000 images are
46 MB decoded) is decoded once per stage instead of once per epoch. First come, first
kept, rather than least recently used: under a fresh random order every epoch, LRU would
evict a block shortly before it is needed again and keep the same hit rate at the cost of
decoding into and freeing memory all the time.

Decoding runs on threads (Pillow releases the GIL while it decodes). Measured here (2 CPU
cores shared with other jobs, load average 10; 4,096 images in chunks of 512, best of 2):
at 28 px grayscale PNG, 2 threads decoded 1.98x as fast as one and 2 worker processes 1.50x
(per-image work is small and processes pay pickling on top); at 96 px RGB PNG, 2 threads
1.63x and 2 processes 1.67x, a tie. Threads need no pickling of decoded arrays nor start-up.
"""

from __future__ import annotations

import io
import math
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from noisy_student.data import dataset, storage
from noisy_student.data.prefetch import one_torch_thread, prefetch
from noisy_student.errors import UserError

WINDOW_BLOCKS = 4  # row groups decoded at once; more mixes better and costs memory
DECODE_THREADS = 2


class DecodedCache:
    """A byte budget for decoded blocks kept between epochs, shared by the `ShardRows`
    that use it (a stage's labelled and pseudo-labelled rows): a block is kept if it fits
    in what is left, and stays as long as its rows do."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        with self._lock:
            if self.used + size > self.budget:
                return False
            self.used += size
            return True


@dataclass(frozen=True)
class Block:
    """A block's items: the row (within the block) and the target of each, in row order;
    a row that balancing copied k times is here k times."""

    rows: np.ndarray  # int64
    targets: torch.Tensor  # float32, items x classes


class Rows:
    """Rows to train on, in blocks: `blocks[i]` says which rows of block i are items and
    their targets; `decode(i, rows)` gives those rows' uint8 images (C x H x W)."""

    blocks: list[Block]
    threads: int = 1  # decoding one block may use this many threads
    decode_seconds: float = 0.0  # wall time spent reading and decoding blocks so far

    @property
    def items(self) -> int:
        return sum(len(b.rows) for b in self.blocks)

    def decode(self, block: int, rows: np.ndarray) -> torch.Tensor:
        raise NotImplementedError


class TensorRows(Rows):
    """Images already in memory (tests, benchmarks), cut into blocks of `block_rows`."""

    def __init__(
        self, images: torch.Tensor, targets: torch.Tensor, block_rows: int = dataset.ROW_GROUP_SIZE
    ):
        self.images = images
        self.starts = list(range(0, len(images), block_rows))
        self.blocks = [
            Block(np.arange(min(block_rows, len(images) - s)), targets[s : s + block_rows])
            for s in self.starts
        ]

    def decode(self, block: int, rows: np.ndarray) -> torch.Tensor:
        return self.images[self.starts[block] + torch.from_numpy(rows)]


@dataclass(frozen=True)
class _Place:
    shard: int
    row_group: int


class ShardRows(Rows):
    """Rows of a dataset's shards, one block per row group that holds any item. Every shard
    is checked against the manifest's checksum once, when the rows are listed."""

    def __init__(
        self,
        manifest: dataset.Manifest,
        places: list[_Place],
        blocks: list[Block],
        cache: DecodedCache | None = None,
    ):
        self.manifest, self.places, self.blocks, self.cache = manifest, places, blocks, cache
        self._kept: dict[int, tuple[np.ndarray, torch.Tensor]] = {}  # block -> rows, images
        self.threads = DECODE_THREADS
        self._pool = ThreadPoolExecutor(
            DECODE_THREADS, thread_name_prefix="decode", initializer=one_torch_thread
        )

    def decode(self, block: int, rows: np.ndarray) -> torch.Tensor:
        if (kept := self._kept_images(block, rows)) is not None:
            return kept
        start = time.perf_counter()
        images = self._read_and_decode(block, rows)
        self.decode_seconds += time.perf_counter() - start  # one window thread: no race
        size = images.numel() * images.element_size()
        if self.cache is not None and block not in self._kept and self.cache.take(size):
            self._kept[block] = (rows.copy(), images)
        return images

    def _kept_images(self, block: int, rows: np.ndarray) -> torch.Tensor | None:
        """The kept images of `rows` (sorted, distinct), or None unless all are kept."""
        if block not in self._kept:
            return None
        stored, images = self._kept[block]
        at = np.searchsorted(stored, rows)
        if (at >= len(stored)).any() or not np.array_equal(stored[at], rows):
            return None
        return images if len(at) == len(stored) else images[torch.from_numpy(at)]

    def _read_and_decode(self, block: int, rows: np.ndarray) -> torch.Tensor:
        place = self.places[block]
        url = storage.join(self.manifest.url, self.manifest.shards[place.shard]["file"])
        fs, path = storage.filesystem(url)
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f, pre_buffer=False)
            table = parquet.read_row_group(place.row_group, columns=["id", "image"])
            first = sum(parquet.metadata.row_group(g).num_rows for g in range(place.row_group))
        table = table.take(pa.array(rows))
        # threads, each decoding a slice: Pillow releases the GIL while it decodes
        size = math.ceil(len(rows) / self.threads)
        parts = self._pool.map(
            lambda s: self._decode(url, table.slice(s, size), rows[s : s + size], first),
            range(0, len(rows), size),
        )
        return torch.cat(list(parts))

    def _decode(self, url: str, table: pa.Table, rows: np.ndarray, first: int) -> torch.Tensor:
        try:
            # PIL, which releases the GIL: these threads run beside the training steps
            row = first + int(rows[0])
            return dataset.decode_images(self.manifest, url, table, row, release_gil=True)
        except UserError:
            # the rows need not be contiguous: name the bad one by its own row number
            for i in range(len(rows)):
                dataset.decode_images(
                    self.manifest, url, table.slice(i, 1), first + int(rows[i]), release_gil=True
                )
            raise


def _row_groups(
    manifest: dataset.Manifest, columns: list[str]
) -> Iterator[tuple[int, int, pa.Table]]:
    """(shard, row group) blocks' `columns`, each shard checksummed first."""
    for shard in range(len(manifest.shards)):
        with dataset.open_shard(manifest, shard) as (_, parquet):
            groups = [
                parquet.read_row_group(g, columns=columns) for g in range(parquet.num_row_groups)
            ]
        for g, table in enumerate(groups):
            yield shard, g, table


def _labels(manifest: dataset.Manifest) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(shard, row group, labels) of a labelled split. Refuses a row without a label and a
    split missing a class: training or judging on it would silently skew."""
    present = set()
    for shard, group, table in _row_groups(manifest, ["id", "label"]):
        url = storage.join(manifest.url, manifest.shards[shard]["file"])
        labels = dataset.labels_of(manifest, url, table)
        missing = (labels < 0).nonzero()
        if len(missing):
            bad = table.column("id")[int(missing[0])].as_py()
            raise UserError(f"{manifest.url}: id {bad!r} has no label")
        present.update(labels.unique().tolist())
        yield shard, group, labels
    absent = [n for c, n in enumerate(manifest.class_names) if c not in present]
    if absent:
        raise UserError(f"{manifest.url}: no labelled image for class {absent[0]!r}")


def labelled_rows(
    manifest: dataset.Manifest, smoothing: float = 0.0, cache: DecodedCache | None = None
) -> ShardRows:
    """Every row of a labelled split, its target one-hot (or smoothed); decoded blocks
    are kept in `cache` while it has room."""
    places, blocks = [], []
    for shard, group, labels in _labels(manifest):
        targets = F.one_hot(labels, manifest.num_classes).float()
        targets = targets * (1.0 - smoothing) + smoothing / manifest.num_classes
        places.append(_Place(shard, group))
        blocks.append(Block(np.arange(len(labels)), targets))
    return ShardRows(manifest, places, blocks, cache)


def pseudo_labelled_rows(
    selected_url: str, unlabelled: dataset.Manifest, cache: DecodedCache | None = None
) -> ShardRows:
    """The rows of the unlabelled split that filter_and_balance selected, with the teacher's
    targets, each `copies` times. Only the ids of the unlabelled split are read here."""
    ids, places, starts = [], [], [0]
    for shard, group, table in _row_groups(unlabelled, ["id"]):
        ids.append(table.column("id"))
        places.append(_Place(shard, group))
        starts.append(starts[-1] + table.num_rows)
    all_ids = pa.chunked_array([c for col in ids for c in col.chunks], pa.string())
    starts = np.asarray(starts)
    named_in = storage.join(selected_url, dataset.MANIFEST)
    info = storage.read_json(named_in)
    position, copies, targets = [], [], []
    for entry in info["shards"]:
        url = storage.join(selected_url, entry["file"])
        data = storage.read_verified(
            url, entry["sha256"], storage.join(selected_url, dataset.MANIFEST)
        )
        table = pq.read_table(io.BytesIO(data), columns=["id", "target", "copies"])
        if table.num_rows != entry["rows"]:
            raise UserError(f"{url}: {table.num_rows} rows, manifest says {entry['rows']}")
        if table.num_rows == 0:
            continue  # balancing can leave a shard with nothing selected
        found = pc.index_in(table.column("id"), value_set=all_ids)
        if found.null_count:
            bad = table.column("id")[found.is_null().index(True).as_py()].as_py()
            raise UserError(f"{url}: id {bad!r} is not in the unlabelled set")
        position.append(found.to_numpy().astype(np.int64))
        copies.append(table.column("copies").to_numpy())
        target = table.column("target").combine_chunks()
        targets.append(target.values.to_numpy().reshape(len(target), -1))
    position = np.concatenate(position) if position else np.zeros(0, np.int64)
    copies = np.concatenate(copies) if copies else np.zeros(0, np.int64)
    k = unlabelled.num_classes
    targets = np.concatenate(targets) if targets else np.zeros((0, k), np.float32)
    # items in row order, duplicates side by side: block by block, then row within block
    order = np.argsort(position, kind="stable")
    position, copies, targets = position[order], copies[order], targets[order]
    block_of = np.searchsorted(starts, position, side="right") - 1
    kept_places, blocks = [], []
    for b in np.unique(block_of):
        mine = block_of == b
        rows = np.repeat(position[mine] - starts[b], copies[mine])
        blocks.append(Block(rows, torch.from_numpy(np.repeat(targets[mine], copies[mine], 0))))
        kept_places.append(places[b])
    return ShardRows(unlabelled, kept_places, blocks, cache)


class Stream:
    """An endless stream of (images, targets) batches over `rows`, epoch after epoch in the
    order the module docstring describes. Its state (seed, epoch, position in the epoch)
    is that of the last batch handed out, so a stopped run picks up where it was."""

    def __init__(self, rows: Rows, seed: int, window: int = WINDOW_BLOCKS):
        if not rows.items:
            raise UserError("no rows to train on")
        self.rows, self.seed, self.window = rows, seed, window
        self.epoch, self.position = 0, 0
        self.items = rows.items
        self._batches: Iterator | None = None

    def _generator(self, *key: int) -> torch.Generator:
        seed = np.random.SeedSequence([self.seed, *key]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(seed) & (2**63 - 1))

    def _windows(self, epoch: int) -> list[list[int]]:
        order = torch.randperm(len(self.rows.blocks), generator=self._generator(epoch)).tolist()
        return [order[i : i + self.window] for i in range(0, len(order), self.window)]

    def _decode_window(self, blocks: list[int], key: tuple[int, int]):
        """The window's distinct rows decoded, and its items' (image index, target) in the
        window's seeded order."""
        images, index, targets, offset = [], [], [], 0
        for b in blocks:
            block = self.rows.blocks[b]
            unique, inverse = np.unique(block.rows, return_inverse=True)
            images.append(self.rows.decode(b, unique))
            index.append(torch.from_numpy(inverse + offset))
            targets.append(block.targets)
            offset += len(unique)
        index, targets = torch.cat(index), torch.cat(targets)
        order = torch.randperm(len(index), generator=self._generator(*key))
        return torch.cat(images), index[order], targets[order]

    def _windows_from(self, epoch: int, position: int) -> Iterator[tuple[Future, int, int, int]]:
        """(decoded window, first item to use, epoch, its position at the window's end) from
        (epoch, position) on, each window's decoding started one window ahead."""
        pool = ThreadPoolExecutor(1, thread_name_prefix="window", initializer=one_torch_thread)
        try:
            pending: list[tuple[Future, int, int, int]] = []

            def plan() -> Iterator[tuple[list[int], tuple[int, int], int, int, int]]:
                e, skip = epoch, position
                while True:
                    end = 0
                    for w, blocks in enumerate(self._windows(e)):
                        count = sum(len(self.rows.blocks[b].rows) for b in blocks)
                        end += count
                        if skip >= count:  # before the resume position: not decoded
                            skip -= count
                            continue
                        yield blocks, (e, w), skip, e, end
                        skip = 0
                    e += 1

            for blocks, key, skip, e, end in plan():
                pending.append((pool.submit(self._decode_window, blocks, key), skip, e, end))
                if len(pending) == 2:
                    yield pending.pop(0)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def batches(self, size: int, pin_memory: bool = False) -> Iterator[tuple]:
        """(images, targets, state after this batch) batches of `size` items from the
        current state on, endless."""
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        have = 0
        for future, skip, epoch, end in self._windows_from(self.epoch, self.position):
            images, index, targets = future.result()
            start = skip
            while start < len(index):
                take = min(size - have, len(index) - start)
                chunk = index[start : start + take]
                parts.append((images[chunk], targets[start : start + take]))
                start += take
                have += take
                if have == size:
                    x = torch.cat([p[0] for p in parts])
                    y = torch.cat([p[1] for p in parts])
                    position = end - (len(index) - start)
                    state = {"epoch": epoch, "position": position}
                    if position == self.items:
                        state = {"epoch": epoch + 1, "position": 0}
                    yield (x.pin_memory() if pin_memory else x), y, state
                    parts, have = [], 0

    def state_dict(self) -> dict[str, int]:
        return {
            "items": self.items,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["items"] != self.items or state["seed"] != self.seed:
            raise UserError(
                f"saved stream of {state['items']} items (seed {state['seed']}) does not match "
                f"this one of {self.items} (seed {self.seed})"
            )
        self.epoch, self.position = state["epoch"], state["position"]


class Feed:
    """A stream read ahead in a background thread: `next_batch()` hands out the next batch
    and moves the stream's state to just after it."""

    def __init__(self, stream: Stream, size: int, depth: int = 4, pin_memory: bool = False):
        self.stream = stream
        self._ahead = prefetch(stream.batches(size, pin_memory), depth)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, state = next(self._ahead)
        self.stream.epoch, self.stream.position = state["epoch"], state["position"]
        return x, y

    def close(self) -> None:
        self._ahead.close()


def clean_batches(sources: Iterable[Rows], batch_size: int, limit: int) -> Iterator[torch.Tensor]:
    """Up to `limit` distinct training images without noise, block by block in stored
    order, as uint8 batches (for recomputing batch-norm statistics)."""
    left = limit
    for rows in sources:
        for b, block in enumerate(rows.blocks):
            if left <= 0:
                return
            images = rows.decode(b, np.unique(block.rows)[:left])
            left -= len(images)
            for i in range(0, len(images), batch_size):
                yield images[i : i + batch_size]


class TestBatches:
    """(images, labels) batches of a labelled split, decoded as they are read and read
    ahead in a thread; iterate again for another pass. Every row's label is checked first."""

    def __init__(self, manifest: dataset.Manifest, batch_size: int, pin_memory: bool = False):
        self.manifest, self.batch_size, self.pin_memory = manifest, batch_size, pin_memory
        for _ in _labels(manifest):
            pass

    def _read(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for shard in range(len(self.manifest.shards)):
            # laid out for the model: these batches only ever meet `engine.batch_probs`
            for part in dataset.iter_shard_batches(
                self.manifest, shard, self.batch_size, self.pin_memory, channels_last=True
            ):
                yield part.images, part.labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return prefetch(self._read())


class TensorBatches:
    """(images, labels) batches of tensors already in memory (tests, benchmarks)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024):
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.images), self.batch_size):
            yield self.images[i : i + self.batch_size], self.labels[i : i + self.batch_size]
