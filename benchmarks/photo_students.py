"""Do the documented defaults transfer? The same defaults as Fashion-MNIST's, on RGB photos.

No photo set can be downloaded here, so the photos are generated (benchmarks/scenes.py:
six classes in three confusable pairs, each scene with its own exposure, colour cast,
occluder and sensor noise, at random sizes), ingested as the README says for one's own
photos (`ingest image-folder --size 96 --format jpeg`), and run through the real flow. The
config names the networks and nothing else: every other key is at its documented default
(docs/configuration.md), RandAugment's settings chosen by the images' size (96 px: the
paper's photo settings). Two iterations, both students from scratch. The robustness stage
runs one corruption only, and the teacher is judged every 20 epochs: this benchmark is about
clean accuracy.

    uv run python -m benchmarks.photo_students            # about an hour on 2 CPU cores
    uv run python -m benchmarks.photo_students --quick    # a slice, to check the harness

Writes benchmarks/results/photo-students.json and .md (photo-students-quick.* with --quick):
per iteration the teacher's and the student's test accuracy with 95% intervals, the run's
verdict on the student against its teacher (a paired test), and the wall time of each stage.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import scenes
from benchmarks.accuracy import cpu_seconds, hardware
from benchmarks.machine import describe
from noisy_student import results
from noisy_student.config import PipelineConfig, StudentConfig, TeacherConfig
from noisy_student.data import ingest
from noisy_student.evaluation import statistics
from noisy_student.training.engine import flush_denormals

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
SIZE = 96
SEED = 0
# images per class: few labelled, many unlabelled, a test set that resolves a few points
COUNTS = {"labelled": 20, "unlabelled": 500, "test": 200}
QUICK_COUNTS = {"labelled": 5, "unlabelled": 40, "test": 20}
TEACHER, STUDENTS = "resnet10t", ("resnet18d", "resnet18d")


def generate(root: Path, counts: dict[str, int]) -> Path:
    """The ImageFolder of scenes (labelled/ and test/ by class, unlabelled/ flat), as JPEGs
    of varied quality; written once."""
    done = root / "complete"
    if done.exists():
        return root
    rng = np.random.default_rng(SEED)
    for split, per_class in counts.items():
        for cls in scenes.CLASSES:
            for i in range(per_class):
                folder = root / split / ("" if split == "unlabelled" else cls)
                folder.mkdir(parents=True, exist_ok=True)
                name = f"{cls}-{i:04d}.jpg" if split != "unlabelled" else f"u-{cls}-{i:04d}.jpg"
                scenes.photo(cls, rng, hard=True).save(
                    folder / name, quality=int(rng.integers(75, 96))
                )
    done.touch()
    return root


def pipeline_config(data_root: str, quick: bool) -> PipelineConfig:
    # evaluated every 20 epochs, as the presets do: at every epoch, judging 1,200 photos
    # would take five times the teacher's training
    teacher = {"model": TEACHER, "eval_every": 20, **({"epochs": 5} if quick else {})}
    return PipelineConfig(
        name="photo-students",
        artifacts="./artifacts",
        seed=SEED,
        data={"root": data_root},
        teacher=TeacherConfig(**teacher),
        inference={"batch_size": 256},
        # a 5-epoch teacher of --quick is unsure of nearly everything
        selection={"min_confidence": 0.1 if quick else 0.3},
        students=[StudentConfig(model=m, **({"epochs": 1} if quick else {})) for m in STUDENTS],
        evaluation={
            "corruptions": ["gaussian_noise"],
            "severities": [3],
            "fgsm_epsilons": [],
            "corruption_images": 200,
            "batch_size": 256,
        },
    )


def _accuracy(value: float, n: int) -> dict[str, Any]:
    return {"accuracy": value, "ci95": list(statistics.accuracy_interval(value, n))}


def measure(quick: bool) -> dict[str, Any]:
    from flows.noisy_student import noisy_student

    counts = QUICK_COUNTS if quick else COUNTS
    suffix = "-quick" if quick else ""
    folder = generate(REPO / "artifacts" / f"scenes{suffix}", counts)
    data_root = str(REPO / "artifacts" / "datasets" / f"scenes-{SIZE}{suffix}")
    if not (Path(data_root) / "test" / "_manifest.json").exists():
        ingest.image_folder(
            data_root,
            str(folder / "labelled"),
            str(folder / "unlabelled"),
            str(folder / "test"),
            image_size=SIZE,
            encoding="jpeg",
            quality=90,
        )
    cfg = pipeline_config(data_root, quick)
    started, cpu_start = time.perf_counter(), cpu_seconds()
    summary = noisy_student(cfg)
    n_test = counts["test"] * len(scenes.CLASSES)
    # the run's own verdicts: an exact McNemar test of each student against its teacher on
    # the same images (the test split here: the scenes have no validation split)
    verdicts = {k: v["verdict"] for k, v in results.verdicts(summary).items()}
    iterations = []
    for it in summary["iterations"]:
        t, s = it["teacher"]["test_accuracy"], it["student"]["test_accuracy"]
        iterations.append(
            {
                "iteration": it["iteration"],
                "teacher": {"model": it["teacher"]["model"], **_accuracy(t, n_test)},
                "student": {"model": it["student"]["model"], **_accuracy(s, n_test)},
                "against_its_teacher": verdicts.get(it["iteration"], "not tested"),
                "gain_points": round(100 * (s - t), 2),
                "stage_seconds": it["stage_seconds"],
            }
        )
    return {
        "images": {k: v * len(scenes.CLASSES) for k, v in counts.items()},
        "size": SIZE,
        "config": cfg.model_dump(mode="json"),
        "iterations": iterations,
        "run_id": summary["run_id"],
        "wall_seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(cpu_seconds() - cpu_start, 1),
    }


def _against(iteration: dict[str, Any]) -> str:
    """The run's paired verdict; results measured before the runs gave verdicts compared
    the two accuracies alone, and say so."""
    if "against_its_teacher" in iteration:
        return iteration["against_its_teacher"]
    beats = "above" if iteration["beats_its_teacher"] else "not above"
    return f"{beats} (accuracies compared alone, no test of chance)"


def markdown(result: dict[str, Any]) -> str:
    r = result
    student = r["config"]["students"][0]
    ra = student["rand_augment"]
    lines = [
        f"# The documented defaults on {r['size']}-px RGB photos",
        "",
        f"Measured {r['date']} on {describe(r['hardware'])} (torch {r['hardware']['torch']}), "
        f"seed {SEED}, command `{r['command']}`. Generated scenes (`benchmarks/scenes.py`, six "
        f"classes): {r['images']['labelled']} labelled, {r['images']['unlabelled']:,} "
        f"unlabelled, {r['images']['test']:,} test images, ingested at {r['size']} px as JPEG. "
        f"Teacher {TEACHER} and students {', '.join(STUDENTS)} at the documented defaults: "
        f"students from scratch, {student['epochs']} passes over the pseudo labels, "
        f"RandAugment N={ra['num_ops']} M={ra['magnitude']:g} with the photo settings, "
        f"dropout {student['drop_rate']}, stochastic depth {student['drop_path_rate']}. "
        f"Wall time {r['wall_seconds'] / 60:.0f} min, CPU time {r['cpu_seconds'] / 60:.0f} "
        "min.",
        "",
        "| iteration | teacher | teacher accuracy (95% CI) | student | student accuracy "
        "(95% CI) | gain | against its teacher (exact McNemar, alpha 0.05) | student stage |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for it in r["iterations"]:
        t, s = it["teacher"], it["student"]

        def acc(m: dict[str, Any]) -> str:
            return statistics.percent(m["accuracy"], m["ci95"])

        lines.append(
            f"| {it['iteration']} | {t['model']} | {acc(t)} | {s['model']} | {acc(s)} | "
            f"{it['gain_points']:+.2f} | {_against(it)} | "
            f"{it['stage_seconds']['train_student'] / 60:.1f} min |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a slice, to check the harness")
    args = parser.parse_args(argv)
    flush_denormals()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    stem = "photo-students-quick" if args.quick else "photo-students"
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "hardware": hardware(),
        "command": "uv run python -m benchmarks.photo_students"
        + (" --quick" if args.quick else ""),
        **measure(args.quick),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"written: {RESULTS / stem}.md and .json")


if __name__ == "__main__":
    main()
