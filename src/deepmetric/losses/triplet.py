"""Triplet margin loss (Weinberger & Saul 2009; Schroff et al., FaceNet, CVPR 2015), dense over all triplets."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from deepmetric.functional import mask_penalty
from deepmetric.losses import reducers
from deepmetric.losses.base import Mined, MinedTriplets, PairLoss, Pairs, valid_triplets

TripletReduction = Literal["avg_nonzero", "mean", "sum"]


def all_triplet_hinge_sums(d: Tensor, pos: Tensor, neg: Tensor, margin: float) -> tuple[Tensor, Tensor]:
    """Per positive pair (a, p): Σ_{n ∈ neg[a]} [d_ap − d_an + m]₊ and how many of those terms are > 0 (B×R, zero
    off ``pos``), in O(B·R log R) time and O(B·R) memory; ``pos``/``neg`` are 0/1 masks.

    For fixed (a, p) with t = d_ap + m:  Σ_n [t − d_an]₊ = c·t − Σ_{n: d_an < t} d_an,  c = #{n : d_an < t}
    (t − d_an > 0 exactly when d_an < t). Sorting each anchor's negative distances once and reading prefix sums
    at ``searchsorted(t)`` gives every (a, p) term without forming the B×P×N cube (PML's all-triplets path is
    O(B³)). The gradient flows through t and the gathered prefix sums; the counts are piecewise constant.
    """
    # non-negatives are pushed past every threshold (+1e30) and so never counted
    sorted_dn, _ = torch.sort(d - mask_penalty(neg, d.dtype), dim=1)
    prefix = torch.cumsum(sorted_dn, dim=1)
    # a leading 0 column: prefix[:, k] = sum of the k smallest negative distances
    prefix = torch.cat([torch.zeros_like(prefix[:, :1]), prefix], dim=1)
    t = d + margin
    count = torch.searchsorted(sorted_dn.detach(), t.detach(), side="left")
    below = prefix.gather(1, count)
    countf = count.to(d.dtype) * pos
    return countf * t - below * pos, countf


class TripletMarginLoss(PairLoss):
    r"""Triplet margin loss over every valid triplet (or the mined ones).

        ℓ(a, p, n) = [D_ap − D_an + m]₊

    D = Euclidean distance between L2-normalised embeddings (PML ``LpDistance`` default), or squared Euclidean
    with ``squared=True`` (FaceNet / DAS: m = 0.2). ``margin`` default 0.05 (PML).

    ``reduction`` (:mod:`deepmetric.losses.reducers`): ``"avg_nonzero"`` (PML AvgNonZeroReducer: mean over
    triplets with ℓ > 0), ``"mean"`` (mean over all used triplets, DAS), ``"sum"``.

    Without ``mined`` (or with :class:`MinedPairs`) the loss covers *all* combinations of an anchor's
    positives and negatives, computed exactly in O(B·R) memory from sorted negatives
    (:func:`all_triplet_hinge_sums`). With :class:`MinedTriplets` it is evaluated on exactly those triplets
    (duplicates count as given), from their gathered rows.

    Not implemented from PML: ``swap`` and ``smooth_loss`` (both need per-triplet terms that do not factor over
    sorted negatives), ``triplets_per_anchor`` sampling (use a miner).
    """

    def __init__(
        self,
        margin: float = 0.05,
        *,
        squared: bool = False,
        normalize_embeddings: bool = True,
        reduction: TripletReduction = "avg_nonzero",
    ) -> None:
        super().__init__()
        self.reduction = reducers.check_reduction("TripletMarginLoss", reduction, ("avg_nonzero", "mean", "sum"))
        self.margin, self.squared = float(margin), squared
        self.metric = "squared_distance" if squared else "distance"
        self.normalize_embeddings = normalize_embeddings

    def compute(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, mined: Mined | None = None,
    ) -> Tensor:
        if not isinstance(mined, MinedTriplets):
            return super().compute(embeddings, labels, ref_embeddings, ref_labels, ignore_mask, mined)
        a, p, n = valid_triplets(mined, labels, ref_labels, ignore_mask)
        d_ap, d_an = self.triplet_distances(embeddings, ref_embeddings, a, p, n)
        losses = torch.relu(d_ap - d_an + self.margin)
        return reducers.reduce(self.reduction, losses, selected=torch.ones_like(losses))

    def pair_loss(self, pairs: Pairs, embeddings: Tensor, ref_embeddings: Tensor) -> Tensor:
        pos, neg = pairs.positive, pairs.negative
        hinge_sums, nonzero = all_triplet_hinge_sums(pairs.matrix, pos, neg, self.margin)
        triplets = pos * neg.sum(1, keepdim=True)  # each positive pair is in |N_a| triplets
        return reducers.reduce(self.reduction, hinge_sums, selected=triplets, nonzero=nonzero)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, squared={self.squared}, reduction={self.reduction!r}"
