"""Does a larger student trained from scratch beat its teacher under the documented defaults?

For each timm family below, one run of the real flow on the demo's data (Fashion-MNIST, 100
labels per class): the demo teacher's recipe on the family's smaller network, then one
student of the family's larger network whose config names the model and nothing else, so
every other key is at its documented default (docs/configuration.md: from scratch, not
initialised from the teacher, `students[].epochs` passes over the pseudo-labelled images,
RandAugment, dropout, stochastic depth). The robustness stage runs on one corruption only:
this benchmark is about clean accuracy.

    uv run python -m benchmarks.scratch_students             # both families (about 40 minutes)
    uv run python -m benchmarks.scratch_students --family mobilenetv3
    uv run python -m benchmarks.scratch_students --quick     # a slice, to check the harness

Writes benchmarks/results/scratch-students.json and .md (scratch-students-quick.* with
--quick): per family the teacher's and the student's test accuracy, the gain, the wall time
of each stage and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.accuracy import hardware
from benchmarks.machine import describe
from noisy_student import config
from noisy_student.config import StudentConfig
from noisy_student.training.engine import flush_denormals

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
PRESET = REPO / "pipeline_config" / "fashion_mnist.yaml"
# family -> (teacher, larger student); parameter counts at 10 classes, one channel
FAMILIES = {
    "resnet": ("resnet10t", "resnet18d"),  # 4.9M -> 11.2M
    "mobilenetv3": ("mobilenetv3_small_100", "mobilenetv3_large_100"),  # 1.5M -> 4.2M
}
EVALUATION = [
    "evaluation.corruptions=[gaussian_noise]",
    "evaluation.severities=[3]",
    "evaluation.fgsm_epsilons=[]",
]
QUICK = [
    "data.root=./artifacts/datasets/fashion-mnist-scratch-quick",
    "data.fashion_mnist.unlabelled_limit=3000",
    "data.fashion_mnist.test_limit=1000",
    "data.fashion_mnist.rows_per_shard=1500",
    "teacher.epochs=5",
    "teacher.eval_every=5",
    "evaluation.corruption_images=100",
    "selection.min_confidence=0.1",
]


def measure(family: str, quick: bool, command: str) -> dict[str, Any]:
    from flows.noisy_student import noisy_student

    teacher, student = FAMILIES[family]
    overrides = [f"name=scratch-students-{family}", f"teacher.model={teacher}", *EVALUATION]
    cfg = config.load(PRESET, overrides + (QUICK if quick else []))
    student_cfg = StudentConfig(model=student, **({"epochs": 1} if quick else {}))
    cfg = cfg.model_copy(update={"students": [student_cfg]})
    started = time.perf_counter()
    summary = noisy_student(cfg)
    it = summary["iterations"][0]
    t_acc, s_acc = it["teacher"]["test_accuracy"], it["student"]["test_accuracy"]
    print(
        f"{family}: teacher {teacher} {100 * t_acc:.2f}% -> student {student} "
        f"{100 * s_acc:.2f}% ({100 * (s_acc - t_acc):+.2f} points)",
        flush=True,
    )
    return {
        "family": family,
        "teacher": teacher,
        "student": student,
        "teacher_test_accuracy": t_acc,
        "student_test_accuracy": s_acc,
        "gain_points": round(100 * (s_acc - t_acc), 2),
        "pseudo_label_accuracy": it["pseudo_labels"]["accuracy"],
        "student_config": student_cfg.model_dump(),
        "stage_seconds": it["stage_seconds"],
        "wall_seconds": round(time.perf_counter() - started, 1),
        "run_id": summary["run_id"],
        "seed": cfg.seed,
        "command": command,
    }


def markdown(result: dict[str, Any]) -> str:
    hw = result["hardware"]
    device = describe(hw)
    first = result["rows"][0]["student_config"]
    lines = [
        "# Larger students from scratch, under the documented defaults",
        "",
        f"Measured {result['date']} on {device} (torch {hw['torch']}), seed "
        f"{result['rows'][0]['seed']}, Fashion-MNIST with 100 labels per class (the demo's "
        "data and teacher recipe). Each student's config names its model only: "
        f"{first['epochs']} epochs from scratch, batch {first['batch_size']} labelled + "
        f"{first['unlabelled_ratio']:g}x pseudo-labelled, lr {first['lr']}, RandAugment "
        f"N={first['rand_augment']['num_ops']} M={first['rand_augment']['magnitude']:g}, "
        f"dropout {first['drop_rate']}, stochastic depth {first['drop_path_rate']}.",
        "",
        "| family | teacher | teacher accuracy | student (from scratch) | student accuracy "
        "| gain | pseudo labels right | student stage | command |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['family']} | {r['teacher']} | {100 * r['teacher_test_accuracy']:.2f}% | "
            f"{r['student']} | {100 * r['student_test_accuracy']:.2f}% | "
            f"{r['gain_points']:+.2f} | {100 * r['pseudo_label_accuracy']:.2f}% | "
            f"{r['stage_seconds']['train_student'] / 60:.1f} min | `{r['command']}` |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), action="append")
    parser.add_argument("--quick", action="store_true", help="a slice, to check the harness")
    args = parser.parse_args(argv)
    flush_denormals()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    stem = "scratch-students-quick" if args.quick else "scratch-students"
    out = RESULTS / f"{stem}.json"
    # a family measured alone replaces its own row and keeps the others'
    kept = json.loads(out.read_text())["rows"] if out.exists() and args.family else []
    rows = [r for r in kept if r["family"] not in (args.family or [])]
    for family in args.family or list(FAMILIES):
        command = " ".join(
            ["uv run python -m benchmarks.scratch_students", f"--family {family}"]
            + (["--quick"] if args.quick else [])
        )
        rows.append(measure(family, args.quick, command))
    rows.sort(key=lambda r: list(FAMILIES).index(r["family"]))
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "hardware": hardware(),
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"written: {RESULTS / stem}.md and .json")


if __name__ == "__main__":
    main()
