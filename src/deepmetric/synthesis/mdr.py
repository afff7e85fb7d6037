"""MDR — Multi-level Distance Regularization (Kim & Park, AAAI 2021), methods.md §5.1, code
``kakaoenterprise/AAAI2021_MDR`` (``metric/loss.py:MDRLoss``, ``model/embedding.py:Embedding``).

* :class:`BatchDistanceScale` — training mode: z = e / mean_{i≠j}‖e_i − e_j‖ (gradient flows through the
  divisor); eval mode: z = e (ranking is scale-invariant).
* :class:`MDRRegularizer` — learnable levels l (init (−3, 0, 3)); D = pairwise Euclidean distances; running
  statistics μ̄, σ̄ (first call: batch values, then μ̄ ← 0.9·μ̄ + 0.1·μ_b); d̂_ij = (D_ij − μ̄)/σ̄;
  L_MDR = mean_{i≠j} min_k |d̂_ij − l_k|.
* :class:`MDR` — wrapper: L = base(z, y) + λ·L_MDR(z) + ν·Σ_k l_k².
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from deepmetric.synthesis.base import LossFn, SynthesisMethod, check_embeddings


def pairwise_distances_zero_diagonal(x: Tensor, eps: float = 1e-12) -> Tensor:
    """‖x_i − x_j‖₂ with an exact zero diagonal (the sqrt is kept differentiable off the diagonal by eps)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    sq = (x * x).sum(1, keepdim=True) + (x * x).sum(1).unsqueeze(0) - 2.0 * (x @ x.t())
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return torch.sqrt(sq.clamp_min(eps)).masked_fill(eye, 0.0)


class BatchDistanceScale(nn.Module):
    """MDR's un-normalised embedding: divide by the mean off-diagonal pairwise distance in training mode.

    z = e / mean_{i≠j}‖e_i − e_j‖ (training), z = e (eval). Needs B ≥ 2 in training mode.
    """

    def forward(self, e: Tensor) -> Tensor:
        if not self.training:
            return e
        b = e.shape[0]
        if b < 2:
            raise ValueError(f"BatchDistanceScale needs at least 2 rows in training mode, got {b}")
        mean_dist = pairwise_distances_zero_diagonal(e).sum() / (b * (b - 1))
        return e / mean_dist.to(e.dtype)


class MDRRegularizer(nn.Module):
    """L_MDR = mean_{i≠j} min_k |(D_ij − μ̄)/σ̄ − l_k| with learnable levels and running statistics (buffers).

    ``include_diagonal_in_stats=True`` (code) computes the batch mean and *unbiased* std over the full B×B
    distance matrix including its zero diagonal (⚠ methods.md §5.1); ``False`` uses the off-diagonal entries
    only. Statistics are detached; they are updated in training mode only (the first training call
    initialises them, tracked by the ``initialized`` buffer, so ``state_dict`` is complete). In eval mode before
    any training call the batch statistics are used without being stored.
    """

    def __init__(
        self,
        levels: tuple[float, ...] = (-3.0, 0.0, 3.0),
        momentum: float = 0.9,
        include_diagonal_in_stats: bool = True,
    ) -> None:
        super().__init__()
        if len(levels) < 1:
            raise ValueError("MDRRegularizer needs at least one level")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.include_diagonal_in_stats = include_diagonal_in_stats
        self.levels = nn.Parameter(torch.tensor(levels, dtype=torch.get_default_dtype()))
        self.register_buffer("running_mean", torch.zeros(()))
        self.register_buffer("running_std", torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, embeddings: Tensor) -> Tensor:
        b = embeddings.shape[0]
        if b < 2:
            raise ValueError(f"MDRRegularizer needs at least 2 rows, got {b}")
        dist = pairwise_distances_zero_diagonal(embeddings)
        off = ~torch.eye(b, dtype=torch.bool, device=dist.device)
        with torch.no_grad():
            stats_src = dist if self.include_diagonal_in_stats else dist[off]
            mu_b, sigma_b = stats_src.mean(), stats_src.std(unbiased=True)
            if self.training:
                if bool(self.initialized):
                    m = self.momentum
                    self.running_mean.mul_(m).add_((1 - m) * mu_b.to(self.running_mean.dtype))
                    self.running_std.mul_(m).add_((1 - m) * sigma_b.to(self.running_std.dtype))
                else:
                    self.running_mean.copy_(mu_b)
                    self.running_std.copy_(sigma_b)
                    self.initialized.fill_(True)
                mu, sigma = self.running_mean, self.running_std
            elif bool(self.initialized):
                mu, sigma = self.running_mean, self.running_std
            else:
                mu, sigma = mu_b, sigma_b
        normalized = (dist[off] - mu.to(dist.dtype)) / sigma.to(dist.dtype)
        gaps = (normalized.unsqueeze(1) - self.levels.to(dist.dtype).unsqueeze(0)).abs()
        return gaps.min(dim=1).values.mean()


class MDR(SynthesisMethod):
    """MDR wrapper: L = base(z, y) + λ·L_MDR(z) + ν·Σ_k l_k² (Kim & Park, "Multi-level Distance Regularization
    for Deep Metric Learning", AAAI 2021).

    Expects the **raw** head output (``expects_normalized_embeddings = False``). With
    ``scale_by_batch_distance=True`` the wrapper applies :class:`BatchDistanceScale` (training mode) before both
    terms, as MDR's ``Embedding`` module does; set it False if the model already does. README values:
    λ = 0.6 (CUB), 0.2 (Cars), 0.1 (SOP, In-shop); ν = 0.01. With λ = ν = 0 the result is exactly the base loss
    on the (scaled) embeddings. The levels train with the model's learning rate (``lr_multiplier = 1``).
    ``miner`` (e.g. distance-weighted sampling for MDR's triplet loss) is applied to the scaled embeddings and
    its result passed to the base loss as ``mined=``.
    """

    expects_normalized_embeddings = False

    def __init__(
        self,
        loss: LossFn,
        miner: nn.Module | None = None,
        *,
        lambda_mdr: float = 0.6,
        nu: float = 0.01,
        levels: tuple[float, ...] = (-3.0, 0.0, 3.0),
        momentum: float = 0.9,
        include_diagonal_in_stats: bool = True,
        scale_by_batch_distance: bool = True,
    ) -> None:
        super().__init__(loss, miner)
        self.lambda_mdr = lambda_mdr
        self.nu = nu
        self.regularizer = MDRRegularizer(levels, momentum, include_diagonal_in_stats)
        self.scale = BatchDistanceScale() if scale_by_batch_distance else None

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        self._refuse_references(ref_embeddings)
        check_embeddings(embeddings, labels, "MDR")
        z = self.scale(embeddings) if self.scale is not None else embeddings
        loss = self.inner_loss(z, labels)
        logs: dict[str, Tensor | float] = {}
        if self.lambda_mdr != 0:
            reg = self.regularizer(z)
            loss = loss + self.lambda_mdr * reg
            logs["mdr_loss"] = reg.detach()
        if self.nu != 0:
            loss = loss + self.nu * self.regularizer.levels.pow(2).sum()
        logs["loss"] = loss.detach()
        self.last_logs = logs
        return loss
