"""``ModelConfig``: the ``model:`` section of an experiment config (backbone, weights, embedding head).

Plain dataclass, no torch: :mod:`deepmetric.training.config` composes it into the experiment config and checks
``Literal`` fields and ``metadata`` bounds on load; :mod:`deepmetric.models.head` takes its allowed values from
the ``Literal`` types defined here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Pooling = Literal["avg", "max", "avg+max"]
BNPolicy = Literal["train", "freeze_stats", "freeze_stats_and_affine"]
HeadInit = Literal["default", "kaiming_fan_out"]


@dataclass
class ModelConfig:
    backbone: str = "kanji_cnn"  # kanji_cnn | bninception | googlenet | resnet50 | mobilenet_v2 | timm:<name>
    pretrained: str | None = None  # local weight file; "imagenet" fetches through torchvision/timm when online
    embedding_size: int = field(default=128, metadata={"min": 1})
    pooling: Pooling = "avg"
    bn_policy: BNPolicy = "train"
    head_init: HeadInit = "default"
    normalize: bool = True  # L2-normalise the embedding
    last_stride_one: bool = False  # ResNet layer4 stride 1 (XBM)
    width: int = field(default=32, metadata={"min": 1})  # kanji_cnn base channel width
