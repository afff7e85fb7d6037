"""Datasets (embedded KanjiGlyphs, benchmarks, folder, CSV), class-disjoint splits, samplers, transforms."""

from deepmetric.data.bundle import (
    DataBundle,
    build_benchmark_data,
    build_data,
    build_transform,
    dataset_labels,
)
from deepmetric.data.config import DataConfig
from deepmetric.data.csv_dataset import CSVDataset, CSVFormatError
from deepmetric.data.datasets import (
    CUB200,
    DATASETS,
    Cars196,
    InShop,
    StanfordOnlineProducts,
    build_dataset,
)
from deepmetric.data.folder import ImageFolderDataset
from deepmetric.data.image_dataset import BadImageError, DatasetLayoutError, ImageListDataset, LabelledSubset
from deepmetric.data.kanji import KanjiArchiveError, KanjiGlyphs, kanji_eval_transform, kanji_train_transform
from deepmetric.data.samplers import MPerClassBatchSampler, RandomBatchSampler, build_sampler
from deepmetric.data.splits import class_disjoint_split, indices_of_classes, reality_check_folds
from deepmetric.data.transforms import input_channels

__all__ = [
    "CUB200",
    "DATASETS",
    "BadImageError",
    "CSVDataset",
    "CSVFormatError",
    "Cars196",
    "DataBundle",
    "DataConfig",
    "DatasetLayoutError",
    "ImageFolderDataset",
    "ImageListDataset",
    "InShop",
    "KanjiArchiveError",
    "KanjiGlyphs",
    "LabelledSubset",
    "MPerClassBatchSampler",
    "RandomBatchSampler",
    "StanfordOnlineProducts",
    "build_benchmark_data",
    "build_data",
    "build_dataset",
    "build_sampler",
    "build_transform",
    "class_disjoint_split",
    "dataset_labels",
    "indices_of_classes",
    "input_channels",
    "kanji_eval_transform",
    "kanji_train_transform",
    "reality_check_folds",
]
