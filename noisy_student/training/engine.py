"""Training and inference loops: plain torch, no orchestration, no tracking.

One soft-target loss serves everything: labelled rows become one-hot (or smoothed)
targets and pseudo-labelled rows carry the teacher's distribution, so a batch mixing
both is one cross-entropy where every example weighs the same (as in the paper).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from noisy_student.data import training_data
from noisy_student.data.prefetch import compute_threads
from noisy_student.errors import UserError
from noisy_student.training import augment, distributed
from noisy_student.training.training_state import TrainingState

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


def resolved_precision(dev: torch.device, precision: str) -> str:
    """What a precision setting computes in on this device: "auto" is bf16 on a GPU and fp32
    on a CPU (`autocast` says why)."""
    if precision != "auto":
        return precision
    return "bf16" if dev.type == "cuda" else "fp32"


def autocast(dev: torch.device, precision: str) -> torch.autocast:
    """bfloat16 autocast where it pays: "auto" means bf16 on a GPU, fp32 on a CPU. On this
    project's AVX512-BF16 CPU bf16 is faster (`benchmarks.precision`) but cost the demo
    accuracy: its student 0.28 points on held-out images over five seeds (-0.77 to +0.22),
    its teacher 0.52 on test (`benchmarks.demo_recipe`, arm "precision: bf16"); see
    docs/models.md."""
    enabled = resolved_precision(dev, precision) == "bf16"
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=enabled)


def one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    targets = F.one_hot(labels, num_classes).float()
    return targets * (1.0 - smoothing) + smoothing / num_classes


def for_inference(model: nn.Module) -> nn.Module:
    """Eval mode (no dropout, no stochastic depth) and channels_last, once before a loop of
    `batch_probs` calls."""
    return model.eval().to(memory_format=torch.channels_last)


TTA = ("off", "flip")  # test-time augmentation of pseudo labels: none, or flip-averaged


@torch.inference_mode()
def batch_probs(
    model: nn.Module, images: torch.Tensor, precision: str = "auto", tta: str = "off"
) -> torch.Tensor:
    """Class probabilities (on the CPU) for one batch of uint8 images, from a model made
    ready by `for_inference`; with `tta="flip"` the mean of the image's and its mirror
    image's probabilities. The images travel as uint8, a quarter of the bytes of floats,
    asynchronously when they are in pinned memory. They take the model's channels_last
    layout as uint8, before the float conversion (which keeps it): at 96 px RGB that moves
    a quarter of the bytes, 10 ms a batch of 256 here against 36 for floats; batches
    decoded with `channels_last` are already laid out so."""
    compute_threads()  # per batch: the caller's thread may be new (a Prefect task's)
    dev = next(model.parameters()).device
    x = images.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with autocast(dev, precision):
        probs = model(augment.to_float(x)).float().softmax(1)
        if tta == "flip":
            mirrored = x.flip(-1).contiguous(memory_format=torch.channels_last)
            probs = (probs + model(augment.to_float(mirrored)).float().softmax(1)) / 2
    return probs.cpu()


def predict_probs(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int,
    precision: str = "auto",
    tta: str = "off",
) -> torch.Tensor:
    """Class probabilities for uint8 images, in eval mode: no dropout, no stochastic depth."""
    for_inference(model)
    out = [
        batch_probs(model, images[i : i + batch_size], precision, tta)
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0)


def right_answers(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    precision: str = "auto",
) -> torch.Tensor:
    """Whether the top-1 class is right, image by image in the batches' order, over
    (uint8 images, labels) batches judged one batch at a time: what a paired test needs."""
    for_inference(model)
    return torch.cat(
        [
            (batch_probs(model, images, precision).argmax(1) == labels).cpu()
            for images, labels in batches
        ]
    )


def accuracy(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    precision: str = "auto",
) -> float:
    """Top-1 accuracy over (uint8 images, labels) batches, judged one batch at a time: the
    exact ratio of right answers to images (in double precision, as results store it)."""
    right = right_answers(model, batches, precision)
    return int(right.sum()) / len(right)


# Schedule and Noise keep no defaults: the config schema (`config.TrainConfig`) is the one
# place a training setting has one, and `stages.train` passes each field through by name.
@dataclass(kw_only=True)
class Noise:
    """What perturbs the inputs during training (the model's own noise is in its layers)."""

    hflip: bool
    crop_padding: int
    rand_augment: augment.RandAugment | None  # None switches it off
    cutout: float  # a square of this fraction of the shorter side cut from every image

    def apply(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 batch in, the float batch the model sees out, on the batch's device."""
        ra = self.rand_augment
        # what uncovered and cut-out pixels get, from the clean images
        fill = augment.fill_values(x, ra.fill if ra else "border") if ra or self.cutout else None
        x = augment.crop_and_flip(x, self.crop_padding, self.hflip, generator)
        if ra is not None:
            x = augment.rand_augment(x, ra, generator, fill)
        if self.cutout:
            x = augment.cutout_every_image(x, self.cutout, fill, generator)
        return augment.to_float(x)


def noise_picture(noise: Noise, images: torch.Tensor, draws: int = 4, seed: int = 0) -> np.ndarray:
    """What the noise does to these uint8 images: the clean ones in the top row, under them
    `draws` noised versions each; an H x W (grey) or H x W x 3 uint8 array, for a PNG."""
    generator = torch.Generator().manual_seed(seed)
    noised = [noise.apply(images, generator).add(1).mul(127.5).round() for _ in range(draws)]
    rows = [images, *(x.clamp(0, 255).to(torch.uint8) for x in noised)]
    scale = max(1, 96 // images.shape[-1])  # small images drawn large enough to see
    picture = augment.grid(rows, scale).permute(1, 2, 0).numpy()
    return picture[..., 0] if picture.shape[-1] == 1 else picture


@dataclass(kw_only=True)
class Schedule:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    lr_schedule: str  # any of timm's create_scheduler_v2 names: cosine, step, ...
    lr_decay_epochs: float  # step schedule: decay every this many epochs ...
    lr_decay_rate: float  # ... by this factor (the paper's 0.97 every 2.4 epochs)
    warmup_epochs: float
    weight_averaging: str  # "ema", "swa" or "none": what is evaluated and returned
    ema_decay: float
    swa_start: float  # SWA: average the weights over the last steps after this fraction
    loss: str  # "soft_target" or "distillation": half CE on labels, half KL to the teacher
    distillation_temperature: float
    unlabelled_ratio: float
    eval_every: int
    precision: str  # autocast of forward passes: "auto", "bf16" or "fp32"


@dataclass
class FitResult:
    model: nn.Module  # the weight-averaged model, used for evaluation and labelling
    history: list[dict[str, float]] = field(default_factory=list)
    final_accuracy: float | None = None
    steps: int = 0
    seconds: float = 0.0
    resumed_from_step: int = 0  # 0: trained from the start
    decode_seconds: float = 0.0  # reading and decoding training rows (beside the steps)


def soft_target_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against class distributions; every row weighs the same."""
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


def distillation_loss(
    logits: torch.Tensor, targets: torch.Tensor, labelled: int, temperature: float
) -> torch.Tensor:
    """Half cross-entropy on the first `labelled` rows (true labels), half KL divergence from
    the teacher's distribution to the student's on the other rows, both softened by the
    temperature (scaled by T^2 so gradients keep their size, as in Hinton et al. 2015)."""
    ce = soft_target_loss(logits[:labelled], targets[:labelled])
    if labelled == len(logits):
        return ce
    t = temperature
    teacher = targets[labelled:].clamp_min(1e-12).log().div(t).log_softmax(-1)
    student = logits[labelled:].div(t).log_softmax(-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean") * t * t
    return 0.5 * ce + 0.5 * kl


class _Averager:
    """The weights that get evaluated and returned: an EMA (updated every step), SWA (a plain
    mean of the last steps' weights, batch-norm statistics recomputed at the end) or none."""

    def __init__(self, model: nn.Module, schedule: Schedule, total_steps: int):
        self.kind = schedule.weight_averaging
        self.swa_from = int(schedule.swa_start * total_steps)
        if self.kind == "ema":
            self.averaged = ModelEmaV3(model, decay=schedule.ema_decay, use_warmup=True)
        elif self.kind == "swa":
            self.averaged = torch.optim.swa_utils.AveragedModel(model, use_buffers=False)
        else:
            self.averaged = None
        self.model = model

    @property
    def module(self) -> nn.Module:
        return self.model if self.averaged is None else self.averaged.module

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.averaged is None else self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.averaged is not None:
            self.averaged.load_state_dict(state)

    def update(self, step: int) -> None:
        if self.kind == "ema":
            self.averaged.update(self.model, step=step)
        elif self.kind == "swa" and step > self.swa_from:
            self.averaged.update_parameters(self.model)

    def finish(self, batches: Callable[[], Iterator[torch.Tensor]]) -> None:
        if self.kind == "swa":
            # the averaged weights never ran forward: their batch-norm statistics are stale
            torch.optim.swa_utils.update_bn(batches(), self.averaged.module)


LossFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def loss_function(schedule: Schedule) -> LossFn:
    """The loss of (logits, targets, how many rows are labelled, first), chosen once."""
    if schedule.loss == "distillation":
        t = schedule.distillation_temperature
        return lambda logits, targets, labelled: distillation_loss(logits, targets, labelled, t)
    return lambda logits, targets, labelled: soft_target_loss(logits, targets)


@dataclass
class _Progress:
    step: int = 0
    loss_sum: float = 0.0  # over the epoch so far
    seen: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class _Trainer:
    """One training step: noise, forward, loss, backward, update, average."""

    model: nn.Module  # the plain module, whose weights are saved
    trained: nn.Module  # what runs forward: the module, or DDP around it under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: Any
    averager: _Averager
    loss: LossFn
    noise: Noise
    generator: torch.Generator  # every input-noise draw
    precision: str

    def step(self, progress: _Progress, x: torch.Tensor, y: torch.Tensor, labelled: int) -> None:
        x = self.noise.apply(x, self.generator).contiguous(memory_format=torch.channels_last)
        with autocast(x.device, self.precision):
            logits = self.trained(x).float()
        loss = self.loss(logits, y, labelled)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        progress.step += 1
        if self.scheduler is not None:
            self.scheduler.step_update(progress.step)
        self.averager.update(progress.step)
        progress.loss_sum += loss.item() * len(x)
        progress.seen += len(x)


class _Checkpoint:
    """Everything that decides the next step, as one saved state (`snapshot`) and back
    (`restore`), and the points where `state` saves it and where the resume tests stop a
    run. Rank 0 alone saves; without a `state` nothing is saved."""

    def __init__(
        self,
        state: TrainingState | None,
        trainer: _Trainer,
        progress: _Progress,
        streams: dict[str, training_data.Stream],
    ):
        self.state, self.trainer, self.progress, self.streams = state, trainer, progress, streams
        self.active = state is not None and distributed.is_main()

    def snapshot(self) -> dict[str, Any]:
        t, p = self.trainer, self.progress
        return {
            "step": p.step,
            "epoch_loss_sum": p.loss_sum,
            "epoch_seen": p.seen,
            "history": p.history,
            "model": t.model.state_dict(),
            "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict() if t.scheduler is not None else None,
            "averaged": t.averager.state_dict(),
            "streams": {k: v.state_dict() for k, v in self.streams.items()},
            "rng": {
                "torch": torch.get_rng_state(),
                "noise": t.generator.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        }

    def restore(self) -> bool:
        """Picks up the saved state, if there is one of this run; returns whether it did."""
        saved = self.state.load() if self.state is not None else None
        if saved is None:
            return False
        t, p = self.trainer, self.progress
        p.step, p.loss_sum, p.seen = saved["step"], saved["epoch_loss_sum"], saved["epoch_seen"]
        p.history = saved["history"]
        t.model.load_state_dict(saved["model"])
        t.optimizer.load_state_dict(saved["optimizer"])
        if t.scheduler is not None:
            t.scheduler.load_state_dict(saved["scheduler"])
        t.averager.load_state_dict(saved["averaged"])
        for k, v in saved["streams"].items():
            self.streams[k].load_state_dict(v)
        torch.set_rng_state(saved["rng"]["torch"])
        t.generator.set_state(saved["rng"]["noise"])
        if saved["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        return True

    def after_step(self, epoch_end: bool) -> None:
        if self.active:
            if not epoch_end:  # the end of an epoch is saved after its evaluation
                self.state.maybe_save(self.snapshot, self.progress.step, False, False)
            self.state.kill_point(f"step={self.progress.step}")

    def after_epoch(self, epoch: int, last: bool) -> None:
        if self.active:
            self.state.maybe_save(self.snapshot, self.progress.step, True, last)
            self.state.kill_point(f"epoch={epoch}")


def _optimizer_and_scheduler(
    model: nn.Module, schedule: Schedule, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, Any]:
    optimizer = create_optimizer_v2(
        model,
        "sgd",
        lr=schedule.lr,
        weight_decay=schedule.weight_decay,
        momentum=0.9,
        foreach=True,  # one fused update over all parameters; torch only defaults to it on GPU
    )
    total_steps = steps_per_epoch * schedule.epochs
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=schedule.lr_schedule,
        num_epochs=schedule.epochs,
        decay_epochs=schedule.lr_decay_epochs,
        decay_rate=schedule.lr_decay_rate,
        warmup_epochs=min(schedule.warmup_epochs, schedule.epochs * (1 - 1 / total_steps)),
        warmup_lr=schedule.lr * 0.01,
        min_lr=0.0,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    return optimizer, scheduler


class _Batches:
    """Each step's batch: this rank's part of the labelled rows, then of the pseudo-labelled
    ones, read ahead and copied to the device (asynchronously from pinned memory on CUDA)."""

    def __init__(
        self, streams: dict[str, training_data.Stream], sizes: dict[str, int], dev: torch.device
    ):
        pin = dev.type == "cuda"
        self.dev = dev
        self.feeds = [training_data.Feed(s, sizes[k], pin_memory=pin) for k, s in streams.items()]

    def next(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(images, targets, how many of the rows are labelled: the first ones)."""
        parts = []
        for feed in self.feeds:
            x, y = feed.next_batch()
            x, y = distributed.local_part(x), distributed.local_part(y)
            parts.append((x.to(self.dev, non_blocking=True), y.to(self.dev, non_blocking=True)))
        labelled = len(parts[0][0])
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]), labelled

    def close(self) -> None:
        for feed in self.feeds:
            feed.close()


def fit(
    model: nn.Module,
    labelled: training_data.Rows,
    schedule: Schedule,
    noise: Noise,
    seed: int,
    pseudo: training_data.Rows | None = None,
    evaluation: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    on_epoch: EpochCallback | None = None,
    state: TrainingState | None = None,
) -> FitResult:
    """Train on the labelled rows, plus pseudo-labelled ones when given; `evaluation` gives
    (images, labels) batches to judge epochs on, read afresh on every pass.

    An epoch is one pass over the pseudo-labelled rows when there are any, the labelled
    ones cycled beside them (`_streams`), else over the labelled rows; both stream block by
    block in a new seeded order every epoch (`training_data`).

    With a `state`, everything that decides the next step (weights, optimizer, averaged
    weights, scheduler, stream positions, random generators) is saved as `state` says
    (after epochs, every N steps, at the end), and a saved state is picked up first: on the
    same device, a run resumed from it ends with the same weights as one never stopped.

    Under torchrun every rank draws the same global batches and trains on its own slice
    of each (DistributedDataParallel averages the gradients), so N ranks take the steps
    one process would with the same batch size. Only rank 0 evaluates and reports.
    """
    compute_threads()
    main = distributed.is_main()
    # Noise differs between ranks (rank 0 draws what a single process would); the order of
    # the data does not: the streams below share the seed on every rank.
    noise_seed = seed + 1_000_003 * distributed.rank()
    torch.manual_seed(noise_seed)  # dropout and stochastic depth draw from the global generator
    streams, sizes, steps_per_epoch = _streams(labelled, pseudo, schedule, seed)
    trainer = _trainer(model, schedule, noise, noise_seed, steps_per_epoch)
    progress = _Progress()
    checkpoint = _Checkpoint(state, trainer, progress, streams)
    resumed = checkpoint.restore()
    result = FitResult(trainer.averager.module, resumed_from_step=progress.step if resumed else 0)
    start = time.perf_counter()
    batches = _Batches(streams, sizes, device())  # reads ahead from here on
    try:
        for epoch in range(progress.step // steps_per_epoch + 1, schedule.epochs + 1):
            epoch_start = _epoch(trainer, progress, batches, checkpoint, epoch * steps_per_epoch)
            last = epoch == schedule.epochs
            if last:
                trainer.averager.finish(
                    lambda: _clean_batches(streams.values(), 4 * sizes["labelled"])
                )
            judged = main and evaluation is not None and (epoch % schedule.eval_every == 0 or last)
            metrics = _epoch_metrics(progress, trainer, epoch_start, evaluation if judged else None)
            if last:
                result.final_accuracy = metrics.get("test_accuracy")
            progress.history.append({"epoch": epoch, **metrics})
            if on_epoch is not None and main:
                on_epoch(epoch, metrics)
            checkpoint.after_epoch(epoch, last)
    finally:
        batches.close()
    return _finished(result, progress, trainer, streams, time.perf_counter() - start)


def _streams(
    labelled: training_data.Rows,
    pseudo: training_data.Rows | None,
    schedule: Schedule,
    seed: int,
) -> tuple[dict[str, training_data.Stream], dict[str, int], int]:
    """The labelled stream and the pseudo-labelled one (when given), each one's rows per
    batch, and the steps of an epoch: one pass over the pseudo-labelled rows when there
    are any, else over the labelled ones."""
    sizes = {"labelled": schedule.batch_size}
    streams = {"labelled": training_data.Stream(labelled, seed)}
    if pseudo is not None and pseudo.items:
        sizes["pseudo"] = max(1, round(schedule.batch_size * schedule.unlabelled_ratio))
        streams["pseudo"] = training_data.Stream(pseudo, seed + 1)
    by = "pseudo" if "pseudo" in streams else "labelled"  # what an epoch is one pass over
    ranks = distributed.world_size()
    if any(n % ranks for n in sizes.values()):
        # an uneven split would weigh the smaller slices' images more in the averaged gradient
        raise UserError(
            f"batch_size {sizes['labelled']} (+{sizes.get('pseudo', 0)} pseudo-labelled) does "
            f"not split evenly over {ranks} processes"
        )
    return streams, sizes, math.ceil(streams[by].items / sizes[by])


def _trainer(
    model: nn.Module, schedule: Schedule, noise: Noise, noise_seed: int, steps_per_epoch: int
) -> _Trainer:
    # channels_last: +22% training images/s for resnet18 at 28 px on this CPU, and the
    # layout tensor cores want on GPUs
    model.to(device(), memory_format=torch.channels_last)
    optimizer, scheduler = _optimizer_and_scheduler(model, schedule, steps_per_epoch)
    return _Trainer(
        model=model,
        # DDP copies rank 0's weights to every rank, then all-reduces gradients in backward
        trained=DistributedDataParallel(model) if distributed.world_size() > 1 else model,
        optimizer=optimizer,
        scheduler=scheduler,
        averager=_Averager(model, schedule, steps_per_epoch * schedule.epochs),
        loss=loss_function(schedule),
        noise=noise,
        generator=torch.Generator().manual_seed(noise_seed),  # every input-noise draw
        precision=schedule.precision,
    )


def _epoch(
    trainer: _Trainer,
    progress: _Progress,
    batches: _Batches,
    checkpoint: _Checkpoint,
    last_step: int,
) -> float:
    """The steps of one epoch (from where a resumed run left off); returns when it began."""
    trainer.trained.train()
    epoch_start = time.perf_counter()
    while progress.step < last_step:
        trainer.step(progress, *batches.next())
        checkpoint.after_step(epoch_end=progress.step == last_step)
    return epoch_start


def _finished(
    result: FitResult,
    progress: _Progress,
    trainer: _Trainer,
    streams: dict[str, training_data.Stream],
    seconds: float,
) -> FitResult:
    result.history = progress.history
    if result.history and result.final_accuracy is None:
        # resumed from the state saved after the last epoch: nothing left to train
        result.final_accuracy = result.history[-1].get("test_accuracy")
    result.steps = progress.step
    result.seconds = seconds
    result.decode_seconds = sum(s.rows.decode_seconds for s in streams.values())
    averaged = trainer.averager.module
    result.model = averaged.eval().cpu().to(memory_format=torch.contiguous_format)
    return result


def _epoch_metrics(
    progress: _Progress,
    trainer: _Trainer,
    epoch_start: float,
    evaluation: Iterable[tuple[torch.Tensor, torch.Tensor]] | None,
) -> dict[str, float]:
    """The epoch's loss, last lr and speed (the sums start again from zero), and its
    accuracy on `evaluation` when given."""
    loss_sum, seen = progress.loss_sum, progress.seen
    progress.loss_sum, progress.seen = 0.0, 0
    if distributed.world_size() > 1:  # the epoch's figures over the global batches
        loss_sum, seen = distributed.sum_over_ranks(loss_sum, seen)
    metrics = {
        "train_loss": loss_sum / seen,
        "lr": trainer.optimizer.param_groups[0]["lr"],
        "images_per_second": seen / (time.perf_counter() - epoch_start),
    }
    if evaluation is not None:
        metrics["test_accuracy"] = accuracy(trainer.averager.module, evaluation, trainer.precision)
    return metrics


def _clean_batches(
    streams: Iterable[training_data.Stream], batch_size: int, limit: int = 8192
) -> Iterator[torch.Tensor]:
    """Up to `limit` un-augmented training images, for recomputing batch-norm statistics."""
    dev = device()
    rows = [s.rows for s in streams]
    for images in training_data.clean_batches(rows, batch_size, limit):
        yield augment.to_float(images.to(dev)).contiguous(memory_format=torch.channels_last)
