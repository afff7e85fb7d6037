"""A dataset described by one CSV file (the open-metric-learning data contract, landscape.md §2).

Columns (header row required, any order, extra columns ignored):

==============  ========  =====================================================================
column          required  meaning
==============  ========  =====================================================================
``path``        yes       image path, relative to ``images_root`` (default: the CSV's folder) or absolute
``label``       yes       integer class label
``split``       yes       ``train`` | ``validation`` | ``test``
``is_query``    no        ``true/false/1/0`` (may be empty on train rows); default: every row is a query
``is_gallery``  no        as ``is_query``; default: every row is in the gallery
==============  ========  =====================================================================

``is_query``/``is_gallery`` come together or not at all. Errors name the CSV file, the line and the column.

An image path listed twice — twice in one split (a duplicated test row is its own perfect neighbour and inflates
every metric) or in two splits (train/test leakage) — is refused, naming both lines; ``allow_duplicates=True``
accepts it with a warning.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from deepmetric.data.image_dataset import DatasetLayoutError, ImageListDataset

REQUIRED_COLUMNS = ("path", "label", "split")
SPLITS = ("train", "validation", "test")
_TRUE = {"true", "1", "yes", "t", "y"}
_FALSE = {"false", "0", "no", "f", "n"}


class CSVFormatError(ValueError):
    """The CSV does not follow the contract; the message names file, line and column."""


def _find_csv(root: Path) -> Path:
    if root.is_file():
        return root
    if not root.is_dir():
        raise DatasetLayoutError(f"CSVDataset: {root} is neither a CSV file nor a folder containing one")
    if (root / "df.csv").is_file():
        return root / "df.csv"
    candidates = sorted(root.glob("*.csv"))
    if len(candidates) != 1:
        raise DatasetLayoutError(
            f"CSVDataset: expected {root / 'df.csv'} or exactly one *.csv in {root}, "
            f"found {[c.name for c in candidates]}"
        )
    return candidates[0]


def _parse_bool(value: str, where: str, column: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise CSVFormatError(f"{where}: column {column!r} must be true/false/1/0, got {value!r}")


class CSVDataset(ImageListDataset):
    """Rows of a contract CSV, optionally restricted to one ``split``; exposes ``is_query``/``is_gallery`` and
    ``available_splits`` (the splits that occur anywhere in the file)."""

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        transform: Callable[[Any], Any] | None = None,
        on_bad_image: str = "error",
        images_root: str | Path | None = None,
        allow_duplicates: bool = False,
    ) -> None:
        if split is not None and split not in SPLITS:
            raise ValueError(f"CSVDataset: split must be one of {SPLITS} or None, got {split!r}")
        self.csv_path = _find_csv(Path(root).expanduser())
        base = Path(images_root).expanduser() if images_root is not None else self.csv_path.parent
        with open(self.csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise CSVFormatError(
                    f"{self.csv_path}: missing required column(s) {missing}; header has {columns}, "
                    f"expected at least {list(REQUIRED_COLUMNS)} (+ optional is_query, is_gallery)"
                )
            has_qg = "is_query" in columns, "is_gallery" in columns
            if has_qg[0] != has_qg[1]:
                raise CSVFormatError(
                    f"{self.csv_path}: columns is_query and is_gallery must be given together"
                )
            reader.fieldnames = columns
            paths, labels, is_query, is_gallery = [], [], [], []
            present: set[str] = set()
            first_seen: dict[str, tuple[int, str]] = {}
            for lineno, row in enumerate(reader, start=2):
                where = f"{self.csv_path}:{lineno}"
                if None in row:  # more fields than header columns
                    raise CSVFormatError(f"{where}: more fields than the {len(columns)} header columns")
                values = {k: (v or "").strip() for k, v in row.items()}
                for col in REQUIRED_COLUMNS:
                    if not values[col]:
                        raise CSVFormatError(f"{where}: column {col!r} is empty")
                if values["split"] not in SPLITS:
                    raise CSVFormatError(
                        f"{where}: column 'split' must be one of {SPLITS}, got {values['split']!r}"
                    )
                try:
                    label = int(values["label"])
                except ValueError:
                    raise CSVFormatError(
                        f"{where}: column 'label' must be an integer, got {values['label']!r}"
                    ) from None
                present.add(values["split"])
                path = Path(values["path"])
                path = path if path.is_absolute() else base / path
                self._check_duplicate(first_seen, os.path.normpath(path), lineno, values["split"], allow_duplicates)
                if split is not None and values["split"] != split:
                    continue
                q = g = True
                if has_qg[0] and values["split"] != "train":
                    q = _parse_bool(values["is_query"], where, "is_query")
                    g = _parse_bool(values["is_gallery"], where, "is_gallery")
                paths.append(path)
                labels.append(label)
                is_query.append(q)
                is_gallery.append(g)
        if not paths:
            raise CSVFormatError(f"{self.csv_path}: no rows with split {split!r}")
        super().__init__(paths, labels, transform, on_bad_image)
        self.is_query = np.asarray(is_query, dtype=bool)
        self.is_gallery = np.asarray(is_gallery, dtype=bool)
        self.split = split
        self.available_splits = tuple(s for s in SPLITS if s in present)

    def _check_duplicate(
        self, first_seen: dict[str, tuple[int, str]], key: str, lineno: int, split: str, allow: bool
    ) -> None:
        if key not in first_seen:
            first_seen[key] = (lineno, split)
            return
        line, other = first_seen[key]
        kind = f"twice in split {split!r}" if other == split else f"in splits {other!r} and {split!r}"
        message = (f"{self.csv_path}:{lineno}: image {key} is listed {kind} (first at line {line}); duplicates "
                   "inflate retrieval metrics")
        if not allow:
            raise CSVFormatError(message + "; remove them, or pass allow_duplicates=True to accept them")
        warnings.warn(message, UserWarning, stacklevel=3)
