"""Lifted structure losses: original (Oh Song et al.), "modified" (Deep_Metric), "generalized" (Hermans et al.)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from deepmetric.functional import masked_logsumexp
from deepmetric.losses import reducers
from deepmetric.losses.base import PairLoss, Pairs
from deepmetric.losses.multi_similarity import ms_pair_selection

Variant = Literal["original", "modified", "generalized"]


class LiftedStructureLoss(PairLoss):
    r"""Lifted structure loss in three published variants (``variant``).

    ``"original"`` — Oh Song, Xiang, Jegelka, Savarese, "Deep Metric Learning via Lifted Structured Feature
    Embedding", CVPR 2016 (PML ``LiftedStructureLoss``). For every positive pair (i, j), D on L2-normalised
    embeddings:

        J_ij = log(Σ_{k∈N_i} e^{m_neg − D_ik} + Σ_{l∈N_j} e^{m_neg − D_jl}) + D_ij − m_pos,
        L = 1/(2|P|) Σ_{(i,j)∈P} [J_ij]₊²                       (mean over ordered pairs of [J]₊²/2)

      Dense: the two sums are per-row log-sum-exps combined with ``logaddexp``, so no P×N list is built. N_j
      are the negatives of j as an anchor when the reference set is the batch; with explicit references they
      are the batch rows of another class than reference j (the column of the same B×R matrix).

    ``"modified"`` — Deep_Metric ``losses/LiftedStructure.py``, on cosine similarities, no margin:

        L_i = (2/β)·log Σ_{j∈P_i} e^{−β S_ij} + (2/α)·log Σ_{k∈N_i} e^{α S_ik},  L = Σ_i L_i / B,  α 40, β 2

      (the value may be negative). ``mining=True`` applies the MS pair selection (ε = ``epsilon``).

    ``"generalized"`` — Hermans, Beyer, Leibe, "In Defense of the Triplet Loss", 2017 (PML
    ``GeneralizedLiftedStructureLoss``, DAS ``loss/lifted.py``):

        L_i = [log Σ_{j∈P_i} e^{D_ij − m_pos} + log Σ_{k∈N_i} e^{m_neg − D_ik}]₊,  + ``l2_weight``·mean_i ‖z_i‖

      DAS uses unnormalised embeddings (``normalize_embeddings=False``) and ``l2_weight=0.005``.

    ``reduction`` (modified/generalized): ``"batch"`` ÷B, ``"contributing"`` ÷#anchors having both a positive
    and a negative. Deviations from PML: an anchor (or pair) with an empty positive or negative set contributes
    nothing (PML treats the log of an empty sum as 0); on batches where every anchor has both, values agree.
    """

    def __init__(
        self,
        neg_margin: float = 1.0,
        pos_margin: float = 0.0,
        *,
        variant: Variant = "original",
        alpha: float = 40.0,
        beta: float = 2.0,
        mining: bool = False,
        epsilon: float = 0.1,
        l2_weight: float = 0.0,
        normalize_embeddings: bool = True,
        reduction: Literal["batch", "contributing"] = "batch",
    ) -> None:
        super().__init__()
        if variant not in ("original", "modified", "generalized"):
            raise ValueError(f"LiftedStructureLoss.variant must be original/modified/generalized, got {variant!r}")
        self.reduction = reducers.check_reduction("LiftedStructureLoss", reduction, ("batch", "contributing"))
        self.neg_margin, self.pos_margin, self.variant = float(neg_margin), float(pos_margin), variant
        self.alpha, self.beta, self.mining, self.epsilon = float(alpha), float(beta), mining, float(epsilon)
        self.l2_weight, self.normalize_embeddings = float(l2_weight), normalize_embeddings
        self.metric = "cosine" if variant == "modified" else "distance"

    def pair_loss(self, pairs: Pairs, embeddings: Tensor, ref_embeddings: Tensor) -> Tensor:
        if self.variant == "original":
            loss = self._original(pairs, same=ref_embeddings is embeddings)
        else:
            m, pos, neg = pairs.matrix, pairs.positive, pairs.negative
            if self.variant == "modified":
                if self.mining:
                    pos, neg = ms_pair_selection(m, pos, neg, self.epsilon)
                per_anchor = ((2.0 / self.beta) * masked_logsumexp(-self.beta * m, pos, 1)
                              + (2.0 / self.alpha) * masked_logsumexp(self.alpha * m, neg, 1))
            else:
                per_anchor = torch.relu(masked_logsumexp(m - self.pos_margin, pos, 1)
                                        + masked_logsumexp(self.neg_margin - m, neg, 1))
            # an empty set's log-sum-exp is a large negative number: such anchors are left out
            ok = (pos.sum(1) > 0) & (neg.sum(1) > 0)
            loss = reducers.reduce(self.reduction, per_anchor * ok, batch_size=pairs.batch_size, anchors=ok)
        if self.l2_weight:
            loss = loss + self.l2_weight * embeddings.norm(dim=1).mean()
        return loss

    def _original(self, pairs: Pairs, same: bool) -> Tensor:
        d, pos, neg = pairs.matrix, pairs.positive, pairs.negative
        margin_term = self.neg_margin - d
        row = masked_logsumexp(margin_term, neg, 1)  # B: log Σ_{k∈N_i} e^{m − D_ik}
        # N_j = the negatives of j as an anchor (the same rows) when the references are the batch itself, else
        # the batch rows that are negatives of reference j
        col = row if same else masked_logsumexp(margin_term, neg, 0)
        j = torch.logaddexp(row.unsqueeze(1), col.unsqueeze(0)) + d - self.pos_margin
        # a pair without a negative on either side has J ≈ −1e30 (log of an empty sum): [J]₊ = 0
        return (torch.relu(j).square() * pos).sum() / (2.0 * pos.sum()).clamp_min(1)

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, neg_margin={self.neg_margin}, pos_margin={self.pos_margin}"
