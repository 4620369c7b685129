"""`noisy-student`: run or serve the pipeline, ingest data, predict with a trained model."""

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


def _prefect_defaults() -> None:
    # Prefect's server (temporary or not) needs no network; don't let it try.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary one starts in ~20 s on an idle 2-core machine; give a busy one more time.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_one_line_user_errors)


def _temporary_server_stops_with_us() -> None:
    """Without PREFECT_API_URL, Prefect starts a temporary server of its own and stops it
    at exit. Start it here instead (Prefect then uses this same one) and have a watchdog
    stop it if this process is killed before it can."""
    if os.environ.get("PREFECT_API_URL"):
        return
    from prefect.server.api.server import SubprocessASGIServer

    from noisy_student import watchdog

    server = SubprocessASGIServer()
    server.start()
    if server.server_process is not None:
        watchdog.start(server.server_process.pid)


def _cmd_run(args: argparse.Namespace) -> None:
    from noisy_student import config as config_mod
    from noisy_student import stages

    cfg = config_mod.load(args.config, args.set or [])
    stages.check_data(cfg.data.root, cfg.data.fashion_mnist)
    _prefect_defaults()
    _temporary_server_stops_with_us()
    from flows.noisy_student import noisy_student
    from noisy_student import report

    summary = noisy_student(cfg, teacher=args.teacher, run_id=args.run_id)
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
        args.format,
        args.quality,
    )
    _print_dataset(out)


def _cmd_ingest_parquet(args: argparse.Namespace) -> None:
    from noisy_student import ingest_parquet

    out = ingest_parquet.parquet(
        args.src,
        args.dataset,
        args.split,
        args.image_column,
        args.label_column or None,
        args.id_column,
        args.classes.split(",") if args.classes else None,
        args.image_size,
        args.mode,
        args.rows_per_shard,
    )
    print(f"{args.split} split written to {out}")


def _cmd_ingest_append(args: argparse.Namespace) -> None:
    from noisy_student import ingest, storage

    root = storage.resolve(args.dataset)
    announcing = not args.no_event and bool(os.environ.get("PREFECT_API_URL"))
    if announcing:
        from flows.events import check_api

        _prefect_defaults()
        check_api()  # a refused auth string stops us before the data changes
    before, after = ingest.append_unlabelled(root, args.images, args.id_prefix, args.rows_per_shard)
    print(
        f"unlabelled: version {before.version} -> {after.version}: "
        f"{after.num_rows - before.num_rows} images added in "
        f"{len(after.shards) - len(before.shards)} shard(s), {after.num_rows} in all"
    )
    if args.no_event:
        return
    if not announcing:
        print("PREFECT_API_URL is not set: no event emitted (a `watch` deployment will notice)")
        return
    from flows.events import EVENT, announce

    try:
        event = announce(root, after.state(), before.state(), source="ingest")
    except Exception as e:  # the append has landed: say so, and what did not happen
        raise UserError(
            f"{os.environ['PREFECT_API_URL']}: the images were appended (version "
            f"{after.version}) but the event was not sent ({type(e).__name__}); a `watch` "
            "deployment will notice the new version"
        ) from None
    print(f"event {EVENT} emitted for {event.resource.id}")


def _cmd_results_storage(args: argparse.Namespace) -> None:
    from flows.events import use_result_storage

    _prefect_defaults()
    slug = use_result_storage(args.url)
    print(f"block {slug} saved; give workers these variables:")
    print(f"PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK={slug}")
    print("PREFECT_RESULTS_PERSIST_BY_DEFAULT=true")


