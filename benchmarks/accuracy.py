"""Does Noisy Student work here? The accuracy table on Fashion-MNIST, 100 labels per class.

Rows, all in one architecture family and on the same split:
- the supervised teacher (1,000 labels) and the students of iterations 1-3, from one run
  of the real flow on `pipeline_config/accuracy.yaml`;
- three ablations of iteration 1's student, each trained from the same teacher and the
  same pseudo labels as the real one: no noise (no RandAugment, dropout or stochastic
  depth), hard instead of soft labels, no class balancing;
- the fully supervised reference: the largest student's architecture and recipe on all
  60,000 labels (the ceiling).

    uv run python -m benchmarks.accuracy            # the table (hours on 2 CPU cores)
    uv run python -m benchmarks.accuracy --quick    # every row on a slice, to check the harness

Writes benchmarks/results/accuracy.json and accuracy.md (or accuracy-quick.*), with the
command, seed, hardware and wall time of every row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from benchmarks.machine import cpu_name
from noisy_student import config, dataset, dataset_writer, ingest, storage
from noisy_student.config import PipelineConfig
from noisy_student.engine import flush_denormals

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
PRESET = REPO / "pipeline_config" / "accuracy.yaml"
# A slice and tiny models: every row runs, in a few minutes, to check the harness.
QUICK = [
    "data.root=./artifacts/datasets/fashion-mnist-accuracy-quick",
    "data.fashion_mnist.unlabelled_limit=3000",
    "data.fashion_mnist.test_limit=1000",
    "data.fashion_mnist.rows_per_shard=1500",
    "teacher.model=test_resnet",
    "teacher.epochs=10",
    "teacher.eval_every=10",
    "evaluation.corruption_images=100",
    # one epoch of a tiny student leaves it unsure of nearly everything
    "selection.min_confidence=0.1",
    "evaluation.severities=[3]",
]


def hardware() -> dict[str, Any]:
    cpu = cpu_name()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def reference_dataset(root: str, source: str, limit: int | None = None) -> str:
    """Every training image labelled (the first `limit` with --quick), and the whole test set."""
    root = storage.resolve(root)
    if storage.exists(storage.join(root, dataset.TEST, dataset.MANIFEST)):
        return root
    x = ingest.read_idx(storage.join(source, "train-images-idx3-ubyte.gz"))
    y = ingest.read_idx(storage.join(source, "train-labels-idx1-ubyte.gz"))
    xt = ingest.read_idx(storage.join(source, "t10k-images-idx3-ubyte.gz"))
    yt = ingest.read_idx(storage.join(source, "t10k-labels-idx1-ubyte.gz"))
    classes = ingest.FASHION_MNIST_CLASSES
    rows = ((f"train-{i:05d}", x[i], int(y[i])) for i in range(min(len(y), limit or len(y))))
    dataset_writer.write_rows(storage.join(root, dataset.LABELLED), dataset.LABELLED, classes, rows)
    test = ((f"test-{i:05d}", xt[i], int(yt[i])) for i in range(len(yt)))
    dataset_writer.write_rows(storage.join(root, dataset.TEST), dataset.TEST, classes, test)
    return root


def pseudo_label_shards(probabilities_url: str) -> list[Any]:
    from noisy_student.stages import PseudoLabelShard

    manifest = storage.read_json(storage.join(probabilities_url, dataset.MANIFEST))
    return [
        PseudoLabelShard(i, storage.join(probabilities_url, s["file"]), s["rows"], s["sha256"], 0)
        for i, s in enumerate(manifest["shards"])
    ]


def run(
    cfg: PipelineConfig, command: str, reference_epochs: int, reference_limit: int | None = None
) -> dict[str, Any]:
    from flows.noisy_student import noisy_student
    from noisy_student import stages

    started = time.perf_counter()
    summary = noisy_student(cfg)
    run_url, data_root = summary["artifacts_url"], summary["data_root"]
    parent = summary["mlflow"]["parent_run_id"]
    seed = cfg.seed
    rows: list[dict[str, Any]] = []

    def row(name: str, what: str, model: str, accuracy: float, seconds: float, **extra):
        rows.append(
            {
                "row": name,
                "what": what,
                "model": model,
                "test_accuracy": accuracy,
                "seed": seed,
                "wall_seconds": round(seconds, 1),
                **extra,
            }
        )
        print(f"{name}: {100 * accuracy:.2f}% ({model}, {seconds:.0f} s)", flush=True)

    first = summary["iterations"][0]
    row(
        "teacher",
        "supervised on the 1,000 labelled images",
        first["teacher"]["model"],
        first["teacher"]["test_accuracy"],
        first["stage_seconds"]["train_teacher"],
    )
    for it in summary["iterations"]:
        sec = it["stage_seconds"]
        row(
            f"student {it['iteration']}",
            f"Noisy Student iteration {it['iteration']} (teacher: "
            + ("the supervised teacher)" if it["iteration"] == 1 else "the previous student)"),
            it["student"]["model"],
            it["student"]["test_accuracy"],
            sec["infer_pseudo_labels"] + sec["filter_and_balance"] + sec["train_student"],
            pseudo_label_accuracy=it["pseudo_labels"]["accuracy"],
        )

    # Ablations of iteration 1's student: same teacher, same pseudo labels, one change each.
    teacher = stages.TrainedModel(
        "teacher",
        1,
        first["teacher"]["model"],
        first["teacher"]["url"],
        first["teacher"]["mlflow_run_id"],
        first["teacher"]["test_accuracy"],
        0.0,
    )
    shards = pseudo_label_shards(first["pseudo_labels"]["probabilities_url"])
    student_cfg = cfg.students[0]
    ablations = {
        "no noise": (
            "iteration 1 without RandAugment, dropout or stochastic depth",
            cfg.selection,
            student_cfg.model_copy(
                update={"rand_augment": None, "drop_rate": 0.0, "drop_path_rate": 0.0}
            ),
        ),
        "hard labels": (
            "iteration 1 with hard pseudo labels (label smoothing "
            f"{cfg.selection.hard_label_smoothing})",
            cfg.selection.model_copy(update={"labels": "hard"}),
            student_cfg,
        ),
        "no balancing": (
            "iteration 1 without class balancing",
            cfg.selection.model_copy(update={"balance": False}),
            student_cfg,
        ),
    }
    for name, (what, selection_cfg, train_cfg) in ablations.items():
        start = time.perf_counter()
        here = storage.join(run_url, "ablations", name.replace(" ", "-"))
        selected = stages.filter_and_balance(
            shards,
            selection_cfg,
            data_root,
            first["pseudo_labels"]["probabilities_url"],
            storage.join(here, "selected"),
            teacher,
            parent,
            1,
            seed,
        )
        student = stages.train_student(
            train_cfg, data_root, selected, teacher, storage.join(here, "student"), parent, 1, seed
        )
        seconds = time.perf_counter() - start
        row(f"ablation: {name}", what, student.model, student.test_accuracy, seconds)

    # The ceiling: the last student's architecture and recipe, every training label.
    start = time.perf_counter()
    source = cfg.data.fashion_mnist.source
    name = "fashion-mnist-all" if reference_limit is None else f"fashion-mnist-{reference_limit}"
    ref_root = reference_dataset(
        storage.join(cfg.artifacts, "datasets", name), source, reference_limit
    )
    last = cfg.students[-1]
    recipe = last.model_dump(include=set(config.TrainConfig.model_fields))
    reference_cfg = config.TeacherConfig(**{**recipe, "epochs": reference_epochs})
    reference = stages.train_teacher(
        reference_cfg, ref_root, storage.join(run_url, "reference"), parent, seed
    )
    row(
        "fully supervised",
        "all 60,000 training labels (the ceiling)",
        reference.model,
        reference.test_accuracy,
        time.perf_counter() - start,
    )
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "config": cfg.model_dump(),
        "hardware": hardware(),
        "run_id": summary["run_id"],
        "mlflow": summary["mlflow"],
        "wall_seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    hw = result["hardware"]
    device = hw["gpu"] or f"{hw['cpu']}, {hw['cpu_cores']} cores, no GPU"
    lines = [
        "# Accuracy: Noisy Student on Fashion-MNIST, 100 labels per class",
        "",
        f"Measured {result['date']} on {device} (torch {hw['torch']}), one seed "
        f"({result['rows'][0]['seed']}); whole benchmark {result['wall_seconds'] / 60:.0f} "
        "minutes.",
        "",
        f"Command: `{result['command']}` (config: `pipeline_config/accuracy.yaml`; "
        f"pipeline run `{result['run_id']}`, MLflow parent run "
        f"`{result['mlflow']['parent_run_id']}`).",
        "",
        "| row | model | test accuracy | pseudo labels right | wall time | what |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        pl = r.get("pseudo_label_accuracy")
        lines.append(
            f"| {r['row']} | {r['model']} | {100 * r['test_accuracy']:.2f}% | "
            f"{'' if pl is None else f'{100 * pl:.2f}%'} | {r['wall_seconds'] / 60:.1f} min | "
            f"{r['what']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every row on a slice, in minutes")
    parser.add_argument("--reference-epochs", type=int, default=30)
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = parser.parse_args(argv)
    flush_denormals()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    overrides = (QUICK if args.quick else []) + args.set
    if args.quick:
        overrides += [
            f"students.{i}.{key}"
            for i in range(len(config.load(PRESET).students))
            for key in ("model=test_resnet", "epochs=1")
        ]
        args.reference_epochs, reference_limit = 1, 6000
    else:
        reference_limit = None
    cfg = config.load(PRESET, overrides)
    command = " ".join(["uv run python -m benchmarks.accuracy", *(argv or sys.argv[1:])])
    result = run(cfg, command, args.reference_epochs, reference_limit)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "accuracy-quick" if args.quick else "accuracy"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"written: {RESULTS / stem}.md and .json")


if __name__ == "__main__":
    main()
