"""Does bfloat16 autocast pay on this machine? The demo's training loop and its labelling
stage, each in fp32 and in bf16, interleaved (fp32, bf16, fp32, bf16, ...) so that a change
in the machine's load hits both, with the ratio pair by pair:

- training: `engine.fit` for one pass over the selected rows, as `train_student` runs it
  (rows streamed from the shards, crop, flip and per-image RandAugment, dropout, stochastic
  depth, SGD, EMA), the demo's student and batch;
- labelling: `infer_pseudo_labels` over every unlabelled shard (read, decode, the teacher's
  forward pass, probabilities written), the demo's teacher and batch;
- the forward and training step alone, on tensors already in memory, for what the loop
  and the stage add around them.

    uv run python -m benchmarks.precision          # about 6 minutes on 2 CPU cores
    uv run python -m benchmarks.precision --quick  # a slice, to check the harness

Accuracy in bf16 is measured elsewhere: `benchmarks.demo_recipe`'s arm "precision: bf16".
Writes benchmarks/results/precision-cpu.json and .md (precision-gpu.* on a CUDA machine,
*-quick.* with --quick).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import torch

from benchmarks import perf
from noisy_student import config
from noisy_student.config import PipelineConfig
from noisy_student.data import dataset, storage
from noisy_student.registry import tracking
from noisy_student.training import models
from noisy_student.training.engine import flush_denormals

REPO = Path(__file__).resolve().parent.parent
PRESET = REPO / "pipeline_config" / "fashion_mnist.yaml"


class Arm(NamedTuple):
    """One side of the comparison: its name, the precision it runs in and the block its
    networks are built in (benchmarks.small_maps builds one side's with plain convolutions)."""

    name: str
    precision: str
    building: Callable[[], AbstractContextManager[Any]] = nullcontext


PRECISIONS = (Arm("fp32", "fp32"), Arm("bf16", "bf16"))
# unlabelled rows, rows per shard, test rows, interleaved rounds, synthetic steps
FULL = (16384, 8192, 500, 3, 20)
QUICK = (1024, 512, 200, 1, 3)


# torch's own probes of what the CPU computes bf16 with (private: absent on other builds)
PROBES = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def cpu_features() -> dict[str, bool]:
    """Each probe's answer, under its name without the leading underscore."""
    return {p.strip("_"): bool(getattr(torch.cpu, p, lambda: False)()) for p in PROBES}


def labelling_rate(data_root: str, teacher_url: str, out_url: str, batch: int, p: str) -> float:
    from noisy_student import stages

    manifest = dataset.read_manifest(storage.join(data_root, dataset.UNLABELLED))
    start = time.perf_counter()
    for i in range(len(manifest.shards)):
        stages.infer_pseudo_labels(data_root, i, teacher_url, out_url, batch, p)
    return manifest.num_rows / (time.perf_counter() - start)


def measure(
    cfg: PipelineConfig, workdir: Path, quick: bool, arms: tuple[Arm, Arm] = PRECISIONS
) -> dict[str, Any]:
    """Every measure for each arm in turn, round after round; the ratios are the second
    arm's rate over the first's, round by round."""
    from noisy_student import stages

    unlabelled, per_shard, test, rounds, steps = QUICK if quick else FULL
    sizes = perf.Sizes(unlabelled, per_shard, test, 0, 1, 1, 1, steps, 0, ())
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    data_root = perf.prepare(workdir, cfg.data.fashion_mnist.source, sizes)
    run_url = str(workdir / "runs" / datetime.now(UTC).strftime("%Y%m%d-%H%M%S"))
    parent = tracking.start_run("precision-benchmark", Path(run_url).name)
    # the speed of a forward pass does not hang on what the weights hold: one epoch will do
    teacher_cfg = cfg.teacher.model_copy(update={"epochs": 1, "eval_every": 1})
    teacher = stages.train_teacher(teacher_cfg, data_root, f"{run_url}/teacher", parent, 0)
    selected = perf.select_everything(data_root, f"{run_url}/selected")
    meta = models.load_meta(teacher.url)
    manifest = dataset.read_manifest(storage.join(data_root, dataset.UNLABELLED))
    plan = perf.batch_plan(manifest, cfg.inference.batch_size)
    student = cfg.students[0]
    rates: dict[str, dict[str, list[float]]] = {}
    for r in range(rounds):
        for arm in arms:
            p = arm.precision
            one = student.model_copy(update={"precision": p, "epochs": 1})
            with arm.building():
                got = {
                    "training loop": perf.loop_rate(one, data_root, selected.url, seed=r),
                    "training step alone": perf.synthetic_train_rate(
                        one, meta.num_classes, meta.in_chans, meta.height, meta.width, steps
                    ),
                    "labelling stage": labelling_rate(
                        data_root,
                        teacher.url,
                        f"{run_url}/pseudo-{arm.name.replace(' ', '-')}",
                        cfg.inference.batch_size,
                        p,
                    ),
                    "forward alone": perf.forward_rate(
                        models.load(teacher.url)[0],
                        plan,
                        meta.in_chans,
                        meta.height,
                        meta.width,
                        p,
                    ),
                }
            for what, rate in got.items():
                rates.setdefault(what, {}).setdefault(arm.name, []).append(rate)
                print(f"round {r + 1}, {arm.name}: {what} {rate:.0f} images/s", flush=True)
    tracking.end_run(parent)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "hardware": {**perf.hardware(), **cpu_features()},
        "student_model": student.model,
        "student_batch": perf.student_batch(student),
        "teacher_model": cfg.teacher.model,
        "inference_batch": cfg.inference.batch_size,
        "unlabelled_images": manifest.num_rows,
        "rounds": rounds,
        "rates": rates,
        "arms": [arm.name for arm in arms],
        "ratios": {what: ratios(by, arms[0].name, arms[1].name) for what, by in rates.items()},
    }


