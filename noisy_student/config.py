"""The one configuration schema: YAML presets in pipeline_config/ validate against it.

Every model forbids unknown keys, so a typo fails with the key's dotted path. Endpoints
and secrets are not here: they come from the environment (MLFLOW_TRACKING_URI, AWS_*,
PREFECT_API_URL) and are read by the libraries themselves. `--set` overrides are parsed
in noisy_student/overrides.py, Prefect's schema of a deployment's parameters is in
flows/parameters.py, and docs/configuration.md is written from this schema by
docs/generate_config_reference.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Any, Literal

import timm
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from noisy_student.errors import UserError
from noisy_student.evaluation.corruptions import BENCHMARK, CORRUPTIONS
from noisy_student.labelling.label_queue import Strategy
from noisy_student.overrides import Overrides, apply_overrides, override_pairs
from noisy_student.training import augment, models

# every precision setting: what "auto" means (noisy_student.training.engine.autocast)
PRECISION_HELP = "Autocast: auto = bf16 on a GPU, fp32 on CPU (bf16 there: docs/models.md)"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FashionMnistSource(Strict):
    """Where `noisy-student run` ingests Fashion-MNIST from when `data.root` holds no dataset."""

    source: str = Field(
        "/usr/share/datasets/fashion-mnist", description="Folder of the IDX .gz files"
    )
    labelled_per_class: int = Field(
        100, gt=0, description="Labelled images per class (the rest are unlabelled)"
    )
    validation_per_class: int = Field(
        0,
        ge=0,
        description="Labelled images per class set apart as the validation split, which every "
        "choice of a run is made on (drawn after the labelled ones, removed from the "
        "unlabelled pool: labels too); 0: none, choices are made on the test split",
    )
    unlabelled_limit: int | None = Field(
        None, gt=0, description="Keep only this many unlabelled images"
    )
    test_limit: int | None = Field(None, gt=0, description="Keep only this many test images")
    seed: int = Field(0, description="Seed of the labelled/unlabelled split")
    rows_per_shard: int = Field(
        8192, gt=0, description="Rows per Parquet shard: one inference task each"
    )


class DataConfig(Strict):
    root: str = Field(
        description="Dataset root URL holding labelled/, unlabelled/, test/ and optionally "
        "validation/"
    )
    fashion_mnist: FashionMnistSource | None = Field(
        None, description="Ingest Fashion-MNIST into `root` first if no dataset is there"
    )


class RandAugmentConfig(Strict):
    """RandAugment as the official Noisy Student code runs it (noisy_student/training/augment.py).
    A setting left null is chosen by the image's size: up to 64 px a side, the official
    CIFAR/SVHN settings with the image's own border as the fill (docs/algorithm.md); larger,
    the official ImageNet settings, the paper's noise."""

    num_ops: int = Field(2, ge=1, le=5, description="Operations drawn per image (N)")
    magnitude: float = Field(
        9.0,
        ge=0,
        le=30,
        description="Strength M: 10 is each operation's nominal maximum, up to 30 (paper: 27)",
    )
    magnitude_std: float = Field(0.0, ge=0, description="Per-image Gaussian jitter of M")
    translate: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Largest translation at M=10, a fraction of the side; null: 1/8 for small "
        "images, 100/224 for photos",
    )
    cutout: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Cutout among the operations: its square's side at M=10, a fraction of the "
        "shorter side (0: not drawn); null: 1/4 for small images, 80/224 for photos",
    )
    fill: Literal["border", "mean"] | Annotated[int, Field(ge=0, le=255)] | None = Field(
        None,
        description="What pixels a transform uncovers or cuts out get: the image's border "
        "(mean of its outermost pixels), its mean, or a value 0-255; null: border for small "
        "images, 128 for photos",
    )
    invert: bool | None = Field(
        None,
        description="Draw invert among the operations; null: yes, as the official code does "
        "for images of every size",
    )
    levels: Literal["official", "increasing"] | None = Field(
        None,
        description="How M maps to solarize, posterize and the enhancements: the official "
        "code's, or stronger as M grows (timm's increasing); null: the official code's for "
        "images of every size",
    )

    def for_image(self, height: int, width: int) -> augment.RandAugment:
        """The settings for images of this size (the nulls filled in)."""
        return augment.RandAugment.for_image(height, width, **self.model_dump())


