"""``DataConfig``: the ``data:`` section of an experiment config (datasets, transforms, batch sampling).

Plain dataclass, no torch: :mod:`deepmetric.training.config` composes it into the experiment config and checks
every field on load — ``Literal`` fields against their allowed values, ``metadata`` bounds (``min``, ``below``)
against the value — so the names allowed here are the single listing the samplers use too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# m-per-class sampler variants (methods.md §1.4)
ClassChoice = Literal["uniform_no_replacement", "proportional_to_remaining", "with_replacement", "permutation"]
ImageChoice = Literal["no_replacement_pad", "with_replacement"]
# m_per_class: classes × m images per batch; random: plain shuffling (Proxy-Anchor)
SamplerName = Literal["m_per_class", "random"]
# unreadable image files: stop naming the file, or skip them (counted and reported; see image_dataset.py)
BadImagePolicy = Literal["error", "skip"]


@dataclass
class DataConfig:
    dataset: str = "kanji_glyphs"  # kanji_glyphs | cub200 | cars196 | sop | inshop | folder | csv
    root: str | None = None  # dataset root (not needed for the embedded kanji_glyphs)
    train_transform: str = "kanji_train"  # transform preset name (deepmetric.data.transforms)
    eval_transform: str = "kanji_eval"
    batch_size: int = field(default=64, metadata={"min": 1})
    m_per_class: int = field(default=4, metadata={"min": 1})
    class_choice: ClassChoice = "uniform_no_replacement"
    image_choice: ImageChoice = "no_replacement_pad"
    sampler: SamplerName = "m_per_class"
    num_workers: int = field(default=0, metadata={"min": 0})
    eval_batch_size: int = field(default=256, metadata={"min": 1})
    # class-disjoint slice of the training classes used for model selection
    validation_fraction: float = field(default=0.2, metadata={"min": 0.0, "below": 1.0})
    max_classes: int | None = field(default=None, metadata={"min": 1})  # first N classes of each split
    # sampler "epoch" length in batches (default ⌊N/B⌋); epoch-scheduled methods (IAA start/re-estimation,
    # λ schedule) count these epochs
    batches_per_epoch: int | None = field(default=None, metadata={"min": 1})
    on_bad_image: BadImagePolicy = "error"
    # an image path listed twice in a CSV (within a split or across splits) is refused unless this is set
    allow_duplicate_paths: bool = False
