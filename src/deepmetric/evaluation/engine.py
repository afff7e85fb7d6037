"""``evaluate()``: the metric dictionary of one exact retrieval (:func:`.retrieval.retrieve`) or of a faiss search.

The neighbour search, its memory bound and its tie order are described in :mod:`.retrieval`; the metric formulas
in :mod:`.metrics`. ``evaluate`` validates the request, runs one search whose first-relevant ranks are exact up to
the largest K of Recall@K, and returns :meth:`RetrievalResults.metrics` (plus clustering metrics on request).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from deepmetric.evaluation.inputs import DISTANCES, as_embeddings, as_labels
from deepmetric.evaluation.results import LIST_METRICS
from deepmetric.evaluation.retrieval import (
    DEFAULT_BLOCK_BYTES,
    RECALL_LIST_CAP,
    TIE_POLICIES,
    default_chunk_size,
    prepare,
    retrieve,
)

RETRIEVAL_METRICS = ("recall", "precision@1", "r_precision", "map@r", "map")
CLUSTERING_METRICS = ("nmi", "f1")
ALL_METRICS = RETRIEVAL_METRICS + CLUSTERING_METRICS
BACKENDS = ("torch", "faiss", "faiss-ivf", "faiss-hnsw")


def _parse_metrics(metrics: Iterable[str]) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    out = []
    for name in metrics:
        key = name.lower()
        if key.startswith("recall@"):  # "recall@K" is accepted as an alias of "recall"
            key = "recall"
        if key not in ALL_METRICS:
            raise ValueError(f"unknown metric {name!r}; valid names: {', '.join(ALL_METRICS)}")
        if key not in out:
            out.append(key)
    if not out:
        raise ValueError("metrics is empty; ask for at least one of " + ", ".join(ALL_METRICS))
    return tuple(out)


def evaluate(
    query: Any,
    query_labels: Any,
    gallery: Any | None = None,
    gallery_labels: Any | None = None,
    *,
    metrics: Sequence[str] = ("recall", "precision@1", "r_precision", "map@r"),
    recall_at: Sequence[int] = (1, 2, 4, 8),
    distance: str = "cosine",
    backend: str = "torch",
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    ties: str = "stable",
    progress: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    index_params: dict[str, Any] | None = None,
    seed: int = 0,
    num_threads: int | None = None,
) -> dict[str, float]:
    """Retrieval (and optional clustering) metrics of ``query`` against ``gallery``.

    Args:
        query, query_labels: (n_q, d) embeddings and (n_q,) integer labels (numpy or torch).
        gallery, gallery_labels: (n_g, d) and (n_g,); ``None`` = self-retrieval (gallery = queries) with each
            query's own row excluded by index (duplicate embeddings stay valid neighbours).
        metrics: any of "recall" (one value per ``recall_at``), "precision@1", "r_precision", "map@r", "map"
            (full mean average precision over all relevant items), "nmi", "f1" (clustering, methods.md §1.5).
        recall_at: the K of Recall@K; each K must be ≤ the number of gallery candidates.
        distance: "cosine" (L2-normalise both sides, s = ⟨q̂, ĝ⟩), "dot" (s = ⟨q, g⟩) or "euclidean"
            (s = 2⟨q, g⟩ − ‖g‖², the same order as −‖q − g‖).
        backend: "torch" (exact, deterministic), "faiss" (exact flat index), "faiss-ivf" / "faiss-hnsw"
            (approximate; the result also holds ``ann_recall@k``, the overlap with exact neighbours on a sample).
        chunk_size: queries per block; ``None`` = as many as fit ``block_bytes`` for the b × n_g score block.
        device: torch device to compute on (default: the query tensor's device, CPU for numpy).
        ties: "stable" — neighbours ordered by (−s, gallery index); "optimistic" — Recall@K counts a hit iff
            #{items with s > s⁺} < K (count-based code of Deep_Metric/MS). Other metrics always use "stable".
        progress: show a tqdm bar over query blocks.
        block_bytes: memory budget of one score block when ``chunk_size`` is None.
        index_params: faiss options (``nlist``, ``nprobe``, ``hnsw_m``, ``ef_search``, ``ann_sample``).
        seed: k-means seed for "nmi"/"f1".
        num_threads: CPU threads for this call only (torch's setting is restored afterwards); ``None`` keeps the
            current setting.

    Returns:
        ``recall@K``…, ``precision@1``, ``r_precision``, ``map@r``, ``map``, ``nmi``, ``f1`` as requested, plus
        ``n_queries`` (all queries) and ``n_queries_without_relevant`` (queries with R_q = 0, left out of every
        retrieval mean).

    Formulas: see :mod:`deepmetric.evaluation.metrics`.
    """
    if num_threads is not None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be ≥ 1, got {num_threads}")
        previous = torch.get_num_threads()
        torch.set_num_threads(num_threads)
        try:
            return evaluate(
                query, query_labels, gallery, gallery_labels, metrics=metrics, recall_at=recall_at,
                distance=distance, backend=backend, chunk_size=chunk_size, device=device, ties=ties,
                progress=progress, block_bytes=block_bytes, index_params=index_params, seed=seed,
            )
        finally:
            torch.set_num_threads(previous)
    names = _parse_metrics(metrics)
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if ties not in TIE_POLICIES:
        raise ValueError(f"ties must be one of {TIE_POLICIES}, got {ties!r}")
    if (gallery is None) != (gallery_labels is None):
        raise ValueError("gallery and gallery_labels must be given together (or both left None for self-retrieval)")
    if device is None:
        device = query.device if isinstance(query, Tensor) else torch.device("cpu")
    device = torch.device(device)

    q = as_embeddings(query, "query", device)
    ql = as_labels(query_labels, "query_labels", q.shape[0], device)
    self_mode = gallery is None
    if self_mode:
        g, gl = None, None
        n_candidates = q.shape[0] - 1
    else:
        g = as_embeddings(gallery, "gallery", device)
        gl = as_labels(gallery_labels, "gallery_labels", g.shape[0], device)
        if g.shape[1] != q.shape[1]:
            raise ValueError(f"query has dim {q.shape[1]} but gallery has dim {g.shape[1]}")
        n_candidates = g.shape[0]
    if n_candidates < 1:
        raise ValueError("self-retrieval needs at least 2 items (each query's own row is excluded)")

    retrieval = [m for m in names if m in RETRIEVAL_METRICS]
    ks = sorted({int(k) for k in recall_at}) if "recall" in retrieval else []
    if "recall" in retrieval and not ks:
        raise ValueError("metrics include 'recall' but recall_at is empty")
    for k in ks:
        if k < 1:
            raise ValueError(f"recall_at values must be positive integers, got {k}")
        if k > n_candidates:
            raise ValueError(
                f"recall@{k} asks for more neighbours than the gallery holds ({n_candidates} candidate items"
                f"{', own row excluded' if self_mode else ''})"
            )
    if backend != "torch" and "map" in retrieval:
        raise ValueError("metric 'map' (full ranking) needs backend='torch'")

    result: dict[str, float] = {}
    if retrieval:
        list_metrics = tuple(m for m in retrieval if m in LIST_METRICS)
        if backend == "torch":
            depth = ks[-1] if ks else 1
            results = retrieve(
                q, ql, g, gl, k=min(depth, RECALL_LIST_CAP), rank_depth=depth, list_metrics=list_metrics,
                distance=distance, ties=ties, chunk_size=chunk_size, block_bytes=block_bytes, progress=progress,
            )
        else:
            from deepmetric.evaluation.faiss_backend import faiss_results

            results, extra = faiss_results(q, ql, g, gl, list_metrics, ks, distance, backend, index_params or {})
            result.update(extra)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = results.metrics(ks)
        if int((results.n_relevant > 0).sum()) == 0:
            warnings.warn("no query has a relevant gallery item; retrieval metrics are NaN", stacklevel=2)
        result.update(values)
    if any(m in CLUSTERING_METRICS for m in names):
        from deepmetric.evaluation.clustering import clustering_metrics

        scores = clustering_metrics(prepare(q, distance), ql, seed=seed)
        for name in CLUSTERING_METRICS:
            if name in names:
                result[name] = scores[name]
        result.setdefault("n_queries", int(q.shape[0]))
    return result


__all__ = ["ALL_METRICS", "BACKENDS", "CLUSTERING_METRICS", "RETRIEVAL_METRICS", "default_chunk_size", "evaluate"]
