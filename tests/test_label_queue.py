"""The label queue: which unlabelled images each strategy picks, and the files annotators
open (Parquet, Label Studio tasks and config, CSV, contact sheet)."""

from __future__ import annotations

import base64
import csv
import io
import json
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from noisy_student.data import dataset, storage
from noisy_student.data.dataset_writer import encode_png
from noisy_student.labelling import label_queue
from noisy_student.labelling.label_queue import Candidates

CLASSES = ["cat", "dog", "bird"]


def _probs(rows: list[list[float]]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float32)


# Five images whose scores put each strategy's favourite somewhere else:
#   a: sure             b: two-way tie (margin 0)       c: flat (least confident)
#   d: teacher says dog, student says cat (disagreement)   e: fairly sure of bird
STUDENT = _probs(
    [
        [0.98, 0.01, 0.01],
        [0.50, 0.50, 0.00],
        [0.34, 0.33, 0.33],
        [0.70, 0.20, 0.10],
        [0.1, 0.1, 0.8],
    ]
)
TEACHER = _probs(
    [
        [0.98, 0.01, 0.01],
        [0.50, 0.50, 0.00],
        [0.34, 0.33, 0.33],
        [0.05, 0.90, 0.05],
        [0.1, 0.1, 0.8],
    ]
)
IDS = ["a", "b", "c", "d", "e"]


def _queue(strategy: str, size: int, shards: int = 1, seed: int = 0) -> pd.DataFrame:
    c = Candidates(strategy, size, CLASSES, seed)
    for part in np.array_split(np.arange(len(IDS)), shards):
        c.add([IDS[i] for i in part], STUDENT[part], TEACHER[part], 0)
    return c.queue()


@pytest.mark.parametrize(
    ("strategy", "first"),
    [("least_confident", "c"), ("margin", "b"), ("disagreement", "d")],
)
def test_each_uncertainty_strategy_puts_its_own_kind_of_image_first(strategy, first):
    queue = _queue(strategy, 5)
    assert queue["id"].iloc[0] == first
    assert queue["id"].iloc[-1] == "a" or strategy == "disagreement"
    assert queue["rank"].tolist() == [1, 2, 3, 4, 5]
    assert queue["strategy"].eq(strategy).all()


def test_disagreement_names_both_models_guesses_and_falls_back_to_margin_where_they_agree():
    queue = _queue("disagreement", 2)
    assert queue["id"].tolist() == ["d", "b"]  # b: both agree, the smallest margin
    assert queue["reason"].iloc[0] == "teacher says dog (90%), student cat (70%)"
    assert queue["teacher_class"].iloc[0] == "dog" and queue["model_class"].iloc[0] == "cat"


def test_a_queue_fed_shard_by_shard_is_the_queue_of_the_whole_pool():
    for strategy in label_queue.STRATEGIES:
        whole = _queue(strategy, 3, shards=1)
        pieces = _queue(strategy, 3, shards=3)
        assert whole["id"].tolist() == pieces["id"].tolist(), strategy


def test_random_draws_depend_on_the_seed_and_the_ids_only():
    rng = np.random.default_rng(0)
    ids = [f"img-{i}" for i in range(1000)]
    probs = rng.dirichlet(np.ones(3), size=1000).astype(np.float32)
    picks = []
    for order in (np.arange(1000), rng.permutation(1000)):
        c = Candidates("random", 50, CLASSES, seed=7)
        for part in np.array_split(order, 4):
            c.add([ids[i] for i in part], probs[part], None, 0)
        picks.append(set(c.queue()["id"]))
    assert picks[0] == picks[1]
    other = Candidates("random", 50, CLASSES, seed=8)
    other.add(ids, probs, None, 0)
    assert len(picks[0] & set(other.queue()["id"])) < 15  # 2.5 expected by chance


def test_balanced_takes_every_predicted_class_in_turn():
    rng = np.random.default_rng(1)
    # 90% of the pool predicted cat, and the cats are the least sure: the other
    # strategies would queue cats only
    probs = np.zeros((300, 3), np.float32)
    probs[:270, 0] = rng.uniform(0.34, 0.5, 270)
    probs[:270, 1] = 1 - probs[:270, 0]
    probs[:270, 1] = np.minimum(probs[:270, 1], probs[:270, 0] - 0.001)
    probs[:270, 2] = 1 - probs[:270, :2].sum(1)
    probs[270:285] = [0.05, 0.9, 0.05]
    probs[285:] = [0.05, 0.05, 0.9]
    ids = [f"i{k}" for k in range(300)]
    margin = Candidates("margin", 30, CLASSES, 0)
    margin.add(ids, probs, None, 0)
    assert set(margin.queue()["model_class"]) == {"cat"}
    balanced = Candidates("balanced", 30, CLASSES, 0)
    balanced.add(ids, probs, None, 0)
    queue = balanced.queue()
    assert queue["model_class"].value_counts().to_dict() == {"cat": 10, "dog": 10, "bird": 10}
    assert len(set(queue["model_class"].iloc[:3])) == 3  # every class's best first
    # a class with too few images gives its turns to the others
    short = Candidates("balanced", 40, CLASSES, 0)
    short.add(ids[:290], probs[:290], None, 0)  # 15 dogs, 5 birds
    assert short.queue()["model_class"].value_counts().to_dict() == {
        "cat": 20,
        "dog": 15,
        "bird": 5,
    }


