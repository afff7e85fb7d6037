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
        has = pos.any(1)
        if not bool(has.any()):
            return zero_loss(embeddings, ref_embeddings)
        return self._from_first_positive(embeddings, labels, ref_embeddings, has, _fast.u8(pos).argmax(1))

    fast = True

    def fast_compute(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, self_cmp: bool, mined: Mined | None = None,
    ) -> Tensor:
        # The (anchor, positive) rows, then value and gradient of the C×C cross-entropy on those 2C rows
        # (gathered and normalised together); the backward copies the 2C×d gradient block into zeros.
        like = (embeddings,) if ref_embeddings is embeddings else (embeddings, ref_embeddings)
        with torch.no_grad():
            if self_cmp and ignore_mask is None and mined is None:
                anchors, positives = _first_two_of_each_label(labels)
            else:
                anchors, positives = self._first_positive_pairs(labels, ref_labels, ignore_mask, self_cmp, mined)
        n = anchors.shape[0]
        if n == 0:
            return zero_loss(*like)
        with torch.no_grad():
            same = ref_embeddings is embeddings
            x = embeddings.detach()
            if same:
                rows = torch.cat((anchors, positives))
                z = _fast.Normalized(x.index_select(0, rows), self.normalize_embeddings)
            else:
                z = _fast.Normalized(torch.cat((x.index_select(0, anchors),
                                                ref_embeddings.detach().index_select(0, positives))),
                                     self.normalize_embeddings)
            xa, xp = z.xn[:n], z.xn[n:]
            # unit rows bound the logits by 1; unnormalised ones are not bounded
            bound = 1.0 + 1e-3 if self.normalize_embeddings else float("inf")
            value, w = _fast.cross_entropy(torch.mm(xa, xp.t()), None, bound)
            g = torch.empty_like(z.xn)
            torch.mm(w, xp, out=g[:n])
            torch.mm(w.t(), xa, out=g[n:])
            g = z.backward(g, value.new_ones(()))
        if not torch.is_grad_enabled():
            return value
        if same:
            # anchors and positives are distinct rows under self comparison (one anchor per class, its positive
            # another row); not so when the batch is passed explicitly as its own reference
            return _fast.finish_rows(embeddings, None, value, ((0, rows, g),), distinct=self_cmp)
        return _fast.finish_rows(embeddings, ref_embeddings, value, ((0, anchors, g[:n]), (1, positives, g[n:])),
                                 distinct=True)

    def _first_positive_pairs(
        self, labels: Tensor, ref_labels: Tensor, ignore_mask: Tensor | None, self_cmp: bool, mined: Mined | None,
    ) -> tuple[Tensor, Tensor]:
        """Per class, the first anchor row (batch order) with a valid positive and that anchor's first positive.
        (A self comparison without ignore_mask or mined tuples takes :func:`_first_two_of_each_label` instead.)"""
        if ignore_mask is None and mined is None and not self_cmp:
            # No B×R mask: stable sort of the reference labels, the first reference index of the anchor's class.
            sorted_l, order = torch.sort(ref_labels, stable=True)
            lab = labels.to(device=sorted_l.device, dtype=sorted_l.dtype)
            lo = torch.searchsorted(sorted_l, lab)
            has = torch.searchsorted(sorted_l, lab, right=True) > lo
            first_pos = order[lo.clamp_max(ref_labels.shape[0] - 1)]
        else:
            pos, _ = _fast.masks(labels, ref_labels, ignore_mask, self_cmp, mined)
            has = _fast.row_any(pos)
            first_pos = _fast.u8(pos).argmax(1)  # index of the first True per row
        # per class the first anchor row (batch order) with a positive: a stable sort by label, first of each run
        cand = has.nonzero().squeeze(1)
        lab, order = torch.sort(labels[cand], stable=True)
        first = torch.ones_like(lab, dtype=torch.bool)
        first[1:] = lab[1:] != lab[:-1]
        anchors = cand[order[first]]
        return anchors, first_pos[anchors]

    def _from_first_positive(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, has: Tensor, first_pos: Tensor,
    ) -> Tensor:
        b = labels.shape[0]
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
        like = (embeddings,) if ref_embeddings is embeddings else (embeddings, ref_embeddings)
        return F.cross_entropy(logits, target) + zero_loss(*like)


def _first_two_of_each_label(labels: Tensor) -> tuple[Tensor, Tensor]:
    """For every label occurring at least twice: its first and second row in batch order (one stable sort)."""
    sorted_l, order = torch.sort(labels, stable=True)
    same_as_next = sorted_l[1:] == sorted_l[:-1]
    # k starts a run of ≥ 2 equal labels: equal to its successor and (k = 0 or) different from its predecessor
    starts_pair = same_as_next.clone()
    starts_pair[1:] &= ~same_as_next[:-1]
    k = starts_pair.nonzero().squeeze(1)
    return order[k], order[k + 1]
