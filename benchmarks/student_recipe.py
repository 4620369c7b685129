"""The student's recipe, measured side by side: which noise, which network and which of the
official code's small knobs pay on Fashion-MNIST's 28-px images.

One supervised teacher (the accuracy preset's: resnet10t on 100 labels per class) labels
the unlabelled pool once; its pseudo labels are filtered and balanced as the pipeline does.
Then every arm trains one student on the same labelled and pseudo-labelled images, for the
same passes over the pseudo labels (equal steps), and is judged on a development split of
5,000 training images that no arm trains on (500 per class): choices are made there. The
test split is measured and reported beside it, never used to choose.

Arms are one change each from a candidate recipe (the first row), as in an ablation: the
noise group reverts or adds one augmentation choice, the network group swaps the network,
the knob group tries one of the official code's settings. A row's difference from the
candidate comes with an exact McNemar test on the same development images.

    uv run python -m benchmarks.student_recipe             # about 1.5 hours on 2 CPU cores
    uv run python -m benchmarks.student_recipe --quick     # a slice, to check the harness
    uv run python -m benchmarks.student_recipe --arms NAME...  # adds rows to the table

The table's arms are compared with its candidate: when the code's candidate (`CANDIDATE`)
is no longer the one the table was measured with, `--arms` refuses, and a run without it
measures a new table.

The result file is written after every arm; a killed run goes on where it stopped. Writes
benchmarks/results/student-recipe.json and .md (student-recipe-quick.* with --quick).
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from benchmarks.accuracy import hardware
from benchmarks.machine import describe
from noisy_student.config import StudentConfig, TeacherConfig
from noisy_student.data import ingest, training_data
from noisy_student.evaluation import statistics
from noisy_student.stages import train
from noisy_student.training import augment, engine, models, selection
from noisy_student.training.engine import flush_denormals

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
CACHE = REPO / "artifacts" / "student-recipe"
SOURCE = ingest.FASHION_MNIST_DIR
CLASSES = 10
LABELLED_PER_CLASS = 100
DEV_PER_CLASS = 500
SEED = 0

# The half stem with narrower stages: 14x14 maps after the stem instead of 7x7, at about
# the compute of timm's resnet18d (reference: 948 against 720 training images/s here).
NARROW = {"channels": [32, 64, 128, 256], "stem_width": 16}


def _noise_with(rand_augment: augment.RandAugment | None) -> engine.Noise:
    """A teacher's default input noise (flips, 2 px crops) with this RandAugment."""
    return replace(train.noise(TeacherConfig(model="resnet18d"), 28, 28), rand_augment=rand_augment)


@dataclass(frozen=True)
class Recipe:
    """A student's recipe: its network, input noise and schedule."""

    model: str = "resnet18d"
    stem: str = "half"
    model_kwargs: dict[str, Any] = field(default_factory=lambda: dict(NARROW))
    noise: engine.Noise = field(
        default_factory=lambda: _noise_with(
            augment.RandAugment.for_image(28, 28, num_ops=2, magnitude=9)
        )
    )
    drop_rate: float = 0.5
    drop_path_rate: float = 0.2
    label_smoothing: float = 0.0  # on the labelled rows
    unlabelled_ratio: float = 3.0
    batch_size: int = 32  # labelled images per step
    lr: float = 0.05
    epochs: int = 3  # passes over the pseudo-labelled images
    tta: str = "off"  # how the teacher's pseudo labels were made


CANDIDATE = Recipe()
TODAY = augment.RandAugment(num_ops=2, magnitude=9, cutout=0.0, levels="increasing")


def _noise(**ra: Any) -> engine.Noise:
    return _noise_with(replace(CANDIDATE.noise.rand_augment, **ra))


