"""Image folders: real images (and their captions) for the text-to-image methods that train on data, or a dataset saved
with the ``datasets`` library with an ``image`` column (captions from its prompt column). Each image
(``.png``, ``.jpg``, ``.jpeg``, ``.webp``) may have a caption in a text file of the same name (``cat.png`` ->
``cat.txt``); an image without one has the empty caption. Images are resized (shorter side) and centre-cropped to a
square of ``resolution`` pixels, as RGB in ``[-1, 1]``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fewstep.data.prompts import PROMPT_KEYS
from fewstep.data.saved_datasets import first_column, is_saved_dataset, load_saved
from fewstep.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
IMAGE_COLUMN = "image"  # of a saved dataset; captions come from its prompt column


def image_files(folder: str | Path) -> list[Path]:
    """The image files of ``folder`` (not its subfolders), sorted by name; refuses a folder without any."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"no image folder at {folder}")
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"image folder {folder} holds no {'/'.join(IMAGE_SUFFIXES)} file")
    return files


def check_images(path: str | Path) -> None:
    """Refuses ``path`` unless it is an image folder with at least one image or a saved dataset with an ``image``
    column and rows (nothing is decoded)."""
    if is_saved_dataset(path):
        check_image_dataset(path)
    else:
        image_files(path)


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
                images.append(square_image(image, resolution))
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise DataError(f"cannot read the image {file}: {type(error).__name__}; remove or replace it") from None
    return torch.stack(images)


def square_image(image, resolution: int) -> Tensor:
    """A PIL image as RGB ``(3, resolution, resolution)`` in ``[-1, 1]``: shorter side resized to ``resolution``
    (bicubic), then centre-cropped."""
    from PIL import Image

    image = image.convert("RGB")
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    pixels = np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1.0


def check_image_dataset(path: str | Path):
    """The saved dataset ``path``, refused unless it has an ``image`` column and at least one row."""
    dataset = load_saved(path)
    first_column(dataset, path, (IMAGE_COLUMN,))
    if len(dataset) == 0:
        raise DataError(f"saved dataset {path} has no rows")
    return dataset


def dataset_captions(path: str | Path) -> list[str]:
    """The captions of the saved image dataset ``path``: its prompt column, or empty captions where it has none."""
    dataset = check_image_dataset(path)
    key = first_column(dataset, path, PROMPT_KEYS, required=False)
    return [str(value or "").strip() for value in dataset[key]] if key is not None else [""] * len(dataset)


def dataset_images(path: str | Path) -> list:
    """The ``image`` column of the saved dataset ``path`` as PIL images; a row that does not decode is one error
    naming it."""
    dataset = check_image_dataset(path)
    images = []
    for row in range(len(dataset)):
        try:
            image = dataset[row][IMAGE_COLUMN]
            image.load()
        except Exception as error:  # datasets and PIL raise many kinds for a row that does not decode
            raise DataError(f"saved dataset {path}: the image in row {row} cannot be read ({type(error).__name__}); "
                            "remove or replace it") from None
        images.append(image)
    return images
