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
                          alpha: float = 3.0) -> RetrievalResults:
    """DBA re-ranking of the listed candidates: the gallery side is augmented by its own top-n neighbours."""
    q, g = _vectors(results, query, gallery)
    nb = retrieve(g, k=n)  # the gallery's own neighbours, own row excluded
    augmented = _expand_rows(g, g, nb.neighbour_index, nb.neighbour_score, n, alpha)
    return reorder(results, _pair_scores(q[results.query_ids], augmented, results.neighbour_index))


def _reciprocal(first: Tensor, width: int, rows: Tensor) -> Tensor:
    """(len(rows), width) bool: row a's j-th neighbour b = first[a, j] has a among its own first ``width``."""
    back = first[first[rows, :width], :width]
    return (back == rows.view(-1, 1, 1)).any(dim=2)


def _sparse_weights(u: Tensor, first: Tensor, k1: int) -> Tensor:
    """Coalesced sparse (M, M) matrix V of the k-reciprocal encoding (before local query expansion)."""
    m = u.shape[0]
    half = int(np.around(k1 / 2))
    device = u.device
    recip_half = torch.cat([_reciprocal(first, half + 1, r) for r in torch.arange(m, device=device).split(4096)])
    half_sets = torch.where(recip_half, first[:, : half + 1], torch.full_like(first[:, : half + 1], -1))
    entries: list[Tensor] = []
    weights: list[Tensor] = []
    rows_per_chunk = max(1, CHUNK_ELEMENTS // ((k1 + 1) ** 2 * (half + 1)))
    for rows in torch.arange(m, device=device).split(rows_per_chunk):
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
                 lambda_value: float = 0.3) -> RetrievalResults:
    """k-reciprocal re-ranking of the listed candidates (definitions in the module docstring)."""
    if k1 < 1 or not 1 <= k2 <= k1 + 1:
        raise ValueError(f"need k1 ≥ 1 and 1 ≤ k2 ≤ k1 + 1, got k1={k1}, k2={k2}")
    if not 0 <= lambda_value <= 1:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value}")
    q, g = _vectors(results, query, gallery)
    u = g if results.self_retrieval else torch.cat([q, g])
    if u.shape[0] < k1 + 2:
        raise ValueError(f"k1={k1} needs at least {k1 + 2} items in the union of queries and gallery")
    nn = retrieve(u, k=k1).neighbour_index  # exact k1 nearest of every item in U, own row excluded
    first = torch.cat([torch.arange(u.shape[0], device=u.device).unsqueeze(1), nn], dim=1)
    v = _sparse_weights(u, first, k1)
    if k2 > 1:
        rows = torch.arange(u.shape[0], device=u.device).repeat_interleave(k2)
        expansion = torch.sparse_coo_tensor(torch.stack([rows, first[:, :k2].reshape(-1)]),
                                            torch.full((rows.shape[0],), 1.0 / k2, device=u.device), v.shape,
                                            check_invariants=False)
        with warnings.catch_warnings():
            # torch routes sparse × sparse through its CSR kernels and says so on every call
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            v = torch.sparse.mm(expansion.coalesce(), v).coalesce()
    qu = results.query_ids
    gu = results.neighbour_index if results.self_retrieval else results.neighbour_index + q.shape[0]
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
    """Apply ``RERANKERS[method]`` ("aqe", "dba", "kreciprocal") with its keyword ``params``."""
    if method not in RERANKERS:
        raise ValueError(f"unknown re-ranking method {method!r}; valid: {', '.join(RERANKERS)}")
    return RERANKERS[method](results, query, gallery, **params)


__all__ = ["RERANKERS", "database_augmentation", "k_reciprocal", "query_expansion", "reorder", "rerank"]
