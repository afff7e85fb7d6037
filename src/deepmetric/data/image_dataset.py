"""Shared machinery of the image datasets: a list of files with integer labels, lazy decoding, bad-image policy.

Every dataset in :mod:`deepmetric.data` is an :class:`ImageListDataset`: construction parses index files only
(no image is opened), so ``labels``, ``num_classes`` and ``paths`` are available at once, even for SOP's 120k
images, and samplers can be built before any decoding happens.

Unreadable images (``on_bad_image``):

* ``"error"`` (default): ``__getitem__`` raises :class:`BadImageError` naming the file.
* ``"skip"``: the bad file is recorded (``bad_images``, ``num_bad_images``) and ``__getitem__`` returns the next
  readable image **of the same class** (cyclic order of the class's indices). Substituting within the class keeps
  the label that a class-balanced sampler asked for, so m-per-class batches stay valid; the substitute is
  deterministic. A class whose images are all unreadable raises. :meth:`verify_images` decodes everything up
  front and, with ``"skip"``, removes the bad files (call it before building a sampler). With DataLoader
  workers each process keeps its own count; ``verify_images`` gives the global one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

BAD_IMAGE_POLICIES = ("error", "skip")


class DatasetLayoutError(FileNotFoundError):
    """A dataset folder lacks files it needs, or they are incomplete; the message lists what was expected."""


class BadImageError(OSError):
    """An image file could not be opened or decoded; the message names the file."""


def load_rgb(path: str | Path) -> Image.Image:
    """Open and fully decode ``path`` as an RGB PIL image; any failure becomes :class:`BadImageError`."""
    try:
        with Image.open(path) as img:
            # ``load()`` forces decoding now, so a truncated JPEG fails here and not inside a transform.
            img.load()
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise BadImageError(f"cannot read image {path}: {exc}") from exc


def _nonempty_file(path: str) -> bool:
    try:
        return Path(path).stat().st_size > 0
    except OSError:
        return False


class ImageListDataset(Dataset):
    """Images given by ``paths`` with integer ``labels``; returns ``(transform(image), int label)``."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: Sequence[int] | np.ndarray,
        transform: Callable[[Any], Any] | None = None,
        on_bad_image: str = "error",
    ) -> None:
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths: list[str] = [str(p) for p in paths]
        self.labels: np.ndarray = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.transform = transform
        self.on_bad_image = on_bad_image
        self.bad_images: list[str] = []
        self._bad_index: set[int] = set()
        self._class_members: dict[int, np.ndarray] | None = None

    @property
    def num_classes(self) -> int:
        """Number of distinct labels in this split."""
        return int(np.unique(self.labels).size)

    @property
    def num_bad_images(self) -> int:
        """How many distinct unreadable files were met (skipped) so far."""
        return len(self.bad_images)

    def __len__(self) -> int:
        return len(self.paths)

    def _record_bad(self, index: int) -> None:
        if index not in self._bad_index:
            self._bad_index.add(index)
            self.bad_images.append(self.paths[index])

    def _substitutes(self, index: int) -> np.ndarray:
        """Indices of the same class, in cyclic order starting after ``index``."""
        if self._class_members is None:
            order = np.argsort(self.labels, kind="stable")
            bounds = np.flatnonzero(np.diff(self.labels[order])) + 1
            self._class_members = {int(self.labels[g[0]]): g for g in np.split(order, bounds) if g.size}
        members = self._class_members[int(self.labels[index])]
        pos = int(np.searchsorted(members, index))
        return np.roll(members, -pos)[1:]

    def load_image(self, index: int) -> Image.Image:
        """The decoded image at ``index`` (after the bad-image policy), before the transform."""
        try:
            return load_rgb(self.paths[index])
        except BadImageError:
            if self.on_bad_image == "error":
                raise
            self._record_bad(index)
        for j in self._substitutes(index):
            j = int(j)
            if j in self._bad_index:
                continue
            try:
                return load_rgb(self.paths[j])
            except BadImageError:
                self._record_bad(j)
        raise BadImageError(
            f"every image of class {int(self.labels[index])} is unreadable (first: {self.paths[index]})"
        )

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.load_image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def check_files(self) -> list[str]:
        """Stat every file (no decoding): missing or empty files raise naming them with ``"error"``; with
        ``"skip"`` they are removed like :meth:`verify_images` removes unreadable ones and returned."""
        bad = [i for i, path in enumerate(self.paths) if not _nonempty_file(path)]
        if not bad:
            return []
        names = [self.paths[i] for i in bad]
        if self.on_bad_image == "error":
            shown = ", ".join(names[:5]) + (f" … (+{len(names) - 5} more)" if len(names) > 5 else "")
            raise BadImageError(f"{len(names)} image file(s) missing or empty (0 bytes): {shown}")
        for i in bad:
            self._record_bad(i)
        keep = np.setdiff1d(np.arange(len(self.paths)), np.asarray(bad))
        self.paths = [self.paths[i] for i in keep]
        self.labels = self.labels[keep]
        self._bad_index, self._class_members = set(), None
        return names

    def verify_images(self) -> list[str]:
        """Decode every image once; return the unreadable paths.

        With ``on_bad_image="error"`` the first bad file raises. With ``"skip"`` the bad files are counted and
        removed from ``paths``/``labels`` so that later indices only point at readable images.
        """
        bad = []
        for i, path in enumerate(self.paths):
            try:
                load_rgb(path)
            except BadImageError:
                if self.on_bad_image == "error":
                    raise
                self._record_bad(i)
                bad.append(i)
        bad_paths = [self.paths[i] for i in bad]
        if bad:
            keep = np.setdiff1d(np.arange(len(self.paths)), np.asarray(bad))
            self.paths = [self.paths[i] for i in keep]
            self.labels = self.labels[keep]
            self._bad_index = set()
            self._class_members = None
        return bad_paths

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, classes={self.num_classes})"


class LabelledSubset(Dataset):
    """Rows ``indices`` of an :class:`ImageListDataset`, still exposing ``labels``/``paths``/``num_classes``.

    ``relabel=True`` maps the kept labels to 0..C−1 by rank (order preserving), which training needs for
    classifier-style losses (proxies, NormSoftmax) after a class-disjoint validation slice was removed.
    """

    def __init__(
        self, dataset: ImageListDataset, indices: Sequence[int] | np.ndarray, relabel: bool = False
    ) -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        original = dataset.labels[self.indices]
        if relabel:
            _, original = np.unique(original, return_inverse=True)
        self.labels: np.ndarray = np.asarray(original, dtype=np.int64).reshape(-1)
        self.paths = [dataset.paths[i] for i in self.indices]

    @property
    def num_classes(self) -> int:
        return int(np.unique(self.labels).size)

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, _ = self.dataset[int(self.indices[index])]
        return image, int(self.labels[index])


def missing_layout_error(
    dataset: str, root: Path, expected: Sequence[str], missing: Sequence[str]
) -> DatasetLayoutError:
    """An error that lists every expected file of the layout and which of them are missing."""
    lines = "\n".join(f"  {root / e}{'   <-- missing' if e in missing else ''}" for e in expected)
    return DatasetLayoutError(f"{dataset}: incomplete dataset folder {root}; expected these files:\n{lines}")
