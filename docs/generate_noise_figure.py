"""Draws docs/noise.png: what the student's input noise does to Fashion-MNIST's 28-px images.

    uv run python docs/generate_noise_figure.py

Ten test images, clean in the top row; under them, four draws of the accuracy preset's
student noise (crops and flips, then RandAugment with the small-image settings of
noisy_student/augment.py at its configured M); under those, for comparison, four draws of
the noise the students had before the settings followed the image's size (translation by
up to 45% of the side, grey fill, invert drawn, no Cutout). The same picture of each
student's own noise is logged to its MLflow run as noise.png.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from noisy_student import augment, config, dataset_writer, engine, ingest

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


def main() -> None:
    images = ingest.read_idx(f"{ingest.FASHION_MNIST_DIR}/t10k-images-idx3-ubyte.gz")[:10]
    out = DOCS / "noise.png"
    out.write_bytes(dataset_writer.encode_png(picture(torch.from_numpy(images.copy())[:, None])))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
