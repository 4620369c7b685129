"""Do convolutions on maps smaller than their kernels pay (noisy_student/training/
small_maps.py)? The demo's training loop, training step, labelling stage and forward pass,
each with nn.Conv2d throughout ("plain", as before small_maps existed) and with the
networks `models.create` builds today ("small maps"), interleaved (plain, small maps,
plain, ...) so that a change in the machine's load hits both, with the ratio pair by pair.
benchmarks.precision's harness; the same measures, in fp32.

Both compute the same network (tests/test_small_maps.py checks outputs and gradients), so
this is a speed measurement only. At 28 px the demo's resnet10t has 1x1 maps in its last
stage; the accuracy preset's half-stem network keeps 2x2 ones, where every tap of a 3x3
kernel reaches some pixel: its training step is measured too, as a control that should
not move.

    uv run python -m benchmarks.small_maps          # about 10 minutes on 2 CPU cores
    uv run python -m benchmarks.small_maps --quick  # a slice, to check the harness

Writes benchmarks/results/small-maps-cpu-<isa>.json and .md, one pair per kind of CPU
kernel torch uses (avx2, avx512: the ratio depends on it), small-maps-gpu.* on a CUDA
machine, *-quick.* with --quick.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from benchmarks import perf, precision
from noisy_student import config
from noisy_student.training.engine import flush_denormals
from noisy_student.training.small_maps import plain_convolutions

ARMS = (
    precision.Arm("plain", "fp32", plain_convolutions),
    precision.Arm("small maps", "fp32"),
)
CONTROL = precision.REPO / "pipeline_config" / "accuracy.yaml"
CONTROL_MEASURE = "training step alone, the accuracy preset's student (control)"


def control(quick: bool, rounds: int) -> dict[str, list[float]]:
    """The accuracy preset's student's training step, both ways, on 28-px tensors."""
    student = config.load(CONTROL).students[0]
    steps = precision.QUICK[4] if quick else precision.FULL[4]
    rates: dict[str, list[float]] = {}
    for r in range(rounds):
        for arm in ARMS:
            with arm.building():
                rate = perf.synthetic_train_rate(student, 10, 1, 28, 28, steps)
            rates.setdefault(arm.name, []).append(rate)
            print(f"round {r + 1}, {arm.name}: control step {rate:.0f} images/s", flush=True)
    return rates


def markdown(result: dict[str, Any], command: str) -> str:
    hw = result["hardware"]
    lines = [
        "# Convolutions on small maps: without the taps that only see padding",
        "",
        f"{result['date']}. {hw['cpu']}, {hw['cpu_cores']} cores, {hw['torch_threads']} torch "
        f"threads, load average {hw['load_average_1min']:.2f} at the end, torch {hw['torch']}. "
        f"Command: `{command}`.",
        "",
        f"Each round runs every measure with plain nn.Conv2d, then with the small-map "
        f"convolutions `models.create` builds; {result['rounds']} round(s), fp32. Training: the "
        f"demo's student ({result['student_model']}, batches of {result['student_batch']}), "
        f"one pass over {result['unlabelled_images']:,} pseudo-labelled images and the "
        f"labelled ones. Labelling: the demo's teacher ({result['teacher_model']}, batches of "
        f"{result['inference_batch']}) over the same unlabelled images. The control: "
        "the accuracy preset's half-stem student, whose 2x2 maps need every tap.",
        "",
    ]
    return "\n".join(lines + precision.table(result, ("plain", "small maps"))) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a slice, to check the harness")
    parser.add_argument(
        "--workdir", type=Path, default=precision.REPO / "artifacts" / "bench-small-maps"
    )
    args = parser.parse_args(argv)
    flush_denormals()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    cfg = config.load(precision.PRESET)
    command = " ".join(["uv run python -m benchmarks.small_maps", *(argv or sys.argv[1:])])
    result = precision.measure(cfg, args.workdir, args.quick, ARMS)
    rates = control(args.quick, result["rounds"])
    result["rates"][CONTROL_MEASURE] = rates
    result["ratios"][CONTROL_MEASURE] = precision.ratios(rates, "plain", "small maps")
    result["command"] = command
    perf.write_results("small-maps", args.quick, result, markdown(result, command), per_isa=True)


if __name__ == "__main__":
    main()
