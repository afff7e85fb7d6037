"""Miniature copies of the official benchmark archives (real file formats, tiny JPEGs) for the dataset tests.

Also index-only versions with the published numbers of rows and classes (no images), to check that the
loaders reproduce the published split sizes exactly. Cars196 needs a 16,185-element MATLAB struct array;
``scipy.io.savemat`` takes ~10 s for that, so :func:`write_struct_array_mat` writes the same MAT-5 layout
directly (read back with the real ``scipy.io.loadmat``).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image


def tiny_jpeg(
    path: Path, color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (12, 10)
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="JPEG")
    return path


def corrupt_file(path: Path, truncated: bool = False) -> Path:
    """Not a decodable image: random bytes, or the first bytes of a real JPEG (truncated download)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if truncated:
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
            buf, "JPEG"
        )
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    else:
        path.write_bytes(b"this is not an image")
    return path


def _per_class(total: int, classes: Sequence[int]) -> list[int]:
    """Class id of each of ``total`` rows, spread as evenly as possible over ``classes``."""
    k = len(classes)
    counts = [total // k + (1 if i < total % k else 0) for i in range(k)]
    return [c for c, n in zip(classes, counts) for _ in range(n)]


# ------------------------------------------------------------------------------------------------ CUB --------
def make_cub(root: Path, per_class: dict[int, int], images: bool = True) -> Path:
    """``root/CUB_200_2011`` with images.txt, image_class_labels.txt, train_test_split.txt, classes.txt."""
    base = root / "CUB_200_2011"
    (base / "images").mkdir(parents=True, exist_ok=True)
    img_lines, label_lines, split_lines = [], [], []
    img_id = 0
    for cls, n in sorted(per_class.items()):
        folder = f"{cls:03d}.Bird_{cls}"
        for j in range(n):
            img_id += 1
            rel = f"{folder}/Bird_{cls}_{j:04d}_{img_id}.jpg"
            img_lines.append(f"{img_id} {rel}")
            label_lines.append(f"{img_id} {cls}")
            # The classification split (alternating) must not influence the DML split.
            split_lines.append(f"{img_id} {img_id % 2}")
            if images:
                tiny_jpeg(base / "images" / rel, color=(cls % 256, 100, 50))
    (base / "images.txt").write_text("\n".join(img_lines) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(label_lines) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(split_lines) + "\n")
    (base / "classes.txt").write_text("\n".join(f"{c} {c:03d}.Bird_{c}" for c in sorted(per_class)) + "\n")
    return base


def make_cub_published(root: Path) -> Path:
    """Index files only: 5,864 images in classes 1–100 and 5,924 in classes 101–200."""
    classes = _per_class(5864, range(1, 101)) + _per_class(5924, range(101, 201))
    counts = {c: classes.count(c) for c in range(1, 201)}
    return make_cub(root, counts, images=False)


# ------------------------------------------------------------------------------------------------ Cars -------
CARS_FIELDS = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")


def make_cars(root: Path, records: Sequence[tuple[int, int]], images: bool = True) -> Path:
    """``root`` with car_ims/ and cars_annos.mat written by scipy.io.savemat; records = (class, test flag)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "car_ims").mkdir(exist_ok=True)
    ann = np.zeros((1, len(records)), dtype=[(f, "O") for f in CARS_FIELDS])
    for i, (cls, test) in enumerate(records):
        rel = f"car_ims/{i + 1:06d}.jpg"
        ann[0, i] = (
            rel,
            np.array([[3]], dtype=np.uint8),
            np.array([[4]], dtype=np.uint8),
            np.array([[10 + i]], dtype=np.uint16),
            np.array([[9]], dtype=np.uint16),
            np.array([[cls]], dtype=np.uint8),
            np.array([[test]], dtype=np.uint8),
        )
        if images:
            tiny_jpeg(root / rel, color=(cls, 20, 200))
    class_names = np.empty((1, 196), dtype=object)
    class_names[0, :] = [f"Car Model {c}" for c in range(1, 197)]
    scipy.io.savemat(str(root / "cars_annos.mat"), {"annotations": ann, "class_names": class_names})
    return root


def _mat_element(dtype_code: int, payload: bytes) -> bytes:
    pad = (-len(payload)) % 8
    return struct.pack("<II", dtype_code, len(payload)) + payload + b"\0" * pad


def _mat_matrix(mx_class: int, dims: Sequence[int], name: bytes, body: bytes) -> bytes:
    flags = _mat_element(6, struct.pack("<II", mx_class, 0))  # miUINT32: class, (no nzmax)
    dim = _mat_element(5, struct.pack(f"<{len(dims)}i", *dims))  # miINT32
    return _mat_element(14, flags + dim + _mat_element(1, name) + body)  # miMATRIX, name as miINT8


def _mat_value(value: object) -> bytes:
    if isinstance(value, str):
        data = value.encode("utf-16-le")
        return _mat_matrix(4, (1, len(value)), b"", _mat_element(4, data))  # mxCHAR, miUINT16
    return _mat_matrix(6, (1, 1), b"", _mat_element(9, struct.pack("<d", float(value))))  # mxDOUBLE


def write_struct_array_mat(
    path: Path, name: str, fields: Sequence[str], rows: Sequence[Sequence[object]]
) -> None:
    """A MAT-5 file holding one 1×N struct array ``name`` (values: str or number) — the layout savemat writes."""
    width = max(len(f) for f in fields) + 1
    names = b"".join(f.encode().ljust(width, b"\0") for f in fields)
    field_len = struct.pack("<I", (4 << 16) | 5) + struct.pack("<i", width)  # small-element miINT32
    parts = [field_len, _mat_element(1, names)]
    parts.extend(_mat_value(v) for row in rows for v in row)
    header = b"MATLAB 5.0 MAT-file, written by deepmetric tests".ljust(116, b" ")
    header += b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    path.write_bytes(header + _mat_matrix(2, (1, len(rows)), name.encode(), b"".join(parts)))


def make_cars_published(root: Path) -> Path:
    """cars_annos.mat only: 8,054 images of classes 1–98 and 8,131 of classes 99–196 (16,185 in all)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "car_ims").mkdir(exist_ok=True)
    classes = _per_class(8054, range(1, 99)) + _per_class(8131, range(99, 197))
    # The classification "test" flag alternates, to prove it is ignored.
    rows = [(f"car_ims/{i + 1:06d}.jpg", 1, 2, 30, 40, c, i % 2) for i, c in enumerate(classes)]
    write_struct_array_mat(root / "cars_annos.mat", "annotations", CARS_FIELDS, rows)
    return root