# name -> (group, what, recipe)
ARMS: dict[str, tuple[str, str, Recipe]] = {
    "candidate": ("", "the candidate recipe", CANDIDATE),
    "noise: today's": (
        "noise",
        "today's RandAugment: translate 45% of the side, grey fill, invert drawn, no Cutout",
        replace(CANDIDATE, noise=_noise_with(TODAY)),
    ),
    "noise: translate 45%": (
        "noise",
        "translate up to 45% of the side at M=10 (the photo constant), not 1/8",
        replace(CANDIDATE, noise=_noise(translate=100 / 224)),
    ),
    "noise: grey fill": (
        "noise",
        "uncovered and cut-out pixels grey (128, the official fill), not the image's border",
        replace(CANDIDATE, noise=_noise(fill=augment.GREY)),
    ),
    "noise: invert drawn": (
        "noise",
        "invert among the operations, as in the official code",
        replace(CANDIDATE, noise=_noise(invert=True)),
    ),
    "noise: official levels": (
        "noise",
        "solarize, posterize and enhancements as the official code maps M",
        replace(CANDIDATE, noise=_noise(levels="official")),
    ),
    "noise: no Cutout op": (
        "noise",
        "Cutout not among the operations",
        replace(CANDIDATE, noise=_noise(cutout=0.0)),
    ),
    "noise: Cutout on every image": (
        "noise",
        "and a square of half the side cut from every image (the official small-image path)",
        replace(CANDIDATE, noise=replace(CANDIDATE.noise, cutout=0.5)),
    ),
    "noise: M=5": (
        "noise",
        "magnitude 5 (the official SVHN run), not 9",
        replace(CANDIDATE, noise=_noise(magnitude=5)),
    ),
    "noise: official levels and invert": (
        "noise",
        "the official mapping of M and invert drawn, at once (the rows official levels and "
        "invert drawn try them one at a time)",
        replace(CANDIDATE, noise=_noise(levels="official", invert=True)),
    ),
    "noise: no RandAugment": (
        "noise",
        "crops and flips only (dropout and stochastic depth kept)",
        replace(CANDIDATE, noise=_noise_with(None)),
    ),
    "network: resnet18d": (
        "network",
        "timm's resnet18d as it is (ImageNet stem: 1x1 maps in the last stage)",
        replace(CANDIDATE, stem="imagenet", model_kwargs={}),
    ),
    "network: resnet10t": (
        "network",
        "the teacher's network, timm's resnet10t as it is",
        replace(CANDIDATE, model="resnet10t", stem="imagenet", model_kwargs={}),
    ),
    "network: resnet26d narrow half": (
        "network",
        "resnet26d with the candidate's stem and stages (twice the blocks)",
        replace(CANDIDATE, model="resnet26d"),
    ),
    "network: resnet18d wider half": (
        "network",
        "resnet18d, half stem, stages of 48-384 channels, stem width 24",
        replace(CANDIDATE, model_kwargs={"channels": [48, 96, 192, 384], "stem_width": 24}),
    ),
    "budget: candidate, 12 passes": (
        "budget",
        "the candidate for 4 times the passes: does the ranking of M hold with time?",
        replace(CANDIDATE, epochs=12),
    ),
    "budget: M=5, 12 passes": (
        "budget",
        "magnitude 5 for 4 times the passes",
        replace(CANDIDATE, noise=_noise(magnitude=5), epochs=12),
    ),
    "budget: resnet18d, 12 passes": (
        "budget",
        "timm's resnet18d as it is for 4 times the passes: does the ranking of the networks "
        "hold with time?",
        replace(CANDIDATE, stem="imagenet", model_kwargs={}, epochs=12),
    ),
    "knob: label smoothing 0.1": (
        "knob",
        "label smoothing 0.1 on the labelled rows (the official code's)",
        replace(CANDIDATE, label_smoothing=0.1),
    ),
    "knob: unlabelled ratio 5": (
        "knob",
        "5 pseudo-labelled images per labelled one (the official small models'), 21 + 105 a step",
        replace(CANDIDATE, unlabelled_ratio=5.0, batch_size=21),
    ),
    "knob: flip-averaged teacher": (
        "knob",
        "pseudo labels from the teacher's mean over the image and its mirror image",
        replace(CANDIDATE, tta="flip"),
    ),
}


