"""Training and inference loops: plain torch, no orchestration, no tracking.

One soft-target loss serves everything: labelled rows become one-hot (or smoothed)
targets and pseudo-labelled rows carry the teacher's distribution, so a batch mixing
both is one cross-entropy where every example weighs the same (as in the paper).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from noisy_student import augment, distributed
from noisy_student.errors import UserError
from noisy_student.training_state import TrainingState

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


def for_inference(model: nn.Module) -> nn.Module:
    """Eval mode (no dropout, no stochastic depth) and channels_last, once before a loop of
    `batch_probs` calls."""
    return model.eval().to(memory_format=torch.channels_last)


@torch.inference_mode()
def batch_probs(model: nn.Module, images: torch.Tensor, precision: str = "auto") -> torch.Tensor:
    """Class probabilities (on the CPU) for one batch of uint8 images, from a model made
    ready by `for_inference`. The images travel as uint8, a quarter of the bytes of floats,
    asynchronously when they are in pinned memory."""
    dev = next(model.parameters()).device
    x = augment.to_float(images.to(dev, non_blocking=True))
    with autocast(dev, precision):
        logits = model(x.contiguous(memory_format=torch.channels_last))
    return logits.float().softmax(1).cpu()


def predict_probs(
    model: nn.Module, images: torch.Tensor, batch_size: int, precision: str = "auto"
) -> torch.Tensor:
    """Class probabilities for uint8 images, in eval mode: no dropout, no stochastic depth."""
    for_inference(model)
    out = [
        batch_probs(model, images[i : i + batch_size], precision)
        for i in range(0, len(images), batch_size)
    ]
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


class IndexStream:
    """An endless stream of indices into n items, reshuffled on every pass. Its state is a
    seed, a pass count and a position, so a stopped run can pick up where it was."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def take(self, k: int) -> torch.Tensor:
        out = []
        while k:
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            chunk = self._order[self.position : self.position + k]
            self.position += len(chunk)
            k -= len(chunk)
            out.append(chunk)
        return torch.cat(out)

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.n, self.seed = state["n"], state["seed"]
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation()