def ratios(rates: dict[str, list[float]], a: str, b: str) -> list[float]:
    """Arm b's rate over arm a's, round by round."""
    return [rb / ra for ra, rb in zip(rates[a], rates[b], strict=True)]


def markdown(result: dict[str, Any], command: str) -> str:
    hw = result["hardware"]
    features = ", ".join(p.strip("_") for p in PROBES if hw[p.strip("_")])
    lines = [
        "# bfloat16 autocast against fp32 on this machine",
        "",
        f"{result['date']}. {hw['cpu']}, {hw['cpu_cores']} cores, {hw['torch_threads']} torch "
        f"threads, load average {hw['load_average_1min']:.2f} at the end, torch {hw['torch']}; "
        f"the CPU's bf16 support as torch probes it: {features or 'none'}. Command: `{command}`.",
        "",
        f"Each round runs every measure in fp32, then in bf16; {result['rounds']} round(s). "
        f"Training: the demo's student ({result['student_model']}, batches of "
        f"{result['student_batch']}), one pass over {result['unlabelled_images']:,} "
        f"pseudo-labelled images and the labelled ones. Labelling: the demo's teacher "
        f"({result['teacher_model']}, batches of {result['inference_batch']}) over the same "
        "unlabelled images.",
        "",
    ]
    return "\n".join(lines + table(result, ("fp32", "bf16"))) + "\n"


def table(result: dict[str, Any], arms: tuple[str, str]) -> list[str]:
    """Each measure's median rate per arm, the second arm's over the first's round by
    round, and the median of those ratios."""
    a, b = arms
    lines = [
        f"| measure | {a} images/s (median) | {b} images/s (median) | {b} / {a}, per round "
        "| median |",
        "|---|---|---|---|---|",
    ]
    for what, by in result["rates"].items():
        ratios = result["ratios"][what]
        lines.append(
            f"| {what} | {statistics.median(by[a]):.0f} | {statistics.median(by[b]):.0f} "
            f"| {', '.join(f'{x:.2f}' for x in ratios)} | **{statistics.median(ratios):.2f}** |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a slice, to check the harness")
    parser.add_argument("--workdir", type=Path, default=REPO / "artifacts" / "bench-precision")
    args = parser.parse_args(argv)
    flush_denormals()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    cfg = config.load(PRESET)
    command = " ".join(["uv run python -m benchmarks.precision", *(argv or sys.argv[1:])])
    result = measure(cfg, args.workdir, args.quick)
    result["command"] = command
    perf.write_results("precision", args.quick, result, markdown(result, command))


if __name__ == "__main__":
    main()
