"""Which unlabelled images a human should label next, and the files annotators open.

After a run, the final student has scored every unlabelled image and its teacher has
labelled the same images; a label is worth most where they are unsure. The strategies
(`labelling.strategy`), each a priority per image, highest first:

- `least_confident`: the student's top probability is lowest (1 - max p).
- `margin`: the gap between the student's two most probable classes is smallest
  (1 - (p1 - p2)); unlike least confident, it ignores how the rest of the mass spreads.
- `disagreement`: the teacher's and the student's distributions differ most (their total
  variation distance, 0.5 * sum |p - q|: 1 when they put their mass on different classes);
  images both are sure of tie at 0 and go by margin.
- `balanced`: the three above averaged (each scaled to [0, 1]), taken round-robin over the
  student's predicted classes: every class's most uncertain image, then every class's
  second, ... so that no pair of confusable classes fills the whole queue.
- `random`: uniform, seeded: the control every other strategy must beat.

Scores come shard by shard and only the best candidates are kept (`Candidates`), so the
queue of a pool of any size needs memory for `queue_size` rows per class, not the pool.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from typing import Any, Literal, get_args
from xml.sax.saxutils import quoteattr

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont

from noisy_student.data import storage

Strategy = Literal["least_confident", "margin", "disagreement", "balanced", "random"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
TOP_CLASSES = 3  # the model's guesses shown per image
ANNOTATOR_MIN_SIDE = 192  # smaller images are shown enlarged (nearest) to annotators
# our id in a Label Studio task's `data` (its own `id` is its task number): it comes back
# in the export, where `annotations` reads it
TASK_ID_KEY = "image_id"
FILES = {
    "parquet": "queue.parquet",
    "label_studio": "label_studio_tasks.json",
    "label_config": "label_studio_config.xml",
    "csv": "queue.csv",
    "contact_sheet": "contact_sheet.png",
}
IMAGES = "images"  # the queue's images as files, for the CSV


def scores(probs: np.ndarray, teacher_probs: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per image (rows of `probs`, the student's class probabilities): its confidence, the
    margin between its top two classes, and (with the teacher's probabilities of the same
    images; NaN rows where the teacher did not label one) the total variation distance."""
    top2 = -np.partition(-probs, 1, axis=1)[:, :2]
    confidence, margin = top2[:, 0], top2[:, 0] - top2[:, 1]
    if teacher_probs is None:
        distance = np.zeros(len(probs))
    else:
        distance = np.nan_to_num(0.5 * np.abs(probs - teacher_probs).sum(1), nan=0.0)
    return {"confidence": confidence, "margin": margin, "disagreement": distance}


def _uniform(ids: list[str], seed: int) -> np.ndarray:
    """A uniform draw per id, a function of (seed, id) alone: the same images are drawn
    however the pool is sharded."""
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest()) / 2**64
            for i in ids
        ]
    )


