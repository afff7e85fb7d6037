"""Miners: multi-similarity, batch-hard, semi-hard (FaceNet) and distance-weighted sampling (Wu et al.)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from deepmetric.functional import MASK_PENALTY, cosine_similarity_matrix, mask_penalty, pairwise_distance
from deepmetric.losses.base import MinedPairs, MinedTriplets
from deepmetric.losses.multi_similarity import ms_pair_selection
from deepmetric.miners.base import Miner, sample_one_per_row

Positives = Literal["random", "all"]


def _no_triplets(device: torch.device) -> MinedTriplets:
    empty = torch.empty(0, dtype=torch.long, device=device)
    return MinedTriplets(empty, empty.clone(), empty.clone())


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
        sim = cosine_similarity_matrix(embeddings, ref_embeddings)
        return MinedPairs(*ms_pair_selection(sim, pos, neg, self.epsilon))


class BatchHardMiner(Miner):
    r"""Batch-hard mining (Hermans, Beyer, Leibe 2017), as PML ``BatchHardMiner``: for every anchor with both,
    the farthest positive and the closest negative (Euclidean on L2-normalised embeddings by default).
    Returns at most B :class:`MinedTriplets`. Deterministic (ties: lowest index). The selection reads squared
    distances (D² orders pairs as D does); ``squared`` does not change it and is accepted for symmetry with the
    losses' flag.
    """

    def __init__(self, *, squared: bool = False, normalize_embeddings: bool = True, seed: int | None = None) -> None:
        super().__init__(seed=0 if seed is None else seed)  # deterministic; seed accepted for a uniform API
        self.squared, self.normalize_embeddings = squared, normalize_embeddings

    def mine(self, embeddings: Tensor, ref_embeddings: Tensor, pos: Tensor, neg: Tensor) -> MinedTriplets:
        d = pairwise_distance(embeddings, ref_embeddings, normalize=self.normalize_embeddings, squared=True)
        # the penalty moves the excluded pairs out of the search and leaves the searched ones exact (ties kept);
        # a row whose extreme is a penalised entry has no positive (negative)
        farthest, hardest_pos = (d + mask_penalty(pos, d.dtype)).max(1)
        nearest, hardest_neg = (d - mask_penalty(neg, d.dtype)).min(1)
        has_both = (farthest > -0.5 * MASK_PENALTY) & (nearest < 0.5 * MASK_PENALTY)
        a = torch.nonzero(has_both, as_tuple=True)[0]
        return MinedTriplets(a, hardest_pos[a], hardest_neg[a])


class SemiHardMiner(Miner):
    r"""Semi-hard negative mining (Schroff, Kalenichenko, Philbin, FaceNet, CVPR 2015), DAS ``sampling/semihard.py``
    semantics: for each (anchor, positive) — one uniformly random positive per anchor (``positives="random"``)
    or every positive pair (``"all"``) — one uniformly random negative with

        D_ap < D_an < D_ap + margin                       (D plain Euclidean by default, margin 0.2)

    The window is on plain distances by default, per methods.md §3.3 and DAS (its ``pair_wise_distance``
    returns the square root); the FaceNet loss then uses D² (``triplet_margin`` with ``squared: true``).
    ``squared=True`` puts the window on D² instead: D_an < √(D_ap² + margin), narrower than the plain window
    once D_ap > (1 − margin)/2. Falling back to a uniformly random negative when there is none. Dense: each
    anchor's negative distances are sorted once and the semi-hard set of a pair is a contiguous range found by
    ``searchsorted``, so no B×P×N tensor is formed. Returns :class:`MinedTriplets` (≤ B, or ≤ #positive pairs).
    """

    def __init__(
        self, margin: float = 0.2, *, squared: bool = False, positives: Positives = "random",
        normalize_embeddings: bool = True, seed: int | None = None,
    ) -> None:
        super().__init__(seed)
        self.margin, self.squared, self.positives = float(margin), squared, positives
        self.normalize_embeddings = normalize_embeddings

    def mine(self, embeddings: Tensor, ref_embeddings: Tensor, pos: Tensor, neg: Tensor) -> MinedTriplets:
        d = pairwise_distance(embeddings, ref_embeddings, normalize=self.normalize_embeddings, squared=self.squared)
        a, p = _positive_pairs(self, pos & neg.any(1, keepdim=True), d, self.positives)
        if a.numel() == 0:
            return _no_triplets(d.device)
        sorted_dn, order = torch.sort(d.masked_fill(~neg, float("inf")), dim=1)
        n_neg = neg.sum(1)
        d_ap = d[a, p].unsqueeze(1)
        rows = sorted_dn.index_select(0, a)
        lo = torch.searchsorted(rows, d_ap, side="right").squeeze(1)  # first negative with D_an > D_ap
        hi = torch.searchsorted(rows, d_ap + self.margin, side="left").squeeze(1)  # first with D_an ≥ D_ap + m
        u = self.rand((a.numel(),), d)
        semi = hi > lo
        start = torch.where(semi, lo, torch.zeros_like(lo))
        width = torch.where(semi, hi - lo, n_neg[a])
        k = start + (u * width).long().clamp_max(width - 1)
        return MinedTriplets(a, p, order[a, k])


def distance_weighted_probabilities(
    dist: Tensor, negative: Tensor, dim: int, cutoff: float = 0.5, nonzero_loss_cutoff: float | None = None,
    *, legacy_mdr_positive: Tensor | None = None,
) -> Tensor:
    r"""Per-anchor negative sampling probabilities of distance-weighted sampling (Wu et al., ICCV 2017).

    Pairwise distances of points uniform on S^{n−1} have density q(D) ∝ D^{n−2}(1 − D²/4)^{(n−3)/2}; negatives
    are drawn ∝ 1/q(D) with D clamped to ≥ ``cutoff``:

        log w = (2 − n)·log D − ((n − 3)/2)·log(1 − D²/4)

    computed in log space with the row max subtracted (exp never overflows; the 1 − D²/4 factor is clamped at
    1e-8 for D → 2). Entries that are not negatives, or with D ≥ ``nonzero_loss_cutoff`` (Wu's 1.4, applied in
    MDR, off in MS/DAS), get 0. A row whose negatives are all cut off falls back to uniform over its negatives
    (MDR). Rows without negatives are all zero.

    ``legacy_mdr_positive`` (the positive mask of the same pairs) reproduces MDR's released sampler
    (``metric/pairsampler.py:DistanceWeighted``) instead: in float32, the self (and every other non-pair) entry
    at D = 1, the row max of log w taken over *all* columns — self and positives included — and the 1.4 cutoff
    applied after exp. When a positive is much closer than every negative (e.g. D_ap ≤ 0.5, D_an ≥ 0.7 at
    n = 512: log-weight gap ≈ 200), every negative weight underflows to 0 and the row falls back to uniform over
    *all* its negatives, ignoring both the density and the upper cutoff.
    """
    n = float(dim)
    legacy = legacy_mdr_positive is not None
    if legacy:
        # the code's model output is float32; its pdist + eye puts the self distance at 1
        dist = dist.float().masked_fill(~(legacy_mdr_positive | negative), 1.0)
    dc = dist.clamp_min(cutoff)
    log_w = (2.0 - n) * torch.log(dc) - ((n - 3.0) / 2.0) * torch.log((1.0 - 0.25 * dc * dc).clamp_min(1e-8))
    eligible = negative if nonzero_loss_cutoff is None else negative & (dist < nonzero_loss_cutoff)
    if legacy:
        w = torch.exp(log_w - log_w.amax(1, keepdim=True)).masked_fill(~eligible, 0.0)
        fallback = (w.sum(1, keepdim=True) == 0) & negative
    else:
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
    Sampling by inverse CDF with this miner's random stream. Returns :class:`MinedTriplets`.

    ``legacy_mdr=True`` computes the weights as MDR's released sampler does (float32, row max over all
    columns, uniform fallback once they underflow; see :func:`distance_weighted_probabilities`); the default
    follows the paper (weights relative to the best eligible negative, so they never all underflow).
    """

    def __init__(
        self, cutoff: float = 0.5, nonzero_loss_cutoff: float | None = None, *, embedding_dim: int | None = None,
        positives: Positives = "random", legacy_mdr: bool = False, seed: int | None = None,
    ) -> None:
        super().__init__(seed)
        self.cutoff, self.nonzero_loss_cutoff = float(cutoff), nonzero_loss_cutoff
        self.embedding_dim, self.positives, self.legacy_mdr = embedding_dim, positives, bool(legacy_mdr)

    def mine(self, embeddings: Tensor, ref_embeddings: Tensor, pos: Tensor, neg: Tensor) -> MinedTriplets:
        d = pairwise_distance(embeddings, ref_embeddings)
        probs = distance_weighted_probabilities(
            d, neg, self.embedding_dim or embeddings.shape[1], self.cutoff, self.nonzero_loss_cutoff,
            legacy_mdr_positive=pos if self.legacy_mdr else None,
        ).to(d.dtype)
        a, p = _positive_pairs(self, pos & neg.any(1, keepdim=True), d, self.positives)
        if a.numel() == 0:
            return _no_triplets(d.device)
        cdf = torch.cumsum(probs, dim=1).index_select(0, a)
        u = self.rand((a.numel(), 1), d) * cdf[:, -1:]
        k = torch.searchsorted(cdf, u, side="right").squeeze(1)
        # Guard rounding at the top end and zero-probability columns reached by ties.
        k = k.clamp_max(d.shape[1] - 1)
        k = torch.where(neg[a, k], k, probs.index_select(0, a).argmax(1))
        return MinedTriplets(a, p, k)
