"""`noisy-student ingest`: raw images in the dataset format, one builder per source."""

from __future__ import annotations

import argparse
import inspect
import os
from collections.abc import Callable
from typing import Any

from cli.prefect_setup import prefect_defaults
from noisy_student.errors import UserError


def add_parser(sub: Any) -> None:
    ingest = sub.add_parser("ingest", help="write raw images in the dataset format")
    isub = ingest.add_subparsers(dest="source_kind", required=True)
    for add in (_add_fashion_mnist, _add_image_folder, _add_parquet, _add_append, _add_labels):
        add(isub)


def _add_fashion_mnist(isub: Any) -> None:
    fm = isub.add_parser("fashion-mnist", help="from the four IDX .gz files")
    fm.add_argument("--out", required=True, help="dataset root URL to write")
    fm.add_argument(
        "--source",
        default="/usr/share/datasets/fashion-mnist",
        help="folder with the IDX files (default: Debian's dataset-fashion-mnist)",
    )
    fm.add_argument("--labelled-per-class", type=int, default=100)
    fm.add_argument(
        "--validation-per-class",
        type=int,
        default=0,
        help="labelled images per class set apart as the validation split, drawn after the "
        "labelled ones and taken from the unlabelled pool (labels too); the run makes every "
        "choice on it (default 0: none, choices on the test split)",
    )
    fm.add_argument("--unlabelled-limit", type=int, help="keep only this many unlabelled images")
    fm.add_argument("--test-limit", type=int, help="keep only this many test images")
    fm.add_argument("--seed", type=int, default=0, help="seed of the labelled/unlabelled split")
    fm.add_argument("--rows-per-shard", type=int, default=8192)
    fm.set_defaults(func=_fashion_mnist)


def _add_image_folder(isub: Any) -> None:
    imf = isub.add_parser("image-folder", help="from ImageFolder trees (local or any fsspec URL)")
    imf.add_argument("--out", required=True, help="dataset root URL to write")
    imf.add_argument("--labelled", required=True, help="folder with one sub-folder per class")
    imf.add_argument("--unlabelled", required=True, help="folder of images without classes")
    imf.add_argument("--test", required=True, help="folder with one sub-folder per class")
    imf.add_argument(
        "--validation",
        help="folder with one sub-folder per class: labelled images the run makes every "
        "choice on, the test split then only reported (default: none, choices on test)",
    )
    imf.add_argument("--rows-per-shard", type=int, default=8192)
    _add_image_options(imf)
    imf.add_argument(
        "--on-mismatch",
        choices=["convert", "error"],
        default="convert",
        help="an image of another size or mode is converted and fitted to --size (convert), "
        "or is a bad image (error)",
    )
    imf.set_defaults(func=_image_folder)


def _add_parquet(isub: Any) -> None:
    pq = isub.add_parser(
        "parquet",
        help="one split from Parquet tables (a Hugging Face datasets export, any fsspec URL)",
    )
    pq.add_argument("src", help="a .parquet file or a folder of them (local or any fsspec URL)")
    pq.add_argument("--dataset", required=True, help="dataset root URL to write the split into")
    pq.add_argument(
        "--split",
        choices=["labelled", "unlabelled", "test", "validation"],  # dataset.SPLITS
        required=True,
        help="the split these rows become (labels of an unlabelled split only score pseudo "
        "labels; validation is labelled, and the run makes every choice on it)",
    )
    pq.add_argument(
        "--image-column",
        default="image",
        help="the images: encoded bytes, or datasets' {bytes, path} (without bytes, the file at "
        "the path: a URL, an absolute path or one relative to the Parquet file's folder)",
    )
    pq.add_argument(
        "--label-column",
        default="label",
        help="class index or class name per row; '' for none (an unlabelled split)",
    )
    pq.add_argument("--id-column", help="unique ids (default: <file name>/<row>)")
    pq.add_argument(
        "--classes",
        type=lambda names: names.split(","),
        help="comma-separated class names (default: the datasets features in the file, the "
        "dataset's other splits, or the label column's distinct names)",
    )
    pq.add_argument("--rows-per-shard", type=int, default=8192)
    _add_image_options(pq)
    pq.add_argument(
        "--on-missing-image",
        choices=["error", "skip"],
        default="error",
        help="a row without an image (no bytes and no path, or no file at its path) stops the "
        "ingest (error), or is left out and listed in the manifest under 'skipped' (skip)",
    )
    pq.set_defaults(func=_parquet)


