"""Contrastive loss, distance form (Hadsell et al. 2006 / PML) and similarity form (Deep_Metric, XBM, IAA)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from deepmetric.losses import reducers
from deepmetric.losses.base import PairLoss, Pairs

PairReduction = Literal["avg_nonzero", "mean", "batch", "sum"]


class ContrastiveLoss(PairLoss):
    r"""Contrastive loss over all (or mined) pairs, dense over one B×R matrix.

    ``form="distance"`` (Hadsell, Chopra, LeCun, CVPR 2006, in PML's hinge form), D = ‖x̂ − ŷ‖ on L2-normalised
    embeddings (``normalize_embeddings``):

        ℓ⁺ = [D_ap − m_pos]₊,   ℓ⁻ = [m_neg − D_an]₊          defaults m_pos = 0, m_neg = 1 (PML)

    ``form="similarity"`` (Deep_Metric ``losses/Contrastive.py``, XBM ``contrastive_loss.py``, IAA ``losses.py``),
    on cosine similarities S:

        ℓ⁺ = [m_pos − S_ap]₊,   ℓ⁻ = S_an·[S_an > m_neg]  (``negative_term="similarity"``, XBM/Deep_Metric)
                                ℓ⁻ = [S_an − m_neg]₊       (``negative_term="hinge"``, IAA with m_pos 0.8)
        defaults m_pos = 1, m_neg = 0.5 (XBM), reduction ``"batch"`` = Σ pairs / B.

    Both negative terms have the same gradient; they differ in value by m_neg per hard negative.

    ``reduction`` (:mod:`deepmetric.losses.reducers`), applied to the positive and the negative terms separately
    and summed: ``"avg_nonzero"`` (PML's AvgNonZeroReducer; default of the distance form), ``"mean"`` (DAS),
    ``"batch"`` (Σ over pairs ÷ B, XBM's code; default of the similarity form — the value grows with the number
    of hard pairs), ``"sum"``.

    Deviations: self-pairs are removed by index (the similarity-form codes use ``S < 1 − 1e-5``, which also
    drops exact duplicates). With :class:`MinedTriplets`, a pair used by several triplets counts once (PML
    counts it once per triplet).
    """

    def __init__(
        self,
        pos_margin: float | None = None,
        neg_margin: float | None = None,
        *,
        form: Literal["distance", "similarity"] = "distance",
        negative_term: Literal["similarity", "hinge"] = "similarity",
        reduction: PairReduction | None = None,
        normalize_embeddings: bool = True,
    ) -> None:
        super().__init__()
        if form not in ("distance", "similarity"):
            raise ValueError(f"ContrastiveLoss.form must be 'distance' or 'similarity', got {form!r}")
        if negative_term not in ("similarity", "hinge"):
            raise ValueError(f"ContrastiveLoss.negative_term must be 'similarity' or 'hinge', got {negative_term!r}")
        dist = form == "distance"
        self.form = form
        self.metric = "distance" if dist else "cosine"
        self.pos_margin = float(pos_margin if pos_margin is not None else (0.0 if dist else 1.0))
        self.neg_margin = float(neg_margin if neg_margin is not None else (1.0 if dist else 0.5))
        self.negative_term = negative_term
        self.reduction = reducers.check_reduction(
            "ContrastiveLoss", reduction or ("avg_nonzero" if dist else "batch"), ("avg_nonzero", "mean", "batch", "sum"))
        self.normalize_embeddings = normalize_embeddings

    def pair_loss(self, pairs: Pairs, embeddings: Tensor, ref_embeddings: Tensor) -> Tensor:
        m, pos, neg = pairs.matrix, pairs.positive, pairs.negative
        if self.form == "distance":
            pos_loss = torch.relu(m - self.pos_margin) * pos
            neg_loss = torch.relu(self.neg_margin - m) * neg
        else:
            pos_loss = torch.relu(self.pos_margin - m) * pos
            if self.negative_term == "hinge":
                neg_loss = torch.relu(m - self.neg_margin) * neg
            else:
                neg_loss = m * (m.detach() > self.neg_margin).to(m.dtype) * neg
        b = pairs.batch_size
        return (reducers.reduce(self.reduction, pos_loss, selected=pos, batch_size=b)
                + reducers.reduce(self.reduction, neg_loss, selected=neg, batch_size=b))

    def extra_repr(self) -> str:
        return (f"form={self.form!r}, pos_margin={self.pos_margin}, neg_margin={self.neg_margin}, "
                f"reduction={self.reduction!r}")
