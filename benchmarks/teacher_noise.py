"""The first teacher with noise: does a teacher trained on the labelled images with the
students' noise (RandAugment, dropout, stochastic depth) label better than one trained with
crops and flips only? From the second iteration on every teacher is a former student and
has learned with that noise; the first has not.

Each recipe trains the first teacher on the demo's 1,000 labelled images of a seed (the
draws of benchmarks.demo_recipe, whose teacher cache it shares: a recipe that an arm there
also trains is trained once) and is judged on that seed's 5,000 development images, where
choices are made (the difference from the plain teacher of the same network on the same
images, exact McNemar p, and its mean over seeds with a 95% t interval), and on the 10,000
test images (reported, never used to choose).

    uv run python -m benchmarks.teacher_noise                       # seeds 0 1 2, every recipe
    uv run python -m benchmarks.teacher_noise --seeds 1 --recipes NAME...

Processes started side by side share the work: each takes a (recipe, seed) no other has
taken. Writes benchmarks/results/teacher-noise.{json,md} after every teacher (-quick with
--quick); a killed run goes on where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from benchmarks import demo_recipe
from benchmarks.accuracy import hardware
from benchmarks.machine import describe
from benchmarks.student_recipe import _packed
from noisy_student.config import PipelineConfig
from noisy_student.evaluation import statistics
from noisy_student.training.engine import flush_denormals

RESULTS = demo_recipe.RESULTS
NOISE = demo_recipe.TEACHER_NOISE  # the students' RandAugment, N=2, M=9
MODEL_NOISE = {"teacher.drop_rate": 0.5, "teacher.drop_path_rate": 0.2}  # and theirs
# the accuracy preset's network (pipeline_config/accuracy.yaml)
WIDE_MAPS = {
    "teacher.model": "resnet18d",
    "teacher.stem": "half",
    "teacher.model_kwargs": {"channels": [32, 64, 128, 256], "stem_width": 16},
}
# name -> (what, overrides of the demo's config; the plain teacher of its network)
RECIPES: dict[str, tuple[str, dict[str, Any], str]] = {
    "plain": ("the demo's teacher: resnet10t, crops and flips, 100 epochs", {}, "plain"),
    "RandAugment": (
        "and RandAugment N=2, M=9 (the students' small-image settings)",
        NOISE,
        "plain",
    ),
    "RandAugment, dropout, stochastic depth": (
        "and the students' dropout 0.5 and stochastic depth 0.2",
        NOISE | MODEL_NOISE,
        "plain",
    ),
    "RandAugment, 200 epochs": (
        "RandAugment for twice the epochs (noise slows learning)",
        NOISE | {"teacher.epochs": 200},
        "plain",
    ),
    "wide maps: plain": (
        "the accuracy preset's teacher: resnet18d, half stem, narrow stages, crops and flips",
        WIDE_MAPS,
        "wide maps: plain",
    ),
    "wide maps: all noise": (
        "that network with RandAugment, dropout and stochastic depth",
        WIDE_MAPS | NOISE | MODEL_NOISE,
        "wide maps: plain",
    ),
    "wide maps: RandAugment, 200 epochs": (
        "that network with RandAugment for twice the epochs",
        WIDE_MAPS | NOISE | {"teacher.epochs": 200},
        "wide maps: plain",
    ),
}


def recipe_config(name: str, quick: bool = False) -> PipelineConfig:
    return demo_recipe.demo_config(RECIPES[name][1], quick)


def fingerprint(cfg: PipelineConfig) -> str:
    """What a recipe trains with: its teacher's config."""
    return demo_recipe._key(cfg.teacher.model_dump())


def measure(name: str, seed: int, quick: bool, state: dict[str, Any]) -> dict[str, Any]:
    cfg = recipe_config(name, quick)
    data = demo_recipe.seed_data(cfg, seed, quick, state)
    start = time.perf_counter()
    _, dev, test = demo_recipe.teacher_for(cfg, data, seed, 10, quick)
    return {
        "config": fingerprint(cfg),
        "dev_accuracy": float(dev.mean()),
        "test_accuracy": float(test.mean()),
        "dev_right": _packed(dev),
        "dev_images": len(dev),
        "seconds": round(time.perf_counter() - start, 1),  # ~0 when the cache had it
        "threads": torch.get_num_threads(),
        "hardware": hardware(),
    }


