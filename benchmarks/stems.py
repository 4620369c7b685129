"""What each stem setting (`teacher.stem`, noisy_student/training/models.py) costs and buys on
Fashion-MNIST's 28 px images, measured side by side in one run on the demo's network:

- training speed: images/s of the training loop (augmentation, forward, backward, SGD, EMA);
- accuracy at a short budget: the demo teacher's recipe on 1,000 labels (100 per class),
  every setting at the same epochs, then the slower ones at the imagenet stem's wall time;
- the feature map's size before pooling.

    uv run python -m benchmarks.stems                # about 10 minutes of CPU time (2 cores)
    uv run python -m benchmarks.stems --quick        # a smoke run, about 4 minutes

Writes benchmarks/results/stems.json and stems.md (stems-quick.* with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.accuracy import hardware
from noisy_student.config import TeacherConfig
from noisy_student.data import ingest, training_data
from noisy_student.stages import train as training_stage
from noisy_student.training import engine, models

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
SOURCE = ingest.FASHION_MNIST_DIR


def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = ingest.read_idx(f"{SOURCE}/{split}-images-idx3-ubyte.gz")
    labels = ingest.read_idx(f"{SOURCE}/{split}-labels-idx1-ubyte.gz")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def train(
    model_name: str,
    stem: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    test: tuple[torch.Tensor, torch.Tensor],
    epochs: int,
    batch_size: int,
    seed: int,
) -> dict[str, Any]:
    """The demo teacher's recipe (TeacherConfig's defaults: SGD, cosine, EMA, flips and
    2 px crops) at `epochs`, evaluated once at the end."""
    cfg = TeacherConfig(model=model_name, epochs=epochs, batch_size=batch_size)
    torch.manual_seed(seed)
    model = models.create(model_name, 10, 1, stem=stem)
    cfg = cfg.model_copy(update={"eval_every": epochs})
    schedule = training_stage.schedule(cfg)
    noise = training_stage.noise(cfg, 28, 28)
    batches = [(test[0][i : i + 1024], test[1][i : i + 1024]) for i in range(0, len(test[1]), 1024)]
    fit = engine.fit(
        model,
        training_data.TensorRows(images, engine.one_hot(labels, 10)),
        schedule,
        noise,
        seed,
        evaluation=batches,
    )
    return {
        "test_accuracy": fit.final_accuracy,
        "images_per_second": fit.steps * batch_size / fit.seconds,
        "train_seconds": fit.seconds,
        "steps": fit.steps,
    }


def feature_size(model_name: str, stem: str) -> list[int]:
    net = models.create(model_name, 10, 1, stem=stem).eval()
    with torch.no_grad():
        return list(net.forward_features(torch.zeros(1, 1, 28, 28)).shape[-2:])


def probe_rate(model_name: str, stem: str, steps: int, batch_size: int) -> float:
    """Training images/s of `steps` plain SGD steps on random 28 px images (after one
    warm-up step): what sets each setting's share of an equal-time budget."""
    net = models.create(model_name, 10, 1, stem=stem).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.rand(batch_size, 1, 28, 28) * 2 - 1, torch.randint(0, 10, (batch_size,))
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch_size / (time.perf_counter() - start)


def run(quick: bool, model_name: str, seed: int, epochs: int) -> dict[str, Any]:
    train_images, train_labels = load("train")
    test = load("t10k")
    few = torch.from_numpy(ingest.split_labelled(train_labels.numpy(), 100, seed))
    if quick:
        test = (test[0][:500], test[1][:500])
    rates = {s: probe_rate(model_name, s, 3 if quick else 20, 64) for s in models.STEMS}
    # every setting at the same epochs, then the slower ones again at the imagenet stem's
    # wall time (epochs scaled by the measured speed ratio)
    # stride1 at the same epochs would take most of the budget by itself (see its speed)
    plan = [(s, epochs, "same epochs") for s in models.STEMS if s != "stride1" or quick]
    for s in models.STEMS[1:]:
        same_time = max(1, round(epochs * rates[s] / rates["imagenet"]))
        if same_time < epochs:
            plan.append((s, same_time, "same time"))
    if quick:
        plan = plan[:3]
    rows = []
    for stem, n, budget in plan:
        started = time.perf_counter()
        teacher = train(model_name, stem, train_images[few], train_labels[few], test, n, 64, seed)
        rows.append(
            {
                "stem": stem,
                "budget": budget,
                "epochs": n,
                "feature_map": feature_size(model_name, stem),
                "probe_images_per_second": rates[stem],
                "speed_vs_imagenet": rates[stem] / rates["imagenet"],
                **teacher,
                "wall_seconds": time.perf_counter() - started,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return {
        "benchmark": "stems",
        "model": model_name,
        "image_size": 28,
        "seed": seed,
        "quick": quick,
        "run": "the demo teacher's recipe (TeacherConfig defaults) on 1,000 labels "
        "(100 per class), batch 64",
        "test_images": len(test[0]),
        "hardware": hardware(),
        "load_average_at_end": os.getloadavg(),
        "torch_threads": torch.get_num_threads(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    hw = result["hardware"]
    lines = [
        f"# Stem settings on Fashion-MNIST ({result['model']}, {result['image_size']} px)",
        "",
        f"Measured side by side in one run by `uv run python -m benchmarks.stems"
        f"{' --quick' if result['quick'] else ''}` on {hw['cpu']} ({hw['cpu_cores']} cores, "
        f"{result['torch_threads']} torch thread(s), load average at the end "
        f"{result['load_average_at_end'][0]:.2f}: the machine was shared), seed "
        f"{result['seed']}, {result['finished_at']}. Each row: {result['run']}; accuracy on "
        f"{result['test_images']} test images. Speed: plain SGD steps on 28 px images, all "
        "settings probed one after the other; train images/s: the whole training loop.",
        "",
        "| stem | map before pooling | speed vs imagenet | budget | epochs | train images/s | "
        "test accuracy | wall (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| `{r['stem']}` | {r['feature_map'][0]}x{r['feature_map'][1]} | "
            f"{r['speed_vs_imagenet']:.2f}x | {r['budget']} | {r['epochs']} | "
            f"{r['images_per_second']:.0f} | {100 * r['test_accuracy']:.2f}% | "
            f"{r['wall_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run on slices")
    p.add_argument("--model", default="resnet10t", help="timm model (default: the demo's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=5, help="the imagenet stem's epochs")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 holds up best on a shared CPU)"
    )
    args = p.parse_args(argv)
    engine.flush_denormals()
    torch.set_num_threads(args.threads)
    result = run(args.quick, args.model, args.seed, 2 if args.quick else args.epochs)
    name = "stems-quick" if args.quick else "stems"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
