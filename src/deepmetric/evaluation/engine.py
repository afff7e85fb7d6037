"""``evaluate()``: exact, memory-bounded retrieval metrics streamed over blocks of queries.

For each block of b queries the engine computes one GEMM S = Q_b·Gᵀ (b × N, the only O(N) buffer, reused across
blocks), removes each query's own row *by index* in self-retrieval, and then works on small per-block tensors:

1. a stable top-k (order (−s, index), see :mod:`.knn`) with k = max(max R_q in the block, min(max K, 16));
   it gives Precision@1, R-Precision, MAP@R and every Recall@K with K ≤ k;
2. only for queries whose first relevant item is not in that list and only if some K > k is requested, the exact
   rank of the best positive is obtained by counting: ρ_q = #{j : s_qj > s⁺} + #{j < j⁺ : s_qj = s⁺}, where
   s⁺ = max_{p relevant} s_qp is read from S at the (few) positive indices and j⁺ is the smallest index of a
   positive attaining s⁺; no top-1000 is ever materialised;
3. full MAP (on request) counts the rank of every relevant item outside the list the same way.

Memory: O(b·N) for S (b from a 256 MB budget when ``chunk_size`` is None) + O(b·(k·w + N/w)), w ∈ [32, 64], for
the two-stage top-k + O(N·d) for the normalised, padded copy of the gallery; never N×N. The gallery itself is not
blocked: one row of S must fit the budget (up to ~64M gallery items at 256 MB); beyond that the block is one row.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from deepmetric.evaluation import metrics as M
from deepmetric.evaluation.inputs import DISTANCES, as_embeddings, as_labels
from deepmetric.evaluation.knn import count_ranked_before, stable_topk

RETRIEVAL_METRICS = ("recall", "precision@1", "r_precision", "map@r", "map")
CLUSTERING_METRICS = ("nmi", "f1")
ALL_METRICS = RETRIEVAL_METRICS + CLUSTERING_METRICS
BACKENDS = ("torch", "faiss", "faiss-ivf", "faiss-hnsw")
TIE_POLICIES = ("stable", "optimistic")

#: the gallery is padded to a multiple of the largest chunk width of the two-stage top-k (knn.stable_topk)
TOPK_WIDTH = 64
#: Recall@K with K up to this value is read from the top-k list; larger K use counting for the few queries whose
#: first relevant item is not listed (counting one row costs about as much as ranking ~100 candidates per row)
RECALL_LIST_CAP = 16
#: default memory budget of the block similarity matrix
DEFAULT_BLOCK_BYTES = 256 * 2**20


@dataclass
class _Groups:
    """Gallery items grouped by label: the relevant items of query q are order[start_q : start_q + count_q]."""

    order: Tensor  # gallery indices sorted by label (stable)
    start: Tensor  # per query
    count: Tensor  # per query: #gallery items with the query's label (self included in self-retrieval)


def _group_gallery(query_labels: Tensor, gallery_labels: Tensor) -> _Groups:
    order = torch.argsort(gallery_labels, stable=True)
    uniq, counts = torch.unique_consecutive(gallery_labels[order], return_counts=True)
    starts = counts.cumsum(0) - counts
    pos = torch.searchsorted(uniq, query_labels).clamp_max(uniq.shape[0] - 1)
    found = uniq[pos] == query_labels
    zero = torch.zeros_like(pos)
    return _Groups(order, torch.where(found, starts[pos], zero), torch.where(found, counts[pos], zero))


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


def _prepare(x: Tensor, distance: str) -> Tensor:
    return torch.nn.functional.normalize(x, dim=1) if distance == "cosine" else x


def _padded_gallery(g: Tensor, width: int) -> Tensor:
    n = g.shape[0]
    n_pad = math.ceil(n / width) * width
    if n_pad == n:
        return g.contiguous()
    out = g.new_zeros(n_pad, g.shape[1])
    out[:n] = g
    return out


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
        g, gl = q, ql
    else:
        g = as_embeddings(gallery, "gallery", device)
        gl = as_labels(gallery_labels, "gallery_labels", g.shape[0], device)
        if g.shape[1] != q.shape[1]:
            raise ValueError(f"query has dim {q.shape[1]} but gallery has dim {g.shape[1]}")
        if g.dtype != q.dtype:
            q, g = q.float(), g.float()
    n_candidates = g.shape[0] - int(self_mode)
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
        groups = _group_gallery(ql, gl)
        r = groups.count - int(self_mode)
        if backend == "torch":
            per_query = _torch_pass(
                q, g, gl, ql, groups, r, self_mode, retrieval, ks, distance, ties, chunk_size, block_bytes, progress
            )
        else:
            from deepmetric.evaluation.faiss_backend import faiss_pass

            per_query, extra = faiss_pass(
                q, g, gl, ql, r, self_mode, retrieval, ks, distance, backend, index_params or {}, progress
            )
            result.update(extra)
        has_rel = r > 0
        n_rel = int(has_rel.sum())
        if n_rel == 0:
            warnings.warn("no query has a relevant gallery item; retrieval metrics are NaN", stacklevel=2)

        def mean(x: Tensor) -> float:
            return float(x[has_rel].to(torch.float64).mean()) if n_rel else float("nan")

        for k in ks:
            result[f"recall@{k}"] = mean(per_query["first_rank"] < k)
        for name in ("precision@1", "r_precision", "map@r", "map"):
            if name in retrieval:
                result[name] = mean(per_query[name])
        result["n_queries"] = int(q.shape[0])
        result["n_queries_without_relevant"] = int(q.shape[0] - n_rel)
    if any(m in CLUSTERING_METRICS for m in names):
        from deepmetric.evaluation.clustering import clustering_metrics

        scores = clustering_metrics(_prepare(q, distance), ql, seed=seed)
        for name in CLUSTERING_METRICS:
            if name in names:
                result[name] = scores[name]
        result.setdefault("n_queries", int(q.shape[0]))
    return result


def default_chunk_size(n_queries: int, n_gallery_padded: int, element_size: int, block_bytes: int) -> int:
    """Queries per block so that the b × n_g score block stays within ``block_bytes`` (at least 1)."""
    return max(1, min(n_queries, block_bytes // max(1, n_gallery_padded * element_size)))


@torch.no_grad()
def _torch_pass(
    q: Tensor,
    g: Tensor,
    gl: Tensor,
    ql: Tensor,
    groups: _Groups,
    r: Tensor,
    self_mode: bool,
    retrieval: list[str],
    ks: list[int],
    distance: str,
    ties: str,
    chunk_size: int | None,
    block_bytes: int,
    progress: bool,
) -> dict[str, Tensor]:
    n_q, n_g = q.shape[0], g.shape[0]
    device = q.device
    gp = _padded_gallery(_prepare(g, distance), TOPK_WIDTH)
    n_pad = gp.shape[0]
    qp = gp[:n_q] if self_mode else _prepare(q, distance)
    bias = None
    if distance == "euclidean":
        bias = -(gp * gp).sum(dim=1)
        bias[n_g:] = float("-inf")
        bias = bias.unsqueeze(0)

    want_r = "r_precision" in retrieval or "map@r" in retrieval
    want_map = "map" in retrieval
    max_k = ks[-1] if ks else 0
    n_candidates = n_g - int(self_mode)
    b = chunk_size or default_chunk_size(n_q, n_pad, gp.element_size(), block_bytes)
    if b < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    buf = torch.empty(min(b, n_q), n_pad, dtype=gp.dtype, device=device)
    # rows re-ranked by counting are copied in groups of a quarter block: bounded extra memory
    count_rows = max(1, b // 4)
    neg_inf = float("-inf")

    first_rank = torch.zeros(n_q, dtype=torch.int64, device=device)
    out: dict[str, Tensor] = {"first_rank": first_rank}
    if "precision@1" in retrieval:
        out["precision@1"] = torch.zeros(n_q, dtype=torch.float64, device=device)
    if want_r:
        out["r_precision"] = torch.zeros(n_q, dtype=torch.float64, device=device)
        out["map@r"] = torch.zeros(n_q, dtype=torch.float64, device=device)
    if want_map:
        out["map"] = torch.zeros(n_q, dtype=torch.float64, device=device)

    starts = range(0, n_q, b)
    for q0 in tqdm(starts, desc="evaluate", disable=not progress, leave=False, unit="block"):
        q1 = min(q0 + b, n_q)
        nb = q1 - q0
        s = buf[:nb]
        if bias is None:
            torch.mm(qp[q0:q1], gp.t(), out=s)
            if n_pad > n_g:
                s[:, n_g:] = neg_inf
        else:
            torch.addmm(bias, qp[q0:q1], gp.t(), alpha=2.0, out=s)
        rows = torch.arange(nb, device=device)
        if self_mode:
            s[rows, rows + q0] = neg_inf  # own row excluded by index, duplicates untouched
        r_b = r[q0:q1]
        lab_b = ql[q0:q1]
        k = max(int(r_b.max()) if want_r else 1, min(max_k, RECALL_LIST_CAP), 1)
        k = min(k, n_candidates)
        top_v, top_i = stable_topk(s, k)
        rel = gl[top_i] == lab_b.unsqueeze(1)
        found, pos = M.first_relevant_position(rel)
        if ties == "optimistic":
            pos = M.optimistic_position(top_v, pos)
        fr = torch.where(found, pos, torch.full_like(pos, k))

        # optimistic ranks can be < k even when the first relevant item is listed after position k (ties)
        count_misses = max_k > k or (ties == "optimistic" and bool(ks))
        need_pos = count_misses or want_map
        if need_pos:
            m = int(groups.count[q0:q1].max())
            ar = torch.arange(max(m, 1), device=device)
            valid = ar.unsqueeze(0) < groups.count[q0:q1].unsqueeze(1)
            pidx = groups.order[(groups.start[q0:q1].unsqueeze(1) + ar).clamp_max(n_g - 1)]
            if self_mode:
                valid &= pidx != (rows + q0).unsqueeze(1)
            pscore = s.gather(1, pidx).masked_fill(~valid, neg_inf)
        if count_misses:
            miss = torch.nonzero(~found & (r_b > 0)).squeeze(1)
            if miss.numel():
                best = pscore[miss].max(dim=1).values
                tied = valid[miss] & (pscore[miss] == best.unsqueeze(1))
                best_idx = torch.where(tied, pidx[miss], torch.full_like(pidx[miss], n_pad)).min(dim=1).values
                fr[miss] = count_ranked_before(s, miss, best, best_idx if ties == "stable" else None, count_rows)
        first_rank[q0:q1] = fr
        if "precision@1" in retrieval:
            out["precision@1"][q0:q1] = rel[:, 0].to(torch.float64)
        if want_r:
            rp, apr = M.r_metrics(rel, r_b)
            out["r_precision"][q0:q1] = rp
            out["map@r"][q0:q1] = apr
        if want_map:
            head, n_listed = M.average_precision_from_list(rel)
            kth_v, kth_i = top_v[:, -1:], top_i[:, -1:]
            outside = valid & ((pscore < kth_v) | ((pscore == kth_v) & (pidx > kth_i)))
            ranks = torch.full_like(pidx, -1)
            sel = torch.nonzero(outside)
            if sel.numel():
                ranks[sel[:, 0], sel[:, 1]] = count_ranked_before(
                    s, sel[:, 0], pscore[sel[:, 0], sel[:, 1]], pidx[sel[:, 0], sel[:, 1]], count_rows
                )
            tail = M.average_precision_tail(ranks, n_listed)
            out["map"][q0:q1] = (head + tail) / r_b.clamp_min(1).to(torch.float64)
    return out