def _add_append(isub: Any) -> None:
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
    _add_image_options(app)
    app.add_argument("--no-event", action="store_true", help="do not emit the Prefect event")
    app.set_defaults(func=_append)


def _add_labels(isub: Any) -> None:
    lab = isub.add_parser(
        "labels",
        help="take annotators' labels back: the images join the labelled split (a new "
        "version) and leave the unlabelled pool; then emit the event that starts a retrain",
    )
    lab.add_argument(
        "file",
        help="a Label Studio JSON export of a label queue's tasks, or a CSV with the columns "
        "id,class (e.g. the queue's queue.csv, filled in); any fsspec URL",
    )
    lab.add_argument("--dataset", required=True, help="dataset root URL the queue came from")
    lab.add_argument("--no-event", action="store_true", help="do not emit the Prefect event")
    lab.set_defaults(func=_labels)


def _add_image_options(parser: argparse.ArgumentParser) -> None:
    """The options of every ingest that writes images (image-folder, parquet, append): one
    name, default and help text each. Left out, an option is not passed, and the ingest
    takes the dataset's own value where the dataset has one (so appended images and a new
    split match the rest), else its source's rule."""
    group = parser.add_argument_group("images (the same options for image-folder, parquet, append)")
    group.add_argument(
        "--size",
        "--image-size",
        dest="image_size",
        type=int,
        metavar="N",
        help="every image becomes NxN: shorter side resized to N, then centre-cropped "
        "(default: the dataset's size where it has one; else image-folder 224, photos for "
        "timm's models, and parquet the images' own, which must then agree)",
    )
    group.add_argument(
        "--mode",
        choices=["L", "RGB"],
        help="grayscale or colour (default: the dataset's where it has one; else image-folder "
        "RGB, parquet the first image's)",
    )
    group.add_argument(
        "--format",
        dest="encoding",
        choices=["png", "jpeg"],  # dataset.ENCODINGS, not imported: it would load torch
        help="how shards store images: png (lossless, small images) or jpeg (photos) "
        "(default: png; append: the split's)",
    )
    group.add_argument(
        "--quality",
        type=int,
        help="JPEG quality, 1-100 (default 90; append: the split's)",
    )
    group.add_argument(
        "--on-bad-image",
        choices=["error", "skip"],
        default="error",
        help="a bad image (corrupt, undecodable, not an image) stops the ingest (error), or "
        "is left out and listed in its split's manifest under 'skipped' (skip)",
    )


def _by_name(function: Callable[..., Any], args: argparse.Namespace, **given: Any) -> Any:
    """`function` called with the parsed options named as its parameters (an option left
    out, None, takes the function's default) and `given`."""
    names = inspect.signature(function).parameters
    options = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return function(**{**options, **given})


def _fashion_mnist(args: argparse.Namespace) -> None:
    from noisy_student.data import ingest

    _print_dataset(_by_name(ingest.fashion_mnist, args))


def _image_folder(args: argparse.Namespace) -> None:
    from noisy_student.data import ingest

    _print_dataset(_by_name(ingest.image_folder, args))


def _parquet(args: argparse.Namespace) -> None:
    from noisy_student.data import ingest_parquet, storage

    root = _by_name(ingest_parquet.parquet, args)
    print(f"{args.split} split written to {root}")
    _print_skipped([storage.join(root, args.split)])


