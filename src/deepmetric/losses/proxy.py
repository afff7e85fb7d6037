"""Proxy losses: the base of every loss against learnable class proxies, Proxy-Anchor and Proxy-NCA.

They compare each embedding with learnable class proxies (C×d), not with other samples: ``ref_embeddings``,
``ref_labels`` and ``ignore_mask`` are accepted (one signature for every loss, e.g. under cross-batch memory) but
ignored, and ``mined=`` is refused. Labels must be integers in 0..num_classes−1. ``lr_multiplier`` is applied
by the trainer to the proxies. The classification-style proxy losses are in :mod:`deepmetric.losses.classification`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric.functional import as_float, cosine_similarity_matrix, masked_logsumexp, pairwise_distance
from deepmetric.losses.base import MetricLoss, Mined


class ProxyLoss(MetricLoss):
    """Base for proxy losses: owns ``proxies`` (C×d) and checks labels. Subclasses implement :meth:`proxy_loss`."""

    accepts_mined = False
    build_arguments = ("num_classes", "embedding_size")

    def __init__(self, num_classes: int, embedding_size: int, lr_multiplier: float = 1.0) -> None:
        super().__init__()
        if num_classes < 1 or embedding_size < 1:
            raise ValueError(f"{type(self).__name__}: num_classes and embedding_size must be >= 1")
        self.num_classes, self.embedding_size = int(num_classes), int(embedding_size)
        self.proxies = nn.Parameter(torch.empty(self.num_rows(), self.embedding_size))
        self.lr_multiplier = float(lr_multiplier)
        self.reset_parameters()

    def num_rows(self) -> int:
        """Rows of ``proxies`` (one per class; SoftTriple has several)."""
        return self.num_classes

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
        onehot = F.one_hot(labels, self.num_classes).to(cos.dtype)
        pos_term = masked_logsumexp(-self.alpha * (cos - self.margin), onehot, dim=0, add_one=True)
        neg_term = masked_logsumexp(self.alpha * (cos + self.margin), 1.0 - onehot, dim=0, add_one=True)
        n_with_pos = (onehot.sum(0) > 0).sum().clamp_min(1)
        return pos_term.sum() / n_with_pos + neg_term.sum() / self.num_classes


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
