"""Neighbourhood Components Analysis loss (Goldberger, Roweis, Hinton, Salakhutdinov, NIPS 2004)."""

from __future__ import annotations

import torch
from torch import Tensor

from deepmetric.functional import masked_logsumexp, pairwise_distance, zero_loss
from deepmetric.losses import _fast
from deepmetric.losses.base import MetricLoss, Mined, pair_masks


class NCALoss(MetricLoss):
    r"""NCA: the probability that an anchor's stochastic nearest neighbour has its class.

        p_i = Σ_{j∈P_i} e^{−s·D²_ij} / Σ_{j∈P_i∪N_i} e^{−s·D²_ij},   L = −mean_{i: P_i≠∅} log p_i

    D² = squared Euclidean distance of L2-normalised embeddings (PML ``NCALoss``: ``LpDistance(power=2)``),
    s = ``softmax_scale`` (PML default 1; Deep_Metric's KNN-softmax used 30 on 1 − D). Computed as a difference
    of two log-sum-exps (stable; PML takes log of a softmax sum and drops anchors whose sum underflows to 0).
    With ``mined=`` the neighbourhood is restricted to the mined pairs.
    """

    accepts_mined = True

    def __init__(self, softmax_scale: float = 1.0, *, normalize_embeddings: bool = True) -> None:
        super().__init__()
        self.softmax_scale, self.normalize_embeddings = float(softmax_scale), normalize_embeddings

    def compute(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, mined: Mined | None = None,
    ) -> Tensor:
        pos, neg = pair_masks(labels, ref_labels, ignore_mask, mined)
        has = pos.any(1)
        if not bool(has.any()):
            return zero_loss(embeddings, ref_embeddings)
        logits = -self.softmax_scale * pairwise_distance(
            embeddings, ref_embeddings, normalize=self.normalize_embeddings, squared=True
        )
        log_p = masked_logsumexp(logits, pos, 1) - masked_logsumexp(logits, pos | neg, 1)
        return -(log_p.masked_fill(~has, 0.0).sum() / has.sum())

    fast = True

    def fast_compute(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, self_cmp: bool, mined: Mined | None = None,
    ) -> Tensor:
        # One exp pass serves both log-sum-exps: the all-pairs sum, and the positives' sum as its masked part.
        st = _fast.prepare(embeddings, ref_embeddings, self.normalize_embeddings)
        with torch.no_grad():
            pos, neg = _fast.masks(labels, ref_labels, ignore_mask, self_cmp, mined)
            has = _fast.row_any(pos)
            n_has = int(has.sum())
            if n_has == 0:
                return _fast.zero(st)
            valid = neg.logical_or_(pos)
            s = self.softmax_scale
            a = _fast.distance(st, squared=True).mul_(-s)  # logits ≤ 0
            # On unit rows D² ≤ 4: e^{a} neither overflows nor underflows to 0 below the safe exponent.
            if self.normalize_embeddings and 4.0 * (1.0 + 1e-3) * abs(s) < _fast.EXP_SAFE.get(a.dtype, 0.0):
                e = a.exp_().mul_(_fast.u8(valid))
                ep = e * _fast.u8(pos)
                lse_a, lse_p = torch.log(e.sum(1)), torch.log(ep.sum(1))
                za, zp = e.sum(1, keepdim=True), ep.sum(1, keepdim=True)
            else:
                ninf = float("-inf")
                ma = torch.where(valid, a, ninf).amax(1, keepdim=True)
                mp = torch.where(pos, a, ninf).amax(1, keepdim=True)
                ma = torch.where(torch.isfinite(ma), ma, 0.0)
                mp = torch.where(torch.isfinite(mp), mp, 0.0)
                ep = torch.where(pos, (a - mp).exp_(), 0.0)
                e = torch.where(valid, a.sub_(ma).exp_(), 0.0)
                za, zp = e.sum(1, keepdim=True), ep.sum(1, keepdim=True)
                lse_a, lse_p = torch.log(za).add_(ma).squeeze(1), torch.log(zp).add_(mp).squeeze(1)
            hasf = has.to(e.dtype).unsqueeze(1)
            tiny = torch.finfo(e.dtype).tiny
            value = (lse_a - lse_p).masked_fill_(~has, 0.0).sum() / n_has
            # ∂L/∂a = (softmax_all − softmax_pos)/H on anchors with a positive; ∂L/∂D² = −s·∂L/∂a.
            k = -s / n_has
            gd = e.mul_(hasf.div(za.clamp_min_(tiny)).mul_(k)).sub_(ep.mul_(hasf.div(zp.clamp_min_(tiny)).mul_(k)))
            G = _fast.distance_grad(st, gd, None, squared=True)  # type: ignore[arg-type]
        return _fast.finish(st, value, G)
