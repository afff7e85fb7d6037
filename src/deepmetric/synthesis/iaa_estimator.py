"""IAA's class statistics (Fu et al., IEEE TMM 2022; methods.md §5.2 paper, §5.3 released code).

* :class:`ClassGaussianEstimator` — per-class *diagonal* Gaussian (μ_c, Σ_c) of the embeddings, estimated by a
  pass over the training set, either the paper's plain estimate or the released code's running update
  (``update_diag``, adapted from ISDA), plus the paper's neighbor correction of Σ for few-sample classes.
* :func:`neighbor_corrected_variances` and its weight :func:`neighbor_weight` — that correction (Eq. 11–15).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from deepmetric.synthesis.base import check_embeddings, check_labels

EstimatorUpdate = Literal["plain", "running"]


def neighbor_weight(counts: Tensor, beta: float = 0.1, tau: int = 40) -> Tensor:
    """a(n) = 1 / (1 + ln(1 + β(n − 1))) for 1 ≤ n < τ, else 0 (IAA paper Eq. 14, code ``weight_functions``).

    ⚠ The paper writes the condition as n ≤ τ; the released code uses ``counts < 40``. We follow the code (so
    a(τ) = 0, matching methods.md §9). Classes with n = 0 have no estimate and get a = 0 (the formula would
    exceed 1 there).
    """
    out_dtype = counts.dtype if counts.is_floating_point() else torch.get_default_dtype()
    n = counts.to(torch.float64)
    a = 1.0 / (1.0 + torch.log1p(beta * (n - 1.0).clamp_min(0.0)))
    return torch.where((n >= 1) & (n < tau), a, torch.zeros_like(a)).to(out_dtype)


def neighbor_corrected_variances(
    means: Tensor,
    variances: Tensor,
    counts: Tensor,
    *,
    num_neighbors: int = 25,
    beta: float = 0.1,
    gamma: float = 0.1,
    tau: int = 40,
    sigma_m: float = 1.0,
    sigma_cv: float = 1.0,
    chunk_size: int = 1024,
) -> Tensor:
    """Neighbor correction of diagonal class covariances, as the IAA paper defines it (§IV, Eq. 11–15).

    With n_k the number of samples of class k in the estimation pass::

        D_m(i,k)  = ‖μ_i² − μ_k²‖₂ (element-wise squared means),   D_cv(i,k) = ‖Σ_i − Σ_k‖₂
        N_k       = the K classes i ≠ k with smallest D_m(i,k)
        Σ_k^nb    = Σ_{i∈N_k} w_i Σ_i / Σ w_i,   w_i = n_i·exp(−D_m²/(2σ_m²) − D_cv²/(2σ_cv²))
        Σ_global  = Σ_k n_k Σ_k / Σ_k n_k
        Σ_k^cr    = (1 − a_k)·Σ_k + a_k·[(1 − γ)·Σ_k^nb + γ·Σ_global],   a_k = :func:`neighbor_weight`

    Only classes with n ≥ 2 (a real variance estimate) serve as neighbours and enter Σ_global, as in the code's
    large-dataset branch. Differences from that code: distances are *not* min-max normalised per row (the code's
    normalisation, polluted by its 1e12 sentinels, makes the mean-distance factor ≈ 1), and the weights are
    normalised in log space so that large distances cannot underflow every weight to zero. A class without any
    valid neighbour uses Σ_global as Σ^nb. Rows are processed in chunks: memory O(chunk·C + chunk·K·d).
    """
    if means.shape != variances.shape or means.dim() != 2:
        raise ValueError(f"means and variances must both be C×d, got {tuple(means.shape)}, {tuple(variances.shape)}")
    num_classes = means.shape[0]
    counts_f = counts.to(variances.dtype)
    valid = counts >= 2
    if valid.any():
        global_cov = (variances[valid] * counts_f[valid, None]).sum(0) / counts_f[valid].sum()
    else:
        global_cov = torch.zeros_like(variances[0])
    k = min(num_neighbors, num_classes - 1)
    sq_means = means * means
    nb_cov = global_cov.expand_as(variances).clone()
    if k > 0:
        for start in range(0, num_classes, chunk_size):
            rows = torch.arange(start, min(start + chunk_size, num_classes), device=means.device)
            d_m = torch.cdist(sq_means[rows], sq_means)  # chunk × C
            excluded = (~valid).unsqueeze(0) | (rows.unsqueeze(1) == torch.arange(num_classes, device=means.device))
            d_m = d_m.masked_fill(excluded, math.inf)
            d_nb, idx = torch.topk(d_m, k, dim=1, largest=False)  # chunk × K
            usable = torch.isfinite(d_nb)
            d_cv = (variances[rows].unsqueeze(1) - variances[idx]).norm(dim=2)  # chunk × K
            log_w = (
                torch.log(counts_f[idx].clamp_min(1e-30))
                - d_nb.masked_fill(~usable, 0.0).pow(2) / (2 * sigma_m**2)
                - d_cv.pow(2) / (2 * sigma_cv**2)
            ).masked_fill(~usable, -math.inf)
            has_nb = usable.any(1)
            w = torch.softmax(log_w.masked_fill(~has_nb.unsqueeze(1), 0.0), dim=1) * usable
            chunk_nb = (w.unsqueeze(2) * variances[idx]).sum(1)
            nb_cov[rows] = torch.where(has_nb.unsqueeze(1), chunk_nb, global_cov.expand_as(chunk_nb))
    a = neighbor_weight(counts, beta, tau).to(variances.dtype).unsqueeze(1)
    return (1 - a) * variances + a * ((1 - gamma) * nb_cov + gamma * global_cov)


class ClassGaussianEstimator(nn.Module):
    """Per-class diagonal Gaussian of embeddings, state in buffers.

    Buffers: ``means`` (C×d), ``variances`` (C×d, biased per-dimension), ``counts`` (C, cumulative number of
    samples seen, A_c), ``pass_counts`` (C, n_c of the most recent pass that contained the class),
    ``corrected_variances`` (C×d, what synthesis uses: neighbor-corrected Σ^cr if enabled, else Σ) and
    ``initialized`` (bool).

    One *pass* (:meth:`begin_pass`, :meth:`accumulate` per batch, :meth:`end_pass`; or :meth:`update` on all
    embeddings at once) yields per-class batch statistics m_c, v_c, n_c and then:

    * ``update="plain"`` (paper Eq. 1–2): μ_c = m_c, Σ_c = v_c for every class present in the pass.
    * ``update="running"`` (code ``update_diag``, adapted from ISDA): w = n_c/(n_c + A_c), w ← max(w, 1 − momentum)
      (w = 0 if n_c = 0); Σ_c ← (1−w)Σ_c + w·v_c + w(1−w)(μ_c − m_c)²; μ_c ← (1−w)μ_c + w·m_c; A_c += n_c.
      The first pass gives Σ_c = v_c. (The code's momentum argument is 0.2, i.e. w ≥ 0.8.)

    Pass statistics are accumulated in float64 so that a streaming pass equals a one-shot estimate.
    ``apply_neighbor_correction`` is off by default: the paper reserves it for few-sample datasets (SOP,
    In-shop, VehicleID; methods.md §5.2) and the released code never applies it.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        update: EstimatorUpdate = "plain",
        momentum: float = 0.2,
        apply_neighbor_correction: bool = False,
        num_neighbors: int = 25,
        beta: float = 0.1,
        gamma: float = 0.1,
        tau: int = 40,
        sigma_m: float = 1.0,
        sigma_cv: float = 1.0,
    ) -> None:
        super().__init__()
        if num_classes < 1 or embedding_size < 1:
            raise ValueError(f"num_classes and embedding_size must be ≥ 1, got {num_classes}, {embedding_size}")
        if update not in ("plain", "running"):
            raise ValueError(f"update must be 'plain' or 'running', got {update!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.update_rule = update
        self.momentum = momentum
        self.apply_neighbor_correction = apply_neighbor_correction
        self.correction_params = {
            "num_neighbors": num_neighbors, "beta": beta, "gamma": gamma, "tau": tau,
            "sigma_m": sigma_m, "sigma_cv": sigma_cv,
        }
        self.register_buffer("means", torch.zeros(num_classes, embedding_size))
        self.register_buffer("variances", torch.zeros(num_classes, embedding_size))
        self.register_buffer("counts", torch.zeros(num_classes))
        self.register_buffer("pass_counts", torch.zeros(num_classes))
        self.register_buffer("corrected_variances", torch.zeros(num_classes, embedding_size))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._pass: tuple[Tensor, Tensor, Tensor] | None = None

    # -- streaming pass -------------------------------------------------------------------------------------------
    def begin_pass(self) -> None:
        acc_dtype = torch.float32 if self.means.device.type == "mps" else torch.float64
        c, d = self.means.shape
        dev = self.means.device
        self._pass = (
            torch.zeros(c, device=dev, dtype=acc_dtype),
            torch.zeros(c, d, device=dev, dtype=acc_dtype),
            torch.zeros(c, d, device=dev, dtype=acc_dtype),
        )

    @torch.no_grad()
    def accumulate(self, embeddings: Tensor, labels: Tensor) -> None:
        if self._pass is None:
            raise RuntimeError("ClassGaussianEstimator.accumulate called outside begin_pass()/end_pass()")
        check_embeddings(embeddings, labels, "ClassGaussianEstimator", self.embedding_size)
        check_labels(labels, self.num_classes, "ClassGaussianEstimator")
        n, s, sq = self._pass
        x = embeddings.detach().to(device=s.device, dtype=s.dtype)
        y = labels.to(s.device)
        n.index_add_(0, y, torch.ones_like(y, dtype=n.dtype))
        s.index_add_(0, y, x)
        sq.index_add_(0, y, x * x)

    @torch.no_grad()
    def end_pass(self) -> None:
        if self._pass is None:
            raise RuntimeError("ClassGaussianEstimator.end_pass called without begin_pass()")
        n, s, sq = self._pass
        self._pass = None
        present = n > 0
        denom = n.clamp_min(1).unsqueeze(1)
        batch_mean = s / denom
        batch_var = (sq / denom - batch_mean * batch_mean).clamp_min(0.0)
        self._apply_update(n, batch_mean, batch_var, present)

    @torch.no_grad()
    def update(self, embeddings: Tensor, labels: Tensor) -> None:
        """One estimation pass over ``embeddings`` (all training samples, or whatever the caller chose)."""
        self.begin_pass()
        self.accumulate(embeddings, labels)
        self.end_pass()

    def _apply_update(self, n: Tensor, batch_mean: Tensor, batch_var: Tensor, present: Tensor) -> None:
        dtype = batch_mean.dtype
        mu, var, amount = self.means.to(dtype), self.variances.to(dtype), self.counts.to(dtype)
        if self.update_rule == "running":
            w = n / (n + amount).clamp_min(1e-30)
            w = w.clamp_min(1.0 - self.momentum)
        else:
            w = torch.ones_like(n)
        w = torch.where(present, w, torch.zeros_like(w)).unsqueeze(1)
        # the cross term uses the *old* mean: variance of the mixture of the old and the new distribution
        new_var = (1 - w) * var + w * batch_var + w * (1 - w) * (mu - batch_mean).pow(2)
        new_mu = (1 - w) * mu + w * batch_mean
        self.variances.copy_(new_var)
        self.means.copy_(new_mu)
        self.counts.add_(n.to(self.counts.dtype))
        self.pass_counts.copy_(torch.where(present, n.to(self.pass_counts.dtype), self.pass_counts))
        self.initialized.fill_(bool(present.any()) or bool(self.initialized))
        self.refresh_correction()

    @torch.no_grad()
    def refresh_correction(self) -> None:
        """Recompute ``corrected_variances`` from the current estimate (call after editing buffers by hand)."""
        if self.apply_neighbor_correction:
            self.corrected_variances.copy_(
                neighbor_corrected_variances(self.means, self.variances, self.pass_counts, **self.correction_params)
            )
        else:
            self.corrected_variances.copy_(self.variances)

    def class_variances(self, labels: Tensor) -> Tensor:
        """Σ used for synthesis, gathered per row (B×d)."""
        check_labels(labels, self.num_classes, "ClassGaussianEstimator")
        return self.corrected_variances[labels]
