"""Stage 5: clean and corrupted test accuracy, models side by side."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch

from noisy_student import corruptions, engine, models, storage, tracking
from noisy_student.config import EvaluationConfig
from noisy_student.stages.prepare_data import load_test
from noisy_student.stages.records import Log, Robustness, TrainedModel


def evaluate_robustness(
    trained: list[TrainedModel],
    cfg: EvaluationConfig,
    data_root: str,
    out_url: str,
    parent_run_id: str,
    iteration: int,
    log: Log = print,
) -> Robustness:
    """Clean test accuracy and accuracy under common corruptions, models side by side."""
    start = time.perf_counter()
    _, test = load_test(data_root)
    subset = torch.arange(len(test))
    if cfg.corruption_images and cfg.corruption_images < len(test):
        subset = torch.randperm(len(test), generator=torch.Generator().manual_seed(cfg.seed))
        subset = subset[: cfg.corruption_images].sort().values
    images, labels = test.images[subset], test.labels[subset]
    corrupted = {
        (name, s): corruptions.corrupt(images, name, s, cfg.seed)
        for name in cfg.corruptions
        for s in cfg.severities
    }
    run_id = tracking.start_stage_run(
        parent_run_id,
        "evaluate_robustness",
        iteration,
        {**cfg.model_dump(), "models": [t.mlflow_run_id for t in trained]},
        {f"{tracking.TAG}{t.role}_run_id": t.mlflow_run_id for t in trained},
    )
    with tracking.failed_on_error(run_id):
        rows, results = [], []
        for t in trained:
            model, _ = models.load(t.url)
            model.to(engine.device())
            clean = engine.accuracy(model, test.images, test.labels, cfg.batch_size, cfg.precision)
            rows.append(
                {
                    "model": t.model,
                    "mlflow_run_id": t.mlflow_run_id,
                    "iteration": iteration,
                    "role": t.role,
                    "corruption": "none",
                    "severity": 0,
                    "accuracy": clean,
                }
            )
            per_corruption: dict[str, list[float]] = {}
            for (name, s), x in corrupted.items():
                acc = engine.accuracy(model, x, labels, cfg.batch_size, cfg.precision)
                per_corruption.setdefault(name, []).append(acc)
                rows.append(
                    {
                        "model": t.model,
                        "mlflow_run_id": t.mlflow_run_id,
                        "iteration": iteration,
                        "role": t.role,
                        "corruption": name,
                        "severity": s,
                        "accuracy": acc,
                    }
                )
            mean_corrupt = float(np.mean([a for accs in per_corruption.values() for a in accs]))
            results.append(
                {
                    "role": t.role,
                    "model": t.model,
                    "mlflow_run_id": t.mlflow_run_id,
                    "test_accuracy": clean,
                    "corruption_accuracy": mean_corrupt,
                    "per_corruption": {k: float(np.mean(v)) for k, v in per_corruption.items()},
                }
            )
            metrics = {
                f"{t.role}_test_accuracy": clean,
                f"{t.role}_corruption_accuracy": mean_corrupt,
            }
            metrics |= {
                f"{t.role}_{k}_accuracy": float(np.mean(v)) for k, v in per_corruption.items()
            }
            tracking.log_metrics(run_id, metrics)
            log(f"{t.role} {t.model}: clean {clean:.2%}, corrupted {mean_corrupt:.2%}")
        table = pa.Table.from_pylist(rows)
        storage.write_parquet(storage.join(out_url, "robustness.parquet"), table, 65536)
        tracking.end_run(run_id)
        return Robustness(out_url, run_id, time.perf_counter() - start, results)
