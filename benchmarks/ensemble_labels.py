"""Better pseudo labels for the second student, without new labels: does it learn more from
the mean of its two predecessors' class probabilities (the first teacher's and the first
student's), or from the first student's under distribution alignment, than from the first
student's alone, as the pipeline labels today?

The accuracy table's chain stalls where its pseudo labels do (87.20 -> 89.35% right over
three iterations). Averaging models that err on different images, and aligning the
predictions with the labelled set's class shares, are the cheapest ways to better labels:
one more forward pass over the pool, or none. This measures them on the demo's recipe,
through the pipeline's own engine, selection and config (`benchmarks.demo_recipe`'s data,
teacher and student): for each seed the demo's teacher labels the pool, the demo's student
(student 1) learns from those labels, then one second student for each labeller below,
all started from student 1 with the same seed, learns from that labeller's labels. Choices
are made on the development split (exact McNemar per seed, the mean difference over seeds
with a t interval); the test split is reported beside it.

    uv run python -m benchmarks.ensemble_labels --seeds 0 1 2
    uv run python -m benchmarks.ensemble_labels --seeds 3 --labellers "student 1, aligned"
    uv run python -m benchmarks.ensemble_labels --report        # the table again
    uv run python -m benchmarks.ensemble_labels --quick         # a slice: the harness

The result file is written after every second student; a killed run goes on where it
stopped (teachers and first students are cached under artifacts/demo-recipe).
Writes benchmarks/results/ensemble-labels.json and .md (ensemble-labels-quick.* with --quick).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import demo_recipe
from benchmarks.accuracy import hardware
from benchmarks.machine import describe
from benchmarks.pseudo_labels import aligned
from benchmarks.student_recipe import _packed
from noisy_student.config import PipelineConfig
from noisy_student.evaluation import statistics
from noisy_student.training import models
from noisy_student.training.engine import flush_denormals

RESULTS = demo_recipe.RESULTS
CLASSES = 10
SECOND_STUDENT_SEED = 1000  # added to the seed: the second students draw other noise
BASE = "student 1"
LABELLERS = {
    BASE: "the last model labels the pool, as the pipeline does",
    "teacher + student 1": "the mean of the first teacher's and student 1's class "
    "probabilities (one more forward pass over the pool)",
    "student 1, aligned": "student 1's probabilities under distribution alignment (each "
    "class's scaled until the mean prediction over the images it labels matches the "
    "labelled set's class shares, as ReMixMatch does; `selection.align`, what the "
    "pipeline's `selection.align: true` applies; seeds 0-7 ran with 50 rounds of scaling "
    "and renormalising in turn instead, whose labels agree within 0.03 points on seeds 5-7)",
}


def first_student(
    cfg: PipelineConfig,
    teacher: torch.nn.Module,
    teacher_pool: np.ndarray,
    data: demo_recipe.Data,
    seed: int,
    quick: bool,
) -> torch.nn.Module:
    """The demo's student trained on the teacher's labels (cached per config and seed);
    `teacher_pool`: the teacher's probabilities for the pool."""
    s = cfg.students[0]
    path = demo_recipe.CACHE / (
        f"student1-{demo_recipe._key(demo_recipe.fingerprint(cfg), seed, quick)}.safetensors"
    )
    if path.exists():
        model = models.create(s.model, CLASSES, 1, s.drop_rate, s.drop_path_rate,
                              options=models.options_of(teacher))  # fmt: skip
        model.load_state_dict(models.load_safetensors(path.read_bytes()))
        return model
    pseudo = demo_recipe.selected(cfg, teacher_pool, data, CLASSES, seed)
    model = demo_recipe.train_student(cfg, teacher, data, pseudo, CLASSES, seed).model
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(models.save_safetensors(model.state_dict()))
    return model


def labeller_probs(
    name: str, teacher: np.ndarray, student: np.ndarray, prior: np.ndarray
) -> np.ndarray:
    """The class probabilities `name` labels a set of images with, from the teacher's and
    student 1's on them; `prior`: the labelled set's class shares."""
    if name == BASE:
        return student
    if name == "teacher + student 1":
        return (teacher + student) / 2
    if name == "student 1, aligned":
        return aligned(student, prior)
    raise ValueError(f"unknown labeller {name!r} (labellers: {', '.join(LABELLERS)})")


def _models(cfg: PipelineConfig, seed: int, quick: bool, state: dict[str, Any]) -> dict:
    """The seed's data, student 1, and the teacher's and student 1's probabilities, once per
    process (the teacher's for the pool computed once: they also label student 1)."""
    data = demo_recipe.seed_data(cfg, seed, quick, state)
    if "student" not in state:

        def probs(model: torch.nn.Module) -> dict[str, np.ndarray]:
            return {split: demo_recipe.probabilities(cfg, model, getattr(data, split).images)
                    for split in ("pool", "dev", "test")}  # fmt: skip

        teacher, _, _ = demo_recipe.teacher_for(cfg, data, seed, CLASSES, quick)
        by_teacher = probs(teacher)  # its pool's also label student 1
        student = first_student(cfg, teacher, by_teacher["pool"], data, seed, quick)
        state.update(student=student, probs={"teacher": by_teacher, "student": probs(student)})
    return state


