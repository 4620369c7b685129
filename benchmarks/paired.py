"""Two trained models judged on the same images: each image's answer, right or wrong, from
both, and the exact McNemar test with the interval of the difference (see
`noisy_student.evaluation.statistics.mcnemar`). For rows of a result table that keep only
their accuracy, e.g. the accuracy benchmark's student against its ablation:

    RUN=artifacts/runs/noisy-student-accuracy-ab423cd57650
    uv run python -m benchmarks.paired $RUN/iteration-1/student \\
        $RUN/ablations/no-noise/student --data artifacts/datasets/fashion-mnist-100-val50

Each model is a folder (or fsspec URL) the pipeline saved (model.json and its weights); the
images are a split of a dataset in the project's format (test by default). Prints one JSON
line per pair (the first model against each later one).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from noisy_student.data import dataset
from noisy_student.errors import UserError
from noisy_student.evaluation import statistics
from noisy_student.stages.prepare_data import test_batches
from noisy_student.training import engine, models
from noisy_student.training.engine import flush_denormals

BATCH = 1000


def right_answers(model_url: str, data_root: str, split: str = dataset.TEST) -> torch.Tensor:
    """The model's answer on every image of the split, right or wrong, in the split's order."""
    model, _ = models.load(model_url)
    return engine.right_answers(model.to(engine.device()), test_batches(data_root, BATCH, split))


def compare(model_urls: list[str], data_root: str, split: str = dataset.TEST) -> list[dict]:
    """The first model against each of the others on the same images."""
    first, *others = [right_answers(url, data_root, split) for url in model_urls]
    out: list[dict[str, Any]] = []
    for url, right in zip(model_urls[1:], others, strict=True):
        record = statistics.mcnemar(first, right).record()
        out.append({"first": model_urls[0], "second": url, "split": split, **record})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="two or more saved models (folders or URLs)")
    parser.add_argument("--data", required=True, help="a dataset root in the project's format")
    parser.add_argument("--split", default=dataset.TEST, help="the split to judge on (test)")
    args = parser.parse_args(argv)
    if len(args.models) < 2:
        raise SystemExit("benchmarks.paired: give at least two models")
    flush_denormals()
    try:
        records = compare(args.models, args.data, args.split)
    except UserError as e:
        raise SystemExit(f"benchmarks.paired: {e}") from None
    for record in records:
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
