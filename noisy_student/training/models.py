"""timm models and their checkpoints.

A checkpoint is a folder holding `model.safetensors` (the weights; loading it runs no
code) and `model.json` (the timm name, what the data looked like, the stem setting and
the input normalisation): enough to rebuild and feed the same network for inference or
to initialise a student from it.

Every stage hands models images in [-1, 1] (`augment.to_float`). A network whose
pretrained weights were trained with another mean and std gets them through a forward
pre-hook that maps [-1, 1] to (x01 - mean) / std. The hook is part of the module (it
survives the EMA copy, DistributedDataParallel and `load`) and adds nothing to the state
dict; for the default mean = std = 0.5 there is none, so such networks compute exactly
what they did before it existed.

Every network `create` builds computes its convolutions on maps smaller than their kernels
without the taps that only see padding (`small_maps`): the same outputs and gradients,
faster where a 28-px image leaves the last stage 1x1 maps.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.regnet import RegNet
from timm.models.resnet import ResNet
from torch import nn

from noisy_student.data import storage
from noisy_student.errors import UserError
from noisy_student.training.small_maps import use_small_map_convs

WEIGHTS, META = "model.safetensors", "model.json"

# How much of timm's ImageNet downsampling the stem keeps (see `apply_stem`).
STEMS = ("imagenet", "half", "stride1")
DEFAULT_MEAN, DEFAULT_STD = (0.5,), (0.5,)  # [-1, 1] as it is: the identity
FAMILIES = "ResNet (and -T/-D), EfficientNet, MobileNetV3, RegNet, ConvNeXt"


@dataclass(frozen=True)
class Options:
    """How a network is built and fed beyond its timm name; recorded in model.json."""

    stem: str = "imagenet"
    mean: tuple[float, ...] = DEFAULT_MEAN
    std: tuple[float, ...] = DEFAULT_STD
    interpolation: str = "bilinear"  # how `predict` resizes a photo to the input size
    # further keyword arguments of timm.create_model (e.g. a ResNet's channels)
    model_kwargs: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class ModelMeta:
    model: str
    num_classes: int
    in_chans: int
    class_names: list[str]
    height: int
    width: int
    mode: str
    # The defaults are what checkpoints written before these fields existed were built with.
    stem: str = "imagenet"
    mean: tuple[float, ...] = DEFAULT_MEAN
    std: tuple[float, ...] = DEFAULT_STD
    interpolation: str = "bilinear"
    # timm's eval crop of ImageNet photos (resize to size / crop_pct, centre crop); None
    # resizes the whole image to the input size, as the datasets here are stored
    crop_pct: float | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        # JSON gives lists back: tuples keep the metadata comparable and hashable
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))

    @classmethod
    def for_data(cls, model: str, manifest: Any, network: nn.Module | None = None) -> ModelMeta:
        """The metadata of `model` trained on a dataset split (its `dataset.Manifest`),
        with the stem and normalisation `network` (made by `create`) was built with."""
        m = manifest
        o = options_of(network) if network is not None else Options()
        return cls(
            model,
            m.num_classes,
            m.channels,
            m.class_names,
            m.height,
            m.width,
            m.mode,
            o.stem,
            o.mean,
            o.std,
            o.interpolation,
            model_kwargs=o.model_kwargs,
        )

    @property
    def options(self) -> Options:
        return Options(self.stem, self.mean, self.std, self.interpolation, self.model_kwargs)


def options_of(network: nn.Module) -> Options:
    """The stem and normalisation a network made by `create` or `load` was built with."""
    return getattr(network, "noisy_student_options", Options())


# --- the stem


def _first_conv(module: nn.Module) -> nn.Conv2d:
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d))


def _stride1(conv: nn.Conv2d) -> None:
    # a 3x3 convolution padded by 1 (or timm's dynamic "same" padding) keeps the size
    conv.stride = (1, 1)


def apply_stem(model: nn.Module, name: str, stem: str) -> nn.Module:
    """Reduce the early downsampling of a timm network, in place; weights keep their shapes,
    so pretrained ones still load. `imagenet`: timm's stem. `half`: the stem downsamples
    2x less (ResNet drops its max-pool; EfficientNet, MobileNetV3 and RegNet run their
    stride-2 stem convolution at stride 1; ConvNeXt's 4x4 patches overlap at stride 2).
    `stride1`: no downsampling in the stem (ResNet's stem convolution at stride 1 too;
    ConvNeXt's patches at stride 1; the others as `half`)."""
    if stem not in STEMS:
        raise UserError(f"stem: {stem!r} is not one of {', '.join(STEMS)}")
    if stem == "imagenet":
        return model
    if isinstance(model, ResNet):
        if isinstance(model.maxpool, nn.MaxPool2d):
            model.maxpool = nn.Identity()
        elif isinstance(model.maxpool, nn.Sequential) and isinstance(model.maxpool[0], nn.Conv2d):
            _stride1(model.maxpool[0])  # replace_stem_pool: a stride-2 conv in the pool's place
        else:
            raise UserError(f"stem: {stem}: {name}'s stem pooling is not one this can remove")
        if stem == "stride1":
            _stride1(_first_conv(model.conv1))
    elif isinstance(model, EfficientNet | MobileNetV3):
        _stride1(model.conv_stem)
    elif isinstance(model, RegNet):
        _stride1(_first_conv(model.stem))
    elif isinstance(model, ConvNeXt):
        conv = _first_conv(model.stem)
        if conv.kernel_size != (4, 4) or conv.stride != (4, 4):
            raise UserError(f"stem: {stem}: {name}'s stem is not ConvNeXt's 4x4 patches")
        # padding 1 at stride 2 halves the size exactly; "same" keeps it at stride 1
        conv.stride, conv.padding = ((2, 2), (1, 1)) if stem == "half" else ((1, 1), "same")
    else:
        raise UserError(
            f"stem: {stem}: not available for {name} ({type(model).__name__}); it works for "
            f"{FAMILIES}; use stem: imagenet"
        )
    return model


def has_stem(name: str, stem: str) -> bool:
    """Whether `apply_stem` builds timm's `name` with `stem` (the network is made on the
    meta device: no weights are allocated, a fraction of a second)."""
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=2)
    try:
        apply_stem(model, name, stem)
    except UserError:
        return False
    return True


# --- normalisation


def pretrained_options(model: nn.Module, in_chans: int, stem: str) -> Options:
    """The mean, std and interpolation the model's pretrained weights were trained with
    (timm's data config), for `in_chans` channels. timm adapts an RGB stem to one channel
    by summing its filters, which equals feeding the grey image as three equal channels;
    one mean and std (the channels' averages) keep that exact for weights whose channels
    share them and within the channels' spread (about 2% of std for ImageNet's) otherwise."""
    cfg = timm.data.resolve_data_config({}, model=model)
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if len(mean) != in_chans:
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    return Options(stem, mean, std, cfg["interpolation"])


def _normalise(module: nn.Module, args: tuple) -> tuple:
    # [-1, 1] -> (x01 - mean) / std = x / (2 std) + (0.5 - mean) / std, per channel
    scale, shift = module.noisy_student_affine
    x = args[0]
    return (x * scale.to(x.device, x.dtype) + shift.to(x.device, x.dtype), *args[1:])


def set_options(model: nn.Module, options: Options) -> nn.Module:
    """Record `options` on the network and feed it their mean and std (in place)."""
    model.noisy_student_options = options
    if options.mean == DEFAULT_MEAN * len(options.mean) and options.std == DEFAULT_STD * len(
        options.std
    ):
        return model
    mean = torch.tensor(options.mean).view(1, -1, 1, 1)
    std = torch.tensor(options.std).view(1, -1, 1, 1)
    model.noisy_student_affine = (0.5 / std, (0.5 - mean) / std)
    model.register_forward_pre_hook(_normalise)
    return model


# --- building and loading


@contextmanager
def _local_file(checkpoint: str) -> Iterator[str]:
    """A pretrained weights file as a local path: remote URLs are copied to a temp file."""
    if "://" not in checkpoint:
        if not os.path.exists(checkpoint):
            raise UserError(f"{checkpoint}: pretrained checkpoint not found")
        yield checkpoint
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(checkpoint))
        try:
            data = storage.read_bytes(checkpoint)
        except FileNotFoundError:
            raise UserError(f"{checkpoint}: pretrained checkpoint not found") from None
        with open(local, "wb") as f:
            f.write(data)
        yield local


