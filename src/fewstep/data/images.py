"""Image folders: real images (and their captions) for the text-to-image methods that train on data. Each image
(``.png``, ``.jpg``, ``.jpeg``, ``.webp``) may have a caption in a text file of the same name (``cat.png`` ->
``cat.txt``); an image without one has the empty caption. Images are resized (shorter side) and centre-cropped to a
square of ``resolution`` pixels, as RGB in ``[-1, 1]``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fewstep.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def image_files(folder: str | Path) -> list[Path]:
    """The image files of ``folder`` (not its subfolders), sorted by name; refuses a folder without any."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"no image folder at {folder}")
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"image folder {folder} holds no {'/'.join(IMAGE_SUFFIXES)} file")
    return files


def read_captions(files: list[Path]) -> list[str]:
    """Each image file's caption (its ``.txt`` namesake), or the empty caption."""
    return [f.with_suffix(".txt").read_text(encoding="utf-8").strip() if f.with_suffix(".txt").is_file() else ""
            for f in files]


def read_images(files: list[Path], resolution: int) -> Tensor:
    """The images ``(N, 3, resolution, resolution)`` in ``[-1, 1]``; a file that is not a readable image is one
    :class:`DataError` naming it, raised before any is returned."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                image = image.convert("RGB")
                scale = resolution / min(image.size)
                size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
                image = image.resize(size, Image.Resampling.BICUBIC)
                left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
                pixels = np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.float32)
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise DataError(f"cannot read the image {file}: {type(error).__name__}; remove or replace it") from None
        images.append(torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1.0)
    return torch.stack(images)