def priority(
    strategy: str, s: dict[str, np.ndarray], num_classes: int, ids: list[str], seed: int
) -> np.ndarray:
    """Higher is queued sooner."""
    uncertainty = (1 - s["confidence"]) / max(1 - 1 / num_classes, 1e-9)
    if strategy == "least_confident":
        return 1 - s["confidence"]
    if strategy == "margin":
        return 1 - s["margin"]
    if strategy == "disagreement":
        return s["disagreement"] + 1e-3 * (1 - s["margin"])
    if strategy == "balanced":
        return (uncertainty + (1 - s["margin"]) + s["disagreement"]) / 3
    if strategy == "random":
        return _uniform(ids, seed)
    raise ValueError(f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")


class Candidates:
    """The best images for the queue so far, fed shard by shard: the top `size` overall,
    or for `balanced` the top `size` of every predicted class."""

    def __init__(self, strategy: str, size: int, class_names: list[str], seed: int):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
        self.strategy, self.size, self.class_names, self.seed = strategy, size, class_names, seed
        self._kept: pd.DataFrame | None = None

    def add(
        self,
        ids: list[str],
        probs: np.ndarray,
        teacher_probs: np.ndarray | None,
        shard: int,
    ) -> None:
        """One shard's images: their ids, the student's and the teacher's probabilities
        (rows as `ids`), and the shard's index in the unlabelled split."""
        if not ids:
            return
        s = scores(probs, teacher_probs)
        k = len(self.class_names)
        order = np.argsort(-probs, axis=1)[:, :TOP_CLASSES]
        frame = pd.DataFrame(
            {
                "id": ids,
                "priority": priority(self.strategy, s, k, ids, self.seed),
                "predicted": order[:, 0],
                "top_classes": list(order),
                "top_probabilities": list(np.take_along_axis(probs, order, 1).astype(np.float32)),
                "confidence": s["confidence"],
                "margin": s["margin"],
                "disagreement": s["disagreement"],
                "teacher_predicted": (
                    teacher_probs.argmax(1) if teacher_probs is not None else np.full(len(ids), -1)
                ),
                "teacher_confidence": (
                    teacher_probs.max(1) if teacher_probs is not None else np.full(len(ids), np.nan)
                ),
                "shard": shard,
            }
        )
        if teacher_probs is not None:  # images the teacher did not label have no guess
            missing = np.isnan(teacher_probs).any(1)
            frame.loc[missing, "teacher_predicted"] = -1
        kept = frame if self._kept is None else pd.concat([self._kept, frame], ignore_index=True)
        self._kept = self._best(kept)

    def _best(self, frame: pd.DataFrame) -> pd.DataFrame:
        # ties broken by id, so the queue does not depend on the order shards arrive in
        frame = frame.sort_values(["priority", "id"], ascending=[False, True], kind="stable")
        if self.strategy == "balanced":
            return frame.groupby("predicted", sort=False).head(self.size)
        return frame.head(self.size)

    def queue(self) -> pd.DataFrame:
        """The queue, best first: rank, id, why it was chosen, the student's top classes
        and probabilities, the teacher's guess, the scores, and where the image is."""
        if self._kept is None:
            return _describe(self._kept_empty(), self.strategy, self.class_names)
        frame = self._kept
        if self.strategy == "balanced":
            # round-robin over the classes: every class's best, then every class's second...
            turn = frame.groupby("predicted", sort=False).cumcount()
            frame = frame.assign(turn=turn.to_numpy()).sort_values(
                ["turn", "priority", "id"], ascending=[True, False, True], kind="stable"
            )
            frame = frame.drop(columns="turn")
        return _describe(
            frame.head(self.size).reset_index(drop=True), self.strategy, self.class_names
        )

    def _kept_empty(self) -> pd.DataFrame:
        return pd.DataFrame(
            columns=["id", "priority", "predicted", "top_classes", "top_probabilities",
                     "confidence", "margin", "disagreement", "teacher_predicted",
                     "teacher_confidence", "shard"]
        )  # fmt: skip


def _reason(strategy: str, r: Any, names: list[str]) -> str:
    top = [names[c] for c in r.top_classes]
    p = r.top_probabilities
    teacher = names[r.teacher_predicted] if r.teacher_predicted >= 0 else None
    if strategy == "least_confident":
        return f"least confident: {top[0]} at {p[0]:.0%}"
    if strategy == "margin":
        second = f" and {top[1]} ({p[1]:.0%})" if len(top) > 1 else ""
        return f"margin {r.margin:.2f} between {top[0]} ({p[0]:.0%}){second}"
    if strategy == "disagreement":
        if teacher is None:
            return f"not labelled by the teacher; margin {r.margin:.2f}"
        if teacher != top[0]:
            return (
                f"teacher says {teacher} ({r.teacher_confidence:.0%}), "
                f"student {top[0]} ({p[0]:.0%})"
            )
        return f"both say {top[0]}; their distributions differ by {r.disagreement:.2f}"
    if strategy == "balanced":
        return f"among {top[0]}'s most uncertain: confidence {p[0]:.0%}, margin {r.margin:.2f}" + (
            f", teacher says {teacher}" if teacher not in (None, top[0]) else ""
        )
    return "drawn at random (the control)"


def _describe(frame: pd.DataFrame, strategy: str, names: list[str]) -> pd.DataFrame:
    out = frame.reset_index(drop=True)
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    out["strategy"] = strategy
    out["reason"] = [_reason(strategy, r, names) for r in out.itertuples()]
    out["model_class"] = [names[c] for c in out["predicted"]]
    out["top_classes"] = [[names[c] for c in row] for row in out["top_classes"]]
    out["teacher_class"] = [names[c] if c >= 0 else None for c in out["teacher_predicted"]]
    return out.drop(columns=["predicted", "teacher_predicted"])


# --- the files annotators open ---------------------------------------------------------


def for_annotators(image: bytes) -> tuple[bytes, str]:
    """An image as annotators see it: small ones enlarged by a whole factor with nearest
    neighbours (every pixel a square, nothing invented), the rest as stored. Returns the
    bytes and their MIME type."""
    img = Image.open(io.BytesIO(image))
    side = min(img.size)
    if side >= ANNOTATOR_MIN_SIDE:
        return image, Image.MIME[img.format]
    factor = -(-ANNOTATOR_MIN_SIDE // side)
    big = img.resize((img.width * factor, img.height * factor), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    return buf.getvalue(), "image/png"


def label_studio_config(class_names: list[str]) -> str:
    """The labelling interface of a Label Studio project for the queue: the image, one
    choice among the classes, the model's guess preselected (a prediction)."""
    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in class_names)
    return (
        "<View>\n"
        '  <Image name="image" value="$image" zoom="true"/>\n'
        '  <Text name="reason" value="$reason"/>\n'
        '  <Choices name="label" toName="image" choice="single" showInline="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>\n"
    )


def label_studio_tasks(
    queue: pd.DataFrame, shown: list[tuple[bytes, str]], model_version: str
) -> list[dict[str, Any]]:
    """One Label Studio task per queued image: the image as a data URI (nothing to serve),
    our id under `data.image_id` (it comes back in the export), and the student's top
    class as a prediction, preselected for the annotator to confirm or change."""
    tasks = []
    for r, (image, mime) in zip(queue.itertuples(), shown, strict=True):
        tasks.append(
            {
                "data": {
                    "image": f"data:{mime};base64,{base64.b64encode(image).decode()}",
                    TASK_ID_KEY: r.id,
                    "rank": int(r.rank),
                    "reason": r.reason,
                    "model_class": r.model_class,
                },
                "predictions": [
                    {
                        "model_version": model_version,
                        "score": float(r.confidence),
                        "result": [
                            {
                                "from_name": "label",
                                "to_name": "image",
                                "type": "choices",
                                "value": {"choices": [r.model_class]},
                            }
                        ],
                    }
                ],
            }
        )
    return tasks


def contact_sheet(
    queue: pd.DataFrame, images: list[bytes], title: str, columns: int = 20, thumb: int = 64
) -> bytes:
    """Thumbnails of the queue in rank order, each captioned with its rank, the model's
    guess and its confidence; as PNG bytes."""
    font = ImageFont.load_default(size=10)
    caption, pad, head = 24, 4, 22
    rows = max(1, -(-len(images) // columns))
    sheet = Image.new(
        "RGB",
        (pad + columns * (thumb + pad), head + rows * (thumb + caption + pad)),
        "white",
    )
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 4), title, fill="black", font=ImageFont.load_default(size=13))
    for k, (r, image) in enumerate(zip(queue.itertuples(), images, strict=True)):
        img = Image.open(io.BytesIO(image)).convert("RGB")
        if max(img.size) <= thumb // 2:  # small images grow by a whole factor, pixels kept
            f = thumb // max(img.size)
            img = img.resize((img.width * f, img.height * f), Image.Resampling.NEAREST)
        else:
            img.thumbnail((thumb, thumb), Image.Resampling.BILINEAR)
        x = pad + (k % columns) * (thumb + pad)
        y = head + (k // columns) * (thumb + caption + pad)
        sheet.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
        draw.text((x, y + thumb + 1), f"#{r.rank} {r.confidence:.0%}", fill="#555", font=font)
        draw.text((x, y + thumb + 12), str(r.model_class)[:12], fill="black", font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def write_files(
    queue: pd.DataFrame,
    images: list[bytes],
    encoding: str,
    class_names: list[str],
    out_url: str,
    title: str,
    model_version: str,
) -> dict[str, str]:
    """The queue as Parquet (the images' stored bytes included), a Label Studio import and
    its labelling config, a CSV whose `class` column annotators fill in (its images under
    images/), and a contact sheet. Returns each file's URL by kind; the Parquet file is
    written last, so its presence means the queue is complete."""
    urls = {kind: storage.join(out_url, name) for kind, name in FILES.items()}
    shown = [for_annotators(b) for b in images]
    image_files = [
        f"{IMAGES}/{r.rank:05d}.{'png' if mime == 'image/png' else 'jpg'}"
        for r, (_, mime) in zip(queue.itertuples(), shown, strict=True)
    ]
    for name, (data, _) in zip(image_files, shown, strict=True):
        storage.write_bytes(storage.join(out_url, name), data)
    tasks = label_studio_tasks(queue, shown, model_version)
    storage.write_bytes(urls["label_studio"], json.dumps(tasks).encode())
    storage.write_bytes(urls["label_config"], label_studio_config(class_names).encode())
    table = pd.DataFrame(
        {
            "id": queue["id"],
            "class": "",  # the annotator's answer: one of the class names
            "model_class": queue["model_class"],
            "model_confidence": queue["confidence"].round(4),
            "reason": queue["reason"],
            "image": image_files,
        }
    )
    storage.write_bytes(urls["csv"], table.to_csv(index=False).encode())
    storage.write_bytes(urls["contact_sheet"], contact_sheet(queue, images, title))
    parquet = pa.Table.from_pandas(queue.assign(image=images), preserve_index=False)
    parquet = parquet.replace_schema_metadata(
        {"noisy_student.encoding": encoding, "noisy_student.classes": json.dumps(class_names)}
    )
    storage.write_parquet(urls["parquet"], parquet, row_group_size=1024)
    return urls
