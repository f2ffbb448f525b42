"""Datasets saved with the ``datasets`` library (``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``; the
``datasets`` package must be installed to read one), the prompt and image sources of a text-to-image job
(:mod:`fewstep.data.prompts`, :mod:`fewstep.data.images`). A ``DatasetDict`` is read from its ``train`` split.
Every problem is one :class:`~fewstep.errors.DataError` that names the folder."""

from __future__ import annotations

from pathlib import Path

from fewstep.errors import DataError


def is_saved_dataset(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``save_to_disk``."""
    path = Path(path)
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def load_saved(path: str | Path):
    """The ``datasets.Dataset`` saved in ``path`` (the ``train`` split of a saved ``DatasetDict``)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a dataset saved with the datasets library; install it (pip install datasets) "
                        "to read it") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as error:
        raise DataError(f"cannot read the saved dataset {path}: {type(error).__name__}: {error}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"saved dataset {path} has splits {sorted(loaded)} and no 'train' split; save the split "
                            "to use on its own")
        loaded = loaded["train"]
    return loaded


def first_column(dataset, path: str | Path, names: tuple[str, ...], required: bool = True) -> str | None:
    """The first of ``names`` among the dataset's columns (None if there is none and it is not ``required``)."""
    key = next((key for key in names if key in dataset.column_names), None)
    if key is None and required:
        raise DataError(f"saved dataset {path} has no {'/'.join(names)} column (its columns: {dataset.column_names})")
    return key