@dataclass(frozen=True)
class TeacherRecipe:
    """The first teacher: supervised on the labelled images, crops and flips only."""

    model: str = "resnet10t"
    stem: str = "imagenet"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 100  # passes over the 1,000 labelled images, batches of 64


TEACHER = TeacherRecipe()  # the accuracy preset's: it labels for every student arm
# name -> (what, recipe): other first teachers, judged on dev (no student trained)
TEACHER_ARMS: dict[str, tuple[str, TeacherRecipe]] = {
    "teacher: resnet10t": ("the accuracy preset's teacher (the one that labels above)", TEACHER),
    "teacher: resnet10t, 300 epochs": ("three times the epochs", replace(TEACHER, epochs=300)),
    "teacher: the candidate's network": (
        "resnet18d with the candidate student's half stem and narrow stages",
        TeacherRecipe("resnet18d", "half", dict(NARROW)),
    ),
}


# ---------------------------------------------------------------- data and teacher


@dataclass
class Data:
    labelled: tuple[torch.Tensor, torch.Tensor]  # images (n x 1 x 28 x 28 uint8), labels
    pool: tuple[torch.Tensor, torch.Tensor]  # the unlabelled pool and its true labels
    dev: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]


def _read(split: str) -> tuple[np.ndarray, np.ndarray]:
    images = ingest.read_idx(f"{SOURCE}/{split}-images-idx3-ubyte.gz")
    labels = ingest.read_idx(f"{SOURCE}/{split}-labels-idx1-ubyte.gz")
    return images, labels.astype(np.int64)


