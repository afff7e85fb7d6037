"""Margin loss with learnable class boundaries (Wu, Manmatha, Smola, Krähenbühl, "Sampling Matters in Deep
Embedding Learning", ICCV 2017)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from deepmetric.functional import pairwise_distance, zero_loss
from deepmetric.losses import _fast
from deepmetric.losses.base import MetricLoss, Mined, MinedTriplets, pair_masks, valid_triplets


class MarginLoss(MetricLoss):
    r"""Margin loss on triplets (a, p, n), D = Euclidean distance of L2-normalised embeddings:

        ℓ⁺ = [D_ap − β_{y_a} + m]₊,   ℓ⁻ = [β_{y_a} − D_an + m]₊,
        L = Σ_triplets (ℓ⁺ + ℓ⁻) / (#{ℓ⁺ > 0} + #{ℓ⁻ > 0})  + ν·β-regulariser

    β is one shared scalar, or one per class with ``num_classes`` (labels must be 0..C−1), initialised to
    ``beta`` (1.2) and learnable when ``learn_beta`` (paper; PML's default is ``learn_beta=False``). The
    regulariser is ν·β (shared β) or Σ_triplets ν·β_{y_a} / divisor (per-class β), as in PML. ``lr_multiplier``
    scales β's learning rate in the trainer (DAS uses a separate β lr of 5e-4 with a model lr of 1e-5: 50).

    Without ``mined`` (or with :class:`MinedPairs`) all triplets are used, evaluated densely: each positive
    pair appears once per negative of its anchor and vice versa, so the sums are weighted pair sums (O(B·R)).
    With :class:`MinedTriplets` (e.g. distance-weighted sampling, the paper's setting) exactly those triplets.
    Deviations: the research-ms-loss code never optimises β (it is not given to the optimiser); counting
    non-zero terms follows PML (ℓ⁺ and ℓ⁻ counted separately).
    """

    accepts_mined = True

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
    ) -> None:
        super().__init__()
        self.margin, self.nu, self.learn_beta = float(margin), float(nu), learn_beta
        self.num_classes = num_classes
        init = torch.full((num_classes if num_classes else 1,), float(beta))
        if learn_beta:
            self.beta = nn.Parameter(init)
        else:
            self.register_buffer("beta", init)
        self.lr_multiplier = float(lr_multiplier)
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
        d = pairwise_distance(embeddings, ref_embeddings, normalize=self.normalize_embeddings)
        beta_a = self._anchor_beta(labels, d.dtype)
        if isinstance(mined, MinedTriplets):
            a, p, n = valid_triplets(mined, labels, ref_labels, ignore_mask)
            if a.numel() == 0:
                return zero_loss(embeddings, ref_embeddings, self.beta)
            lp = torch.relu(d[a, p] - beta_a[a] + self.margin)
            ln = torch.relu(beta_a[a] - d[a, n] + self.margin)
            total, divisor, beta_sum = (lp + ln).sum(), (lp > 0).sum() + (ln > 0).sum(), beta_a[a].sum()
        else:
            pos, neg = pair_masks(labels, ref_labels, ignore_mask, mined)
            n_pos, n_neg = pos.sum(1), neg.sum(1)
            ok = (n_pos > 0) & (n_neg > 0)
            if not bool(ok.any()):
                return zero_loss(embeddings, ref_embeddings, self.beta)
            pos, neg = pos & ok.unsqueeze(1), neg & ok.unsqueeze(1)
            lp = torch.relu(d - beta_a.unsqueeze(1) + self.margin).masked_fill(~pos, 0.0)
            ln = torch.relu(beta_a.unsqueeze(1) - d + self.margin).masked_fill(~neg, 0.0)
            # Every (a, p) is in |N_a| triplets and every (a, n) in |P_a| triplets.
            w_pos, w_neg = n_neg.to(d.dtype).unsqueeze(1), n_pos.to(d.dtype).unsqueeze(1)
            total = (lp * w_pos).sum() + (ln * w_neg).sum()
            divisor = ((lp > 0) * w_pos).sum() + ((ln > 0) * w_neg).sum()
            beta_sum = (beta_a * (n_pos * n_neg).to(d.dtype)).sum()
        if float(divisor) == 0:
            loss = zero_loss(embeddings, ref_embeddings, self.beta)
        else:
            loss = total / divisor
        if self.learn_beta and self.nu:
            if self.num_classes is None:
                loss = loss + self.nu * self.beta.to(d.dtype).sum()
            elif float(divisor) != 0:
                loss = loss + self.nu * beta_sum / divisor
        return loss

    fast = True

    def fast_compute(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, self_cmp: bool, mined: Mined | None = None,
    ) -> Tensor:
        if isinstance(mined, MinedTriplets):
            return self._fast_mined(embeddings, labels, ref_embeddings, ref_labels, ignore_mask, self_cmp, mined)
        st = _fast.prepare(embeddings, ref_embeddings, self.normalize_embeddings)
        with torch.no_grad():
            pos, neg = _fast.masks(labels, ref_labels, ignore_mask, self_cmp, mined)
            n_pos, n_neg = _fast.row_count(pos), _fast.row_count(neg)
            none = not bool(((n_pos > 0) & (n_neg > 0)).any())
            d = None if none else _fast.distance(st, squared=False)
        if d is None:
            return zero_loss(embeddings, ref_embeddings, self.beta)
        with torch.no_grad():
            dt = d.dtype
        beta_a = self._anchor_beta(labels, dt)
        with torch.no_grad():
            b = beta_a.detach().unsqueeze(1)
            # Anchors lacking positives or negatives have weight 0 (w⁺ = |N_a|, w⁻ = |P_a|).
            wp, wn = n_neg.to(dt).unsqueeze(1), n_pos.to(dt).unsqueeze(1)
            ap = pos.logical_and_(d > b - self.margin)  # ℓ⁺ > 0
            an = neg.logical_and_(d < b + self.margin)  # ℓ⁻ > 0
            cp = _fast.row_count(ap).unsqueeze(1).to(dt).mul_(wp)
            cn = _fast.row_count(an).unsqueeze(1).to(dt).mul_(wn)
            divisor = float(cp.sum() + cn.sum())
        g_beta = None
        if divisor == 0:
            loss = zero_loss(embeddings, ref_embeddings, self.beta)
        else:
            with torch.no_grad():
                G = (_fast.u8(ap) * wp).sub_(_fast.u8(an) * wn)
                # total = Σ_P⁺ w⁺(D − β + m) + Σ_N⁺ w⁻(β − D + m)
                total = torch.dot(G.view(-1), d.view(-1)) + (cp * (self.margin - b)).sum() + (cn * (b + self.margin)).sum()
                value = total / divisor
                g_beta = (cn - cp).squeeze(1).div_(divisor)  # ∂L/∂β_a
                st.nnz = _fast.count(ap) + _fast.count(an)
                G = _fast.distance_grad(st, G.div_(divisor), d, squared=False)
            loss = _fast.finish(st, value, G)
        # every (a, p, n) triplet: each anchor's β counts |P_a|·|N_a| times
        return self._beta_terms(loss, beta_a, g_beta, divisor, lambda: (beta_a * (n_pos * n_neg).to(dt)).sum())

    def _fast_mined(
        self, x: Tensor, labels: Tensor, r: Tensor, ref_labels: Tensor, ignore_mask: Tensor | None, self_cmp: bool,
        mined: MinedTriplets,
    ) -> Tensor:
        """O(T·d) on the 2T distances of the mined triplets (no B×R GEMM), on a built-in miner's normalisation when
        given its very inputs: the terms, divisor, β gradient and ν term of :meth:`compute`."""
        st, a, p, n, every_row = _fast.mined_triplet_state(
            mined, x, r, labels, ref_labels, ignore_mask, self_cmp, self.normalize_embeddings)
        if a.numel() == 0:
            return zero_loss(x, r, self.beta)
        dtype = st.nx.xf.dtype
        beta_a = self._anchor_beta(labels, dtype)
        with torch.no_grad():
            diff, dist, pn = _fast.triplet_differences(st, a, p, n, every_row)
            dist.add_(_fast.DIST_EPS).sqrt_()  # D_ap, D_an
            b = beta_a.detach().index_select(0, a)
            lp = torch.sub(dist[0], b).add_(self.margin)  # ℓ⁺ = D_ap − β + m
            ln = torch.rsub(dist[1], b).add_(self.margin)  # ℓ⁻ = β − D_an + m
            wp, wn = (lp > 0).to(dtype), (ln > 0).to(dtype)
            divisor = int(wp.sum()) + int(wn.sum())
        g_beta = None
        if divisor == 0:
            loss = zero_loss(x, r, self.beta)
        else:
            with torch.no_grad():
                value = (lp.clamp_min_(0.0).sum() + ln.clamp_min_(0.0).sum()) / divisor
                g_beta = torch.zeros_like(beta_a).index_add_(0, a, torch.sub(wn, wp).div_(divisor))  # ∂L/∂β_a
                # ∂L/∂D_ap = [ℓ⁺ > 0]/divisor, ∂L/∂D_an = −[ℓ⁻ > 0]/divisor; ∂D/∂x̂_a = (x̂_a − r̂)/D
                coef = torch.stack((wp.div_(dist[0]), wn.div_(dist[1]).neg_())).div_(divisor)
                gxn, grn = _fast.triplet_gradients(st, diff, coef, a, pn, every_row)
            loss = _fast.finish_direct(st, value, gxn, grn)
        return self._beta_terms(loss, beta_a, g_beta, divisor, lambda: beta_a.index_select(0, a).sum())

    def _beta_terms(
        self, loss: Tensor, beta_a: Tensor, g_beta: Tensor | None, divisor: float,
        triplet_beta_sum: Callable[[], Tensor],
    ) -> Tensor:
        """``loss`` plus β's gradient (``g_beta`` = ∂L/∂β_a, attached through β_a; None when no term was
        non-zero) and the ν regulariser: ν·β (shared β) or ν·Σ_triplets β_{y_a} / divisor (per-class β)."""
        if g_beta is not None and beta_a.requires_grad:
            loss = loss + (g_beta * (beta_a - beta_a.detach())).sum()
        if self.learn_beta and self.nu:
            if self.num_classes is None:
                loss = loss + self.nu * self.beta.to(beta_a.dtype).sum()
            elif divisor != 0:
                loss = loss + self.nu * triplet_beta_sum() / divisor
        return loss

    def extra_repr(self) -> str:
        return f"margin={self.margin}, nu={self.nu}, learn_beta={self.learn_beta}, num_classes={self.num_classes}"