def _cmd_serve(args: argparse.Namespace) -> None:
    from datetime import timedelta

    from noisy_student import config as config_mod

    overrides = dict(config_mod.override_pairs(args.set or []))
    config_mod.load(args.config, overrides)  # one-line error before anything starts
    if not os.environ.get("PREFECT_API_URL"):
        raise UserError(
            "PREFECT_API_URL is not set: start `prefect server start` and export "
            "PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    _prefect_defaults()
    from flows.events import check_api

    check_api()
    _check_mlflow_server()
    from flows.deployments import serve

    serve(
        args.config,
        overrides,
        teacher=None if args.teacher == "none" else args.teacher,
        cron=args.cron,
        window=timedelta(seconds=args.batch_window),
        watch_every=args.watch_every or None,
        results=args.results,
    )


def _cmd_gc(args: argparse.Namespace) -> None:
    from noisy_student import gc

    older_than = gc.parse_age(args.older_than)
    orphans = gc.find_orphans(args.url, older_than)
    for o in orphans:
        print(f"{o.url}  {gc.format_size(o.size)}  {gc.format_age(o.age_seconds)} old  {o.reason}")
    total = gc.format_size(sum(o.size for o in orphans))
    if args.dry_run:
        print(f"{len(orphans)} file(s), {total}, would be removed (--dry-run: nothing removed)")
        return
    gc.remove(orphans)
    print(f"{len(orphans)} file(s), {total}, removed")


def _check_mlflow_server() -> None:
    """The runs `serve` starts log to MLFLOW_TRACKING_URI: when that is a server, ask it
    one authenticated question now, so that missing or wrong credentials
    (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) fail here in one line, not in
    every run."""
    import httpx

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    try:
        answer = httpx.post(
            f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search",
            json={"max_results": 1},
            auth=httpx.BasicAuth(user, password or "") if user else None,
            timeout=30,
        )
    except httpx.HTTPError as e:
        raise UserError(f"{uri}: no MLflow server answers ({type(e).__name__})") from None
    if answer.status_code in (401, 403):
        hint = (
            "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD were refused"
            if user
            else "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
        raise UserError(
            f"{uri}: the MLflow server refused the request ({answer.status_code}): {hint}"
        )
    if answer.status_code != 200:
        raise UserError(f"{uri}: not an MLflow server (HTTP {answer.status_code})")


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

    model, meta = predict.load_model(args.model, args.checkpoint)
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
    run.add_argument(
        "--teacher",
        help="start from this model instead of training a teacher: champion (the registered "
        "model's champion, if any), models:/NAME@ALIAS, an MLflow run id or a checkpoint URL",
    )
    run.set_defaults(func=_cmd_run)

    srv = sub.add_parser(
        "serve",
        help="serve the deployments noisy-student/iterate and noisy-student-watch/watch "
        "on the Prefect server at PREFECT_API_URL (runs until stopped)",
    )
    srv.add_argument("-c", "--config", required=True, help="YAML config path or URL")
    srv.add_argument(
        "--set", action="append", metavar="KEY.PATH=VALUE", help="override a config value"
    )
    srv.add_argument(
        "--teacher",
        default="champion",
        help="first teacher of each run: champion (default; trains one while there is "
        "none), none (always train), or a model reference as for `run --teacher`",
    )
    srv.add_argument("--cron", help='also run on this schedule (UTC), e.g. "0 3 * * *"')
    srv.add_argument(
        "--batch-window",
        type=float,
        default=600,
        metavar="SECONDS",
        help="a retrain starts this long after new data first lands; data landing "
        "meanwhile joins it (default 600)",
    )
    srv.add_argument(
        "--watch-every",
        type=float,
        default=300,
        metavar="SECONDS",
        help="look for data that landed by other means this often; 0: never (default 300)",
    )
    srv.add_argument(
        "--results",
        metavar="URL",
        help="keep Prefect's results there, e.g. s3://bucket/prefect-results",
    )
    srv.set_defaults(func=_cmd_serve)

    res = sub.add_parser(
        "results-storage",
        help="save a Prefect block that keeps results at URL, for workers of prefect.yaml",
    )
    res.add_argument("url", help="e.g. s3://bucket/prefect-results")
    res.set_defaults(func=_cmd_results_storage)

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
    imf.add_argument(
        "--size",
        "--image-size",
        dest="image_size",
        type=int,
        default=224,
        help="every image becomes NxN: shorter side resized to N, then centre-cropped "
        "(default 224, photos for timm's models)",
    )
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
        help="an image of another size or mode is converted and fitted to --size (convert), "
        "or is a bad image (error)",
    )
    imf.add_argument(
        "--format",
        choices=["png", "jpeg"],
        default="png",
        help="how shards store images: png (lossless, small images) or jpeg (photos)",
    )
    imf.add_argument("--quality", type=int, default=90, help="JPEG quality, 1-100 (default 90)")
    imf.set_defaults(func=_cmd_ingest_image_folder)
    pq = isub.add_parser(
        "parquet",
        help="one split from Parquet tables (a Hugging Face datasets export, any fsspec URL)",
    )
    pq.add_argument("src", help="a .parquet file or a folder of them (local or any fsspec URL)")
    pq.add_argument("--dataset", required=True, help="dataset root URL to write the split into")
    pq.add_argument(
        "--split",
        choices=["labelled", "unlabelled", "test"],
        required=True,
        help="the split these rows become (labels of an unlabelled split only score pseudo labels)",
    )
    pq.add_argument(
        "--image-column", default="image", help="encoded images: bytes or {bytes, path}"
    )
    pq.add_argument(
        "--label-column",
        default="label",
        help="class index or class name per row; '' for none (an unlabelled split)",
    )
    pq.add_argument("--id-column", help="unique ids (default: <file name>/<row>)")
    pq.add_argument(
        "--classes",
        help="comma-separated class names (default: the datasets features in the file, the "
        "dataset's other splits, or the label column's distinct names)",
    )
    pq.add_argument("--image-size", type=int, help="resize every image to NxN")
    pq.add_argument("--mode", choices=["L", "RGB"], help="grayscale or colour (default: kept)")
    pq.add_argument("--rows-per-shard", type=int, default=8192)
    pq.set_defaults(func=_cmd_ingest_parquet)
    app = isub.add_parser(
        "append",
        help="add a batch of unlabelled images to a dataset (new manifest version), then "
        "emit the new-data event that starts a retrain",
    )
    app.add_argument("--dataset", required=True, help="dataset root URL to append to")
    app.add_argument("--images", required=True, help="folder of images (any fsspec URL)")
    app.add_argument(
        "--id-prefix", help="prefix of the new ids (default: the folder's name); ids are unique"
    )
    app.add_argument("--rows-per-shard", type=int, default=8192)
    app.add_argument("--no-event", action="store_true", help="do not emit the Prefect event")
    app.set_defaults(func=_cmd_ingest_append)

    gc = sub.add_parser(
        "gc",
        help="list, then remove, shard files no manifest or run names (what killed writes "
        "leave behind), in a dataset or an artifacts root",
    )
    gc.add_argument("url", metavar="DATASET_OR_ARTIFACTS_URL", help="a folder at any fsspec URL")
    gc.add_argument(
        "--older-than",
        default="1d",
        metavar="AGE",
        help="only files at least this old, e.g. 12h, 30m, 0 (default 1d: a write still in "
        "progress keeps its shards)",
    )
    gc.add_argument("--dry-run", action="store_true", help="list only; remove nothing")
    gc.set_defaults(func=_cmd_gc)

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
