"""The four deep-metric-learning benchmarks, read from their official archives (methods.md §1.1).

Zero-shot splits by class id, labels 0-based and global (test labels continue after the train labels, except
In-Shop whose train and query/gallery maps are separate, as in Proxy-Anchor and DAS):

=========  ==========================================  ======================  ==============================
dataset    files read                                  train                   test
=========  ==========================================  ======================  ==============================
CUB200     images.txt, image_class_labels.txt          classes 1–100 (5,864)   classes 101–200 (5,924)
Cars196    cars_annos.mat (struct ``annotations``)     classes 1–98 (8,054)    classes 99–196 (8,131)
SOP        Ebay_train.txt, Ebay_test.txt               11,318 cls, 59,551      11,316 cls, 60,502
InShop     Eval/list_eval_partition.txt                3,997 items, 25,882     query 14,218 / gallery 12,612
=========  ==========================================  ======================  ==============================

Only index files are parsed at construction; images are decoded in ``__getitem__`` (see
:mod:`deepmetric.data.image_dataset` for the bad-image policy).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from deepmetric.data.csv_dataset import CSVDataset
from deepmetric.data.folder import ImageFolderDataset
from deepmetric.data.image_dataset import DatasetLayoutError, ImageListDataset, missing_layout_error

__all__ = ["CUB200", "DATASETS", "Cars196", "InShop", "StanfordOnlineProducts", "build_dataset"]


def _resolve_root(dataset: str, root: str | Path, expected: Sequence[str], subdirs: Sequence[str]) -> Path:
    """``root`` itself or one of its ``subdirs`` that holds every ``expected`` entry; else a listing error."""
    base = Path(root).expanduser()
    for candidate in [base, *(base / s for s in subdirs)]:
        if all((candidate / e).exists() for e in expected):
            return candidate
    if not base.exists():
        raise DatasetLayoutError(f"{dataset}: dataset root {base} does not exist")
    # Report against the sub-folder if the user evidently pointed at its parent.
    report = next((base / s for s in subdirs if (base / s).is_dir()), base)
    missing = [e for e in expected if not (report / e).exists()]
    raise missing_layout_error(dataset, report, expected, missing)


def _join(base: Path, relative: Iterable[str]) -> list[str]:
    """``base/rel`` for many rows; plain string joins, as pathlib costs ~10 µs a path on SOP's 120k rows."""
    prefix = str(base)
    return [os.path.join(prefix, rel) for rel in relative]


def _check_split(dataset: str, split: str, allowed: Sequence[str]) -> None:
    if split not in allowed:
        raise ValueError(f"{dataset}: split must be one of {tuple(allowed)}, got {split!r}")