def summary(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per recipe: its seeds, accuracies, and its difference on dev from the plain teacher
    of its network on the same seed (McNemar p per seed, t interval of the mean)."""
    out = {}
    for name, (_, _, base) in RECIPES.items():
        runs = result["arms"].get(name, {})
        seeds = sorted(runs, key=int)
        bases = result["arms"].get(base, {}) if name != base else {}
        diffs, ps = demo_recipe.paired_on_dev((runs[seed], bases.get(seed)) for seed in seeds)
        out[name] = {
            "seeds": seeds,
            "dev": [runs[s]["dev_accuracy"] for s in seeds],
            "test": [runs[s]["test_accuracy"] for s in seeds],
            "diffs": diffs,
            "ps": ps,
            "interval": statistics.t_interval(diffs),
        }
    return out


def _mean(values: list[float]) -> str:
    return f"{100 * sum(values) / len(values):.2f}" if values else ""


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# The first teacher with noise",
        "",
        f"Last written {result['date']}. {describe(result['hardware'])}, one torch thread per "
        "process. "
        "Command: `uv run python -m benchmarks.teacher_noise` (the seeds as the rows say).",
        "",
        "Each teacher learns the 1,000 labelled images of benchmarks.demo_recipe's seed (the "
        "demo's draw) with the demo's teacher schedule (SGD at 0.1, batches of 64, EMA), "
        "changed as the row says, and is judged on that seed's 5,000 development images "
        "(where the choice is made: the difference from the plain teacher of the same "
        "network on the same images, exact McNemar p, and its mean [95% t interval]) and "
        "on the 10,000 test images (reported).",
        "",
        "| teacher | seeds | dev accuracy | mean dev | vs plain on dev, per seed (p) "
        "| mean vs plain [95%] | test accuracy | mean test |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in summary(result).items():
        if not row["seeds"]:
            lines.append(f"| {name} | not yet run | | | | | | |")
            continue
        per_seed, mean = demo_recipe.paired_cells(row["diffs"], row["ps"], row["interval"])
        lines.append(
            f"| {name} | {', '.join(row['seeds'])} "
            f"| {', '.join(f'{100 * d:.2f}' for d in row['dev'])} | {_mean(row['dev'])} "
            f"| {per_seed} | {mean} "
            f"| {', '.join(f'{100 * t:.2f}' for t in row['test'])} | {_mean(row['test'])} |"
        )
    lines += ["", "What each teacher is: " + "; ".join(
        f"**{n}**: {w}" for n, (w, _, _) in RECIPES.items()) + ".", ""]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", metavar="NAME", help="only these recipes")
    parser.add_argument("--quick", action="store_true", help="a slice, to check the harness")
    args = parser.parse_args(argv)
    unknown = [r for r in args.recipes or [] if r not in RECIPES]
    if unknown:
        raise SystemExit(
            f"--recipes: unknown recipe {unknown[0]!r} (recipes: {', '.join(RECIPES)})"
        )
    flush_denormals()
    path = RESULTS / ("teacher-noise-quick.json" if args.quick else "teacher-noise.json")
    result = json.loads(path.read_text()) if path.exists() else {"arms": {}}
    demo_recipe.refuse_other_configs(
        path,
        result,
        {name: fingerprint(recipe_config(name, args.quick)) for name in RECIPES},
        "recipe",
        "with another teacher config than the recipe's today",
    )
    state: dict[str, Any] = {}
    demo_recipe.measure_shared(
        path,
        result,
        args.seeds,
        args.recipes or list(RECIPES),
        lambda name, seed: measure(name, seed, args.quick, state),
        lambda r: (
            f"dev {100 * r['dev_accuracy']:.2f}%, test {100 * r['test_accuracy']:.2f}% "
            f"({r['seconds']:.0f} s)"
        ),
        render=markdown,
    )
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