def load_data(limit: int | None = None) -> Data:
    """The accuracy preset's labelled images (the same draw), 500 per class of the rest as
    the development split, the others unlabelled; `limit` cuts the pool and test (--quick)."""
    x, y = _read("train")
    xt, yt = _read("t10k")
    labelled = ingest.split_labelled(y, LABELLED_PER_CLASS, SEED)
    rest = np.setdiff1d(np.arange(len(y)), labelled)
    dev = np.sort(ingest.split_labelled(y[rest], DEV_PER_CLASS, SEED + 100))  # indices into rest
    dev = rest[dev]
    pool = np.setdiff1d(rest, dev)
    if limit is not None:
        pool, xt, yt = pool[:limit], xt[: limit // 2], yt[: limit // 2]

    def tensors(idx: np.ndarray | slice, xs: np.ndarray, ys: np.ndarray) -> tuple:
        return torch.from_numpy(xs[idx].copy()).unsqueeze(1), torch.from_numpy(ys[idx].copy())

    return Data(
        tensors(labelled, x, y),
        tensors(pool, x, y),
        tensors(dev, x, y),
        tensors(slice(None), xt, yt),
    )


def fit_teacher(
    t: TeacherConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: int,
    noise: engine.Noise,
    seed: int,
) -> engine.FitResult:
    """A teacher trained on labelled images in memory with the pipeline's engine and
    schedule: `t`'s network, stem, dropout, stochastic depth, label smoothing and optimiser;
    `noise` its augmentation."""
    torch.manual_seed(seed)
    model = models.create(t.model, classes, 1, t.drop_rate, t.drop_path_rate, stem=t.stem,
                          model_kwargs=t.model_kwargs)  # fmt: skip
    return engine.fit(
        model,
        training_data.TensorRows(images, engine.one_hot(labels, classes, t.label_smoothing)),
        train.schedule(t),
        noise,
        seed,
    )


def train_teacher(data: Data, recipe: TeacherRecipe, quick: bool) -> engine.FitResult:
    """A first teacher: 64 images a step, SGD at 0.1, EMA, crops and flips."""
    t = TeacherConfig(
        model=recipe.model,
        stem=recipe.stem,
        model_kwargs=recipe.model_kwargs,
        epochs=10 if quick else recipe.epochs,
        lr=0.1,
    )
    return fit_teacher(t, *data.labelled, CLASSES, _noise_with(None), SEED)


def labelling_teacher(data: Data, quick: bool) -> torch.nn.Module:
    """TEACHER, trained once and kept: it labels the pool for every student arm."""
    path = CACHE / ("teacher-quick.safetensors" if quick else "teacher.safetensors")
    if path.exists():
        model = models.create(TEACHER.model, CLASSES, 1)
        model.load_state_dict(models.load_safetensors(path.read_bytes()))
        return model
    model = train_teacher(data, TEACHER, quick).model
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(models.save_safetensors(model.state_dict()))
    return model


def teacher_arm(data: Data, recipe: TeacherRecipe, quick: bool) -> dict[str, Any]:
    fit = train_teacher(data, recipe, quick)
    out: dict[str, Any] = {
        "steps": fit.steps,
        "train_seconds": round(fit.seconds, 1),
        "images_per_second": round(fit.steps * 64 / fit.seconds, 1),
    }
    for split, (images, labels) in (("dev", data.dev), ("test", data.test), ("pool", data.pool)):
        for tta in engine.TTA:
            probs = engine.predict_probs(fit.model, images, 1024, tta=tta)
            right = probs.argmax(1).numpy() == labels.numpy()
            key = f"{split}_accuracy" + ("" if tta == "off" else f"_{tta}")
            out[key] = float(right.mean())
            if split == "dev" and tta == "off":
                out["dev_right"], out["dev_images"] = _packed(right), len(right)
    return out


def as_copied(rows: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected rows (integer ids into the pool) as balancing made them: each row's pool
    index and soft target repeated `copies` times (0 for a row trimmed away)."""
    index = torch.from_numpy(np.repeat(rows["id"].astype(int).to_numpy(), rows["copies"]))
    targets = torch.from_numpy(np.repeat(np.stack(rows["target"].to_numpy()), rows["copies"], 0))
    return index, targets


def pseudo_labels(
    teacher: torch.nn.Module, data: Data, tta: str
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """The teacher's selected pseudo-labelled images (copies as balancing made them) and
    targets, and what they are worth: their accuracy and the teacher's on dev."""
    images, truth = data.pool
    probs = engine.predict_probs(teacher, images, 1024, tta=tta).numpy()
    chosen = selection.select(
        np.arange(len(images)).astype(str), probs, CLASSES, min_confidence=0.3, seed=SEED
    )
    rows = chosen.rows
    index, targets = as_copied(rows)
    dev_probs = engine.predict_probs(teacher, data.dev[0], 1024, tta=tta)
    worth = {
        "pseudo_label_accuracy": float((probs.argmax(1) == truth.numpy()).mean()),
        "teacher_dev_accuracy": float((dev_probs.argmax(1) == data.dev[1]).float().mean()),
        "kept": int(len(rows)),
        "selected": int(len(index)),
    }
    return images[index], targets, worth


# ---------------------------------------------------------------- one arm


def _packed(right: np.ndarray) -> str:
    return base64.b64encode(np.packbits(right.astype(bool)).tobytes()).decode()


def _unpacked(packed: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(packed), np.uint8))[:n].astype(bool)


def train_student(
    recipe: Recipe, data: Data, pseudo: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, Any]:
    x, y = data.labelled
    torch.manual_seed(SEED + 1)
    model = models.create(
        recipe.model,
        CLASSES,
        1,
        recipe.drop_rate,
        recipe.drop_path_rate,
        stem=recipe.stem,
        model_kwargs=recipe.model_kwargs,
    )
    schedule = train.schedule(
        StudentConfig(
            model=recipe.model,
            epochs=recipe.epochs,
            batch_size=recipe.batch_size,
            lr=recipe.lr,
            warmup_epochs=0.2,
            unlabelled_ratio=recipe.unlabelled_ratio,
        )
    )
    fit = engine.fit(
        model,
        training_data.TensorRows(x, engine.one_hot(y, CLASSES, recipe.label_smoothing)),
        schedule,
        recipe.noise,
        SEED + 1,
        pseudo=training_data.TensorRows(*pseudo),
    )
    out: dict[str, Any] = {
        "steps": fit.steps,
        "train_seconds": round(fit.seconds, 1),
        "images_per_second": round(
            fit.steps
            * (recipe.batch_size + round(recipe.batch_size * recipe.unlabelled_ratio))
            / fit.seconds,
            1,
        ),
        "parameters": sum(p.numel() for p in fit.model.parameters()),
    }
    for split, (images, labels) in (("dev", data.dev), ("test", data.test)):
        right = engine.predict_probs(fit.model, images, 1024).argmax(1).numpy() == labels.numpy()
        out[f"{split}_accuracy"] = float(right.mean())
        out[f"{split}_right"] = _packed(right)
        out[f"{split}_images"] = len(right)
    return out


# ---------------------------------------------------------------- statistics and report


# what an arm, or each arm of a group, is compared with (the rest: with the candidate)
REFERENCES = {"budget": "budget: candidate, 12 passes"}


def markdown(result: dict[str, Any]) -> str:
    arms = result["arms"]
    lines = [
        "# The student's recipe on 28-px Fashion-MNIST, measured side by side",
        "",
        f"Last written {result['date']}. {describe(result['hardware'])} "
        f"(torch {result['hardware']['torch']}). Command: `{result['command']}`.",
        "",
        f"Teacher: resnet10t on {LABELLED_PER_CLASS * CLASSES} labels; its pseudo labels "
        f"{100 * result['teacher']['off']['pseudo_label_accuracy']:.2f}% right "
        f"({100 * result['teacher']['flip']['pseudo_label_accuracy']:.2f}% flip-averaged), "
        f"dev accuracy {100 * result['teacher']['off']['teacher_dev_accuracy']:.2f}% "
        f"({100 * result['teacher']['flip']['teacher_dev_accuracy']:.2f}%). Every student: "
        f"{CANDIDATE.epochs} passes over the selected pseudo labels, seed {SEED + 1}, judged "
        f"on {DEV_PER_CLASS * CLASSES:,} development images (the choice) and the "
        "10,000 test images (reported). Difference and p: against the candidate (the "
        "budget group: against the candidate at the same passes) on the same development "
        "images (exact McNemar).",
        "",
        "| arm | what | dev accuracy (95% CI) | vs candidate | p | test accuracy | "
        "train img/s | minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (group, what, _) in ARMS.items():
        r = arms.get(name)
        if r is None:
            lines.append(f"| {name} | {what} | not yet run | | | | | |")
            continue
        n = r["dev_images"]
        dev = statistics.percent(
            r["dev_accuracy"], statistics.accuracy_interval(r["dev_accuracy"], n)
        )
        diff = p = ""
        ref_name = REFERENCES.get(name, REFERENCES.get(group, "candidate"))
        ref = arms.get(ref_name)
        if ref is not None and name != ref_name:
            paired = statistics.mcnemar(
                _unpacked(r["dev_right"], n), _unpacked(ref["dev_right"], n)
            )
            diff, p = f"{100 * paired.difference:+.2f}", f"{paired.p_value:.3f}"
        lines.append(
            f"| {name} | {what} | {dev} | {diff} | {p} | {100 * r['test_accuracy']:.2f}% | "
            f"{r['images_per_second']:.0f} | {r['train_seconds'] / 60:.1f} |"
        )
    teachers = result.get("teachers", {})
    if teachers:
        lines += [
            "",
            "First teachers (100 labels per class, crops and flips, batches of 64), judged on "
            "the same development images; flip: the mean over each image and its mirror "
            "image (`inference.tta: flip`). Pseudo labels: the unlabelled pool.",
            "",
            "| teacher | what | dev accuracy (95% CI) | dev, flip | pseudo labels | pseudo "
            "labels, flip | test accuracy | minutes |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, (what, _) in TEACHER_ARMS.items():
            t = teachers.get(name)
            if t is None:
                lines.append(f"| {name} | {what} | not yet run | | | | | |")
                continue
            interval = statistics.accuracy_interval(t["dev_accuracy"], t["dev_images"])
            lines.append(
                f"| {name} | {what} | {statistics.percent(t['dev_accuracy'], interval)} | "
                f"{100 * t['dev_accuracy_flip']:.2f}% | "
                f"{100 * t['pool_accuracy']:.2f}% | {100 * t['pool_accuracy_flip']:.2f}% | "
                f"{100 * t['test_accuracy']:.2f}% | {t['train_seconds'] / 60:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a slice, to check the harness")
    parser.add_argument("--arms", nargs="+", metavar="ARM", help="only these arms")
    args = parser.parse_args(argv)
    flush_denormals()
    unknown = [a for a in args.arms or [] if a not in ARMS and a not in TEACHER_ARMS]
    if unknown:
        names = ", ".join([*ARMS, *TEACHER_ARMS])
        raise SystemExit(f"--arms: unknown arm {unknown[0]!r} (arms: {names})")
    stem = "student-recipe-quick" if args.quick else "student-recipe"
    path = RESULTS / f"{stem}.json"
    command = "uv run python -m benchmarks.student_recipe" + (" --quick" if args.quick else "")
    identity = {"candidate": repr(CANDIDATE), "quick": args.quick}
    old = json.loads(path.read_text()) if path.exists() else {}
    # what the table holds is kept only if it was measured with this candidate
    kept = old if old.get("identity") == identity else {}
    if args.arms and old.get("arms") and not kept:
        # the arms of a table are compared with its candidate: a row measured against
        # another candidate (or teacher) would sit beside them without being side by side
        raise SystemExit(
            f"{path}: its arms were measured with another candidate than this code's "
            "CANDIDATE; --arms would start a new table of these arms alone: run it without "
            "--arms to measure every arm again"
        )
    result = {
        "identity": identity,
        "command": command,
        "arms": kept.get("arms", {}),
    }
    data = load_data(limit=4000 if args.quick else None)
    teacher = labelling_teacher(data, args.quick)
    for_tta = {}
    result["teacher"] = {}
    for tta in engine.TTA:
        images, targets, worth = pseudo_labels(teacher, data, tta)
        for_tta[tta] = (images, targets)
        result["teacher"][tta] = worth
    result.setdefault("teachers", kept.get("teachers", {}))
    for name in args.arms or [*ARMS, *TEACHER_ARMS]:
        if name in TEACHER_ARMS:
            if name not in result["teachers"]:
                start = time.perf_counter()
                r = teacher_arm(data, TEACHER_ARMS[name][1], args.quick)
                r["wall_seconds"] = round(time.perf_counter() - start, 1)
                r["hardware"] = hardware()
                result["teachers"][name] = r
                print(f"{name}: dev {100 * r['dev_accuracy']:.2f}%", flush=True)
                _save(path, result)
            continue
        if name in result["arms"]:
            continue
        group, what, recipe = ARMS[name]
        if args.quick:
            recipe = replace(recipe, epochs=1)
        start = time.perf_counter()
        r = train_student(recipe, data, for_tta[recipe.tta])
        r["wall_seconds"] = round(time.perf_counter() - start, 1)
        r["hardware"] = hardware()
        r["recipe"] = json.loads(json.dumps(asdict(recipe), default=str))
        result["arms"][name] = r
        print(
            f"{name}: dev {100 * r['dev_accuracy']:.2f}%, test {100 * r['test_accuracy']:.2f}% "
            f"({r['images_per_second']:.0f} img/s, {r['wall_seconds']:.0f} s)",
            flush=True,
        )
        _save(path, result)
    _save(path, result)
    print(markdown(result))


def _save(path: Path, result: dict[str, Any]) -> None:
    result["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    result["hardware"] = hardware()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)
    path.with_suffix(".md").write_text(markdown(result))


if __name__ == "__main__":
    main()
