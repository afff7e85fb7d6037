"""The embedded KanjiGlyphs archive and its loader: integrity, class-disjoint splits, image sanity, API."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deepmetric.data import KanjiGlyphs
from deepmetric.data.kanji import ARCHIVE_PATH, IMAGE_SIZE, KanjiArchiveError, load_archive, split_class_range

MIN_CLASSES = 1000
MIN_DESIGNS = 24
MAX_TOTAL_BYTES = 15_000_000
MANIFEST_PATH = ARCHIVE_PATH.with_name("kanji_glyphs_manifest.json")


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads(MANIFEST_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return load_archive()[0]


def test_archive_matches_manifest_and_targets(manifest: dict, images: np.ndarray) -> None:
    assert hashlib.sha256(ARCHIVE_PATH.read_bytes()).hexdigest() == manifest["sha256"]
    n_classes, n_designs = images.shape[:2]
    assert images.dtype == np.uint8 and images.shape[2:] == (IMAGE_SIZE, IMAGE_SIZE)
    assert n_classes == manifest["num_classes"] == len(manifest["classes"]) >= MIN_CLASSES
    assert n_designs == manifest["num_designs"] == len(manifest["designs"]) >= MIN_DESIGNS
    assert ARCHIVE_PATH.stat().st_size + MANIFEST_PATH.stat().st_size <= MAX_TOTAL_BYTES
    # Classes are distinct level-1 kanji (JIS rows 16-47) in JIS order; designs are distinct fonts with a license.
    chars = [c["char"] for c in manifest["classes"]]
    assert len(set(chars)) == len(chars)
    assert all(16 <= c["char"].encode("euc_jp")[0] - 0xA0 <= 47 for c in manifest["classes"])
    assert [c["jis_index"] for c in manifest["classes"]] == sorted(c["jis_index"] for c in manifest["classes"])
    assert all(c["codepoint"] == f"U+{ord(c['char']):04X}" for c in manifest["classes"])
    assert len({(d["file"], d["face_index"]) for d in manifest["designs"]}) == n_designs
    assert all(d["package"].startswith("fonts-") and d["license"] for d in manifest["designs"])


def test_no_two_designs_identical(images: np.ndarray) -> None:
    # A duplicated design would make retrieval trivially easy for that pair.
    flat = images[::50].transpose(1, 0, 2, 3).reshape(images.shape[1], -1)
    assert len({row.tobytes() for row in flat}) == images.shape[1]


def _copy_archive(tmp_path: Path) -> Path:
    dst = tmp_path / "kanji_glyphs.npz"
    shutil.copy(ARCHIVE_PATH, dst)
    shutil.copy(MANIFEST_PATH, tmp_path / "kanji_glyphs_manifest.json")
    return dst


def test_corrupt_archive_raises_naming_the_file(tmp_path: Path) -> None:
    dst = _copy_archive(tmp_path)
    data = bytearray(dst.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the compressed payload
    dst.write_bytes(bytes(data))
    with pytest.raises(KanjiArchiveError, match="corrupt") as err:
        KanjiGlyphs("train", archive=dst)
    assert str(dst) in str(err.value)


def test_missing_archive_raises_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "kanji_glyphs.npz"
    with pytest.raises(KanjiArchiveError, match="missing") as err:
        KanjiGlyphs("test", archive=missing)
    assert str(missing) in str(err.value)


def test_intact_copy_loads(tmp_path: Path) -> None:
    ds = KanjiGlyphs("val", archive=_copy_archive(tmp_path), max_classes=3)
    assert ds.num_classes == 3


@pytest.mark.parametrize("fraction", [0.2, 0.0, 0.5])
def test_splits_are_class_disjoint_and_cover_all_classes(images: np.ndarray, fraction: float) -> None:
    n_classes, n_designs = images.shape[:2]
    splits = ("train", "val", "test") if fraction > 0 else ("train", "test")
    label_sets = {s: set(KanjiGlyphs(s, validation_fraction=fraction).labels.tolist()) for s in splits}
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            assert not label_sets[a] & label_sets[b], (a, b)
    assert set().union(*label_sets.values()) == set(range(n_classes))
    pool = n_classes // 2
    n_val = round(fraction * pool)
    assert len(label_sets["train"]) == pool - n_val
    assert len(label_sets["test"]) == n_classes - pool
    # JIS order: train takes the first classes, val the end of the train pool, test the second half.
    assert min(label_sets["train"]) == 0 and max(label_sets["test"]) == n_classes - 1
    if fraction > 0:
        assert len(label_sets["val"]) == n_val and min(label_sets["val"]) == pool - n_val
    ds = KanjiGlyphs("train", validation_fraction=fraction)
    assert len(ds) == ds.num_classes * n_designs
    assert np.array_equal(np.bincount(ds.labels), np.full(ds.num_classes, n_designs))


def test_invalid_split_arguments() -> None:
    with pytest.raises(ValueError, match="split"):
        split_class_range(100, "validation", 0.2)
    with pytest.raises(ValueError, match="validation_fraction"):
        split_class_range(100, "train", 1.0)
    with pytest.raises(ValueError, match="val"):
        split_class_range(100, "val", 0.0)
    with pytest.raises(ValueError, match="max_classes"):
        KanjiGlyphs("train", max_classes=0)


def test_images_non_empty_and_centred(images: np.ndarray) -> None:
    sample = images[::7].reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    ink = sample > 0  # any ink: the build centres the full (anti-aliased) ink box
    assert ink.any(axis=(1, 2)).all(), "every glyph must have ink"
    rows, cols = ink.any(axis=2), ink.any(axis=1)
    idx = np.arange(IMAGE_SIZE)
    for mask in (rows, cols):
        first = np.where(mask, idx, IMAGE_SIZE).min(axis=1)
        last = np.where(mask, idx, -1).max(axis=1)
        # Ink bbox centre within 1 px of the image centre, and the long side fills most of the square.
        assert np.abs((first + last) / 2 - (IMAGE_SIZE - 1) / 2).max() <= 1.0
    extent = np.maximum(
        np.where(rows, idx, -1).max(1) - np.where(rows, idx, IMAGE_SIZE).min(1),
        np.where(cols, idx, -1).max(1) - np.where(cols, idx, IMAGE_SIZE).min(1),
    ) + 1
    assert extent.min() >= IMAGE_SIZE - 4
    assert sample[:, 0, :].max() == 0 and sample[:, :, -1].max() == 0  # margin: nothing clipped at the border


def test_item_types_and_attributes() -> None:
    ds = KanjiGlyphs("test", max_classes=2)
    x, y = ds[0]
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.shape == (1, IMAGE_SIZE, IMAGE_SIZE)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.5
    assert isinstance(y, int) and y == int(ds.labels[0]) == int(ds.class_ids[0])
    assert ds.labels.dtype == np.int64 and ds.images.dtype == np.uint8
    assert ds.images.shape == (len(ds), IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(x, torch.from_numpy(ds.images[0].copy()).float().div(255).unsqueeze(0))
    assert len(ds.classes) == ds.num_classes == 2 and len(ds.designs) == len(ds) // 2
    assert not ds.images.flags.writeable  # the shared archive cannot be modified through a dataset


def test_transform_receives_pil_gray_image() -> None:
    seen = []

    def spy(img: object) -> str:
        seen.append(img)
        return "ok"

    ds = KanjiGlyphs("train", transform=spy, max_classes=1)
    assert ds[3] == ("ok", 0)
    assert seen[0].mode == "L" and seen[0].size == (IMAGE_SIZE, IMAGE_SIZE)


def test_max_classes_keeps_first_classes_of_split() -> None:
    full = KanjiGlyphs("val")
    small = KanjiGlyphs("val", max_classes=5)
    assert small.num_classes == 5 and np.array_equal(small.class_ids, full.class_ids[:5])
    assert np.array_equal(small.images, full.images[: len(small)])
    assert KanjiGlyphs("val", max_classes=10**6).num_classes == full.num_classes


def test_transform_presets() -> None:
    from deepmetric.data.kanji import kanji_eval_transform, kanji_train_transform

    torch.manual_seed(0)
    ds = KanjiGlyphs("train", max_classes=1)
    x_eval, _ = KanjiGlyphs("train", transform=kanji_eval_transform(), max_classes=1)[0]
    assert torch.allclose(x_eval.as_subclass(torch.Tensor), ds[0][0], atol=1e-6)
    x_train, _ = KanjiGlyphs("train", transform=kanji_train_transform(), max_classes=1)[0]
    assert x_train.shape == (1, IMAGE_SIZE, IMAGE_SIZE) and x_train.dtype == torch.float32
    assert 0.0 <= float(x_train.min()) and float(x_train.max()) <= 1.0


def test_classes_are_jis_level1_kanji_at_their_jis_index(manifest: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    # Independent of the archive: the build script's class list must be the 2,965 level-1 kanji, and the
    # manifest's jis_index must point into it.
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "build_kanji_glyphs.py"
    spec = importlib.util.spec_from_file_location("build_kanji_glyphs", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    chars = module.jis_level1_kanji()
    assert len(chars) == len(set(chars)) == 2965
    assert chars[0] == "亜" and chars[-1] == "腕"  # JIS 16-01 and 47-51
    assert all(chars[c["jis_index"]] == c["char"] for c in manifest["classes"])