def _unknown_kwarg(error: TypeError) -> str | None:
    """The keyword a model's constructor refused, from its TypeError."""
    found = re.search(r"unexpected keyword argument '(\w+)'", str(error))
    return found.group(1) if found else None


def create_timm(
    name: str, pretrained: bool = False, checkpoint: str | None = None, **kwargs: Any
) -> nn.Module:
    """timm.create_model with one-line errors. With `pretrained` and a `checkpoint` (a
    local path or any fsspec URL; safetensors, .pth or .bin), timm loads that file instead
    of the hub (offline), adapting the stem to `in_chans` and dropping a classifier of
    another size; without a checkpoint it fetches the hub's weights as usual."""
    if not timm.is_model(name):
        raise UserError(f"unknown timm model {name!r}")
    try:
        if pretrained and checkpoint:
            with _local_file(checkpoint) as local:
                return timm.create_model(
                    name, pretrained=True, pretrained_cfg_overlay={"file": local}, **kwargs
                )
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except UserError:
        raise
    except TypeError as e:
        # a keyword the network's constructor does not take, or one of the wrong type
        unknown = _unknown_kwarg(e)
        if unknown is not None:
            raise UserError(f"model_kwargs.{unknown}: not a parameter of {name}") from None
        raise UserError(f"{name}: model_kwargs: {str(e).splitlines()[0]}") from None
    except (RuntimeError, OSError, ValueError) as e:
        # a hub that cannot be reached, a file of another architecture, a corrupt file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if checkpoint and pretrained:
            raise UserError(f"{name}: {checkpoint}: {first}") from None
        if pretrained:
            raise UserError(
                f"{name}: timm's hub: {first} (offline? name a local weights file as the "
                "checkpoint)"
            ) from None
        raise UserError(f"{name}: {first}") from None