class TrainConfig(Strict):
    model: str = Field(description="Any timm model name, e.g. resnet18, efficientnet_b0")
    pretrained: bool = Field(False, description="Start from pretrained weights")
    checkpoint: str | None = Field(
        None, description="Local/remote weights file for `pretrained` (works offline)"
    )
    stem: Literal["imagenet", "half", "stride1"] = Field(
        "imagenet",
        description="Early downsampling: timm's ImageNet stem, half of it, or none (stride 1); "
        "see docs/models.md",
    )
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Further keyword arguments of timm.create_model, e.g. a ResNet's "
        "{channels: [32, 64, 128, 256], stem_width: 16}; kept in model.json",
    )
    epochs: int = Field(gt=0)
    batch_size: int = Field(64, gt=0, description="Labelled images per step")
    lr: float = Field(0.1, gt=0, description="Peak SGD learning rate")
    lr_schedule: Literal["cosine", "step", "constant"] = Field(
        "cosine", description="Decay after warm-up: cosine to 0, step (see below), or none"
    )
    lr_decay_epochs: float = Field(
        2.4, gt=0, description="step schedule: decay every this many epochs (paper: 2.4)"
    )
    lr_decay_rate: float = Field(
        0.97, gt=0, le=1, description="step schedule: multiply by this (paper: 0.97)"
    )
    weight_decay: float = Field(
        5e-4, ge=0, description="SGD weight decay (not on norms and biases)"
    )
    warmup_epochs: float = Field(1.0, ge=0, description="Linear learning-rate warm-up")
    weight_averaging: Literal["ema", "swa", "none"] = Field(
        "ema", description="Averaged weights used for evaluation and labelling"
    )
    ema_decay: float = Field(0.999, ge=0, lt=1, description="ema: decay per step")
    swa_start: float = Field(
        0.75, ge=0, lt=1, description="swa: average over the steps after this fraction"
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="On labelled targets")
    hflip: bool = Field(True, description="Random horizontal flips")
    crop_padding: int = Field(2, ge=0, description="Random-crop translation in pixels")
    rand_augment: RandAugmentConfig | None = Field(
        None, description="RandAugment on the input (noise); null switches it off"
    )
    cutout: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Cutout on every image: a square of this fraction of the shorter side "
        "(0: off; the official small-image code: 0.5), filled as rand_augment.fill",
    )
    drop_rate: float = Field(0.0, ge=0, lt=1, description="Dropout before the classifier")
    drop_path_rate: float = Field(
        0.0, ge=0, lt=1, description="Stochastic depth: drop rate of the last block, linear"
    )
    eval_every: int = Field(1, gt=0, description="Evaluate on the test set every N epochs")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description=PRECISION_HELP,
    )
    decoded_cache_mb: int = Field(
        512,
        ge=0,
        description="Decoded training images kept in memory between epochs, in MiB; the rest "
        "are decoded again each epoch (memory stays flat in data size)",
    )
    checkpoint_every_steps: int | None = Field(
        None,
        gt=0,
        description="Save the training state every N steps; a killed run resumes from the "
        "last save",
    )
    checkpoint_min_seconds: float = Field(
        60.0,
        ge=0,
        description="Save the training state at the end of an epoch when this many seconds "
        "have passed since the last save (0: after every epoch)",
    )

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
            raise ValueError(f"unknown timm model {name!r} (close: {', '.join(close) or 'none'})")
        return name

    @field_validator("model_kwargs")
    @classmethod
    def _known_model_kwargs(cls, kwargs: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "model" in info.data:  # else the model's own error is the one to show
            try:
                models.check_kwargs(info.data["model"], kwargs)
            except UserError as e:
                raise ValueError(str(e).removeprefix("model_kwargs.")) from None
        return kwargs


class TeacherConfig(TrainConfig):
    epochs: int = Field(100, gt=0, description="Passes over the labelled images")


# Passes over the pseudo-labelled images when a student's `epochs` is not given: a student
# started from its teacher's weights needs few; a larger one from scratch needs more to beat
# its teacher (benchmarks/results/scratch-students.md: at 3 epochs resnet18d gained 0.30
# points over resnet10t and mobilenetv3_large_100 lost 0.60 to mobilenetv3_small_100).
STUDENT_EPOCHS = {"from_teacher": 3, "from_scratch": 8}


class StudentConfig(TrainConfig):
    epochs: int | None = Field(
        None,
        gt=0,
        description="Passes over the selected pseudo-labelled images; null: "
        f"{STUDENT_EPOCHS['from_teacher']} with init_from_teacher, "
        f"{STUDENT_EPOCHS['from_scratch']} from scratch",
    )
    unlabelled_ratio: float = Field(
        3.0, gt=0, description="Pseudo-labelled images per labelled image in every batch"
    )
    init_from_teacher: bool = Field(False, description="Start from the teacher's weights")
    stem: Literal["imagenet", "half", "stride1", None] = Field(
        None, description="Early downsampling (see teacher.stem); null: the teacher's"
    )
    loss: Literal["soft_target", "distillation"] = Field(
        "soft_target",
        description="One cross-entropy over all rows, or half CE on labels + half KL to the "
        "teacher",
    )
    distillation_temperature: float = Field(
        1.0, gt=0, description="distillation: softens teacher and student alike"
    )
    rand_augment: RandAugmentConfig | None = Field(
        RandAugmentConfig(), description="RandAugment on the input (noise); null switches it off"
    )
    drop_rate: float = Field(0.5, ge=0, lt=1, description="Dropout before the classifier")
    drop_path_rate: float = Field(
        0.2, ge=0, lt=1, description="Stochastic depth: survival 0.8 at the last block, linear"
    )

    @model_validator(mode="before")
    @classmethod
    def _default_epochs(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("epochs") is None:
            start = "from_teacher" if data.get("init_from_teacher") else "from_scratch"
            data = {**data, "epochs": STUDENT_EPOCHS[start]}
        return data


class InferenceConfig(Strict):
    batch_size: int = Field(1024, gt=0, description="Images per forward pass")
    tta: Literal["off", "flip"] = Field(
        "off",
        description="Pseudo labels from the image alone, or the mean over it and its mirror "
        "image; keep off where a mirror image can change the class (digits, text)",
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description=PRECISION_HELP,
    )
    runner: Literal["local", "dask", "ray"] = Field(
        "local",
        description="Where the shards are labelled: threads of the flow's process, a Dask "
        "cluster or a Ray cluster (`uv sync --extra ray`)",
    )
    address: str | None = Field(
        None,
        description="dask/ray: the running cluster's scheduler, e.g. tcp://head:8786 or "
        "ray://head:10001; null starts a temporary local one",
    )
    local_workers: int = Field(
        2, gt=0, description="dask/ray without an address: worker processes of the local cluster"
    )

    @model_validator(mode="after")
    def _runner_is_usable(self) -> InferenceConfig:
        if self.address and self.runner == "local":
            raise ValueError("address is for runner dask or ray, not local")
        if self.runner == "ray" and importlib.util.find_spec("prefect_ray") is None:
            raise ValueError("runner ray needs the 'ray' extra (uv sync --extra ray)")
        return self


class DistributedConfig(Strict):
    nproc_per_node: int = Field(
        1,
        gt=0,
        description="train_teacher/train_student: processes under torchrun on the flow's "
        "machine, one per GPU (DistributedDataParallel); 1 trains in the flow's process",
    )


class SelectionConfig(Strict):
    min_confidence: float = Field(0.3, ge=0, le=1, description="Drop images below this")
    per_class_quota: int | None = Field(
        None, gt=0, description="Images per class after balancing; default: mean kept per class"
    )
    balance: bool = Field(True, description="Trim over-quota and duplicate under-quota classes")
    labels: Literal["soft", "hard"] = Field(
        "soft", description="Teacher's distribution, or its argmax (smoothed)"
    )
    temperature: float = Field(1.0, gt=0, description="Soft labels: p^(1/T), renormalised")
    hard_label_smoothing: float = Field(0.1, ge=0, lt=1, description="Hard labels only")
    align: bool = Field(
        False,
        description="Distribution alignment: scale each class's probabilities until their "
        "mean over the pool matches the labelled set's class shares (ReMixMatch), before "
        "filtering; a few passes over the probabilities (docs/algorithm.md)",
    )


class GateConfig(Strict):
    """The promotion gate (noisy_student/stages/promote.py): a paired test of the candidate
    against the champion on the same images of the split choices are made on (validation
    where the dataset has one, else test)."""

    mode: Literal["superiority", "non_inferiority"] = Field(
        "superiority",
        description="superiority: promote only a candidate significantly more accurate than "
        "the champion; non_inferiority: promote unless it is significantly less accurate "
        "(for teams that prefer fresh models)",
    )
    alpha: float = Field(
        0.05, gt=0, lt=1, description="Significance level of the paired tests (two-sided)"
    )
    min_margin: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="superiority: the least accuracy gain that counts, as a fraction "
        "(0.005 = half a point), on top of significance; non_inferiority: the largest loss "
        "tolerated",
    )
    test: Literal["mcnemar", "bootstrap"] = Field(
        "mcnemar",
        description="Paired test of clean accuracy: exact McNemar on the images where the two "
        "disagree, or a paired bootstrap over images",
    )
    resamples: int = Field(
        10000, ge=100, description="Bootstrap resamples (the robustness check is a bootstrap)"
    )
    severities: list[int] = Field(
        default_factory=lambda: [3],
        min_length=1,
        description="Severities of the gate's robustness check: the evaluation's corruptions "
        "on the choice split's images (kept small: it is judged for every model)",
    )
    corruption_images: int | None = Field(
        1000,
        gt=0,
        description="Choice-split images per corruption and severity of the gate's robustness "
        "check (a fixed seeded subset); null = all",
    )

    @field_validator("severities")
    @classmethod
    def _gate_severity_range(cls, levels: list[int]) -> list[int]:
        return _severities(levels)


def _severities(levels: list[int]) -> list[int]:
    for s in levels:
        if not 1 <= s <= 5:
            raise ValueError(f"severity {s} outside 1..5")
    if len(set(levels)) != len(levels):
        raise ValueError("a severity is listed twice")
    return sorted(levels)


class EvaluationConfig(Strict):
    """The robustness benchmark of evaluate_robustness (see noisy_student/evaluation/robustness.py),
    reported on the test split, and the promotion gate."""

    corruptions: list[str] = Field(
        default_factory=lambda: list(BENCHMARK),
        min_length=1,
        description="Corruptions to judge on: by default ImageNet-C's 15, then MNIST-C's "
        "geometric 4; ImageNet-C's held-out gaussian_blur may be added",
    )
    severities: list[int] = Field(
        default_factory=lambda: [1, 2, 3, 4, 5],
        min_length=1,
        description="Levels 1 (mild) to 5 (severe)",
    )
    corruption_images: int | None = Field(
        1000,
        gt=0,
        description="Test images per corruption and severity (a fixed seeded subset, "
        "generated once beside the test set and reused); null = all",
    )
    fgsm_epsilons: list[int] = Field(
        default_factory=lambda: [1, 2, 4, 8],
        description="FGSM step sizes, in 1/255 of the pixel range; [] switches FGSM off",
    )
    adversarial_images: int | None = Field(
        1000, gt=0, description="Test images FGSM attacks (of the corrupted subset); null = all"
    )
    calibration_bins: int = Field(15, gt=0, description="Confidence bins of the ECE")
    baseline: str | None = Field(
        None,
        description="URL of an earlier run's robustness table (a robustness.parquet or its "
        "folder) holding the model CE and mCE are relative to; default: this run's first "
        "teacher",
    )
    baseline_mlflow_run_id: str | None = Field(
        None,
        description="Which model of that table (or of this run) is the baseline; default: "
        "its first teacher",
    )
    batch_size: int = Field(1024, gt=0, description="Images per forward pass")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description=PRECISION_HELP,
    )
    seed: int = Field(
        0, description="Seed of the subsets, of random corruptions and of bootstrap resamples"
    )
    gate: GateConfig = Field(GateConfig(), description="The promotion gate")

    @field_validator("corruptions")
    @classmethod
    def _known_corruptions(cls, names: list[str]) -> list[str]:
        for n in names:
            if n not in CORRUPTIONS:
                raise ValueError(f"unknown corruption {n!r} (known: {', '.join(CORRUPTIONS)})")
        if len(set(names)) != len(names):
            raise ValueError("a corruption is listed twice")
        return names

    @field_validator("severities")
    @classmethod
    def _severity_range(cls, levels: list[int]) -> list[int]:
        return _severities(levels)

    @field_validator("fgsm_epsilons")
    @classmethod
    def _epsilon_range(cls, steps: list[int]) -> list[int]:
        for e in steps:
            if not 1 <= e <= 255:
                raise ValueError(f"epsilon {e} outside 1..255 (it counts 1/255 steps)")
        return sorted(set(steps))


