"""SGAR — synthesis-ranking regularizer on Proxy-Anchor, **reconstructed** (methods.md §2.3 [RECON]).

Paper: "Deep Metric Learning Assisted by Intra-variance in a Semi-supervised View" (arXiv 2304.10941, EAAI 131
(2024) 107885), improved from SSSR (Fu et al., TCSVT 2022). **No public code exists** (only a README); this module
is a reconstruction from the abstract and a third-party summary of arXiv v1, so every SGAR-specific choice below
is an explicit parameter whose default is a guess to be tuned on a validation split — not the authors' setting.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from deepmetric.functional import l2_normalize
from deepmetric.loss_hooks import StepContext
from deepmetric.synthesis.base import LossFn, RandomSource, SynthesisMethod, check_embeddings

Space = Literal["feature", "embedding"]
Gate = Literal["proxy_sim", "all", "top_fraction"]


def ranking_loss(sims: Tensor, margin: float) -> Tensor:
    """Per-source all-pairs ordering loss on s (G×J, column j = intensity j+1), result of length G.

    L_rank(i) = (2/(J(J−1))) Σ_{1≤j<k≤J} [s_k − s_j + m_r]₊: a copy with lower intensity must be more similar to
    its source by at least m_r. Zero when J < 2.
    """
    g, j = sims.shape
    if j < 2:
        return sims.new_zeros(g)
    upper = torch.triu(torch.ones(j, j, dtype=torch.bool, device=sims.device), diagonal=1)  # (j, k) with j < k
    viol = (sims.unsqueeze(1) - sims.unsqueeze(2) + margin).clamp_min(0.0)  # [g, j, k] = s_k − s_j + m
    return (viol * upper).sum(dim=(1, 2)) * (2.0 / (j * (j - 1)))


def anchor_loss(hardest_positive_sim: Tensor, strongest_copy_sim: Tensor, margin: float) -> Tensor:
    """L_anc(i) = [s⁻⁺_i − s_J + m_a]₊: the most perturbed copy must stay at least as similar to its source as the
    hardest real positive (synthetic spread within the real intra-class spread)."""
    return (hardest_positive_sim - strongest_copy_sim + margin).clamp_min(0.0)


class SynthesisRankingRegularizer(SynthesisMethod):
    """Reconstructed SGAR: L = L_base(real) + λ_r · mean_{i∈G}(L_rank(i) + η·L_anc(i)). [RECON, methods.md §2.3]

    ⚠ A reconstruction from the paper's text: there is no public code, and the gate rule, step scale, margins,
    weights and the anchor term are our reading of it. All of them are parameters:

    * ``space``: ``'feature'`` perturbs the pooled backbone feature r_i and maps it through the projection g
      (``head``): z_i^j = normalize(g(r_i^j)); ``'embedding'`` perturbs the embedding directly.
    * ``gate`` G: ``'proxy_sim'`` (cos(z_i, w_{y_i}) ≥ ``tau_g``, needs proxies on the base loss), ``'all'``, or
      ``'top_fraction'`` (the ``top_fraction`` of the batch with the highest own-proxy similarity).
    * synthesis, j = 1..J (``num_intensities``): r_i^j = r_i + j·a·‖r_i‖·u_i^j (``relative_step=True``; absolute
      step j·a·u otherwise), u a uniformly random unit direction, fresh per j (``shared_direction=False``,
      "diversity") or one per source (radial trajectory as in SSSR).
    * ranking: :func:`ranking_loss` with margin ``m_r`` on s_j = cos(z_i, z_i^j).
    * anchor term: :func:`anchor_loss` with margin ``m_a`` and weight ``eta``; s⁻⁺_i = hardest real positive
      similarity in the batch (falls back to the own-proxy similarity when the batch has no positive; the term
      is dropped when neither exists). s⁻⁺ is detached: it is a target, not something to push apart.
    * ``detach_features``: in feature space the source r_i is detached, so the regularizer trains g only (the
      real z_i in s_j still carries gradient). Ignored in embedding space.

    Expects the model's normalised output as ``embeddings`` (it is re-normalised anyway), plus the step's
    ``features`` and ``head`` in feature space, which arrive through :meth:`on_step_start` (a
    :class:`~deepmetric.loss_hooks.StepContext`). A ``miner`` restricts the base loss on the real batch. With ``a=0`` and ``lambda_r=0`` the loss equals the base loss exactly. Un-gated
    samples receive no gradient from the regularizer.

    Logs per call: ``sgar_gated_fraction`` (share of the batch that passed the gate), ``sgar_gate_opened`` (1 when
    at least one sample did), the batch's mean and max own-proxy similarity (``sgar_proxy_sim_mean``/``_max``,
    when there are proxies), ``sgar_rank`` and ``sgar_anchor``; :meth:`gate_counts` accumulates both over the run.
    """

    expects_normalized_embeddings = True

    def __init__(
        self,
        loss: LossFn,
        miner: nn.Module | None = None,
        *,
        num_intensities: int = 5,
        a: float = 0.1,
        relative_step: bool = True,
        space: Space = "feature",
        gate: Gate = "proxy_sim",
        tau_g: float = 0.5,
        top_fraction: float = 0.5,
        shared_direction: bool = False,
        m_r: float = 0.03,
        m_a: float = 0.0,
        eta: float = 1.0,
        lambda_r: float = 0.5,
        detach_features: bool = True,
        proxies_attr: str = "proxies",
        seed: int | None = 0,
    ) -> None:
        super().__init__(loss, miner)
        if space not in ("feature", "embedding"):
            raise ValueError(f"space must be 'feature' or 'embedding', got {space!r}")
        if gate not in ("proxy_sim", "all", "top_fraction"):
            raise ValueError(f"gate must be 'proxy_sim', 'all' or 'top_fraction', got {gate!r}")
        if num_intensities < 1:
            raise ValueError(f"num_intensities (J) must be ≥ 1, got {num_intensities}")
        if not 0.0 < top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
        self.num_intensities = num_intensities
        self.a = a
        self.relative_step = relative_step
        self.space = space
        self.gate = gate
        self.tau_g = tau_g
        self.top_fraction = top_fraction
        self.shared_direction = shared_direction
        self.m_r = m_r
        self.m_a = m_a
        self.eta = eta
        self.lambda_r = lambda_r
        self.detach_features = detach_features
        self.proxies_attr = proxies_attr
        self.needs_features = space == "feature"
        self.needs_head = space == "feature"
        self.rng = RandomSource(seed)
        self.context = StepContext()
        # Gate counters over every regularizer call since construction (or reset_gate_counts): how often SGAR
        # acts at all — with a proxy-similarity gate and untrained proxies it may never open. Kept as a tensor so
        # counting adds no device synchronisation of its own; not module state: they restart with the process.
        self.reset_gate_counts()

    def reset_gate_counts(self) -> None:
        """Zero the cumulative gate counters read by :meth:`gate_counts`."""
        self._gate_counts = torch.zeros(4, dtype=torch.long)  # samples, gated samples, batches, opened batches

    def gate_counts(self) -> dict[str, float]:
        """Cumulative gate statistics: ``samples``, ``gated_samples``, ``batches``, ``opened_batches`` (a batch
        is opened when at least one of its samples passes the gate) and the two fractions ``sample_fraction``
        and ``batch_fraction`` (0 before any call)."""
        samples, gated, batches, opened = (int(v) for v in self._gate_counts.tolist())
        return {"samples": samples, "gated_samples": gated, "batches": batches, "opened_batches": opened,
                "sample_fraction": gated / samples if samples else 0.0,
                "batch_fraction": opened / batches if batches else 0.0}

    def on_step_start(self, context: StepContext) -> None:
        self.context = context

    def _proxies(self) -> Tensor | None:
        proxies = getattr(self.loss, self.proxies_attr, None)
        return proxies if isinstance(proxies, Tensor) else None

    def gate_mask(self, z: Tensor, labels: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B bool gate, own-proxy similarity or None); ``z`` must be L2-normalised."""
        proxies = self._proxies()
        proxy_sim = None
        if proxies is not None:
            proxy_sim = (z.detach() * l2_normalize(proxies.detach())[labels].to(z.dtype)).sum(1)
        if self.gate == "all":
            return torch.ones_like(labels, dtype=torch.bool), proxy_sim
        if proxy_sim is None:
            raise ValueError(
                f"SGAR gate {self.gate!r} needs proxies: the base loss {type(self.loss).__name__} has no "
                f"tensor attribute {self.proxies_attr!r}; use gate='all' or a proxy loss"
            )
        if self.gate == "proxy_sim":
            return proxy_sim >= self.tau_g, proxy_sim
        k = max(1, math.ceil(self.top_fraction * labels.shape[0]))
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[torch.topk(proxy_sim, k).indices] = True
        return mask, proxy_sim

    def _directions(self, g: int, dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        gen = self.rng.generator(device)
        j = 1 if self.shared_direction else self.num_intensities
        xi = torch.randn((j, g, dim), generator=gen, device=device, dtype=dtype)
        u = l2_normalize(xi)
        return u.expand(self.num_intensities, g, dim) if self.shared_direction else u

    def regularizer(
        self, embeddings: Tensor, labels: Tensor, features: Tensor | None = None, head: nn.Module | None = None
    ) -> tuple[Tensor, dict[str, Tensor | float]]:
        """mean_{i∈G}(L_rank(i) + η·L_anc(i)) and logs; 0 when no sample passes the gate."""
        z = l2_normalize(embeddings)
        gate, proxy_sim = self.gate_mask(z, labels)
        idx = gate.nonzero(as_tuple=True)[0]
        gated = gate.sum()
        opened = (gated > 0).long()
        step_counts = torch.stack([gated.new_tensor(gate.numel()), gated, gated.new_tensor(1), opened])
        if self._gate_counts.device != step_counts.device:
            self._gate_counts = self._gate_counts.to(step_counts.device)
        self._gate_counts += step_counts
        logs: dict[str, Tensor | float] = {"sgar_gated_fraction": gate.float().mean(), "sgar_gate_opened": opened}
        if proxy_sim is not None:  # where the samples sit relative to tau_g
            logs.update(sgar_proxy_sim_mean=proxy_sim.mean(), sgar_proxy_sim_max=proxy_sim.max())
        if idx.numel() == 0:
            return z.new_zeros(()), logs
        if self.space == "feature":
            if features is None or head is None:
                raise ValueError(
                    "SGAR with space='feature' needs the step's features (pooled backbone output) and head: call "
                    "on_step_start(StepContext(features=..., head=...)) before the forward"
                )
            if features.dim() != 2 or features.shape[0] != embeddings.shape[0]:
                raise ValueError(f"features must be B×D pooled features, got {tuple(features.shape)}")
            src = features[idx].detach() if self.detach_features else features[idx]
            weight = next(head.parameters(), None)
            if weight is not None and weight.is_floating_point() and src.dtype != weight.dtype:
                src = src.to(weight.dtype)  # features may come from an autocast region, the head runs outside it
        else:
            src = embeddings[idx]
        g, dim = src.shape
        steps = self.a * torch.arange(1, self.num_intensities + 1, device=src.device, dtype=src.dtype)
        radius = src.norm(dim=1, keepdim=True) if self.relative_step else src.new_ones(g, 1)
        perturbed = src.unsqueeze(0) + steps.view(-1, 1, 1) * radius.unsqueeze(0) * self._directions(
            g, dim, src.device, src.dtype
        )
        flat = perturbed.reshape(-1, dim)
        z_syn = l2_normalize(head(flat) if self.space == "feature" else flat).reshape(self.num_intensities, g, -1)
        sims = (z[idx].unsqueeze(0) * z_syn.to(z.dtype)).sum(-1).t()  # G×J, column j = intensity j+1
        l_rank = ranking_loss(sims, self.m_r)
        with torch.no_grad():
            same = labels[idx].unsqueeze(1) == labels.unsqueeze(0)
            same[torch.arange(g, device=idx.device), idx] = False
            cos = z[idx] @ z.t()
            has_pos = same.any(1)
            hardest = cos.masked_fill(~same, math.inf).min(1).values
            if proxy_sim is not None:
                hardest = torch.where(has_pos, hardest, proxy_sim[idx])
                usable = torch.ones_like(has_pos)
            else:
                usable = has_pos
            hardest = torch.where(usable, hardest, torch.zeros_like(hardest))
        l_anc = anchor_loss(hardest, sims[:, -1], self.m_a) * usable
        reg = (l_rank + self.eta * l_anc).mean()
        logs.update(sgar_rank=l_rank.detach().mean(), sgar_anchor=l_anc.detach().mean())
        return reg, logs

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        self._refuse_references(ref_embeddings)
        check_embeddings(embeddings, labels, "SGAR")
        loss = self.inner_loss(embeddings, labels)
        reg, logs = self.regularizer(embeddings, labels, self.context.features, self.context.head)
        total = loss + self.lambda_r * reg
        logs["loss"] = total.detach()
        self.last_logs = logs
        return total


#: Short name used by the registry.
SGAR = SynthesisRankingRegularizer
