"""Does the label queue pay? Each strategy against `random`, on Fashion-MNIST with a
simulated annotator who answers with the true label.

Per seed, from 100 labels per class (the demo's split, drawn with that seed; 50 per class
set apart as validation), three rounds: the queue's 100 images are labelled (through the
real `ingest labels`, from the queue's CSV), and the model is trained again on the grown
labelled split. Two tiers:

- **teacher**: the demo's teacher (resnet10t, 100 epochs) retrained on the grown split,
  for every strategy; the queue is chosen from the teacher's own probabilities. Its
  `disagreement` needs a second model: here a twin of the teacher trained on the same
  labels with another seed (query by committee); in a run it is the final student against
  its teacher. Its `balanced` has no disagreement term.
- **pipeline**: the whole demo run (`noisy-student run -c pipeline_config/fashion_mnist.yaml`,
  robustness cut to one corruption) for the default strategy and `random`; the queue is the
  one the run writes.

Every strategy of a seed starts from the same round-0 model, so the comparison is paired:
the table gives test accuracy after each round (mean and spread over the seeds), each
strategy's difference from `random` with a 95% interval over the seeds (Student's t) and
the exact McNemar test of each seed's final models on the same 10,000 test images, and the
labels each strategy needs to reach `random`'s final accuracy. The default strategy is the
one with the best validation accuracy after the last round (chosen on validation,
reported on test).

The result file is written after every row; run it again after a kill and it goes on (a
round's queue, once written, is reused, and labels already taken back are skipped, so the
simulated annotator never labels twice). The work (datasets, checkpoints, runs) lives in
artifacts/bench-labelling/; a fresh machine starts a seed's chains over.

One torch thread (`make bench-labelling` sets OMP_NUM_THREADS=1, and the runs inherit it):
on a 2-core machine shared with other jobs, OpenMP's second thread waits for a busy core
at every op, and a step took up to 40 times as long (4 against 150 images/s in the same
run, tests/conftest.py's `torch_one_thread` saw the same); what is measured here is
accuracy, which the thread count does not change.

    uv run python -m benchmarks.labelling            # hours on 2 CPU cores (make bench-labelling)
    uv run python -m benchmarks.labelling --quick    # a slice and tiny models: the harness
    uv run python -m benchmarks.labelling --tiers teacher --seeds 0
    uv run python -m benchmarks.labelling --report   # the table again from the result file

Writes benchmarks/results/labelling.json and labelling.md (or labelling-quick.*).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.accuracy import Table
from benchmarks.machine import describe
from noisy_student import config
from noisy_student.data import dataset, ingest, storage
from noisy_student.evaluation import statistics as stats
from noisy_student.labelling.label_queue import STRATEGIES
from noisy_student.training.engine import flush_denormals

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DEMO = REPO / "pipeline_config" / "fashion_mnist.yaml"
EXPERIMENT = "bench-labelling"
RUN_ATTEMPTS = 3
TWIN_SEED = 1000  # the teacher tier's second model for `disagreement`: seed + this


@dataclass(frozen=True)
class Setting:
    """What one benchmark measures: the data, the rounds, the models."""

    labelled_per_class: int
    validation_per_class: int
    unlabelled_limit: int | None
    test_limit: int | None
    rows_per_shard: int
    rounds: int
    per_round: int
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]  # of the demo preset: the teacher and the pipeline runs

    def config(self, *more: str) -> config.PipelineConfig:
        return config.load(DEMO, [*self.overrides, *more])


# Robustness is not what this measures: one corruption at one severity keeps the runs' time
# on training.
CHEAP_EVALUATION = (
    "evaluation.corruptions=[contrast]",
    "evaluation.severities=[1]",
    "evaluation.corruption_images=200",
    "evaluation.fgsm_epsilons=[]",
)
FULL = Setting(
    labelled_per_class=100,
    validation_per_class=50,
    unlabelled_limit=None,
    test_limit=None,
    rows_per_shard=8192,
    rounds=3,
    per_round=100,
    seeds=(0, 1, 2),
    overrides=("teacher.eval_every=100", *CHEAP_EVALUATION),
)
QUICK = Setting(
    labelled_per_class=10,
    validation_per_class=5,
    unlabelled_limit=3000,
    test_limit=1000,
    rows_per_shard=1500,
    rounds=2,
    per_round=20,
    seeds=(0, 1),
    overrides=(
        "teacher.model=test_resnet",
        "teacher.epochs=10",
        "teacher.eval_every=10",
        "students.0.model=test_resnet",
        "students.0.epochs=1",
        "selection.min_confidence=0.1",
        *CHEAP_EVALUATION,
    ),
)


def base_dataset(work: Path, setting: Setting, seed: int) -> str:
    """The seed's split: every chain of the seed starts from a copy of it."""
    root = work / f"seed-{seed}" / "base"
    if not (root / dataset.TEST / dataset.MANIFEST).exists():
        ingest.fashion_mnist(
            str(root),
            labelled_per_class=setting.labelled_per_class,
            validation_per_class=setting.validation_per_class,
            unlabelled_limit=setting.unlabelled_limit,
            test_limit=setting.test_limit,
            seed=seed,
            rows_per_shard=setting.rows_per_shard,
        )
    return str(root)


