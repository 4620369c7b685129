"""`noisy-student`: run the pipeline, ingest data, predict with a trained model."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from noisy_student.errors import UserError


def _one_line_user_errors(record: logging.LogRecord) -> bool:
    """Bad input is reported in one line; Prefect would add a traceback to its log."""
    if record.exc_info and isinstance(record.exc_info[1], UserError):
        record.exc_info, record.exc_text = None, None
    return True


def _cmd_run(args: argparse.Namespace) -> None:
    from noisy_student import config as config_mod
    from noisy_student import stages

    cfg = config_mod.load(args.config, args.set or [])
    stages.check_data(cfg.data.root, cfg.data.fashion_mnist)
    # Prefect's temporary local server needs no network; don't let it try.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # It starts in ~20 s on an idle 2-core machine; give a busy one more time.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.noisy_student import noisy_student
    from noisy_student import report

    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_one_line_user_errors)
    summary = noisy_student(cfg, run_id=args.run_id)
    print()
    print(report.table(summary))
    print(f"summary: {summary['summary_url']}")


def _cmd_ingest_fashion_mnist(args: argparse.Namespace) -> None:
    from noisy_student import ingest

    out = ingest.fashion_mnist(
        args.out,
        args.source,
        args.labelled_per_class,
        args.unlabelled_limit,
        args.test_limit,
        args.seed,
        args.rows_per_shard,
    )
    _print_dataset(out)


def _cmd_ingest_image_folder(args: argparse.Namespace) -> None:
    from noisy_student import ingest

    out = ingest.image_folder(
        args.out,
        args.labelled,
        args.unlabelled,
        args.test,
        args.image_size,
        args.mode,
        args.rows_per_shard,
        args.on_bad_image,
        args.on_mismatch,
    )
    _print_dataset(out)


def _print_dataset(root: str) -> None:
    from noisy_student import dataset, storage

    skipped = []
    for split in (dataset.LABELLED, dataset.UNLABELLED, dataset.TEST):
        m = dataset.read_manifest(storage.join(root, split))
        skipped += storage.read_json(storage.join(m.url, dataset.MANIFEST)).get("skipped", [])
        print(
            f"{split:<10} {m.num_rows:>7} images in {len(m.shards)} shard(s), "
            f"{m.mode} {m.width}x{m.height}, {m.num_classes} classes"
        )
    if skipped:
        print(f"skipped {len(skipped)} bad image(s) (listed in the manifests under 'skipped'):")
        for s in skipped:
            print(f"  {s['file']}: {s['reason']}")
    print(f"dataset: {root}")


def _cmd_predict(args: argparse.Namespace) -> None:
    from noisy_student import predict

    model, meta = predict.load_model(args.model)
    for path in args.images:
        print(path)
        for rank, (name, p) in enumerate(predict.top_k(model, meta, path, args.top_k), start=1):
            print(f"  {rank}. {name:<20} {100 * p:6.2f}%")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="noisy-student",
        description="Noisy Student Training as a Prefect pipeline with Parquet artifacts "
        "and MLflow lineage.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline locally (Prefect's temporary API)")
    run.add_argument(
        "-c", "--config", required=True, help="YAML config, e.g. pipeline_config/fashion_mnist.yaml"
    )
    run.add_argument(
        "--set",
        action="append",
        metavar="KEY.PATH=VALUE",
        help="override a config value (YAML syntax), e.g. students.0.epochs=1; repeatable",
    )
    run.add_argument(
        "--run-id",
        help="name of this run (default: derived from the config and the data, so that "
        "running the same command again after a crash resumes the run)",
    )
    run.set_defaults(func=_cmd_run)

    ingest = sub.add_parser("ingest", help="write raw images in the dataset format")
    isub = ingest.add_subparsers(dest="source_kind", required=True)
    fm = isub.add_parser("fashion-mnist", help="from the four IDX .gz files")
    fm.add_argument("--out", required=True, help="dataset root URL to write")
    fm.add_argument(
        "--source",
        default="/usr/share/datasets/fashion-mnist",
        help="folder with the IDX files (default: Debian's dataset-fashion-mnist)",
    )
    fm.add_argument("--labelled-per-class", type=int, default=100)
    fm.add_argument("--unlabelled-limit", type=int, help="keep only this many unlabelled images")
    fm.add_argument("--test-limit", type=int, help="keep only this many test images")
    fm.add_argument("--seed", type=int, default=0, help="seed of the labelled/unlabelled split")
    fm.add_argument("--rows-per-shard", type=int, default=8192)
    fm.set_defaults(func=_cmd_ingest_fashion_mnist)
    imf = isub.add_parser("image-folder", help="from ImageFolder trees (local or any fsspec URL)")
    imf.add_argument("--out", required=True, help="dataset root URL to write")
    imf.add_argument("--labelled", required=True, help="folder with one sub-folder per class")
    imf.add_argument("--unlabelled", required=True, help="folder of images without classes")
    imf.add_argument("--test", required=True, help="folder with one sub-folder per class")
    imf.add_argument("--image-size", type=int, required=True, help="resize every image to NxN")
    imf.add_argument("--mode", choices=["L", "RGB"], default="RGB", help="grayscale or colour")
    imf.add_argument("--rows-per-shard", type=int, default=8192)
    imf.add_argument(
        "--on-bad-image",
        choices=["error", "skip"],
        default="error",
        help="a corrupt or non-image file stops the ingest (error), or is left out and "
        "listed (skip)",
    )
    imf.add_argument(
        "--on-mismatch",
        choices=["convert", "error"],
        default="convert",
        help="an image of another size or mode is converted and resized (convert), or is "
        "a bad image (error)",
    )
    imf.set_defaults(func=_cmd_ingest_image_folder)

    pred = sub.add_parser("predict", help="top-k classes for images")
    pred.add_argument("images", nargs="+", help="image files")
    pred.add_argument(
        "--model",
        required=True,
        help="MLflow run id (or runs:/ID), a stage's "
        "checkpoint URL (…/iteration-1/student), or a registered model "
        "(models:/NAME, models:/NAME/VERSION, models:/NAME@ALIAS)",
    )
    pred.add_argument("--top-k", type=int, default=5)
    pred.set_defaults(func=_cmd_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command in ("run", "predict"):
        from noisy_student.engine import flush_denormals

        flush_denormals()
    try:
        args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
