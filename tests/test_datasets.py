"""Benchmark datasets on miniature archives in the official layouts, published split sizes, bad images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures_layouts import (
    corrupt_file,
    make_cars,
    make_cars_published,
    make_cub,
    make_cub_published,
    make_inshop,
    make_inshop_published,
    make_sop,
    make_sop_published,
    tiny_jpeg,
)

from deepmetric.data import (
    CUB200,
    DATASETS,
    BadImageError,
    Cars196,
    DatasetLayoutError,
    InShop,
    StanfordOnlineProducts,
    build_dataset,
)
from deepmetric.data.transforms import eval_transform

# ------------------------------------------------------------------------------------------------ CUB --------


def test_cub_split_by_class_id_not_classification_split(tmp_path):
    make_cub(tmp_path, {1: 3, 2: 2, 100: 1, 101: 2, 150: 1, 200: 2})
    train, test = CUB200(tmp_path, "train"), CUB200(tmp_path / "CUB_200_2011", "test")
    assert len(train) == 6 and len(test) == 5
    assert train.labels.dtype == np.int64
    assert sorted(set(train.labels.tolist())) == [0, 1, 99]
    assert sorted(set(test.labels.tolist())) == [100, 149, 199]
    assert train.num_classes == 3 and test.num_classes == 3
    assert all("/images/00" in p or "/images/100." in p for p in train.paths)


def test_cub_item_is_transformed_image_and_int_label(tmp_path):
    make_cub(tmp_path, {7: 1, 120: 1})
    ds = CUB200(tmp_path, "train", transform=eval_transform("ms", "bninception"))
    image, label = ds[0]
    assert isinstance(image, torch.Tensor) and image.shape == (3, 227, 227)
    assert label == 6 and isinstance(label, int)


def test_cub_missing_files_are_listed(tmp_path):
    base = make_cub(tmp_path, {1: 1, 101: 1}, images=False)
    (base / "image_class_labels.txt").unlink()
    with pytest.raises(DatasetLayoutError) as err:
        CUB200(tmp_path, "train")
    msg = str(err.value)
    assert "images.txt" in msg and "image_class_labels.txt   <-- missing" in msg and str(base) in msg


def test_cub_incomplete_index_files(tmp_path):
    base = make_cub(tmp_path, {1: 2, 101: 1}, images=False)
    lines = (base / "image_class_labels.txt").read_text().splitlines()
    (base / "image_class_labels.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DatasetLayoutError, match="different image ids"):
        CUB200(tmp_path, "test")


def test_nonexistent_root_and_bad_split(tmp_path):
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        CUB200(tmp_path / "nope", "train")
    with pytest.raises(ValueError, match="split must be one of"):
        CUB200(tmp_path, "val")


# ------------------------------------------------------------------------------------------------ Cars -------


def test_cars_from_mat_split_by_class_ignoring_test_flag(tmp_path):
    records = [(1, 1), (1, 0), (98, 1), (99, 0), (196, 1), (150, 0)]
    make_cars(tmp_path, records)
    train, test = Cars196(tmp_path, "train"), Cars196(tmp_path, "test")
    assert train.labels.tolist() == [0, 0, 97]
    assert test.labels.tolist() == [98, 195, 149]
    assert train.paths[0].endswith("car_ims/000001.jpg") and test.paths[2].endswith("car_ims/000006.jpg")
    assert train.bboxes.tolist()[1] == [3, 4, 11, 9]
    image, label = test[1]
    assert image.size == (12, 10) and label == 195


def test_cars_mat_without_required_field(tmp_path):
    import scipy.io

    (tmp_path / "car_ims").mkdir()
    ann = np.zeros((1, 1), dtype=[("relative_im_path", "O"), ("class", "O")])
    ann[0, 0] = ("car_ims/000001.jpg", np.array([[1]]))
    scipy.io.savemat(str(tmp_path / "cars_annos.mat"), {"annotations": ann})
    with pytest.raises(DatasetLayoutError, match=r"lacks fields \['bbox_x1'"):
        Cars196(tmp_path, "train")


def test_cars_missing_mat_listed(tmp_path):
    (tmp_path / "car_ims").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"cars_annos.mat   <-- missing"):
        Cars196(tmp_path, "train")


# ------------------------------------------------------------------------------------------------ SOP --------


def test_sop_labels_are_class_id_minus_one(tmp_path):
    make_sop(tmp_path, [1, 1, 2, 5], [11319, 11320, 11320])
    train = StanfordOnlineProducts(tmp_path, "train")
    test = StanfordOnlineProducts(tmp_path / "Stanford_Online_Products", "test")
    assert train.labels.tolist() == [0, 0, 1, 4]
    assert test.labels.tolist() == [11318, 11319, 11319]
    assert train.super_labels.tolist() == [1, 1, 2, 5]
    assert train[3][1] == 4 and train[3][0].mode == "RGB"


def test_sop_header_checked(tmp_path):
    base = make_sop(tmp_path, [1], [11319], images=False)
    text = (base / "Ebay_train.txt").read_text().splitlines()
    (base / "Ebay_train.txt").write_text("\n".join(text[1:]) + "\n")  # header dropped
    with pytest.raises(DatasetLayoutError, match="must start with the header"):
        StanfordOnlineProducts(tmp_path, "train")


# ------------------------------------------------------------------------------------------------ In-Shop ----


def test_inshop_query_gallery_share_one_label_map(tmp_path):
    # Not path-sorted: the first-appearance order of items differs between query and gallery, which breaks
    # per-split labelling (IAA) but not a shared map.
    rows = [
        ("id_00000009", "train"),
        ("id_00000003", "train"),
        ("id_00000009", "train"),
        ("id_00000050", "query"),
        ("id_00000020", "query"),
        ("id_00000070", "query"),
        ("id_00000020", "gallery"),
        ("id_00000070", "gallery"),
        ("id_00000050", "gallery"),
        ("id_00000060", "gallery"),
    ]
    make_inshop(tmp_path, rows)
    train, query, gallery = (InShop(tmp_path, s) for s in ("train", "query", "gallery"))
    assert train.labels.tolist() == [1, 0, 1]
    assert len(query) == 3 and len(gallery) == 4
    q = dict(zip(query.item_ids, query.labels.tolist()))
    g = dict(zip(gallery.item_ids, gallery.labels.tolist()))
    assert all(q[item] == g[item] for item in q)
    assert q == {"id_00000020": 0, "id_00000050": 1, "id_00000070": 3} and g["id_00000060"] == 2
    assert query[0][1] == 1 and query.paths[0].endswith("img/WOMEN/Dresses/id_00000050/03_1_front.jpg")


def test_inshop_count_line_must_match(tmp_path):
    make_inshop(tmp_path, [("id_00000001", "train"), ("id_00000002", "query")], images=False, count=3)
    with pytest.raises(DatasetLayoutError, match="declares 3 images on line 1 but lists 2"):
        InShop(tmp_path, "train")


def test_inshop_bad_status_names_line(tmp_path):
    make_inshop(tmp_path, [("id_00000001", "train"), ("id_00000002", "validation")], images=False)
    with pytest.raises(DatasetLayoutError, match=r"list_eval_partition.txt:4"):
        InShop(tmp_path, "query")


def test_inshop_missing_partition_file(tmp_path):
    (tmp_path / "img").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"Eval/list_eval_partition.txt   <-- missing"):
        InShop(tmp_path, "gallery")


# ------------------------------------------------------------------------------------------------ published --


def test_published_sizes_cub(tmp_path):
    make_cub_published(tmp_path)
    train, test = CUB200(tmp_path, "train"), CUB200(tmp_path, "test")
    assert (len(train), len(test)) == (5864, 5924)
    assert (train.num_classes, test.num_classes) == (100, 100)
    assert not set(train.labels.tolist()) & set(test.labels.tolist())


def test_published_sizes_cars(tmp_path):
    make_cars_published(tmp_path)
    train, test = Cars196(tmp_path, "train"), Cars196(tmp_path, "test")
    assert (len(train), len(test)) == (8054, 8131)
    assert (train.num_classes, test.num_classes) == (98, 98)
    assert train.labels.max() == 97 and test.labels.min() == 98


def test_published_sizes_sop(tmp_path):
    make_sop_published(tmp_path)
    train, test = StanfordOnlineProducts(tmp_path, "train"), StanfordOnlineProducts(tmp_path, "test")
    assert (len(train), len(test)) == (59551, 60502)
    assert (train.num_classes, test.num_classes) == (11318, 11316)
    assert (train.labels.min(), train.labels.max(), test.labels.min(), test.labels.max()) == (
        0,
        11317,
        11318,
        22633,
    )


def test_published_sizes_inshop(tmp_path):
    make_inshop_published(tmp_path)
    train, query, gallery = (InShop(tmp_path, s) for s in ("train", "query", "gallery"))
    assert (len(train), len(query), len(gallery)) == (25882, 14218, 12612)
    assert train.num_classes == 3997
    assert len(set(query.labels.tolist()) | set(gallery.labels.tolist())) == 3985


# ------------------------------------------------------------------------------------------------ bad images -


def _cub_with_bad(tmp_path, truncated=False):
    base = make_cub(tmp_path, {1: 3, 2: 2, 101: 1})
    bad = base / "images" / CUB200(tmp_path, "train").paths[1].split("/images/")[1]
    corrupt_file(bad, truncated=truncated)
    return bad


@pytest.mark.parametrize("truncated", [False, True])
def test_bad_image_error_names_file(tmp_path, truncated):
    bad = _cub_with_bad(tmp_path, truncated)
    ds = CUB200(tmp_path, "train")
    ds[0]
    with pytest.raises(BadImageError, match=str(bad.name)):
        ds[1]


def test_bad_image_skip_substitutes_same_class_and_counts(tmp_path):
    bad = _cub_with_bad(tmp_path)
    ds = CUB200(tmp_path, "train", on_bad_image="skip")
    _, label = ds[1]
    assert label == 0  # substitute from the same class
    assert ds.num_bad_images == 1 and ds.bad_images == [str(bad)]
    ds[1]
    assert ds.num_bad_images == 1  # counted once
    assert len(ds) == 5


def test_verify_images_drops_bad_files_when_skipping(tmp_path):
    bad = _cub_with_bad(tmp_path)
    ds = CUB200(tmp_path, "train", on_bad_image="skip")
    assert ds.verify_images() == [str(bad)]
    assert len(ds) == 4 and str(bad) not in ds.paths and ds.labels.tolist() == [0, 0, 1, 1]
    with pytest.raises(BadImageError, match=bad.name):
        CUB200(tmp_path, "train").verify_images()


def test_class_without_readable_image_raises(tmp_path):
    base = make_cub(tmp_path, {1: 1, 101: 1})
    corrupt_file(next((base / "images").glob("001.*/*.jpg")))
    ds = CUB200(tmp_path, "train", on_bad_image="skip")
    with pytest.raises(BadImageError, match="every image of class 0"):
        ds[0]


def test_missing_image_file_is_a_bad_image(tmp_path):
    base = make_cub(tmp_path, {1: 1, 101: 1}, images=False)
    with pytest.raises(BadImageError, match="cannot read image"):
        CUB200(base, "test")[0]


# ------------------------------------------------------------------------------------------------ registry ---


def test_registry_and_build_dataset(tmp_path):
    assert set(DATASETS) == {"cub200", "cars196", "sop", "inshop", "folder", "csv"}
    tiny_jpeg(tmp_path / "a" / "x.jpg")
    tiny_jpeg(tmp_path / "b" / "y.jpg")
    assert len(build_dataset("folder", tmp_path, "train")) == 1
    with pytest.raises(KeyError, match="known: "):
        build_dataset("imagenet", tmp_path, "train")
