"""Re-ranking (αQE, DBA, k-reciprocal) on top-k lists against dense brute-force implementations."""

import numpy as np
import pytest
import torch

from deepmetric.evaluation import retrieve
from deepmetric.evaluation.rerank import RERANKERS, rerank


def _data(n=60, d=8, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d))
    y = rng.integers(0, classes, size=n)
    x = (centres[y] + 0.9 * rng.normal(size=(n, d))).astype(np.float32)
    return x, y


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _stable_order(scores, cand):
    return [c for _, c in sorted(zip((-s for s in scores), cand))]


def _check(got, lists, new_scores):
    """Each re-ranked list equals the brute-force order of the same candidates."""
    for i, cand in enumerate(lists):
        expect = _stable_order(new_scores[i], cand)
        assert got.neighbour_index[i].tolist() == expect, i
        order = np.argsort([-s for s in new_scores[i]], kind="stable")
        np.testing.assert_allclose(np.sort(got.neighbour_score[i].numpy())[::-1],
                                   np.asarray(new_scores[i])[order], rtol=1e-4, atol=1e-5)


def _topn_excluding_self(u, n):
    s = u @ u.T
    out = []
    for a in range(len(u)):
        order = [b for b in sorted(range(len(u)), key=lambda b: (-s[a, b], b)) if b != a]
        out.append(order[:n])
    return out, s


@pytest.mark.parametrize("self_mode", [True, False])
def test_query_expansion_matches_brute_force(self_mode):
    x, y = _data()
    gx, gy = (x, y) if self_mode else _data(n=50, seed=1)
    res = retrieve(x, y, None if self_mode else gx, None if self_mode else gy, k=15)
    got = rerank(res, "aqe", x, None if self_mode else gx, n=3, alpha=3.0)
    q, g = _unit(x), _unit(gx)
    lists = res.neighbour_index.tolist()
    new = []
    for i, cand in enumerate(lists):
        sims = g[cand] @ q[i]
        qe = q[i] + sum(max(sims[t], 0) ** 3.0 * g[cand[t]] for t in range(3))
        qe /= np.linalg.norm(qe)
        new.append(list(g[cand] @ qe))
    _check(got, lists, new)
    assert set(got.per_query) == set(res.per_query)


def test_database_augmentation_matches_brute_force():
    x, y = _data(seed=2)
    gx, gy = _data(n=45, seed=3)
    res = retrieve(x, y, gx, gy, k=12)
    got = rerank(res, "dba", x, gx, n=2, alpha=1.0)
    q, g = _unit(x), _unit(gx)
    nbrs, s = _topn_excluding_self(g, 2)
    aug = np.stack([g[j] + sum(max(s[j, b], 0) * g[b] for b in nbrs[j]) for j in range(len(g))])
    aug = _unit(aug)
    lists = res.neighbour_index.tolist()
    _check(got, lists, [list(aug[cand] @ q[i]) for i, cand in enumerate(lists)])


def _k_reciprocal_brute(u, k1, k2, lam):
    """Dense transcription of the definitions (module docstring of deepmetric.evaluation.rerank)."""
    m = len(u)
    s = u @ u.T
    dist = 2 - 2 * s
    rank = [sorted(range(m), key=lambda b: (b != a, -s[a, b], b)) for a in range(m)]  # self first

    def recip(a, k):
        return {b for b in rank[a][: k + 1] if a in rank[b][: k + 1]}

    half = int(np.around(k1 / 2))
    v = np.zeros((m, m))
    for a in range(m):
        r = recip(a, k1)
        expanded = set(r)
        for c in r:
            rc = recip(c, half)
            if len(rc & r) > 2 / 3 * len(rc):
                expanded |= rc
        idx = sorted(expanded)
        w = np.exp(-dist[a, idx])
        v[a, idx] = w / w.sum()
    if k2 > 1:
        v = np.stack([v[rank[a][:k2]].mean(axis=0) for a in range(m)])
    mins = np.minimum(v[:, None, :], v[None, :, :]).sum(2)
    maxs = np.maximum(v[:, None, :], v[None, :, :]).sum(2)
    return (1 - lam) * (1 - mins / maxs) + lam * dist


@pytest.mark.parametrize("self_mode", [True, False])
def test_k_reciprocal_matches_brute_force(self_mode):
    x, y = _data(n=40, seed=4)
    gx, gy = (x, y) if self_mode else _data(n=35, seed=5)
    res = retrieve(x, y, None if self_mode else gx, None if self_mode else gy, k=20)
    got = rerank(res, "kreciprocal", x, None if self_mode else gx, k1=6, k2=3, lambda_value=0.3)
    u = _unit(x) if self_mode else np.vstack([_unit(x), _unit(gx)])
    final = _k_reciprocal_brute(u, 6, 3, 0.3)
    offset = 0 if self_mode else len(x)
    lists = res.neighbour_index.tolist()
    _check(got, lists, [[-final[i, offset + j] for j in cand] for i, cand in enumerate(lists)])


def test_rerank_updates_ranks_and_metrics():
    x, y = _data(n=200, classes=10, seed=6)
    res = retrieve(x, y, k=60, rank_depth=200, list_metrics=("precision@1", "r_precision", "map@r", "map"))
    for name in RERANKERS:
        out = rerank(res, name, x)
        assert "map" not in out.per_query and {"precision@1", "map@r"} <= set(out.per_query)
        rel = out.relevant
        listed = rel.any(1)
        # ranks inside the lists follow the new order; ranks outside are unchanged
        assert torch.equal(out.first_relevant_rank[listed], rel.to(torch.uint8).argmax(1)[listed])
        assert torch.equal(out.first_relevant_rank[~listed], res.first_relevant_rank[~listed])
        # the candidate sets are permuted, never changed
        assert torch.equal(out.neighbour_index.sort(1).values, res.neighbour_index.sort(1).values)
    # R > k drops the R-metrics instead of reporting a wrong value
    short = rerank(retrieve(x, y, k=5), "aqe", x)
    assert "map@r" not in short.per_query


def test_rerank_rejects_bad_arguments():
    x, y = _data(n=30)
    res = retrieve(x, y, k=5)
    with pytest.raises(ValueError, match="unknown re-ranking"):
        rerank(res, "magic", x)
    with pytest.raises(ValueError, match="gallery=None"):
        rerank(res, "aqe", x, x)
    with pytest.raises(ValueError, match="n must be"):
        rerank(res, "aqe", x, n=9)
    with pytest.raises(ValueError, match="cosine"):
        rerank(retrieve(x, y, k=5, distance="euclidean"), "aqe", x)
    with pytest.raises(ValueError, match="k1"):
        rerank(res, "kreciprocal", x, k1=6, k2=9)
