"""The training stream: every item once per epoch in a new seeded order, balancing's copies
honoured, resumable without decoding what it skips, read from the shards row group by row
group."""

from __future__ import annotations

import collections

import numpy as np
import pyarrow as pa
import pytest
import torch

from noisy_student.data import dataset, dataset_writer, storage, training_data
from noisy_student.errors import UserError


def _images(n: int) -> torch.Tensor:
    """n distinct 1 x 4 x 4 images: image i holds i in its first two pixels."""
    x = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = torch.arange(n) % 256, torch.arange(n) // 256
    return x


def _ids(x: torch.Tensor) -> list[int]:
    return (x[:, 0, 0, 0].long() + 256 * x[:, 0, 0, 1].long()).tolist()


class CountingRows(training_data.TensorRows):
    """In-memory rows that note the blocks they decode."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.decoded: list[int] = []

    def decode(self, block: int, rows: np.ndarray) -> torch.Tensor:
        self.decoded.append(block)
        return super().decode(block, rows)


def _epochs(stream: training_data.Stream, size: int, epochs: int) -> list[list[int]]:
    """The ids each epoch handed out, `epochs` epochs of them."""
    out, current = [], []
    for x, _, _ in stream.batches(size):
        ids = _ids(x)
        over = len(current) + len(ids) - stream.items
        if over >= 0:
            out.append(current + ids[: len(ids) - over])
            current = ids[len(ids) - over :]
            if len(out) == epochs:
                return out
        else:
            current += ids
    raise AssertionError("unreachable: the stream is endless")


def test_every_item_comes_once_per_epoch_in_a_new_order_each_epoch():
    rows = training_data.TensorRows(_images(50), torch.zeros(50, 2), block_rows=8)
    epochs = _epochs(training_data.Stream(rows, seed=1, window=2), size=7, epochs=3)
    for ids in epochs:
        assert sorted(ids) == list(range(50))
    assert epochs[0] != epochs[1] != epochs[2]
    # the order is a function of the seed: the same seed repeats it, another changes it
    assert _epochs(training_data.Stream(rows, seed=1, window=2), 7, 3) == epochs
    assert _epochs(training_data.Stream(rows, seed=2, window=2), 7, 1)[0] != epochs[0]


def test_rows_of_one_block_spread_over_the_epoch_not_only_together():
    rows = training_data.TensorRows(_images(64), torch.zeros(64, 2), block_rows=8)
    first = _epochs(training_data.Stream(rows, seed=0, window=2), 8, 1)[0]
    # blocks are visited in a shuffled order: block 0 need not come first
    windows = [sorted({i // 8 for i in first[k : k + 16]}) for k in range(0, 64, 16)]
    assert windows != [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert all(len(w) == 2 for w in windows)  # a window is two whole blocks


def test_a_resumed_stream_continues_the_same_batches_without_decoding_skipped_windows():
    targets = torch.arange(60.0).view(60, 1)
    rows = training_data.TensorRows(_images(60), targets, block_rows=10)
    stream = training_data.Stream(rows, seed=5, window=1)
    feed = training_data.Feed(stream, 9)
    for _ in range(4):  # 36 items: into the fourth window of 10
        feed.next_batch()
    state = stream.state_dict()
    expected = [feed.next_batch() for _ in range(10)]  # past the end of the epoch
    feed.close()
    assert state == {"items": 60, "seed": 5, "epoch": 0, "position": 36}

    counting = CountingRows(_images(60), targets, block_rows=10)
    resumed = training_data.Stream(counting, seed=0, window=1)
    with pytest.raises(UserError, match="saved stream of 60 items .seed 5. does not match"):
        resumed.load_state_dict(state)
    resumed = training_data.Stream(counting, seed=5, window=1)
    resumed.load_state_dict(state)
    batches = resumed.batches(9)
    x, y, _ = next(batches)
    # the three windows before item 36 were skipped, never decoded
    skipped = {b for window in resumed._windows(0)[:3] for b in window}
    assert counting.decoded and not skipped & set(counting.decoded)
    got = [(x, y)] + [next(batches)[:2] for _ in range(9)]
    for (ex, ey), (gx, gy) in zip(expected, got, strict=True):
        assert torch.equal(ex, gx) and torch.equal(ey, gy)
    # each image keeps its own target on the way
    assert _ids(x) == y.view(-1).long().tolist()


def _write_split(url: str, split: str, n: int, labels: list[int | None], monkeypatch) -> None:
    monkeypatch.setattr(dataset_writer, "ROW_GROUP_SIZE", 4)  # several row groups per shard
    arrays = _images(n).numpy()[:, 0]
    rows = ((f"{split}{i:03d}", arrays[i], labels[i]) for i in range(n))
    dataset_writer.write_rows(url, split, ["a", "b", "c"], rows, rows_per_shard=10)


def _write_selected(url: str, ids: list[str], copies: list[int], k: int = 3) -> None:
    targets = np.eye(k, dtype=np.float32)[np.arange(len(ids)) % k]
    table = pa.table(
        {
            "id": ids,
            "target": pa.FixedSizeListArray.from_arrays(pa.array(targets.reshape(-1)), k),
            "copies": pa.array(copies, pa.int64()),
        }
    )
    sha = storage.write_parquet(storage.join(url, "part-00000.parquet"), table, 65536)
    storage.write_json(
        storage.join(url, dataset.MANIFEST),
        {"shards": [{"file": "part-00000.parquet", "rows": len(ids), "sha256": sha}]},
    )


def test_pseudo_labelled_rows_come_from_the_shards_as_often_as_balancing_copied_them(
    tmp_path, monkeypatch
):
    unlabelled = str(tmp_path / "unlabelled")
    _write_split(unlabelled, dataset.UNLABELLED, 25, [None] * 25, monkeypatch)
    manifest = dataset.read_manifest(unlabelled)
    chosen = [3, 24, 11, 0, 17]
    copies = [1, 3, 2, 1, 1]
    _write_selected(str(tmp_path / "selected"), [f"unlabelled{i:03d}" for i in chosen], copies)
    rows = training_data.pseudo_labelled_rows(str(tmp_path / "selected"), manifest)
    assert rows.items == 8
    # only the row groups holding a selected row are blocks
    assert len(rows.blocks) == len({(i // 10, i % 10 // 4) for i in chosen})
    stream = training_data.Stream(rows, seed=0, window=2)
    (ids,) = _epochs(stream, 3, 1)
    assert collections.Counter(ids) == dict(zip(chosen, copies, strict=True))
    # every copy carries its row's target from the selected set
    x, y, _ = next(training_data.Stream(rows, seed=0).batches(8))
    target_of = {i: np.eye(3)[n % 3] for n, i in enumerate(chosen)}
    for i, t in zip(_ids(x), y.numpy(), strict=True):
        np.testing.assert_array_equal(t, target_of[i])


def test_a_selected_id_missing_from_the_unlabelled_set_is_refused(tmp_path, monkeypatch):
    unlabelled = str(tmp_path / "unlabelled")
    _write_split(unlabelled, dataset.UNLABELLED, 6, [None] * 6, monkeypatch)
    _write_selected(str(tmp_path / "selected"), ["unlabelled001", "elsewhere"], [1, 1])
    with pytest.raises(UserError, match=r"part-00000.parquet: id 'elsewhere' is not in the unl"):
        training_data.pseudo_labelled_rows(
            str(tmp_path / "selected"), dataset.read_manifest(unlabelled)
        )


def test_labelled_rows_need_a_label_on_every_row_and_every_class(tmp_path, monkeypatch):
    _write_split(str(tmp_path / "ok"), dataset.LABELLED, 6, [0, 1, 2, 0, 1, 2], monkeypatch)
    rows = training_data.labelled_rows(dataset.read_manifest(str(tmp_path / "ok")), 0.3)
    assert rows.items == 6
    torch.testing.assert_close(rows.blocks[0].targets[0], torch.tensor([0.8, 0.1, 0.1]))
    _write_split(str(tmp_path / "gap"), dataset.LABELLED, 4, [0, 1, 0, 1], monkeypatch)
    with pytest.raises(UserError, match="no labelled image for class 'c'"):
        training_data.labelled_rows(dataset.read_manifest(str(tmp_path / "gap")))
    _write_split(str(tmp_path / "none"), dataset.TEST, 4, [0, 1, None, 2], monkeypatch)
    with pytest.raises(UserError, match="id 'test002' has no label"):
        training_data.TestBatches(dataset.read_manifest(str(tmp_path / "none")), 2)


def test_a_corrupt_image_in_a_streamed_block_names_its_shard_row_and_id(tmp_path, monkeypatch):
    url = str(tmp_path / "unlabelled")
    monkeypatch.setattr(dataset_writer, "ROW_GROUP_SIZE", 4)
    arrays = _images(6).numpy()[:, 0]
    with dataset_writer.DatasetWriter(url, dataset.UNLABELLED, ["a", "b", "c"], 4, 4, "L") as w:
        for i in range(6):
            blob = b"not a png" if i == 5 else dataset_writer.encode_png(arrays[i])
            w.add(f"u{i}", blob, None)
    manifest = dataset.read_manifest(url)
    _write_selected(str(tmp_path / "selected"), ["u1", "u5"], [1, 1])
    rows = training_data.pseudo_labelled_rows(str(tmp_path / "selected"), manifest)
    with pytest.raises(UserError, match=r"part-00000.parquet: row 5 \(id 'u5'\): corrupt image"):
        next(training_data.Stream(rows, seed=0).batches(2))


def test_test_batches_stream_every_row_with_its_label_on_each_pass(tmp_path, monkeypatch):
    url = str(tmp_path / "test")
    _write_split(url, dataset.TEST, 23, [i % 3 for i in range(23)], monkeypatch)
    batches = training_data.TestBatches(dataset.read_manifest(url), 5)
    for _ in range(2):
        seen = list(batches)
        assert max(len(y) for _, y in seen) == 5
        x = torch.cat([x for x, _ in seen])
        assert _ids(x) == list(range(23))
        assert torch.cat([y for _, y in seen]).tolist() == [i % 3 for i in range(23)]


def test_clean_batches_give_distinct_images_up_to_the_limit():
    rows = training_data.TensorRows(_images(30), torch.zeros(30, 2), block_rows=8)
    got = list(training_data.clean_batches([rows], batch_size=4, limit=19))
    assert [len(b) for b in got] == [4, 4, 4, 4, 3]
    assert _ids(torch.cat(got)) == list(range(19))


def test_decoded_blocks_are_kept_up_to_the_budget_and_the_batches_do_not_change(
    tmp_path, monkeypatch
):
    labelled = str(tmp_path / "labelled")
    _write_split(labelled, dataset.LABELLED, 30, [i % 3 for i in range(30)], monkeypatch)
    manifest = dataset.read_manifest(labelled)
    plain = training_data.labelled_rows(manifest)
    expected = _epochs(training_data.Stream(plain, seed=4, window=2), 5, 3)

    block_bytes = 4 * 4 * 4  # a row group: 4 images of 1 x 4 x 4 uint8
    cache = training_data.DecodedCache(budget=3 * block_bytes)
    kept = training_data.labelled_rows(manifest, cache=cache)
    reads = []
    original = training_data.ShardRows._read_and_decode
    monkeypatch.setattr(
        training_data.ShardRows,
        "_read_and_decode",
        lambda self, b, rows: reads.append(b) or original(self, b, rows),
    )
    assert _epochs(training_data.Stream(kept, seed=4, window=2), 5, 3) == expected
    # row groups of 4, 4 and 2 images per shard of 10: those kept, decoded once, fill
    # no more than the budget; the others are decoded every epoch (and once more ahead)
    once = [b for b in range(len(kept.blocks)) if reads.count(b) == 1]
    kept_bytes = sum(len(kept.blocks[b].rows) * 16 for b in once)
    assert once and kept_bytes == cache.used <= cache.budget
    assert cache.budget - cache.used < block_bytes  # a full block would not have fit
    assert all(reads.count(b) >= 3 for b in range(len(kept.blocks)) if b not in once)
    # a subset of a kept block's rows comes from memory too
    some = np.array([1, 2])
    want = plain.decode(once[0], some)
    before = len(reads)
    assert torch.equal(kept.decode(once[0], some), want) and len(reads) == before


def test_a_selected_shard_changed_since_balancing_wrote_it_is_refused(tmp_path, monkeypatch):
    unlabelled = str(tmp_path / "unlabelled")
    _write_split(unlabelled, dataset.UNLABELLED, 6, [None] * 6, monkeypatch)
    selected = tmp_path / "selected"
    _write_selected(str(selected), ["unlabelled001", "unlabelled004"], [1, 2])
    shard = selected / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-8] + b"tampered")
    with pytest.raises(UserError, match=r"part-00000.parquet: checksum does not match .*_manifest"):
        training_data.pseudo_labelled_rows(str(selected), dataset.read_manifest(unlabelled))
    shard.unlink()
    with pytest.raises(UserError, match=r"part-00000.parquet: named in .*_manifest.json, but miss"):
        training_data.pseudo_labelled_rows(str(selected), dataset.read_manifest(unlabelled))
