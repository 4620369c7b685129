"""timm models and their checkpoints.

A checkpoint is a folder holding `model.safetensors` (the weights; loading it runs no
code) and `model.json` (the timm name and what the data looked like), enough to rebuild
the model for inference or to initialise a student from it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from noisy_student import storage
from noisy_student.errors import UserError

WEIGHTS, META = "model.safetensors", "model.json"


@dataclass(frozen=True)
class ModelMeta:
    model: str
    num_classes: int
    in_chans: int
    class_names: list[str]
    height: int
    width: int
    mode: str

    @classmethod
    def for_data(cls, model: str, manifest: Any) -> ModelMeta:
        """The metadata of `model` trained on a dataset split (its `dataset.Manifest`)."""
        m = manifest
        return cls(model, m.num_classes, m.channels, m.class_names, m.height, m.width, m.mode)


def create(
    name: str,
    num_classes: int,
    in_chans: int,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    pretrained: bool = False,
    checkpoint: str | None = None,
) -> nn.Module:
    """timm.create_model with the data's channels and classes.

    With `pretrained` and a `checkpoint` URL, timm loads that file instead of the hub
    (offline), adapting the stem to `in_chans` and dropping a classifier of another size.
    """
    kwargs: dict = dict(
        num_classes=num_classes,
        in_chans=in_chans,
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
    )
    if not timm.is_model(name):
        raise UserError(f"unknown timm model {name!r}")
    if pretrained and checkpoint:
        with tempfile.TemporaryDirectory() as tmp:
            local = checkpoint
            if "://" in checkpoint:
                local = os.path.join(tmp, os.path.basename(checkpoint))
                with open(local, "wb") as f:
                    f.write(storage.read_bytes(checkpoint))
            elif not os.path.exists(checkpoint):
                raise UserError(f"{checkpoint}: pretrained checkpoint not found")
            return timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay={"file": local}, **kwargs
            )
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        raise UserError(f"{name}: {e}") from None


def save(model: nn.Module, meta: ModelMeta, url: str) -> str:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    storage.write_bytes(storage.join(url, WEIGHTS), save_safetensors(state))
    # Metadata last: a checkpoint folder without it is incomplete and never loaded.
    storage.write_json(storage.join(url, META), asdict(meta))
    return url


def load_meta(url: str) -> ModelMeta:
    meta_url = storage.join(url, META)
    if not storage.exists(meta_url):
        raise UserError(f"{url}: no checkpoint here ({META} missing)")
    return ModelMeta(**storage.read_json(meta_url))


def load_state(url: str) -> dict[str, torch.Tensor]:
    weights = storage.join(url, WEIGHTS)
    try:
        return load_safetensors(storage.read_bytes(weights))
    except FileNotFoundError:
        raise UserError(f"{weights}: checkpoint weights missing") from None
    except SafetensorError as e:
        raise UserError(f"{weights}: not a valid safetensors file ({e})") from None


def load(
    url: str, drop_rate: float = 0.0, drop_path_rate: float = 0.0
) -> tuple[nn.Module, ModelMeta]:
    meta = load_meta(url)
    model = create(meta.model, meta.num_classes, meta.in_chans, drop_rate, drop_path_rate)
    model.load_state_dict(load_state(url))
    return model, meta
