"""Training and inference loops: plain torch, no orchestration, no tracking.

One soft-target loss serves everything: labelled rows become one-hot (or smoothed)
targets and pseudo-labelled rows carry the teacher's distribution, so a batch mixing
both is one cross-entropy where every example weighs the same (as in the paper).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn

from noisy_student import augment

EpochCallback = Callable[[int, dict[str, float]], None]


def flush_denormals() -> None:
    """Treat denormal floats as zero. Weights and gradients drift into denormals as training
    goes on, and x86 CPUs process those at a fraction of full speed: flushing took a
    resnet18 student step from 442 to 569 images/s here. The flag lives in each thread's
    FPU state and threads copy it when they are created, so call this first thing in a
    process, before torch starts its worker threads."""
    torch.set_flush_denormal(True)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(dev: torch.device, precision: str) -> torch.autocast:
    """bfloat16 autocast where it pays. "auto" means bf16 on CUDA and fp32 on CPU: on this
    project's AVX512-BF16 CPU, bf16 training steps swung between 0.1x and 1.5x of fp32's
    speed from one batch to the next, while fp32 held steady."""
    enabled = precision == "bf16" or (precision == "auto" and dev.type == "cuda")
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=enabled)


def one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    targets = F.one_hot(labels, num_classes).float()
    return targets * (1.0 - smoothing) + smoothing / num_classes


@torch.inference_mode()
def predict_probs(
    model: nn.Module, images: torch.Tensor, batch_size: int, precision: str = "auto"
) -> torch.Tensor:
    """Class probabilities for uint8 images, in eval mode: no dropout, no stochastic depth."""
    model.eval()
    dev = next(model.parameters()).device
    model.to(memory_format=torch.channels_last)
    out = []
    for i in range(0, len(images), batch_size):
        x = augment.to_float(images[i : i + batch_size].to(dev))
        with autocast(dev, precision):
            logits = model(x.contiguous(memory_format=torch.channels_last))
        out.append(logits.float().softmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0)


def accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    precision: str = "auto",
) -> float:
    probs = predict_probs(model, images, batch_size, precision)
    return (probs.argmax(1) == labels).float().mean().item()


def _shuffled(n: int, generator: torch.Generator) -> Iterator[int]:
    """Endless stream of indices, reshuffled on every pass."""
    while True:
        yield from torch.randperm(n, generator=generator).tolist()


def _take(stream: Iterator[int], k: int) -> torch.Tensor:
    return torch.tensor([next(stream) for _ in range(k)], dtype=torch.long)


@dataclass
class Noise:
    """What perturbs the inputs during training (the model's own noise is in its layers)."""

    hflip: bool = True
    crop_padding: int = 2
    rand_augment: str | None = None


@dataclass
class Schedule:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    ema_decay: float = 0.999
    unlabelled_ratio: float = 1.0
    eval_every: int = 1
    eval_batch_size: int = 1024
    precision: str = "auto"  # autocast of forward passes: "auto", "bf16" or "fp32"


@dataclass
class FitResult:
    model: nn.Module  # the weight-averaged model, used for evaluation and labelling
    history: list[dict[str, float]] = field(default_factory=list)
    final_accuracy: float | None = None
    steps: int = 0
    seconds: float = 0.0


def fit(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    schedule: Schedule,
    noise: Noise,
    seed: int,
    pseudo_images: torch.Tensor | None = None,
    pseudo_targets: torch.Tensor | None = None,
    eval_images: torch.Tensor | None = None,
    eval_labels: torch.Tensor | None = None,
    on_epoch: EpochCallback | None = None,
) -> FitResult:
    """Train on labelled (images, targets), plus pseudo-labelled ones when given.

    An epoch is one pass over the pseudo-labelled images when there are any (the
    labelled ones are cycled beside them, `unlabelled_ratio` pseudo per labelled image in
    every batch), otherwise one pass over the labelled images.
    """
    torch.manual_seed(seed)
    random.seed(seed)  # timm's RandAugment draws from `random` and numpy
    np.random.seed(seed)
    gen = torch.Generator().manual_seed(seed)

    labelled_batch = schedule.batch_size
    if pseudo_images is not None and len(pseudo_images):
        pseudo_batch = max(1, round(schedule.batch_size * schedule.unlabelled_ratio))
        steps_per_epoch = math.ceil(len(pseudo_images) / pseudo_batch)
        pseudo_stream = _shuffled(len(pseudo_images), gen)
    else:
        pseudo_batch = 0
        steps_per_epoch = math.ceil(len(images) / labelled_batch)
    labelled_stream = _shuffled(len(images), gen)
    total_steps = steps_per_epoch * schedule.epochs

    dev = device()
    # channels_last: +22% training images/s for resnet18 at 28 px on this CPU, and the
    # layout tensor cores want on GPUs
    model.to(dev, memory_format=torch.channels_last)
    channels, height = images.shape[1], images.shape[2]
    rand_augment = (
        augment.rand_augment(noise.rand_augment, height, channels) if noise.rand_augment else None
    )
    optimizer = create_optimizer_v2(
        model,
        "sgd",
        lr=schedule.lr,
        weight_decay=schedule.weight_decay,
        momentum=0.9,
        foreach=True,  # one fused update over all parameters; torch only defaults to it on GPU
    )
    warmup = min(int(schedule.warmup_epochs * steps_per_epoch), total_steps - 1)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=total_steps,
        lr_min=0.0,
        warmup_t=warmup,
        warmup_lr_init=schedule.lr * 0.01,
        t_in_epochs=False,
    )
    ema = ModelEmaV3(model, decay=schedule.ema_decay, use_warmup=True)
    criterion = SoftTargetCrossEntropy()
    result = FitResult(model=ema.module)
    start = time.perf_counter()
    step = 0
    for epoch in range(1, schedule.epochs + 1):
        model.train()
        epoch_start, loss_sum, seen = time.perf_counter(), 0.0, 0
        for _ in range(steps_per_epoch):
            idx = _take(labelled_stream, labelled_batch)
            x, y = images[idx], targets[idx]
            if pseudo_batch:
                pidx = _take(pseudo_stream, pseudo_batch)
                x = torch.cat([x, pseudo_images[pidx]])
                y = torch.cat([y, pseudo_targets[pidx]])
            if rand_augment is not None:
                x = rand_augment(x)
            x = augment.crop_and_flip(augment.to_float(x), noise.crop_padding, noise.hflip, gen)

            x = x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(dev, non_blocking=True)
            with autocast(dev, schedule.precision):
                logits = model(x)
            loss = criterion(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            ema.update(model, step=step)
            loss_sum += loss.item() * len(x)
            seen += len(x)

        metrics = {
            "train_loss": loss_sum / seen,
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_second": seen / (time.perf_counter() - epoch_start),
        }
        last = epoch == schedule.epochs
        if eval_images is not None and (epoch % schedule.eval_every == 0 or last):
            metrics["test_accuracy"] = accuracy(
                ema.module,
                eval_images,
                eval_labels,
                schedule.eval_batch_size,
                schedule.precision,
            )
            if last:
                result.final_accuracy = metrics["test_accuracy"]
        result.history.append({"epoch": epoch, **metrics})
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    result.steps = step
    result.seconds = time.perf_counter() - start
    ema.module.eval().cpu().to(memory_format=torch.contiguous_format)
    return result
