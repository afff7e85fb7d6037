"""Evaluation engine: brute-force oracle, methods.md §9, PML parity, ties, labels, errors, faiss, clustering."""

from __future__ import annotations

import itertools
import math
import threading
import warnings

import numpy as np
import pytest
import torch

from deepmetric.evaluation import clustering_metrics, evaluate, kmeans_assign, pair_f1, stable_topk
from deepmetric.evaluation.engine import default_chunk_size

ALL = ("recall", "precision@1", "r_precision", "map@r", "map")


# ------------------------------------------------------------------------------------------- oracle -----
def oracle(q, ql, g=None, gl=None, recall_at=(1,), distance="dot", ties="stable"):
    """Full score matrix in float64 and one Python loop per query; order by (−score, index)."""
    self_mode = g is None
    if self_mode:
        g, gl = q, ql
    q = np.asarray(q, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    if distance == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
    acc = {f"recall@{k}": [] for k in recall_at}
    acc.update({"precision@1": [], "r_precision": [], "map@r": [], "map": []})
    lone = 0
    for i in range(len(q)):
        if distance == "euclidean":
            score = [-float(((q[i] - g[j]) ** 2).sum()) for j in range(len(g))]
        else:
            score = [float(q[i] @ g[j]) for j in range(len(g))]
        cand = [j for j in range(len(g)) if not (self_mode and j == i)]
        ranked = sorted(cand, key=lambda j: (-score[j], j))
        rel = [int(gl[j] == ql[i]) for j in ranked]
        r = sum(rel)
        if r == 0:
            lone += 1
            continue
        first = rel.index(1)
        if ties == "optimistic":
            best = max(score[j] for j in cand if gl[j] == ql[i])
            first = sum(1 for j in cand if score[j] > best)
        for k in recall_at:
            acc[f"recall@{k}"].append(float(first < k))
        acc["precision@1"].append(float(rel[0]))
        hits = np.cumsum(rel)
        acc["r_precision"].append(sum(rel[:r]) / r)
        acc["map@r"].append(sum(hits[i] / (i + 1) * rel[i] for i in range(r)) / r)
        acc["map"].append(sum(hits[i] / (i + 1) * rel[i] for i in range(len(rel))) / r)
    out = {k: float(np.mean(v)) for k, v in acc.items()}
    out["n_queries_without_relevant"] = lone
    return out


def assert_matches(result, expected, keys):
    for key in keys:
        assert result[key] == pytest.approx(expected[key], abs=1e-12), key


def tricky_data(n=150, d=6, seed=0):
    """Integer-valued embeddings (exact dot products ⇒ exact ties) with duplicates, lone and single-item labels."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, size=(n, d)).astype(np.float32)
    x[10:20] = x[0]  # exact duplicates of row 0, different labels below
    labels = rng.integers(0, 25, size=n)
    labels[10:15] = labels[0]
    labels[n - 10 :] = np.arange(1000, 1010)  # single-item classes: no relevant item in self-retrieval
    return x, labels


# --------------------------------------------------------------------------------------------- tests -----
@pytest.mark.parametrize("distance", ["dot", "euclidean"])
@pytest.mark.parametrize("chunk_size", [7, None])
def test_self_retrieval_matches_oracle_with_ties_duplicates_and_lone_labels(distance, chunk_size):
    x, y = tricky_data()
    ks = (1, 2, 5, 70, 120)  # 70 and 120 exceed the 64-entry list: exercises the counting path
    got = evaluate(x, y, metrics=ALL, recall_at=ks, distance=distance, chunk_size=chunk_size)
    exp = oracle(x, y, recall_at=ks, distance=distance)
    assert_matches(got, exp, [f"recall@{k}" for k in ks] + ["precision@1", "r_precision", "map@r", "map"])
    assert got["n_queries_without_relevant"] == exp["n_queries_without_relevant"] >= 10
    assert got["n_queries"] == len(x)


@pytest.mark.parametrize("ties", ["stable", "optimistic"])
def test_query_gallery_mode_matches_oracle(ties):
    x, y = tricky_data(seed=1)
    gx, gy = tricky_data(n=97, seed=2)
    ks = (1, 3, 66, 97)
    got = evaluate(x, y, gx, gy, metrics=ALL, recall_at=ks, distance="dot", chunk_size=16, ties=ties)
    exp = oracle(x, y, gx, gy, recall_at=ks, distance="dot", ties=ties)
    assert_matches(got, exp, [f"recall@{k}" for k in ks] + ["precision@1", "r_precision", "map@r", "map"])
    assert got["n_queries_without_relevant"] == exp["n_queries_without_relevant"]


def test_cosine_random_data_matches_oracle_and_is_chunk_invariant():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(130, 8)).astype(np.float32) * rng.uniform(0.5, 3, size=(130, 1)).astype(np.float32)
    y = rng.integers(0, 20, size=130)
    ks = (1, 4, 100)
    results = [evaluate(x, y, metrics=ALL, recall_at=ks, chunk_size=c) for c in (1, 13, None)]
    assert results[0] == results[1] == results[2]
    exp = oracle(x, y, recall_at=ks, distance="cosine")
    for key in exp:
        assert results[0][key] == pytest.approx(exp[key], abs=1e-9), key


def test_section9_retrieval_vector():
    x = np.array([0.0, 0.1, 0.35, 0.5, 0.9, 1.0, 1.3])[:, None]  # float64: the ties of §9 are exact there
    y = np.array([0, 1, 0, 1, 0, 1, 1])
    got = evaluate(x, y, recall_at=(1, 2, 4), distance="euclidean")
    assert got["recall@1"] == pytest.approx(1 / 7, abs=1e-6)
    assert got["recall@2"] == pytest.approx(4 / 7, abs=1e-6)
    assert got["recall@4"] == pytest.approx(1.0)
    assert got["map@r"] == pytest.approx(0.210317, abs=1e-6)
    assert got["r_precision"] == pytest.approx(0.357143, abs=1e-6)


def test_matches_pml_accuracy_calculator():
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    rng = np.random.default_rng(4)
    centres = rng.normal(size=(40, 16))
    y = rng.integers(0, 40, size=400)
    x = (centres[y] + 0.9 * rng.normal(size=(400, 16))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    calc = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"), k="max_bin_count"
    )
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    ref = calc.get_accuracy(xt, yt, xt, yt, ref_includes_query=True)
    got = evaluate(x, y, metrics=("precision@1", "r_precision", "map@r"), distance="cosine")
    assert 0.1 < got["map@r"] < 0.9
    assert got["precision@1"] == pytest.approx(ref["precision_at_1"], abs=1e-6)
    assert got["r_precision"] == pytest.approx(ref["r_precision"], abs=1e-6)
    assert got["map@r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-6)
    # query/gallery mode
    ref2 = calc.get_accuracy(xt[:150], yt[:150], xt[150:], yt[150:])
    got2 = evaluate(x[:150], y[:150], x[150:], y[150:], metrics=("precision@1", "r_precision", "map@r"))
    assert got2["precision@1"] == pytest.approx(ref2["precision_at_1"], abs=1e-6)
    assert got2["map@r"] == pytest.approx(ref2["mean_average_precision_at_r"], abs=1e-6)


def test_labels_above_float32_precision():
    x, y = tricky_data(n=80)
    base = evaluate(x, y, metrics=ALL, recall_at=(1, 2), distance="dot")
    big = evaluate(x, torch.from_numpy(y + 2**24), metrics=ALL, recall_at=(1, 2), distance="dot")
    assert big == base
    # consecutive labels above 2**24 collide in float32: 2**24 + 1 would round onto 2**24
    y2 = np.full(80, 2**24, dtype=np.int64) + (np.arange(80) % 2)
    assert np.float32(2**24 + 1) == np.float32(2**24)
    res = evaluate(x, y2, metrics=("r_precision",), distance="dot")
    exp = oracle(x, y2, distance="dot")
    assert res["r_precision"] == pytest.approx(exp["r_precision"], abs=1e-12)


def test_optimistic_and_stable_ties_differ():
    # 80 negatives tie with the only positive (index 80) and come first by index
    gallery = np.zeros((100, 2), dtype=np.float32)
    gallery[:81, 0] = 1.0
    gallery[81:, 1] = 1.0
    glabels = np.zeros(100, dtype=np.int64)
    glabels[80] = 7
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    ks = (1, 70, 81, 90)
    stable = evaluate(query, [7], gallery, glabels, recall_at=ks, distance="dot", metrics=("recall",))
    optimistic = evaluate(query, [7], gallery, glabels, recall_at=ks, ties="optimistic", distance="dot",
                          metrics=("recall",))
    assert [stable[f"recall@{k}"] for k in ks] == [0.0, 0.0, 1.0, 1.0]
    assert [optimistic[f"recall@{k}"] for k in ks] == [1.0, 1.0, 1.0, 1.0]
    small = evaluate(query, [7], gallery, glabels, recall_at=(1,), distance="dot", ties="optimistic")
    assert small["recall@1"] == 1.0 and small["precision@1"] == 0.0  # precision@1 always follows stable order


def test_duplicate_of_query_is_a_valid_neighbour():
    # "drop the first column" would drop the duplicate instead of the query itself half of the time
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=np.float32)
    y = np.array([0, 0, 1, 2])
    got = evaluate(x, y, recall_at=(1,), metrics=("recall", "map@r"))
    assert got["recall@1"] == 1.0 and got["map@r"] == 1.0
    assert got["n_queries_without_relevant"] == 2


def test_stable_topk_equals_stable_sort():
    g = torch.Generator().manual_seed(0)
    for n, k, dtype in [(640, 5, torch.float32), (1280, 12, torch.float32), (300, 7, torch.float32),
                        (640, 9, torch.float64)]:
        s = torch.randint(-20, 20, (9, n), generator=g).to(dtype) / 4
        s[0, 100:] = float("-inf")
        s[1, :] = -0.0
        s[1, ::3] = 0.0
        v, i = stable_topk(s, k, width=64)
        exp = torch.sort(s, dim=1, descending=True, stable=True)
        assert torch.equal(i, exp.indices[:, :k])
        assert torch.equal(v, exp.values[:, :k])


def test_torch_and_numpy_inputs_agree_and_progress_runs():
    x, y = tricky_data(n=60)
    a = evaluate(x, y, distance="dot")
    b = evaluate(torch.from_numpy(x), torch.from_numpy(y), distance="dot", progress=True, chunk_size=8)
    assert a == b
    assert set(a) == {"recall@1", "recall@2", "recall@4", "recall@8", "precision@1", "r_precision", "map@r",
                      "n_queries", "n_queries_without_relevant"}


def test_all_queries_lone_gives_nan_and_warning():
    x = np.eye(4, dtype=np.float32)
    with pytest.warns(UserWarning, match="no query has a relevant"):
        out = evaluate(x, [0, 1, 2, 3], recall_at=(1,))
    assert math.isnan(out["recall@1"]) and out["n_queries_without_relevant"] == 4


def test_default_block_respects_memory_budget():
    assert default_chunk_size(60502, 60544, 4, 256 * 2**20) == 256 * 2**20 // (60544 * 4)
    assert default_chunk_size(10, 60544, 4, 256 * 2**20) == 10
    assert default_chunk_size(10, 10**9, 4, 1) == 1


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"query_labels": np.zeros(5, dtype=np.int64)}, ValueError, "labels has 5 entries"),
        ({"query": np.full((6, 3), np.nan, dtype=np.float32)}, ValueError, "NaN or infinite"),
        ({"query": np.array([[np.inf, 0, 0]] * 6, dtype=np.float32)}, ValueError, "NaN or infinite"),
        ({"query": np.zeros((0, 3)), "query_labels": np.zeros(0, dtype=np.int64)}, ValueError, "empty"),
        ({"recall_at": (6,)}, ValueError, "recall@6"),
        ({"recall_at": (0,)}, ValueError, "positive"),
        ({"query_labels": np.zeros(6)}, TypeError, "integer class ids"),
        ({"metrics": ("recal",)}, ValueError, "unknown metric"),
        ({"distance": "manhattan"}, ValueError, "distance"),
        ({"ties": "random"}, ValueError, "ties"),
        ({"backend": "annoy"}, ValueError, "backend"),
        ({"gallery": np.zeros((4, 3), dtype=np.float32)}, ValueError, "together"),
        ({"gallery": np.zeros((4, 2), dtype=np.float32), "gallery_labels": np.zeros(4, dtype=np.int64)},
         ValueError, "dim"),
        ({"query": np.zeros(6)}, ValueError, "2-D"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, err, match):
    args = {"query": np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32),
                "query_labels": np.array([0, 0, 1, 1, 2, 2])}
    args.update(kwargs)
    with pytest.raises(err, match=match):
        evaluate(**args)


def test_k_larger_than_gallery_in_query_gallery_mode():
    x = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="more neighbours than the gallery"):
        evaluate(x, [0, 1, 2], x[:2], [0, 1], recall_at=(3,))


def test_faiss_backend_equals_torch_ranks():
    pytest.importorskip("faiss")
    from deepmetric.evaluation.faiss_backend import faiss_search

    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 12)).astype(np.float32)
    y = rng.integers(0, 30, size=300)
    for distance in ("cosine", "euclidean", "dot"):
        ks = (1, 5, 40)
        assert evaluate(x, y, backend="faiss", distance=distance, metrics=ALL[:4], recall_at=ks) == pytest.approx(
            evaluate(x, y, distance=distance, metrics=ALL[:4], recall_at=ks), abs=1e-12
        )
        _, idx = faiss_search(torch.from_numpy(x), torch.from_numpy(x), 20, distance, self_mode=True)
        xt = torch.from_numpy(x).double()
        if distance == "cosine":
            xt = torch.nn.functional.normalize(xt, dim=1)
        s = xt @ xt.t() if distance != "euclidean" else -torch.cdist(xt, xt)
        s.fill_diagonal_(float("-inf"))
        assert torch.equal(idx, torch.sort(s, dim=1, descending=True, stable=True).indices[:, :20])
    gx, gy = x[:120], y[:120]
    assert evaluate(x[120:], y[120:], gx, gy, backend="faiss") == pytest.approx(
        evaluate(x[120:], y[120:], gx, gy), abs=1e-12
    )


def test_approximate_faiss_reports_ann_recall():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(6)
    x = rng.normal(size=(800, 8)).astype(np.float32)
    y = rng.integers(0, 80, size=800)
    out = evaluate(x, y, backend="faiss-hnsw", recall_at=(1, 10))
    assert 0.9 <= out["ann_recall@10"] <= 1.0
    out = evaluate(x, y, backend="faiss-ivf", recall_at=(1, 10), index_params={"nlist": 8, "nprobe": 8})
    assert out["ann_recall@10"] == pytest.approx(1.0)  # probing every list is exact
    with pytest.raises(ValueError, match="map"):
        evaluate(x, y, backend="faiss", metrics=("map",))


def test_clustering_metrics_against_sklearn_and_pair_counting():
    from sklearn.metrics import normalized_mutual_info_score

    rng = np.random.default_rng(7)
    labels = rng.integers(0, 6, size=90)
    clusters = rng.integers(0, 5, size=90)
    a = b = t = 0
    for i, j in itertools.combinations(range(90), 2):
        same_y, same_c = labels[i] == labels[j], clusters[i] == clusters[j]
        a += same_y
        b += same_c
        t += same_y and same_c
    p, r = t / b, t / a
    assert pair_f1(labels, clusters) == pytest.approx(2 * p * r / (p + r), abs=1e-12)

    x = (rng.normal(size=(6, 5))[labels] * 4 + rng.normal(size=(90, 5))).astype(np.float32)
    scores = clustering_metrics(torch.from_numpy(x), torch.from_numpy(labels), seed=3)
    assign = kmeans_assign(x, 6, seed=3)
    assert scores["nmi"] == pytest.approx(normalized_mutual_info_score(labels, assign, average_method="arithmetic"))
    assert scores["f1"] == pytest.approx(pair_f1(labels, assign))
    out = evaluate(x, labels, metrics=("nmi", "f1"), distance="euclidean", seed=3)
    assert out["nmi"] == pytest.approx(scores["nmi"]) and out["nmi"] > 0.8
    # perfectly separated clusters
    sep = (np.eye(6)[labels] * 100 + rng.normal(size=(90, 6)) * 0.01).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        perfect = evaluate(sep, labels, metrics=("nmi", "f1"), distance="euclidean")
    assert perfect["nmi"] == pytest.approx(1.0) and perfect["f1"] == pytest.approx(1.0)


def test_two_stage_topk_on_continuous_scores_and_evaluate_at_moderate_size():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(50, 4096, generator=g)
    s[:, ::7] = float("-inf")
    v, i = stable_topk(s, 10)  # chunked path (width 16)
    ref = torch.sort(s, dim=1, descending=True, stable=True)
    assert torch.equal(i, ref.indices[:, :10]) and torch.equal(v, ref.values[:, :10])
    # evaluate on 1,500 items (two-stage top-k and the counting path) against a dense stable ranking
    x = torch.randn(1500, 16, generator=g)
    y = torch.randint(0, 150, (1500,), generator=g)
    ks = (1, 10, 50, 200)
    got = evaluate(x, y, recall_at=ks, metrics=ALL, chunk_size=400)
    xn = torch.nn.functional.normalize(x, dim=1)
    full = xn @ xn.t()
    full.fill_diagonal_(float("-inf"))
    order = torch.sort(full, dim=1, descending=True, stable=True).indices[:, :-1]
    rel = (y[order] == y.unsqueeze(1)).double()
    r = rel.sum(1)
    keep = r > 0
    first = rel.argmax(1)
    pos = torch.arange(1, 1500, dtype=torch.float64)
    prec = rel.cumsum(1) / pos
    in_r = pos.unsqueeze(0) <= r.unsqueeze(1)
    exp = {f"recall@{k}": float((first[keep] < k).double().mean()) for k in ks}
    exp["map@r"] = float(((prec * rel * in_r).sum(1)[keep] / r[keep]).mean())
    exp["r_precision"] = float(((rel * in_r).sum(1)[keep] / r[keep]).mean())
    exp["map"] = float(((prec * rel).sum(1)[keep] / r[keep]).mean())
    for key, value in exp.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def test_num_threads_is_restored():
    before = torch.get_num_threads()
    x, y = tricky_data(n=40)
    assert evaluate(x, y, distance="dot", num_threads=1) == evaluate(x, y, distance="dot")
    assert torch.get_num_threads() == before


def test_the_ranking_workers_run_their_operators_on_one_thread(monkeypatch):
    """With T threads the GEMM runs on T and the per-slice ranking on T one-thread workers: a worker whose operators
    ran T-thread OpenMP teams would oversubscribe the cores (T × T threads) at every operator."""
    from deepmetric.evaluation import retrieval

    seen: list[tuple[bool, int]] = []
    ranking = retrieval.stable_topk

    def recording_topk(*args, **kwargs):
        seen.append((threading.current_thread() is threading.main_thread(), torch.get_num_threads()))
        return ranking(*args, **kwargs)

    monkeypatch.setattr(retrieval, "stable_topk", recording_topk)
    monkeypatch.setattr(retrieval, "SLICE_BYTES", 1)  # many slices, so both workers take some
    before = torch.get_num_threads()
    x, y = tricky_data(n=400)
    result = retrieval.retrieve(x, y, k=5, distance="dot", num_threads=2)
    assert seen and all(not on_main and threads == 1 for on_main, threads in seen), seen
    assert torch.get_num_threads() == before
    assert torch.equal(result.neighbour_index, retrieval.retrieve(x, y, k=5, distance="dot",
                                                                   num_threads=1).neighbour_index)


def test_row_slices_and_reused_topk_workspace_leave_results_unchanged(monkeypatch):
    from deepmetric.evaluation import retrieval

    g = torch.Generator().manual_seed(3)
    s = torch.randint(-30, 30, (9, 4096), generator=g).float()
    s[:, ::5] = float("-inf")
    workspace = torch.full((9 * 4096 // 8,), float("nan"))
    v_ws, i_ws = stable_topk(s, 10, workspace=workspace)
    v, i = stable_topk(s, 10)
    assert torch.equal(v_ws, v) and torch.equal(i_ws, i)
    oracle = torch.sort(s, dim=1, descending=True, stable=True)  # (−score, column), independent of the top-k
    assert torch.equal(i_ws, oracle.indices[:, :10]) and torch.equal(v_ws, oracle.values[:, :10])
    assert not torch.isnan(workspace[: 9 * 512]).any()  # width 8: the 512 chunk maxima of each row landed there
    x, y = tricky_data(n=400)
    kwargs = {"k": 12, "rank_depth": 60, "list_metrics": ("precision@1", "r_precision", "map@r", "map"),
              "distance": "dot"}
    wide = retrieval.retrieve(x, y, **kwargs)  # 400 rows in slices of 100 (a quarter of the block)
    monkeypatch.setattr(retrieval, "SLICE_BYTES", 1)  # slices of the minimum 8 rows
    sliced = retrieval.retrieve(x, y, **kwargs)
    assert torch.equal(wide.neighbour_index, sliced.neighbour_index)
    assert torch.equal(wide.neighbour_score, sliced.neighbour_score)
    assert torch.equal(wide.first_relevant_rank, sliced.first_relevant_rank)
    assert wide.rank_depth == sliced.rank_depth
    for name, values in wide.per_query.items():
        if name == "map":  # the list/counted split of each AP sum moves with the slice's list length: ulps only
            assert torch.allclose(values, sliced.per_query[name], rtol=1e-13, atol=0), name
        else:
            assert torch.equal(values, sliced.per_query[name]), name
