"""Neighbourhood Components Analysis loss (Goldberger, Roweis, Hinton, Salakhutdinov, NIPS 2004)."""

from __future__ import annotations

from torch import Tensor

from deepmetric.functional import masked_logsumexp
from deepmetric.losses import reducers
from deepmetric.losses.base import PairLoss, Pairs


class NCALoss(PairLoss):
    r"""NCA: the probability that an anchor's stochastic nearest neighbour has its class.

        p_i = Σ_{j∈P_i} e^{−s·D²_ij} / Σ_{j∈P_i∪N_i} e^{−s·D²_ij},   L = −mean_{i: P_i≠∅} log p_i

    D² = squared Euclidean distance of L2-normalised embeddings (PML ``NCALoss``: ``LpDistance(power=2)``),
    s = ``softmax_scale`` (PML default 1; Deep_Metric's KNN-softmax used 30 on 1 − D). Computed as a difference
    of two log-sum-exps (stable; PML takes log of a softmax sum and drops anchors whose sum underflows to 0).
    With ``mined=`` the neighbourhood is restricted to the mined pairs.
    """

    metric = "squared_distance"

    def __init__(self, softmax_scale: float = 1.0, *, normalize_embeddings: bool = True) -> None:
        super().__init__()
        self.softmax_scale, self.normalize_embeddings = float(softmax_scale), normalize_embeddings

    def pair_loss(self, pairs: Pairs, embeddings: Tensor, ref_embeddings: Tensor) -> Tensor:
        pos = pairs.positive
        logits = -self.softmax_scale * pairs.matrix
        log_p = masked_logsumexp(logits, pos, 1) - masked_logsumexp(logits, pos + pairs.negative, 1)
        has_positive = pos.sum(1) > 0
        return reducers.contributing(-log_p * has_positive, has_positive)

    def extra_repr(self) -> str:
        return f"softmax_scale={self.softmax_scale}"
