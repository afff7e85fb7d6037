"""Multi-class N-pair loss (Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss Objective", NIPS 2016)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from deepmetric.functional import as_float, l2_normalize, zero_loss
from deepmetric.losses import _fast
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
        pos, _ = pair_masks(labels, ref_labels, ignore_mask, mined)
        return self._from_positives(embeddings, labels, ref_embeddings, pos)

    fast = True

    def fast_compute(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, self_cmp: bool, mined: Mined | None = None,
    ) -> Tensor:
        # Only the positive mask is needed (no B×B identity); the C×C logits are small and stay on autograd.
        with torch.no_grad():
            pos, _ = _fast.masks(labels, ref_labels, ignore_mask, self_cmp, mined)
        return self._from_positives(embeddings, labels, ref_embeddings, pos)

    def _from_positives(self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, pos: Tensor) -> Tensor:
        has = pos.any(1)
        if not bool(has.any()):
            return zero_loss(embeddings, ref_embeddings)
        b = labels.shape[0]
        first_pos = pos.to(torch.uint8).argmax(1)  # index of the first True per row
        _, cls = torch.unique(labels, return_inverse=True)
        rows = torch.arange(b, device=labels.device)
        cand = torch.where(has, rows, torch.full_like(rows, b))
        first_row = torch.full((int(cls.max()) + 1,), b, device=labels.device, dtype=rows.dtype)
        first_row = first_row.scatter_reduce(0, cls, cand, reduce="amin")
        anchors = first_row[first_row < b]
        x, y = as_float(embeddings[anchors]), as_float(ref_embeddings[first_pos[anchors]])
        if self.normalize_embeddings:
            x, y = l2_normalize(x), l2_normalize(y)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = x @ y.t()
        target = torch.arange(anchors.shape[0], device=logits.device)
        return F.cross_entropy(logits, target) + zero_loss(embeddings, ref_embeddings)