class LabellingConfig(Strict):
    """The label queue written after a run: the unlabelled images a human should label
    next (noisy_student/labelling/label_queue.py; docs/labelling.md)."""

    queue_size: int = Field(
        200, ge=0, description="Unlabelled images queued for a human label; 0: no queue"
    )
    strategy: Strategy = Field(
        "margin",
        description="Which images first: the final student's smallest top-two margin, "
        "its lowest confidence, where it and its teacher disagree most, a class-balanced "
        "mix of the three, or random (the control); see docs/labelling.md",
    )


class PipelineConfig(Strict):
    name: str = Field("noisy-student", description="MLflow experiment name")
    artifacts: str = Field("./artifacts", description="Root URL for every artifact of a run")
    seed: int = Field(0, description="Seed of training and selection")
    data: DataConfig = Field(description="Where the images are")
    teacher: TeacherConfig = Field(description="The first teacher")
    inference: InferenceConfig = Field(InferenceConfig(), description="Pseudo-labelling")
    selection: SelectionConfig = Field(SelectionConfig(), description="Filtering and balancing")
    students: list[StudentConfig] = Field(
        min_length=1, description="One per iteration; each becomes the next teacher"
    )
    evaluation: EvaluationConfig = Field(
        EvaluationConfig(), description="Robustness, reported; the promotion gate"
    )
    distributed: DistributedConfig = Field(
        DistributedConfig(), description="Data-parallel training (noisy_student.torchrun_stage)"
    )
    labelling: LabellingConfig = Field(
        LabellingConfig(), description="The label queue: which images to label next"
    )


