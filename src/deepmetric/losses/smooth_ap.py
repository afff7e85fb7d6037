"""Smooth-AP (Brown, Xie, Kalogeiton, Zisserman, ECCV 2020)."""

from __future__ import annotations

from torch import Tensor

from deepmetric.losses.smooth_rank import DEFAULT_BLOCK_ELEMENTS, Reduction, SmoothRankLoss


class SmoothAPLoss(SmoothRankLoss):
    r"""Smooth-AP. Brown, Xie, Kalogeiton, Zisserman, "Smooth-AP: Smoothing the Path Towards Large-Scale Image
    Retrieval", ECCV 2020.

    Average precision with the Heaviside step of the ranks replaced by a sigmoid of temperature τ, on cosine
    similarities s_j = S_qj of query q to its retrieval set Ω_q (the query itself excluded) with positives P_q:

        AP_q = (1/|P_q|) Σ_{p∈P_q} [1 + Σ_{p'∈P_q, p'≠p} σ((s_p' − s_p)/τ)] / [1 + Σ_{j∈Ω_q, j≠p} σ((s_j − s_p)/τ)]

        L = mean_q (1 − AP_q)   (``reduction="contributing"``: over queries with positives; ``"batch"``: ÷ B)

    As τ → 0 the ratio is (rank of p among the positives) / (rank of p among all), and AP_q the exact AP.

    ``temperature`` τ = 0.01 (paper and code). Ranks are computed for the positives only and in memory-bounded
    query blocks (:mod:`deepmetric.losses.smooth_rank`); any label layout works.

    Deviations from the authors' code (``Andrew-Brown1/Smooth_AP``, ``src/losses.py``): the code ranks each query
    against the whole batch *including the query itself* (only j = p is masked), so the query counts as a
    positive at rank ≈ 1 of its own list and every other positive's two ranks grow by ≈ 1; it also needs
    class-sorted batches with a fixed number of samples per class and divides by B. Here the query is excluded
    (the paper's definition, the one evaluation uses), and queries without positives are left out of the mean.
    """

    def __init__(self, temperature: float = 0.01, *, reduction: Reduction = "contributing",
                 block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> None:
        super().__init__(temperature, reduction=reduction, block_elements=block_elements)

    def query_losses(self, ranks_all: Tensor, ranks_pos: Tensor, valid: Tensor, n_pos: Tensor) -> Tensor:
        precision = (ranks_pos / ranks_all * valid).sum(1) / n_pos.clamp_min(1.0)
        return 1.0 - precision

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}, block_elements={self.block_elements}"
