"""Binomial deviance loss (Yi, Lei, Liao, Li, "Deep Metric Learning for Person Re-identification", ICPR 2014)."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from deepmetric.functional import masked_mean
from deepmetric.losses import reducers
from deepmetric.losses.base import PairLoss, Pairs


class BinomialDevianceLoss(PairLoss):
    r"""Binomial deviance on cosine similarities, as in Deep_Metric ``losses/Binomial.py``:

        L_i = mean_{j∈P_i} softplus(−β(S_ij − m)) + mean_{k∈N_i} softplus(α(S_ik − m)),   L = Σ_i L_i / B

    Defaults α = 40 (negative scale), β = 2 (positive scale), m = 0.5. softplus keeps it stable for large α.
    An empty set contributes 0. ``reduction="contributing"`` divides by the number of anchors that have at
    least one pair instead of B. Deviations: no hard-mining branch (that branch of the code divides by a β
    whose default is 0); pass ``mined=`` from a miner instead. Self-pairs are removed by index.
    """

    metric = "cosine"

    def __init__(
        self,
        alpha: float = 40.0,
        beta: float = 2.0,
        margin: float = 0.5,
        *,
        reduction: Literal["batch", "contributing"] = "batch",
    ) -> None:
        super().__init__()
        self.reduction = reducers.check_reduction("BinomialDevianceLoss", reduction, ("batch", "contributing"))
        self.alpha, self.beta, self.margin = float(alpha), float(beta), float(margin)

    def pair_loss(self, pairs: Pairs, embeddings: Tensor, ref_embeddings: Tensor) -> Tensor:
        s, pos, neg = pairs.matrix, pairs.positive, pairs.negative
        per_anchor = (masked_mean(F.softplus(-self.beta * (s - self.margin)), pos, 1)
                      + masked_mean(F.softplus(self.alpha * (s - self.margin)), neg, 1))
        has_pairs = (pos.sum(1) > 0) | (neg.sum(1) > 0)
        return reducers.reduce(self.reduction, per_anchor, batch_size=pairs.batch_size, anchors=has_pairs)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, margin={self.margin}, reduction={self.reduction!r}"
