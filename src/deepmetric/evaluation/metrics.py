"""Per-query retrieval metrics from a ranked neighbour list (methods.md §1.5).

Notation for query q: R_q = #{g ∈ G \\ {q} : y_g = y_q} relevant items, rel_q(i) ∈ {0, 1} the relevance of the i-th
neighbour (1-based) in the stable order (−s, index), P_q(i) = (Σ_{j≤i} rel_q(j)) / i, and ρ_q the 0-based rank of
the first relevant item.

* Recall@K ("hit@K")  = mean_q 1[ρ_q < K]
* Precision@1         = mean_q rel_q(1)                       (= Recall@1 under stable ties)
* R-Precision         = mean_q (1/R_q) Σ_{i≤R_q} rel_q(i)
* MAP@R               = mean_q (1/R_q) Σ_{i≤R_q} P_q(i)·rel_q(i)
* MAP (full)          = mean_q (1/R_q) Σ_{j=1}^{R_q} j / (r_qj + 1), r_q1 < r_q2 < … the 0-based ranks of all
                        relevant items
Means run over queries with R_q > 0 only; the others are counted separately.
"""

from __future__ import annotations

import torch
from torch import Tensor


def first_relevant_position(rel: Tensor) -> tuple[Tensor, Tensor]:
    """(found (b,), 0-based position of the first True per row (b,), 0 where none) for a (b, k) relevance list."""
    found = rel.any(dim=1)
    # argmax returns the first maximal entry, i.e. the first relevant neighbour
    return found, rel.to(torch.uint8).argmax(dim=1)


def optimistic_position(values: Tensor, position: Tensor) -> Tensor:
    """ρ under the optimistic ("count-based") policy from a stable list: items before ``position`` with a score
    equal to the first relevant item's score are tied with it and no longer counted as ranked before it."""
    k = values.shape[1]
    best = values.gather(1, position.unsqueeze(1))
    before = torch.arange(k, device=values.device).unsqueeze(0) < position.unsqueeze(1)
    return position - ((values == best) & before).sum(dim=1)


def r_metrics(rel: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """(R-Precision, AP@R) per row from a (b, k) relevance list with k ≥ max R_q; rows with R_q = 0 give 0."""
    k = rel.shape[1]
    positions = torch.arange(1, k + 1, device=rel.device)
    in_window = positions.unsqueeze(0) <= r.unsqueeze(1)
    rel_r = (rel & in_window).to(torch.float64)
    hits = rel_r.cumsum(dim=1)
    denom = r.clamp_min(1).to(torch.float64)
    r_precision = rel_r.sum(dim=1) / denom
    ap_r = (hits / positions * rel_r).sum(dim=1) / denom
    return r_precision, ap_r


def average_precision_from_list(rel: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ_{i≤k} P(i)·rel(i), #relevant in the list) per row: the part of full AP contributed by the listed items."""
    k = rel.shape[1]
    positions = torch.arange(1, k + 1, device=rel.device, dtype=torch.float64)
    relf = rel.to(torch.float64)
    return (relf.cumsum(dim=1) / positions * relf).sum(dim=1), rel.sum(dim=1)


def average_precision_tail(ranks: Tensor, n_listed: Tensor) -> Tensor:
    """Σ_j (n_listed + j) / (r_j + 1) over the relevant items ranked after the list, ``ranks`` (b, m) holding their
    0-based ranks (any order) and −1 for "no item"."""
    present = ranks >= 0
    # sorted ascending with absent entries pushed to the end
    big = torch.iinfo(torch.int64).max
    ranks_sorted = torch.where(present, ranks, torch.full_like(ranks, big)).sort(dim=1).values
    present_sorted = ranks_sorted != big
    ordinal = n_listed.unsqueeze(1) + torch.arange(1, ranks.shape[1] + 1, device=ranks.device).unsqueeze(0)
    contrib = ordinal.to(torch.float64) / (ranks_sorted.clamp_max(1 << 62).to(torch.float64) + 1.0)
    return (contrib * present_sorted).sum(dim=1)
