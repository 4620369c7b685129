"""Does Noisy Student work here? The accuracy table on Fashion-MNIST, 100 labels per class.

Rows, all on the same split:
- the supervised teacher (1,000 labels) and the students of every iteration, from one run
  of the real flow on `pipeline_config/accuracy.yaml`; the teacher again with two more
  seeds, and the final student again with two more seeds on the same pseudo labels as the
  flow's (their means and spreads);
- iteration 1's student without noise (no RandAugment, Cutout, dropout or stochastic
  depth), trained from the same teacher and the same pseudo labels as the real one;
- the fully supervised ceilings: the final student's network on all 60,000 labels with a
  ceiling's recipe (ordinary augmentation: crops and flips, no noise), at the final
  student's budget (as many training images) and at 3 times it.

The result file is written after every row: run it again after a kill and it goes on
where it stopped (`--rows NAME...` runs named rows only). The flow runs while one of its
rows is missing; once they are all in, a later run (a fresh machine, without the flow's
outputs) trains only the first teacher again, with the same seed, and labels with it.

    uv run python -m benchmarks.accuracy            # the table (hours on 2 CPU cores)
    uv run python -m benchmarks.accuracy --quick    # every row on a slice, to check the harness
    uv run python -m benchmarks.accuracy --carry OLD.json   # after a change of config: take
        # the rows it leaves unchanged (e.g. the ceilings, when only the teacher changed)
        # from an earlier result file instead of measuring them again

Writes benchmarks/results/accuracy.json and accuracy.md (or accuracy-quick.*), with the
command, seed, hardware, wall time and CPU time of every row.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import platform
import re
import resource
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import torch

from benchmarks.machine import cpu_name, describe
from noisy_student import config
from noisy_student.config import PipelineConfig
from noisy_student.data import dataset, dataset_writer, ingest, storage
from noisy_student.evaluation import statistics
from noisy_student.training.engine import flush_denormals

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


def cpu_seconds() -> float:
    """User and system CPU time of this process and its finished children. On a machine
    shared with other jobs a row's wall time grows with theirs; its CPU time much less
    (it still includes what sharing caches and cores costs)."""
    own, children = (
        resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


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


class Ceiling(NamedTuple):
    """A fully supervised row: what the table says of it, the network and recipe, and its
    budget in multiples of the final student's."""

    what: str
    recipe: config.TeacherConfig
    budget: int = 1


LONGER = 3  # the longer ceiling's budget: is the final student's ceiling set by the epochs?
LABELLED_TRAINING_IMAGES = 60_000  # Fashion-MNIST's training set, every image labelled
TEST_IMAGES = 10_000


def student_images(cfg: PipelineConfig, k: int) -> int:
    """The training images student k (from 1) sees: its passes over the pool (every image
    the teacher labels is selected once, balancing keeps the count), each step adding a
    labelled image for every `unlabelled_ratio` pseudo-labelled ones."""
    fm = cfg.data.fashion_mnist
    set_apart = 10 * (fm.labelled_per_class + fm.validation_per_class)
    pool = fm.unlabelled_limit or LABELLED_TRAINING_IMAGES - set_apart
    student = cfg.students[k - 1]
    return round(student.epochs * pool * (1 + 1 / student.unlabelled_ratio))


def ceiling_rows(cfg: PipelineConfig, reference_limit: int | None = None) -> dict[str, Ceiling]:
    """The fully supervised rows: the final student's network (its stem and keyword
    arguments) with a ceiling's recipe, the ordinary augmentation of a supervised model
    (crops and flips; no RandAugment, Cutout, dropout or stochastic depth) and the final
    student's optimiser, at its budget and at LONGER times it. On a slice of the training
    set (`reference_limit`, --quick) one epoch per budget."""
    k = len(cfg.students)
    last = cfg.students[-1]
    stem = config.student_stem(cfg.model_dump(), k)  # null: its teacher's
    batch = round(last.batch_size * (1 + last.unlabelled_ratio))
    epochs = max(1, round(student_images(cfg, k) / LABELLED_TRAINING_IMAGES))
    if reference_limit is not None:
        epochs = 1
    recipe = config.TeacherConfig(
        **last.model_dump(
            include={"model", "model_kwargs", "lr", "weight_decay", "warmup_epochs"}
            | {"weight_averaging", "ema_decay", "hflip", "crop_padding", "precision"}
        ),
        stem=stem,
        batch_size=batch,
        epochs=epochs,
    )
    return {
        "fully supervised": Ceiling(
            "all 60,000 training labels, the final student's network with a ceiling's recipe "
            "(crops and flips, no noise) at the final student's budget",
            recipe,
        ),
        f"fully supervised: {LONGER}x the epochs": Ceiling(
            f"the same for {LONGER} times the epochs",
            recipe.model_copy(update={"epochs": epochs * LONGER}),
            LONGER,
        ),
    }


def ablations(
    cfg: PipelineConfig,
) -> dict[str, tuple[str, config.SelectionConfig, config.StudentConfig]]:
    """Iteration 1's student with one change each: (what, selection, student config)."""
    student_cfg = cfg.students[0]
    return {
        "no noise": (
            "iteration 1 without RandAugment, Cutout, dropout or stochastic depth",
            cfg.selection,
            student_cfg.model_copy(
                update={"rand_augment": None, "cutout": 0.0, "drop_rate": 0.0}
                | {"drop_path_rate": 0.0}
            ),
        ),
    }


