"""Binomial deviance loss (Yi, Lei, Liao, Li, "Deep Metric Learning for Person Re-identification", ICPR 2014)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from deepmetric.functional import cosine_similarity_matrix, masked_mean, zero_loss
from deepmetric.losses import _fast
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

    fast = True

    def fast_compute(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, self_cmp: bool, mined: Mined | None = None,
    ) -> Tensor:
        st = _fast.prepare(embeddings, ref_embeddings)
        with torch.no_grad():
            dtype = st.nx.xf.dtype
            pos, neg = _fast.float_pair_masks(labels, ref_labels, ignore_mask, self_cmp, dtype, mined)
            n_pos, n_neg = pos.sum(1), neg.sum(1)  # exact: at most R < 2²⁴ ones per row
            n_has = int(((n_pos + n_neg) > 0).sum())
            if n_has == 0:
                return _fast.zero(st)
            s = _fast.similarity(st)
            denom = float(embeddings.shape[0] if self.reduction == "batch" else n_has)
            # P and N are disjoint: one matrix a = t·(S − m) with t = −β on P, α on N; per-pair weight c
            # (1/|P_i| or 1/|N_i|, ÷ denom; 0 elsewhere). L = Σ c·softplus(a), ∂L/∂S = c·t·sigmoid(a).
            wp = n_pos.clamp_min_(1.0).reciprocal_().mul_(1.0 / denom).unsqueeze(1)
            wn = n_neg.clamp_min_(1.0).reciprocal_().mul_(1.0 / denom).unsqueeze(1)
            t = torch.mul(pos, -self.beta - self.alpha).add_(self.alpha)  # −β on P, α elsewhere
            c = pos.mul_(wp).addcmul_(neg, wn)
            a = s.sub_(self.margin).mul_(t)
            # |a| ≤ max(α, β)·(1 + |m|) on cosines: below the exp limit, softplus and its slope from one eᵃ
            if max(abs(self.alpha), abs(self.beta)) * (1.0 + abs(self.margin)) < _fast.EXP_SAFE.get(dtype, 0.0):
                sp, slope = _fast.softplus_and_sigmoid(a)
                value = torch.dot(c.view(-1), sp.view(-1))
                G = c.mul_(t).mul_(slope)
            else:
                value = torch.dot(c.view(-1), F.softplus(a).view(-1))
                G = torch.ops.aten.softplus_backward(c.mul_(t), a, 1.0, 20.0)
        return _fast.finish(st, value, G)
