"""Relevance structure of a labelled search: the gallery grouped by label, R_q per query, the relevant pairs.

O(n_q + n_g + Σ R_q) memory; no similarity is computed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Groups:
    """Gallery items grouped by label: the relevant items of query q are order[start_q : start_q + count_q]."""

    order: Tensor  # gallery indices sorted by label (stable)
    start: Tensor  # per query
    count: Tensor  # per query: #gallery items with the query's label (self included in self-retrieval)


def group_gallery(query_labels: Tensor, gallery_labels: Tensor) -> Groups:
    order = torch.argsort(gallery_labels, stable=True)
    uniq, counts = torch.unique_consecutive(gallery_labels[order], return_counts=True)
    starts = counts.cumsum(0) - counts
    pos = torch.searchsorted(uniq, query_labels).clamp_max(uniq.shape[0] - 1)
    found = uniq[pos] == query_labels
    zero = torch.zeros_like(pos)
    return Groups(order, torch.where(found, starts[pos], zero), torch.where(found, counts[pos], zero))


def count_relevant(query_labels: Tensor, gallery_labels: Tensor, self_retrieval: bool) -> Tensor:
    """R_q per query: gallery items with the query's label (its own row not counted in self-retrieval)."""
    return group_gallery(query_labels, gallery_labels).count - int(self_retrieval)


def relevant_pairs(query_labels: Tensor, gallery_labels: Tensor, own: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Every (query row, gallery index) pair with equal labels, except gallery item ``own[row]`` when given
    (the query's own row in self-retrieval): O(Σ R_q) memory."""
    groups = group_gallery(query_labels, gallery_labels)
    device = query_labels.device
    row = torch.repeat_interleave(torch.arange(query_labels.shape[0], device=device), groups.count)
    offset = torch.arange(row.shape[0], device=device) - (groups.count.cumsum(0) - groups.count)[row]
    item = groups.order[groups.start[row] + offset]
    if own is not None:
        keep = item != own[row]
        row, item = row[keep], item[keep]
    return row, item


__all__ = ["Groups", "count_relevant", "group_gallery", "relevant_pairs"]