def _append(args: argparse.Namespace) -> None:
    from noisy_student.data import ingest, storage

    root = storage.resolve(args.dataset)
    _check_prefect_first(args.no_event)
    before, after = _by_name(ingest.append_unlabelled, args, root=root)
    print(
        f"unlabelled: version {before.version} -> {after.version}: "
        f"{after.num_rows - before.num_rows} images added in "
        f"{len(after.shards) - len(before.shards)} shard(s), {after.num_rows} in all"
    )
    _print_skipped([after.url])

    def send():
        from flows.events import announce

        return announce(root, after.state(), before.state(), source="ingest")

    _announce(args.no_event, send, f"the images were appended (version {after.version})")


def _labels(args: argparse.Namespace) -> None:
    from noisy_student.data import storage
    from noisy_student.labelling import annotations

    root = storage.resolve(args.dataset)
    _check_prefect_first(args.no_event)
    taken = annotations.take_labels(root, args.file)
    (before, after), (pool_before, pool) = taken.labelled, taken.unlabelled
    print(
        f"labelled: version {before.version} -> {after.version}: {taken.added} images "
        f"labelled, {after.num_rows} in all"
    )
    print(
        f"unlabelled: version {pool_before.version} -> {pool.version}: {taken.added} images "
        f"left the pool, {pool.visible_rows} remain"
    )
    skipped = [
        f"{n} row(s) {why}"
        for n, why in (
            (taken.unanswered, "without a class"),
            (taken.already, "already labelled with the same class"),
        )
        if n
    ]
    if skipped:
        print(f"skipped {' and '.join(skipped)}")
    if taken.finished:
        print(f"{taken.finished} image(s) claimed by an interrupted ingest landed too")
    if after.version == before.version:
        print("nothing new: no event")
        return

    def send():
        from flows.events import announce_labels

        return announce_labels(root, after.state(), pool.state(), taken.added)

    _announce(args.no_event, send, f"the labels were taken back (labelled version {after.version})")


def _check_prefect_first(no_event: bool) -> None:
    """Where an event will follow, ask the Prefect server one authenticated question before
    the data changes: a refused auth string stops the command there."""
    if not no_event and os.environ.get("PREFECT_API_URL"):
        from flows.events import check_api

        prefect_defaults()
        check_api()


def _announce(no_event: bool, send: Callable[[], Any], landed: str) -> None:
    """The event of data that has landed (`send` emits it), or why there is none."""
    if no_event:
        return
    if not os.environ.get("PREFECT_API_URL"):
        print("PREFECT_API_URL is not set: no event emitted (a `watch` deployment will notice)")
        return
    try:
        event = send()
    except Exception as e:  # the data has landed: say so, and what did not happen
        raise UserError(
            f"{os.environ['PREFECT_API_URL']}: {landed} but the event was not sent "
            f"({type(e).__name__}); a `watch` deployment will notice the new version"
        ) from None
    print(f"event {event.event} emitted for {event.resource.id}")


def _print_dataset(root: str) -> None:
    from noisy_student.data import dataset, storage

    splits = [
        split
        for split in dataset.SPLITS
        if storage.exists(storage.join(root, split, dataset.MANIFEST))
    ]
    for split in splits:
        m = dataset.read_manifest(storage.join(root, split))
        print(
            f"{split:<10} {m.num_rows:>7} images in {len(m.shards)} shard(s), "
            f"{m.mode} {m.width}x{m.height}, {m.num_classes} classes"
        )
    _print_skipped([storage.join(root, split) for split in splits])
    print(f"dataset: {root}")


def _print_skipped(split_urls: list[str]) -> None:
    """The bad images an ingest left out, as its splits' manifests list them."""
    from noisy_student.data import dataset, storage

    skipped = []
    for url in split_urls:
        skipped += storage.read_json(storage.join(url, dataset.MANIFEST)).get("skipped", [])
    if skipped:
        print(f"skipped {len(skipped)} bad image(s) (listed in the manifests under 'skipped'):")
        for s in skipped:
            row = f": row {s['row']}" if "row" in s else ""
            print(f"  {s['file']}{row}: {s['reason']}")