def check_kwargs(name: str, model_kwargs: dict[str, Any]) -> None:
    """Raises the one-line UserError `create` would for these keyword arguments, building
    the network on the meta device (no weights are allocated)."""
    if model_kwargs:
        with torch.device("meta"):
            create_timm(name, num_classes=2, **model_kwargs)


def create(
    name: str,
    num_classes: int,
    in_chans: int,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    pretrained: bool = False,
    checkpoint: str | None = None,
    stem: str = "imagenet",
    options: Options | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """A timm model for the data's channels and classes, with the stem `stem`, timm's
    further `model_kwargs` and, with `pretrained`, the normalisation its weights were
    trained with. `options` (a checkpoint's) rebuilds a network exactly as it was,
    normalisation and keyword arguments included."""
    kwargs = dict(options.model_kwargs if options is not None else model_kwargs or {})
    model = create_timm(
        name,
        pretrained,
        checkpoint,
        num_classes=num_classes,
        in_chans=in_chans,
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
        **kwargs,
    )
    if options is None:
        options = pretrained_options(model, in_chans, stem) if pretrained else Options(stem)
        options = replace(options, model_kwargs=kwargs)
    apply_stem(model, name, options.stem)
    use_small_map_convs(model)  # the same network, faster on maps smaller than its kernels
    return set_options(model, options)


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
    try:
        return ModelMeta(**storage.read_json(meta_url))
    except TypeError as e:
        raise UserError(f"{meta_url}: not a checkpoint's metadata ({e})") from None


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
    model = create(
        meta.model,
        meta.num_classes,
        meta.in_chans,
        drop_rate,
        drop_path_rate,
        options=meta.options,
    )
    model.load_state_dict(load_state(url))
    return model, meta


def student_options(
    key: str,
    stem: str | None,
    init_from_teacher: bool,
    teacher_url: str,
    model_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`create`'s stem, keyword arguments and normalisation for a student of the teacher at
    `teacher_url`: the teacher's stem unless the student names its own (`key` is its config
    path), its own keyword arguments; a student started from the teacher's weights is built
    and fed as the teacher, with its own stem if it names one (a stem sets strides, not
    weight shapes: a half-stem student can start from a full-stem teacher)."""
    teacher = load_meta(teacher_url)
    stem = stem or teacher.stem
    if not init_from_teacher:
        return {"stem": stem, "model_kwargs": model_kwargs or {}}
    if model_kwargs and model_kwargs != teacher.model_kwargs:
        raise UserError(
            f"{key}.model_kwargs: {model_kwargs}, but init_from_teacher starts from a teacher "
            f"built with {teacher.model_kwargs or 'none'}"
        )
    return {"options": replace(teacher.options, stem=stem)}
