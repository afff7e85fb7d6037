"""Multi-class N-pair loss (Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss Objective", NIPS 2016)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from deepmetric.functional import as_float, gram_matrix, l2_normalize, zero_loss
from deepmetric.losses.base import MetricLoss, Mined, pair_masks


class NPairLoss(MetricLoss):
    r"""N-pair loss: one (anchor, positive) pair per class, each anchor's negatives are the other classes' positives.

        L = mean_c −log( e^{f_cᵀ f_c⁺} / Σ_{c'} e^{f_cᵀ f_{c'}⁺} )  = cross-entropy over the C×C matrix f·f⁺ᵀ

    Pair selection (deterministic, same as PML ``NPairsLoss``): for each class, the first anchor row (batch
    order) that has a valid positive, and that anchor's first positive column. Embeddings are L2-normalised
    first (PML's ``DotProductSimilarity`` default; ``normalize_embeddings=False`` for Sohn's unnormalised
    form, add an L2 embedding penalty yourself). With explicit references the positives come from the
    references. With ``mined=`` the first *mined* positive is used. O(B·R) selection + O(C²) logits.
    """

    accepts_mined = True

    def __init__(self, *, normalize_embeddings: bool = True) -> None:
        super().__init__()
        self.normalize_embeddings = normalize_embeddings

    def compute(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, mined: Mined | None = None,
    ) -> Tensor:
        anchors, positives = self.select_pairs(labels, ref_labels, ignore_mask, mined)
        if anchors.numel() == 0:
            return zero_loss(embeddings, ref_embeddings)
        # the 2C selected rows gathered and normalised together
        if ref_embeddings is embeddings:
            rows = embeddings.index_select(0, torch.cat([anchors, positives]))
        else:
            rows = torch.cat([embeddings.index_select(0, anchors), ref_embeddings.index_select(0, positives)])
        rows = as_float(rows)
        if self.normalize_embeddings:
            rows = l2_normalize(rows)
        x, y = rows.split(anchors.shape[0])
        logits = gram_matrix(x, y)
        return F.cross_entropy(logits, torch.arange(anchors.shape[0], device=logits.device))

    @staticmethod
    def select_pairs(
        labels: Tensor, ref_labels: Tensor, ignore_mask: Tensor | None, mined: Mined | None,
    ) -> tuple[Tensor, Tensor]:
        """(anchor rows, positive columns): per class the first anchor (batch order) with a valid positive, and
        that anchor's first positive."""
        pos, _ = pair_masks(labels, ref_labels, ignore_mask, mined)
        has = pos.any(1)
        first_pos = pos.to(torch.uint8).argmax(1)  # argmax returns the first maximal index
        b = labels.shape[0]
        _, cls = torch.unique(labels, return_inverse=True)
        rows = torch.arange(b, device=labels.device)
        candidate = torch.where(has, rows, torch.full_like(rows, b))
        first_row = torch.full((b,), b, device=labels.device, dtype=rows.dtype)  # class ids are < b
        first_row = first_row.scatter_reduce(0, cls, candidate, reduce="amin")
        anchors = first_row[first_row < b]
        return anchors, first_pos[anchors]