def test_images_the_teacher_did_not_label_are_queued_without_a_teacher_guess():
    teacher = TEACHER.copy()
    teacher[3] = np.nan  # d joined the pool after the teacher labelled it
    c = Candidates("disagreement", 5, CLASSES, 0)
    c.add(IDS, STUDENT, teacher, 0)
    queue = c.queue().set_index("id")
    assert pd.isna(queue.loc["d", "teacher_class"])
    assert queue.loc["d", "disagreement"] == 0.0


def _written_queue(tmp_path, strategy: str = "margin") -> tuple[pd.DataFrame, list[bytes], dict]:
    rng = np.random.default_rng(2)
    arrays = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    images = [encode_png(a) for a in arrays]
    queue = _queue(strategy, 5)
    by_id = dict(zip(IDS, images, strict=True))
    ordered = [by_id[i] for i in queue["id"]]
    urls = label_queue.write_files(
        queue, ordered, "png", CLASSES, str(tmp_path / "q"), "a title", "run-x student 1"
    )
    return queue, ordered, urls


def test_the_parquet_queue_keeps_the_stored_image_bytes_and_every_score(tmp_path):
    queue, images, urls = _written_queue(tmp_path)
    table = pq.read_table(urls["parquet"])
    assert table.column("id").to_pylist() == queue["id"].tolist()
    assert table.column("image").to_pylist() == images
    assert table.column("top_classes").to_pylist()[0] == queue["top_classes"].iloc[0]
    for column in ("rank", "reason", "model_class", "confidence", "margin", "disagreement",
                   "teacher_class", "top_probabilities", "shard"):  # fmt: skip
        assert column in table.column_names
    assert json.loads(table.schema.metadata[b"noisy_student.classes"]) == CLASSES


def test_label_studio_tasks_carry_the_image_our_id_and_the_models_guess(tmp_path):
    queue, images, urls = _written_queue(tmp_path)
    tasks = json.loads(storage.read_bytes(urls["label_studio"]))
    assert [t["data"]["image_id"] for t in tasks] == queue["id"].tolist()
    first = tasks[0]
    header, payload = first["data"]["image"].split(",", 1)
    assert header == "data:image/png;base64"
    shown = Image.open(io.BytesIO(base64.b64decode(payload)))
    original = Image.open(io.BytesIO(images[0]))
    assert shown.size == (196, 196)  # 28 px enlarged 7x for the annotator, pixels kept
    assert np.array_equal(np.asarray(shown)[::7, ::7], np.asarray(original))
    (result,) = first["predictions"][0]["result"]
    assert result == {
        "from_name": "label",
        "to_name": "image",
        "type": "choices",
        "value": {"choices": [queue["model_class"].iloc[0]]},
    }
    assert first["predictions"][0]["model_version"] == "run-x student 1"
    # the config names the same controls and every class
    config = ET.fromstring(storage.read_bytes(urls["label_config"]))
    assert config.find("Image").get("name") == "image"
    choices = config.find("Choices")
    assert (choices.get("name"), choices.get("toName")) == ("label", "image")
    assert [c.get("value") for c in choices] == CLASSES


def test_class_names_with_xml_characters_survive_the_label_studio_config():
    names = ['a "quoted" <class>', "b & c"]
    config = ET.fromstring(label_queue.label_studio_config(names))
    assert [c.get("value") for c in config.find("Choices")] == names


def test_the_csv_has_an_empty_class_column_for_annotators_and_links_each_image(tmp_path):
    queue, images, urls = _written_queue(tmp_path)
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(urls["csv"]).decode())))
    assert [r["id"] for r in rows] == queue["id"].tolist()
    assert all(r["class"] == "" for r in rows)
    assert rows[0]["model_class"] == queue["model_class"].iloc[0]
    assert rows[0]["image"] == "images/00001.png"
    assert Image.open(tmp_path / "q" / rows[0]["image"]).size == (196, 196)


def test_the_contact_sheet_is_a_png_with_a_thumbnail_per_queued_image(tmp_path):
    queue, images, urls = _written_queue(tmp_path)
    sheet = Image.open(urls["contact_sheet"])
    assert sheet.format == "PNG"
    assert sheet.width >= 20 * 64  # 20 columns of 64 px thumbnails
    # the first thumbnail is the first image, enlarged 2x into its 64 px cell
    cell = np.asarray(sheet.convert("L"))[22 + 4 : 22 + 60, 4 + 4 : 4 + 60]
    first = np.asarray(Image.open(io.BytesIO(images[0])))
    assert np.array_equal(cell[::2, ::2], first)


def test_a_queue_of_a_real_dataset_names_the_shard_of_each_image(tiny_dataset):
    manifest = dataset.read_manifest(storage.join(tiny_dataset, dataset.UNLABELLED))
    c = Candidates("least_confident", 10, manifest.class_names, 0)
    rng = np.random.default_rng(3)
    for index in range(len(manifest.shards)):
        part = dataset.load_shard(manifest, index)
        c.add(part.ids, rng.dirichlet(np.ones(10), len(part)).astype(np.float32), None, index)
    queue = c.queue()
    assert len(queue) == 10
    for r in queue.itertuples():
        assert r.id in dataset.load_shard(manifest, r.shard).ids