@dataclass
class Noise:
    """What perturbs the inputs during training (the model's own noise is in its layers)."""

    hflip: bool = True
    crop_padding: int = 2
    rand_augment_ops: int = 0  # RandAugment's N; 0 switches it off
    rand_augment_magnitude: float = 9.0  # M, on the official code's scale (augment.py)
    rand_augment_magnitude_std: float = 0.0

    def apply(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 batch in, the float batch the model sees out, on the batch's device."""
        x = augment.crop_and_flip(x, self.crop_padding, self.hflip, generator)
        if self.rand_augment_ops:
            x = augment.rand_augment(
                x,
                self.rand_augment_ops,
                self.rand_augment_magnitude,
                generator,
                self.rand_augment_magnitude_std,
            )
        return augment.to_float(x)


@dataclass
class Schedule:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"  # any of timm's create_scheduler_v2 names: cosine, step, ...
    lr_decay_epochs: float = 2.4  # step schedule: decay every this many epochs ...
    lr_decay_rate: float = 0.97  # ... by this factor (the paper's 0.97 every 2.4 epochs)
    warmup_epochs: float = 1.0
    weight_averaging: str = "ema"  # "ema", "swa" or "none": what is evaluated and returned
    ema_decay: float = 0.999
    swa_start: float = 0.75  # SWA: average the weights over the last 25% of the steps
    loss: str = "soft_target"  # or "distillation": half CE on labels, half KL to the teacher
    distillation_temperature: float = 1.0
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
    resumed_from_step: int = 0  # 0: trained from the start


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

    def finish(self, batches: Iterator[torch.Tensor]) -> None:
        if self.kind == "swa":
            # the averaged weights never ran forward: their batch-norm statistics are stale
            torch.optim.swa_utils.update_bn(batches, self.averaged.module)


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
    state: TrainingState | None = None,
) -> FitResult:
    """Train on labelled (images, targets), plus pseudo-labelled ones when given.

    An epoch is one pass over the pseudo-labelled images when there are any (the
    labelled ones are cycled beside them, `unlabelled_ratio` pseudo per labelled image in
    every batch), otherwise one pass over the labelled images.

    With a `state`, everything that decides the next step (weights, optimizer, averaged
    weights, scheduler, index streams, random generators) is saved as `state` says (after
    epochs, every N steps, at the end), and a saved state is picked up first: on the same
    device, a run resumed from it ends with the same weights as one never stopped.

    Under torchrun every rank draws the same global batches and trains on its own slice
    of each (DistributedDataParallel averages the gradients), so N ranks take the steps
    one process would with the same batch size. Only rank 0 evaluates and reports.
    """
    ranks, main = distributed.world_size(), distributed.is_main()
    # Noise differs between ranks (rank 0 draws what a single process would); the order of
    # the data does not: the index streams below share the seed on every rank.
    noise_seed = seed + 1_000_003 * distributed.rank()
    torch.manual_seed(noise_seed)  # dropout and stochastic depth draw from the global generator
    gen = torch.Generator().manual_seed(noise_seed)  # every input-noise draw

    dev = device()
    # Small image sets live on the device for the whole run: a batch is one index away.
    images, targets = images.to(dev), targets.to(dev)
    labelled_batch = schedule.batch_size
    pseudo_stream = None
    if pseudo_images is not None and len(pseudo_images):
        pseudo_images, pseudo_targets = pseudo_images.to(dev), pseudo_targets.to(dev)
        pseudo_batch = max(1, round(schedule.batch_size * schedule.unlabelled_ratio))
        steps_per_epoch = math.ceil(len(pseudo_images) / pseudo_batch)
        pseudo_stream = IndexStream(len(pseudo_images), seed + 1)
    else:
        pseudo_batch = 0
        steps_per_epoch = math.ceil(len(images) / labelled_batch)
    labelled_stream = IndexStream(len(images), seed)
    total_steps = steps_per_epoch * schedule.epochs
    if labelled_batch % ranks or pseudo_batch % ranks:
        # an uneven split would weigh the smaller slices' images more in the averaged gradient
        raise UserError(
            f"batch_size {labelled_batch} (+{pseudo_batch} pseudo-labelled) does not split "
            f"evenly over {ranks} processes"
        )

    # channels_last: +22% training images/s for resnet18 at 28 px on this CPU, and the
    # layout tensor cores want on GPUs
    model.to(dev, memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(
        model,
        "sgd",
        lr=schedule.lr,
        weight_decay=schedule.weight_decay,
        momentum=0.9,
        foreach=True,  # one fused update over all parameters; torch only defaults to it on GPU
    )
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
    # DDP copies rank 0's weights to every rank, then all-reduces gradients in backward.
    trained = DistributedDataParallel(model) if ranks > 1 else model
    averager = _Averager(model, schedule, total_steps)  # of the plain module's weights
    result = FitResult(model=averager.module)
    start = time.perf_counter()
    step, loss_sum, seen = 0, 0.0, 0
    streams = {"labelled": labelled_stream, "pseudo": pseudo_stream}

    def snapshot() -> dict:
        return {
            "step": step,
            "epoch_loss_sum": loss_sum,
            "epoch_seen": seen,
            "history": result.history,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "averaged": averager.state_dict(),
            "streams": {k: v.state_dict() for k, v in streams.items() if v is not None},
            "rng": {
                "torch": torch.get_rng_state(),
                "noise": gen.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if dev.type == "cuda" else [],
            },
        }

    saved = state.load() if state is not None else None
    if saved is not None:
        step, loss_sum, seen = saved["step"], saved["epoch_loss_sum"], saved["epoch_seen"]
        result.history = saved["history"]
        result.resumed_from_step = step
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        averager.load_state_dict(saved["averaged"])
        for k, v in saved["streams"].items():
            streams[k].load_state_dict(v)
        torch.set_rng_state(saved["rng"]["torch"])
        gen.set_state(saved["rng"]["noise"])
        if saved["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    for epoch in range(step // steps_per_epoch + 1, schedule.epochs + 1):
        trained.train()
        epoch_start = time.perf_counter()
        for _ in range(step - (epoch - 1) * steps_per_epoch, steps_per_epoch):
            idx = distributed.local_part(labelled_stream.take(labelled_batch)).to(dev)
            x, y = images[idx], targets[idx]
            if pseudo_stream is not None:
                pidx = distributed.local_part(pseudo_stream.take(pseudo_batch)).to(dev)
                x = torch.cat([x, pseudo_images[pidx]])
                y = torch.cat([y, pseudo_targets[pidx]])
            x = noise.apply(x, gen).contiguous(memory_format=torch.channels_last)
            with autocast(dev, schedule.precision):
                logits = trained(x).float()
            if schedule.loss == "distillation":
                loss = distillation_loss(logits, y, len(idx), schedule.distillation_temperature)
            else:
                loss = soft_target_loss(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if scheduler is not None:
                scheduler.step_update(step)
            averager.update(step)
            loss_sum += loss.item() * len(x)
            seen += len(x)
            if state is not None and main:  # rank 0 alone writes
                if step % steps_per_epoch:  # the end of an epoch is saved below
                    state.maybe_save(snapshot, step, epoch_end=False, last=False)
                state.kill_point(f"step={step}")

        if ranks > 1:  # the epoch's figures over the global batches
            loss_sum, seen = distributed.sum_over_ranks(loss_sum, seen)
        metrics = {
            "train_loss": loss_sum / seen,
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_second": seen / (time.perf_counter() - epoch_start),
        }
        last = epoch == schedule.epochs
        if last:
            averager.finish(_clean_batches(images, pseudo_images, schedule.batch_size * 4))
        if eval_images is not None and main and (epoch % schedule.eval_every == 0 or last):
            metrics["test_accuracy"] = accuracy(
                averager.module,
                eval_images,
                eval_labels,
                schedule.eval_batch_size,
                schedule.precision,
            )
            if last:
                result.final_accuracy = metrics["test_accuracy"]
        result.history.append({"epoch": epoch, **metrics})
        if on_epoch is not None and main:
            on_epoch(epoch, metrics)
        loss_sum, seen = 0.0, 0
        if state is not None and main:
            state.maybe_save(snapshot, step, epoch_end=True, last=last)
            state.kill_point(f"epoch={epoch}")
    if result.history and result.final_accuracy is None:
        # resumed from the state saved after the last epoch: nothing left to train
        result.final_accuracy = result.history[-1].get("test_accuracy")
    result.steps = step
    result.seconds = time.perf_counter() - start
    result.model = averager.module.eval().cpu().to(memory_format=torch.contiguous_format)
    return result


def _clean_batches(
    images: torch.Tensor, pseudo_images: torch.Tensor | None, batch_size: int, limit: int = 8192
) -> Iterator[torch.Tensor]:
    """Up to `limit` un-augmented training images, for recomputing batch-norm statistics."""
    pool = images if pseudo_images is None else torch.cat([images, pseudo_images[:limit]])
    for i in range(0, min(len(pool), limit), batch_size):
        yield augment.to_float(pool[i : i + batch_size]).contiguous(
            memory_format=torch.channels_last
        )
