"""Optional faiss backend: exact flat search (IndexFlatIP / IndexFlatL2) or approximate IVF / HNSW.

The neighbour lists come from faiss; the metrics are the same list formulas as the torch backend
(:mod:`.metrics`). The list length is k = max(max_q R_q, max K) so every requested metric is exact for the flat
index (tie order among exactly equal scores is faiss's, not the library's stable order). Self-retrieval searches
k + 1 neighbours and removes the column whose index equals the query's own row (duplicate-safe); when the own row is
not returned (ties with duplicates) the last column is dropped. Approximate indexes additionally report
``ann_recall@k`` = mean over a query sample of |ANN top-k ∩ exact top-k| / k, with k = max(recall_at)
(or the list length when no Recall@K is requested).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from deepmetric.evaluation import metrics as M
from deepmetric.evaluation.relevance import count_relevant
from deepmetric.evaluation.results import RetrievalResults
from deepmetric.evaluation.retrieval import retrieve


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the faiss evaluation backends need the optional 'faiss' extra: pip install deepmetric[faiss] "
            "(or pip install faiss-cpu)"
        ) from err
    return faiss


def default_nlist(n: int) -> int:
    """4·√n inverted lists, with at least 39 training points per list (faiss's minimum)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def build_faiss_index(faiss: Any, g: np.ndarray, distance: str, backend: str, params: dict[str, Any]) -> Any:
    """A filled faiss index over the rows of ``g`` (float32, prepared for ``distance``): flat, IVF or HNSW."""
    d = g.shape[1]
    inner = distance != "euclidean"
    metric = faiss.METRIC_INNER_PRODUCT if inner else faiss.METRIC_L2
    if backend == "faiss":
        index = faiss.IndexFlatIP(d) if inner else faiss.IndexFlatL2(d)
    elif backend == "faiss-ivf":
        nlist = int(params.get("nlist", default_nlist(g.shape[0])))
        quantizer = faiss.IndexFlatIP(d) if inner else faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, metric)
        index.train(g)
        index.nprobe = int(params.get("nprobe", min(nlist, max(8, nlist // 8))))
    elif backend == "faiss-hnsw":
        index = faiss.IndexHNSWFlat(d, int(params.get("hnsw_m", 32)), metric)
        index.hnsw.efConstruction = int(params.get("ef_construction", 80))
        index.hnsw.efSearch = int(params.get("ef_search", 128))
    else:
        raise ValueError(f"unknown faiss backend {backend!r}")
    index.add(g)
    return index


def faiss_search(
    q: Tensor, g: Tensor, k: int, distance: str, backend: str = "faiss", params: dict[str, Any] | None = None,
    self_mode: bool = False,
) -> tuple[Tensor, Tensor]:
    """(scores, indices) of the k nearest gallery items per query, higher score = closer, own row removed."""
    faiss = import_faiss()
    if distance == "cosine":
        q, g = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(g, dim=1)
    qn = np.ascontiguousarray(q.detach().cpu().numpy(), dtype=np.float32)
    gn = qn if self_mode else np.ascontiguousarray(g.detach().cpu().numpy(), dtype=np.float32)
    index = build_faiss_index(faiss, gn, distance, backend, params or {})
    extra = int(self_mode)
    dist, idx = index.search(qn, k + extra)
    scores = torch.from_numpy(dist if distance != "euclidean" else -dist)
    idx = torch.from_numpy(idx).to(torch.int64)
    if self_mode:
        drop = idx == torch.arange(idx.shape[0]).unsqueeze(1)
        drop[~drop.any(dim=1), -1] = True
        keep = ~drop
        # a query can appear at most once in its own list, so each row keeps exactly k entries
        scores, idx = scores[keep].view(-1, k), idx[keep].view(-1, k)
    return scores.to(q.device), idx.to(q.device)


@torch.no_grad()
def faiss_results(
    q: Tensor, ql: Tensor, g: Tensor | None, gl: Tensor | None, list_metrics: tuple[str, ...], ks: list[int],
    distance: str, backend: str, params: dict[str, Any],
) -> tuple[RetrievalResults, dict[str, float]]:
    """A :class:`RetrievalResults` from faiss neighbour lists (ranks known below the list length) and, for the
    approximate indexes, ``ann_recall@k`` on a query sample."""
    self_mode = g is None
    g, gl = (q, ql) if self_mode else (g, gl)
    n_candidates = g.shape[0] - int(self_mode)
    r = count_relevant(ql, gl, self_mode)
    want_r = "r_precision" in list_metrics or "map@r" in list_metrics
    k = max(int(r.max()) if want_r else 1, ks[-1] if ks else 1)
    k = min(k, n_candidates)
    scores, idx = faiss_search(q, g, k, distance, backend, params, self_mode)
    valid = idx >= 0  # approximate indexes pad short lists with −1
    rel = (gl[idx.clamp_min(0)] == ql.unsqueeze(1)) & valid
    found, pos = M.first_relevant_position(rel)
    per_query: dict[str, Tensor] = {}
    if "precision@1" in list_metrics:
        per_query["precision@1"] = rel[:, 0].to(torch.float64)
    if want_r:
        rp, apr = M.r_metrics(rel, r)
        per_query.update({name: v for name, v in (("r_precision", rp), ("map@r", apr)) if name in list_metrics})
    results = RetrievalResults(
        query_ids=torch.arange(q.shape[0], device=q.device), neighbour_index=idx, neighbour_score=scores,
        query_labels=ql, gallery_labels=gl, n_relevant=r,
        first_relevant_rank=torch.where(found & (r > 0), pos, torch.full_like(pos, k)), rank_depth=k,
        n_gallery=g.shape[0], self_retrieval=self_mode, distance=distance, per_query=per_query,
    )
    extra: dict[str, float] = {}
    if backend != "faiss":
        k_ann = ks[-1] if ks else k
        extra.update(_ann_recall(q, g, idx[:, :k_ann], k_ann, distance, self_mode, int(params.get("ann_sample", 1000))))
    return results, extra


def _ann_recall(
    q: Tensor, g: Tensor, ann_idx: Tensor, k: int, distance: str, self_mode: bool, sample: int
) -> dict[str, float]:
    """Mean |ANN top-k ∩ exact top-k| / k on an evenly spaced sample of queries (exact = :func:`.retrieve`)."""
    n_q = q.shape[0]
    rows = torch.linspace(0, n_q - 1, min(sample, n_q)).round().long().unique().to(q.device)
    exact = retrieve(q, None, None if self_mode else g, None, k=k, queries=rows, distance=distance).neighbour_index
    return {f"ann_recall@{k}": overlap_at_k(exact, ann_idx[rows]), "ann_recall_sample": int(rows.shape[0])}


def overlap_at_k(exact: Tensor, approximate: Tensor) -> float:
    """Mean over rows of |approximate row ∩ exact row| / k (k = exact's width; −1 entries are "no item")."""
    n, k = exact.shape
    # one flat membership test: offsetting each row's ids by row·(max id + 1) keeps rows apart
    stride = int(max(int(exact.max()), int(approximate.max()))) + 1
    offset = torch.arange(n, device=exact.device).unsqueeze(1) * stride
    ann = torch.where(approximate >= 0, approximate + offset, torch.full_like(approximate, -1))
    return int(torch.isin(exact + offset, ann).sum()) / (n * k)
