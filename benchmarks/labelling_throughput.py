"""How fast one worker labels, and what that means for a cluster.

One worker is one process on one core (as a Dask worker started with --nthreads 1, whose
torch then uses one thread): it labels whole shards as the pipeline's task does (read the
Parquet shard, decode the PNGs, the teacher's forward pass, write the probabilities), the
teacher already loaded. The forward pass alone, on decoded images, is timed beside it.
With --cluster N the same shards are also labelled through the flow's sub-flow on a
temporary local Dask cluster of N one-thread worker processes.

    uv run python -m benchmarks.labelling_throughput                 # ~1 minute
    uv run python -m benchmarks.labelling_throughput --cluster 2

Writes benchmarks/results/labelling_throughput.json and prints the scaling table: time
to label 1M, 10M and 100M images with N such workers, from the rate per CPU second (what
a core of its own gives, even on a machine shared with other jobs), assuming the shards
spread evenly (they are independent; scheduling a shard costs milliseconds, labelling it
seconds) and storage keeps up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from benchmarks.accuracy import hardware
from noisy_student import stages
from noisy_student.data import dataset, ingest, storage
from noisy_student.stages.infer_pseudo_labels import cached_teacher
from noisy_student.training import engine, models

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
IMAGES = (1_000_000, 10_000_000, 100_000_000)
WORKERS = (1, 8, 64, 512)


def make_dataset(root: str, source: str, images: int, rows_per_shard: int) -> str:
    return ingest.fashion_mnist(
        root,
        source,
        labelled_per_class=10,
        unlabelled_limit=images,
        test_limit=100,
        rows_per_shard=rows_per_shard,
    )


def make_teacher(data_root: str, model: str, out: str) -> str:
    manifest = dataset.read_manifest(storage.join(data_root, dataset.LABELLED))
    torch.manual_seed(0)  # throughput does not depend on the weights
    net = models.create(model, manifest.num_classes, manifest.channels)
    return models.save(net, models.ModelMeta.for_data(model, manifest), out)


def one_worker(data_root: str, teacher: str, out: str, batch_size: int, repeats: int) -> dict:
    shards = stages.unlabelled_shards(data_root)
    stages.infer_pseudo_labels(data_root, shards[0], teacher, out, batch_size)  # load, warm up
    rates, cpu_rates = [], []
    for _ in range(repeats):
        start, cpu_start, rows = time.perf_counter(), time.process_time(), 0
        for i in shards:
            rows += stages.infer_pseudo_labels(data_root, i, teacher, out, batch_size).rows
        rates.append(rows / (time.perf_counter() - start))
        cpu_rates.append(rows / (time.process_time() - cpu_start))
    manifest = dataset.read_manifest(storage.join(data_root, dataset.UNLABELLED))
    images = dataset.load_shard(manifest, shards[0]).images
    model = cached_teacher(teacher)
    start = time.perf_counter()
    for _ in range(repeats):
        engine.predict_probs(model, images, batch_size)
    forward = repeats * len(images) / (time.perf_counter() - start)
    return {
        "end_to_end_images_per_second": statistics.median(rates),
        "end_to_end_runs": rates,
        # per second of this process's CPU time: what a core of its own gives, even while
        # other jobs share the cores (wall-clock rates then fall, CPU-time rates do not)
        "end_to_end_images_per_cpu_second": statistics.median(cpu_rates),
        "forward_only_images_per_second": forward,
    }


def on_local_dask(data_root: str, teacher: str, out: str, batch_size: int, workers: int) -> dict:
    from flows.labelling import label_unlabelled
    from noisy_student.config import InferenceConfig

    cfg = InferenceConfig(batch_size=batch_size, runner="dask", local_workers=workers)
    shards = stages.unlabelled_shards(data_root)
    start = time.perf_counter()
    labelled = label_unlabelled(cfg, shards, data_root, teacher, out)
    seconds = time.perf_counter() - start
    rows = sum(s.rows for s in labelled)
    busy = sum(s.seconds for s in labelled)  # inside the tasks, first shard's load included
    return {
        "workers": workers,
        "images": rows,
        "wall_seconds": seconds,
        "images_per_second_incl_cluster_start": rows / seconds,
        "images_per_second_inside_tasks": rows / busy * workers,
    }


def scaling_table(rate: float) -> list[dict]:
    return [
        {"workers": w, **{f"{n:,} images (h)": n / (rate * w) / 3600 for n in IMAGES}}
        for w in WORKERS
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=16384, help="unlabelled images to label")
    p.add_argument("--rows-per-shard", type=int, default=4096)
    p.add_argument("--model", default="resnet10t", help="the demo's teacher by default")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cluster", type=int, default=0, help="also on a local Dask cluster of N")
    p.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    args = p.parse_args(argv)
    engine.flush_denormals()
    torch.set_num_threads(1)  # one worker, one core

    with tempfile.TemporaryDirectory(prefix="ns-throughput-") as tmp:
        root = make_dataset(f"{tmp}/data", args.source, args.images, args.rows_per_shard)
        teacher = make_teacher(root, args.model, f"{tmp}/teacher")
        result = {
            "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "hardware": hardware(),
            "model": args.model,
            "images": args.images,
            "image_size": "28x28x1 (Fashion-MNIST PNGs)",
            "batch_size": args.batch_size,
            "load_average_before": os.getloadavg(),
            "one_worker": one_worker(root, teacher, f"{tmp}/p", args.batch_size, args.repeats),
        }
        if args.cluster:
            result["local_dask"] = on_local_dask(
                root, teacher, f"{tmp}/q", args.batch_size, args.cluster
            )
    result["load_average_after"] = os.getloadavg()  # others' work on the same cores slows it
    rate = result["one_worker"]["end_to_end_images_per_cpu_second"]
    result["scaling_hours"] = scaling_table(rate)

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "labelling_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    w = result["one_worker"]
    print(
        f"one worker ({args.model}, 1 thread): {rate:.0f} images per CPU second end to end "
        f"({w['end_to_end_images_per_second']:.0f} images/s wall clock at load "
        f"{result['load_average_after'][0]:.1f}), "
        f"{w['forward_only_images_per_second']:.0f} images/s forward only"
    )
    if args.cluster:
        d = result["local_dask"]
        print(
            f"local Dask cluster, {d['workers']} workers: {d['images']} images in "
            f"{d['wall_seconds']:.1f} s ({d['images_per_second_incl_cluster_start']:.0f} images/s "
            f"with the cluster's start), {d['images_per_second_inside_tasks']:.0f} images/s "
            "inside the tasks"
        )
    print(" | ".join(["workers", *(f"{n:,} images" for n in IMAGES)]))
    for row in result["scaling_hours"]:
        times = (_duration(v) for k, v in row.items() if k != "workers")
        print(" | ".join([str(row["workers"]), *times]))


def _duration(hours: float) -> str:
    if hours >= 1:
        return f"{hours:.1f} h"
    return f"{hours * 60:.0f} min" if hours >= 1 / 60 else f"{hours * 3600:.0f} s"


if __name__ == "__main__":
    main()
