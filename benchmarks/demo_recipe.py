"""The demo's recipe, measured over seeds: which change to `pipeline_config/fashion_mnist.yaml`
makes its student gain most over its teacher, chosen on images the demo never trains on.

Each arm is the demo's config with `--set` overrides (the empty arm is the demo as shipped).
For every seed the data are drawn as the demo draws them (100 labels per class, with that
seed), and 500 images per class of the rest are set apart as a development split; the others
are the unlabelled pool. The teacher (cached per teacher config and seed) labels the pool,
the pseudo labels are filtered and balanced as the pipeline does, and the arm's student
trains on labelled plus pseudo-labelled images with the arm's noise and schedule, through
the pipeline's own engine, config and selection. Choices are made on the development split
(each arm against the demo on the same images, exact McNemar per seed, and the mean
difference over seeds with a t interval); the test split is reported beside it, teacher and
student, as the demo reports it. An arm that keeps the demo's teacher is compared with a
demo row from that very teacher (`reference`); the teacher cache is per machine and another
machine trains other draws, so before such an arm's student trains the harness says when the
table has no such row (bases named beside an arm are measured first).

    uv run python -m benchmarks.demo_recipe --seeds 0              # every arm, one seed
    uv run python -m benchmarks.demo_recipe --seeds 1 2 --arms demo "student: half stem"
    uv run python -m benchmarks.demo_recipe --report               # the table again
    uv run python -m benchmarks.demo_recipe --quick                # a slice: the harness

The result file is written after every student; a killed run goes on where it stopped, and
several processes may fill one table (e.g. `--seeds 0 2` beside `--seeds 1 2`): each takes
an (arm, seed) no other has measured or taken, and every save merges under a lock.
Writes benchmarks/results/demo-recipe.json and .md (demo-recipe-quick.* with --quick).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import statistics as stats
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.accuracy import hardware
from benchmarks.machine import describe
from benchmarks.student_recipe import _packed, _read, _unpacked, as_copied, fit_teacher
from noisy_student import config
from noisy_student.config import PipelineConfig
from noisy_student.data import ingest, training_data
from noisy_student.evaluation import statistics
from noisy_student.stages import train
from noisy_student.training import engine, models, selection
from noisy_student.training.engine import flush_denormals

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "pipeline_config" / "fashion_mnist.yaml"
RESULTS = REPO / "benchmarks" / "results"
CACHE = REPO / "artifacts" / "demo-recipe"
DEV_PER_CLASS = 500
BASE = "demo"
SECOND_BASE = "demo: later teachers"
THIRD_BASE = "demo: AVX512 teachers"
# the demo as shipped, measured with three draws of its teachers
BASES = (BASE, SECOND_BASE, THIRD_BASE)
# What every arm starts from beside the demo's config: the demo as it shipped when the arms
# were measured (its student for 4 passes, in fp32: "auto" meant fp32 on a CPU until
# 2026-12-06), so that the table keeps measuring what it says if the demo changes.
FP32 = {"teacher.precision": "fp32", "inference.precision": "fp32", "students.0.precision": "fp32"}
MEASURED_ON = {"students.0.epochs": 4} | FP32

# name -> (what, overrides of the demo's config, as `--set` takes them)
BF16 = {key: "bf16" for key in FP32}
TEACHER_NOISE = {"teacher.rand_augment.num_ops": 2, "teacher.rand_augment.magnitude": 9}
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    BASE: ("the demo as shipped (its student for 4 passes)", {}),
    "student: half stem": (
        "the student without the stem's max-pool (14x14 maps), started from the full-stem "
        "teacher; 3 passes to keep the demo's time",
        {"students.0.stem": "half", "students.0.epochs": 3},
    ),
    "noise: photo constants": (
        "RandAugment as before this issue: translate 45% of the side (100/224 there), grey "
        "fill, invert drawn, no Cutout",
        {
            "students.0.rand_augment.translate": 0.45,
            "students.0.rand_augment.fill": 128,
            "students.0.rand_augment.invert": True,
            "students.0.rand_augment.cutout": 0.0,
            "students.0.rand_augment.levels": "increasing",
        },
    ),
    "noise: M=5": (
        "RandAugment magnitude 5 (the official SVHN run)",
        {"students.0.rand_augment.magnitude": 5},
    ),
    "noise: M=13": (
        "RandAugment magnitude 13 instead of 9: stronger noise in the small-image settings "
        "(the photo constants, stronger still, measured +0.27)",
        {"students.0.rand_augment.magnitude": 13},
    ),
    "noise: 3 ops": (
        "three RandAugment operations per image instead of two",
        {"students.0.rand_augment.num_ops": 3},
    ),
    "noise: no RandAugment": (
        "crops and flips only (dropout and stochastic depth kept): short schedules measured "
        "better without it (student-recipe.md)",
        {"students.0.rand_augment": None},
    ),
    "labels: hard": (
        "hard pseudo labels (smoothed 0.1) instead of soft",
        {"selection.labels": "hard"},
    ),
    "pseudo labels: flip": (
        "the teacher's mean over each image and its mirror",
        {"inference.tta": "flip"},
    ),
    "student: lr 0.1": ("twice the student's peak learning rate", {"students.0.lr": 0.1}),
    "teacher: 200 epochs": ("the teacher for twice the passes", {"teacher.epochs": 200}),
    "student: 6 passes": (
        "the student for 6 passes over the pseudo labels instead of 4 (about 1.5 more "
        "minutes of the demo on a quiet machine)",
        {"students.0.epochs": 6},
    ),
    "student: 8 passes": (
        "the student for 8 passes instead of 4 (about 3 more minutes: the demo's 10-minute "
        "budget allows it, barely: 9 min 26 s on a quiet machine)",
        {"students.0.epochs": 8},
    ),
    "precision: bf16": (
        "bfloat16 autocast for the teacher, the labelling and the student (the judge stays "
        "fp32); on this AVX512-BF16 CPU the training loop runs 1.19x as fast "
        "(benchmarks.precision)",
        BF16,
    ),
    "precision: bf16, 8 passes": (
        "the same, with the student for 8 passes (the time bf16 saves spent on the student)",
        BF16 | {"students.0.epochs": 8},
    ),
    SECOND_BASE: (
        "the demo again, from the teachers of the arms measured since the harness seeds each "
        "teacher before drawing its weights (2905582): those are other draws than the first "
        "row's (seed 0: 85.33% against 84.83% on test), so the arms that keep the demo's "
        "teacher are compared with the demo trained from the very same teacher",
        {},
    ),
    "student: bf16, 8 passes": (
        "only the student in bf16 (the teacher and its labels in fp32: bf16 teachers measured "
        "0.52 points lower on test), for 8 passes",
        {"students.0.precision": "bf16", "students.0.epochs": 8},
    ),
    "teacher: RandAugment, 200 epochs": (
        "the teacher with the students' RandAugment (N=2, M=9), as every later teacher (a "
        "former student) learned, for twice the passes: the best first teacher of "
        "benchmarks.teacher_noise (teacher-noise.md)",
        TEACHER_NOISE | {"teacher.epochs": 200},
    ),
    "teacher: RandAugment, 200 epochs; student: 8 passes": (
        "that teacher, and its student for 8 passes: does the student's step over a teacher "
        "that learned with noise grow with the student's time?",
        TEACHER_NOISE | {"teacher.epochs": 200, "students.0.epochs": 8},
    ),
    THIRD_BASE: (
        "the demo again, from the teachers the harness trained on the AMD EPYC with AVX512 "
        "(2026-12-07): the same seeds and config as `demo: later teachers`, other draws (another "
        "CPU's kernels), so the arms measured there have a demo from the very same teachers",
        {},
    ),
    "selection: aligned": (
        "the teacher's probabilities aligned to the labelled set's class shares before "
        "filtering (`selection.align`, distribution alignment): does the first student gain "
        "from it as second students did (ensemble-labels.md)?",
        {"selection.align": True},
    ),
}


@dataclass
class Split:
    images: torch.Tensor  # n x 1 x 28 x 28 uint8
    labels: torch.Tensor


@dataclass
class Data:
    labelled: Split
    pool: Split
    dev: Split
    test: Split


def split_indices(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, ...]:
    """Indices of the labelled draw (the demo's for `seed`), the development split (500
    per class of the rest) and the unlabelled pool (the others)."""
    labelled = ingest.split_labelled(labels, per_class, seed)
    rest = np.setdiff1d(np.arange(len(labels)), labelled)
    dev = rest[np.sort(ingest.split_labelled(labels[rest], DEV_PER_CLASS, seed + 100))]
    return labelled, dev, np.setdiff1d(rest, dev)


def load_data(cfg: PipelineConfig, seed: int, limit: int | None = None) -> Data:
    """The splits of `split_indices`, and the test split; `limit` cuts all but the
    labelled images (--quick)."""
    x, y = _read("train")
    xt, yt = _read("t10k")
    labelled, dev, pool = split_indices(y, cfg.data.fashion_mnist.labelled_per_class, seed)
    if limit is not None:
        pool, dev, xt, yt = pool[:limit], dev[: limit // 4], xt[: limit // 2], yt[: limit // 2]

    def split(idx: Any, xs: np.ndarray, ys: np.ndarray) -> Split:
        return Split(
            torch.from_numpy(xs[idx].copy()).unsqueeze(1), torch.from_numpy(ys[idx].copy())
        )

    return Data(
        split(labelled, x, y), split(pool, x, y), split(dev, x, y), split(slice(None), xt, yt)
    )


def demo_config(overrides: dict[str, Any], quick: bool = False) -> PipelineConfig:
    """The demo's config as the arms were measured on (MEASURED_ON) with `overrides`;
    `quick`: a few epochs, to check a harness."""
    overrides = MEASURED_ON | overrides
    if quick:
        overrides |= {"teacher.epochs": 5, "students.0.epochs": 1}
    return config.load(DEMO, overrides)


def arm_config(name: str, quick: bool = False) -> PipelineConfig:
    return demo_config(ARMS[name][1], quick)


def _key(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# Keys the config gained after rows were measured, left out of fingerprints at their
# default, so that those rows stay comparable with new ones measured as they were.
ADDED_LATER = {"selection": {"align": False}}


def fingerprint(cfg: PipelineConfig) -> str:
    """What an arm trains with: its data, teacher, labelling, selection and student."""
    dump = cfg.model_dump(include={"seed", "data", "teacher", "inference", "selection"})
    for section, keys in ADDED_LATER.items():
        for key, default in keys.items():
            if dump[section].get(key, default) == default:
                dump[section].pop(key, None)
    return _key(dump, cfg.students[0].model_dump())


def _right(model: torch.nn.Module, split: Split) -> np.ndarray:
    """Right or wrong, image by image, judged in fp32 whatever precision the arm trains in."""
    probs = engine.predict_probs(model, split.images, 1024, precision="fp32")
    return (probs.argmax(1) == split.labels).numpy()


def teacher_for(cfg: PipelineConfig, data: Data, seed: int, classes: int, quick: bool) -> tuple:
    """The arm's teacher for `seed` (trained as the pipeline trains it, cached) and its
    accuracy on dev and test."""
    t = cfg.teacher
    path = CACHE / f"teacher-{_key(t.model_dump(), seed, quick)}.safetensors"
    if path.exists():
        model = models.create(t.model, classes, 1, stem=t.stem, model_kwargs=t.model_kwargs)
        model.load_state_dict(models.load_safetensors(path.read_bytes()))
    else:
        images, labels = data.labelled.images, data.labelled.labels
        model = fit_teacher(t, images, labels, classes, train.noise(t, 28, 28), seed).model
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(models.save_safetensors(model.state_dict()))
    return model, _right(model, data.dev), _right(model, data.test)


def pseudo_labels(
    cfg: PipelineConfig, teacher: torch.nn.Module, data: Data, classes: int, seed: int
):
    """The pool's selected rows (as many copies as balancing made) and their targets."""
    return selected(cfg, probabilities(cfg, teacher, data.pool.images), data, classes, seed)