def _read_rows(path: Path, n_fields: int, maxsplit: int | None = None) -> list[list[str]]:
    """Non-empty whitespace-separated rows of ``path``, each with exactly ``n_fields`` fields."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.split(maxsplit=maxsplit) if maxsplit is not None else line.split()
            if len(fields) != n_fields:
                raise DatasetLayoutError(
                    f"{path}:{lineno}: expected {n_fields} whitespace-separated fields, got {line.rstrip()!r}"
                )
            rows.append(fields)
    return rows


def _int(path: Path, lineno: int | str, value: str, field: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DatasetLayoutError(
            f"{path}:{lineno}: field {field} must be an integer, got {value!r}"
        ) from None


class CUB200(ImageListDataset):
    """Caltech-UCSD Birds-200-2011. ``root`` is ``CUB_200_2011/`` or its parent.

    Split by class id (``image_class_labels.txt``): 1–100 train, 101–200 test; ``train_test_split.txt`` is the
    classification split and is deliberately not used. Labels are ``class_id − 1``.
    """

    EXPECTED = ("images.txt", "image_class_labels.txt", "images")
    LAST_TRAIN_CLASS = 100

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable[[Any], Any] | None = None,
        on_bad_image: str = "error",
    ) -> None:
        _check_split("CUB200", split, ("train", "test"))
        self.root = _resolve_root("CUB200", root, self.EXPECTED, ("CUB_200_2011",))
        images_txt, labels_txt = self.root / "images.txt", self.root / "image_class_labels.txt"
        id_to_path = {
            _int(images_txt, i + 1, r[0], "img_id"): r[1].strip()
            for i, r in enumerate(_read_rows(images_txt, 2, maxsplit=1))
        }
        id_to_class = {
            _int(labels_txt, i + 1, r[0], "img_id"): _int(labels_txt, i + 1, r[1], "class_id")
            for i, r in enumerate(_read_rows(labels_txt, 2))
        }
        if id_to_path.keys() != id_to_class.keys():
            only_a = sorted(id_to_path.keys() - id_to_class.keys())[:5]
            only_b = sorted(id_to_class.keys() - id_to_path.keys())[:5]
            raise DatasetLayoutError(
                f"CUB200: {images_txt} and {labels_txt} list different image ids "
                f"(only in images.txt: {only_a}, only in image_class_labels.txt: {only_b}); incomplete archive?"
            )
        ids = sorted(id_to_path)
        keep = [i for i in ids if (id_to_class[i] <= self.LAST_TRAIN_CLASS) == (split == "train")]
        super().__init__(
            _join(self.root / "images", (id_to_path[i] for i in keep)),
            [id_to_class[i] - 1 for i in keep],
            transform,
            on_bad_image,
        )
        self.split = split


_CARS_FIELDS = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")


@functools.lru_cache(maxsize=4)
def _read_cars_annotations(
    mat_path: str, mtime_ns: int, size: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(relative paths, classes, bboxes) of ``cars_annos.mat``; cached because train, validation and test
    datasets each read the same 16k-element struct array (mtime/size in the key invalidate on change)."""
    import scipy.io

    del mtime_ns, size
    try:
        mat = scipy.io.loadmat(mat_path)
    except Exception as exc:  # scipy raises several types for a damaged file
        raise DatasetLayoutError(f"Cars196: cannot read {mat_path} as a MATLAB file: {exc}") from exc
    if "annotations" not in mat:
        raise DatasetLayoutError(f"Cars196: {mat_path} has no variable 'annotations' (found {sorted(mat)})")
    ann = np.asarray(mat["annotations"]).reshape(-1)
    names = ann.dtype.names or ()
    missing = [f for f in _CARS_FIELDS if f not in names]
    if missing:
        raise DatasetLayoutError(
            f"Cars196: {mat_path} 'annotations' lacks fields {missing}; expected {list(_CARS_FIELDS)}"
        )

    def scalar(v: Any) -> Any:
        return np.asarray(v).reshape(-1)[0]

    rel = [str(scalar(a)) for a in ann["relative_im_path"]]
    cls = np.array([int(scalar(c)) for c in ann["class"]], dtype=np.int64)
    bbox = (
        np.array(
            [[int(scalar(v)) for v in ann[f"bbox_{k}"]] for k in ("x1", "y1", "x2", "y2")], dtype=np.int64
        )
        .reshape(4, -1)
        .T
    )
    if cls.size and (cls.min() < 1 or cls.max() > 196):
        raise DatasetLayoutError(f"Cars196: {mat_path} 'class' values must lie in 1..196")
    return rel, cls, bbox


class Cars196(ImageListDataset):
    """Stanford Cars (196 classes) from ``cars_annos.mat`` + ``car_ims/``.

    The struct array ``annotations`` has fields ``relative_im_path, bbox_x1, bbox_y1, bbox_x2, bbox_y2, class,
    test``. Split by ``class``: 1–98 train, 99–196 test; the ``test`` flag (classification split) is ignored.
    Labels are ``class − 1``. Bounding boxes are kept in ``bboxes`` (x1, y1, x2, y2) but not applied.
    """

    EXPECTED = ("cars_annos.mat", "car_ims")
    FIELDS = _CARS_FIELDS
    LAST_TRAIN_CLASS = 98

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable[[Any], Any] | None = None,
        on_bad_image: str = "error",
    ) -> None:
        _check_split("Cars196", split, ("train", "test"))
        self.root = _resolve_root("Cars196", root, self.EXPECTED, ("cars196", "Cars196", "CARS196"))
        mat_path = self.root / "cars_annos.mat"
        stat = mat_path.stat()
        rel, cls, bbox = _read_cars_annotations(str(mat_path), stat.st_mtime_ns, stat.st_size)
        keep = np.flatnonzero((cls <= self.LAST_TRAIN_CLASS) == (split == "train"))
        super().__init__(_join(self.root, (rel[i] for i in keep)), cls[keep] - 1, transform, on_bad_image)
        self.bboxes = bbox[keep]
        self.split = split


