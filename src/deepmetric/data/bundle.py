"""The datasets of an experiment (``DataConfig`` → :class:`DataBundle`).

For a benchmark/folder/CSV dataset (:func:`build_benchmark_data`):

* train: the ``train`` split minus a class-disjoint validation slice (the last ``validation_fraction`` of the
  sorted classes, so model selection never sees test classes); labels re-ranked to 0..C−1.
* validation: that slice with the evaluation transform (a CSV's own ``validation`` rows take precedence).
* test: the ``test`` split (CUB, Cars, SOP, folder, CSV); In-Shop gets ``query``/``gallery`` instead.
* train_eval: the training part with the evaluation transform.

The embedded KanjiGlyphs splits itself by class (:mod:`deepmetric.data.kanji`). ``max_classes`` keeps the first
N sorted classes of every split (quick runs).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from deepmetric.config_errors import ConfigError
from deepmetric.data.config import DataConfig
from deepmetric.data.csv_dataset import CSVDataset
from deepmetric.data.datasets import DATASETS
from deepmetric.data.image_dataset import ImageListDataset, LabelledSubset
from deepmetric.data.kanji import KanjiGlyphs
from deepmetric.data.splits import class_disjoint_split
from deepmetric.data.transforms import get_transform


@dataclass
class DataBundle:
    """Datasets of one experiment. ``query``/``gallery`` are set for query→gallery benchmarks (In-Shop)."""

    train: Dataset
    validation: Dataset | None
    test: Dataset | None
    query: Dataset | None = None
    gallery: Dataset | None = None
    train_eval: Dataset | None = None  # the training split with the evaluation transform (IAA estimation)
    # unreadable / missing / empty image files left out under data.on_bad_image=skip
    skipped_images: list[str] = field(default_factory=list)

    def skipped_message(self) -> str:
        shown = ", ".join(self.skipped_images[:3]) + (" …" if len(self.skipped_images) > 3 else "")
        return f"data: skipped {len(self.skipped_images)} unreadable image file(s) (data.on_bad_image=skip): {shown}"

    @property
    def num_train_classes(self) -> int:
        return len(set(dataset_labels(self.train).tolist()))


def dataset_labels(dataset: Dataset) -> Tensor:
    """The ``labels`` array every dataset of the library exposes, as int64 (samplers and losses need it)."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        raise ConfigError(f"dataset {type(dataset).__name__} must expose a `labels` array")
    return torch.as_tensor(labels, dtype=torch.int64)


def build_transform(name: str, backbone: str | None = None, dataset: str | None = None) -> Any:
    """A transform preset by name; the colour convention follows the backbone (BN-Inception: BGR 0–255)."""
    try:
        return get_transform(name, backbone=backbone, dataset=dataset)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"data transform: {exc.args[0]}") from exc


def build_data(cfg: DataConfig, seed: int = 0, backbone: str | None = None) -> DataBundle:
    """The train / validation / test datasets of ``cfg`` with its transforms (colour convention of ``backbone``)."""
    train_tf = build_transform(cfg.train_transform, backbone, cfg.dataset)
    eval_tf = build_transform(cfg.eval_transform, backbone, cfg.dataset)
    if cfg.dataset == "kanji_glyphs":

        def make(split: str, tf: Any) -> Dataset:
            return KanjiGlyphs(split=split, transform=tf, validation_fraction=cfg.validation_fraction,
                               max_classes=cfg.max_classes)

        return DataBundle(
            train=make("train", train_tf),
            validation=make("val", eval_tf) if cfg.validation_fraction > 0 else None,
            test=make("test", eval_tf),
            train_eval=make("train", eval_tf),
        )
    return DataBundle(**build_benchmark_data(cfg, train_tf, eval_tf, seed=seed, verify=True))


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
    verify: bool = False,
) -> dict[str, Any]:
    """Datasets for ``cfg.dataset`` in ``DATASETS``: ``{train, validation, test, query, gallery, train_eval}``,
    the fields of :class:`DataBundle`. ``seed`` is unused: the validation classes are the last ones,
    deterministically. ``verify`` stats every image file at load (missing / empty files are errors naming them,
    or are left out under ``on_bad_image="skip"``, which also decodes every file once to leave out unreadable
    ones); the left-out files are listed in ``skipped_images``."""
    del seed
    name = cfg.dataset
    if name not in DATASETS:
        raise ConfigError(
            f"data.dataset: unknown dataset {name!r}; known: {sorted(DATASETS)} (and kanji_glyphs)"
        )
    if cfg.root is None:
        raise ConfigError(f"data.root: dataset {name!r} needs the folder (or CSV file) it lives in: pass "
                          "--data PATH (or --set data.root=PATH)")
    cls = DATASETS[name]
    options: dict[str, Any] = {"on_bad_image": cfg.on_bad_image}
    if cls is CSVDataset:
        options["allow_duplicates"] = cfg.allow_duplicate_paths
    skipped: list[str] = []

    def load(split: str | None, tf: Callable[[Any], Any] | None) -> ImageListDataset:
        dataset = cls(cfg.root, split, transform=tf, **options)
        if not verify:
            return dataset
        # missing files surface now, not at the first batch or evaluation that reads them
        skipped.extend(dataset.check_files())
        if cfg.on_bad_image == "skip":
            skipped.extend(dataset.verify_images())  # removed up front, so samplers only see readable files
        return dataset

    def twin(dataset: ImageListDataset, tf: Callable[[Any], Any] | None) -> ImageListDataset:
        other = copy.copy(dataset)  # same (checked) files, another transform
        other.transform = tf
        return other

    train_full = load("train", train_tf)
    train_full_eval = twin(train_full, eval_tf)
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
    elif isinstance(train_full, CSVDataset) and not _csv_has_split(train_full, "test"):
        raise ConfigError(f"data.root: {train_full.csv_path} has no rows with split 'test', so there is "
                          "nothing to evaluate the trained model on; add test rows (classes unseen in training)")
    else:
        test = load("test", eval_tf)
        idx = _first_classes(test, cfg.max_classes)
        parts["test"] = LabelledSubset(test, idx)
        if isinstance(test, CSVDataset) and not (test.is_query.all() and test.is_gallery.all()):
            parts["query"] = LabelledSubset(test, idx[test.is_query[idx]])
            parts["gallery"] = LabelledSubset(test, idx[test.is_gallery[idx]])
    parts["skipped_images"] = skipped
    return parts


def _csv_has_split(dataset: CSVDataset, split: str) -> bool:
    return split in dataset.available_splits
