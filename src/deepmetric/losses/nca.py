"""Neighbourhood Components Analysis loss (Goldberger, Roweis, Hinton, Salakhutdinov, NIPS 2004)."""

from __future__ import annotations

from torch import Tensor

from deepmetric.functional import masked_logsumexp, pairwise_distance, zero_loss
from deepmetric.losses.base import MetricLoss, Mined, pair_masks


class NCALoss(MetricLoss):
    r"""NCA: the probability that an anchor's stochastic nearest neighbour has its class.

        p_i = Σ_{j∈P_i} e^{−s·D²_ij} / Σ_{j∈P_i∪N_i} e^{−s·D²_ij},   L = −mean_{i: P_i≠∅} log p_i

    D² = squared Euclidean distance of L2-normalised embeddings (PML ``NCALoss``: ``LpDistance(power=2)``),
    s = ``softmax_scale`` (PML default 1; Deep_Metric's KNN-softmax used 30 on 1 − D). Computed as a difference
    of two log-sum-exps (stable; PML takes log of a softmax sum and drops anchors whose sum underflows to 0).
    With ``mined=`` the neighbourhood is restricted to the mined pairs.
    """

    accepts_mined = True

    def __init__(self, softmax_scale: float = 1.0, *, normalize_embeddings: bool = True) -> None:
        super().__init__()
        self.softmax_scale, self.normalize_embeddings = float(softmax_scale), normalize_embeddings

    def compute(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, mined: Mined | None = None,
    ) -> Tensor:
        pos, neg = pair_masks(labels, ref_labels, ignore_mask, mined)
        has = pos.any(1)
        if not bool(has.any()):
            return zero_loss(embeddings, ref_embeddings)
        logits = -self.softmax_scale * pairwise_distance(
            embeddings, ref_embeddings, normalize=self.normalize_embeddings, squared=True
        )
        log_p = masked_logsumexp(logits, pos, 1) - masked_logsumexp(logits, pos | neg, 1)
        return -(log_p.masked_fill(~has, 0.0).sum() / has.sum())
