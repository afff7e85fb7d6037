"""Multi-Similarity loss (Wang et al., CVPR 2019) and its precursor, the "Weight" loss (Deep_Metric)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from deepmetric.functional import (
    cosine_similarity_matrix,
    masked_logsumexp,
    masked_max,
    masked_min,
    zero_loss,
)
from deepmetric.losses import _fast
from deepmetric.losses.base import MetricLoss, Mined, pair_masks

Reduction = Literal["batch", "contributing"]


def ms_pair_selection(
    sim: Tensor, positive: Tensor, negative: Tensor, epsilon: float
) -> tuple[Tensor, Tensor]:
    """MS mining (the "P-similarity" step), dense over a B×R similarity matrix.

    N_i = {k ∈ N_i⁰ : S_ik + ε > min_{j∈P_i⁰} S_ij},  P_i = {j ∈ P_i⁰ : S_ij − ε < max_{k∈N_i⁰} S_ik}.
    Thresholds use the full sets (as the original code). An anchor without positives mines no negatives (min of
    an empty set is +∞) and vice versa, which also guards the original code's crash on empty ``min``.
    """
    s = sim.detach()
    min_pos = masked_min(s, positive, dim=1).unsqueeze(1)
    max_neg = masked_max(s, negative, dim=1).unsqueeze(1)
    return positive & (s - epsilon < max_neg), negative & (s + epsilon > min_pos)


def fast_ms_selection(sim: Tensor, positive: Tensor, negative: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """:func:`ms_pair_selection` on a detached matrix, reusing and overwriting the two masks."""
    inf = torch.tensor(float("inf"), dtype=sim.dtype, device=sim.device)
    min_pos = torch.where(positive, sim, inf).amin(1, keepdim=True)
    max_neg = torch.where(negative, sim, -inf).amax(1, keepdim=True)
    positive &= (sim - epsilon) < max_neg
    negative &= (sim + epsilon) > min_pos
    return positive, negative


def _ms_per_anchor(sim: Tensor, pos: Tensor, neg: Tensor, pos_scale: float, neg_scale: float, base: float) -> Tensor:
    """(1/α)·log(1 + Σ_P e^{−α(S−λ)}) + (1/β)·log(1 + Σ_N e^{β(S−λ)}) per anchor (0 for an empty set)."""
    pos_term = masked_logsumexp(-pos_scale * (sim - base), pos, dim=1, add_one=True) / pos_scale
    neg_term = masked_logsumexp(neg_scale * (sim - base), neg, dim=1, add_one=True) / neg_scale
    return pos_term + neg_term


class MultiSimilarityLoss(MetricLoss):
    r"""Multi-Similarity loss. Wang, Han, Huang, Dong, Scott, "Multi-Similarity Loss with General Pair Weighting
    for Deep Metric Learning", CVPR 2019.

    On cosine similarities S (B×R) with positive sets P_i and negative sets N_i of anchor i:

        L_i = (1/α)·log[1 + Σ_{j∈P_i} e^{−α(S_ij − λ)}] + (1/β)·log[1 + Σ_{k∈N_i} e^{β(S_ik − λ)}]

    With ``mining=True`` P_i/N_i are first mined (see :func:`ms_pair_selection`, ε = ``epsilon``) and, as in the
    authors' code (``research-ms-loss``), an anchor whose mined P_i or N_i is empty contributes nothing.

    Parameters (PML names): ``alpha`` = α (positive scale), ``beta`` = β (negative scale), ``base`` = λ.
    Defaults α=2, β=50, λ=0.5 are PML's; the authors' code uses β=40 (λ=0.5), the paper β=50, λ=1.

    ``reduction``: ``"batch"`` = Σ_i L_i / B (authors' code and PML's MeanReducer: anchors without pairs count
    as 0); ``"contributing"`` = mean over anchors that have at least one pair (after mining) (DAS/Revisiting).

    Deviations: self-pairs are removed by index, not by ``S < 1 − 1e-5`` (exact duplicates stay positives).
    PML's ``MultiSimilarityLoss`` with a ``MultiSimilarityMiner`` keeps an anchor whose mined negatives are
    empty (its positive term still counts); ``mining=True`` drops it as the authors' code does. To reproduce
    PML exactly use ``mining=False`` with ``mined=MultiSimilarityMiner(...)(...)``.
    """

    accepts_mined = True

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        *,
        mining: bool = True,
        epsilon: float = 0.1,
        reduction: Reduction = "batch",
    ) -> None:
        super().__init__()
        if reduction not in ("batch", "contributing"):
            raise ValueError(f"MultiSimilarityLoss.reduction must be 'batch' or 'contributing', got {reduction!r}")
        if alpha <= 0 or beta <= 0:
            raise ValueError(f"MultiSimilarityLoss: alpha and beta must be > 0, got {alpha}, {beta}")
        self.alpha, self.beta, self.base = float(alpha), float(beta), float(base)
        self.mining, self.epsilon, self.reduction = mining, float(epsilon), reduction

    # Overridden by WeightLoss (different naming of the two scales and a factor 2).
    def _scales(self) -> tuple[float, float, float]:
        return self.alpha, self.beta, 1.0

    def compute(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, mined: Mined | None = None,
    ) -> Tensor:
        sim = cosine_similarity_matrix(embeddings, ref_embeddings)
        pos, neg = pair_masks(labels, ref_labels, ignore_mask, mined)
        if self.mining:
            pos, neg = ms_pair_selection(sim, pos, neg, self.epsilon)
            contributing = pos.any(1) & neg.any(1)
            # The original code skips an anchor entirely when either mined set is empty.
            pos, neg = pos & contributing.unsqueeze(1), neg & contributing.unsqueeze(1)
        else:
            contributing = pos.any(1) | neg.any(1)
        if not bool(contributing.any()):
            return zero_loss(embeddings, ref_embeddings)
        pos_scale, neg_scale, factor = self._scales()
        per_anchor = _ms_per_anchor(sim, pos, neg, pos_scale, neg_scale, self.base) * factor
        denom = per_anchor.shape[0] if self.reduction == "batch" else int(contributing.sum())
        return per_anchor.sum() / denom

    fast = True

    def fast_compute(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, self_cmp: bool, mined: Mined | None = None,
    ) -> Tensor:
        st = _fast.prepare(embeddings, ref_embeddings)
        pos_scale, neg_scale, factor = self._scales()
        base = self.base
        bound_p, bound_n = pos_scale * (1.0 + abs(base)), neg_scale * (1.0 + abs(base))
        with torch.no_grad():
            sim = _fast.similarity(st)
            safe = max(bound_p, bound_n) < _fast.EXP_SAFE.get(sim.dtype, 0.0)
            if not self.mining and safe:
                pairs = _fast.listed_positive_pairs(labels, ref_labels, ignore_mask, mined, self_cmp)
                if pairs is not None:
                    return self._from_positive_pair_list(st, sim, labels, ref_labels, pairs, bound_n)
                # 0/1 float masks (no bool pass); every anchor has a pair unless pairs are ignored or mined
                pos, neg = _fast.float_pair_masks(labels, ref_labels, ignore_mask, self_cmp, sim.dtype, mined)
                if ignore_mask is None and mined is None and ref_labels.shape[0] > (1 if self_cmp else 0):
                    contributing = None
                else:
                    contributing = torch.add(pos, neg).amax(1) > 0
            else:
                pos, neg = _fast.masks(labels, ref_labels, ignore_mask, self_cmp, mined)
                if self.mining:
                    pos, neg = fast_ms_selection(sim, pos, neg, self.epsilon)
                    contributing = _fast.row_any(pos) & _fast.row_any(neg)
                    st.nnz = _fast.count(pos) + _fast.count(neg)  # G is zero outside the mined pairs
                else:
                    contributing = _fast.row_any(pos) | _fast.row_any(neg)
            n_contrib = labels.shape[0] if contributing is None else int(contributing.sum())
            if n_contrib == 0:
                return _fast.zero(st)
            # The terms are log(1 + Σ e^{a}) with a = ∓scale·(S − λ); ∂L/∂S = W_neg − W_pos.
            denom = labels.shape[0] if self.reduction == "batch" else n_contrib
            rowed = self.mining and n_contrib < labels.shape[0]
            row = contributing.to(sim.dtype).mul_(factor / denom) if rowed else None
            k = row.unsqueeze(1) if rowed else factor / denom  # folded into W's normalisation
            # a = ∓scale·(S − λ) in one pass each (the second in place)
            a_p = torch.add(sim.new_tensor(pos_scale * base), sim, alpha=-pos_scale)
            v_p, w_p = _fast.log1p_sum_exp(a_p, pos, bound_p, k)
            a_n = torch.add(sim.new_tensor(-neg_scale * base), sim, alpha=neg_scale, out=sim)
            v_n, w_n = _fast.log1p_sum_exp(a_n, neg, bound_n, k)
            per_anchor = v_p.div_(pos_scale).add_(v_n, alpha=1.0 / neg_scale)
            value = per_anchor.dot(row) if rowed else per_anchor.sum() * (factor / denom)
            G = w_n.sub_(w_p)
        return _fast.finish(st, value, G)

    def _from_positive_pair_list(
        self, st: _fast.PairState, sim: Tensor, labels: Tensor, ref_labels: Tensor, pairs: tuple[Tensor, Tensor],
        bound_n: float,
    ) -> Tensor:
        """No mining, bounded exponents (``bound_n`` for the negative term), the positive pairs listed
        (:func:`_fast.listed_positive_pairs`): the positive term from the list instead of a set of passes over B×R;
        only the negative term stays dense. Every anchor has a pair (nothing ignored; a self comparison on such a grid has
        R ≥ 362), so both reductions divide by B."""
        b = sim.shape[0]
        rows, cols = pairs
        pos_scale, neg_scale, factor = self._scales()
        k = factor / b
        # positives, read before S is overwritten: e^{−α(S−λ)}, summed per anchor
        e_p = sim[rows, cols].mul_(-pos_scale).add_(pos_scale * self.base).exp_()
        s_p = sim.new_zeros(b).index_add_(0, rows, e_p)
        v_p = torch.log1p(s_p)
        w_p = e_p.mul_(s_p.add_(1.0).reciprocal_().mul_(k)[rows])
        neg = _fast.float_other_label_mask(labels, ref_labels, sim.dtype)
        a_n = torch.add(sim.new_tensor(-neg_scale * self.base), sim, alpha=neg_scale, out=sim)
        v_n, G = _fast.log1p_sum_exp(a_n, neg, bound_n, k)
        value = v_p.div_(pos_scale).add_(v_n, alpha=1.0 / neg_scale).sum() * k
        # G is 0 on the positive pairs (other-label mask), each listed once
        G.index_put_((rows, cols), w_p.neg_())
        return _fast.finish(st, value, G)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, base={self.base}, mining={self.mining}, "
                f"epsilon={self.epsilon}, reduction={self.reduction!r}")


class WeightLoss(MultiSimilarityLoss):
    r"""The "Weight" loss of Deep_Metric (``bnu-wangxun/Deep_metric:losses/Weight.py``), the precursor of MS.

        L_i = (2/β)·log(1 + Σ_{P_i} e^{−β(S−λ)}) + (2/α)·log(1 + Σ_{N_i} e^{α(S−λ)}),   L = Σ_i L_i / B

    Note the naming of that code: ``alpha`` scales the *negatives* (default 40, the script's value; the code's
    default is 10) and ``beta`` the *positives* (2). Optional mining identical to MS (ε = 0.1). With equal scales
    and λ it is exactly 2× :class:`MultiSimilarityLoss`. Deviation: the original reshapes the batch by a fixed
    number of instances per class; here any label layout works.
    """

    def __init__(
        self,
        alpha: float = 40.0,
        beta: float = 2.0,
        base: float = 0.5,
        *,
        mining: bool = True,
        epsilon: float = 0.1,
        reduction: Reduction = "batch",
    ) -> None:
        super().__init__(alpha=alpha, beta=beta, base=base, mining=mining, epsilon=epsilon, reduction=reduction)

    def _scales(self) -> tuple[float, float, float]:
        return self.beta, self.alpha, 2.0
