"""JPEG and PNG decoders side by side, in images/s, on the same encoded shard rows.

    uv run python -m benchmarks.decode [--size 64 224] [--images 512] [--quality 90] [--small 8192]

Photos: RGB at each `--size` as JPEG and PNG. Small images: `--small` Fashion-MNIST training
images, 28x28 L PNG as `ingest` writes them. Every decoder turns the same bytes into the
same uint8 N x H x W (x C) array (checked against PIL), so the figures compare like with
like. `dataset.decode_images` uses the fastest one for each reader as measured here (see
`_Png` and `_Jpeg` there); the results, with the machine's load beside them, go to
benchmarks/results/decode-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from benchmarks.machine import cpu_name
from noisy_student import config
from noisy_student.data import dataset_writer, ingest, storage

RESULTS = Path(__file__).parent / "results"


def photos(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Photo-like RGB images: smooth gradients, a few shapes and sensor noise, so that JPEG
    meets the kind of detail a camera gives (flat synthetic colour would decode unusually
    fast)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = []
    for _ in range(n):
        base = (
            rng.uniform(0, 255, 3)
            * (0.4 + 0.6 * (xx * rng.uniform() + yy * rng.uniform()))[..., None]
        )
        for _ in range(4):
            cx, cy, r = rng.uniform(0, 1, 2).tolist() + [rng.uniform(0.05, 0.3)]
            disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
            base[disc] = rng.uniform(0, 255, 3)
        base += rng.normal(0, 8, base.shape)
        out.append(np.clip(base, 0, 255).astype(np.uint8))
    return out


Decoder = Callable[[list[bytes]], np.ndarray]


def _pil(mode: str) -> Decoder:
    def run(blobs: list[bytes]) -> np.ndarray:
        return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert(mode)) for b in blobs])

    return run


def _pil_draft(blobs: list[bytes]) -> np.ndarray:
    def one(b: bytes) -> np.ndarray:
        img = Image.open(io.BytesIO(b))
        img.draft("RGB", img.size)  # at the stored size: no DCT scaling, only the mode
        return np.asarray(img.convert("RGB"))

    return np.stack([one(b) for b in blobs])


def _torchvision(device: str) -> Decoder:
    from torchvision.io import ImageReadMode, decode_jpeg

    def run(blobs: list[bytes]) -> np.ndarray:
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        out = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        return torch.stack(out).permute(0, 2, 3, 1).cpu().numpy()

    return run


def _simplejpeg(blobs: list[bytes]) -> np.ndarray:
    import simplejpeg

    return np.stack([simplejpeg.decode_jpeg(b, colorspace="RGB") for b in blobs])


def _torchvision_png(mode: str) -> Decoder:
    from torchvision.io import ImageReadMode, decode_png

    read = ImageReadMode.RGB if mode == "RGB" else ImageReadMode.GRAY

    def run(blobs: list[bytes]) -> np.ndarray:
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        out = torch.stack([decode_png(d, read) for d in data]).permute(0, 2, 3, 1).numpy()
        return out if mode == "RGB" else out[..., 0]

    return run


def _pyspng(mode: str) -> Decoder:
    import pyspng

    return lambda blobs: np.stack([pyspng.load(b, mode) for b in blobs])


def _ours(mode: str) -> Decoder:
    """`dataset.decode_images` itself, with its per-row checks: the decoder the stages use."""
    from noisy_student.data import dataset

    def run(blobs: list[bytes]) -> np.ndarray:
        w, h = Image.open(io.BytesIO(blobs[0])).size  # the header alone
        manifest = dataset.Manifest(
            "memory://decode", "unlabelled", 1, ["x"], h, w, mode, [], "", encoding="png"
        )
        table = pa.table({"id": [str(i) for i in range(len(blobs))], "image": blobs,
                          "label": [None] * len(blobs)}, schema=dataset.SCHEMA)  # fmt: skip
        out = dataset.decode_images(manifest, manifest.url, table).permute(0, 2, 3, 1).numpy()
        return out if mode == "RGB" else out[..., 0]

    return run


def decoders(encoding: str, mode: str = "RGB") -> dict[str, Decoder]:
    if encoding == "png":
        # torchvision's decode_png is measured but not used: it crashed the interpreter on a
        # PNG with flipped bits (tests/test_fuzz.py), where libspng and PIL refuse it
        return {
            "PIL": _pil(mode),
            "torchvision decode_png": _torchvision_png(mode),
            "pyspng (libspng)": _pyspng(mode),
            "dataset.decode_images (as the stages decode, with checks)": _ours(mode),
        }
    out: dict[str, Decoder] = {
        "PIL": _pil(mode),
        "PIL + draft": _pil_draft,
        "torchvision decode_jpeg (CPU, batched)": _torchvision("cpu"),
    }
    if torch.cuda.is_available():
        out["torchvision decode_jpeg (CUDA, batched)"] = _torchvision("cuda")
    try:
        import simplejpeg  # noqa: F401 - only measured where it is installed

        out["simplejpeg"] = _simplejpeg
    except ImportError:
        pass
    return out


def measure(fn: Decoder, blobs: list[bytes], repeats: int, threads: int = 1) -> float:
    """Images/s, best of `repeats`, with the rows split between `threads` threads as the
    training reader splits a row group (Pillow and simplejpeg release the GIL while they
    decode; pyspng holds it)."""
    fn(blobs[:8])  # warm-up: library loading, CUDA context
    size = -(-len(blobs) // threads)
    parts = [blobs[i : i + size] for i in range(0, len(blobs), size)]
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(fn, parts))
            best = min(best, time.perf_counter() - start)
    return len(blobs) / best


def compare(kind: str, encoding: str, mode: str, blobs: list[bytes], repeats: int) -> list[dict]:
    """One row per decoder of `encoding`, each measured on the same bytes."""
    reference = _pil(mode)(blobs[:16])
    rows = []
    for name, fn in decoders(encoding, mode).items():
        # libjpeg builds may round the colour conversion differently by one level
        diff = int(np.abs(fn(blobs[:16]).astype(int) - reference).max())
        rows.append(
            {
                "images": kind,
                "encoding": encoding,
                "decoder": name,
                "images_per_s": round(measure(fn, blobs, repeats), 1),
                "images_per_s_2_threads": round(measure(fn, blobs, repeats, 2), 1),
                "max_abs_diff_vs_pil": diff,
                "mean_bytes": int(np.mean([len(b) for b in blobs])),
            }
        )
    for r in rows:
        r["vs_pil"] = round(r["images_per_s"] / rows[0]["images_per_s"], 2)
    return rows


def run(sizes: list[int], images: int, quality: int, repeats: int, small: int, source: str) -> dict:
    rows = []
    for size in sizes:
        arrays = photos(images, size)
        for encoding in ("jpeg", "png"):
            blobs = [dataset_writer.encode_image(a, encoding, quality) for a in arrays]
            rows += compare(f"{images} photos, {size}x{size} RGB", encoding, "RGB", blobs, repeats)
    if small:
        train = ingest.read_idx(storage.join(source, "train-images-idx3-ubyte.gz"))[:small]
        blobs = [dataset_writer.encode_png(a) for a in train]
        rows += compare(f"{len(blobs)} Fashion-MNIST, 28x28 L", "png", "L", blobs, repeats)
    return {
        "command": f"uv run python -m benchmarks.decode --size {' '.join(map(str, sizes))} "
        f"--images {images} "
        f"--quality {quality} --small {small}",
        "jpeg_quality": quality,
        "torch_threads": torch.get_num_threads(),
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average_1min": os.getloadavg()[0],
        },
        "results": rows,
    }


def markdown(result: dict) -> str:
    lines = [
        f"# Decoders side by side (JPEG quality {result['jpeg_quality']})",
        "",
        f"`{result['command']}`  ",
        f"machine: {json.dumps(result['machine'])}",
        "",
        "| images | encoding | decoder | images/s | vs PIL | on 2 threads | max abs diff vs PIL "
        "| bytes/image |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['images']} | {r['encoding']} | {r['decoder']} | {r['images_per_s']:.0f} "
            f"| {r['vs_pil']:.2f} | {r['images_per_s_2_threads']:.0f} "
            f"| {r['max_abs_diff_vs_pil']} | {r['mean_bytes']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, nargs="+", default=[64, 224], help="photo sides, px")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--small", type=int, default=8192, help="Fashion-MNIST images (0: none)")
    p.add_argument("--source", default=config.FashionMnistSource().source)
    args = p.parse_args()
    result = run(args.size, args.images, args.quality, args.repeats, args.small, args.source)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"decode-{device}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"decode-{device}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
