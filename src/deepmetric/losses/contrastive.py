"""Contrastive loss, distance form (Hadsell et al. 2006 / PML) and similarity form (Deep_Metric, XBM, IAA)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from deepmetric.functional import cosine_similarity_matrix, pairwise_distance, zero_loss
from deepmetric.losses import _fast
from deepmetric.losses.base import MetricLoss, Mined, MinedPairs, pair_masks

PairReduction = Literal["avg_nonzero", "mean", "batch", "sum"]


def reduce_pair_terms(
    pos_loss: Tensor, pos: Tensor, neg_loss: Tensor, neg: Tensor, reduction: str, batch_size: int,
    *like: Tensor,
) -> Tensor:
    """Reduce B×R per-pair positive and negative losses (zero outside their masks).

    ``avg_nonzero``: mean over pairs with loss > 0, separately for positives and negatives, then summed (PML's
    AvgNonZeroReducer); ``mean``: mean over all selected pairs of each kind, summed (DAS); ``batch``: sum over
    all pairs ÷ B (Deep_Metric / XBM / IAA code); ``sum``: plain sum.
    """
    pos_loss = pos_loss.masked_fill(~pos, 0.0)
    neg_loss = neg_loss.masked_fill(~neg, 0.0)
    if reduction == "batch":
        return (pos_loss.sum() + neg_loss.sum()) / batch_size
    if reduction == "sum":
        return pos_loss.sum() + neg_loss.sum()
    if reduction == "mean":
        pos_n, neg_n = pos.sum().clamp_min(1), neg.sum().clamp_min(1)
    elif reduction == "avg_nonzero":
        pos_n, neg_n = (pos_loss > 0).sum().clamp_min(1), (neg_loss > 0).sum().clamp_min(1)
    else:
        raise ValueError(f"reduction must be one of avg_nonzero, mean, batch, sum; got {reduction!r}")
    return pos_loss.sum() / pos_n + neg_loss.sum() / neg_n + zero_loss(*like)


class ContrastiveLoss(MetricLoss):
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

    ``reduction``: see :func:`reduce_pair_terms`; default ``"avg_nonzero"`` for the distance form (PML) and
    ``"batch"`` for the similarity form (XBM sums over pairs and divides by B, so the value grows with the
    number of hard pairs).

    Deviations: self-pairs are removed by index (the similarity-form codes use ``S < 1 − 1e-5``, which also
    drops exact duplicates). With :class:`MinedTriplets`, a pair used by several triplets counts once (PML
    counts it once per triplet).
    """

    accepts_mined = True

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
        self.pos_margin = float(pos_margin if pos_margin is not None else (0.0 if dist else 1.0))
        self.neg_margin = float(neg_margin if neg_margin is not None else (1.0 if dist else 0.5))
        self.negative_term = negative_term
        self.reduction = reduction or ("avg_nonzero" if dist else "batch")
        if self.reduction not in ("avg_nonzero", "mean", "batch", "sum"):
            raise ValueError(f"ContrastiveLoss.reduction must be avg_nonzero/mean/batch/sum, got {self.reduction!r}")
        self.normalize_embeddings = normalize_embeddings

    def compute(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, mined: Mined | None = None,
    ) -> Tensor:
        pos, neg = pair_masks(labels, ref_labels, ignore_mask, mined)
        if not bool(pos.any() or neg.any()):
            return zero_loss(embeddings, ref_embeddings)
        if self.form == "distance":
            d = pairwise_distance(embeddings, ref_embeddings, normalize=self.normalize_embeddings)
            pos_loss = torch.relu(d - self.pos_margin)
            neg_loss = torch.relu(self.neg_margin - d)
        else:
            s = cosine_similarity_matrix(embeddings, ref_embeddings)
            pos_loss = torch.relu(self.pos_margin - s)
            if self.negative_term == "hinge":
                neg_loss = torch.relu(s - self.neg_margin)
            else:
                neg_loss = s * (s > self.neg_margin).to(s.dtype)
        return reduce_pair_terms(
            pos_loss, pos, neg_loss, neg, self.reduction, embeddings.shape[0], embeddings, ref_embeddings
        )

    fast = True

    def fast_compute(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, self_cmp: bool, mined: Mined | None = None,
    ) -> Tensor:
        dist = self.form == "distance"
        normalize = self.normalize_embeddings or not dist
        st = sim = None
        source = mined._source if type(mined) is MinedPairs else None
        if source is not None:  # pairs a miner returned for these very inputs: its normalisation and S
            st = source.state_for(embeddings, ref_embeddings, labels, ref_labels, ignore_mask, self_cmp, normalize,
                                  mined.tensors())
            sim = None if st is None else source.similarity
        if st is None:
            st = _fast.prepare(embeddings, ref_embeddings, normalize)
        if (mined is None and not (self.reduction == "mean" and ignore_mask is not None)
                and labels.shape[0] * ref_labels.shape[0] >= _fast.PAIR_LIST_MIN_GRID):
            out = self._from_pair_lists(st, labels, ref_labels, ignore_mask, self_cmp)
            if out is not None:
                return out
        with torch.no_grad():
            dtype = st.nx.xf.dtype
            if sim is not None:  # valid by construction (the miner intersected them with the label masks)
                pos, neg = _fast.fm(mined.positive, dtype), _fast.fm(mined.negative, dtype)
            else:
                pos, neg = _fast.float_pair_masks(labels, ref_labels, ignore_mask, self_cmp, dtype, mined)
            n_pos = n_neg = 0
            if self.reduction == "mean":
                n_pos, n_neg = _fast.count_ones(pos), _fast.count_ones(neg)
                if n_pos == 0 and n_neg == 0:
                    return _fast.zero(st)
            if dist:
                m = _fast.distance(st, squared=False, sim=sim)
            else:
                m = _fast.similarity(st) if sim is None else sim  # only read below
            # Active pairs (hinge > 0) as 0/1 matrices; D ≥ √eps > 0 ≥ m⁺ makes every positive pair active
            # for PML's default m⁺ = 0.
            all_pos_active = dist and self.pos_margin <= 0.0
            pa = pos if all_pos_active else _fast.positive_part_indicator(self._positive_hinge(m)).mul_(pos)
            na = _fast.positive_part_indicator(self._negative_hinge(m)).mul_(neg)
            npa, nna = _fast.count_ones(pa), _fast.count_ones(na)
            # S·[S > m⁻] ≤ 0 for m⁻ < S ≤ 0 is not a non-zero loss
            cnt_n = nna
            if self._negatives_counted_by_sign:
                cnt_n = _fast.count_ones(_fast.positive_part_indicator(m.clone()).mul_(na))
            cp, cn = self._divisors(npa, cnt_n, n_pos, n_neg, embeddings.shape[0])
            sign, const_p, const_n = self._linear_terms()
            # ∂L/∂m: +sign/c⁺ on active positives, −sign/c⁻ on active negatives (disjoint)
            G = (pa.mul(sign / cp) if pa is pos else pa.mul_(sign / cp)).sub_(na, alpha=sign / cn)
            value = torch.dot(G.view(-1), m.view(-1))
            if const_p or const_n:
                value = value + (const_p * npa / cp + const_n * nna / cn)
            st.nnz = npa + nna
            # all pairs of the batch with symmetric masks: G = Gᵀ
            st.symmetric = self_cmp and ignore_mask is None and mined is None
            if dist:
                G = _fast.distance_grad(st, G, m, squared=False)
        return _fast.finish(st, value, G)

    def _positive_hinge(self, m: Tensor) -> Tensor:
        """The positive pairs' hinge argument (a new tensor; > 0 exactly where the pair is active): D − m⁺ or
        m⁺ − S, for a matrix or gathered values."""
        return torch.sub(m, self.pos_margin) if self.form == "distance" else torch.rsub(m, self.pos_margin)

    def _negative_hinge(self, m: Tensor) -> Tensor:
        """The negative pairs' hinge argument: m⁻ − D or S − m⁻ (both negative terms share the active set)."""
        return torch.rsub(m, self.neg_margin) if self.form == "distance" else torch.sub(m, self.neg_margin)

    def _inside_hinges(self, m_pos: Tensor, m_neg: Tensor) -> tuple[Tensor, Tensor]:
        """Which positive / negative entries (matrix or gathered values of D or S) have a non-zero hinge."""
        return self._positive_hinge(m_pos) > 0, self._negative_hinge(m_neg) > 0

    def _linear_terms(self) -> tuple[float, float, float]:
        """(sign, c⁺, c⁻): an active positive contributes sign·m + c⁺, an active negative −sign·m + c⁻.
        Distance form: ℓ⁺ = D − m⁺, ℓ⁻ = m⁻ − D; similarity form: ℓ⁺ = m⁺ − S, ℓ⁻ = S (or S − m⁻, hinge)."""
        if self.form == "distance":
            return 1.0, -self.pos_margin, self.neg_margin
        return -1.0, self.pos_margin, (-self.neg_margin if self.negative_term == "hinge" else 0.0)

    @property
    def _negatives_counted_by_sign(self) -> bool:
        """avg_nonzero with ℓ⁻ = S·[S > m⁻] and m⁻ < 0: a negative with m⁻ < S ≤ 0 is active but not non-zero."""
        return (self.reduction == "avg_nonzero" and self.form == "similarity"
                and self.negative_term == "similarity" and self.neg_margin < 0)

    def _divisors(self, n_active_pos: int, n_nonzero_neg: int, n_pos: int, n_neg: int, b: int) -> tuple[float, float]:
        """(c⁺, c⁻) of the reduction: active-pair counts, all-pair counts (``mean``), B, or 1."""
        red = self.reduction
        if red == "avg_nonzero":
            return float(max(n_active_pos, 1)), float(max(n_nonzero_neg, 1))
        if red == "mean":
            return float(max(n_pos, 1)), float(max(n_neg, 1))
        return (float(b), float(b)) if red == "batch" else (1.0, 1.0)

    # A slack on the squared-distance threshold: candidates are re-tested on the exact D computed as the dense path
    # computes it, so rounding in the threshold can only add candidates, never lose one.
    _CANDIDATE_SLACK = 1e-3

    def _from_pair_lists(
        self, st: _fast.PairState, labels: Tensor, ref_labels: Tensor, ignore_mask: Tensor | None, self_cmp: bool,
    ) -> Tensor | None:
        """The loss from the positive pairs (found from the labels) and the negatives inside the margin (one
        threshold pass over the B×R matrix), with a sparse ∂L/∂S. None when the pairs are too many for that to
        pay (e.g. a batch of two classes); the dense path then runs."""
        dist = self.form == "distance"
        b, r = labels.shape[0], ref_labels.shape[0]
        budget = b * r // _fast.SPARSE_FRACTION
        with torch.no_grad():
            pairs = _fast.same_label_pairs(labels, ref_labels, self_cmp, budget)
            if pairs is None:
                return None
            pr, pc = _fast.drop_ignored(*pairs, ignore_mask)
            if dist:
                # D² before the clamp, as _fast.distance computes it (the same function on the same values)
                m = _fast.squared_distance_unclamped(st)
                cand = m < self.neg_margin ** 2 + self._CANDIDATE_SLACK if self.neg_margin > 0 else None
            else:
                m = _fast.similarity(st)
                cand = m > self.neg_margin
            if cand is None:
                nr_, nc_ = pr[:0], pc[:0]
            else:
                nr_, nc_ = cand.nonzero(as_tuple=True)
                if nr_.shape[0] > budget:
                    return None
                keep = labels[nr_] != ref_labels[nc_]
                nr_, nc_ = _fast.drop_ignored(nr_[keep], nc_[keep], ignore_mask)
            vp, vn = m[pr, pc], m[nr_, nc_]
            if dist:
                vp = vp.clamp_min_(0.0).add_(_fast.DIST_EPS).sqrt_()
                vn = vn.clamp_min_(0.0).add_(_fast.DIST_EPS).sqrt_()
            act_p, act_n = self._inside_hinges(vp, vn)
            pr, pc, vp = pr[act_p], pc[act_p], vp[act_p]
            nr_, nc_, vn = nr_[act_n], nc_[act_n], vn[act_n]
            npa, nna = pr.shape[0], nr_.shape[0]
            n_pos = n_neg = 0
            if self.reduction == "mean":  # every valid pair counts (no ignore_mask on this path)
                n_pos = pairs[0].shape[0]
                n_neg = b * r - n_pos - (b if self_cmp else 0)
                if n_pos == 0 and n_neg == 0:
                    return _fast.zero(st)
            cnt_n = int((vn > 0).sum()) if self._negatives_counted_by_sign else nna
            cp, cn = self._divisors(npa, cnt_n, n_pos, n_neg, b)
            sign, const_p, const_n = self._linear_terms()
            gp = vp.new_full((npa,), sign / cp)
            gn = vn.new_full((nna,), -sign / cn)
            value = torch.dot(gp, vp) + torch.dot(gn, vn)
            if const_p or const_n:
                value = value + (const_p * npa / cp + const_n * nna / cn)
            if npa + nna == 0:
                return _fast.finish(st, value, None)
            rows, cols, g = torch.cat((pr, nr_)), torch.cat((pc, nc_)), torch.cat((gp, gn))
            if dist:  # ∂D/∂S = −1/D on the pairs; the ‖x‖² terms when the rows are not normalised
                gsq = g.div_(torch.cat((vp, vn))).mul_(0.5)
                if st.nx.inv is None:
                    st.dx = torch.zeros(b, dtype=g.dtype, device=g.device).index_add_(0, rows, gsq).mul_(2.0)
                    st.dr = torch.zeros(r, dtype=g.dtype, device=g.device).index_add_(0, cols, gsq).mul_(2.0)
                g = gsq.mul_(-2.0)
            st.nnz = int(g.shape[0])
            G = _fast.sparse_matrix(rows, cols, g, (b, r))
        return _fast.finish(st, value, G)

    def extra_repr(self) -> str:
        return (f"form={self.form!r}, pos_margin={self.pos_margin}, neg_margin={self.neg_margin}, "
                f"reduction={self.reduction!r}")
