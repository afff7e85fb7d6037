"""``ModelConfig``: the ``model:`` section of an experiment config (backbone, weights, embedding head).

Plain dataclass, no torch: :mod:`deepmetric.training.config` composes it into the experiment config and checks
``Literal`` fields and ``metadata`` bounds on load; :mod:`deepmetric.models.head` takes its allowed values from
the ``Literal`` types defined here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# avg / max / avg+max / gem pool a CNN feature map over its positions or a ViT's patch tokens (prefix tokens
# left out); cls takes a ViT's class token. avg+max is the sum of both (Proxy-Anchor's code).
Pooling = Literal["avg", "max", "avg+max", "gem", "cls"]
BNPolicy = Literal["train", "freeze_stats", "freeze_stats_and_affine"]
HeadInit = Literal["default", "kaiming_fan_out"]


@dataclass
class ModelConfig:
    backbone: str = "kanji_cnn"  # kanji_cnn | bninception | googlenet | resnet50 | mobilenet_v2 | timm:<name>
    # local weight file; "imagenet" fetches through torchvision/timm when online (for timm:<model>.<tag>: the
    # weights of that tag, e.g. DINO's; "timm" is a synonym)
    pretrained: str | None = None
    embedding_size: int = field(default=128, metadata={"min": 1})
    # false: no Linear after pooling, the pooled features are the embedding (embedding_size must equal their width)
    projection: bool = True
    pooling: Pooling = "avg"
    gem_p: float = field(default=3.0, metadata={"min": 1.0})  # GeM exponent (learned), pooling=gem only
    bn_policy: BNPolicy = "train"
    head_init: HeadInit = "default"
    normalize: bool = True  # L2-normalise the embedding
    last_stride_one: bool = False  # ResNet layer4 stride 1 (XBM)
    width: int = field(default=32, metadata={"min": 1})  # kanji_cnn base channel width
    # token (ViT) backbones: input resolution the position embeddings are made for (pretrained ones are resampled;
    # other sizes still run, interpolated); None = the model's own (224, DINOv2: 518)
    image_size: int | None = field(default=None, metadata={"min": 1})
    freeze_blocks: int = field(default=0, metadata={"min": 0})  # token backbones: patch embedding + first N blocks
