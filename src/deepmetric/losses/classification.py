"""Classification-style proxy losses: Normalized Softmax, ArcFace, SoftTriple (see :mod:`deepmetric.losses.proxy`
for the shared conventions)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric.functional import cosine_similarity_matrix
from deepmetric.losses.proxy import ProxyLoss


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
        self.la, self.gamma, self.margin = float(la), float(gamma), float(margin)

    def num_rows(self) -> int:
        return self.num_classes * self.centers_per_class

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.proxies, a=math.sqrt(5))

    def proxy_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        sim = cosine_similarity_matrix(embeddings, self._proxies_for(embeddings))
        sim = sim.view(-1, self.num_classes, self.centers_per_class)
        prob = F.softmax(sim / self.gamma, dim=2)
        sim_to_classes = (prob * sim).sum(2)
        margin = torch.zeros_like(sim_to_classes).scatter(1, labels.unsqueeze(1), self.margin)
        return F.cross_entropy(self.la * (sim_to_classes - margin), labels)
