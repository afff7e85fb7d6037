"""Triplet margin loss (Weinberger & Saul 2009; Schroff et al., FaceNet, CVPR 2015), dense over all triplets."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from deepmetric.functional import pairwise_distance, zero_loss
from deepmetric.losses import _fast
from deepmetric.losses.base import MetricLoss, Mined, MinedTriplets, pair_masks, valid_triplets

TripletReduction = Literal["avg_nonzero", "mean", "sum"]


def all_triplet_hinge_sums(
    d: Tensor, pos: Tensor, neg: Tensor, margin: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Σ_{(a,p,n)} [d_ap − d_an + m]₊ over every triplet with p ∈ pos[a], n ∈ neg[a], in O(B·R log R) memory O(B·R).

    For fixed (a, p) with t = d_ap + m:  Σ_n [t − d_an]₊ = c·t − Σ_{n: d_an < t} d_an,  c = #{n : d_an < t}.
    Sorting each anchor's negative distances once and reading prefix sums at ``searchsorted(t)`` gives every
    (a, p) term without forming the B×P×N cube (PML's all-triplets path is O(B³) and hits INT_MAX). The
    gradient flows through ``t`` and the gathered prefix sums; the counts are piecewise constant.

    Returns (sum of hinge losses, number of triplets with loss > 0, number of triplets).
    """
    inf = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
    dn = torch.where(neg, d, inf)
    sorted_dn, _ = torch.sort(dn, dim=1)
    finite = torch.isfinite(sorted_dn)
    # Prefix sums with a leading 0 column: prefix[:, k] = sum of the k smallest negative distances.
    prefix = torch.cumsum(torch.where(finite, sorted_dn, torch.zeros_like(sorted_dn)), dim=1)
    prefix = torch.cat([torch.zeros_like(prefix[:, :1]), prefix], dim=1)
    t = d + margin
    count = torch.searchsorted(sorted_dn.detach().contiguous(), t.detach().contiguous(), side="left")
    below = prefix.gather(1, count)
    per_pair = (count.to(d.dtype) * t - below).masked_fill(~pos, 0.0)
    n_nonzero = count.masked_fill(~pos, 0).sum()
    n_triplets = (pos.sum(1) * neg.sum(1)).sum()
    return per_pair.sum(), n_nonzero, n_triplets


def reduce_triplets(total: Tensor, n_nonzero: Tensor, n_all: Tensor, reduction: str) -> Tensor:
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / n_all.clamp_min(1)
    if reduction == "avg_nonzero":
        return total / n_nonzero.clamp_min(1)
    raise ValueError(f"triplet reduction must be avg_nonzero, mean or sum; got {reduction!r}")


