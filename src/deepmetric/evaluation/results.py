"""``RetrievalResults``: the one product of a neighbour search, read by every metric, re-ranking, verification,
the HTML report and ``deepmetric search``.

A results object holds, per query q (row i of every tensor):

* ``query_ids[i]``            the row of q in the query set (all rows, or the subset that was searched);
* ``neighbour_index[i]``      the top-k gallery rows in the stable order (−score, gallery index), own row excluded
                              in self-retrieval; ``neighbour_score[i]`` their scores (higher = closer);
* ``n_relevant[i]``           R_q, the number of gallery items with q's label (own row excluded);
* ``first_relevant_rank[i]``  ρ_q, the 0-based rank of the first relevant item in the *whole* ranking when
                              ρ_q < ``rank_depth``, and ``rank_depth`` otherwise (or when R_q = 0);
* ``per_query[name][i]``      exact per-query values of "precision@1", "r_precision", "map@r", "map" computed
                              during the search (formulas in :mod:`.metrics`).

Recall@K is 1[ρ_q < K] and needs K ≤ ``rank_depth``. Every mean runs over the queries with R_q > 0 only.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

LIST_METRICS = ("precision@1", "r_precision", "map@r", "map")


@dataclass
class RetrievalResults:
    """Top-k neighbour lists and exact per-query retrieval values (see the module docstring)."""

    query_ids: Tensor
    neighbour_index: Tensor
    neighbour_score: Tensor
    query_labels: Tensor | None
    gallery_labels: Tensor | None
    n_relevant: Tensor
    first_relevant_rank: Tensor
    rank_depth: int
    n_gallery: int
    self_retrieval: bool
    distance: str
    ties: str = "stable"
    per_query: dict[str, Tensor] = field(default_factory=dict)

    @property
    def n_queries(self) -> int:
        return int(self.query_ids.shape[0])

    @property
    def k(self) -> int:
        """Length of the stored neighbour lists."""
        return int(self.neighbour_index.shape[1])

    @property
    def relevant(self) -> Tensor:
        """(n_q, k) bool: neighbour i of query q has q's label."""
        if self.query_labels is None or self.gallery_labels is None:
            raise ValueError("these results were searched without labels, so relevance is unknown")
        return self.gallery_labels[self.neighbour_index] == self.query_labels.unsqueeze(1)

    def per_query_metrics(self, recall_at: Sequence[int] = (1, 2, 4, 8)) -> dict[str, np.ndarray]:
        """Per-query values (float64, NaN where R_q = 0): ``recall@K`` (0/1 hits) and the stored list metrics."""
        self._require_labels()
        has_rel = (self.n_relevant > 0).cpu().numpy()
        out: dict[str, np.ndarray] = {}
        for k in sorted({int(k) for k in recall_at}):
            self._check_recall_k(k)
            hit = (self.first_relevant_rank < k).cpu().numpy().astype(np.float64)
            out[f"recall@{k}"] = np.where(has_rel, hit, np.nan)
        for name in LIST_METRICS:
            if name in self.per_query:
                out[name] = np.where(has_rel, self.per_query[name].cpu().numpy().astype(np.float64), np.nan)
        return out

    def metrics(self, recall_at: Sequence[int] = (1, 2, 4, 8)) -> dict[str, float]:
        """Means over queries with R_q > 0, plus ``n_queries`` and ``n_queries_without_relevant``."""
        values = self.per_query_metrics(recall_at)
        n_rel = int((self.n_relevant > 0).sum())
        if n_rel == 0:
            warnings.warn("no query has a relevant gallery item; retrieval metrics are NaN", stacklevel=2)
        result: dict[str, Any] = {
            name: float(np.nanmean(v)) if n_rel else float("nan") for name, v in values.items()
        }
        result["n_queries"] = self.n_queries
        result["n_queries_without_relevant"] = self.n_queries - n_rel
        return result

    def metrics_by_group(self, groups: Any, recall_at: Sequence[int] = (1, 2, 4, 8)) -> dict[Any, dict[str, float]]:
        """The metric means per value of ``groups`` (one entry per result row, e.g. the category of each query:
        ``category_of_item[results.query_ids]``), keyed by the group value (numpy scalars as Python values). Each
        entry has the keys of :meth:`metrics`: the means over the group's queries with R_q > 0 (NaN when it has
        none), ``n_queries`` and ``n_queries_without_relevant``."""
        g = np.asarray(groups)
        if g.shape != (self.n_queries,):
            raise ValueError(f"groups must have one entry per query ({self.n_queries}), got shape {g.shape}")
        values = self.per_query_metrics(recall_at)
        has_rel = (self.n_relevant > 0).cpu().numpy()
        out: dict[Any, dict[str, float]] = {}
        for value in np.unique(g):
            rows = (g == value) & has_rel
            entry: dict[str, float] = {name: float(v[rows].mean()) if rows.any() else float("nan")
                                       for name, v in values.items()}
            entry["n_queries"] = int((g == value).sum())
            entry["n_queries_without_relevant"] = entry["n_queries"] - int(rows.sum())
            out[value.item() if hasattr(value, "item") else value] = entry
        return out

    def truncated(self, k: int) -> RetrievalResults:
        """The same results with the neighbour lists cut to the first ``k`` entries."""
        if not 1 <= k <= self.k:
            raise ValueError(f"k must be in [1, {self.k}], got {k}")
        return replace(self, neighbour_index=self.neighbour_index[:, :k], neighbour_score=self.neighbour_score[:, :k])

    def subset(self, rows: Tensor | np.ndarray | Sequence[int]) -> RetrievalResults:
        """The results of the given result rows only (not query ids: positions in this object)."""
        r = torch.as_tensor(np.asarray(rows), dtype=torch.int64, device=self.neighbour_index.device)
        return replace(
            self, query_ids=self.query_ids[r], neighbour_index=self.neighbour_index[r],
            neighbour_score=self.neighbour_score[r], n_relevant=self.n_relevant[r],
            first_relevant_rank=self.first_relevant_rank[r],
            query_labels=None if self.query_labels is None else self.query_labels[r],
            per_query={name: v[r] for name, v in self.per_query.items()},
        )

    def _require_labels(self) -> None:
        if self.query_labels is None or self.gallery_labels is None:
            raise ValueError("these results were searched without labels; metrics need query and gallery labels")

    def _check_recall_k(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"recall_at values must be positive integers, got {k}")
        if k > self.rank_depth:
            raise ValueError(
                f"recall@{k} needs ranks up to {k}, but these results know first-relevant ranks only below "
                f"{self.rank_depth} (search again with rank_depth ≥ {k})"
            )


__all__ = ["LIST_METRICS", "RetrievalResults"]