SEEDS = (1, 2)  # beside the flow's seed: the spread over three seeds


def seed_rows(cfg: PipelineConfig) -> dict[str, int]:
    """The teacher with other seeds (its initialisation and batch order; the same split)."""
    return {f"teacher: seed {cfg.seed + k}": cfg.seed + k for k in SEEDS}


def final_student_seed_rows(cfg: PipelineConfig) -> dict[str, int]:
    """The final student with other seeds (initialisation, batch order and noise), on the
    same pseudo labels as the flow's final student."""
    k = len(cfg.students)
    return {f"student {k}: seed {cfg.seed + s}": cfg.seed + s for s in SEEDS}


def row_inputs(cfg: PipelineConfig, reference_limit: int | None = None) -> dict[str, str]:
    """A digest of what each row that does not depend on the whole config is a function of:
    the teacher's other seeds (the teacher's recipe, the data and the seed) and the ceilings
    (their recipe, the training set and the seed). An earlier table's row with the same
    digest measured the same thing (`--carry`); every other row depends on the whole run."""
    data = cfg.data.model_dump(mode="json")
    teacher = cfg.teacher.model_dump(mode="json")
    inputs = {
        name: {"teacher": teacher, "data": data, "seed": s} for name, s in seed_rows(cfg).items()
    }
    for name, ceiling in ceiling_rows(cfg, reference_limit).items():
        inputs[name] = {
            "recipe": ceiling.recipe.model_dump(mode="json"),
            "source": cfg.data.fashion_mnist.source,
            "reference_limit": reference_limit,
            "seed": cfg.seed,
        }
    return {
        name: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:16]
        for name, v in inputs.items()
    }


def student_names(cfg: PipelineConfig) -> list[str]:
    return [f"student {k}" for k in range(1, len(cfg.students) + 1)]


def row_names(cfg: PipelineConfig) -> list[str]:
    return [
        "teacher",
        *seed_rows(cfg),
        *student_names(cfg),
        *final_student_seed_rows(cfg),
        *(f"ablation: {a}" for a in ablations(cfg)),
        *ceiling_rows(cfg),
    ]


# what a table keeps beside its rows from one attempt to the next
HEARTBEAT_SECONDS = 60.0  # how stale a row's running time may be when a kill gives no signal

KEPT = (
    "run_id",
    "mlflow",
    "flow_wall_seconds",
    "flow_cpu_seconds",
    "teacher_trained_again",
)


