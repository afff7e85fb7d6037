"""Embedding head: global pooling → linear projection → optional L2, plus the BN-freezing policies.

The pooling, BN policy, head initialisation and normalisation are independent flags because the seed papers
combine them differently (methods.md §1.3): GMP (MS, XBM), GAP (MDR), GAP+GMP summed (Proxy-Anchor, IAA);
BN "frozen" meaning running statistics only (MS, MDR, IAA, DAS) or statistics and affine (Proxy-Anchor).
"""

from __future__ import annotations

from typing import get_args

import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric.models.config import BNPolicy, HeadInit, Pooling

POOLINGS: tuple[str, ...] = get_args(Pooling)
BN_POLICIES: tuple[str, ...] = get_args(BNPolicy)
HEAD_INITS: tuple[str, ...] = get_args(HeadInit)


def global_pool(x: Tensor, pooling: str) -> Tensor:
    """(B, C, H, W) → (B, C). ``avg+max`` is the *sum* of both, as in Proxy-Anchor's code."""
    if x.dim() == 2:
        return x
    if pooling == "avg":
        return F.adaptive_avg_pool2d(x, 1).flatten(1)
    if pooling == "max":
        return F.adaptive_max_pool2d(x, 1).flatten(1)
    if pooling == "avg+max":
        return F.adaptive_avg_pool2d(x, 1).flatten(1) + F.adaptive_max_pool2d(x, 1).flatten(1)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


class EmbeddingHead(nn.Module):
    """pool → Linear(in_features → embedding_size) → L2 (if ``normalize``)."""

    def __init__(
        self,
        in_features: int,
        embedding_size: int,
        pooling: str = "avg",
        normalize: bool = True,
        init: str = "default",
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if init not in HEAD_INITS:
            raise ValueError(f"head init must be one of {HEAD_INITS}, got {init!r}")
        self.pooling = pooling
        self.normalize = normalize
        self.linear = nn.Linear(in_features, embedding_size)
        if init == "kaiming_fan_out":
            nn.init.kaiming_normal_(self.linear.weight, mode="fan_out")
            nn.init.zeros_(self.linear.bias)

    def forward(self, features: Tensor) -> Tensor:
        z = self.linear(global_pool(features, self.pooling))
        return F.normalize(z, dim=-1) if self.normalize else z


def apply_bn_policy(module: nn.Module, policy: str) -> None:
    """Put BatchNorm layers of ``module`` in the state ``policy`` asks for; call after every ``.train()``.

    ``freeze_stats``: BN layers in eval mode (running statistics fixed), γ/β still trained.
    ``freeze_stats_and_affine``: additionally γ/β get ``requires_grad=False``.
    """
    if policy not in BN_POLICIES:
        raise ValueError(f"bn_policy must be one of {BN_POLICIES}, got {policy!r}")
    if policy == "train":
        return
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            if policy == "freeze_stats_and_affine":
                for p in m.parameters(recurse=False):
                    p.requires_grad_(False)


class EmbeddingModel(nn.Module):
    """backbone → head, with the BN policy re-applied whenever the model is put in training mode."""

    def __init__(self, backbone: nn.Module, head: EmbeddingHead, bn_policy: str = "train") -> None:
        super().__init__()
        if bn_policy not in BN_POLICIES:
            raise ValueError(f"bn_policy must be one of {BN_POLICIES}, got {bn_policy!r}")
        self.backbone = backbone
        self.head = head
        self.bn_policy = bn_policy
        apply_bn_policy(self.backbone, bn_policy)

    def train(self, mode: bool = True) -> EmbeddingModel:
        super().train(mode)
        if mode:
            apply_bn_policy(self.backbone, self.bn_policy)
        return self

    def features(self, x: Tensor) -> Tensor:
        """Pooled backbone features (before the projection), used by feature-space synthesis (SGAR)."""
        return global_pool(self.backbone(x), self.head.pooling)

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Embeddings; with ``return_features`` also the pooled backbone features (one pass, so a
        DistributedDataParallel wrapper sees the whole computation)."""
        if not return_features:
            return self.head(self.backbone(x))
        features = global_pool(self.backbone(x), self.head.pooling)
        return self.head(features), features