class StanfordOnlineProducts(ImageListDataset):
    """Stanford Online Products from ``Ebay_train.txt`` / ``Ebay_test.txt``; labels ``class_id − 1``.

    ``root`` is ``Stanford_Online_Products/`` or its parent. ``super_labels`` holds ``super_class_id − 1``.
    """

    HEADER = ("image_id", "class_id", "super_class_id", "path")
    FILES: ClassVar[dict[str, str]] = {"train": "Ebay_train.txt", "test": "Ebay_test.txt"}

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable[[Any], Any] | None = None,
        on_bad_image: str = "error",
    ) -> None:
        _check_split("StanfordOnlineProducts", split, ("train", "test"))
        self.root = _resolve_root(
            "StanfordOnlineProducts", root, tuple(self.FILES.values()), ("Stanford_Online_Products",)
        )
        index = self.root / self.FILES[split]
        rows = _read_rows(index, 4)
        if not rows or tuple(rows[0]) != self.HEADER:
            raise DatasetLayoutError(
                f"StanfordOnlineProducts: {index} must start with the header {' '.join(self.HEADER)!r}"
            )
        rows = rows[1:]
        class_ids = np.array(
            [_int(index, i + 2, r[1], "class_id") for i, r in enumerate(rows)], dtype=np.int64
        )
        super_ids = np.array(
            [_int(index, i + 2, r[2], "super_class_id") for i, r in enumerate(rows)], dtype=np.int64
        )
        super().__init__(_join(self.root, (r[3] for r in rows)), class_ids - 1, transform, on_bad_image)
        self.super_labels = super_ids - 1
        self.split = split


class InShop(ImageListDataset):
    """DeepFashion In-Shop Clothes Retrieval from ``Eval/list_eval_partition.txt``.

    Line 1 is the image count, line 2 the header ``image_name item_id evaluation_status``. Item ids map to labels
    by sorted id: one map over the *union* of query and gallery ids (so a query and its gallery matches always
    share a label, whatever the file order) and a separate map for train. ``item_ids`` keeps the raw ids.
    """

    PARTITION = "Eval/list_eval_partition.txt"
    HEADER = ("image_name", "item_id", "evaluation_status")
    STATUSES = ("train", "query", "gallery")

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable[[Any], Any] | None = None,
        on_bad_image: str = "error",
    ) -> None:
        _check_split("InShop", split, self.STATUSES)
        self.root = _resolve_root(
            "InShop", root, (self.PARTITION,), ("In-shop Clothes Retrieval Benchmark", "InShop", "inshop")
        )
        path = self.root / self.PARTITION
        with open(path, encoding="utf-8") as f:
            lines = [ln for ln in f.read().splitlines() if ln.strip()]
        if len(lines) < 2 or tuple(lines[1].split()) != self.HEADER:
            raise DatasetLayoutError(
                f"InShop: {path} must start with a count line then the header {' '.join(self.HEADER)!r}"
            )
        declared = _int(path, 1, lines[0].strip(), "image count")
        rows = []
        for lineno, line in enumerate(lines[2:], start=3):
            fields = line.split()
            if len(fields) != 3 or fields[2] not in self.STATUSES:
                raise DatasetLayoutError(
                    f"{path}:{lineno}: expected '<image_name> <item_id> <train|query|gallery>', got {line!r}"
                )
            rows.append(fields)
        if len(rows) != declared:
            raise DatasetLayoutError(
                f"InShop: {path} declares {declared} images on line 1 but lists {len(rows)}; incomplete file?"
            )
        group = ("train",) if split == "train" else ("query", "gallery")
        vocabulary = sorted({r[1] for r in rows if r[2] in group})
        label_of = {item: i for i, item in enumerate(vocabulary)}
        selected = [r for r in rows if r[2] == split]
        super().__init__(
            _join(self.root, (r[0] for r in selected)),
            [label_of[r[1]] for r in selected],
            transform,
            on_bad_image,
        )
        self.item_ids = [r[1] for r in selected]
        self.split = split


DATASETS: dict[str, type[ImageListDataset]] = {
    "cub200": CUB200,
    "cars196": Cars196,
    "sop": StanfordOnlineProducts,
    "inshop": InShop,
    "folder": ImageFolderDataset,
    "csv": CSVDataset,
}


def build_dataset(
    name: str,
    root: str | Path,
    split: str,
    transform: Callable[[Any], Any] | None = None,
    on_bad_image: str = "error",
) -> ImageListDataset:
    """``DATASETS[name](root, split, transform, on_bad_image)`` with an error listing the known names."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name](root, split, transform=transform, on_bad_image=on_bad_image)
