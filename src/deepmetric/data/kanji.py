"""``KanjiGlyphs``: the embedded default dataset (Omniglot-style many-class zero-shot retrieval, real typefaces).

Each class is one JIS X 0208 level-1 kanji; each sample is that kanji drawn in one of the distinct font designs
shipped with Debian (Noto, IPAex, BIZ UD, brush and handwriting fonts, pixel fonts, ...). Images are 32×32
uint8, **white ink (255) on black (0)**, the glyph's ink bounding box scaled to fill the square (aspect ratio
kept) and centred, gray levels quantised to 16 steps. The archive and its manifest (designs with package and
license, classes with code points, sha256) live in ``deepmetric/data/assets`` and are produced by
``scripts/build_kanji_glyphs.py``; nothing is downloaded.

Splits are by class, in JIS order (no random state, so every run and every process agrees):

* the first half of the classes is the training pool, the second half is ``"test"``;
* ``"val"`` is the **last** ``validation_fraction`` of the training pool, ``"train"`` the rest.

Labels are global class indices, so the splits are disjoint in label space; ``"train"`` labels are
``0 .. num_classes - 1`` (contiguous, usable directly by proxy/classification losses).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
ARCHIVE_PATH = ASSETS_DIR / "kanji_glyphs.npz"
IMAGE_SIZE = 32
SPLITS = ("train", "val", "test")


class KanjiArchiveError(RuntimeError):
    """The embedded archive or its manifest is missing, corrupt or inconsistent."""


@dataclass(frozen=True)
class _Archive:
    images: np.ndarray  # uint8 [num_classes, num_designs, H, W], read-only
    manifest: dict[str, Any]


# Loaded archives by (path, size, mtime): the sha256 check and decompression run once per process per file,
# and all split instances share one read-only array.
_CACHE: dict[tuple[str, int, int], _Archive] = {}
_LOCK = threading.Lock()


def _manifest_path(archive: Path) -> Path:
    return archive.with_name(archive.stem + "_manifest.json")


def load_archive(path: str | Path | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """``(images [C, D, H, W] uint8, manifest)`` of a KanjiGlyphs archive, checksum-verified (once per process).

    ``path`` defaults to the embedded archive; the manifest is the ``<stem>_manifest.json`` next to it.
    Raises :class:`KanjiArchiveError` naming the file when something is missing, corrupt or inconsistent.
    """
    archive = Path(path) if path is not None else ARCHIVE_PATH
    manifest_file = _manifest_path(archive)
    for f in (archive, manifest_file):
        if not f.is_file():
            raise KanjiArchiveError(
                f"KanjiGlyphs file missing: {f}. It ships inside the deepmetric package; reinstall deepmetric "
                "or rebuild it with scripts/build_kanji_glyphs.py."
            )
    stat = archive.stat()
    key = (str(archive.resolve()), stat.st_size, stat.st_mtime_ns)
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = _read_verified(archive, manifest_file)
    entry = _CACHE[key]
    return entry.images, entry.manifest


def _read_verified(archive: Path, manifest_file: Path) -> _Archive:
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise KanjiArchiveError(f"KanjiGlyphs manifest {manifest_file} is unreadable: {exc}") from exc
    blob = archive.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != manifest.get("sha256"):
        raise KanjiArchiveError(
            f"KanjiGlyphs archive {archive} is corrupt: sha256 {digest} does not match the manifest "
            f"({manifest.get('sha256')}). Reinstall deepmetric or rebuild with scripts/build_kanji_glyphs.py."
        )
    try:
        with np.load(archive, allow_pickle=False) as npz:
            images = npz[manifest.get("array_key", "images")]
    except Exception as exc:  # zip/zlib/format errors all mean the same to the user
        raise KanjiArchiveError(f"KanjiGlyphs archive {archive} cannot be read: {exc}") from exc
    expected = (manifest["num_classes"], manifest["num_designs"], manifest["image_size"], manifest["image_size"])
    if images.dtype != np.uint8 or images.shape != expected:
        raise KanjiArchiveError(
            f"KanjiGlyphs archive {archive} holds {images.dtype} {images.shape}; the manifest says uint8 {expected}"
        )
    if len(manifest["classes"]) != expected[0] or len(manifest["designs"]) != expected[1]:
        raise KanjiArchiveError(f"KanjiGlyphs manifest {manifest_file} lists a different number of classes/designs")
    images.setflags(write=False)  # shared across datasets: nobody may modify it in place
    return _Archive(images=images, manifest=manifest)


def split_class_range(num_classes: int, split: str, validation_fraction: float) -> tuple[int, int]:
    """``[start, stop)`` of the split's global class indices (see the module docstring for the rule)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    pool = num_classes // 2
    n_val = round(validation_fraction * pool)
    if split == "train":
        return 0, pool - n_val
    if split == "val":
        if n_val == 0:
            raise ValueError("split='val' needs validation_fraction > 0 (it is the last fraction of the train pool)")
        return pool - n_val, pool
    return pool, num_classes


