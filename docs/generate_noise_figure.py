"""Draws docs/noise.png, what the student's input noise does to Fashion-MNIST's 28-px images,
and writes the table of every operation's strength in docs/algorithm.md (between its
`noise-strengths` markers), both from the code and the accuracy preset.

    uv run python docs/generate_noise_figure.py

Ten test images, clean in the top row; under them, four draws of the accuracy preset's
student noise (crops and flips, then RandAugment with the small-image settings of
noisy_student/training/augment.py at its configured M); under those, for comparison, four draws of
the noise the students had before the settings followed the image's size (translation by
up to 45% of the side, grey fill, invert drawn, no Cutout). The same picture of each
student's own noise is logged to its MLflow run as noise.png.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from noisy_student import config
from noisy_student.data import dataset_writer, ingest
from noisy_student.training import augment, engine

DOCS = Path(__file__).resolve().parent
PRESET = DOCS.parent / "pipeline_config" / "accuracy.yaml"
BEFORE = augment.RandAugment(cutout=0.0, levels="increasing")  # translate 100/224, grey, invert


def picture(images: torch.Tensor) -> np.ndarray:
    student = config.load(PRESET).students[0]
    configured = engine.Noise(
        hflip=student.hflip,
        crop_padding=student.crop_padding,
        rand_augment=student.rand_augment.for_image(28, 28),
        cutout=student.cutout,
    )
    ra = student.rand_augment
    before = engine.Noise(
        hflip=student.hflip,
        crop_padding=student.crop_padding,
        rand_augment=augment.RandAugment(
            num_ops=ra.num_ops,
            magnitude=ra.magnitude,
            translate=BEFORE.translate,
            cutout=BEFORE.cutout,
            fill=BEFORE.fill,
            invert=BEFORE.invert,
            levels=BEFORE.levels,
        ),
        cutout=student.cutout,
    )
    generator = torch.Generator().manual_seed(0)

    def draws(noise: engine.Noise) -> list[torch.Tensor]:
        noised = [noise.apply(images, generator).add(1).mul(127.5).round() for _ in range(4)]
        return [x.clamp(0, 255).to(torch.uint8) for x in noised]

    band = torch.full_like(images, 255)[:, :, :6]  # a white band between the two
    band_row = augment.grid([band], scale=3)
    top = augment.grid([images, *draws(configured)], scale=3)
    bottom = augment.grid(draws(before), scale=3)
    return torch.cat([top, band_row, bottom], 1)[0].numpy()


PAGE = DOCS / "algorithm.md"
START, END = "<!-- noise-strengths:start -->\n", "<!-- noise-strengths:end -->"
# The official code's two sets of constants (randaugment.py, preprocessing.py), as fractions
OFFICIAL_PHOTOS = augment.RandAugment()
OFFICIAL_SMALL = augment.RandAugment(translate=1 / 8, cutout=1 / 4)  # + Cutout of 1/2 after


def strengths(ra: augment.RandAugment, size: int, m: float) -> dict[str, str]:
    """What each operation does at magnitude m to an image of `size` pixels a side."""
    level = m / augment.NOMINAL_LEVEL
    px = lambda fraction: f"{fraction * size:.1f} px ({100 * fraction:.0f}%)"  # noqa: E731
    official = ra.levels == "official"
    factor = (
        f"x{0.1 + 1.8 * level:.2f}"
        if official
        else f"x{1 - 0.9 * level:.2f} or x{1 + 0.9 * level:.2f}"
    )
    bits = int(4 * level) if official else 8 - round(4 * level)
    threshold = int(256 * level) if official else round(256 * (1 - level))
    return {
        "rotate": f"up to {30 * level:.0f} degrees",
        "shear x, y": f"up to {0.3 * level:.2f}",
        "translate x, y": f"up to {px(ra.translate * level)}",
        "Cutout (an operation)": f"a square of {px(ra.cutout * level)}"
        if ra.cutout
        else "not drawn",
        "posterize": f"keeps {min(max(bits, 0), 8)} of 8 bits",
        "solarize": f"inverts pixels >= {threshold}",
        "solarize add": f"+{int(110 * level)} to pixels < 128",
        "color, contrast, brightness, sharpness": f"factor {factor}",
        "invert": "drawn" if ra.invert else "not drawn",
        "auto contrast, equalize": "drawn (no magnitude)",
        "fill of uncovered pixels": "the image's border" if ra.fill == "border" else str(ra.fill),
    }


def strengths_markdown(m: float, cutout: float) -> str:
    here_small = augment.RandAugment.for_image(28, 28, magnitude=m)
    columns = [
        ("official, photos (224 px)", strengths(OFFICIAL_PHOTOS, 224, m)),
        ("official, small images (32 px)", strengths(OFFICIAL_SMALL, 32, m)),
        ("here, photos (224 px)", strengths(augment.RandAugment.for_image(224, 224), 224, m)),
        ("here, small images (28 px)", strengths(here_small, 28, m)),
    ]
    lines = [
        f"| operation at M={m:g} | " + " | ".join(c for c, _ in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for op in columns[0][1]:
        lines.append(f"| {op} | " + " | ".join(c[op] for _, c in columns) + " |")
    every = f"a square of {100 * cutout:.0f}% of the side" if cutout else "none"
    lines.append(
        f"| Cutout on every image, after | none | a square of 50% of the side | none | {every} |"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    images = ingest.read_idx(f"{ingest.FASHION_MNIST_DIR}/t10k-images-idx3-ubyte.gz")[:10]
    out = DOCS / "noise.png"
    out.write_bytes(dataset_writer.encode_png(picture(torch.from_numpy(images.copy())[:, None])))
    print(f"written: {out}")
    student = config.load(PRESET).students[0]
    page = PAGE.read_text()
    before, rest = page.split(START)
    _, after = rest.split(END)
    table = strengths_markdown(student.rand_augment.magnitude, student.cutout)
    PAGE.write_text(before + START + table + END + after)
    print(f"written: the operations' strengths in {PAGE}")


if __name__ == "__main__":
    main()
