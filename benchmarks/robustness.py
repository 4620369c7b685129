"""What does evaluate_robustness cost in the demo? Its time on the demo's test set and
models, side by side with the four-corruption evaluation it replaced.

The demo's teacher and student are resnet10t at 28 px on the 10,000 Fashion-MNIST test
images; inference and FGSM cost the same whatever the weights, so two freshly initialised
resnet10t checkpoints stand in for them. Rows, in one process:

- `cold`: the demo's evaluation section, the corruption suite generated and cached;
- `warm`: the same again, the suite read back from its cache (later runs, and iteration 2);
- `previous`: the evaluation the demo ran before this benchmark existed (gaussian noise,
  gaussian blur, contrast, rotate at 5 severities on 2,000 images, no FGSM), for the
  added time.

    OMP_NUM_THREADS=2 uv run python -m benchmarks.robustness

Writes benchmarks/results/robustness.json with wall and CPU seconds per row, the thread
count and the load average: on a shared machine the CPU seconds are the steadier figure.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from noisy_student import config, stages
from noisy_student.data import dataset, ingest, storage
from noisy_student.registry import tracking
from noisy_student.training import models
from noisy_student.training.engine import flush_denormals

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DEMO = REPO / "pipeline_config" / "fashion_mnist.yaml"
PREVIOUS = [
    "evaluation.corruptions=[gaussian_noise, gaussian_blur, contrast, rotate]",
    "evaluation.corruption_images=2000",
    "evaluation.fgsm_epsilons=[]",
]


def checkpoint(root: str, url: str, seed: int) -> stages.TrainedModel:
    m = dataset.read_manifest(storage.join(root, dataset.TEST))
    torch.manual_seed(seed)
    net = models.create("resnet10t", m.num_classes, m.channels)
    models.save(net, models.ModelMeta.for_data("resnet10t", m), url)
    role = "teacher" if seed == 0 else "student"
    run_id = tracking.start_run("robustness-benchmark", role)
    return stages.TrainedModel(role, 1, "resnet10t", url, run_id, None, 0.0)


@contextlib.contextmanager
def _stage_log() -> Iterator[list[str]]:
    """The lines the stage logs meanwhile (with `logging`), for the results file."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("noisy_student")
    level, logger.level = logger.level, logging.INFO
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def main() -> None:
    flush_denormals()
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="ns-robustness-bench-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
    root = str(tmp / "data")
    cfg = config.load(DEMO, [f"data.root={root}"])
    src = cfg.data.fashion_mnist
    ingest.fashion_mnist(root, src.source, 1, 100, None, 0, 8192)  # the whole test set
    trained = [checkpoint(root, str(tmp / name), i) for i, name in enumerate(["t", "s"])]
    parent = tracking.start_run("robustness-benchmark", "run")
    rows = {}
    for name, evaluation in (
        ("cold", cfg.evaluation),
        ("warm", cfg.evaluation),
        ("previous", config.load(DEMO, [f"data.root={root}", *PREVIOUS]).evaluation),
    ):
        start, cpu = time.perf_counter(), time.process_time()
        with _stage_log() as lines:
            result = stages.evaluate_robustness(
                trained, evaluation, root, str(tmp / name), parent, 1
            )
        rows[name] = {
            "seconds": round(time.perf_counter() - start, 1),
            "cpu_seconds": round(time.process_time() - cpu, 1),
            "corruptions": len(evaluation.corruptions),
            "severities": len(evaluation.severities),
            "images_per_set": evaluation.corruption_images,
            "fgsm_epsilons": evaluation.fgsm_epsilons,
            "log": lines,
            "mce": {m.role: m.mce for m in result.models},
        }
        print(name, rows[name]["seconds"], "s wall", rows[name]["cpu_seconds"], "s CPU", lines)
    out = {
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} "
        "uv run python -m benchmarks.robustness",
        "added_seconds_cold": round(rows["cold"]["seconds"] - rows["previous"]["seconds"], 1),
        "added_seconds_warm": round(rows["warm"]["seconds"] - rows["previous"]["seconds"], 1),
        "added_cpu_seconds_cold": round(
            rows["cold"]["cpu_seconds"] - rows["previous"]["cpu_seconds"], 1
        ),
        "added_cpu_seconds_warm": round(
            rows["warm"]["cpu_seconds"] - rows["previous"]["cpu_seconds"], 1
        ),
        "load_average_before": load_before,
        "rows": rows,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_after": os.getloadavg(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "robustness.json").write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