class KanjiGlyphs(Dataset):
    """One split of the embedded KanjiGlyphs dataset (torch ``Dataset`` of ``(image, label)``).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (class-disjoint; see the module docstring).
        transform: applied to a PIL ``"L"`` (8-bit gray) image, so any torchvision transform works; without one
            the item is a float32 tensor ``[1, 32, 32]`` in ``[0, 1]``.
        validation_fraction: fraction of the training pool's classes (its last ones) that form ``"val"``.
        max_classes: keep only the first N classes of the split (quick runs).
        archive: path of another archive (tests); default the embedded one.

    Attributes:
        labels: int64 global class index per item (no image decoding).
        class_ids: int64 global class indices of this split, in order.
        classes: the split's characters, aligned with ``class_ids``; ``codepoints`` the same as ``"U+XXXX"``.
        designs: font names (``"family style"``) in design order; ``design_ids`` the design index per item.
        images: read-only uint8 view ``[len(self), 32, 32]``, item ``i`` is ``images[i]``.
        num_classes: number of classes in this split.

    Items are ordered class-major (all designs of the first class, then the next class).
    """

    def __init__(
        self,
        split: str = "train",
        transform: Callable[[Any], Any] | None = None,
        validation_fraction: float = 0.2,
        max_classes: int | None = None,
        archive: str | Path | None = None,
    ) -> None:
        all_images, manifest = load_archive(archive)
        total_classes, n_designs = all_images.shape[:2]
        start, stop = split_class_range(total_classes, split, validation_fraction)
        if max_classes is not None:
            if max_classes < 1:
                raise ValueError(f"max_classes must be >= 1 or None, got {max_classes}")
            stop = min(stop, start + max_classes)
        self.split = split
        self.transform = transform
        self.manifest = manifest
        self.class_ids = np.arange(start, stop, dtype=np.int64)
        # Contiguous class range -> basic slicing -> a view, no copy of the archive.
        self.images = all_images[start:stop].reshape(-1, *all_images.shape[2:])
        self.labels = np.repeat(self.class_ids, n_designs)
        self.design_ids = np.tile(np.arange(n_designs, dtype=np.int64), len(self.class_ids))
        cls = manifest["classes"][start:stop]
        self.classes: list[str] = [c["char"] for c in cls]
        self.codepoints: list[str] = [c["codepoint"] for c in cls]
        self.designs: list[str] = [f"{d['family']} {d['style']}".strip() for d in manifest["designs"]]

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    @property
    def num_designs(self) -> int:
        return len(self.designs)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self.images[index]
        label = int(self.labels[index])
        if self.transform is None:
            # Copy: torch must not alias the read-only shared archive.
            return torch.from_numpy(img.astype(np.float32) / 255.0).unsqueeze(0), label
        from PIL import Image

        return self.transform(Image.fromarray(img)), label  # 2-D uint8 -> PIL mode "L"

    def __repr__(self) -> str:
        return (f"KanjiGlyphs(split={self.split!r}, classes={self.num_classes}, designs={self.num_designs}, "
                f"items={len(self)})")


# ------------------------------------------------------------------------------------------- transforms ------
def kanji_train_transform(backbone: str | None = None, dataset: str | None = None) -> Callable[[Any], Any]:
    """Light glyph augmentation: random affine (rotation ±8°, scale 0.9–1.1, translation ±2 px), then a float
    tensor in [0, 1]. No flips: a mirrored kanji is a different (or no) character. The background fill is 0,
    the dataset's background. ``backbone``/``dataset`` are accepted for the transform registry and ignored.
    """
    from torchvision.transforms import v2 as T

    # The affine runs on the PIL image: ~0.4 ms per 32×32 glyph, versus 5–13 ms for the tensor path
    # (affine_grid + grid_sample per item), which made data loading the bottleneck of CPU training.
    return T.Compose([
        T.RandomAffine(degrees=8.0, translate=(2 / IMAGE_SIZE, 2 / IMAGE_SIZE), scale=(0.9, 1.1), fill=0),
        _to_float_tensor,
    ])


def kanji_eval_transform(backbone: str | None = None, dataset: str | None = None) -> Callable[[Any], Any]:
    """PIL ``"L"`` image (or uint8/float tensor) → float32 tensor ``[1, H, W]`` in [0, 1]; nothing else."""
    return _to_float_tensor


def _to_float_tensor(image: Any) -> torch.Tensor:
    """PIL "L" image / 2-D or [1, H, W] uint8 array or tensor → float32 [1, H, W] in [0, 1] (fast path)."""
    if isinstance(image, torch.Tensor):
        t = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    else:
        t = torch.from_numpy(np.array(image, dtype=np.float32, copy=True)) / 255.0
    return t.unsqueeze(0) if t.dim() == 2 else t
