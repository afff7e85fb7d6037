"""Re-ranking of the top-k lists of a :class:`RetrievalResults`: composable post-processing, memory O(N·k).

Each method computes a new score for every (query, listed candidate) pair, re-orders each list by (−new score,
gallery index) and returns a new results object; the items outside the lists keep their order after the lists,
so first-relevant ranks outside the list stay valid. R-Precision and MAP@R are recomputed from the new lists when
every query's R_q fits in the list (k ≥ max R_q), full MAP is dropped. Vectors are L2-normalised (cosine).

* α-query expansion (αQE; Radenović, Tolias & Chum, "Fine-tuning CNN image retrieval with no human annotation",
  TPAMI 2018): q' = normalise(q̂ + Σ_{i≤n} max(s_i, 0)^α ĝ_(i)) over the query's top-n neighbours; s'_qj = ⟨q', ĝ_j⟩.
* Database-side augmentation (DBA; Arandjelović & Zisserman, "Three things everyone should know to improve object
  retrieval", CVPR 2012, with αQE weights as in Radenović et al.): each gallery item is replaced by
  ĝ'_j = normalise(ĝ_j + Σ_{i≤n} max(s_ji, 0)^α ĝ_(ji)) over its own top-n gallery neighbours; s'_qj = ⟨q̂, ĝ'_j⟩.
* k-reciprocal re-ranking (Zhong, Zheng, Cao & Li, "Re-ranking person re-identification with k-reciprocal
  encoding", CVPR 2017) on the union U of queries and gallery (U = gallery in self-retrieval), with
  d(a, b) = ‖â − b̂‖² = 2 − 2⟨â, b̂⟩ and N(a, k) the k nearest items of a in U *including a itself*:
  R(a, k) = {b ∈ N(a, k+1) : a ∈ N(b, k+1)};  R*(a) = R(a, k1) ∪ R(c, k1/2) for every c ∈ R(a, k1) with
  |R(c, k1/2) ∩ R(a, k1)| > ⅔|R(c, k1/2)|;  V_ab = exp(−d(a, b)) / Σ_{b' ∈ R*(a)} exp(−d(a, b')) on R*(a);
  local expansion V_a ← mean_{b ∈ N(a, k2)} V_b;  d_J(a, b) = 1 − Σ_t min(V_at, V_bt) / Σ_t max(V_at, V_bt);
  d*(q, j) = (1 − λ) d_J(q, j) + λ d(q, j), s'_qj = −d*(q, j). Unlike the paper's code, d is not divided by its
  column maximum (that needs the full N×N matrix), and only the listed candidates are re-ranked.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from deepmetric.evaluation import metrics as M
from deepmetric.evaluation.inputs import as_embeddings
from deepmetric.evaluation.results import RetrievalResults
from deepmetric.evaluation.retrieval import retrieve

#: elements per temporary (chunk of rows × list entries × dim) in the gathers below
CHUNK_ELEMENTS = 1 << 24


def _unit(x: Any, name: str, device: torch.device) -> Tensor:
    return torch.nn.functional.normalize(as_embeddings(x, name, device).float(), dim=1)


def _vectors(results: RetrievalResults, query: Any, gallery: Any | None) -> tuple[Tensor, Tensor]:
    if results.distance != "cosine":
        raise ValueError(f"re-ranking works on cosine similarities; these results used distance={results.distance!r}")
    if results.self_retrieval != (gallery is None):
        raise ValueError("pass gallery=None exactly for self-retrieval results (and the gallery otherwise)")
    device = results.neighbour_index.device
    q = _unit(query, "query", device)
    g = q if gallery is None else _unit(gallery, "gallery", device)
    if g.shape[0] != results.n_gallery:
        raise ValueError(f"the gallery has {g.shape[0]} rows but the results were searched in {results.n_gallery}")
    return q, g


def _pair_scores(qv: Tensor, gv: Tensor, index: Tensor) -> Tensor:
    """⟨qv_i, gv_index[i, c]⟩ for every listed pair, in row chunks."""
    n, k = index.shape
    out = torch.empty(n, k, dtype=torch.float32, device=index.device)
    rows = max(1, CHUNK_ELEMENTS // max(1, k * gv.shape[1]))
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        out[r0:r1] = torch.bmm(gv[index[r0:r1]], qv[r0:r1].unsqueeze(2)).squeeze(2)
    return out


def reorder(results: RetrievalResults, new_scores: Tensor) -> RetrievalResults:
    """``results`` with each list re-ordered by (−new score, gallery index); ranks and list metrics updated."""
    by_index = results.neighbour_index.sort(dim=1)
    scores = new_scores.gather(1, by_index.indices)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    index = by_index.values.gather(1, order)
    out = replace(results, neighbour_index=index, neighbour_score=scores.gather(1, order), per_query={})
    if results.query_labels is None or results.gallery_labels is None:
        return out
    rel = out.relevant
    found, pos = M.first_relevant_position(rel)
    out.first_relevant_rank = torch.where(found, pos, results.first_relevant_rank)
    if "precision@1" in results.per_query:
        out.per_query["precision@1"] = rel[:, 0].to(torch.float64)
    wanted = [m for m in ("r_precision", "map@r") if m in results.per_query]
    if wanted and int(results.n_relevant.max()) <= results.k:
        rp, apr = M.r_metrics(rel, results.n_relevant)
        out.per_query.update({m: v for m, v in (("r_precision", rp), ("map@r", apr)) if m in wanted})
    return out


def query_expansion(results: RetrievalResults, query: Any, gallery: Any | None = None, *, n: int = 2,
                    alpha: float = 3.0) -> RetrievalResults:
    """αQE re-ranking of the listed candidates (formula in the module docstring)."""
    q, g = _vectors(results, query, gallery)
    qv = q[results.query_ids]
    expanded = _expand_rows(qv, g, results.neighbour_index, results.neighbour_score, n, alpha)
    return reorder(results, _pair_scores(expanded, g, results.neighbour_index))


def _expand_rows(rows: Tensor, g: Tensor, index: Tensor, scores: Tensor, n: int, alpha: float) -> Tensor:
    if not 1 <= n <= index.shape[1]:
        raise ValueError(f"n must be in [1, {index.shape[1]}] (the list length), got {n}")
    if alpha < 0:
        raise ValueError(f"alpha must be ≥ 0, got {alpha}")
    weight = scores[:, :n].float().clamp_min(0).pow(alpha)
    out = rows.clone()
    step = max(1, CHUNK_ELEMENTS // max(1, n * g.shape[1]))
    for r0 in range(0, rows.shape[0], step):
        r1 = min(r0 + step, rows.shape[0])
        out[r0:r1] += torch.bmm(weight[r0:r1].unsqueeze(1), g[index[r0:r1, :n]]).squeeze(1)
    return torch.nn.functional.normalize(out, dim=1)


def database_augmentation(results: RetrievalResults, query: Any, gallery: Any | None = None, *, n: int = 2,
                          alpha: float = 3.0, gallery_neighbours: RetrievalResults | None = None) -> RetrievalResults:
    """DBA re-ranking of the listed candidates: the gallery side is augmented by its own top-n neighbours
    (``gallery_neighbours``: the gallery's stored self-retrieval lists, e.g. from a search index; searched when
    None)."""
    q, g = _vectors(results, query, gallery)
    nb = _gallery_lists(g, n, gallery_neighbours)
    augmented = _expand_rows(g, g, nb.neighbour_index, nb.neighbour_score, n, alpha)
    return reorder(results, _pair_scores(q[results.query_ids], augmented, results.neighbour_index))


def _gallery_lists(g: Tensor, k: int, stored: RetrievalResults | None) -> RetrievalResults:
    """The gallery's top-``k`` self-retrieval lists (own row excluded): ``stored`` cut to k, or searched now."""
    if stored is None:
        return retrieve(g, k=k)
    if not stored.self_retrieval or stored.n_gallery != g.shape[0] or stored.n_queries != g.shape[0]:
        raise ValueError(f"gallery_neighbours must be the self-retrieval lists of all {g.shape[0]} gallery items")
    if stored.k < k:
        raise ValueError(f"the stored gallery neighbour lists hold {stored.k} entries per item but this re-ranking "
                         f"needs {k}; store longer lists (deepmetric index --neighbour-k {k})")
    return stored.truncated(k)


