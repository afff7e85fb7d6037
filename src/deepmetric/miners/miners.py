"""Miners: multi-similarity, batch-hard, semi-hard (FaceNet) and distance-weighted sampling (Wu et al.)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from deepmetric.losses import _fast
from deepmetric.losses.base import MinedPairs, MinedTriplets
from deepmetric.losses.multi_similarity import fast_ms_selection
from deepmetric.miners.base import Miner, sample_one_per_row

Positives = Literal["random", "all"]


def _empty_triplets(device: torch.device) -> MinedTriplets:
    e = torch.empty(0, dtype=torch.long, device=device)
    return MinedTriplets(e, e.clone(), e.clone())


def _positive_pairs(miner: Miner, pos: Tensor, d: Tensor, positives: str) -> tuple[Tensor, Tensor]:
    """(anchor, positive) index tensors: every positive pair, or one uniformly random positive per anchor."""
    if positives == "all":
        a, p = torch.nonzero(pos, as_tuple=True)
        return a, p
    if positives != "random":
        raise ValueError(f"positives must be 'random' or 'all', got {positives!r}")
    idx, has = sample_one_per_row(pos, miner.rand(tuple(pos.shape), d))
    a = torch.nonzero(has, as_tuple=True)[0]
    return a, idx[a]


class MultiSimilarityMiner(Miner):
    r"""MS pair mining (Wang et al., CVPR 2019), same as PML ``MultiSimilarityMiner``, on cosine similarity:

        N_i = {k : S_ik + ε > min_{j∈P_i} S_ij},   P_i = {j : S_ij − ε < max_{k∈N_i} S_ik}.

    Returns :class:`MinedPairs`. Deterministic.
    """

    def __init__(self, epsilon: float = 0.1, *, seed: int | None = None) -> None:
        super().__init__(seed=0 if seed is None else seed)  # deterministic; seed accepted for a uniform API
        self.epsilon = float(epsilon)

    def mine(self, embeddings: Tensor, ref_embeddings: Tensor, pos: Tensor, neg: Tensor) -> MinedPairs:
        st = _fast.prepare(embeddings, ref_embeddings)
        s = _fast.similarity(st)
        p, n = fast_ms_selection(s, pos, neg, self.epsilon)  # pos/neg are this call's own masks
        return MinedPairs(p, n, _source=_fast.MiningSource(st, True, False, similarity=s))


class BatchHardMiner(Miner):
    r"""Batch-hard mining (Hermans, Beyer, Leibe 2017), as PML ``BatchHardMiner``: for every anchor with both,
    the farthest positive and the closest negative (Euclidean on L2-normalised embeddings by default).
    Returns at most B :class:`MinedTriplets`. Deterministic (ties: lowest index). On unit rows the selection
    reads the similarity matrix (D² = 2 − 2S orders pairs as D does); ``squared`` does not change the selection
    and is accepted for symmetry with the losses' flag.
    """

    def __init__(self, *, squared: bool = False, normalize_embeddings: bool = True, seed: int | None = None) -> None:
        super().__init__(seed=0 if seed is None else seed)  # deterministic; seed accepted for a uniform API
        self.squared, self.normalize_embeddings = squared, normalize_embeddings

    def mine(self, embeddings: Tensor, ref_embeddings: Tensor, pos: Tensor, neg: Tensor) -> MinedTriplets:
        return self._hardest(embeddings, ref_embeddings, ~pos, ~neg)

    def _mine_labels(
        self, embeddings: Tensor, ref_embeddings: Tensor, labels: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, self_cmp: bool,
    ) -> MinedTriplets:
        # What each search skips, built directly (fewer B×R passes than the masks and their complements):
        # same-label pairs (the diagonal included) are no negatives; other labels and the diagonal no positives.
        same = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
        other = ~same
        if self_cmp:
            other.fill_diagonal_(True)
        if ignore_mask is not None:
            ignored = ignore_mask.to(same.device)
            same |= ignored
            other |= ignored
        return self._hardest(embeddings, ref_embeddings, other, same)

    def _hardest(self, embeddings: Tensor, ref_embeddings: Tensor, not_pos: Tensor, not_neg: Tensor) -> MinedTriplets:
        # D² orders pairs as D does (√ is monotone), and on unit rows D² = 2 − 2S: the farthest positive has the
        # smallest similarity, the nearest negative the largest. max/min give the extreme value with its (first)
        # index in one pass; an excluded value left means the row has no positive / no negative.
        st = _fast.prepare(embeddings, ref_embeddings, self.normalize_embeddings)
        inf = float("inf")
        if self.normalize_embeddings:
            # |S| ≤ 1 (up to rounding): excluded pairs are moved out of the way by ±4 instead of where(mask, S, ±inf)
            # (twice as fast on CPU); the pairs searched keep their exact S (+0), so ties and order are unchanged.
            s = _fast.similarity(st)
            far, hard_p = torch.add(s, _fast.u8(not_pos), alpha=4.0).min(1)
            near, hard_n = torch.add(s, _fast.u8(not_neg), alpha=-4.0).max(1)
            ok = (far < 2.0).logical_and_(near > -2.0)
        else:
            d = _fast.distance(st, squared=True)
            far, hard_p = torch.where(not_pos, -inf, d).max(1)
            near, hard_n = torch.where(not_neg, inf, d).min(1)
            ok = (far > -inf).logical_and_(near < inf)
        a = torch.nonzero(ok, as_tuple=True)[0]
        every_row = a.shape[0] == hard_p.shape[0]  # nonzero() is sorted and unique: a = 0..B−1
        source = _fast.MiningSource(st, self.normalize_embeddings, every_row)
        if every_row:
            return MinedTriplets(a, hard_p, hard_n, _source=source)
        return MinedTriplets(a, hard_p.index_select(0, a), hard_n.index_select(0, a), _source=source)


class SemiHardMiner(Miner):
    r"""Semi-hard negative mining (Schroff, Kalenichenko, Philbin, FaceNet, CVPR 2015), DAS ``sampling/semihard.py``
    semantics: for each (anchor, positive) — one uniformly random positive per anchor (``positives="random"``)
    or every positive pair (``"all"``) — one uniformly random negative with

        D_ap < D_an < D_ap + margin                       (D squared Euclidean by default, margin 0.2)

    falling back to a uniformly random negative when there is none. Dense: each anchor's negative distances
    are sorted once and the semi-hard set of a pair is a contiguous range found by ``searchsorted``, so no
    B×P×N tensor is formed. Returns :class:`MinedTriplets` (≤ B, or ≤ #positive pairs).
    """

    def __init__(
        self, margin: float = 0.2, *, squared: bool = True, positives: Positives = "random",
        normalize_embeddings: bool = True, seed: int | None = None,
    ) -> None:
        super().__init__(seed)
        self.margin, self.squared, self.positives = float(margin), squared, positives
        self.normalize_embeddings = normalize_embeddings

    def mine(self, embeddings: Tensor, ref_embeddings: Tensor, pos: Tensor, neg: Tensor) -> MinedTriplets:
        st = _fast.prepare(embeddings, ref_embeddings, self.normalize_embeddings)
        d = _fast.distance(st, self.squared)
        a, p = _positive_pairs(self, pos & neg.any(1, keepdim=True), d, self.positives)
        if a.numel() == 0:
            return _empty_triplets(d.device)
        sorted_dn, order = torch.sort(d.masked_fill(~neg, float("inf")), dim=1)
        n_neg = neg.sum(1)
        d_ap = d[a, p].unsqueeze(1)
        rows = sorted_dn.index_select(0, a)  # not sorted_dn[a]: row gathers by advanced indexing are slow on CPU
        lo = torch.searchsorted(rows, d_ap, side="right").squeeze(1)  # first negative with D_an > D_ap
        hi = torch.searchsorted(rows, d_ap + self.margin, side="left").squeeze(1)  # first with D_an ≥ D_ap + m
        u = self.rand((a.numel(),), d)
        semi = hi > lo
        start = torch.where(semi, lo, torch.zeros_like(lo))
        width = torch.where(semi, hi - lo, n_neg[a])
        k = start + (u * width).long().clamp_max(width - 1)
        # one (sorted, distinct) anchor per row when every row got a random positive: a = 0..B−1
        every_row = self.positives == "random" and a.shape[0] == d.shape[0]
        return MinedTriplets(a, p, order[a, k], _source=_fast.MiningSource(st, self.normalize_embeddings, every_row))


def distance_weighted_probabilities(
    dist: Tensor, negative: Tensor, dim: int, cutoff: float = 0.5, nonzero_loss_cutoff: float | None = None,
) -> Tensor:
    r"""Per-anchor negative sampling probabilities of distance-weighted sampling (Wu et al., ICCV 2017).

    Pairwise distances of points uniform on S^{n−1} have density q(D) ∝ D^{n−2}(1 − D²/4)^{(n−3)/2}; negatives
    are drawn ∝ 1/q(D) with D clamped to ≥ ``cutoff``:

        log w = (2 − n)·log D − ((n − 3)/2)·log(1 − D²/4)

    computed in log space with the row max subtracted (exp never overflows; the 1 − D²/4 factor is clamped at
    1e-8 for D → 2). Entries that are not negatives, or with D ≥ ``nonzero_loss_cutoff`` (Wu's 1.4, applied in
    MDR, off in MS/DAS), get 0. A row whose negatives are all cut off falls back to uniform over its negatives
    (MDR). Rows without negatives are all zero.
    """
    n = float(dim)
    dc = dist.clamp_min(cutoff)
    log_w = (2.0 - n) * torch.log(dc) - ((n - 3.0) / 2.0) * torch.log((1.0 - 0.25 * dc * dc).clamp_min(1e-8))
    eligible = negative if nonzero_loss_cutoff is None else negative & (dist < nonzero_loss_cutoff)
    log_w = log_w.masked_fill(~eligible, float("-inf"))
    row_max = log_w.amax(1, keepdim=True)
    w = torch.exp(log_w - torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)))
    fallback = ~eligible.any(1, keepdim=True) & negative
    w = torch.where(fallback, torch.ones_like(w), w).masked_fill(~negative, 0.0)
    return w / w.sum(1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


class DistanceWeightedMiner(Miner):
    r"""Distance-weighted sampling (Wu, Manmatha, Smola, Krähenbühl, "Sampling Matters in Deep Embedding
    Learning", ICCV 2017). For each (anchor, positive) — one uniformly random positive per anchor
    (``positives="random"``, MS/DAS) or every positive pair (``"all"``, MDR) — one negative drawn with
    :func:`distance_weighted_probabilities` (``cutoff`` 0.5, optional ``nonzero_loss_cutoff`` 1.4), D =
    Euclidean distance of L2-normalised embeddings, n = ``embedding_dim`` (default: the embedding width).
    Sampling by inverse CDF with this miner's generator. Returns :class:`MinedTriplets`.
    """

    def __init__(
        self, cutoff: float = 0.5, nonzero_loss_cutoff: float | None = None, *, embedding_dim: int | None = None,
        positives: Positives = "random", seed: int | None = None,
    ) -> None:
        super().__init__(seed)
        self.cutoff, self.nonzero_loss_cutoff = float(cutoff), nonzero_loss_cutoff
        self.embedding_dim, self.positives = embedding_dim, positives

    def mine(self, embeddings: Tensor, ref_embeddings: Tensor, pos: Tensor, neg: Tensor) -> MinedTriplets:
        st = _fast.prepare(embeddings, ref_embeddings, True)
        d = _fast.distance(st, squared=False)
        probs = distance_weighted_probabilities(
            d, neg, self.embedding_dim or embeddings.shape[1], self.cutoff, self.nonzero_loss_cutoff
        )
        a, p = _positive_pairs(self, pos & neg.any(1, keepdim=True), d, self.positives)
        if a.numel() == 0:
            return _empty_triplets(d.device)
        cdf = torch.cumsum(probs, dim=1).index_select(0, a)
        u = self.rand((a.numel(), 1), d) * cdf[:, -1:]
        k = torch.searchsorted(cdf, u, side="right").squeeze(1)
        # Guard rounding at the top end and zero-probability columns reached by ties.
        k = k.clamp_max(d.shape[1] - 1)
        k = torch.where(neg[a, k], k, probs.index_select(0, a).argmax(1))
        # one (sorted, distinct) anchor per row when every row got a random positive: a = 0..B−1
        every_row = self.positives == "random" and a.shape[0] == d.shape[0]
        return MinedTriplets(a, p, k, _source=_fast.MiningSource(st, True, every_row))