def measure(name: str, seed: int, quick: bool, state: dict[str, Any]) -> dict[str, Any]:
    """The second student of labeller `name` on `seed`, judged, with its labels' accuracy."""
    cfg = demo_recipe.demo_config({}, quick)
    m = _models(cfg, seed, quick, state)
    data, probs = m["data"], m["probs"]

    def accuracy(p: np.ndarray, split: str) -> float:
        return float((p.argmax(1) == getattr(data, split).labels.numpy()).mean())

    prior = demo_recipe.class_shares(data, CLASSES)
    labels = {split: labeller_probs(name, probs["teacher"][split], probs["student"][split], prior)
              for split in ("pool", "dev", "test")}  # fmt: skip
    pseudo = demo_recipe.selected(cfg, labels["pool"], data, CLASSES, seed)
    fit = demo_recipe.train_student(
        cfg, m["student"], data, pseudo, CLASSES, seed + SECOND_STUDENT_SEED
    )
    dev, test = demo_recipe._right(fit.model, data.dev), demo_recipe._right(fit.model, data.test)
    return {
        "config": demo_recipe.fingerprint(cfg),
        "teacher_test_accuracy": accuracy(probs["teacher"]["test"], "test"),
        "student1_dev_accuracy": accuracy(probs["student"]["dev"], "dev"),
        "student1_test_accuracy": accuracy(probs["student"]["test"], "test"),
        "labeller_pool_accuracy": pseudo[2],
        "labeller_dev_accuracy": accuracy(labels["dev"], "dev"),
        "labeller_test_accuracy": accuracy(labels["test"], "test"),
        "pseudo_labelled_images": len(pseudo[0]),
        "dev_accuracy": float(dev.mean()),
        "test_accuracy": float(test.mean()),
        "dev_right": _packed(dev),
        "dev_images": len(dev),
        "test_right": _packed(test),
        "test_images": len(test),
        "student_seconds": round(fit.seconds, 1),
        "hardware": hardware(),
    }


def markdown(result: dict[str, Any]) -> str:
    arms = result["arms"]
    base = arms.get(BASE, {})
    lines = [
        "# Better pseudo labels for the second student, without new labels",
        "",
        f"Last written {result['date']}. {describe(result['hardware'])} "
        f"(torch {result['hardware']['torch']}). Command: `uv run python -m "
        "benchmarks.ensemble_labels` (the seeds as the rows say).",
        *demo_recipe.machines(result),
        "",
        "The demo's recipe (`pipeline_config/fashion_mnist.yaml`, its student for 4 passes "
        "in fp32) on `benchmarks.demo_recipe`'s draws: 100 labels per class, 500 per class "
        "of development, the rest the pool. The teacher labels the pool, student 1 learns "
        "from it, then a second student, started from student 1 with the same seed, learns "
        "from the labels of each labeller. Labels: the labeller's accuracy on the whole pool "
        "(before selection) and on development. Choices on development: each labeller's "
        "second student against the base's (`student 1`) on the same images, exact McNemar "
        "per seed, the mean over seeds with a 95% t interval. Test: reported only.",
        "",
        "| labeller | seeds | labels right: pool | labels right: dev | student 2 dev | "
        "vs base on dev, per seed (p) | mean vs base [95%] | test: teacher -> student 1 -> "
        "student 2 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in LABELLERS:
        runs = arms.get(name, {})
        seeds = sorted(runs, key=int)
        if not seeds:
            lines.append(f"| {name} | not yet run | | | | | | |")
            continue
        pairs = [(runs[s], base.get(s)) for s in seeds] if name != BASE else []
        diffs, ps = demo_recipe.paired_on_dev(pairs)
        per_seed, mean = demo_recipe.paired_cells(diffs, ps, statistics.t_interval(diffs))

        def cells(key: str, runs: dict = runs, seeds: list = seeds) -> str:
            return ", ".join(f"{100 * runs[s][key]:.2f}" for s in seeds)

        test = "; ".join(
            f"{100 * runs[s]['teacher_test_accuracy']:.2f} -> "
            f"{100 * runs[s]['student1_test_accuracy']:.2f} -> "
            f"{100 * runs[s]['test_accuracy']:.2f}"
            for s in seeds
        )
        lines.append(
            f"| {name} | {', '.join(seeds)} | {cells('labeller_pool_accuracy')} | "
            f"{cells('labeller_dev_accuracy')} | {cells('dev_accuracy')} | {per_seed} | {mean} "
            f"| {test} |"
        )
    lines += [
        "",
        "Labellers: " + "; ".join(f"**{n}**: {w}" for n, w in LABELLERS.items()) + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = demo_recipe.arguments(argv, __doc__, "labellers", "labeller", LABELLERS)
    flush_denormals()
    path: Path = RESULTS / ("ensemble-labels-quick.json" if args.quick else "ensemble-labels.json")
    result = demo_recipe.read_result(path, args.report, markdown)
    if result is None:
        return
    today = demo_recipe.fingerprint(demo_recipe.demo_config({}, args.quick))
    demo_recipe.refuse_other_configs(
        path, result, dict.fromkeys(LABELLERS, today), "labeller",
        "on another config than the demo's today",
    )  # fmt: skip
    state: dict[str, Any] = {}
    demo_recipe.measure_shared(
        path,
        result,
        args.seeds,
        args.labellers or list(LABELLERS),
        lambda name, seed: measure(name, seed, args.quick, state),
        lambda r: (
            f"labels {100 * r['labeller_pool_accuracy']:.2f}% right, student 2 dev "
            f"{100 * r['dev_accuracy']:.2f}%, test {100 * r['test_accuracy']:.2f}% "
            f"({r['student_seconds']:.0f} s)"
        ),
        render=markdown,
    )
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
