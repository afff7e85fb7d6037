"""Margin loss with learnable class boundaries (Wu, Manmatha, Smola, Krähenbühl, "Sampling Matters in Deep
Embedding Learning", ICCV 2017)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from deepmetric.losses import reducers
from deepmetric.losses.base import Mined, MinedTriplets, PairLoss, Pairs, valid_triplets


class MarginLoss(PairLoss):
    r"""Margin loss on triplets (a, p, n), D = Euclidean distance of L2-normalised embeddings:

        ℓ⁺ = [D_ap − β_{y_a} + m]₊,   ℓ⁻ = [β_{y_a} − D_an + m]₊,
        L = Σ_triplets (ℓ⁺ + ℓ⁻) / divisor  + ν·β-regulariser

    ``reduction`` chooses the divisor: ``"avg_nonzero"`` (default, PML) counts the non-zero *terms*,
    #{ℓ⁺ > 0} + #{ℓ⁻ > 0}; ``"active_triplets"`` (DAS ``loss/margin.py``, research-ms-loss
    ``losses/margin_loss.py``) counts the *triplets* with ℓ⁺ > 0 or ℓ⁻ > 0. The two differ whenever a triplet
    has both terms active (up to 2×).

    β is one shared scalar, or one per class with ``num_classes`` (labels must be 0..C−1), initialised to
    ``beta`` (1.2) and learnable when ``learn_beta`` (paper; PML's default is ``learn_beta=False``). The
    regulariser is ν·β (shared β) or Σ_triplets ν·β_{y_a} / divisor (per-class β), as in PML (DAS does not divide
    it; it uses ν = 0). ``lr_multiplier`` scales β's learning rate in the trainer (DAS uses a separate β lr of 5e-4
    with a model lr of 1e-5: 50).

    Without ``mined`` (or with :class:`MinedPairs`) all triplets are used, evaluated densely: each positive
    pair appears once per negative of its anchor and vice versa, so the sums are weighted pair sums (O(B·R)).
    With :class:`MinedTriplets` (e.g. distance-weighted sampling, the paper's setting) exactly those triplets.
    Deviation: the research-ms-loss code never optimises β (it is not given to the optimiser).
    """

    build_arguments = ("num_classes",)

    def __init__(
        self,
        margin: float = 0.2,
        nu: float = 0.0,
        beta: float = 1.2,
        *,
        learn_beta: bool = True,
        num_classes: int | None = None,
        lr_multiplier: float = 1.0,
        normalize_embeddings: bool = True,
        reduction: str = "avg_nonzero",
    ) -> None:
        super().__init__()
        self.reduction = reducers.check_reduction("MarginLoss", reduction, ("avg_nonzero", "active_triplets"))
        self.margin, self.nu, self.learn_beta = float(margin), float(nu), learn_beta
        self.num_classes = num_classes
        init = torch.full((num_classes if num_classes else 1,), float(beta))
        if learn_beta:
            self.beta = nn.Parameter(init)
        else:
            self.register_buffer("beta", init)
        self.lr_multiplier = float(lr_multiplier)
        self.metric = "distance"
        self.normalize_embeddings = normalize_embeddings

    def _anchor_beta(self, labels: Tensor, dtype: torch.dtype) -> Tensor:
        beta = self.beta.to(dtype)
        if self.num_classes is None:
            return beta.expand(labels.shape[0])
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"MarginLoss with num_classes={self.num_classes} needs labels in 0..{self.num_classes - 1}")
        return beta[labels]

    def compute(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, mined: Mined | None = None,
    ) -> Tensor:
        if not isinstance(mined, MinedTriplets):
            return super().compute(embeddings, labels, ref_embeddings, ref_labels, ignore_mask, mined)
        a, p, n = valid_triplets(mined, labels, ref_labels, ignore_mask)
        d_ap, d_an = self.triplet_distances(embeddings, ref_embeddings, a, p, n)
        beta = self._anchor_beta(labels, d_ap.dtype)[a]
        pos_terms, neg_terms = torch.relu(d_ap - beta + self.margin), torch.relu(beta - d_an + self.margin)
        active = ((pos_terms.detach() > 0) | (neg_terms.detach() > 0)).to(pos_terms.dtype)
        return self._with_regulariser(torch.cat([pos_terms, neg_terms]), None, active, beta.sum())

    def pair_loss(self, pairs: Pairs, embeddings: Tensor, ref_embeddings: Tensor) -> Tensor:
        d, pos, neg = pairs.matrix, pairs.positive, pairs.negative
        beta = self._anchor_beta(pairs.labels, d.dtype)
        n_pos, n_neg = pos.sum(1, keepdim=True), neg.sum(1, keepdim=True)
        b = beta.unsqueeze(1)
        # pos and neg are disjoint: one matrix of terms. Every (a, p) is in |N_a| triplets, every (a, n) in |P_a|.
        terms = torch.relu(d - b + self.margin) * pos + torch.relu(b - d + self.margin) * neg
        weights = pos * n_neg + neg * n_pos
        # a triplet (a, p, n) is inactive only when both its terms are 0: per anchor, all |P_a|·|N_a| triplets
        # minus (#positives with ℓ⁺ = 0)·(#negatives with ℓ⁻ = 0)
        inactive = (terms.detach() <= 0).to(terms.dtype)
        active = n_pos * n_neg - (inactive * pos).sum(1, keepdim=True) * (inactive * neg).sum(1, keepdim=True)
        return self._with_regulariser(terms, weights, active, (beta * (n_pos * n_neg).squeeze(1)).sum())

    def _with_regulariser(
        self, terms: Tensor, weights: Tensor | None, active: Tensor, triplet_beta_sum: Tensor,
    ) -> Tensor:
        """The chosen reduction of the terms plus ν·β (shared β) or ν·Σ_triplets β_{y_a} / divisor (per-class β,
        only when some term is non-zero). ``active``: the active-triplet indicator or per-anchor count."""
        if self.reduction == "avg_nonzero":
            loss = reducers.avg_nonzero(terms, weights)
        else:
            loss = reducers.active_triplets(terms if weights is None else terms * weights, active)
        if self.learn_beta and self.nu:
            if self.num_classes is None:
                loss = loss + self.nu * self.beta.to(terms.dtype).sum()
            else:
                divisor = reducers.nonzero_count(terms, weights) if self.reduction == "avg_nonzero" else active.sum()
                loss = loss + self.nu * triplet_beta_sum / divisor.clamp_min(1) * (divisor > 0)
        return loss

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, nu={self.nu}, learn_beta={self.learn_beta}, num_classes={self.num_classes}, "
                f"reduction={self.reduction}")
