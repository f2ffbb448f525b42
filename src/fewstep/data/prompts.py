"""Prompt files: the prompts a text-to-image student is distilled on, read from a text file (one prompt per line),
a CSV file (a ``prompt``, ``caption`` or ``text`` column) or a JSONL file (one object per line with one of those
keys), or a dataset saved with the ``datasets`` library (:mod:`fewstep.data.saved_datasets`). Blank lines are
skipped; nothing else is changed. Every problem is one :class:`~fewstep.errors.DataError`
that names the file and, where there is one, the line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from fewstep.data.saved_datasets import first_column, is_saved_dataset, load_saved
from fewstep.errors import DataError

PROMPT_KEYS = ("prompt", "caption", "text")
PROMPT_SUFFIXES = (".txt", ".csv", ".jsonl")


def read_prompts(path: str | Path) -> list[str]:
    """The prompts in ``path`` (``.txt``, ``.csv`` or ``.jsonl``, or a saved dataset folder), in file order."""
    path = Path(path)
    if is_saved_dataset(path):
        return _dataset_prompts(path)
    if path.suffix not in PROMPT_SUFFIXES:
        raise DataError(f"prompt file {path}: use a {', '.join(PROMPT_SUFFIXES)} file (one prompt per line, a CSV "
                        f"with a {'/'.join(PROMPT_KEYS)} column, or JSONL objects with one of those keys) or a "
                        "folder saved with the datasets library")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read the prompt file {path}: {type(error).__name__}: {error}") from None
    reader = {".txt": _text_prompts, ".csv": _csv_prompts, ".jsonl": _jsonl_prompts}[path.suffix]
    prompts = reader(text, path)
    if not prompts:
        raise DataError(f"prompt file {path} holds no prompt; put one prompt per line")
    return prompts


def _text_prompts(text: str, path: Path) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _csv_prompts(text: str, path: Path) -> list[str]:
    rows = csv.DictReader(text.splitlines())
    key = next((key for key in PROMPT_KEYS if key in (rows.fieldnames or ())), None)
    if key is None:
        raise DataError(f"CSV prompt file {path} has no {'/'.join(PROMPT_KEYS)} column (its header: "
                        f"{rows.fieldnames})")
    return [row[key].strip() for row in rows if (row[key] or "").strip()]


def _jsonl_prompts(text: str, path: Path) -> list[str]:
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise DataError(f"{path} line {number} is not JSON; write one object per line") from None
        key = next((key for key in PROMPT_KEYS if isinstance(record, dict) and key in record), None)
        if key is None or not isinstance(record[key], str):
            raise DataError(f"{path} line {number} has no string {'/'.join(PROMPT_KEYS)} field")
        if record[key].strip():
            prompts.append(record[key].strip())
    return prompts


def _dataset_prompts(path: Path) -> list[str]:
    dataset = load_saved(path)
    key = first_column(dataset, path, PROMPT_KEYS)
    prompts = []
    for row, value in enumerate(dataset[key]):
        if not isinstance(value, str):
            raise DataError(f"saved dataset {path}: row {row} of column {key!r} is not a string")
        if value.strip():
            prompts.append(value.strip())
    if not prompts:
        raise DataError(f"saved dataset {path} holds no prompt in its {key!r} column")
    return prompts
