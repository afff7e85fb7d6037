"""Assemble the datasets of an experiment on a benchmark/folder/CSV dataset (``DataConfig`` → bundle).

* train: the ``train`` split minus a class-disjoint validation slice (the last ``validation_fraction`` of the
  sorted classes, so model selection never sees test classes); labels re-ranked to 0..C−1.
* validation: that slice with the evaluation transform (a CSV's own ``validation`` rows take precedence).
* test: the ``test`` split (CUB, Cars, SOP, folder, CSV); In-Shop gets ``query``/``gallery`` instead.
* train_eval: the training part with the evaluation transform.

``max_classes`` keeps the first N sorted classes of every split (quick runs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from deepmetric.data.csv_dataset import CSVDataset
from deepmetric.data.datasets import DATASETS
from deepmetric.data.image_dataset import ImageListDataset, LabelledSubset
from deepmetric.data.splits import class_disjoint_split

if TYPE_CHECKING:
    from deepmetric.training.config import DataConfig


def _first_classes(dataset: ImageListDataset, max_classes: int | None) -> np.ndarray:
    if max_classes is None:
        return np.arange(len(dataset))
    keep = np.unique(dataset.labels)[:max_classes]
    return np.flatnonzero(np.isin(dataset.labels, keep))


def build_benchmark_data(
    cfg: DataConfig,
    train_tf: Callable[[Any], Any] | None,
    eval_tf: Callable[[Any], Any] | None,
    seed: int = 0,
    bundle_type: Callable[..., Any] | None = None,
) -> Any:
    """Datasets for ``cfg.dataset`` in ``DATASETS``; returns ``bundle_type(train=…, validation=…, test=…,
    query=…, gallery=…, train_eval=…)`` (a dict when ``bundle_type`` is None). ``seed`` is unused: the
    validation classes are the last ones, deterministically."""
    del seed
    name = cfg.dataset
    if name not in DATASETS:
        raise KeyError(
            f"data.dataset: unknown dataset {name!r}; known: {sorted(DATASETS)} (and kanji_glyphs)"
        )
    if cfg.root is None:
        raise ValueError(f"data.root: dataset {name!r} needs the folder (or CSV file) it lives in")
    cls = DATASETS[name]

    def load(split: str | None, tf: Callable[[Any], Any] | None) -> ImageListDataset:
        return cls(cfg.root, split, transform=tf)

    train_full, train_full_eval = load("train", train_tf), load("train", eval_tf)
    keep = _first_classes(train_full, cfg.max_classes)
    validation = None
    own_validation = isinstance(train_full, CSVDataset) and _csv_has_split(train_full, "validation")
    if own_validation:
        val_set = load("validation", eval_tf)
        validation = LabelledSubset(val_set, _first_classes(val_set, cfg.max_classes))
    elif cfg.validation_fraction > 0:
        tr, va = class_disjoint_split(train_full.labels[keep], cfg.validation_fraction, seed="last")
        validation = LabelledSubset(train_full_eval, keep[va])
        keep = keep[tr]
    parts: dict[str, Any] = {
        "train": LabelledSubset(train_full, keep, relabel=True),
        "validation": validation,
        "train_eval": LabelledSubset(train_full_eval, keep, relabel=True),
        "test": None,
        "query": None,
        "gallery": None,
    }
    if name == "inshop":
        for split in ("query", "gallery"):
            ds = load(split, eval_tf)
            parts[split] = LabelledSubset(ds, _first_classes(ds, cfg.max_classes))
    elif not isinstance(train_full, CSVDataset) or _csv_has_split(train_full, "test"):
        test = load("test", eval_tf)
        idx = _first_classes(test, cfg.max_classes)
        parts["test"] = LabelledSubset(test, idx)
        if isinstance(test, CSVDataset) and not (test.is_query.all() and test.is_gallery.all()):
            parts["query"] = LabelledSubset(test, idx[test.is_query[idx]])
            parts["gallery"] = LabelledSubset(test, idx[test.is_gallery[idx]])
    return bundle_type(**parts) if bundle_type is not None else parts


def _csv_has_split(dataset: CSVDataset, split: str) -> bool:
    return split in dataset.available_splits