class TripletMarginLoss(MetricLoss):
    r"""Triplet margin loss over every valid triplet (or the mined ones).

        ℓ(a, p, n) = [D_ap − D_an + m]₊

    D = Euclidean distance between L2-normalised embeddings (PML ``LpDistance`` default), or squared Euclidean
    with ``squared=True`` (FaceNet / DAS: m = 0.2). ``margin`` default 0.05 (PML).

    ``reduction``: ``"avg_nonzero"`` (PML AvgNonZeroReducer: mean over triplets with ℓ > 0), ``"mean"`` (mean
    over all used triplets, DAS), ``"sum"``.

    Without ``mined`` (or with :class:`MinedPairs`) the loss covers *all* combinations of an anchor's
    positives and negatives, computed exactly in O(B·R) memory: each positive pair compared with its anchor's
    negative distances when anchors have few positives, else from sorted negatives
    (:func:`all_triplet_hinge_sums`). With :class:`MinedTriplets` it is evaluated on exactly those triplets
    (duplicates count as given).

    Not implemented from PML: ``swap`` and ``smooth_loss`` (both need per-triplet terms that do not factor over
    sorted negatives), ``triplets_per_anchor`` sampling (use a miner).
    """

    accepts_mined = True

    def __init__(
        self,
        margin: float = 0.05,
        *,
        squared: bool = False,
        normalize_embeddings: bool = True,
        reduction: TripletReduction = "avg_nonzero",
    ) -> None:
        super().__init__()
        if reduction not in ("avg_nonzero", "mean", "sum"):
            raise ValueError(f"TripletMarginLoss.reduction must be avg_nonzero, mean or sum; got {reduction!r}")
        self.margin, self.squared = float(margin), squared
        self.normalize_embeddings, self.reduction = normalize_embeddings, reduction

    def compute(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, mined: Mined | None = None,
    ) -> Tensor:
        d = pairwise_distance(embeddings, ref_embeddings, normalize=self.normalize_embeddings, squared=self.squared)
        if isinstance(mined, MinedTriplets):
            a, p, n = valid_triplets(mined, labels, ref_labels, ignore_mask)
            if a.numel() == 0:
                return zero_loss(embeddings, ref_embeddings)
            losses = torch.relu(d[a, p] - d[a, n] + self.margin)
            n_all = torch.tensor(a.numel(), device=d.device)
            return reduce_triplets(losses.sum(), (losses > 0).sum(), n_all, self.reduction)
        pos, neg = pair_masks(labels, ref_labels, ignore_mask, mined)
        if not bool((pos.any(1) & neg.any(1)).any()):
            return zero_loss(embeddings, ref_embeddings)
        total, n_nonzero, n_all = all_triplet_hinge_sums(d, pos, neg, self.margin)
        return reduce_triplets(total, n_nonzero, n_all, self.reduction) + zero_loss(embeddings, ref_embeddings)

    fast = True

    def _scale(self, n_nonzero: Tensor, n_all: Tensor, dtype: torch.dtype) -> Tensor | float:
        if self.reduction == "sum":
            return 1.0
        return 1.0 / (n_all if self.reduction == "mean" else n_nonzero).clamp_min(1).to(dtype)

    def fast_compute(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, self_cmp: bool, mined: Mined | None = None,
    ) -> Tensor:
        if type(mined) is MinedTriplets:
            return self._fast_mined(embeddings, labels, ref_embeddings, ref_labels, ignore_mask, self_cmp, mined)
        st = _fast.prepare(embeddings, ref_embeddings, self.normalize_embeddings)
        with torch.no_grad():
            pos, neg = _fast.masks(labels, ref_labels, ignore_mask, self_cmp, mined)
            n_pos, n_neg = pos.sum(1), neg.sum(1)
            if not bool(((n_pos > 0) & (n_neg > 0)).any()):
                return _fast.zero(st)
            d = _fast.distance(st, self.squared)
            if int(n_pos.sum()) <= self._compare_max_positives_per_row(d.shape[1]) * d.shape[0]:
                total, n_nonzero, gd = self._hinge_sums_by_comparison(d, pos, neg)
            else:
                total, n_nonzero, gd = self._hinge_sums_by_sorting(d, pos, neg)
            scale = self._scale(n_nonzero, (n_pos * n_neg).sum(), d.dtype)
            value = total * scale
            gd.mul_(scale)
        return _fast.finish(st, value, _fast.distance_grad(st, gd, d, self.squared))

    # Up to K positive pairs per anchor on average (m-per-class batches have m − 1), every positive pair is compared
    # with its anchor's row of distances: O(K·B·R) work. Beyond, each row of negatives is sorted once: O(B·R·log R),
    # but torch's row sort and searchsorted cost about 1 ms each at 180 × 180 on one CPU thread. Measured crossover
    # (d = 512, one thread): K ≈ 13 at R = 180, K > 31 at R = 1024; K = max(8, 1.6·log₂ R) stays below both.
    _COMPARE_POSITIVES_PER_LOG2_ROW = 1.6

    _COMPARE_BLOCK_ENTRIES = 1 << 20  # blocks of anchor rows hold at most max(B·R, this) entries

    def _compare_max_positives_per_row(self, r: int) -> float:
        return max(8.0, self._COMPARE_POSITIVES_PER_LOG2_ROW * math.log2(max(r, 2)))

    def _hinge_sums_by_comparison(self, d: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(Σ [d_ap − d_an + m]₊ over all triplets, the number of non-zero terms, ∂Σ/∂d) from one comparison of
        each positive pair's t = d_ap + m with its anchor's negative distances, in blocks of anchor rows of at
        most max(B·R, ``_COMPARE_BLOCK_ENTRIES``) entries. Per (a, p): c = #{n : d_an < t} and
        Σ_n [t − d_an]₊ = c·t − Σ_{d_an < t} d_an; ∂/∂d_ap = c, ∂/∂d_an = −#{p : d_an < t_ap}."""
        b, r = d.shape
        a, p = pos.nonzero(as_tuple=True)
        t = d[a, p].add_(self.margin)
        negf = _fast.fm(neg, d.dtype)
        gd = torch.zeros_like(d)
        counts = torch.empty_like(t)
        total = d.new_zeros(())
        step = max(1, max(b * r, self._COMPARE_BLOCK_ENTRIES) // max(r, 1))
        for start in range(0, a.shape[0], step):
            rows, tt = a[start:start + step], t[start:start + step]
            da = d.index_select(0, rows)
            # [t > d_an] on the anchor's negatives as 0/1 (t − d_an > 0 exactly when t > d_an in floating point)
            inside = _fast.positive_part_indicator(torch.sub(tt.unsqueeze(1), da)).mul_(negf.index_select(0, rows))
            c = torch.sum(inside, 1, out=counts[start:start + step])
            total += torch.dot(c, tt) - torch.dot(inside.view(-1), da.view(-1))
            gd.index_add_(0, rows, inside, alpha=-1.0)
        # distinct (a, p) pairs, and no negative term lands on a positive entry
        gd.index_put_((a, p), counts)
        return total, counts.sum(dtype=torch.float64), gd

    def _hinge_sums_by_sorting(self, d: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The same sums from each anchor's sorted negative distances and prefix sums (see
        :func:`all_triplet_hinge_sums`): O(B·R·log R) whatever the number of positives."""
        dn = torch.where(neg, d, float("inf"))
        sorted_dn, order = torch.sort(dn, dim=1)
        t = d + self.margin
        count = torch.searchsorted(sorted_dn, t, side="left").masked_fill_(~pos, 0)
        prefix = torch.cumsum(sorted_dn.masked_fill(~torch.isfinite(sorted_dn), 0.0), dim=1)
        prefix = torch.cat([torch.zeros_like(prefix[:, :1]), prefix], dim=1)
        countf = count.to(d.dtype)
        total = torch.dot(countf.view(-1), t.view(-1)) - prefix.gather(1, count).sum()
        # ∂total/∂d_ap = c_ap; ∂total/∂d_an = −#{p : c_ap > rank_a(n)} (rank in the sorted negatives).
        hist = torch.zeros(d.shape[0], d.shape[1] + 1, dtype=d.dtype, device=d.device)
        hist.scatter_add_(1, count, torch.ones_like(d))
        n_gt = hist.cumsum_(1)[:, :-1].sub_(float(d.shape[1]))  # −#{c > k} per sorted position k
        gd = torch.empty_like(d).scatter_(1, order, n_gt).add_(countf)
        return total, count.sum(), gd

    def _fast_mined(
        self, x: Tensor, labels: Tensor, r: Tensor, ref_labels: Tensor, ignore_mask: Tensor | None, self_cmp: bool,
        mined: MinedTriplets,
    ) -> Tensor:
        """O(T·d): only the 2T distances of the mined triplets are formed (no B×R GEMM). Triplets a built-in
        miner returned for these very inputs are used as they are, on the miner's normalisation."""
        st, a, p, n, every_row = _fast.mined_triplet_state(
            mined, x, r, labels, ref_labels, ignore_mask, self_cmp, self.normalize_embeddings)
        if a.numel() == 0:
            return _fast.zero(st)
        with torch.no_grad():
            value, gxn, grn = self._triplet_terms(st, a, p, n, every_row)
        return _fast.finish_direct(st, value, gxn, grn)

    def _triplet_terms(
        self, st: _fast.PairState, a: Tensor, p: Tensor, n: Tensor, every_row: bool,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The value and its gradients wrt x̂ and r̂ (None when the references are the batch) on T triplets."""
        t = a.shape[0]
        diff, dist, pn = _fast.triplet_differences(st, a, p, n, every_row)  # dist: D²_ap, D²_an
        if not self.squared:
            dist.add_(_fast.DIST_EPS).sqrt_()
        losses = torch.sub(dist[0], dist[1]).add_(self.margin)
        active = losses > 0
        w = active.to(losses.dtype)  # ∂value/∂ℓ per triplet
        value = losses.clamp_min_(0.0).sum()
        if self.reduction != "sum":
            # few small ops: at T ≈ B each costs about as much as a pass over a B×d block
            scale = w.sum().clamp_min_(1.0).reciprocal_() if self.reduction == "avg_nonzero" else 1.0 / t
            value.mul_(scale)
            w.mul_(scale)
        # ∂ℓ/∂D_ap = 1, ∂ℓ/∂D_an = −1 on active triplets; ∂D²/∂x̂_a = 2(x̂_a − r̂), ∂D/∂D² = 1/(2D).
        coef = dist.fill_(2.0) if self.squared else dist.reciprocal_()
        coef.mul_(w)
        coef[1].neg_()
        gxn, grn = _fast.triplet_gradients(st, diff, coef, a, pn, every_row)
        return value, gxn, grn

    def extra_repr(self) -> str:
        return f"margin={self.margin}, squared={self.squared}, reduction={self.reduction!r}"
