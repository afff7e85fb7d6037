"""Multi-Similarity loss (Wang et al., CVPR 2019) and its precursor, the "Weight" loss (Deep_Metric)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from deepmetric.functional import masked_logsumexp, masked_max, masked_min
from deepmetric.losses import reducers
from deepmetric.losses.base import PairLoss, Pairs

Reduction = Literal["batch", "contributing"]


def ms_pair_selection(sim: Tensor, positive: Tensor, negative: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """MS mining (the "P-similarity" step), dense over a B×R similarity matrix; masks bool or 0/1.

    N_i = {k ∈ N_i⁰ : S_ik + ε > min_{j∈P_i⁰} S_ij},  P_i = {j ∈ P_i⁰ : S_ij − ε < max_{k∈N_i⁰} S_ik}.
    Thresholds use the full sets (as the original code). An anchor without positives mines no negatives (min of
    an empty set is +∞) and vice versa, which also guards the original code's crash on empty ``min``.
    """
    s = sim.detach()
    min_pos = masked_min(s, positive, dim=1).unsqueeze(1)
    max_neg = masked_max(s, negative, dim=1).unsqueeze(1)
    keep_pos = (s - epsilon < max_neg).to(positive.dtype)
    keep_neg = (s + epsilon > min_pos).to(negative.dtype)
    return positive * keep_pos, negative * keep_neg


class MultiSimilarityLoss(PairLoss):
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

    metric = "cosine"

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
        self.reduction = reducers.check_reduction(type(self).__name__, reduction, ("batch", "contributing"))
        if alpha <= 0 or beta <= 0:
            raise ValueError(f"{type(self).__name__}: alpha and beta must be > 0, got {alpha}, {beta}")
        self.alpha, self.beta, self.base = float(alpha), float(beta), float(base)
        self.mining, self.epsilon = mining, float(epsilon)

    def _scales(self) -> tuple[float, float, float]:
        """(positive scale, negative scale, factor); WeightLoss names the scales the other way round."""
        return self.alpha, self.beta, 1.0

    def pair_loss(self, pairs: Pairs, embeddings: Tensor, ref_embeddings: Tensor) -> Tensor:
        sim, pos, neg = pairs.matrix, pairs.positive, pairs.negative
        if self.mining:
            pos, neg = ms_pair_selection(sim, pos, neg, self.epsilon)
            # The original code skips an anchor entirely when either mined set is empty.
            contributing = (pos.sum(1) > 0) & (neg.sum(1) > 0)
            row = contributing.to(sim.dtype).unsqueeze(1)
            pos, neg = pos * row, neg * row
        else:
            contributing = (pos.sum(1) > 0) | (neg.sum(1) > 0)
        pos_scale, neg_scale, factor = self._scales()
        pos_term = masked_logsumexp((self.base - sim) * pos_scale, pos, dim=1, add_one=True) / pos_scale
        neg_term = masked_logsumexp((sim - self.base) * neg_scale, neg, dim=1, add_one=True) / neg_scale
        per_anchor = (pos_term + neg_term) * factor
        return reducers.reduce(self.reduction, per_anchor, batch_size=pairs.batch_size, anchors=contributing)

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