# ------------------------------------------------------------------------------------------------ SOP --------
SOP_SUPER = [
    "bicycle",
    "cabinet",
    "chair",
    "coffee_maker",
    "fan",
    "kettle",
    "lamp",
    "mug",
    "sofa",
    "stapler",
    "table",
    "toaster",
]


def _sop_rows(class_ids: Sequence[int], start_id: int) -> list[str]:
    rows = ["image_id class_id super_class_id path"]
    for k, cls in enumerate(class_ids):
        sup = cls % 12 + 1
        rows.append(f"{start_id + k} {cls} {sup} {SOP_SUPER[sup - 1]}_final/{cls}_{k}.JPG")
    return rows


def make_sop(
    root: Path, train_classes: Sequence[int], test_classes: Sequence[int], images: bool = True
) -> Path:
    """``root/Stanford_Online_Products`` with Ebay_train.txt / Ebay_test.txt (one row per listed class id)."""
    base = root / "Stanford_Online_Products"
    base.mkdir(parents=True, exist_ok=True)
    train = _sop_rows(train_classes, 1)
    test = _sop_rows(test_classes, len(train_classes) + 1)
    (base / "Ebay_train.txt").write_text("\n".join(train) + "\n")
    (base / "Ebay_test.txt").write_text("\n".join(test) + "\n")
    if images:
        for line in train[1:] + test[1:]:
            tiny_jpeg(base / line.split()[3])
    return base


def make_sop_published(root: Path) -> Path:
    """59,551 train rows over classes 1–11,318; 60,502 test rows over classes 11,319–22,634."""
    return make_sop(
        root, _per_class(59551, range(1, 11319)), _per_class(60502, range(11319, 22635)), images=False
    )


# ------------------------------------------------------------------------------------------------ In-Shop ----
def make_inshop(
    root: Path, rows: Sequence[tuple[str, str]], images: bool = True, count: int | None = None
) -> Path:
    """``root/Eval/list_eval_partition.txt`` from (item_id, status) rows, in the given order."""
    (root / "Eval").mkdir(parents=True, exist_ok=True)
    lines = [str(len(rows) if count is None else count), "image_name item_id evaluation_status"]
    for k, (item, status) in enumerate(rows):
        rel = f"img/WOMEN/Dresses/{item}/{k:02d}_1_front.jpg"
        # The real file pads columns with runs of spaces.
        lines.append(f"{rel}    {item}        {status}")
        if images:
            tiny_jpeg(root / rel, color=(int(item[-2:]) * 10 % 256, 60, 60))
    (root / "Eval" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return root


def make_inshop_published(root: Path) -> Path:
    """25,882 train rows over 3,997 items; 14,218 query and 12,612 gallery rows over the same 3,985 items."""
    train_items = [f"id_{i:08d}" for i in range(1, 3998)]
    test_items = [f"id_{i:08d}" for i in range(4000, 4000 + 3985)]
    rows = [(it, "train") for it in _per_class(25882, train_items)]
    rows += [(it, "query") for it in _per_class(14218, test_items)]
    rows += [(it, "gallery") for it in _per_class(12612, test_items)]
    return make_inshop(root, rows, images=False)
