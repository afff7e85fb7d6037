"""Binomial deviance loss (Yi, Lei, Liao, Li, "Deep Metric Learning for Person Re-identification", ICPR 2014)."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from deepmetric.functional import cosine_similarity_matrix, masked_mean, zero_loss
from deepmetric.losses.base import MetricLoss, Mined, pair_masks


class BinomialDevianceLoss(MetricLoss):
    r"""Binomial deviance on cosine similarities, as in Deep_Metric ``losses/Binomial.py``:

        L_i = mean_{j∈P_i} softplus(−β(S_ij − m)) + mean_{k∈N_i} softplus(α(S_ik − m)),   L = Σ_i L_i / B

    Defaults α = 40 (negative scale), β = 2 (positive scale), m = 0.5. softplus keeps it stable for large α.
    An empty set contributes 0. ``reduction="contributing"`` divides by the number of anchors that have at
    least one pair instead of B. Deviations: no hard-mining branch (that branch of the code divides by a β
    whose default is 0); pass ``mined=`` from a miner instead. Self-pairs are removed by index.
    """

    accepts_mined = True

    def __init__(
        self,
        alpha: float = 40.0,
        beta: float = 2.0,
        margin: float = 0.5,
        *,
        reduction: Literal["batch", "contributing"] = "batch",
    ) -> None:
        super().__init__()
        if reduction not in ("batch", "contributing"):
            raise ValueError(f"BinomialDevianceLoss.reduction must be 'batch' or 'contributing', got {reduction!r}")
        self.alpha, self.beta, self.margin, self.reduction = float(alpha), float(beta), float(margin), reduction

    def compute(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, mined: Mined | None = None,
    ) -> Tensor:
        pos, neg = pair_masks(labels, ref_labels, ignore_mask, mined)
        has = pos.any(1) | neg.any(1)
        if not bool(has.any()):
            return zero_loss(embeddings, ref_embeddings)
        s = cosine_similarity_matrix(embeddings, ref_embeddings)
        per_anchor = masked_mean(F.softplus(-self.beta * (s - self.margin)), pos, 1) + masked_mean(
            F.softplus(self.alpha * (s - self.margin)), neg, 1
        )
        denom = embeddings.shape[0] if self.reduction == "batch" else int(has.sum())
        return per_anchor.sum() / denom
