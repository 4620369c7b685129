"""Train the teacher or a student data-parallel, one process per GPU, under torchrun:

    torchrun --nproc-per-node 8 -m noisy_student.torchrun_stage \\
        -c pipeline_config/fashion_mnist.yaml --stage teacher --out s3://bucket/teacher

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint head:29400 \\
        -m noisy_student.torchrun_stage -c CONFIG --stage student --iteration 1 \\
        --teacher s3://bucket/teacher --selected s3://bucket/run/iteration-1/selected \\
        --out s3://bucket/student-1

The same config as `noisy-student run`; every rank reads the same data and trains on its
slice of each global batch (`engine.fit`); rank 0 alone logs to MLflow and writes the
checkpoint. The flow starts this itself, on one machine, when `distributed.nproc_per_node`
is above 1 (`launch`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime

import torch
import yaml

from noisy_student import config as config_mod
from noisy_student import stages
from noisy_student.config import PipelineConfig
from noisy_student.data import dataset, storage
from noisy_student.errors import UserError
from noisy_student.registry import tracking
from noisy_student.training import distributed, engine, models

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node N -m noisy_student.torchrun_stage",
        description="Train the teacher or a student data-parallel under torchrun.",
    )
    p.add_argument("-c", "--config", required=True, help="the pipeline's YAML config")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override; repeatable")
    p.add_argument("--stage", choices=["teacher", "student"], required=True)
    p.add_argument("--out", required=True, help="checkpoint URL to write (rank 0)")
    p.add_argument("--data-root", help="dataset root (default: the config's data.root)")
    p.add_argument("--iteration", type=int, default=1, help="student: which of `students`")
    p.add_argument("--teacher", help="student: the teacher's checkpoint URL")
    p.add_argument("--teacher-run-id", default="", help="student: the teacher's MLflow run")
    p.add_argument("--selected", help="student: the selected pseudo labels' URL")
    p.add_argument("--selected-run-id", default="", help="student: their MLflow run")
    p.add_argument("--parent-run-id", help="MLflow parent run (default: a new one, rank 0)")
    p.add_argument("--result", help="rank 0 writes the stage's record here as JSON")
    return p


def _teacher_record(url: str, run_id: str, iteration: int) -> stages.TrainedModel:
    meta = models.load_meta(url)
    return stages.TrainedModel("teacher", iteration, meta.model, url, run_id, None, 0.0)


def _selected_record(url: str, run_id: str) -> stages.SelectedPseudoLabels:
    info = storage.read_json(storage.join(url, dataset.MANIFEST))
    per_class = info["per_class"]
    return stages.SelectedPseudoLabels(
        url=url,
        probabilities_url=info["pseudo_labels_url"],
        mlflow_run_id=run_id,
        inference_run_id="",
        total=sum(c["predicted"] for c in per_class),
        kept=info["rows"],
        selected=info["selected"],
        accuracy=None,
        accuracy_all=None,
        inference_seconds=0.0,
        seconds=0.0,
        per_class=per_class,
    )


def run_stage(args: argparse.Namespace, cfg: PipelineConfig) -> stages.TrainedModel:
    data_root = storage.resolve(args.data_root or cfg.data.root)
    stages.check_data(data_root, None)  # ingest first: ranks must not race to write it
    if args.stage == "student":
        if not 1 <= args.iteration <= len(cfg.students):
            raise UserError(f"--iteration {args.iteration}: the config has {len(cfg.students)}")
        if not (args.teacher and args.selected):
            raise UserError("--stage student needs --teacher and --selected")
    out = storage.resolve(args.out)
    parent = args.parent_run_id
    own_parent = parent is None and distributed.is_main()
    if own_parent:  # run outside the flow: a parent run of its own, as the flow's would be
        name = f"train-{args.stage}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
        parent = tracking.start_run(cfg.name, name, cfg.model_dump())
    # every rank initialises the same model (DDP would copy rank 0's anyway), and a rerun too
    torch.manual_seed(cfg.seed)
    with tracking.failed_on_error(parent if own_parent else None):
        if args.stage == "teacher":
            trained = stages.train_teacher(cfg.teacher, data_root, out, parent, cfg.seed)
        else:
            trained = stages.train_student(
                cfg.students[args.iteration - 1],
                data_root,
                _selected_record(storage.resolve(args.selected), args.selected_run_id),
                _teacher_record(storage.resolve(args.teacher), args.teacher_run_id, args.iteration),
                out,
                parent,
                args.iteration,
                cfg.seed,
                cfg.name,
            )
    if own_parent:
        tracking.end_run(parent)
    return trained


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # the stages' log lines on stdout: `launch` shows rank 0's in the task's log
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    engine.flush_denormals()
    try:
        cfg = config_mod.load(args.config, args.set or [])
        distributed.init()
        trained = run_stage(args, cfg)
        if args.result and distributed.is_main():
            storage.write_json(args.result, asdict(trained))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        distributed.finish()


def launch(
    cfg: PipelineConfig,
    stage: str,
    data_root: str,
    out_url: str,
    parent_run_id: str,
    iteration: int = 1,
    teacher: stages.TrainedModel | None = None,
    selected: stages.SelectedPseudoLabels | None = None,
    log: Callable[[str], None] = logger.info,
) -> stages.TrainedModel:
    """Run one training stage under torchrun on this machine, `cfg.distributed.nproc_per_node`
    processes, and return rank 0's record."""
    with tempfile.TemporaryDirectory(prefix="ns-torchrun-") as tmp:
        config_path, result = os.path.join(tmp, "config.yaml"), os.path.join(tmp, "result.json")
        with open(config_path, "w") as f:
            yaml.safe_dump(cfg.model_dump(mode="json"), f)
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={cfg.distributed.nproc_per_node}",
            "-m",
            "noisy_student.torchrun_stage",
            *("-c", config_path, "--stage", stage, "--out", out_url),
            *("--data-root", data_root, "--parent-run-id", parent_run_id),
            *("--iteration", str(iteration), "--result", result),
        ]
        if teacher is not None:
            command += ["--teacher", teacher.url, "--teacher-run-id", teacher.mlflow_run_id]
        if selected is not None:
            command += ["--selected", selected.url, "--selected-run-id", selected.mlflow_run_id]
        lines: deque[str] = deque(maxlen=20)
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc:
            for line in proc.stdout:  # rank 0's epoch lines, as they come
                lines.append(line.rstrip())
                log(line.rstrip())
        if proc.returncode != 0:
            tail = "\n".join(lines)
            raise RuntimeError(f"torchrun {stage} failed (exit {proc.returncode}):\n{tail}")
        with open(result) as f:
            return stages.TrainedModel(**json.load(f))


if __name__ == "__main__":
    main()
