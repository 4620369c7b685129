"""Top-k predictions for image files, from any trained model of the pipeline or from a
timm model by name (`timm:NAME`, ImageNet classes), each fed as it was trained."""

from __future__ import annotations

import io
import math

import numpy as np
import timm
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import ImageNetInfo, infer_imagenet_subset
from timm.data.transforms import str_to_interp_mode
from torch import nn
from torchvision.transforms.v2 import functional as tvf

from noisy_student.data import storage
from noisy_student.errors import UserError
from noisy_student.registry import model_ref
from noisy_student.training import engine, models


def class_names(model: nn.Module) -> list[str]:
    """The names of a timm model's pretrained classes (timm ships ImageNet's), else their
    indices."""
    subset = infer_imagenet_subset(model)
    if subset is not None:
        names = ImageNetInfo(subset).label_descriptions()
        if len(names) == model.num_classes:
            # "tench, Tinca tinca": the first of WordNet's names reads best in a list
            return [n.split(",")[0] for n in names]
    return [str(i) for i in range(model.num_classes)]


def load_timm(name: str, checkpoint: str | None = None) -> tuple[nn.Module, models.ModelMeta]:
    """A timm model with its pretrained weights, from `checkpoint` (safetensors, .pth or
    .bin; any fsspec URL) or else timm's hub, with its own input size, interpolation,
    centre crop, mean and std (timm's data config)."""
    net = models.create_timm(name, pretrained=True, checkpoint=checkpoint)
    cfg = timm.data.resolve_data_config({}, model=net)
    chans, height, width = cfg["input_size"]
    models.set_options(net, models.pretrained_options(net, chans, "imagenet"))
    o = models.options_of(net)
    meta = models.ModelMeta(
        name,
        net.num_classes,
        chans,
        class_names(net),
        height,
        width,
        "RGB" if chans == 3 else "L",
        o.stem,
        o.mean,
        o.std,
        o.interpolation,
        cfg["crop_pct"],
    )
    return net.eval(), meta


def load_model(ref: str, checkpoint: str | None = None) -> tuple[nn.Module, models.ModelMeta]:
    parsed = model_ref.parse(ref)
    if parsed.kind == "timm":
        return load_timm(parsed.name, checkpoint)
    if checkpoint:
        raise UserError(f"--checkpoint is for --model {model_ref.TIMM}NAME, not {ref}")
    model, meta = models.load(model_ref.checkpoint_url(ref, "--model"))
    return model.eval(), meta


def load_image(path: str, meta: models.ModelMeta) -> torch.Tensor:
    """The image as the model's uint8 input (1 x C x H x W): resized whole to the input
    size as the pipeline's datasets are, or, for a model with timm's eval crop, resized
    to size / crop_pct and centre-cropped as timm evaluates ImageNet models."""
    try:
        data = storage.read_bytes(storage.resolve(path))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    return image_tensor(data, meta, path)


def image_tensor(data: bytes, meta: models.ModelMeta, where: str) -> torch.Tensor:
    """Encoded image bytes as the model's 1 x C x H x W uint8 input; `where` names the image
    in an error."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{where}: corrupt image: {e}") from None
    img = img.convert(meta.mode)
    mode = str_to_interp_mode(meta.interpolation)
    if meta.crop_pct is not None:
        scale = math.floor(min(meta.height, meta.width) / meta.crop_pct)
        img = tvf.center_crop(tvf.resize(img, scale, mode), [meta.height, meta.width])
    elif img.size != (meta.width, meta.height):
        img = tvf.resize(img, [meta.height, meta.width], mode)
    arr = np.asarray(img)
    arr = arr[..., None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0)


def top_k(
    model: nn.Module, meta: models.ModelMeta, path: str, k: int = 5
) -> list[tuple[str, float]]:
    probs = engine.predict_probs(model, load_image(path, meta), batch_size=1)[0]
    values, indices = probs.topk(min(k, len(probs)))
    return [(meta.class_names[i], float(v)) for v, i in zip(values, indices.tolist(), strict=True)]
