"""ImageFolder and CSV-contract datasets, class-disjoint splits, Reality-Check folds, the experiment bundle."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from fixtures_layouts import make_cub, make_inshop, tiny_jpeg

from deepmetric.data import (
    CSVDataset,
    CSVFormatError,
    DatasetLayoutError,
    ImageFolderDataset,
    build_benchmark_data,
    class_disjoint_split,
    reality_check_folds,
)

# ------------------------------------------------------------------------------------------------ folder -----


def _folder(root, classes=("ant", "bee", "cat", "dog", "eel"), n=2):
    for c in classes:
        for j in range(n):
            tiny_jpeg(root / c / f"{j}.jpg")
    (root / classes[0] / "notes.txt").write_text("not an image")
    return root


def test_folder_all_and_zero_shot_halves(tmp_path):
    _folder(tmp_path)
    all_ = ImageFolderDataset(tmp_path)
    assert len(all_) == 10 and all_.class_names == ["ant", "bee", "cat", "dog", "eel"]
    train, test = ImageFolderDataset(tmp_path, "train"), ImageFolderDataset(tmp_path, "test")
    assert sorted(set(train.labels.tolist())) == [0, 1, 2] and sorted(set(test.labels.tolist())) == [3, 4]
    assert train[0][1] == 0 and train[0][0].size == (12, 10)


def test_folder_with_split_subfolders(tmp_path):
    _folder(tmp_path / "train", ("a", "b"))
    _folder(tmp_path / "test", ("c",), n=3)
    assert len(ImageFolderDataset(tmp_path, "train")) == 4
    test = ImageFolderDataset(tmp_path, "test")
    assert len(test) == 3 and test.class_names == ["c"]


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="not a folder"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DatasetLayoutError, match="no images found"):
        ImageFolderDataset(tmp_path)


# ------------------------------------------------------------------------------------------------ CSV --------


def _csv(tmp_path, body, header="label,path,split,is_query,is_gallery"):
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"):
        tiny_jpeg(tmp_path / "imgs" / name)
    (tmp_path / "df.csv").write_text(header + "\n" + body)
    return tmp_path / "df.csv"


def test_csv_contract_paths_splits_query_gallery(tmp_path):
    path = _csv(
        tmp_path,
        "0,imgs/a.jpg,train,,\n0,imgs/b.jpg,train,,\n5,imgs/c.jpg,test,True,False\n5,imgs/d.jpg,test,0,1\n",
    )
    train = CSVDataset(path, "train")
    assert train.paths == [str(tmp_path / "imgs/a.jpg"), str(tmp_path / "imgs/b.jpg")]
    test = CSVDataset(tmp_path, "test")  # the folder holding df.csv also works
    assert test.labels.tolist() == [5, 5]
    assert test.is_query.tolist() == [True, False] and test.is_gallery.tolist() == [False, True]
    assert test.available_splits == ("train", "test")
    assert len(CSVDataset(path)) == 4
    assert test[1][1] == 5


def test_csv_images_root_and_absolute_paths(tmp_path):
    other = tmp_path / "elsewhere"
    tiny_jpeg(other / "x.jpg")
    path = _csv(
        tmp_path, f"1,x.jpg,train\n2,{tmp_path / 'imgs' / 'a.jpg'},validation\n", header="label,path,split"
    )
    ds = CSVDataset(path, images_root=other)
    assert ds.paths == [str(other / "x.jpg"), str(tmp_path / "imgs" / "a.jpg")]
    assert ds.is_query.all() and ds.is_gallery.all()
    assert ds[0][0].size == (12, 10)


@pytest.mark.parametrize(
    ("header", "body", "message"),
    [
        ("label,path", "0,imgs/a.jpg\n", r"missing required column\(s\) \['split'\]"),
        (
            "label,path,split",
            "0,imgs/a.jpg,train\n1,imgs/b.jpg,val\n",
            r"df.csv:3: column 'split' must be one of",
        ),
        ("label,path,split", "zero,imgs/a.jpg,train\n", r"df.csv:2: column 'label' must be an integer"),
        ("label,path,split", "0,,train\n", r"df.csv:2: column 'path' is empty"),
        ("label,path,split,is_query", "0,imgs/a.jpg,test,1\n", "must be given together"),
        (
            "label,path,split,is_query,is_gallery",
            "0,imgs/a.jpg,test,maybe,1\n",
            r"df.csv:2: column 'is_query'",
        ),
    ],
)
def test_csv_errors_name_row_and_column(tmp_path, header, body, message):
    path = _csv(tmp_path, body, header=header)
    with pytest.raises(CSVFormatError, match=message):
        CSVDataset(path)


# ------------------------------------------------------------------------------------------------ splits -----


def test_class_disjoint_split_last_and_seeded():
    labels = np.repeat(np.arange(10), 3)[::-1]
    tr, va = class_disjoint_split(labels, 0.2)
    assert set(labels[va].tolist()) == {8, 9} and len(va) == 6
    assert not set(labels[tr].tolist()) & set(labels[va].tolist())
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(30))
    a = class_disjoint_split(labels, 0.3, seed=1)
    b = class_disjoint_split(labels, 0.3, seed=1)
    assert np.array_equal(a[1], b[1]) and len(set(labels[a[1]].tolist())) == 3
    assert any(not np.array_equal(class_disjoint_split(labels, 0.3, seed=s)[1], a[1]) for s in range(2, 6))
    with pytest.raises(ValueError):
        class_disjoint_split(labels, 1.0)
    with pytest.raises(ValueError):
        class_disjoint_split(np.zeros(4), 0.5)


def test_reality_check_folds_cub_partition():
    folds = reality_check_folds(np.arange(100) + 1000)  # any ids; sorted internally
    assert len(folds) == 4
    for k, (train, val) in enumerate(folds):
        assert len(train) == 75 and len(val) == 25 and not set(train) & set(val)
        # validation block follows the 3/4 training block that starts at floor(k·n/4), wrapping around
        assert val.tolist() == [1000 + (25 * k + 75 + j) % 100 for j in range(25)]
    assert sorted(np.concatenate([v for _, v in folds]).tolist()) == list(range(1000, 1100))


def test_reality_check_folds_not_divisible_matches_mlrc_lengths():
    classes = np.arange(98)[::-1]
    folds = reality_check_folds(classes)
    starts = [0, 24, 49, 73]
    for (train, val), start in zip(folds, starts):
        assert len(train) == 74 and len(val) == 24
        assert set(train.tolist()) == {(start + j) % 98 for j in range(74)}
        assert set(val.tolist()) == {(start + 74 + j) % 98 for j in range(24)}
    assert folds[3][0].tolist()[:2] == [0, 1] and 97 in folds[3][0]  # wrap-around training block
    with pytest.raises(ValueError):
        reality_check_folds([1, 2, 3])


# ------------------------------------------------------------------------------------------------ bundle -----


def _cfg(name, root, **kw):
    base = {"dataset": name, "root": str(root), "validation_fraction": 0.25, "max_classes": None,
            "on_bad_image": "error", "allow_duplicate_paths": False}
    base.update(kw)
    return SimpleNamespace(**base)


def test_bundle_cub_validation_is_class_disjoint_and_train_relabelled(tmp_path):
    make_cub(tmp_path, {1: 2, 2: 2, 3: 1, 4: 2, 101: 1, 102: 1}, images=False)
    b = build_benchmark_data(_cfg("cub200", tmp_path), None, None)
    assert b["train"].labels.tolist() == [0, 0, 1, 1, 2]
    assert b["validation"].labels.tolist() == [3, 3] and len(b["test"]) == 2
    assert b["train_eval"].labels.tolist() == b["train"].labels.tolist()
    assert b["query"] is None and b["gallery"] is None
    small = build_benchmark_data(_cfg("cub200", tmp_path, max_classes=2, validation_fraction=0.0), None, None)
    assert small["validation"] is None and small["train"].labels.tolist() == [0, 0, 1, 1]


def test_bundle_inshop_query_gallery(tmp_path):
    rows = [
        ("id_00000001", "train"),
        ("id_00000002", "train"),
        ("id_00000005", "query"),
        ("id_00000005", "gallery"),
        ("id_00000004", "gallery"),
    ]
    make_inshop(tmp_path, rows, images=False)
    b = build_benchmark_data(_cfg("inshop", tmp_path, validation_fraction=0.5), None, None)
    assert b["test"] is None and b["query"].labels.tolist() == [1]
    assert b["gallery"].labels.tolist() == [1, 0] and len(b["validation"]) == 1
    no_root = SimpleNamespace(dataset="inshop", root=None, validation_fraction=0.0, max_classes=None)
    with pytest.raises(ValueError, match="data.root"):
        build_benchmark_data(no_root, None, None)


def test_bundle_csv_uses_its_validation_rows_and_query_gallery_flags(tmp_path):
    body = (
        "0,imgs/a.jpg,train,,\n1,imgs/b.jpg,train,,\n7,imgs/c.jpg,validation,1,1\n"
        "5,imgs/e.jpg,test,1,0\n5,imgs/d.jpg,test,0,1\n6,imgs/f.jpg,test,0,1\n"
    )
    _csv(tmp_path, body)
    b = build_benchmark_data(_cfg("csv", tmp_path / "df.csv"), None, None)
    assert b["train"].labels.tolist() == [0, 1] and b["validation"].labels.tolist() == [7]
    assert len(b["test"]) == 3 and b["query"].labels.tolist() == [5] and b["gallery"].labels.tolist() == [5, 6]
