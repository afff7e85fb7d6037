"""``retrieve()``: the one exact, memory-bounded neighbour search, streamed over blocks of queries.

For each block of b queries the search computes one GEMM S = Q_b·Gᵀ (b × N, the only O(N) buffer, reused across
blocks), removes each query's own row *by index* in self-retrieval, and then works on small per-block tensors:

1. a stable top-k (order (−s, index), see :mod:`.knn`) with k_b = max(k, max R_q in the block, min(rank_depth, 16));
   it gives the stored neighbour lists, Precision@1, R-Precision, MAP@R and every first-relevant rank < k_b;
2. only for queries whose first relevant item is not in that list and only if ``rank_depth`` > k_b, the exact
   rank of the best positive is obtained by counting: ρ_q = #{j : s_qj > s⁺} + #{j < j⁺ : s_qj = s⁺}, where
   s⁺ = max_{p relevant} s_qp is read from S at the (few) positive indices and j⁺ is the smallest index of a
   positive attaining s⁺; no long list is ever materialised;
3. full MAP (on request) counts the rank of every relevant item outside the list the same way.

Scores: cosine on float32 input is the GEMM of the L2-normalised rows; on float64 input the GEMM of the raw rows
ranked by sign(S)·S²/‖g‖² (per query the cosine order), exact on quantised data (docs/retrieval.md, ties).

Steps 1–3 run on slices of the block's rows of at most ``SLICE_BYTES`` of scores (k_b is then per slice), so their
temporaries stay small; the top-k's largest temporary (the chunk maxima) is one buffer per thread, reused by every
slice, because pages of a fresh allocation are filled several times slower than reused ones (docs/retrieval.md).

Threads: the GEMM runs on torch's T threads; steps 1–3 run on T one-thread workers that pull the slices.
Memory-bound operators split statically over T OpenMP threads wait at every operator for the slowest thread, so on
a loaded machine the post-GEMM work with 2 threads was measured slower than with one; workers pulling slices only
lose the time the OS takes from them.

Memory: O(b·N) for S (b from a 256 MB budget when ``chunk_size`` is None) + O(T·SLICE_BYTES) for the
two-stage top-k + O(N·d) for the normalised, padded copy of the gallery + O(n_q·k) for the stored lists; never
N×N. One row of S must fit the budget (up to ~64M gallery items at 256 MB); beyond that the block is one row.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from deepmetric.evaluation import metrics as M
from deepmetric.evaluation.inputs import DISTANCES, as_embeddings, as_labels
from deepmetric.evaluation.knn import count_ranked_before, exact_cosine_key, stable_topk
from deepmetric.evaluation.relevance import Groups, group_gallery
from deepmetric.evaluation.results import LIST_METRICS, RetrievalResults

TIE_POLICIES = ("stable", "optimistic")
#: the gallery is padded to a multiple of the largest chunk width of the two-stage top-k (knn.stable_topk)
TOPK_WIDTH = 64
#: first-relevant ranks up to this value are read from the top-k list; deeper ones are counted for the few queries
#: whose first relevant item is not listed (counting one row costs about as much as ranking ~100 candidates per row)
RECALL_LIST_CAP = 16
#: default memory budget of the block similarity matrix
DEFAULT_BLOCK_BYTES = 256 * 2**20
#: the ranking work after each block GEMM handles at most this many bytes of scores at a time
SLICE_BYTES = 32 * 2**20


def prepare(x: Tensor, distance: str) -> Tensor:
    """The rows as the score formula uses them: L2-normalised for cosine, unchanged for dot and euclidean."""
    return torch.nn.functional.normalize(x, dim=1) if distance == "cosine" else x


def _padded_gallery(g: Tensor, width: int, normalise: bool) -> Tensor:
    """The gallery rows (L2-normalised if asked) followed by zero rows up to a multiple of ``width``, written into
    one new buffer (the normalised rows are not first made as a separate copy)."""
    n = g.shape[0]
    n_pad = math.ceil(n / width) * width
    if n_pad == n:
        return torch.nn.functional.normalize(g, dim=1) if normalise else g.contiguous()
    out = g.new_empty(n_pad, g.shape[1])
    out[n:] = 0
    if normalise:
        torch.nn.functional.normalize(g, dim=1, out=out[:n])
    else:
        out[:n] = g
    return out


def default_chunk_size(n_queries: int, n_gallery_padded: int, element_size: int, block_bytes: int) -> int:
    """Queries per block so that the b × n_g score block stays within ``block_bytes`` (at least 1)."""
    return max(1, min(n_queries, block_bytes // max(1, n_gallery_padded * element_size)))


def retrieve(
    query: Any,
    query_labels: Any | None = None,
    gallery: Any | None = None,
    gallery_labels: Any | None = None,
    *,
    k: int = RECALL_LIST_CAP,
    queries: Any | None = None,
    rank_depth: int | None = None,
    list_metrics: Sequence[str] | None = None,
    distance: str = "cosine",
    ties: str = "stable",
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: bool = False,
    num_threads: int | None = None,
) -> RetrievalResults:
    """Exact top-``k`` gallery neighbours of every query, with exact first-relevant ranks and list metrics.

    Args:
        query, query_labels: (n_q, d) embeddings and (n_q,) integer labels (numpy or torch); labels may be None
            (then also for the gallery) for a plain search without relevance.
        gallery, gallery_labels: (n_g, d) and (n_g,); ``None`` = self-retrieval (gallery = queries) with each
            query's own row excluded by index (duplicate embeddings stay valid neighbours).
        k: neighbours kept per query (capped at the number of candidates).
        queries: optional query rows to search (default all); in self-retrieval row i still excludes gallery row i.
        rank_depth: first-relevant ranks are exact below this depth (default k; larger values count the rank of
            the queries whose first relevant item is not listed; ≥ n_candidates = every rank exact).
        list_metrics: per-query values to compute, any of "precision@1", "r_precision", "map@r", "map" (default
            the first three when labels are given).
        distance: "cosine" (s = ⟨q̂, ĝ⟩), "dot" (s = ⟨q, g⟩) or "euclidean" (s = 2⟨q, g⟩ − ‖g‖², the order of −‖q − g‖).
        ties: "stable" — order (−s, gallery index); "optimistic" — first-relevant ranks count only strictly
            better items (count-based code of Deep_Metric/MS); lists and list metrics always use "stable".
        chunk_size: queries per block; ``None`` = as many as fit ``block_bytes`` for the b × n_g score block.
        device: torch device (default: the query tensor's device, CPU for numpy).
        num_threads: CPU threads for this call only (torch's setting is restored afterwards).
    """
    if num_threads is not None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be ≥ 1, got {num_threads}")
        previous = torch.get_num_threads()
        torch.set_num_threads(num_threads)
        try:
            return retrieve(query, query_labels, gallery, gallery_labels, k=k, queries=queries,
                            rank_depth=rank_depth, list_metrics=list_metrics, distance=distance, ties=ties,
                            chunk_size=chunk_size, device=device, block_bytes=block_bytes, progress=progress)
        finally:
            torch.set_num_threads(previous)
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if ties not in TIE_POLICIES:
        raise ValueError(f"ties must be one of {TIE_POLICIES}, got {ties!r}")
    if gallery is None and gallery_labels is not None:
        raise ValueError("gallery and gallery_labels must be given together (or both left None for self-retrieval)")
    if gallery is not None and (query_labels is None) != (gallery_labels is None):
        raise ValueError("give labels for both the queries and the gallery, or for neither")
    if device is None:
        device = query.device if isinstance(query, Tensor) else torch.device("cpu")
    device = torch.device(device)
    q = as_embeddings(query, "query", device)
    ql = None if query_labels is None else as_labels(query_labels, "query_labels", q.shape[0], device)
    self_mode = gallery is None
    if self_mode:
        g, gl = q, ql
    else:
        g = as_embeddings(gallery, "gallery", device)
        gl = None if gallery_labels is None else as_labels(gallery_labels, "gallery_labels", g.shape[0], device)
        if g.shape[1] != q.shape[1]:
            raise ValueError(f"query has dim {q.shape[1]} but gallery has dim {g.shape[1]}")
        if g.dtype != q.dtype:
            q, g = q.float(), g.float()
    n_candidates = g.shape[0] - int(self_mode)
    if n_candidates < 1:
        raise ValueError("self-retrieval needs at least 2 items (each query's own row is excluded)")
    rows = torch.arange(q.shape[0], device=device)
    if queries is not None:
        rows = torch.as_tensor(np.asarray(queries), dtype=torch.int64).to(device).reshape(-1)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= q.shape[0]):
            raise ValueError(f"queries must be row indices in [0, {q.shape[0]}), got values outside")
    if list_metrics is None:
        list_metrics = LIST_METRICS[:3] if ql is not None else ()
    for name in list_metrics:
        if name not in LIST_METRICS:
            raise ValueError(f"unknown list metric {name!r}; valid names: {', '.join(LIST_METRICS)}")
    if list_metrics and ql is None:
        raise ValueError("list metrics need query and gallery labels")
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    k = min(k, n_candidates)
    depth = k if rank_depth is None else max(int(rank_depth), 1)
    return _search(q, g, ql, gl, rows, self_mode, k, depth, tuple(list_metrics), distance, ties, chunk_size,
                   block_bytes, progress)


@dataclass
class _Pass:
    """What the work after each block GEMM reads and writes; ``rows`` handles result rows [q0, q1) (disjoint
    slices of the outputs, so several threads may run it on different rows)."""

    gl: Tensor | None
    qlab: Tensor | None
    qrows: Tensor
    r: Tensor
    groups: Groups | None
    self_mode: bool
    keep: int
    depth: int
    list_metrics: tuple[str, ...]
    ties: str
    n_candidates: int
    n_g: int
    n_pad: int
    count_rows: int  # rows re-ranked by counting are copied in groups of this size: bounded extra memory
    #: float64 cosine ranks by sign(S)·S²/‖g‖² (knn.exact_cosine_key): ‖g‖² (padded), ‖q‖ per row; else None
    gallery_sq_norm: Tensor | None
    query_norm: Tensor | None
    index: Tensor
    score: Tensor
    first_rank: Tensor
    per_query: dict[str, Tensor]

    #: per worker thread, one buffer for the top-k's chunk maxima, reused by every slice that thread ranks
    buffers: threading.local = field(default_factory=threading.local)

    def _workspace(self, s: Tensor) -> Tensor:
        # the chunk maxima take at most 1/8 of the slice's scores (chunk width ≥ 8)
        needed = s.shape[0] * (s.shape[1] // 8)
        buffer = self.buffers.__dict__.get("chunk_max")
        if buffer is None or buffer.numel() < needed:
            buffer = torch.empty(needed, dtype=s.dtype, device=s.device)
            self.buffers.chunk_max = buffer
        return buffer

    @torch.no_grad()
    def rows(self, s: Tensor, q0: int, q1: int) -> int:
        """Lists, ranks and list metrics of rows [q0, q1) from their scores ``s``; returns the depth below which
        their first-relevant ranks are exact."""
        neg_inf = float("-inf")
        per_query, groups, gl = self.per_query, self.groups, self.gl
        want_r = "r_precision" in per_query or "map@r" in per_query
        want_map = "map" in per_query
        r_b = self.r[q0:q1]
        k = max(self.keep, int(r_b.max()) if want_r else 1, min(self.depth, RECALL_LIST_CAP))
        k = min(k, self.n_candidates)
        if self.gallery_sq_norm is not None:
            exact_cosine_key(s, self.gallery_sq_norm)
        top_v, top_i = stable_topk(s, k, workspace=self._workspace(s))
        self.index[q0:q1], self.score[q0:q1] = top_i[:, : self.keep], top_v[:, : self.keep]
        if self.query_norm is not None:
            kept = top_v[:, : self.keep]
            self.score[q0:q1] = kept.sign() * kept.abs().sqrt() / self.query_norm[q0:q1].unsqueeze(1)
        if groups is None or gl is None or self.qlab is None:
            return self.n_candidates
        rel = gl[top_i] == self.qlab[q0:q1].unsqueeze(1)
        found, pos = M.first_relevant_position(rel)
        if self.ties == "optimistic":
            pos = M.optimistic_position(top_v, pos)
        fr = torch.where(found, pos, torch.full_like(pos, k))
        # optimistic ranks can be < k even when the first relevant item is listed after position k (ties)
        count_misses = self.depth > k or self.ties == "optimistic"
        if count_misses or want_map:
            m = int(groups.count[q0:q1].max())
            ar = torch.arange(max(m, 1), device=s.device)
            valid = ar.unsqueeze(0) < groups.count[q0:q1].unsqueeze(1)
            pidx = groups.order[(groups.start[q0:q1].unsqueeze(1) + ar).clamp_max(self.n_g - 1)]
            if self.self_mode:
                valid &= pidx != self.qrows[q0:q1].unsqueeze(1)
            pscore = s.gather(1, pidx).masked_fill(~valid, neg_inf)
        if count_misses:
            miss = torch.nonzero(~found & (r_b > 0)).squeeze(1)
            if miss.numel():
                best = pscore[miss].max(dim=1).values
                tied = valid[miss] & (pscore[miss] == best.unsqueeze(1))
                best_idx = torch.where(tied, pidx[miss], torch.full_like(pidx[miss], self.n_pad)).min(dim=1).values
                fr[miss] = count_ranked_before(s, miss, best, best_idx if self.ties == "stable" else None,
                                               self.count_rows)
        self.first_rank[q0:q1] = fr
        if "precision@1" in per_query:
            per_query["precision@1"][q0:q1] = rel[:, 0].to(torch.float64)
        if want_r:
            rp, apr = M.r_metrics(rel, r_b)
            if "r_precision" in per_query:
                per_query["r_precision"][q0:q1] = rp
            if "map@r" in per_query:
                per_query["map@r"][q0:q1] = apr
        if want_map:
            head, n_listed = M.average_precision_from_list(rel)
            kth_v, kth_i = top_v[:, -1:], top_i[:, -1:]
            outside = valid & ((pscore < kth_v) | ((pscore == kth_v) & (pidx > kth_i)))
            ranks = torch.full_like(pidx, -1)
            sel = torch.nonzero(outside)
            if sel.numel():
                ranks[sel[:, 0], sel[:, 1]] = count_ranked_before(
                    s, sel[:, 0], pscore[sel[:, 0], sel[:, 1]], pidx[sel[:, 0], sel[:, 1]], self.count_rows
                )
            tail = M.average_precision_tail(ranks, n_listed)
            per_query["map"][q0:q1] = (head + tail) / r_b.clamp_min(1).to(torch.float64)
        return self.n_candidates if count_misses else k


def _one_thread_worker() -> None:
    """Make this thread's torch operators run on one thread. torch sets a thread's OpenMP team size lazily, on its
    first operator, to the process-wide count, which the calling thread restores right after the pool starts; so
    that initialisation is forced first (``get_num_threads``) and then overridden, or the workers' operators would
    run on T-thread teams (T workers × T threads on T cores)."""
    torch.get_num_threads()
    torch.set_num_threads(1)


@torch.no_grad()
def _search(
    q: Tensor, g: Tensor, ql: Tensor | None, gl: Tensor | None, qrows: Tensor, self_mode: bool, keep: int,
    depth: int, list_metrics: tuple[str, ...], distance: str, ties: str, chunk_size: int | None, block_bytes: int,
    progress: bool,
) -> RetrievalResults:
    n_g = g.shape[0]
    n_q = qrows.shape[0]
    device = q.device
    # the default "every row in order" reads query blocks as views instead of gathered copies
    all_rows = n_q == q.shape[0] and bool((qrows == torch.arange(n_q, device=device)).all())
    exact_cosine = distance == "cosine" and g.dtype == torch.float64
    gp = _padded_gallery(g, TOPK_WIDTH, normalise=distance == "cosine" and not exact_cosine)
    n_pad = gp.shape[0]
    qp = gp if self_mode else (q if exact_cosine else prepare(q, distance))
    gallery_sq_norm = query_norm = None
    if exact_cosine:
        # the clamps mirror F.normalize's eps: a zero row scores 0 against everything
        gallery_sq_norm = (gp * gp).sum(dim=1).clamp_min(1e-24)
        gallery_sq_norm[n_g:] = 1.0
        query_norm = torch.linalg.vector_norm(qp.index_select(0, qrows), dim=1).clamp_min(1e-12)
    bias = None
    if distance == "euclidean":
        bias = -(gp * gp).sum(dim=1)
        bias[n_g:] = float("-inf")
        bias = bias.unsqueeze(0)
    labelled = ql is not None and gl is not None
    n_candidates = n_g - int(self_mode)
    depth = min(depth, n_candidates)
    b = chunk_size or default_chunk_size(n_q, n_pad, gp.element_size(), block_bytes)
    if b < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    buf = torch.empty(min(b, max(n_q, 1)), n_pad, dtype=gp.dtype, device=device)
    neg_inf = float("-inf")
    if labelled:
        qlab = ql[qrows]
        groups = group_gallery(qlab, gl)
        r = groups.count - int(self_mode)
    else:
        qlab, r, groups = None, torch.zeros(n_q, dtype=torch.int64, device=device), None

    index = torch.empty(n_q, keep, dtype=torch.int64, device=device)
    score = torch.empty(n_q, keep, dtype=gp.dtype, device=device)
    first_rank = torch.zeros(n_q, dtype=torch.int64, device=device)
    per_query = {name: torch.zeros(n_q, dtype=torch.float64, device=device) for name in list_metrics}
    known_depth = n_candidates

    ctx = _Pass(gl, qlab, qrows, r, groups, self_mode, keep, depth, list_metrics, ties,
                n_candidates, n_g, n_pad, max(1, b // 4), gallery_sq_norm, query_norm, index, score, first_rank,
                per_query)
    threads = torch.get_num_threads()
    slice_rows = max(1, SLICE_BYTES // (n_pad * gp.element_size()))
    pool = ThreadPoolExecutor(threads, initializer=_one_thread_worker) if threads > 1 else None
    try:
        if pool is not None:
            # start every worker (each lowers the process-wide BLAS threads once) before the first GEMM
            barrier = threading.Barrier(threads, timeout=60)
            list(pool.map(lambda _: barrier.wait(), range(threads)))
            torch.set_num_threads(threads)
        for q0 in tqdm(range(0, n_q, b), desc="retrieve", disable=not progress, leave=False, unit="block"):
            q1 = min(q0 + b, n_q)
            s = buf[: q1 - q0]
            own = qrows[q0:q1]
            if bias is None:
                torch.mm(qp[q0:q1] if all_rows else qp.index_select(0, own), gp.t(), out=s)
                if n_pad > n_g:
                    s[:, n_g:] = neg_inf
            else:
                torch.addmm(bias, qp[q0:q1] if all_rows else qp.index_select(0, own), gp.t(), alpha=2.0, out=s)
            if self_mode:
                s[torch.arange(q1 - q0, device=device), own] = neg_inf  # own row by index, duplicates untouched
            # the work after the GEMM runs on bounded row slices: smaller temporaries, and the chunk maxima of
            # every slice go into the same per-thread buffer (see _Pass._workspace)
            step = max(8, min(slice_rows, -(-(q1 - q0) // (4 * threads))))
            slices = [(s[r0 - q0 : min(r0 + step, q1) - q0], r0, min(r0 + step, q1)) for r0 in range(q0, q1, step)]
            if pool is None:
                depths = [ctx.rows(*part) for part in slices]
            else:
                # with several threads the slices go to one-thread workers pulling them: a worker that the OS
                # deschedules takes fewer slices instead of stalling every operator at an OpenMP barrier
                depths = [job.result() for job in [pool.submit(ctx.rows, *part) for part in slices]]
            known_depth = min(known_depth, *depths)
    finally:
        if pool is not None:
            pool.shutdown()
            torch.set_num_threads(threads)
    if labelled:
        # ranks are exact below the smallest depth any block guaranteed (n_candidates where misses were counted)
        first_rank = torch.where(r > 0, first_rank.clamp_max(known_depth), torch.full_like(first_rank, known_depth))
    return RetrievalResults(
        query_ids=qrows, neighbour_index=index, neighbour_score=score, query_labels=qlab, gallery_labels=gl,
        n_relevant=r, first_relevant_rank=first_rank, rank_depth=known_depth if labelled else 0, n_gallery=n_g,
        self_retrieval=self_mode, distance=distance, ties=ties, per_query=per_query,
    )


__all__ = ["DEFAULT_BLOCK_BYTES", "RECALL_LIST_CAP", "SLICE_BYTES", "TIE_POLICIES", "TOPK_WIDTH",
           "default_chunk_size", "prepare", "retrieve"]
