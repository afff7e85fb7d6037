"""Embedding head: global pooling → linear projection → optional L2, plus the BN-freezing policies.

The pooling, BN policy, head initialisation and normalisation are independent flags because the seed papers
combine them differently (methods.md §1.3): GMP (MS, XBM), GAP (MDR), GAP+GMP summed (Proxy-Anchor, IAA);
BN "frozen" meaning running statistics only (MS, MDR, IAA, DAS) or statistics and affine (Proxy-Anchor).

Backbones give one of two feature layouts: a CNN map (B, C, H, W), or a ViT token sequence (B, P + N, C) whose
first P are prefix tokens (class token, registers) and the rest patch tokens. ``avg``, ``max``, ``avg+max`` and
``gem`` pool the map's positions or the patch tokens; ``cls`` takes the class token (token layout only).
"""

from __future__ import annotations

from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric.models.config import BNPolicy, HeadInit, Pooling

POOLINGS: tuple[str, ...] = get_args(Pooling)
BN_POLICIES: tuple[str, ...] = get_args(BNPolicy)
HEAD_INITS: tuple[str, ...] = get_args(HeadInit)


GEM_EPS = 1e-6


def gem(x: Tensor, p: Tensor | float, dim: tuple[int, ...]) -> Tensor:
    r"""Generalised mean over ``dim`` (Radenović, Tolias, Chum, TPAMI 2018):

        f = ( 1/|Ω| Σ_{u∈Ω} max(x_u, ε)^p )^{1/p}

    p = 1 is average pooling, p → ∞ max pooling. Values are clamped to ε > 0 first because x^p is undefined for
    negative x and non-integer p; on ViT tokens (signed, after LayerNorm) that keeps only their positive part.
    """
    return x.clamp(min=GEM_EPS).pow(p).mean(dim=dim).pow(1.0 / p)


def global_pool(x: Tensor, pooling: str, num_prefix_tokens: int | None = None, gem_p: Tensor | float = 3.0) -> Tensor:
    """(B, C, H, W) map, or (B, P + N, C) tokens when ``num_prefix_tokens`` = P is given → (B, C).

    ``avg+max`` is the *sum* of both, as in Proxy-Anchor's code; ``cls`` is the first token (tokens only).
    """
    if x.dim() == 2:
        return x
    if num_prefix_tokens is not None:
        if x.dim() != 3:
            raise ValueError(f"token pooling expects (B, tokens, C), got shape {tuple(x.shape)}")
        if pooling == "cls":
            return x[:, 0]
        patches = x[:, num_prefix_tokens:]
        if pooling == "gem":
            return gem(patches, gem_p, dim=(1,))
        avg, top = patches.mean(1) if pooling != "max" else None, patches.amax(1) if pooling != "avg" else None
    else:
        if pooling == "cls":
            raise ValueError("pooling 'cls' needs a token backbone (ViT); a feature map has no class token")
        if pooling == "gem":
            return gem(x, gem_p, dim=(2, 3))
        avg = F.adaptive_avg_pool2d(x, 1).flatten(1) if pooling != "max" else None
        top = F.adaptive_max_pool2d(x, 1).flatten(1) if pooling != "avg" else None
    if pooling not in ("avg", "max", "avg+max"):
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if avg is None:
        return top
    return avg if top is None else avg + top


class EmbeddingHead(nn.Module):
    """pool → Linear(in_features → embedding_size) (if ``projection``) → L2 (if ``normalize``).

    ``num_prefix_tokens``: None for a feature-map backbone, else the number of prefix tokens of its token
    sequence (the features are then tokens). ``gem_p``: initial GeM exponent, a learned parameter (pooling="gem").
    Without ``projection`` the pooled features are the embedding and ``embedding_size`` must be ``in_features``.
    """

    def __init__(
        self,
        in_features: int,
        embedding_size: int,
        pooling: str = "avg",
        normalize: bool = True,
        init: str = "default",
        *,
        projection: bool = True,
        num_prefix_tokens: int | None = None,
        gem_p: float = 3.0,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if init not in HEAD_INITS:
            raise ValueError(f"head init must be one of {HEAD_INITS}, got {init!r}")
        if pooling == "cls" and not num_prefix_tokens:
            raise ValueError("pooling 'cls' needs a token backbone with a class token; use avg, max, avg+max or gem")
        if not projection and embedding_size != in_features:
            raise ValueError(f"without a projection the embedding is the {in_features}-d pooled features; "
                             f"embedding_size is {embedding_size}")
        self.pooling = pooling
        self.normalize = normalize
        self.num_prefix_tokens = num_prefix_tokens
        self.linear: nn.Module = nn.Linear(in_features, embedding_size) if projection else nn.Identity()
        self.gem_p = nn.Parameter(torch.tensor(float(gem_p))) if pooling == "gem" else None
        if projection and init == "kaiming_fan_out":
            nn.init.kaiming_normal_(self.linear.weight, mode="fan_out")
            nn.init.zeros_(self.linear.bias)

    def pool(self, features: Tensor) -> Tensor:
        """The pooled backbone features (B, in_features)."""
        p = self.gem_p if self.gem_p is not None else 3.0
        return global_pool(features, self.pooling, self.num_prefix_tokens, p)

    def project(self, pooled: Tensor) -> Tensor:
        z = self.linear(pooled)
        return F.normalize(z, dim=-1) if self.normalize else z

    def forward(self, features: Tensor) -> Tensor:
        return self.project(self.pool(features))


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
        return self.head.pool(self.backbone(x))

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Embeddings; with ``return_features`` also the pooled backbone features (one pass, so a
        DistributedDataParallel wrapper sees the whole computation)."""
        if not return_features:
            return self.head(self.backbone(x))
        features = self.head.pool(self.backbone(x))
        return self.head.project(features), features