def _merge_lists(index: Tensor, score: Tensor, k: int) -> Tensor:
    """The first ``k`` of each row of candidates (index, score) in the order (−score, index)."""
    by_index = index.sort(dim=1)
    order = torch.sort(score.gather(1, by_index.indices), dim=1, descending=True, stable=True).indices[:, :k]
    return by_index.values.gather(1, order)


def _union_neighbours(q: Tensor, g: Tensor, k: int, self_retrieval: bool,
                      stored: RetrievalResults | None) -> Tensor:
    """(M, k + 1): each item of U (queries first, then the gallery; U = gallery in self-retrieval) followed by its
    k nearest other items of U in the order (−score, U index).

    The gallery-to-gallery part comes from ``stored`` when given (no O(N²) work per call); the rest are searches
    of the queries against U and of the gallery against the queries, merged per row: each part holds the top-k of
    its side, so the top-k of the union lies among them.
    """
    n_q = q.shape[0]
    gg = _gallery_lists(g, k, stored)
    if self_retrieval:
        nn = gg.neighbour_index
    else:
        qg = retrieve(q, gallery=g, k=k)
        q_index, q_score = [qg.neighbour_index + n_q], [qg.neighbour_score]
        if n_q > 1:
            qq = retrieve(q, k=min(k, n_q - 1))
            q_index.append(qq.neighbour_index)
            q_score.append(qq.neighbour_score)
        gq = retrieve(g, gallery=q, k=min(k, n_q))
        query_rows = _merge_lists(torch.cat(q_index, 1), torch.cat(q_score, 1), k)
        gallery_rows = _merge_lists(torch.cat([gq.neighbour_index, gg.neighbour_index + n_q], 1),
                                    torch.cat([gq.neighbour_score, gg.neighbour_score.to(gq.neighbour_score.dtype)], 1),
                                    k)
        nn = torch.cat([query_rows, gallery_rows])
    return torch.cat([torch.arange(nn.shape[0], device=nn.device).unsqueeze(1), nn], dim=1)


