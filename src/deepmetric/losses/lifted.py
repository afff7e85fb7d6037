"""Lifted structure losses: original (Oh Song et al.), "modified" (Deep_Metric), "generalized" (Hermans et al.)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from deepmetric.functional import cosine_similarity_matrix, masked_logsumexp, pairwise_distance, zero_loss
from deepmetric.losses import _fast
from deepmetric.losses.base import MetricLoss, Mined, pair_masks
from deepmetric.losses.multi_similarity import fast_ms_selection, ms_pair_selection

Variant = Literal["original", "modified", "generalized"]


def _lse(x: Tensor, mask: Tensor, dim: int) -> Tensor:
    """log Σ_mask eˣ; empty rows give the dtype's most negative finite value (finite, so backward has no NaN)."""
    return masked_logsumexp(x, mask, dim=dim)


class LiftedStructureLoss(MetricLoss):
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

    accepts_mined = True

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
        if reduction not in ("batch", "contributing"):
            raise ValueError(f"LiftedStructureLoss.reduction must be 'batch' or 'contributing', got {reduction!r}")
        self.neg_margin, self.pos_margin, self.variant = float(neg_margin), float(pos_margin), variant
        self.alpha, self.beta, self.mining, self.epsilon = float(alpha), float(beta), mining, float(epsilon)
        self.l2_weight, self.normalize_embeddings, self.reduction = float(l2_weight), normalize_embeddings, reduction

    def compute(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, mined: Mined | None = None,
    ) -> Tensor:
        pos, neg = pair_masks(labels, ref_labels, ignore_mask, mined)
        if self.variant == "original":
            return self._original(embeddings, ref_embeddings, pos, neg)
        if self.variant == "modified":
            s = cosine_similarity_matrix(embeddings, ref_embeddings)
            if self.mining:
                pos, neg = ms_pair_selection(s, pos, neg, self.epsilon)
            per_anchor = (2.0 / self.beta) * _lse(-self.beta * s, pos, 1) + (2.0 / self.alpha) * _lse(self.alpha * s, neg, 1)
        else:
            d = pairwise_distance(embeddings, ref_embeddings, normalize=self.normalize_embeddings)
            per_anchor = torch.relu(_lse(d - self.pos_margin, pos, 1) + _lse(self.neg_margin - d, neg, 1))
        ok = pos.any(1) & neg.any(1)
        reg = self.l2_weight * embeddings.norm(dim=1).mean() if self.l2_weight else None
        if not bool(ok.any()):
            out = zero_loss(embeddings, ref_embeddings)
            return out if reg is None else out + reg
        denom = embeddings.shape[0] if self.reduction == "batch" else int(ok.sum())
        out = per_anchor.masked_fill(~ok, 0.0).sum() / denom
        return out if reg is None else out + reg

    def _original(self, embeddings: Tensor, ref_embeddings: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        d = pairwise_distance(embeddings, ref_embeddings, normalize=self.normalize_embeddings)
        if not bool(pos.any()) or not bool(neg.any()):
            return zero_loss(embeddings, ref_embeddings)
        margin_term = self.neg_margin - d
        row, row_has = _lse(margin_term, neg, 1), neg.any(1)  # B: log Σ_{k∈N_i} e^{m − D_ik}
        if ref_embeddings is embeddings:
            col, col_has = row, row_has  # N_j = negatives of j as an anchor (same rows, same masks)
        else:
            col, col_has = _lse(margin_term, neg, 0), neg.any(0)  # R: batch rows that are negatives of ref j
        both = torch.logaddexp(row.unsqueeze(1), col.unsqueeze(0))
        j = both + d - self.pos_margin
        # A pair with no negative on either side has J = −∞ (log of an empty sum): it contributes nothing.
        keep = pos & (row_has.unsqueeze(1) | col_has.unsqueeze(0))
        j = torch.where(keep, j, torch.zeros_like(j))
        return (torch.relu(j) ** 2).sum() / (2.0 * pos.sum()) + zero_loss(embeddings, ref_embeddings)

    fast = True

    def fast_compute(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, self_cmp: bool, mined: Mined | None = None,
    ) -> Tensor:
        reg = self.l2_weight * embeddings.norm(dim=1).mean() if self.l2_weight else None
        out = self._fast_core(embeddings, labels, ref_embeddings, ref_labels, ignore_mask, self_cmp, mined)
        return out if reg is None else out + reg

    def _fast_core(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, self_cmp: bool, mined: Mined | None,
    ) -> Tensor:
        modified = self.variant == "modified"
        norm = self.normalize_embeddings or modified
        st = _fast.prepare(embeddings, ref_embeddings, norm)
        with torch.no_grad():
            if self.variant == "generalized" and norm and self._bounded():
                dtype, b = st.nx.xf.dtype, labels.shape[0]
                # few positive pairs (m-per-class batches): their term from the pair list, no positive mask
                pairs = _fast.listed_positive_pairs(labels, ref_labels, ignore_mask, mined, self_cmp)
                if pairs is not None:
                    pos, neg = None, _fast.float_other_label_mask(labels, ref_labels, dtype)
                else:
                    pos, neg = _fast.float_pair_masks(labels, ref_labels, ignore_mask, self_cmp, dtype, mined)
                return self._fast_generalized_unit(st, pos, neg, b, pairs)
            pos, neg = _fast.masks(labels, ref_labels, ignore_mask, self_cmp, mined)
            if self.variant == "original":
                return self._fast_original(st, pos, neg, norm)
            if not modified:
                return self._fast_generalized(st, pos, neg, norm, embeddings.shape[0])
            m = _fast.similarity(st)
            if self.mining:
                pos, neg = fast_ms_selection(m, pos, neg, self.epsilon)
            ok = _fast.row_any(pos) & _fast.row_any(neg)
            n_ok = int(ok.sum())
            if n_ok == 0:
                return _fast.zero(st)
            denom = float(embeddings.shape[0] if self.reduction == "batch" else n_ok)
            a, b = self.alpha, self.beta
            v_p, w_p = _fast.log_sum_exp(m.mul(-b), pos, abs(b) * (1.0 + 1e-6))
            v_n, w_n = _fast.log_sum_exp(m.mul_(a), neg, abs(a) * (1.0 + 1e-6))
            per_anchor = v_p.mul_(2.0 / b).add_(v_n, alpha=2.0 / a)
            # ∂L/∂S = (2/denom)·(W⁻ − W⁺) on contributing anchors
            row = ok.to(m.dtype).mul_(2.0 / denom).unsqueeze(1)
            value = per_anchor.masked_fill_(~ok, 0.0).sum() / denom
            return _fast.finish(st, value, w_n.sub_(w_p).mul_(row))

    def _bounded(self) -> bool:
        """e^{±(D − m)} neither overflows nor underflows on unit rows (D ≤ 2) for these margins."""
        bound = 2.0 + max(abs(self.pos_margin), abs(self.neg_margin)) + abs(self.neg_margin - self.pos_margin)
        return bound < _fast.EXP_SAFE[torch.float32]

    def _fast_generalized_unit(
        self, st: _fast.PairState, pos: Tensor | None, neg: Tensor, b: int,
        pairs: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """The generalized loss on unit rows with 0/1 masks ``pos``/``neg`` (consumed), or with the positive pairs
        listed (``pairs``: rows, cols; ``pos`` None). Both sums use e^{±(D − m⁺)}:
        e^{m⁻ − D} = e^{m⁻ − m⁺}·e^{m⁺ − D}, and the constant factor cancels in the weights (with masks one
        exponential serves both)."""
        d = _fast.distance(st, squared=False)
        if pairs is None:
            e_p = torch.sub(d, self.pos_margin).exp_()
            e_n = torch.reciprocal(e_p).mul_(neg)
            e_p.mul_(pos)
            s_p = e_p.sum(1)
        else:
            rows, cols = pairs
            e_p = d[rows, cols].sub_(self.pos_margin).exp_()
            s_p = d.new_zeros(d.shape[0]).index_add_(0, rows, e_p)
            e_n = torch.rsub(d, self.pos_margin).exp_().mul_(neg)
        s_n = e_n.sum(1)
        ok = (s_p > 0).logical_and_(s_n > 0)  # rows with both kinds of pairs
        tiny = torch.finfo(d.dtype).tiny
        per_anchor = s_p.clamp_min(tiny).log_().add_(s_n.clamp_min(tiny).log_()).add_(
            self.neg_margin - self.pos_margin)
        n_ok = int(ok.sum())
        if n_ok == 0:
            return _fast.zero(st)
        denom = float(b if self.reduction == "batch" else n_ok)
        act = (per_anchor > 0).logical_and_(ok).to(d.dtype).div_(denom)
        value = torch.dot(per_anchor, act)
        if not bool(act.any()):
            return _fast.finish(st, value, None)
        # ∂L/∂D = act·(W⁺ − W⁻) with W = e / Σe per row; ∂D/∂S = −1/D
        coef_p = act.div(s_p.clamp_min_(tiny))
        G = e_n.mul_(act.div_(s_n.clamp_min_(tiny)).unsqueeze(1))
        if pairs is None:
            G.addcmul_(e_p, coef_p.unsqueeze(1), value=-1.0)
        else:  # G is 0 on the positive pairs (other-label mask), each listed once
            G.index_put_((rows, cols), e_p.mul_(coef_p[rows]).neg_())
        return _fast.finish(st, value, G.div_(d))

    def _fast_generalized(self, st: _fast.PairState, pos: Tensor, neg: Tensor, norm: bool, b: int) -> Tensor:
        """[lse_P(D − m⁺) + lse_N(m⁻ − D)]₊ per anchor with both kinds of pairs; unit rows have D ≤ 2."""
        m = _fast.distance(st, squared=False)
        bp = (2.0 if norm else float("inf")) + abs(self.pos_margin)
        bn = (2.0 if norm else float("inf")) + abs(self.neg_margin)
        v_p, w_p = _fast.log_sum_exp(m.sub(self.pos_margin), pos, bp)
        v_n, w_n = _fast.log_sum_exp(torch.rsub(m, self.neg_margin), neg, bn)
        # a row without positives (negatives) has an lse of −∞: no separate pass over the masks
        ok = v_p.isfinite().logical_and_(v_n.isfinite())
        n_ok = int(ok.sum())
        if n_ok == 0:
            return _fast.zero(st)
        denom = float(b if self.reduction == "batch" else n_ok)
        per_anchor = v_p.add_(v_n)
        act = ok & (per_anchor > 0)
        value = per_anchor.masked_fill_(~act, 0.0).sum() / denom
        if not bool(act.any()):
            return _fast.finish(st, value, None)
        row = act.to(m.dtype).div_(denom).unsqueeze(1)
        gd = w_p.sub_(w_n).mul_(row)
        return _fast.finish(st, value, _fast.distance_grad(st, gd, m, squared=False))

    def _fast_original(self, st: _fast.PairState, pos: Tensor, neg: Tensor, norm: bool) -> Tensor:
        n_pos = _fast.count(pos)
        row_has = _fast.row_any(neg)
        if n_pos == 0 or not bool(row_has.any()):
            return _fast.zero(st)
        d = _fast.distance(st, squared=False)
        bound = (2.0 if norm else float("inf")) + abs(self.neg_margin)
        mt = d.neg().add_(self.neg_margin)
        if st.same:
            row, w_row = _fast.log_sum_exp(mt, neg, bound)
            col, w_col, col_has = row, w_row, row_has
        else:
            row, w_row = _fast.log_sum_exp(mt.clone(), neg, bound)
            colT, w_colT = _fast.log_sum_exp(mt.t(), neg.t(), bound)  # R: over the batch rows
            col, w_col, col_has = colT, w_colT.t(), _fast.row_any(neg, 0)
        fmin = torch.finfo(d.dtype).min
        row = row.masked_fill(~row_has, fmin)  # the reference's empty log-sum-exp
        col = row if st.same else col.masked_fill(~col_has, fmin)
        keep = pos.logical_and_(row_has.unsqueeze(1) | col_has.unsqueeze(0))
        if norm:
            # Unit rows: m⁻ − 2 ≤ row_i ≤ m⁻ + log R for rows with negatives, so with c the largest of them e^{row − c}
            # ≥ e^{−2}/R: both_ij = log(e^{row_i} + e^{col_j}) from two vectors of exponentials, one B×R sum and
            # log (fp32 logaddexp costs ~12 ms per 1024² entries on CPU, log under 1 ms). Pairs with no negative on
            # either side get log(tiny) + c, far below 0, and are not kept anyway.
            c = torch.maximum(row.max(), col.max())
            er, ec = torch.exp(row - c), torch.exp(col - c)  # 0 where the row has no negatives
            den = torch.add(er.unsqueeze(1), ec.unsqueeze(0)).clamp_min_(torch.finfo(d.dtype).tiny)
            j = torch.log(den).add_(c).add_(d).sub_(self.pos_margin)
        else:
            both = torch.logaddexp(row.unsqueeze(1), col.unsqueeze(0))
            j = both.add(d).sub_(self.pos_margin)
        act = keep.logical_and_(j > 0)
        jr = j.mul_(_fast.u8(act))
        value = jr.dot(jr.flatten()) if jr.dim() == 1 else torch.dot(jr.view(-1), jr.view(-1))
        value = value / (2.0 * n_pos)
        g = jr.div_(n_pos)  # ∂L/∂J on kept pairs, ∂J/∂D direct = 1
        # ∂J_ij/∂row_i = e^{row_i − both_ij}, ∂J_ij/∂col_j = e^{col_j − both_ij}; ∂row_i/∂D_ik = −W_row_ik.
        if norm:  # e^{row_i − both_ij} = er_i / den_ij
            q = torch.div(g, den)
            r_coef, c_coef = q.sum(1).mul_(er), q.sum(0).mul_(ec)
        else:
            r_coef = (torch.exp(row.unsqueeze(1) - both).mul_(g)).sum(1)
            c_coef = (torch.exp(col.unsqueeze(0) - both).mul_(g)).sum(0)
        if st.same:
            gd = g.sub_(w_row.mul_((r_coef + c_coef).unsqueeze(1)))
        else:
            gd = g.sub_(w_row.mul_(r_coef.unsqueeze(1))).sub_(w_col.mul_(c_coef.unsqueeze(0)))
        return _fast.finish(st, value, _fast.distance_grad(st, gd, d, squared=False))

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, neg_margin={self.neg_margin}, pos_margin={self.pos_margin}"
