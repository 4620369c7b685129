"""JPEG and PNG decoders side by side, in images/s, on the same encoded shard rows.

    uv run python -m benchmarks.decode [--size 224] [--images 512] [--quality 90]

Every decoder turns the same bytes into the same uint8 N x H x W x C array (checked), so
the figures compare like with like. `dataset.decode_images` uses the fastest one this
measures on the machine's device (see the comment there); the results, with the machine's
load beside them, go to benchmarks/results/decode-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.machine import cpu_name
from noisy_student import dataset_writer

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


def _pil(blobs: list[bytes]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])


def _pil_draft(blobs: list[bytes]) -> np.ndarray:
    def one(b: bytes) -> np.ndarray:
        img = Image.open(io.BytesIO(b))
        img.draft("RGB", img.size)  # at the stored size: no DCT scaling, only the mode
        return np.asarray(img.convert("RGB"))

    return np.stack([one(b) for b in blobs])


def _torchvision(device: str) -> Callable[[list[bytes]], np.ndarray]:
    from torchvision.io import ImageReadMode, decode_jpeg

    def run(blobs: list[bytes]) -> np.ndarray:
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        out = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        return torch.stack(out).permute(0, 2, 3, 1).cpu().numpy()

    return run


def _simplejpeg(blobs: list[bytes]) -> np.ndarray:
    import simplejpeg

    return np.stack([simplejpeg.decode_jpeg(b, colorspace="RGB") for b in blobs])


def _torchvision_png(blobs: list[bytes]) -> np.ndarray:
    from torchvision.io import ImageReadMode, decode_png

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    return torch.stack([decode_png(d, ImageReadMode.RGB) for d in data]).permute(0, 2, 3, 1).numpy()


def decoders(encoding: str) -> dict[str, Callable[[list[bytes]], np.ndarray]]:
    if encoding == "png":
        return {"PIL": _pil, "torchvision decode_png": _torchvision_png}
    out: dict[str, Callable[[list[bytes]], np.ndarray]] = {
        "PIL": _pil,
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


def measure(fn: Callable[[list[bytes]], np.ndarray], blobs: list[bytes], repeats: int) -> float:
    fn(blobs[:8])  # warm-up: library loading, CUDA context
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(blobs)
        best = min(best, time.perf_counter() - start)
    return len(blobs) / best


def run(size: int, images: int, quality: int, repeats: int) -> dict:
    arrays = photos(images, size)
    rows = []
    for encoding in ("jpeg", "png"):
        blobs = [dataset_writer.encode_image(a, encoding, quality) for a in arrays]
        reference = _pil(blobs)
        for name, fn in decoders(encoding).items():
            # libjpeg builds may round the colour conversion differently by one level
            diff = int(np.abs(fn(blobs[:16]).astype(int) - reference[:16]).max())
            rows.append(
                {
                    "encoding": encoding,
                    "decoder": name,
                    "images_per_s": round(measure(fn, blobs, repeats), 1),
                    "max_abs_diff_vs_pil": diff,
                    "mean_bytes": int(np.mean([len(b) for b in blobs])),
                }
            )
    for encoding in ("jpeg", "png"):
        pil = next(r for r in rows if r["encoding"] == encoding and r["decoder"] == "PIL")
        for r in rows:
            if r["encoding"] == encoding:
                r["vs_pil"] = round(r["images_per_s"] / pil["images_per_s"], 2)
    return {
        "command": f"uv run python -m benchmarks.decode --size {size} --images {images} "
        f"--quality {quality}",
        "image_size": f"{size}x{size} RGB",
        "jpeg_quality": quality,
        "images": images,
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
        f"# Decoders, {result['image_size']}, {result['images']} images "
        f"(JPEG quality {result['jpeg_quality']})",
        "",
        f"`{result['command']}`  ",
        f"machine: {json.dumps(result['machine'])}",
        "",
        "| encoding | decoder | images/s | vs PIL | max abs diff vs PIL | bytes/image |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['encoding']} | {r['decoder']} | {r['images_per_s']:.0f} | {r['vs_pil']:.2f} "
            f"| {r['max_abs_diff_vs_pil']} | {r['mean_bytes']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    result = run(args.size, args.images, args.quality, args.repeats)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"decode-{device}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"decode-{device}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