def copy_of(base: str, to: Path) -> str:
    """A chain's own dataset, the base as it was (made once; the chain then grows it)."""
    if not (to / dataset.TEST / dataset.MANIFEST).exists():
        shutil.rmtree(to, ignore_errors=True)
        shutil.copytree(base, to)
    return str(to)


def correct_on(model_url: str, split_url: str) -> np.ndarray:
    """Whether the model's top class is right, per image of the split, in split order."""
    from noisy_student.training import engine, models

    model, _ = models.load(model_url)
    model = engine.for_inference(model.to(engine.device()))
    manifest = dataset.read_manifest(split_url)
    right = []
    for index in range(len(manifest.shards)):
        for batch in dataset.iter_shard_batches(manifest, index, 1024, channels_last=True):
            predicted = engine.batch_probs(model, batch.images).argmax(1)
            right.append((predicted == batch.labels).numpy())
    return np.concatenate(right)


def bits(correct: np.ndarray) -> str:
    return base64.b64encode(np.packbits(correct)).decode()


def unbits(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(text), np.uint8))[:n].astype(bool)


def scores(root: str, model_url: str, out_url: str, batch_size: int) -> list[Any]:
    """The model's probabilities of every image of the pool, one file per shard."""
    from noisy_student import stages

    return [
        stages.infer_pseudo_labels(root, i, model_url, out_url, batch_size)
        for i in stages.unlabelled_shards(root)
    ]


def answer(root: str, queue_url: str, out: Path) -> int:
    """The simulated annotator: the true class of every queued image, as the queue's CSV
    filled in, taken back by the real `ingest labels`. Returns the labelled split's size."""
    from noisy_student.labelling import annotations

    queue = storage.read_parquet(storage.join(queue_url, "queue.parquet"), ["id"])
    truth = storage.read_parquet(storage.join(root, dataset.UNLABELLED_TRUTH)).to_pandas()
    truth = truth.set_index("id")["label"]
    names = ingest.FASHION_MNIST_CLASSES
    lines = ["id,class"] + [f'{i},"{names[truth[i]]}"' for i in queue.column("id").to_pylist()]
    out.write_text("\n".join(lines) + "\n")
    taken = annotations.take_labels(root, str(out))
    return taken.labelled[1].num_rows