def student_stem(config: dict[str, Any], k: int) -> str:
    """The stem student k (from 1) is built with, from a run's config as a dict
    (`PipelineConfig.model_dump()`): its own, else its teacher's, which after the first
    iteration is student k-1's (as `models.student_options` builds it)."""
    stem = config["teacher"]["stem"]
    for s in config["students"][:k]:
        stem = s.get("stem") or stem
    return stem


def validate(tree: dict[str, Any], source: str) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as e:
        err = e.errors()[0]
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise UserError(f"{source}: {path}: {msg}{more}") from None


def read_yaml(source: str | Path) -> dict[str, Any]:
    """A YAML file from a local path or any fsspec URL (s3://…, https://…)."""
    from noisy_student.data import storage

    source = str(source)
    url = storage.resolve(source)
    if not storage.exists(url):
        raise UserError(f"{source}: config file not found")
    try:
        tree = yaml.safe_load(storage.read_bytes(url)) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{source}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise UserError(f"{source}: expected a mapping of config keys")
    return tree


def load(source: str | Path, overrides: Overrides = None) -> PipelineConfig:
    tree = read_yaml(source)
    apply_overrides(tree, override_pairs(overrides))
    return validate(tree, str(source))


def resolve(config: str | Path | PipelineConfig, overrides: Overrides = None) -> PipelineConfig:
    """A config from a YAML path or URL, or an already validated one, with overrides."""
    if not isinstance(config, PipelineConfig):
        return load(config, overrides)
    pairs = override_pairs(overrides)
    if not pairs:
        return config
    tree = config.model_dump()
    apply_overrides(tree, pairs)
    return validate(tree, "overrides")
