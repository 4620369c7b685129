"""`noisy-student predict`: top-k classes for images."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    pred = sub.add_parser("predict", help="top-k classes for images")
    pred.add_argument("images", nargs="+", help="image files")
    pred.add_argument(
        "--model",
        required=True,
        help="MLflow run id (or runs:/ID), a stage's "
        "checkpoint URL (…/iteration-1/student), or a registered model "
        "(models:/NAME, models:/NAME/VERSION, models:/NAME@ALIAS), or timm:NAME (a timm "
        "model with its pretrained weights and ImageNet class names, e.g. "
        "timm:tf_efficientnet_b0.ns_jft_in1k)",
    )
    pred.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="timm:NAME: its weights from this file (safetensors, .pth or .bin; any fsspec "
        "URL) instead of timm's hub, e.g. offline",
    )
    pred.add_argument("--top-k", type=int, default=5)
    pred.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> None:
    from noisy_student.registry import predict

    model, meta = predict.load_model(args.model, args.checkpoint)
    for path in args.images:
        print(path)
        for rank, (name, p) in enumerate(predict.top_k(model, meta, path, args.top_k), start=1):
            print(f"  {rank}. {name:<20} {100 * p:6.2f}%")