class Bench:
    def __init__(self, setting: Setting, work: Path, table: Table):
        self.setting, self.work, self.table = setting, work, table

    def row(self, name: str, seconds: float, **fields: Any) -> None:
        import torch

        self.table.add(name, seconds, **fields, torch_threads=torch.get_num_threads())

    def measured(self, name: str) -> dict[str, Any] | None:
        return next((r for r in self.table.rows if r["row"] == name), None)

    def evaluate(self, model_url: str, root: str) -> dict[str, Any]:
        test = correct_on(model_url, storage.join(root, dataset.TEST))
        validation = correct_on(model_url, storage.join(root, dataset.VALIDATION))
        return {
            "test_accuracy": float(test.mean()),
            "validation_accuracy": float(validation.mean()),
            "test_images": len(test),
            "test_correct": bits(test),
        }

    # --- the teacher tier ---------------------------------------------------------------

    def teacher_tier(self, seed: int, strategies: list[str]) -> None:
        from noisy_student.registry import tracking

        self.cfg = self.setting.config(f"seed={seed}")
        base = base_dataset(self.work, self.setting, seed)
        folder = self.work / f"seed-{seed}" / "teacher"
        self.parent = tracking.start_pipeline_run(
            EXPERIMENT, f"teacher-seed-{seed}", {"seed": seed}, {}
        )
        name = f"teacher seed {seed} round 0"
        start = time.perf_counter()
        model0 = self.train(base, folder / "round-0" / "teacher", seed)
        if self.measured(name) is None:
            labels = dataset.read_manifest(storage.join(base, dataset.LABELLED)).num_rows
            self.row(name, time.perf_counter() - start, tier="teacher", seed=seed,
                     strategy=None, round=0, labels=labels, model=model0.model,
                     **self.evaluate(model0.url, base))  # fmt: skip
        last = self.setting.rounds
        for strategy in strategies:
            names = [f"teacher seed {seed} {strategy} round {k}" for k in range(1, last + 1)]
            if all(self.measured(n) for n in names):
                continue
            chain = folder / strategy
            root = copy_of(base, chain / "data")
            model, twin = model0, None
            if strategy == "disagreement":
                twin = self.train(base, folder / "round-0" / "twin", seed + TWIN_SEED)
            for k, name in enumerate(names, start=1):
                out = chain / f"round-{k}"
                start = time.perf_counter()
                queue = self.queue(root, model, twin, strategy, out, seed)
                labels = answer(root, queue.url, out / "answers.csv")
                model = self.train(root, out / "teacher", seed)
                if twin is not None and k < last:
                    twin = self.train(root, out / "twin", seed + TWIN_SEED)
                if self.measured(name) is None:
                    self.row(name, time.perf_counter() - start, tier="teacher", seed=seed,
                             strategy=strategy, round=k, labels=labels, model=model.model,
                             queue=queue.url, **self.evaluate(model.url, root))  # fmt: skip
        tracking.end_run(self.parent)

    def train(self, root: str, out: Path, seed: int) -> Any:
        """The teacher trained on the chain's labelled split as it is now; a checkpoint
        already there (a resumed benchmark) is taken as it is."""
        from noisy_student import stages
        from noisy_student.training import models

        if (out / models.META).exists():
            meta = models.load_meta(str(out))
            return stages.TrainedModel("teacher", 1, meta.model, str(out), "", None, 0.0)
        return stages.train_teacher(self.cfg.teacher, root, str(out), self.parent, seed)

    def queue(self, root: str, model: Any, twin: Any, strategy: str, out: Path, seed: int) -> Any:
        """Round k's queue, from the model of round k-1 (and its twin); written once: a
        resumed chain reuses it, since the pool has already lost the images it labelled."""
        from noisy_student import stages

        url = str(out / "queue")
        if (out / "queue" / "queue.parquet").exists():
            return stages.LabelQueue(url, strategy, self.setting.per_round, {}, "", 0.0)
        batch = 1024
        student_scores = scores(root, model.url, str(out / "scores"), batch)
        twin_scores = scores(root, twin.url, str(out / "twin-scores"), batch) if twin else []
        cfg = config.LabellingConfig(queue_size=self.setting.per_round, strategy=strategy)
        return stages.label_queue(
            cfg, root, student_scores, twin_scores, model, url, self.parent, seed, out.parent.name
        )

    # --- the pipeline tier --------------------------------------------------------------

    def pipeline_tier(self, seed: int, strategies: list[str]) -> None:
        base = base_dataset(self.work, self.setting, seed)
        folder = self.work / f"seed-{seed}" / "pipeline"
        shared = folder / "round-0"
        root0 = copy_of(base, shared / "data")
        start, first = time.perf_counter(), None
        for strategy in strategies:
            # one run for every strategy (the queue's settings are not part of its
            # identity): trained once, then found again, its queue written anew
            queue = folder / strategy / "round-1" / "queue"
            if not (queue / "queue.parquet").exists():
                summary = self.run_flow(shared, root0, seed, strategy)
                first = first or (summary, time.perf_counter() - start)
                shutil.copytree(summary["label_queue"]["url"], queue, dirs_exist_ok=True)
        name = f"pipeline seed {seed} round 0"
        if self.measured(name) is None:
            summary, seconds = first or (self.run_flow(shared, root0, seed, strategies[0]), 0.0)
            student = summary["iterations"][-1]["student"]
            labels = dataset.read_manifest(storage.join(root0, dataset.LABELLED)).num_rows
            self.row(name, seconds, tier="pipeline", seed=seed, strategy=None, round=0,
                     labels=labels, model=student["model"], run_id=summary["run_id"],
                     **self.evaluate(student["url"], root0))  # fmt: skip
        for strategy in strategies:
            chain = folder / strategy
            root = copy_of(base, chain / "data")
            for k in range(1, self.setting.rounds + 1):
                name = f"pipeline seed {seed} {strategy} round {k}"
                if self.measured(name) is not None:
                    continue
                start = time.perf_counter()
                labels = answer(
                    root, str(chain / f"round-{k}" / "queue"), chain / f"answers-{k}.csv"
                )
                summary = self.run_flow(chain, root, seed, strategy)
                if k < self.setting.rounds:  # the next round's queue, before the row
                    after = chain / f"round-{k + 1}" / "queue"
                    shutil.copytree(summary["label_queue"]["url"], after, dirs_exist_ok=True)
                student = summary["iterations"][-1]["student"]
                figures = self.evaluate(student["url"], root)
                self.row(name, time.perf_counter() - start, tier="pipeline", seed=seed,
                         strategy=strategy, round=k, labels=labels, model=student["model"],
                         run_id=summary["run_id"], **figures)  # fmt: skip

    def run_flow(self, folder: Path, root: str, seed: int, strategy: str) -> dict[str, Any]:
        """The demo, as a user runs it, on this chain's data; returns its summary."""
        sets = [
            *self.setting.overrides,
            f"seed={seed}",
            f"data.root={root}",
            f"artifacts={folder / 'artifacts'}",
            f"data.fashion_mnist.labelled_per_class={self.setting.labelled_per_class}",
            f"data.fashion_mnist.validation_per_class={self.setting.validation_per_class}",
            f"labelling.strategy={strategy}",
            f"labelling.queue_size={self.setting.per_round}",
        ]
        env = os.environ | {
            "MLFLOW_TRACKING_URI": f"sqlite:///{self.work / 'mlflow-pipeline.db'}",
            "PREFECT_HOME": str(self.work / "prefect-home"),
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600",
        }
        env.pop("PREFECT_API_URL", None)  # the run's own temporary API
        argv = [sys.executable, "-m", "cli", "run", "-c", str(DEMO)]
        argv += [f"--set={s}" for s in sets]
        log = folder / "runs.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        # Under heavy load Prefect's temporary API can miss its own start (httpx ReadTimeout
        # on /health): the run is then started again, and resumes what it had done.
        for attempt in range(1, RUN_ATTEMPTS + 1):
            with open(log, "a") as out:
                done = subprocess.run(argv, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
            if done.returncode == 0:
                break
            print(f"the run failed ({done.returncode}), attempt {attempt}: see {log}", flush=True)
        else:
            raise SystemExit(f"the run failed {RUN_ATTEMPTS} times: see {log}")
        said = [x for x in log.read_text().splitlines() if x.startswith("summary: ")]
        return storage.read_json(said[-1].removeprefix("summary: "))


# --- the table ------------------------------------------------------------------------------


def _rows(table: Table, tier: str) -> list[dict[str, Any]]:
    return [r for r in table.rows if r.get("tier") == tier]


def _at(rows: list[dict[str, Any]], strategy: str | None, k: int, seed: int) -> dict | None:
    for r in rows:
        if r["seed"] == seed and r["round"] == k and (k == 0 or r["strategy"] == strategy):
            return r
    return None


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def labels_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Labels at which a mean accuracy curve (labels, accuracy; rising labels) first reaches
    `target`, interpolated linearly between rounds; None if it never does."""
    for (l0, a0), (l1, a1) in zip(curve, curve[1:], strict=False):
        if a0 >= target:
            return l0
        if a1 >= target:
            return l0 + (l1 - l0) * (target - a0) / (a1 - a0)
    return curve[-1][0] if curve and curve[-1][1] >= target else None


def summarise(table: Table, setting: Setting, tier: str) -> dict[str, Any]:
    """Per strategy: the mean test accuracy after each round, the spread over seeds, the
    paired difference from random at the last round, McNemar per seed, the labels needed
    to reach random's final accuracy."""
    rows = _rows(table, tier)
    seeds = sorted({r["seed"] for r in rows})
    strategies = [s for s in STRATEGIES if any(r["strategy"] == s for r in rows)]
    last = setting.rounds
    out: dict[str, Any] = {"seeds": seeds, "strategies": {}}
    for s in strategies:
        per_round, labels = [], []
        for k in range(last + 1):
            found = [r for seed in seeds if (r := _at(rows, s, k, seed))]
            per_round.append([r["test_accuracy"] for r in found])
            labels.append(_mean([r["labels"] for r in found]))
        finals = [r for seed in seeds if (r := _at(rows, s, last, seed))]
        entry: dict[str, Any] = {
            "test_accuracy": [_mean(v) for v in per_round],
            "test_spread": [stats.seed_spread(v) if len(v) > 1 else None for v in per_round],
            "labels": labels,
            "seeds_done": len(finals),
            "validation_accuracy": _mean([r["validation_accuracy"] for r in finals]),
        }
        if s != "random":
            diffs, tests = [], []
            for seed in seeds:
                a, b = _at(rows, s, last, seed), _at(rows, "random", last, seed)
                if a and b:
                    diffs.append(a["test_accuracy"] - b["test_accuracy"])
                    n = a["test_images"]
                    t = stats.mcnemar(unbits(a["test_correct"], n), unbits(b["test_correct"], n))
                    tests.append({"seed": seed, "p_value": t.p_value, "verdict": t.verdict})
            entry["difference_from_random"] = {
                "per_seed": diffs,
                "mean_and_interval": stats.t_interval(diffs),
                "mcnemar": tests,
            }
        out["strategies"][s] = entry
    if "random" in out["strategies"]:
        target = out["strategies"]["random"]["test_accuracy"][-1]
        out["target"] = target
        for entry in out["strategies"].values():
            curve = list(zip(entry["labels"], entry["test_accuracy"], strict=True))
            entry["labels_to_reach_random"] = labels_to_reach(curve, target)
    return out


def chosen_default(summary: dict[str, Any]) -> str | None:
    """The strategy with the best mean validation accuracy after the last round. A tie
    (the same number of validation images right, over the same seeds) keeps the
    configured default (`labelling.strategy`): a strategy replaces it only by beating it;
    other ties go to the first in the strategies' order."""
    tied = best_on_validation(summary)
    incumbent = config.LabellingConfig().strategy
    return None if not tied else incumbent if incumbent in tied else tied[0]


def best_on_validation(summary: dict[str, Any]) -> list[str]:
    """The strategies (not `random`) with the best mean validation accuracy after the last
    round, in the strategies' order: more than one where they tie."""
    done = {s: e for s, e in summary["strategies"].items() if s != "random" and e["seeds_done"]}
    if not done:
        return []
    best = max(round(e["validation_accuracy"], 6) for e in done.values())  # no float noise
    return [s for s in STRATEGIES if s in done and round(done[s]["validation_accuracy"], 6) == best]


def beats_random(entry: dict[str, Any]) -> bool:
    interval = (entry.get("difference_from_random") or {}).get("mean_and_interval")
    return bool(interval) and interval[1] > 0


def _pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{100 * x:.2f}%"


def markdown(table: Table, setting: Setting, result: dict[str, Any]) -> str:
    hw = result["hardware"]
    lines = [
        "# Labelling benchmark: which images to label next",
        "",
        f"Fashion-MNIST, {setting.labelled_per_class} labels per class to start "
        f"({setting.validation_per_class} per class set apart as validation), "
        f"{setting.rounds} rounds of {setting.per_round} queued images labelled by a simulated "
        f"annotator (the true class), seeds {', '.join(map(str, setting.seeds))}. Test "
        "accuracy is the mean over seeds; every strategy of a seed starts from the same "
        "round-0 model. Generated by `benchmarks/labelling.py` on "
        f"{describe(hw)}, {result['date']}.",
    ]
    for tier, what in (
        ("teacher", "the demo's teacher retrained on the grown labelled split"),
        ("pipeline", "the whole demo run on the grown labelled split (its final student)"),
    ):
        summary = result["summary"].get(tier)
        if not summary or not summary["strategies"]:
            continue
        seeds = summary["seeds"]
        lines += [
            "",
            f"## {tier.capitalize()} tier: {what}",
            "",
            f"Seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
            + (
                f" of {', '.join(map(str, setting.seeds))}"
                if len(seeds) < len(setting.seeds)
                else ""
            )
            + ".",
            "",
        ]
        header = ["strategy"] + [f"round {k}" for k in range(setting.rounds + 1)]
        header += ["minus random (95% CI over seeds)", "McNemar p per seed", "validation",
                   "labels to reach random"]  # fmt: skip
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for s, e in summary["strategies"].items():
            diff = e.get("difference_from_random")
            interval = diff and diff["mean_and_interval"]
            cells = [f"`{s}`"] + [
                _pct(a) + (f" ± {100 * sp['sd']:.2f}" if sp else "")
                for a, sp in zip(e["test_accuracy"], e["test_spread"], strict=True)
            ]
            if not diff:
                cells.append("-")
            elif interval:
                mean, low, high = (100 * x for x in interval)
                cells.append(f"{mean:+.2f} ({low:+.2f} to {high:+.2f})")
            else:
                cells.append(", ".join(f"{100 * d:+.2f}" for d in diff["per_seed"]))
            cells.append(", ".join(f"{t['p_value']:.3f}" for t in diff["mcnemar"]) if diff else "-")
            cells.append(_pct(e["validation_accuracy"]))
            reach = e.get("labels_to_reach_random")
            cells.append("not reached" if reach is None else f"{reach:,.0f}")
            lines.append("| " + " | ".join(cells) + " |")
        labels = summary["strategies"][next(iter(summary["strategies"]))]["labels"]
        lines += [
            "",
            "Rounds are at " + ", ".join(f"{x:,.0f}" for x in labels) + " labels (round 0 shared"
            "); ± is the standard deviation over seeds. The last round's difference from "
            "`random` is paired by seed; McNemar compares the two final models of a seed on "
            "the same test images. Labels to reach random: where the mean curve first reaches "
            f"`random`'s final {_pct(summary.get('target'))}, linear between rounds.",
        ]
    chosen = result.get("default")
    if chosen:
        entry = result["summary"]["teacher"]["strategies"][chosen]
        verdict = "beats" if beats_random(entry) else "does not beat"
        tied = [s for s in best_on_validation(result["summary"]["teacher"]) if s != chosen]
        lines += [
            "",
            f"Chosen on validation (teacher tier, last round): `{chosen}`"
            + (
                f" (tied there with {', '.join(f'`{s}`' for s in tied)}: "
                + (
                    "a tie keeps the configured default)"
                    if chosen == config.LabellingConfig().strategy
                    else "the first in the strategies' order)"
                )
                if tied
                else ""
            )
            + f", which {verdict} "
            "`random` beyond seed noise on test (the 95% interval of its paired difference "
            + ("excludes" if beats_random(entry) else "includes")
            + " zero).",
        ]
    seconds = sum(r["wall_seconds"] for r in table.rows)
    lines += ["", f"{len(table.rows)} rows, {seconds / 3600:.1f} hours of wall time in all."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a slice and tiny models")
    parser.add_argument("--tiers", nargs="+", default=["teacher", "pipeline"],
                        choices=["teacher", "pipeline"])  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, help="a subset of the seeds")
    parser.add_argument(
        "--pipeline-strategy",
        help="the strategy the pipeline tier sets against random (default: the teacher tier's "
        "choice on validation)",
    )
    parser.add_argument(
        "--report", action="store_true", help="only write the table again from the result file"
    )
    args = parser.parse_args(argv)
    flush_denormals()
    setting = QUICK if args.quick else FULL
    name = "labelling-quick" if args.quick else "labelling"
    work = REPO / "artifacts" / f"bench-{name}"
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    # a progress bar per model loaded (hundreds in a run) buries the rows in the log
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    identity = {k: v for k, v in setting.__dict__.items() if k != "seeds"}
    if args.report and not (RESULTS / f"{name}.json").exists():
        raise SystemExit(f"--report: no result file {RESULTS / name}.json to write the table from")
    table = Table(RESULTS / f"{name}.json", json.loads(json.dumps(identity)))
    bench = Bench(setting, work, table)
    seeds = [s for s in setting.seeds if args.seeds is None or s in args.seeds]

    def write() -> dict[str, Any]:
        # --report: the file as it is (its date and attempts untouched), the table again
        result = json.loads(table.path.read_text()) if args.report else table.save()
        result["summary"] = {t: summarise(table, setting, t) for t in ("teacher", "pipeline")}
        result["default"] = chosen_default(result["summary"]["teacher"])
        (RESULTS / f"{name}.md").write_text(markdown(table, setting, result))
        return result

    tiers = [] if args.report else args.tiers  # --report: nothing measured
    if "teacher" in tiers:
        for seed in seeds:
            bench.teacher_tier(seed, list(STRATEGIES))
            write()
    if "pipeline" in tiers:
        default = args.pipeline_strategy or write()["default"]
        if default is None:
            raise SystemExit(
                "no teacher tier yet to choose the default on: pass --pipeline-strategy"
            )
        for seed in seeds:
            bench.pipeline_tier(seed, [default, "random"])
            write()
    result = write()
    print(f"wrote {RESULTS / name}.md; default on validation: {result['default']}")


if __name__ == "__main__":
    main()
