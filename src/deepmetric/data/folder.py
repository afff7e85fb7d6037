"""A folder of photos, one sub-folder per class (``root/<class_name>/**/<image>``).

Splits: if ``root/<split>/`` exists (e.g. ``root/train``, ``root/test``), that folder is read with its own
class list. Otherwise ``"train"``/``"test"`` apply the zero-shot convention of the benchmarks: class folders
sorted by name, the first half (⌈n/2⌉) is train, the rest test, and labels are global indices into the sorted
list (test labels continue after the train labels). ``split=None`` or ``"all"`` reads every class.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from deepmetric.data.image_dataset import DatasetLayoutError, ImageListDataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _class_dirs(root: Path) -> list[Path]:
    return sorted(
        (d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name
    )


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class ImageFolderDataset(ImageListDataset):
    """Images under ``root/<class>/``; ``class_names[label]`` is the folder name of a label."""

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        transform: Callable[[Any], Any] | None = None,
        on_bad_image: str = "error",
    ) -> None:
        base = Path(root).expanduser()
        if not base.is_dir():
            raise DatasetLayoutError(
                f"ImageFolderDataset: {base} is not a folder (expected root/<class>/<image>)"
            )
        folder = base
        if split not in (None, "all") and (base / split).is_dir():
            folder = base / split
            split_mode = "folder"
        elif split in (None, "all"):
            split_mode = "all"
        elif split in ("train", "test"):
            split_mode = "halves"
        else:
            raise ValueError(
                f"ImageFolderDataset: split {split!r} needs a folder {base / str(split)}; without one only "
                f"'train'/'test' (class halves) or None/'all' are possible"
            )
        classes = _class_dirs(folder)
        if split_mode == "halves" and {c.name for c in classes} >= {"train", "test"}:
            raise DatasetLayoutError(
                f"ImageFolderDataset: {base} has train/ and test/ folders but not {split}/"
            )
        paths: list[Path] = []
        labels: list[int] = []
        first_test = (len(classes) + 1) // 2
        for label, class_dir in enumerate(classes):
            if split_mode == "halves" and (label < first_test) != (split == "train"):
                continue
            files = _images_in(class_dir)
            paths.extend(files)
            labels.extend([label] * len(files))
        if not paths:
            raise DatasetLayoutError(
                f"ImageFolderDataset: no images found for split {split!r} under {folder}; expected "
                f"{folder}/<class_name>/<image> with extensions {', '.join(IMAGE_EXTENSIONS)}"
            )
        super().__init__(paths, labels, transform, on_bad_image)
        self.root = base
        self.class_names = [c.name for c in classes]
        self.split = split
