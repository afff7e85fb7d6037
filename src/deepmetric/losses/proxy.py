"""Proxy- and classification-style losses: Proxy-NCA, Proxy-Anchor, Normalized Softmax, ArcFace, SoftTriple.

They compare each embedding with learnable class proxies (C×d), not with other samples: ``ref_embeddings``,
``ref_labels`` and ``ignore_mask`` are accepted (one signature for every loss, e.g. under cross-batch memory) but
ignored, and ``mined=`` is refused. Labels must be integers in 0..num_classes−1. ``lr_multiplier`` is applied
by the trainer to the proxies.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric.functional import (
    as_float,
    cosine_similarity_matrix,
    masked_logsumexp,
    pairwise_distance,
)
from deepmetric.losses import _fast
from deepmetric.losses.base import MetricLoss, Mined


class ProxyLoss(MetricLoss):
    """Base for proxy losses: owns ``proxies`` (C×d) and checks labels."""

    accepts_mined = False

    def __init__(self, num_classes: int, embedding_size: int, lr_multiplier: float = 1.0) -> None:
        super().__init__()
        if num_classes < 1 or embedding_size < 1:
            raise ValueError(f"{type(self).__name__}: num_classes and embedding_size must be >= 1")
        self.num_classes, self.embedding_size = int(num_classes), int(embedding_size)
        self.proxies = nn.Parameter(torch.empty(self.num_classes, self.embedding_size))
        self.lr_multiplier = float(lr_multiplier)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.proxies)

    def _proxies_for(self, embeddings: Tensor) -> Tensor:
        # fp16/bf16 embeddings are promoted to fp32; float64 (gradcheck) keeps float64.
        return self.proxies.to(as_float(embeddings).dtype)

    def _check(self, embeddings: Tensor, labels: Tensor) -> None:
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"{type(self).__name__}: embedding_size is {self.embedding_size}, got {embeddings.shape[1]}")
        if labels.numel():
            lo, hi = torch.aminmax(labels)
            if int(lo) < 0 or int(hi) >= self.num_classes:
                raise ValueError(f"{type(self).__name__}: labels must be in 0..{self.num_classes - 1}")

    def compute(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, mined: Mined | None = None,
    ) -> Tensor:
        self._check(embeddings, labels)
        return self.proxy_loss(embeddings, labels.long())

    def proxy_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def fast_compute(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, self_cmp: bool, mined: Mined | None = None,
    ) -> Tensor:
        self._check(embeddings, labels)
        return self.fast_proxy_loss(embeddings, labels.long())

    def fast_proxy_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self.proxy_loss(embeddings, labels)

    def _fast_state(self, embeddings: Tensor) -> _fast.PairState:
        """Anchors vs the proxies (cast to the computation dtype; the cast's backward returns the proxies' dtype)."""
        return _fast.prepare(embeddings, self._proxies_for(embeddings), fold_norms=True)


class ProxyAnchorLoss(ProxyLoss):
    r"""Proxy-Anchor loss. Kim, Kim, Cho, Kwak, "Proxy Anchor Loss for Deep Metric Learning", CVPR 2020.

        L = (1/|P⁺|) Σ_{p∈P⁺} log(1 + Σ_{x∈X_p⁺} e^{−α(s(x,p) − δ)}) + (1/|P|) Σ_{p∈P} log(1 + Σ_{x∈X_p⁻} e^{α(s(x,p) + δ)})

    s = cosine, P⁺ = proxies with a positive in the batch. Defaults α = 32, δ = ``margin`` = 0.1, proxies
    kaiming-normal (fan_out), ``lr_multiplier`` = 100 (official code). Same as PML ``ProxyAnchorLoss``.
    """

    lr_multiplier = 100.0

    def __init__(
        self, num_classes: int, embedding_size: int, margin: float = 0.1, alpha: float = 32.0,
        *, lr_multiplier: float = 100.0,
    ) -> None:
        super().__init__(num_classes, embedding_size, lr_multiplier)
        self.margin, self.alpha = float(margin), float(alpha)

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def proxy_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        cos = cosine_similarity_matrix(embeddings, self._proxies_for(embeddings))  # B×C
        onehot = labels.unsqueeze(1) == torch.arange(self.num_classes, device=labels.device).unsqueeze(0)
        pos_term = masked_logsumexp(-self.alpha * (cos - self.margin), onehot, dim=0, add_one=True)
        neg_term = masked_logsumexp(self.alpha * (cos + self.margin), ~onehot, dim=0, add_one=True)
        n_with_pos = onehot.any(0).sum().clamp_min(1)
        return pos_term.sum() / n_with_pos + neg_term.sum() / self.num_classes

    fast = True

    def fast_proxy_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        st = self._fast_state(embeddings)
        with torch.no_grad():
            cos = _fast.similarity(st).t()  # C×B: per-proxy rows
            onehot = torch.zeros(cos.shape, dtype=torch.bool, device=cos.device)
            onehot[labels, torch.arange(labels.shape[0], device=labels.device)] = True
            a, m = self.alpha, self.margin
            bound = a * (1.0 + abs(m))
            n_with_pos = float(max(int(_fast.row_any(onehot).sum()), 1))
            # ∂L/∂cos = −α·W⁺/|P⁺| + α·W⁻/C (the factors folded into the softmax normalisation)
            a_p = torch.add(cos.new_tensor(a * m), cos, alpha=-a)
            v_p, w_p = _fast.log1p_sum_exp(a_p, onehot, bound, a / n_with_pos)
            v_n, w_n = _fast.log1p_sum_exp(torch.add(cos.new_tensor(a * m), cos, alpha=a, out=cos), ~onehot, bound,
                                           a / self.num_classes)
            value = v_p.sum() / n_with_pos + v_n.sum() / self.num_classes
            G = w_n.sub_(w_p).t()
        return _fast.finish(st, value, G)


class ProxyNCALoss(ProxyLoss):
    r"""Proxy-NCA. Movshovitz-Attias, Toshev, Leung, Ioffe, Singh, "No Fuss Distance Metric Learning using Proxies",
    ICCV 2017. As PML ``ProxyNCALoss``: softmax over −s·D²(x̂, p̂) to all proxies, L = mean −log p(y):

        L = mean_i −log( e^{−s·D²(x_i, p_{y_i})} / Σ_c e^{−s·D²(x_i, p_c)} )

    Deviation from the paper (shared with PML): the positive proxy is included in the denominator.
    ``softmax_scale`` default 1 (PML); the Proxy-Anchor code's baseline uses 32. Proxies init N(0, 1).
    """

    def __init__(
        self, num_classes: int, embedding_size: int, softmax_scale: float = 1.0, *, lr_multiplier: float = 1.0,
    ) -> None:
        super().__init__(num_classes, embedding_size, lr_multiplier)
        self.softmax_scale = float(softmax_scale)

    def proxy_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        d2 = pairwise_distance(embeddings, self._proxies_for(embeddings), normalize=True, squared=True)
        return F.cross_entropy(-self.softmax_scale * d2, labels)

    fast = True

    def fast_proxy_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        st = self._fast_state(embeddings)
        with torch.no_grad():
            s = self.softmax_scale
            z = _fast.distance(st, squared=True).mul_(-s)  # D² ≤ 4 on unit rows
            value, w = _fast.cross_entropy(z, labels, 4.0 * abs(s) * (1.0 + 1e-3))
            G = _fast.distance_grad(st, w.mul_(-s), None, squared=True)  # type: ignore[arg-type]
        return _fast.finish(st, value, G)


class NormalizedSoftmaxLoss(ProxyLoss):
    r"""Normalized softmax. Zhai & Wu, "Classification is a Strong Baseline for Deep Metric Learning", BMVC 2019.

        L = mean_i −log softmax(x̂_iᵀŴ / T)_{y_i},   T = ``temperature`` = 0.05

    Same as PML ``NormalizedSoftmaxLoss`` (PML stores W as d×C; here ``proxies`` is C×d). Init N(0, 1).
    """

    def __init__(
        self, num_classes: int, embedding_size: int, temperature: float = 0.05, *, lr_multiplier: float = 1.0,
    ) -> None:
        super().__init__(num_classes, embedding_size, lr_multiplier)
        self.temperature = float(temperature)

    def proxy_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        cos = cosine_similarity_matrix(embeddings, self._proxies_for(embeddings))
        return F.cross_entropy(cos / self.temperature, labels)

    fast = True

    def fast_proxy_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        st = self._fast_state(embeddings)
        with torch.no_grad():
            s = 1.0 / self.temperature
            value, G = _fast.cross_entropy(_fast.similarity(st).mul_(s), labels, abs(s) * (1.0 + 1e-3), s)
        return _fast.finish(st, value, G)


class ArcFaceLoss(ProxyLoss):
    r"""ArcFace (additive angular margin). Deng, Guo, Xue, Zafeiriou, CVPR 2019.

        logit_ic = s·cos(θ_ic + m·[c = y_i]),   L = mean_i cross-entropy(logit_i, y_i)

    ``margin`` in degrees (PML convention, 28.6° ≈ 0.5 rad), ``scale`` s = 64. As in PML, when θ + m would pass
    π the target logit becomes s·(cos θ − m·sin m) to keep the loss monotonic. cos is clamped to
    [−1 + 1e-7, 1 − 1e-7] before arccos so its gradient stays finite (PML clamps to [−1, 1]).
    """

    def __init__(
        self, num_classes: int, embedding_size: int, margin: float = 28.6, scale: float = 64.0,
        *, lr_multiplier: float = 1.0,
    ) -> None:
        super().__init__(num_classes, embedding_size, lr_multiplier)
        self.margin, self.scale = float(margin), float(scale)

    def proxy_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        cos = cosine_similarity_matrix(embeddings, self._proxies_for(embeddings))
        m = math.radians(self.margin)
        target = cos.gather(1, labels.unsqueeze(1))
        theta = torch.acos(target.clamp(-1.0 + 1e-7, 1.0 - 1e-7))
        modified = torch.where(theta <= math.pi - m, torch.cos(theta + m), target - m * math.sin(m))
        logits = cos.scatter(1, labels.unsqueeze(1), modified)
        return F.cross_entropy(self.scale * logits, labels)

    fast = True

    def fast_proxy_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        st = self._fast_state(embeddings)
        with torch.no_grad():
            cos = _fast.similarity(st)
            t = labels.unsqueeze(1)
            m, lo, hi = math.radians(self.margin), -1.0 + 1e-7, 1.0 - 1e-7
            target = cos.gather(1, t)
            clamped = target.clamp(lo, hi)
            theta = torch.acos(clamped)
            on_arc = theta <= math.pi - m
            modified = torch.where(on_arc, torch.cos(theta + m), target - m * math.sin(m))
            # d cos(θ + m)/d cos θ = sin(θ + m)/sin θ where the clamp passes the gradient; 1 on the linear branch
            passes = (target >= lo) & (target <= hi)
            slope = torch.where(on_arc & passes, torch.sin(theta + m) * torch.rsqrt(1.0 - clamped * clamped), 0.0)
            slope = torch.where(on_arc, slope, 1.0)
            s = self.scale
            z = cos.scatter_(1, t, modified).mul_(s)
            value, G = _fast.cross_entropy(z, labels, abs(s) * (1.0 + m + 1e-3), s)
            G.scatter_(1, t, G.gather(1, t).mul_(slope))
        return _fast.finish(st, value, G)


class SoftTripleLoss(ProxyLoss):
    r"""SoftTriple. Qian, Shang, Sun, Hu, Li, Jin, "SoftTriple Loss: Deep Metric Learning Without Triplet Sampling",
    ICCV 2019. K = ``centers_per_class`` centres per class (``proxies`` is (C·K)×d, class-major):

        S'_ic = Σ_k softmax_k(S_ick / γ)·S_ick,   L = mean_i cross-entropy(λ(S'_i − δ·onehot(y_i)), y_i)

    Defaults λ = ``la`` = 20, γ = 0.1, δ = ``margin`` = 0.01, K = 10 (PML). Deviation shared with PML: the
    paper's centre-merging regulariser (τ) is not included. Init kaiming-uniform(a=√5).
    """

    def __init__(
        self, num_classes: int, embedding_size: int, centers_per_class: int = 10, la: float = 20.0,
        gamma: float = 0.1, margin: float = 0.01, *, lr_multiplier: float = 1.0,
    ) -> None:
        self.centers_per_class = int(centers_per_class)
        super().__init__(num_classes, embedding_size, lr_multiplier)
        self.proxies = nn.Parameter(torch.empty(self.num_classes * self.centers_per_class, self.embedding_size))
        self.reset_parameters()
        self.la, self.gamma, self.margin = float(la), float(gamma), float(margin)

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.proxies, a=math.sqrt(5))

    def proxy_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        sim = cosine_similarity_matrix(embeddings, self._proxies_for(embeddings))
        sim = sim.view(-1, self.num_classes, self.centers_per_class)
        prob = F.softmax(sim / self.gamma, dim=2)
        sim_to_classes = (prob * sim).sum(2)
        margin = torch.zeros_like(sim_to_classes).scatter(1, labels.unsqueeze(1), self.margin)
        return F.cross_entropy(self.la * (sim_to_classes - margin), labels)

    fast = True

    def fast_proxy_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        st = self._fast_state(embeddings)
        with torch.no_grad():
            sim = _fast.similarity(st)
            b, inv_gamma, la = sim.shape[0], 1.0 / self.gamma, self.la
            sim3 = sim.view(b, self.num_classes, self.centers_per_class)
            prob = torch.softmax(sim3 * inv_gamma, dim=2)
            to_class = torch.linalg.vecdot(prob, sim3)  # B×C
            t = labels.unsqueeze(1)
            z = (to_class * la).scatter_add_(1, t, to_class.new_full((b, 1), -la * self.margin))
            value, w = _fast.cross_entropy(z, labels, abs(la) * (1.0 + abs(self.margin) + 1e-3), la)
            # ∂S'_c/∂S_ck = p_k·(1 + (S_ck − S'_c)/γ)
            G = sim3.sub_(to_class.unsqueeze(2)).mul_(inv_gamma).add_(1.0).mul_(prob).mul_(w.unsqueeze(2))
        return _fast.finish(st, value, G.view(b, -1))
