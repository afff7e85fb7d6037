"""Backbones (BN-Inception, torchvision, timm, KanjiCNN), embedding head, pretrained-weight loading."""

from deepmetric.models.backbones import (
    BACKBONES,
    BNInceptionBackbone,
    TimmBackbone,
    TorchvisionBackbone,
    build_backbone,
)
from deepmetric.models.bninception import BNInception
from deepmetric.models.config import ModelConfig
from deepmetric.models.factory import build_configured_backbone, build_model
from deepmetric.models.head import EmbeddingHead, EmbeddingModel, apply_bn_policy, global_pool
from deepmetric.models.kanji_cnn import KanjiCNN
from deepmetric.models.pretrained import (
    PretrainedWeightsError,
    load_weights,
    resolve_imagenet_file,
    resolve_timm_weights,
)
from deepmetric.models.timm_backbone import is_token_model, layer_decay_groups

__all__ = [
    "BACKBONES",
    "BNInception",
    "BNInceptionBackbone",
    "EmbeddingHead",
    "EmbeddingModel",
    "KanjiCNN",
    "ModelConfig",
    "PretrainedWeightsError",
    "TimmBackbone",
    "TorchvisionBackbone",
    "apply_bn_policy",
    "build_backbone",
    "build_configured_backbone",
    "build_model",
    "global_pool",
    "is_token_model",
    "layer_decay_groups",
    "load_weights",
    "resolve_imagenet_file",
    "resolve_timm_weights",
]