def _reciprocal(first: Tensor, width: int, rows: Tensor) -> Tensor:
    """(len(rows), width) bool: row a's j-th neighbour b = first[a, j] has a among its own first ``width``."""
    back = first[first[rows, :width], :width]
    return (back == rows.view(-1, 1, 1)).any(dim=2)


def _sparse_weights(u: Tensor, first: Tensor, k1: int, needed: Tensor) -> Tensor:
    """Coalesced sparse (M, M) matrix V of the k-reciprocal encoding (before local query expansion); only the
    rows ``needed`` (sorted, unique) are filled, so a few queries cost O(k1³) per row instead of O(M)."""
    m = u.shape[0]
    half = int(np.around(k1 / 2))
    device = u.device
    # R(c, k1/2) is read for every c ∈ N(a, k1 + 1) of a needed row a
    centres = torch.unique(first[needed, : k1 + 1])
    half_sets = torch.full((m, half + 1), -1, dtype=torch.int64, device=device)
    for r in centres.split(4096):
        half_sets[r] = torch.where(_reciprocal(first, half + 1, r), first[r, : half + 1],
                                   torch.full_like(first[r, : half + 1], -1))
    entries: list[Tensor] = []
    weights: list[Tensor] = []
    rows_per_chunk = max(1, CHUNK_ELEMENTS // ((k1 + 1) ** 2 * (half + 1)))
    for rows in needed.split(rows_per_chunk):
        recip = _reciprocal(first, k1 + 1, rows)  # R(a, k1) as a mask over N(a, k1 + 1)
        own = torch.where(recip, first[rows, : k1 + 1], torch.full_like(recip, -1, dtype=torch.int64))
        cand = half_sets[first[rows, : k1 + 1]]  # (r, k1 + 1, half + 1): R(c, k1/2) of each c ∈ N(a, k1 + 1)
        present = cand >= 0
        inside = (cand.unsqueeze(3) == own.view(own.shape[0], 1, 1, -1)).any(dim=3) & present
        size = present.sum(dim=2)
        take = recip & (inside.sum(dim=2).to(torch.float64) > size.to(torch.float64) * 2 / 3)
        extra = torch.where(take.unsqueeze(2) & present, cand, torch.full_like(cand, -1)).flatten(1)
        members = torch.cat([own, extra], dim=1).sort(dim=1).values
        duplicate = torch.zeros_like(members, dtype=torch.bool)
        duplicate[:, 1:] = members[:, 1:] == members[:, :-1]
        valid = (members >= 0) & ~duplicate
        safe = members.clamp_min(0)
        dist = 2 - 2 * torch.bmm(u[safe], u[rows].unsqueeze(2)).squeeze(2)
        w = torch.where(valid, torch.exp(-dist), torch.zeros_like(dist))
        w = w / w.sum(dim=1, keepdim=True)
        r_idx, c_idx = torch.nonzero(valid, as_tuple=True)
        entries.append(torch.stack([rows[r_idx], members[r_idx, c_idx]]))
        weights.append(w[r_idx, c_idx])
    return torch.sparse_coo_tensor(torch.cat(entries, 1), torch.cat(weights), (m, m),
                                   check_invariants=False).coalesce()


def _jaccard(v: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """d_J between rows a[i] and b[i] of the coalesced sparse V (Σ min by key lookup; no dense row is formed)."""
    m = v.shape[0]
    idx, val = v.indices(), v.values()
    keys = idx[0] * m + idx[1]  # sorted: coalesced COO is row-major
    length = torch.bincount(idx[0], minlength=m)
    start = length.cumsum(0) - length
    total = torch.zeros(m, dtype=val.dtype, device=val.device).index_add_(0, idx[0], val)
    out = torch.empty(a.shape[0], dtype=val.dtype, device=val.device)
    pairs_per_chunk = max(1, CHUNK_ELEMENTS // max(1, int(length.max()) if m else 1))
    for p0 in range(0, a.shape[0], pairs_per_chunk):
        pa, pb = a[p0 : p0 + pairs_per_chunk], b[p0 : p0 + pairs_per_chunk]
        n_entries = length[pa]
        pair = torch.repeat_interleave(torch.arange(pa.shape[0], device=pa.device), n_entries)
        offset = torch.arange(pair.shape[0], device=pa.device) - (n_entries.cumsum(0) - n_entries)[pair]
        entry = start[pa][pair] + offset
        lookup = pb[pair] * m + idx[1][entry]
        pos = torch.searchsorted(keys, lookup).clamp_max(keys.shape[0] - 1)
        hit = keys[pos] == lookup
        overlap = torch.zeros(pa.shape[0], dtype=val.dtype, device=val.device)
        overlap.index_add_(0, pair, torch.where(hit, torch.minimum(val[entry], val[pos]), torch.zeros_like(val[entry])))
        out[p0 : p0 + pa.shape[0]] = 1 - overlap / (total[pa] + total[pb] - overlap)
    return out


def k_reciprocal(results: RetrievalResults, query: Any, gallery: Any | None = None, *, k1: int = 20, k2: int = 6,
                 lambda_value: float = 0.3, gallery_neighbours: RetrievalResults | None = None) -> RetrievalResults:
    """k-reciprocal re-ranking of the listed candidates (definitions in the module docstring).

    ``gallery_neighbours``: the gallery's stored self-retrieval lists (at least k1 per item, e.g. from a search
    index); without them the gallery is searched against itself on every call.
    """
    if k1 < 1 or not 1 <= k2 <= k1 + 1:
        raise ValueError(f"need k1 ≥ 1 and 1 ≤ k2 ≤ k1 + 1, got k1={k1}, k2={k2}")
    if not 0 <= lambda_value <= 1:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value}")
    q, g = _vectors(results, query, gallery)
    u = g if results.self_retrieval else torch.cat([q, g])
    if u.shape[0] < k1 + 2:
        raise ValueError(f"k1={k1} needs at least {k1 + 2} items in the union of queries and gallery")
    first = _union_neighbours(q, g, k1, results.self_retrieval, gallery_neighbours)
    qu = results.query_ids
    gu = results.neighbour_index if results.self_retrieval else results.neighbour_index + q.shape[0]
    # V is needed on the queries and their candidates, and (local expansion) on their k2 nearest items
    pair_rows = torch.unique(torch.cat([qu, gu.reshape(-1)]))
    needed = torch.unique(first[pair_rows, :k2]) if k2 > 1 else pair_rows
    v = _sparse_weights(u, first, k1, needed)
    if k2 > 1:
        rows = pair_rows.repeat_interleave(k2)
        expansion = torch.sparse_coo_tensor(torch.stack([rows, first[pair_rows, :k2].reshape(-1)]),
                                            torch.full((rows.shape[0],), 1.0 / k2, device=u.device), v.shape,
                                            check_invariants=False)
        with warnings.catch_warnings():
            # torch routes sparse × sparse through its CSR kernels and says so on every call
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            v = torch.sparse.mm(expansion.coalesce(), v).coalesce()
    pairs_a = qu.unsqueeze(1).expand_as(gu).reshape(-1)
    d_j = _jaccard(v, pairs_a, gu.reshape(-1)).view_as(gu)
    d = 2 - 2 * results.neighbour_score.to(d_j.dtype)
    return reorder(results, -((1 - lambda_value) * d_j + lambda_value * d))


RERANKERS: dict[str, Callable[..., RetrievalResults]] = {
    "aqe": query_expansion,
    "dba": database_augmentation,
    "kreciprocal": k_reciprocal,
}


def rerank(results: RetrievalResults, method: str, query: Any, gallery: Any | None = None,
           **params: Any) -> RetrievalResults:
    """Apply ``RERANKERS[method]`` ("aqe", "dba", "kreciprocal") with its keyword ``params``; a
    ``gallery_neighbours`` results object (the gallery's stored self-retrieval lists) replaces the search of the
    gallery against itself in DBA and k-reciprocal."""
    if method not in RERANKERS:
        raise ValueError(f"unknown re-ranking method {method!r}; valid: {', '.join(RERANKERS)}")
    if method == "aqe":
        params.pop("gallery_neighbours", None)  # αQE reads only the queries' own lists
    return RERANKERS[method](results, query, gallery, **params)


__all__ = ["RERANKERS", "database_augmentation", "k_reciprocal", "query_expansion", "reorder", "rerank"]