class Table:
    """The rows measured so far, kept in the result file itself after every row, so that a
    killed benchmark (hours on a CPU) goes on where it stopped: rows already measured with
    the same config are kept, the flow resumes from its cached stages, a training stage
    from its saved state. The seconds an interrupted row had run (SIGINT or SIGTERM) are
    kept too and given beside the finished row's own: they were spent, but whether the
    attempt that finished it went on from them or started over (a fresh machine keeps no
    saved state) only the log tells. Two benchmark processes may measure different rows of
    one table at once (e.g. the ceilings beside the flow): every save merges the rows the
    file holds, under a lock. A sitting's end may kill without a signal to catch (SIGKILL):
    a running row's seconds are saved every HEARTBEAT_SECONDS, so they are kept then too."""

    def __init__(self, path: Path, identity: dict[str, Any]):
        self.path, self.identity = path, identity
        self._lock = threading.RLock()  # the heartbeat saves from a thread of its own
        self._mine: set[str] = set()  # rows whose interrupted seconds this process keeps
        old = json.loads(path.read_text()) if path.exists() else {}
        same = old.get("identity") == identity
        self.rows: list[dict[str, Any]] = old.get("rows", []) if same else []
        self.interrupted: dict[str, float] = old.get("interrupted_seconds", {}) if same else {}
        self.attempts = old.get("attempts", 0) + 1 if same else 1
        self.extra: dict[str, Any] = {k: old[k] for k in KEPT if same and k in old}

    def has(self, name: str) -> bool:
        """Whether the row is measured (a row seen so far in a running flow is not yet)."""
        return any(r["row"] == name and not r.get("so_far") for r in self.rows)

    def so_far(self, name: str, **fields: Any) -> bool:
        """A row of the flow seen before the flow returned (`finished_iterations`): shown in
        the table as such, measured again (from the flow's cached stages) when it returns.
        Never replaces a measured row. Returns whether the table changed."""
        with self._lock:
            if self.has(name):
                return False
            row = {"row": name, **fields, "so_far": True}
            old = next((r for r in self.rows if r["row"] == name), None)
            if old is not None and {k: v for k, v in old.items() if k != "hardware"} == row:
                return False
            self.rows = [r for r in self.rows if r["row"] != name]
            self.rows.append({**row, "hardware": hardware()})
        print(f"{name}: {100 * fields['test_accuracy']:.2f}% so far (the flow goes on)", flush=True)
        self.save()
        return True

    def carry(
        self, earlier: dict[str, Any], now: dict[str, str], then: dict[str, str]
    ) -> list[str]:
        """Rows of an earlier result file (`earlier`) that this table lacks and whose inputs
        are unchanged (`then[name] == now[name]`, see `row_inputs`) join it, each marked
        with the file's date and command. Returns their names."""
        rows = {r["row"]: r for r in earlier.get("rows", [])}
        taken = [
            name
            for name, digest in now.items()
            if name in rows and not self.has(name) and then.get(name) == digest
        ]
        if taken:
            with self._lock:
                written = earlier.get("date", "")[:10]
                command = earlier.get("identity", {}).get("command", "")
                for name in taken:
                    self.rows.append(
                        {**rows[name], "carried_from": {"date": written, "command": command}}
                    )
            self.save()
        return taken

    def add(self, name: str, seconds: float, **fields: Any) -> None:
        with self._lock:
            if before := self.settle(name):
                fields["interrupted_seconds"] = round(before, 1)
            self.rows = [r for r in self.rows if r["row"] != name]
            self.rows.append(
                {"row": name, **fields, "hardware": hardware(), "wall_seconds": round(seconds, 1)}
            )
        print(
            f"{name}: {100 * fields['test_accuracy']:.2f}% ({fields['model']}, {seconds:.0f} s)",
            flush=True,
        )
        self.save()

    def settle(self, name: str) -> float:
        """The seconds of a row's interrupted attempts, taken off the list of those still
        to finish (and off the file's at the next save)."""
        with self._lock:
            self._mine.add(name)
            return self.interrupted.pop(name, 0.0)

    def save(self, complete: bool = False) -> dict[str, Any]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._merge_from_file()
            result = {
                "identity": self.identity,
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "hardware": hardware(),
                "attempts": self.attempts,
                "complete": complete,
                **self.extra,
                "rows": self.rows,
                "interrupted_seconds": self.interrupted,
            }
            tmp = self.path.with_suffix(f".json.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(result, indent=2) + "\n")
            tmp.replace(self.path)
        return result

    def _merge_from_file(self) -> None:
        """Rows another process saved since this one read the file join this one's (a row
        of the same name measured here wins)."""
        if not self.path.exists():
            return
        theirs = json.loads(self.path.read_text())
        if theirs.get("identity") != self.identity:
            return
        mine = {r["row"] for r in self.rows}
        self.rows += [r for r in theirs.get("rows", []) if r["row"] not in mine]
        done = {r["row"] for r in self.rows if not r.get("so_far")}
        # another process's running rows: the file's seconds are the fresher; this one's
        # own (running, or settled and so gone) are its own to say
        merged = dict(theirs.get("interrupted_seconds", {}))
        for name in self._mine:
            if name in self.interrupted:
                merged[name] = self.interrupted[name]
            else:
                merged.pop(name, None)
        self.interrupted = {k: v for k, v in merged.items() if k not in done}
        self.extra = {**{k: theirs[k] for k in KEPT if k in theirs}, **self.extra}

    def measure(
        self, name: str, what: str, seed: int, train: Callable[[], tuple[Any, dict[str, Any]]]
    ) -> None:
        """One row: `train()` timed, its TrainedModel's accuracy on the test split (see
        `on_test`), and the further columns it returns beside it (a student's teacher and
        pseudo-label accuracy)."""
        cpu_start = cpu_seconds()
        with self.timing(name) as elapsed:
            trained, columns = train()
        self.add(
            name,
            elapsed(),
            cpu_seconds=round(cpu_seconds() - cpu_start, 1),
            what=what,
            model=trained.model,
            test_accuracy=_test_accuracy(trained),
            **columns,
            seed=seed,
        )

    @contextmanager
    def timing(
        self, name: str, beat: Callable[[], Any] | None = None
    ) -> Iterator[Callable[[], float]]:
        """Yields the seconds since the row started. While it runs, they are saved as the
        row's interrupted seconds (on top of earlier attempts') every HEARTBEAT_SECONDS and
        on SIGINT/SIGTERM; when it ends, the earlier attempts' alone are left for `add`.
        `beat`, where given, is called at each of those saves too (the flow's rows so far);
        its failure is printed once and does not stop the row."""
        with self._lock:
            self._mine.add(name)
            before = self.interrupted.get(name, 0.0)
        start = time.perf_counter()
        stop = threading.Event()

        failed: list[str] = []

        def keep(seconds: float) -> None:
            with self._lock:
                self.interrupted[name] = seconds
                self.save()
            if beat is not None:
                try:
                    beat()
                except Exception as e:  # e.g. MLflow out of reach: the row goes on
                    if not failed:
                        failed.append(f"{type(e).__name__}: {e}".splitlines()[0])
                        print(f"{name}: its rows so far not read ({failed[0]})", flush=True)

        def heartbeat() -> None:
            while not stop.wait(HEARTBEAT_SECONDS):
                keep(before + time.perf_counter() - start)

        beating = threading.Thread(target=heartbeat, name=f"heartbeat {name}", daemon=True)
        beating.start()
        try:
            yield lambda: time.perf_counter() - start
        except KeyboardInterrupt:
            stop.set()
            beating.join()
            keep(before + time.perf_counter() - start)
            raise
        finally:
            stop.set()
            beating.join()
        with self._lock:  # finished: this attempt's seconds are the row's own
            if before:
                self.interrupted[name] = before
            else:
                self.settle(name)


@dataclass
class FirstIteration:
    """What the rows after the flow's start from: the run's folder and MLflow parent run,
    the data, the supervised teacher and its pseudo labels of the unlabelled images."""

    run_url: str
    data_root: str
    parent: str
    teacher: Any  # stages.TrainedModel
    probabilities_url: str
    shards: list[Any]  # stages.PseudoLabelShard
    # the final iteration's teacher and selected pseudo labels (the flow's run only)
    final_teacher: Any = None  # stages.TrainedModel
    final_selected: Any = None  # stages.SelectedPseudoLabels


def _test_accuracy(trained: Any) -> float:
    if trained.evaluated_on != dataset.TEST:
        raise ValueError(f"{trained.role} {trained.model}: its accuracy is not on the test split")
    return trained.final_accuracy


def on_test(trained: Any, data_root: str) -> Any:
    """The trained model (a stages.TrainedModel) with its accuracy on the test split: the
    training stages evaluate on the split choices are made on (validation where the
    dataset has one); the table reports test."""
    import dataclasses

    from noisy_student.stages.prepare_data import test_batches
    from noisy_student.stages.train import EVAL_BATCH_SIZE
    from noisy_student.training import engine, models

    if trained.evaluated_on == dataset.TEST:
        return trained
    model, _ = models.load(trained.url)
    batches = test_batches(data_root, EVAL_BATCH_SIZE)
    accuracy = engine.accuracy(model.to(engine.device()), batches)
    return dataclasses.replace(trained, final_accuracy=accuracy, evaluated_on=dataset.TEST)


def _trained(entry: dict[str, Any], role: str, iteration: int) -> Any:
    """A model of the flow as summary.json records it, with its test accuracy."""
    from noisy_student import stages

    e = entry
    return stages.TrainedModel(
        role=role,
        iteration=iteration,
        model=e["model"],
        url=e["url"],
        mlflow_run_id=e["mlflow_run_id"],
        final_accuracy=e["test_accuracy"],
        seconds=0.0,
        evaluated_on=dataset.TEST,
    )


def _selected(pseudo: dict[str, Any]) -> Any:
    """The selected pseudo labels as summary.json records them."""
    from noisy_student import stages

    p = pseudo
    return stages.SelectedPseudoLabels(
        url=p["url"],
        probabilities_url=p["probabilities_url"],
        mlflow_run_id=p["mlflow_run_id"],
        inference_run_id=p["inference_mlflow_run_id"],
        total=p["total"],
        kept=p["kept"],
        selected=p["selected"],
        accuracy=p["accuracy"],
        accuracy_all=p["accuracy_all"],
        inference_seconds=0.0,
        seconds=0.0,
        per_class=p["per_class"],
        scored_kept=p.get("scored_kept", 0),
        scored_all=p.get("scored_all", 0),
    )


def finished_iterations(experiment: str, pipeline_run_id: str) -> list[dict[str, Any]]:
    """The iterations of a pipeline run whose last stage (the robustness evaluation) has
    finished, read from MLflow, where each stage logs as it ends: in order, each one's
    teacher and student (model, test accuracy, training seconds) and the accuracy of the
    pseudo labels its student learned from. The flow's summary has them only once it
    returns; this shows a run still going, or one a sitting's end killed, as far as it got."""
    from noisy_student.registry import tracking

    client = tracking.client()
    experiment_ = client.get_experiment_by_name(experiment)
    if experiment_ is None:
        return []
    stages: dict[tuple[str, int], Any] = {}
    for r in client.search_runs(
        [experiment_.experiment_id],
        filter_string=f"tags.`{tracking.TAG}pipeline_run_id` = '{pipeline_run_id}'",
        max_results=1000,
    ):
        stage, iteration = (r.data.tags.get(f"{tracking.TAG}{k}") for k in ("stage", "iteration"))
        if stage and iteration and r.info.status == "FINISHED":
            stages[stage, int(iteration)] = r

    def trained(stage: str, k: int, test_accuracy: float) -> dict[str, Any]:
        run = stages[stage, k]
        return {
            "model": run.data.params.get("model", ""),
            "test_accuracy": test_accuracy,
            "train_seconds": run.data.metrics.get("train_seconds"),
        }

    found = []
    k = 1
    while ("evaluate_robustness", k) in stages and ("train_student", k) in stages:
        scores = stages["evaluate_robustness", k].data.metrics
        teacher = ("train_teacher", 1) if k == 1 else ("train_student", k - 1)
        if teacher not in stages:  # an existing teacher (`--teacher`): no stage of this run
            break
        found.append(
            {
                "iteration": k,
                "teacher": trained(*teacher, scores["teacher_test_accuracy"]),
                "student": trained("train_student", k, scores["student_test_accuracy"]),
                "pseudo_label_accuracy": stages["filter_and_balance", k].data.metrics.get(
                    "pseudo_label_accuracy"
                ),
            }
        )
        k += 1
    return found


def _student_what(cfg: PipelineConfig, k: int) -> str:
    student_cfg = cfg.students[k - 1]
    start = "its teacher's weights" if student_cfg.init_from_teacher else "scratch"
    return (
        f"Noisy Student iteration {k} (teacher: "
        + ("the supervised teacher" if k == 1 else "the previous student")
        + f"; {student_cfg.epochs} epochs from {start})"
    )


def _rows_so_far(cfg: PipelineConfig, table: Table, todo: list[str], pipeline_run_id: str) -> None:
    """The flow's finished iterations as rows seen so far (`Table.so_far`)."""
    for it in finished_iterations(cfg.name, pipeline_run_id):
        k = it["iteration"]
        if k == 1 and "teacher" in todo:
            table.so_far(
                "teacher",
                what="supervised on the 1,000 labelled images",
                seed=cfg.seed,
                **it["teacher"],
            )
        if f"student {k}" in todo:
            table.so_far(
                f"student {k}",
                what=_student_what(cfg, k),
                teacher_test_accuracy=it["teacher"]["test_accuracy"],
                pseudo_label_accuracy=it["pseudo_label_accuracy"],
                seed=cfg.seed,
                **it["student"],
            )


def the_flow(cfg: PipelineConfig, table: Table, todo: list[str]) -> FirstIteration:
    """The real flow (its cached stages come back in seconds on the machine that ran them),
    its rows added to the table: those of each iteration it finished as it goes (read from
    MLflow at each heartbeat, shown as rows so far), all of them when it returns."""
    from flows.noisy_student import noisy_student
    from noisy_student import results, runs, stages

    cpu_start = cpu_seconds()
    # the run's id, as the flow will name it (the config and the data's digests)
    pipeline_run_id = runs.run_identity(
        cfg, stages.prepare_data(cfg.data.root, cfg.data.fashion_mnist)
    )
    with table.timing(
        "the flow", beat=lambda: _rows_so_far(cfg, table, todo, pipeline_run_id)
    ) as elapsed:
        summary = noisy_student(cfg)
    flow_seconds = elapsed() + table.settle("the flow")
    table.extra.update(
        run_id=summary["run_id"],
        mlflow=summary["mlflow"],
        flow_wall_seconds=round(flow_seconds + table.extra.get("flow_wall_seconds", 0.0), 1),
        flow_cpu_seconds=round(
            cpu_seconds() - cpu_start + table.extra.get("flow_cpu_seconds", 0.0), 1
        ),
    )
    first = summary["iterations"][0]
    if "teacher" in todo:
        table.add(
            "teacher",
            first["stage_seconds"]["train_teacher"],
            what="supervised on the 1,000 labelled images",
            model=first["teacher"]["model"],
            test_accuracy=first["teacher"]["test_accuracy"],
            seed=cfg.seed,
        )
    verdicts = results.verdicts(summary)
    for it in summary["iterations"]:
        name = f"student {it['iteration']}"
        if name not in todo:
            continue
        verdict = verdicts.get(it["iteration"], {})
        sec = it["stage_seconds"]
        table.add(
            name,
            sec["infer_pseudo_labels"] + sec["filter_and_balance"] + sec["train_student"],
            what=_student_what(cfg, it["iteration"]),
            model=it["student"]["model"],
            test_accuracy=it["student"]["test_accuracy"],
            teacher_test_accuracy=it["teacher"]["test_accuracy"],
            pseudo_label_accuracy=it["pseudo_labels"]["accuracy"],
            seed=cfg.seed,
            # the run's own verdict, a paired test on the choice split (validation)
            against_teacher={
                k: verdict[k] for k in ("verdict", "sentence", "note") if k in verdict
            },
        )
    last = summary["iterations"][-1]
    probabilities = first["pseudo_labels"]["probabilities_url"]
    return FirstIteration(
        summary["artifacts_url"],
        summary["data_root"],
        summary["mlflow"]["parent_run_id"],
        _trained(first["teacher"], "teacher", 1),
        probabilities,
        pseudo_label_shards(probabilities),
        _trained(last["teacher"], "teacher", last["iteration"]),
        _selected(last["pseudo_labels"]),
    )


def first_iteration_again(cfg: PipelineConfig, table: Table) -> FirstIteration:
    """The flow's first teacher and its pseudo labels, trained again from the same config
    and seed, where the flow's rows are in the table but its outputs are not on this
    machine (the table spans sessions; the artifacts do not): the students' hours are not
    spent again. The teacher's accuracy is checked against the table's teacher row."""
    from noisy_student import runs, stages

    data_root = stages.prepare_data(cfg.data.root, cfg.data.fashion_mnist)
    run_id = runs.run_identity(cfg, data_root) + "-first-iteration"
    with runs.PipelineRun.start(cfg, data_root, run_id=run_id) as run:
        teacher = on_test(
            stages.train_teacher(
                cfg.teacher, data_root, run.at(1, "teacher"), run.parent_run_id, cfg.seed
            ),
            data_root,
        )
        probabilities = run.at(1, "pseudo_labels")
        shards = [
            stages.infer_pseudo_labels(
                data_root,
                i,
                teacher.url,
                probabilities,
                cfg.inference.batch_size,
                cfg.inference.precision,
                cfg.inference.tta,
            )
            for i in stages.unlabelled_shards(data_root)
        ]
    [row] = [r for r in table.rows if r["row"] == "teacher"]
    again = {"test_accuracy": teacher.final_accuracy, "table": row["test_accuracy"]}
    table.extra.setdefault("teacher_trained_again", []).append(again)
    if teacher.final_accuracy != row["test_accuracy"]:
        print(
            f"note: the teacher trained again scored {100 * teacher.final_accuracy:.2f}%, the "
            f"table's teacher row {100 * row['test_accuracy']:.2f}% (other hardware or "
            "library versions); the rows measured now start from the new one",
            flush=True,
        )
    return FirstIteration(run.url, data_root, run.parent_run_id, teacher, probabilities, shards)


def ceilings_run(cfg: PipelineConfig) -> FirstIteration:
    """A run folder and MLflow parent run for the ceiling rows alone (their own run id)."""
    from noisy_student import runs, stages

    data_root = stages.prepare_data(cfg.data.root, cfg.data.fashion_mnist)
    run_id = runs.run_identity(cfg, data_root) + "-ceilings"
    with runs.PipelineRun.start(cfg, data_root, run_id=run_id) as run:
        return FirstIteration(run.url, data_root, run.parent_run_id, None, "", [])


def run(
    cfg: PipelineConfig,
    table: Table,
    wanted: list[str],
    reference_limit: int | None = None,
) -> None:
    from noisy_student import stages

    seed = cfg.seed
    names = row_names(cfg)
    todo = [n for n in names if n in wanted and not table.has(n)]
    if not todo:
        return
    final_seeds = final_student_seed_rows(cfg)
    flow_rows = ["teacher", *student_names(cfg), *final_seeds]
    if any(n in todo for n in flow_rows):
        base = the_flow(cfg, table, todo)
    elif any(n not in ceiling_rows(cfg) for n in todo):
        # e.g. a later session on a fresh machine: no need for the students again
        base = first_iteration_again(cfg, table)
    else:  # only ceilings: they need a run folder and an MLflow parent, not the teacher
        base = ceilings_run(cfg)
    run_url, data_root, parent, teacher = base.run_url, base.data_root, base.parent, base.teacher

    for name, teacher_seed in seed_rows(cfg).items():
        if name in todo:
            out = storage.join(run_url, "seeds", f"teacher-{teacher_seed}")
            table.measure(
                name,
                f"the teacher's recipe and labels with seed {teacher_seed}",
                teacher_seed,
                lambda out=out, s=teacher_seed: (
                    on_test(
                        stages.train_teacher(cfg.teacher, data_root, out, parent, s), data_root
                    ),
                    {},
                ),
            )

    # The final student with other seeds: the same teacher and pseudo labels as the flow's.
    k = len(cfg.students)
    for name, student_seed in final_seeds.items():
        if name not in todo:
            continue
        out = storage.join(run_url, "seeds", f"student-{k}-seed-{student_seed}")

        def reseeded(out=out, s=student_seed) -> Any:
            student = stages.train_student(
                cfg.students[-1], data_root, base.final_selected, base.final_teacher, out,
                parent, k, s,
            )  # fmt: skip
            columns = {
                "teacher_test_accuracy": _test_accuracy(base.final_teacher),
                "pseudo_label_accuracy": base.final_selected.accuracy,
            }
            return on_test(student, data_root), columns

        table.measure(
            name,
            f"student {k}'s recipe, teacher and pseudo labels with seed {student_seed}",
            student_seed,
            reseeded,
        )

    # Ablations of iteration 1's student: same teacher, same pseudo labels, one change each.
    for ablation, (what, selection_cfg, train_cfg) in ablations(cfg).items():
        name = f"ablation: {ablation}"
        if name not in todo:
            continue
        here = storage.join(run_url, "ablations", ablation.replace(" ", "-"))

        def ablated(here=here, selection_cfg=selection_cfg, train_cfg=train_cfg) -> Any:
            selected = stages.filter_and_balance(
                base.shards, selection_cfg, data_root, base.probabilities_url,
                storage.join(here, "selected"), teacher, parent, 1, seed,
            )  # fmt: skip
            student = stages.train_student(
                train_cfg, data_root, selected, teacher, storage.join(here, "student"), parent,
                1, seed,
            )  # fmt: skip
            columns = {
                "teacher_test_accuracy": _test_accuracy(teacher),
                "pseudo_label_accuracy": selected.accuracy,
            }
            return on_test(student, data_root), columns

        table.measure(name, what, seed, ablated)

    # The ceilings: the final student's network on every training label.
    source = cfg.data.fashion_mnist.source
    data = "fashion-mnist-all" if reference_limit is None else f"fashion-mnist-{reference_limit}"
    for name, (what, recipe, budget) in ceiling_rows(cfg, reference_limit).items():
        if name not in todo:
            continue

        def ceiling(recipe=recipe, budget=budget) -> Any:
            ref_root = reference_dataset(
                storage.join(cfg.artifacts, "datasets", data), source, reference_limit
            )
            out = storage.join(run_url, "reference", f"ceiling-{budget}x")
            return on_test(stages.train_teacher(recipe, ref_root, out, parent, seed), ref_root), {}

        table.measure(
            name, f"{what}: {recipe.epochs} epochs of batches of {recipe.batch_size}", seed, ceiling
        )


def where_measured(
    result: dict[str, Any], done: dict[str, dict[str, Any]], names: list[str]
) -> str:
    """The hardware of the measured rows (the table spans sessions, and sessions hosts):
    the most common, then the rows measured elsewhere. A row saved before rows kept their
    own (an older file) counts as measured where the file was last written."""
    hosts: dict[str, list[str]] = {}  # in words -> the rows measured there
    for name in names:
        if name in done:
            hw = done[name].get("hardware", result["hardware"])
            hosts.setdefault(f"{describe(hw)} (torch {hw['torch']})", []).append(f"`{name}`")
    if not hosts:
        return ""
    common = max(hosts, key=lambda h: len(hosts[h]))
    return (
        f"Measured on {common}"
        + "".join(f"; {', '.join(rs)} on {h}" for h, rs in hosts.items() if h != common)
        + "."
    )


def markdown(result: dict[str, Any], names: list[str]) -> str:
    ident = result["identity"]
    done = {r["row"]: r for r in result["rows"]}
    measured = {n: r for n, r in done.items() if not r.get("so_far")}
    test_images = ident["config"]["data"]["fashion_mnist"]["test_limit"] or TEST_IMAGES
    status = (
        ""
        if result["complete"]
        else (
            f" **Incomplete: {len(names) - len(measured)} of {len(names)} rows still to run** "
            "(`make bench-accuracy` goes on where it stopped)."
        )
    )
    lines = [
        "# Accuracy: Noisy Student on Fashion-MNIST, 100 labels per class",
        "",
        f"Last written {result['date']}, seed {ident['config']['seed']}, "
        f"{result['attempts']} attempt(s). {where_measured(result, done, names)}{status}",
        "",
        f"Command: `{ident['command']}` (config: `{ident['preset']}`"
        + (
            f"; pipeline run `{result['run_id']}`, MLflow parent run "
            f"`{result['mlflow']['parent_run_id']}`; the flow's wall time over all attempts "
            f"{result['flow_wall_seconds'] / 60:.0f} min"
            + (
                f", its CPU time {result['flow_cpu_seconds'] / 60:.0f} min"
                if "flow_cpu_seconds" in result
                else ""
            )
            if "run_id" in result
            else ""
        )
        + "). A row's wall time is its stage's (the students': labelling, selection and "
        "training) in the attempt that finished it, with its CPU time (all threads) where "
        "the row was measured on its own; the minutes of interrupted attempts before it are "
        "given beside it.",
        "",
        "| row | model | test accuracy [95% interval] | its teacher | pseudo labels right | "
        "wall time | what |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        r = done.get(name)
        if r is None:
            lines.append(f"| {name} | | not yet run | | | | |")
            continue
        pl, tt = r.get("pseudo_label_accuracy"), r.get("teacher_test_accuracy")
        interval = statistics.accuracy_interval(r["test_accuracy"], test_images)
        if r.get("so_far"):  # the flow's, before it returned: no wall time of its own yet
            train = r.get("train_seconds")
            so_far = " (so far)"
            time_ = "" if train is None else f"training {train / 60:.1f} min"
            note = (
                " (seen so far, from MLflow: the flow has not returned; the row is measured "
                "when it does)"
            )
        else:
            so_far = ""
            time_ = (
                f"{r['wall_seconds'] / 60:.1f} min"
                + (f" ({r['cpu_seconds'] / 60:.0f} CPU min)" if "cpu_seconds" in r else "")
                + (
                    f" (+{r['interrupted_seconds'] / 60:.1f} min interrupted)"
                    if "interrupted_seconds" in r
                    else ""
                )
            )
            note = (
                f" (carried from the table of {r['carried_from']['date']}, "
                f"`{r['carried_from']['command']}`: the same recipe, data and seed)"
                if "carried_from" in r
                else ""
            )
        lines.append(
            f"| {name} | {r['model']} | {statistics.percent(r['test_accuracy'], interval)}"
            f"{so_far} | {'' if tt is None else f'{100 * tt:.2f}%'} | "
            f"{'' if pl is None else f'{100 * pl:.2f}%'} | {time_} | {r['what']}{note} |"
        )
    lines += _below_teachers(done, names, result["identity"]["config"])
    agains = result.get("teacher_trained_again", [])
    if agains:
        scores = ", ".join(f"{100 * a['test_accuracy']:.2f}%" for a in agains)
        lines += [
            "",
            f"{len(agains)} attempt(s) after the flow's rows trained its first teacher again "
            f"(same config and seed) for the rows they measured: {scores} (the teacher row: "
            f"{100 * agains[0]['table']:.2f}%); those rows start from it.",
        ]
    final = student_names_in(names)[-1:]
    for first, label in (("teacher", "The teacher"), *((f, f"Student {f[8:]}") for f in final)):
        scores = [
            measured[n]["test_accuracy"]
            for n in names
            if n in measured and (n == first or n.startswith(f"{first}: seed "))
        ]
        if len(scores) > 1:
            spread = statistics.seed_spread(scores)
            lines += [
                "",
                f"{label} over {spread['seeds']} seeds: mean {100 * spread['mean']:.2f}%, "
                f"standard deviation {100 * spread['sd']:.2f} points, range "
                f"{100 * spread['min']:.2f}-{100 * spread['max']:.2f}%.",
            ]
    return "\n".join(lines) + "\n"


def student_names_in(names: list[str]) -> list[str]:
    """The iterations' student rows among a table's rows (not their other seeds)."""
    return [n for n in names if re.fullmatch(r"student \d+", n)]


def _below_teachers(
    done: dict[str, dict[str, Any]], names: list[str], config: dict[str, Any]
) -> list[str]:
    """Each student against its own teacher (student k's teacher is student k-1, the first
    one's the supervised teacher): the run's verdict, a paired test on the validation split,
    and the flow's note of what to try for one significantly below. Rows measured before
    the run gave verdicts are compared by their test accuracy alone, and say so."""
    from noisy_student.stages.promote import below_teacher_note

    lines = []
    students = student_names_in(names)
    for k, (name, teacher) in enumerate(
        zip(students, ["teacher", *students], strict=False), start=1
    ):
        s, t = done.get(name), done.get(teacher)
        if s is None or t is None:
            continue
        verdict = s.get("against_teacher")
        if verdict and "note" in verdict:
            lines += ["", f"**Significantly below its teacher:** {verdict['note']}."]
        elif verdict:
            lines += ["", f"**Student {k} against its teacher:** {verdict['sentence']}."]
        elif s["test_accuracy"] < t["test_accuracy"]:
            note = below_teacher_note(
                k, s["model"], s["test_accuracy"], t["model"], t["test_accuracy"], config
            )
            lines += [
                "",
                f"**Below its teacher** (one test accuracy each, no test of chance): {note}.",
            ]
    return lines


def carry(table: Table, path: Path, cfg: PipelineConfig, reference_limit: int | None) -> list[str]:
    """`--carry`: the earlier file's rows whose inputs `cfg` leaves unchanged join `table`;
    a file that cannot be read, or whose config no longer loads, is a one-line error."""
    try:
        earlier = json.loads(path.read_text())
        then_cfg = PipelineConfig.model_validate(earlier["identity"]["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SystemExit(f"--carry {path}: not an accuracy result file ({reason})") from None
    kinds = ("a full table", "a quick table (--quick)")
    then_quick = " --quick" in earlier["identity"].get("command", "")
    if then_quick != (reference_limit is not None):
        raise SystemExit(
            f"--carry {path}: {kinds[then_quick]}'s rows cannot join {kinds[not then_quick]}"
        )
    return table.carry(
        earlier, row_inputs(cfg, reference_limit), row_inputs(then_cfg, reference_limit)
    )


def stop_on_signals() -> None:
    """SIGINT and SIGTERM stop the benchmark keeping what ran (a KeyboardInterrupt, which
    saves the table and the running row's seconds). SIGINT too, explicitly: a shell without
    job control (a script, `nohup cmd &`) starts a background command with SIGINT ignored,
    and Python then keeps ignoring it: `kill -INT` to such a run went unanswered (measured:
    the training went on for 90 s until SIGKILL). Stopped this way, the flow ends its run
    within a second; the process then takes a while to exit (12-17 s, once over 30 s,
    measured beside another benchmark: the interpreter's final garbage collection)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every row on a slice, in minutes")
    parser.add_argument(
        "--rows", nargs="+", metavar="ROW", help="only these rows (default: every row not yet run)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument(
        "--carry",
        type=Path,
        metavar="OLD.json",
        help="take the rows this config leaves unchanged (the ceilings when only the teacher "
        "or the first students changed, the teacher's other seeds when only the students did) "
        "from an earlier result file",
    )
    args = parser.parse_args(argv)
    flush_denormals()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    stop_on_signals()
    overrides = (QUICK if args.quick else []) + args.set
    reference_limit = None
    if args.quick:
        overrides += [
            f"students.{i}.{key}"
            for i in range(len(config.load(PRESET).students))
            for key in ("model=test_resnet", "epochs=1", "model_kwargs={}")
        ]
        reference_limit = 6000
    cfg = config.load(PRESET, overrides)
    names = row_names(cfg)
    unknown = [r for r in args.rows or [] if r not in names]
    if unknown:
        raise SystemExit(f"--rows: unknown row {unknown[0]!r} (rows: {', '.join(names)})")
    stem = "accuracy-quick" if args.quick else "accuracy"
    command = (
        "uv run python -m benchmarks.accuracy"
        + (" --quick" if args.quick else "")
        + "".join(f" --set {s}" for s in args.set)
    )
    identity = {
        "command": command,
        "preset": str(PRESET.relative_to(REPO)),
        "config": cfg.model_dump(mode="json"),
    }
    table = Table(RESULTS / f"{stem}.json", identity)
    if args.carry:
        taken = carry(table, args.carry, cfg, reference_limit)
        print(f"carried from {args.carry}: {', '.join(taken) or 'no row (every input changed)'}")
    try:
        run(cfg, table, args.rows or names, reference_limit)
    except KeyboardInterrupt:
        (RESULTS / f"{stem}.md").write_text(markdown(table.save(), names))
        print(f"interrupted: the rows so far are in {RESULTS / stem}.md; run again to go on")
        raise SystemExit(130) from None
    result = table.save(complete=all(table.has(n) for n in names))
    (RESULTS / f"{stem}.md").write_text(markdown(result, names))
    print(markdown(result, names))
    print(f"written: {RESULTS / stem}.md and .json")


if __name__ == "__main__":
    main()
