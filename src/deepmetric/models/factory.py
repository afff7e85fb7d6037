"""``build_model``: a :class:`~deepmetric.training.config.ModelConfig` → backbone + embedding head.

Takes any object with the ModelConfig fields (duck-typed, so ``models/`` does not import ``training/``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deepmetric.models.backbones import build_backbone
from deepmetric.models.head import EmbeddingHead, EmbeddingModel

if TYPE_CHECKING:
    from deepmetric.training.config import ModelConfig


def build_model(config: ModelConfig, in_channels: int | None = None) -> EmbeddingModel:
    """Backbone (``config.backbone``, weights ``config.pretrained``) → pooling → Linear → optional L2.

    ``pooling``, ``bn_policy``, ``head_init`` and ``normalize`` are independent flags (methods.md §1.3);
    ``last_stride_one`` is passed only to ResNets, ``width`` and ``in_channels`` (default 1) only to
    ``kanji_cnn``; the image backbones take 3 channels.
    """
    options: dict[str, object] = {}
    if config.backbone == "kanji_cnn":
        options["width"] = config.width
        options["in_channels"] = 1 if in_channels is None else in_channels
    elif in_channels not in (None, 3):
        raise ValueError(
            f"model.backbone {config.backbone!r} takes 3-channel images, got in_channels={in_channels}"
        )
    if config.last_stride_one:
        options["last_stride_one"] = True
    backbone = build_backbone(config.backbone, pretrained=config.pretrained, **options)
    out_channels = getattr(backbone, "out_channels", None)
    if not isinstance(out_channels, int):
        raise TypeError(f"backbone {config.backbone!r} does not expose an integer out_channels")
    head = EmbeddingHead(
        out_channels,
        config.embedding_size,
        pooling=config.pooling,
        normalize=config.normalize,
        init=config.head_init,
    )
    return EmbeddingModel(backbone, head, bn_policy=config.bn_policy)