def probabilities(cfg: PipelineConfig, model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    """`model`'s class probabilities for `images`, as the run's labelling stage gives them
    (its precision and test-time augmentation)."""
    i = cfg.inference
    return engine.predict_probs(model, images, 1024, i.precision, i.tta).numpy()


def class_shares(data: Data, classes: int) -> np.ndarray:
    """Each class's share of the labelled images: what alignment aligns to."""
    labels = data.labelled.labels.numpy()
    return np.bincount(labels, minlength=classes) / len(labels)


def selected(cfg: PipelineConfig, probs: np.ndarray, data: Data, classes: int, seed: int):
    """`pseudo_labels` from the pool's class probabilities, whichever model(s) gave them:
    the rows the pipeline's selection keeps, their targets, and how many labels are right."""
    s = cfg.selection
    chosen = selection.select(
        np.arange(len(probs)).astype(str), probs, classes, min_confidence=s.min_confidence,
        labels=s.labels, temperature=s.temperature, hard_label_smoothing=s.hard_label_smoothing,
        seed=seed,
        align_to=class_shares(data, classes) if s.align else None,
    )  # fmt: skip
    index, targets = as_copied(chosen.rows)
    labels = probs if chosen.alignment is None else chosen.alignment.aligned(probs)
    right = float((labels.argmax(1) == data.pool.labels.numpy()).mean())
    return data.pool.images[index], targets.float(), right


def train_student(
    cfg: PipelineConfig, teacher: torch.nn.Module, data: Data, pseudo, classes: int, seed: int
):
    """The demo's first student, as `train_student` builds and trains it."""
    s = cfg.students[0]
    torch.manual_seed(seed + 1)
    options = models.options_of(teacher)
    if s.init_from_teacher:
        model = models.create(s.model, classes, 1, s.drop_rate, s.drop_path_rate,
                              options=replace(options, stem=s.stem or options.stem))  # fmt: skip
        model.load_state_dict(teacher.state_dict())
    else:
        model = models.create(s.model, classes, 1, s.drop_rate, s.drop_path_rate,
                              stem=s.stem or options.stem, model_kwargs=s.model_kwargs)  # fmt: skip
    images, targets, _ = pseudo
    return engine.fit(
        model,
        training_data.TensorRows(
            data.labelled.images, engine.one_hot(data.labelled.labels, classes, s.label_smoothing)
        ),
        train.schedule(s),
        train.noise(s, 28, 28),
        seed + 1,
        pseudo=training_data.TensorRows(images, targets),
    )


# ---------------------------------------------------------------- the run and its table


def seed_data(cfg: PipelineConfig, seed: int, quick: bool, state: dict[str, Any]) -> Data:
    """The splits of `seed`, loaded once while a process measures that seed (in `state`)."""
    if state.get("seed") != seed:
        state.clear()
        state.update(seed=seed, data=load_data(cfg, seed, 4000 if quick else None))
    return state["data"]


def measure(
    name: str, seed: int, quick: bool, state: dict[str, Any], arms: dict[str, Any]
) -> dict[str, Any]:
    """One arm on one seed: its teacher (cached), pseudo labels and student, judged; before
    the student trains, says if no demo row of `arms` (the table so far) can pair it."""
    cfg = arm_config(name, quick)
    classes = 10
    data = seed_data(cfg, seed, quick, state)
    start = time.perf_counter()
    teacher, teacher_dev, teacher_test = teacher_for(cfg, data, seed, classes, quick)
    teacher_accuracies = {
        "teacher_dev_accuracy": float(teacher_dev.mean()),
        "teacher_test_accuracy": float(teacher_test.mean()),
    }
    if warning := unpaired(name, seed, teacher_accuracies, arms):
        print(warning, flush=True)
    pseudo = pseudo_labels(cfg, teacher, data, classes, seed)
    fit = train_student(cfg, teacher, data, pseudo, classes, seed)
    dev, test = _right(fit.model, data.dev), _right(fit.model, data.test)
    return {
        "config": fingerprint(cfg),
        **teacher_accuracies,
        "pseudo_label_accuracy": pseudo[2],
        "pseudo_labelled_images": len(pseudo[0]),
        "dev_accuracy": float(dev.mean()),
        "test_accuracy": float(test.mean()),
        "gain_on_test": float(test.mean() - teacher_test.mean()),
        "dev_right": _packed(dev),
        "dev_images": len(dev),
        "test_right": _packed(test),
        "test_images": len(test),
        "student_seconds": round(fit.seconds, 1),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
        "hardware": hardware(),
    }


def _pts(x: float) -> str:
    return f"{100 * x:+.2f}"


def paired_cells(
    diffs: list[float], ps: list[float], interval: tuple[float, float, float] | None
) -> tuple[str, str]:
    """A table's two cells for paired differences: per seed with its p, and the mean
    [95% t interval] (empty without one)."""
    per_seed = ", ".join(f"{_pts(d)} ({p:.3f})" for d, p in zip(diffs, ps, strict=True))
    mean = f"{_pts(interval[0])} [{_pts(interval[1])}, {_pts(interval[2])}]" if interval else ""
    return per_seed, mean


def machines(result: dict[str, Any]) -> list[str]:
    """A table's line saying where its seeds ran, when not all on the machine of the last
    write (`result`: arms -> seed -> run; a run without its own `hardware`, written before
    runs kept one, counts as the file's). A seed whose arms ran on two machines is named
    under both. The minutes column differs by machine, and the reader must know."""
    where: dict[str, set[int]] = {}
    for runs in result["arms"].values():
        for seed, run in runs.items():
            machine = describe(run.get("hardware", result["hardware"]))
            where.setdefault(machine, set()).add(int(seed))
    if len(where) < 2:
        return []
    said = [
        f"seeds {', '.join(map(str, sorted(seeds)))} on {machine}"
        for machine, seeds in where.items()
    ]
    return ["", "The seeds ran on more than one machine: " + "; ".join(said) + "."]


def changes_teacher(name: str) -> bool:
    return any(key.startswith("teacher.") for key in ARMS[name][1])


def reference(name: str, seed: str, run: dict[str, Any], arms: dict[str, Any]) -> dict | None:
    """The demo run that `name`'s run on `seed` is compared with. An arm that keeps the
    demo's teacher: the demo trained from the very same teacher (the same accuracies on
    development and test), whichever draw of the teachers it was measured with (BASES), so
    that the difference is the student's alone. An arm that changes the teacher: the demo
    from the teachers the harness seeds as it seeds the arm's (SECOND_BASE: the same
    initial weights and batch order, only the change differs), or where that seed has none,
    the first demo row (other draws)."""
    if name in BASES:
        return None
    if changes_teacher(name):
        return arms.get(SECOND_BASE, {}).get(seed) or arms.get(BASE, {}).get(seed)
    for base in BASES:
        b = arms.get(base, {}).get(seed)
        if b is not None and all(
            b[k] == run[k] for k in ("teacher_dev_accuracy", "teacher_test_accuracy")
        ):
            return b
    return None


def unpaired(
    name: str, seed: int, teacher_accuracies: dict[str, float], arms: dict[str, Any]
) -> str | None:
    """A warning line, before `name`'s student trains on `seed`, when the table has no demo
    row from this very teacher (its `teacher_accuracies`, as a run records them) to compare
    it with (`reference`): the teacher cache is per machine, and another machine trains
    other draws of the teachers. None when it can be paired, or needs no pairing (a base; an
    arm that changes the teacher)."""
    if name in BASES or changes_teacher(name):
        return None
    if reference(name, str(seed), teacher_accuracies, arms) is not None:
        return None
    return (
        f"warning: {name!r} seed {seed}: no demo row from this teacher (test "
        f"{100 * teacher_accuracies['teacher_test_accuracy']:.2f}%; the teacher cache is per "
        "machine) "
        f"in {', '.join(repr(b) for b in BASES)}: its student will have no paired comparison; "
        "measure a demo from this machine's teachers first (a new entry of BASES)"
    )


def paired_on_dev(pairs: Any) -> tuple[list[float], list[float]]:
    """For each (run, base) pair judged on the same development images (a missing base is
    skipped): the run's difference in accuracy from the base and its exact McNemar p."""
    diffs, ps = [], []
    for run, base in pairs:
        if base is not None:
            paired = statistics.mcnemar(
                _unpacked(run["dev_right"], run["dev_images"]),
                _unpacked(base["dev_right"], base["dev_images"]),
            )
            diffs.append(paired.difference)
            ps.append(paired.p_value)
    return diffs, ps


def summary(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per arm: its seeds, dev accuracy, difference from the demo on dev (per seed with
    McNemar's p, and the mean with a t interval over seeds; against `reference`) and the
    gain on test."""
    out = {}
    for name in ARMS:
        runs = result["arms"].get(name, {})
        seeds = sorted(runs, key=int)
        diffs, ps = paired_on_dev(
            (runs[seed], reference(name, seed, runs[seed], result["arms"])) for seed in seeds
        )
        out[name] = {
            "seeds": seeds,
            "dev": [runs[s]["dev_accuracy"] for s in seeds],
            "test": [runs[s]["test_accuracy"] for s in seeds],
            "teacher_test": [runs[s]["teacher_test_accuracy"] for s in seeds],
            "gain": [runs[s]["gain_on_test"] for s in seeds],
            "minutes": [runs[s]["student_seconds"] / 60 for s in seeds],
            "diff_vs_demo": diffs,
            "p_vs_demo": ps,
            "diff_interval": statistics.t_interval(diffs),
        }
    return out


def markdown(result: dict[str, Any]) -> str:
    rows = summary(result)
    lines = [
        "# The demo's recipe, measured over seeds",
        "",
        f"Last written {result['date']}. {describe(result['hardware'])} "
        f"(torch {result['hardware']['torch']}), one torch thread per process. "
        "Command: `uv run python -m benchmarks.demo_recipe` (the seeds and arms as the rows "
        "say).",
        *machines(result),
        "",
        "Each arm is `pipeline_config/fashion_mnist.yaml` with its student's 4 passes and "
        "fp32 (the demo as it ran when the arms were measured) and the overrides named; "
        "each seed draws the demo's 1,000 labelled images anew and sets 5,000 others apart as the "
        "development split (the pool: the rest). Choices are made on development: the "
        "difference from the demo on the same images, per seed (exact McNemar p), and its "
        "mean over seeds (95% t interval); an arm that keeps the demo's teacher is compared "
        "with the demo trained from the same teacher (of the two demo rows, the one with that "
        "teacher; none: no comparison), an arm that changes it with the demo from the plain "
        "teacher of the same seeding (`demo: later teachers`; where a seed lacks it, the "
        "first demo row). "
        "Test: the student's accuracy and its gain over its own teacher, per seed, as the "
        "demo prints them.",
        "",
        "| arm | overrides | seeds | dev accuracy | vs demo on dev, per seed (p) | mean vs demo "
        "[95%] | test: teacher -> student (gain) | student min |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (_, overrides) in ARMS.items():
        r = rows[name]
        sets = " ".join(f"`{k}={json.dumps(v)}`" for k, v in overrides.items()) or "none"
        if not r["seeds"]:
            lines.append(f"| {name} | {sets} | not yet run | | | | | |")
            continue
        dev = ", ".join(f"{100 * d:.2f}" for d in r["dev"])
        per_seed, mean = paired_cells(r["diff_vs_demo"], r["p_vs_demo"], r["diff_interval"])
        test = "; ".join(
            f"{100 * t:.2f} -> {100 * s:.2f} ({_pts(g)})"
            for t, s, g in zip(r["teacher_test"], r["test"], r["gain"], strict=True)
        )
        minutes = f"{stats.fmean(r['minutes']):.1f}"
        lines.append(
            f"| {name} | {sets} | {', '.join(r['seeds'])} | {dev} | {per_seed} | {mean} | "
            f"{test} | {minutes} |"
        )
    lines += [
        "",
        "What each arm changes: " + "; ".join(f"**{n}**: {w}" for n, (w, _) in ARMS.items()) + ".",
    ]
    return "\n".join(lines) + "\n"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _save(
    path: Path,
    result: dict[str, Any],
    claim: str | None = None,
    render: Callable[[dict[str, Any]], str] | None = None,
) -> bool:
    """Write the result file, merging what other processes saved since: under a lock,
    every (arm, seed) in the file and not here joins this one's, and so do their claims
    ("arm|seed": pid) on what they are measuring. With `claim`, take that (arm, seed) for
    this process first: False, writing nothing, if it is measured or claimed by a live one.
    The table beside it is `render(result)` (this module's `markdown` if not given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        file = json.loads(path.read_text()) if path.exists() else {}
        for name, runs in file.get("arms", {}).items():
            mine = result["arms"].setdefault(name, {})
            mine |= {seed: r for seed, r in runs.items() if seed not in mine}
        running = {
            key: pid
            for key, pid in file.get("running", {}).items()
            if pid != os.getpid() and _alive(pid)
        }
        if claim is not None:
            name, seed = claim.split("|")
            if seed in result["arms"].get(name, {}) or claim in running:
                return False
            running[claim] = os.getpid()
        result["running"] = running
        result["date"] = datetime.now(UTC).isoformat(timespec="seconds")
        result["hardware"] = hardware()
        tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(path)
        path.with_suffix(".md").write_text((render or markdown)(result))
    return True


def measure_shared(
    path: Path,
    result: dict[str, Any],
    seeds: list[int],
    names: list[str],
    measure_one: Callable[[str, int], dict[str, Any]],
    said: Callable[[dict[str, Any]], str],
    render: Callable[[dict[str, Any]], str] | None = None,
) -> None:
    """Measure each (name, seed) that no process has measured or is measuring (`_save`'s
    claims), print `said` of it, and save the file after each."""
    for seed in seeds:
        for name in names:
            if not _save(path, result, claim=f"{name}|{seed}", render=render):
                continue  # measured, or being measured by another process
            r = measure_one(name, seed)
            result["arms"].setdefault(name, {})[str(seed)] = r
            print(f"{name}, seed {seed}: {said(r)}", flush=True)
            _save(path, result, render=render)


def refuse_other_configs(
    path: Path, result: dict[str, Any], today: dict[str, str], kind: str, how: str
) -> None:
    """Stop, naming the file and the row, if a row of `result` was measured with another
    config than its name's `today` (a fingerprint): new rows are not mixed with it."""
    for name, runs in result["arms"].items():
        for seed, r in runs.items():
            if name in today and r.get("config") != today[name]:
                raise SystemExit(
                    f"{path}: {kind} {name!r} seed {seed} was measured {how}: move the file "
                    "away to measure anew"
                )


def read_result(
    path: Path, report: bool, render: Callable[[dict[str, Any]], str]
) -> dict[str, Any] | None:
    """The result file (empty when there is none yet); with `report`, its table written
    again by `render` and printed instead, and None: nothing is to be measured."""
    result = json.loads(path.read_text()) if path.exists() else {"arms": {}}
    if not report:
        return result
    if not path.exists():
        raise SystemExit(f"{path}: no results to report")
    path.with_suffix(".md").write_text(render(result))
    print(path.with_suffix(".md").read_text())
    return None


def arguments(
    argv: list[str] | None, doc: str, option: str, noun: str, names: Any
) -> argparse.Namespace:
    """A seeds benchmark's command line: --seeds, `--<option>` (some of `names`, each a
    `noun`; an unknown one stops with a one-line error naming it), --quick and --report."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(f"--{option}", nargs="+", metavar=noun.upper(), help="only these")
    parser.add_argument("--quick", action="store_true", help="a slice, to check the harness")
    parser.add_argument(
        "--report", action="store_true", help="write the table again, train nothing"
    )
    args = parser.parse_args(argv)
    unknown = [n for n in getattr(args, option) or [] if n not in names]
    if unknown:
        raise SystemExit(
            f"--{option}: unknown {noun} {unknown[0]!r} ({option}: {', '.join(names)})"
        )
    return args


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv, __doc__, "arms", "arm", ARMS)
    flush_denormals()
    path = RESULTS / ("demo-recipe-quick.json" if args.quick else "demo-recipe.json")
    result = read_result(path, args.report, markdown)
    if result is None:
        return
    refuse_other_configs(
        path,
        result,
        {name: fingerprint(arm_config(name, args.quick)) for name in ARMS},
        "arm",
        "on another config than the arm's today (the demo's config or the arm changed)",
    )
    state: dict[str, Any] = {}
    measure_shared(
        path,
        result,
        args.seeds,
        # the bases first, so that a base asked for beside an arm can pair it
        sorted(args.arms or list(ARMS), key=lambda name: name not in BASES),
        lambda name, seed: measure(name, seed, args.quick, state, result["arms"]),
        lambda r: (
            f"dev {100 * r['dev_accuracy']:.2f}%, test {100 * r['teacher_test_accuracy']:.2f}% "
            f"-> {100 * r['test_accuracy']:.2f}% ({r['student_seconds']:.0f} s)"
        ),
    )
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
