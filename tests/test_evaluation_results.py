"""``retrieve()`` and ``RetrievalResults`` against a dense brute-force ranking (stable ties, own row by index)."""

import numpy as np
import pytest
import torch

from deepmetric.evaluation import RetrievalResults, evaluate, retrieve


def _data(n=90, d=6, classes=12, seed=0, ties=True):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    if ties:
        x[10] = x[3]  # an exact duplicate
        x[20:24] = np.round(x[20:24])  # coarse rows tie with each other
    y = rng.integers(0, classes, size=n)
    y[-1] = classes + 5  # a query without relevant items
    return x, y


def _scores(q, g, distance):
    q64, g64 = q.astype(np.float64), g.astype(np.float64)
    if distance == "cosine":
        q64 = q64 / np.linalg.norm(q64, axis=1, keepdims=True)
        g64 = g64 / np.linalg.norm(g64, axis=1, keepdims=True)
    s = q64 @ g64.T
    return 2 * s - (g64 * g64).sum(1) if distance == "euclidean" else s


def _brute(q, ql, g, gl, rows, distance, self_mode):
    """Per searched row: the stable order of all candidates and its relevance."""
    s = _scores(q[rows], g, distance)
    out = []
    for i, row in enumerate(rows):
        cand = [j for j in range(len(g)) if not (self_mode and j == row)]
        order = sorted(cand, key=lambda j: (-s[i, j], j))
        out.append((order, [gl[j] == ql[row] for j in order]))
    return out


@pytest.mark.parametrize("distance", ["cosine", "dot"])
@pytest.mark.parametrize("self_mode", [True, False])
def test_lists_and_ranks_match_brute_force(distance, self_mode):
    x, y = _data()
    gx, gy = (x, y) if self_mode else _data(n=70, seed=1)
    rows = np.array([0, 3, 10, 22, 55, 89])
    res = retrieve(x, y, None if self_mode else gx, None if self_mode else gy, k=7, queries=rows,
                   rank_depth=10**6, distance=distance, chunk_size=4, list_metrics=("precision@1", "map"))
    assert res.n_queries == len(rows) and res.k == 7 and res.self_retrieval == self_mode
    assert res.rank_depth == len(gx) - int(self_mode)
    # float64 oracle vs float32 scores: compare neighbour sets only where the scores are not near-tied
    s = _scores(x[rows], gx, distance)
    for i, (order, rel) in enumerate(_brute(x, y, gx, gy, rows, distance, self_mode)):
        got = res.neighbour_index[i].tolist()
        assert got == order[:7] or np.allclose(s[i, got], s[i, order[:7]], atol=1e-5)
        expected_rank = rel.index(True) if any(rel) else res.rank_depth
        assert int(res.first_relevant_rank[i]) == expected_rank
        assert int(res.n_relevant[i]) == sum(rel)
        assert torch.equal(res.relevant[i], torch.tensor([gy[j] == y[rows[i]] for j in got]))


def test_rank_depth_semantics_and_metrics_equal_evaluate():
    x, y = _data(n=120, ties=False)
    shallow = retrieve(x, y, k=3)
    assert shallow.rank_depth >= 3
    assert bool((shallow.first_relevant_rank <= shallow.rank_depth).all())
    with pytest.raises(ValueError, match="rank_depth"):
        shallow.metrics(recall_at=(shallow.rank_depth + 1,))
    deep = retrieve(x, y, k=3, rank_depth=50, list_metrics=("precision@1", "r_precision", "map@r", "map"))
    got = deep.metrics(recall_at=(1, 5, 50))
    want = evaluate(x, y, metrics=("recall", "precision@1", "r_precision", "map@r", "map"), recall_at=(1, 5, 50))
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    # the shallow ranks agree with the deep ones wherever they are known
    known = shallow.first_relevant_rank < shallow.rank_depth
    assert torch.equal(shallow.first_relevant_rank[known], deep.first_relevant_rank[known])


def test_per_query_values_group_breakdown_subset_and_truncation():
    x, y = _data(n=80, ties=False)
    res = retrieve(x, y, k=5, rank_depth=5)
    per = res.per_query_metrics(recall_at=(1, 5))
    assert np.isnan(per["recall@1"][-1]) and np.isnan(per["map@r"][-1])  # R = 0 for the last query
    groups = np.arange(80) % 3
    by = res.metrics_by_group(groups, recall_at=(1, 5))
    for g in range(3):
        sub = retrieve(x, y, k=5, rank_depth=5, queries=np.flatnonzero(groups == g)).metrics(recall_at=(1, 5))
        for key in ("recall@1", "recall@5", "precision@1", "r_precision", "map@r"):
            assert by[g][key] == pytest.approx(sub[key], abs=1e-12), (g, key)
        assert by[g]["n_queries"] == sub["n_queries"]
        assert by[g]["n_queries_without_relevant"] == sub["n_queries_without_relevant"]
    part = res.subset([4, 2])
    assert part.query_ids.tolist() == [4, 2] and torch.equal(part.neighbour_index, res.neighbour_index[[4, 2]])
    short = res.truncated(2)
    assert short.k == 2 and torch.equal(short.neighbour_score, res.neighbour_score[:, :2])
    with pytest.raises(ValueError, match="groups"):
        res.metrics_by_group(groups[:5])


def test_unlabelled_search_and_bad_arguments():
    x, _ = _data(n=30)
    res = retrieve(x[:4], gallery=x, k=3)
    assert isinstance(res, RetrievalResults)
    assert res.neighbour_index[:, 0].tolist() == [0, 1, 2, 3]  # each query finds itself in the gallery first
    with pytest.raises(ValueError, match="without labels"):
        res.metrics()
    with pytest.raises(ValueError, match="labels for both"):
        retrieve(x, np.zeros(30, dtype=np.int64), x, None)
    with pytest.raises(ValueError, match="row indices"):
        retrieve(x, queries=[30])
    with pytest.raises(ValueError, match="k must be"):
        retrieve(x, k=0)
    with pytest.raises(ValueError, match="list metric"):
        retrieve(x, np.zeros(30, dtype=np.int64), list_metrics=("recall",))


def test_thread_workers_give_the_single_thread_results():
    x, y = _data(n=300, ties=True)
    runs = [retrieve(x, y, k=9, rank_depth=120, list_metrics=("precision@1", "r_precision", "map@r", "map"),
                     chunk_size=70, num_threads=t) for t in (1, 2)]
    a, b = runs
    assert torch.equal(a.neighbour_index, b.neighbour_index) and torch.equal(a.neighbour_score, b.neighbour_score)
    assert torch.equal(a.first_relevant_rank, b.first_relevant_rank) and a.rank_depth == b.rank_depth
    for name in a.per_query:
        # full MAP sums its in-list and counted parts at a split that depends on the row slice: rounding only
        assert torch.allclose(a.per_query[name], b.per_query[name], rtol=0, atol=1e-12), name
