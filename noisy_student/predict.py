"""Top-k predictions for image files, from any trained model of the pipeline."""

from __future__ import annotations

import io
import re

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from noisy_student import engine, models, storage, tracking
from noisy_student.errors import UserError

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def checkpoint_url(ref: str) -> str:
    """A checkpoint folder for a model reference: an MLflow run id (or runs:/ID), a
    registered model (models:/...), or a stage's checkpoint URL."""
    if ref.startswith("models:/"):
        try:
            return tracking.download_model(tracking.resolve_registered(ref))
        except Exception as e:
            raise UserError(f"--model {ref}: {e}") from None
    run = ref.removeprefix("runs:/").split("/")[0] if ref.startswith("runs:/") else ref
    if RUN_ID.match(run):
        try:
            return tracking.download_model(run)
        except Exception as e:
            raise UserError(f"--model {ref}: no model in MLflow run ({e})") from None
    url = storage.resolve(ref)
    if url.endswith(models.WEIGHTS) or url.endswith(models.META):
        url = url.rsplit("/", 1)[0]
    if not storage.exists(storage.join(url, models.META)):
        raise UserError(f"--model {ref}: not an MLflow run id, registered model or checkpoint")
    return url


def load_model(ref: str) -> tuple[nn.Module, models.ModelMeta]:
    model, meta = models.load(checkpoint_url(ref))
    return model.eval(), meta


def load_image(path: str, meta: models.ModelMeta) -> torch.Tensor:
    try:
        img = Image.open(io.BytesIO(storage.read_bytes(storage.resolve(path))))
        img.load()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path}: corrupt image: {e}") from None
    img = img.convert(meta.mode)
    if img.size != (meta.width, meta.height):
        img = img.resize((meta.width, meta.height), Image.Resampling.BILINEAR)
    arr = np.asarray(img)
    arr = arr[..., None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0)


def top_k(
    model: nn.Module, meta: models.ModelMeta, path: str, k: int = 5
) -> list[tuple[str, float]]:
    probs = engine.predict_probs(model, load_image(path, meta), batch_size=1)[0]
    values, indices = probs.topk(min(k, len(probs)))
    return [(meta.class_names[i], float(v)) for v, i in zip(values, indices.tolist(), strict=True)]
