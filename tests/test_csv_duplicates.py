"""Duplicated image paths in a CSV dataset are refused (they inflate metrics), naming the file and both lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepmetric.data.csv_dataset import CSVDataset, CSVFormatError


def _write(root: Path, rows: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    csv_path = root / "df.csv"
    csv_path.write_text("path,label,split\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return csv_path


def test_duplicate_rows_within_a_split_are_refused(tmp_path: Path) -> None:
    csv_path = _write(tmp_path, ["a.png,0,train", "b.png,1,test", "c.png,2,test", "b.png,1,test"])
    with pytest.raises(CSVFormatError, match=r"df\.csv:5: .*b\.png is listed twice in split 'test' \(first at line 3\)"):
        CSVDataset(csv_path, split="test")


def test_the_same_path_in_train_and_test_is_refused_whatever_split_is_read(tmp_path: Path) -> None:
    csv_path = _write(tmp_path, ["a.png,0,train", "x/../a.png,0,test", "c.png,2,test"])
    for split in ("train", "test", None):
        with pytest.raises(CSVFormatError, match=r"in splits 'train' and 'test'"):
            CSVDataset(csv_path, split=split)


def test_allow_duplicates_accepts_them_with_a_warning(tmp_path: Path) -> None:
    csv_path = _write(tmp_path, ["a.png,0,train", "b.png,1,test", "b.png,1,test"])
    with pytest.warns(UserWarning, match="listed twice"):
        dataset = CSVDataset(csv_path, split="test", allow_duplicates=True)
    assert len(dataset) == 2


def test_distinct_paths_load(tmp_path: Path) -> None:
    csv_path = _write(tmp_path, ["a.png,0,train", "b.png,1,test", "c.png,1,test"])
    assert len(CSVDataset(csv_path, split="test")) == 2
