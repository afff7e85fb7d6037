"""Evaluation under exact ties (issue 17 item 7): Recall@K, R-Precision and MAP@R equal a brute-force oracle that
ranks by (−similarity, gallery index) with ``np.lexsort``, on quantised float64 data full of exact ties.

The oracle's similarity is exact: dot and Euclidean scores of small integers are exact in float64, and for cosine
it ranks by sign(S)·S²/‖g‖² (S = ⟨q, g⟩), per query the order of the cosine. With integers that key is one correctly
rounded division of exact values; two distinct rationals p/a with p·a < 2^40 are never rounded to one float64, so
its ties are exactly the mathematical ties of the cosine.
"""

from __future__ import annotations

import numpy as np
import pytest

from deepmetric.evaluation import evaluate, retrieve

KEYS = ("r_precision", "map@r")


def exact_key(q: np.ndarray, g: np.ndarray, distance: str) -> np.ndarray:
    s = q @ g.T
    if distance == "dot":
        return s
    if distance == "euclidean":
        return -(((q[:, None, :] - g[None, :, :]) ** 2).sum(axis=2))
    return np.sign(s) * s * s / (g * g).sum(axis=1)[None, :]


def oracle(q, ql, g, gl, ks, distance):
    self_mode = g is None
    if self_mode:
        g, gl = q, ql
    key = exact_key(q, g, distance)
    n_q, n_g = key.shape
    if self_mode:
        key[np.arange(n_q), np.arange(n_q)] = -np.inf  # own row last, then dropped
    order = np.lexsort((np.broadcast_to(np.arange(n_g), key.shape), -key), axis=1)
    if self_mode:
        order = order[:, :-1]
    rel = gl[order] == ql[:, None]
    r = rel.sum(axis=1)
    has = r > 0
    first = rel.argmax(axis=1)
    out = {f"recall@{k}": float((first < k)[has].mean()) for k in ks}
    pos = np.arange(1, rel.shape[1] + 1)
    rel_r = rel & (pos[None, :] <= r[:, None])
    hits = rel_r.cumsum(axis=1)
    out["r_precision"] = float((rel_r.sum(axis=1) / np.maximum(r, 1))[has].mean())
    out["map@r"] = float(((hits / pos * rel_r).sum(axis=1) / np.maximum(r, 1))[has].mean())
    return out, order


def binary_codes(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """±1 codes near 40 class prototypes with many duplicated rows: every cosine is an integer / d."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 40, size=n)
    proto = rng.choice([-1.0, 1.0], size=(40, d))
    x = proto[labels] * np.where(rng.random((n, d)) < 0.3, -1.0, 1.0)
    x[rng.integers(0, n, n // 8)] = x[rng.integers(0, n, n // 8)]
    return x, labels


def small_integers(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer rows of different norms in {−2, …, 2}^d with duplicates (no zero row)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, size=(n, d)).astype(np.float64)
    x[np.abs(x).sum(axis=1) == 0, 0] = 1.0
    x[rng.integers(0, n, n // 6)] = x[rng.integers(0, n, n // 6)]
    return x, rng.integers(0, 30, size=n)


def assert_equal_to_oracle(got, exp):
    for key, value in exp.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize("chunk_size", [3, 7, None])
@pytest.mark.parametrize("mode", ["self", "query_gallery"])
def test_cosine_binary_codes_equal_lexsort_oracle(mode, chunk_size):
    x, y = binary_codes(400, 12, seed=1)
    ks = (1, 2, 4, 16, 17, 40, 100, 240)  # beyond the 16-entry list: first-relevant ranks are counted
    args = (x, y, None, None) if mode == "self" else (x[:150], y[:150], x[150:], y[150:])
    got = evaluate(*args, metrics=("recall", "r_precision", "map@r"), recall_at=ks, chunk_size=chunk_size)
    exp, _ = oracle(*args, ks=ks, distance="cosine")
    assert_equal_to_oracle(got, exp)


@pytest.mark.parametrize("distance", ["cosine", "dot", "euclidean"])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_integer_rows_equal_oracle_two_stage_topk_and_threads(distance, num_threads):
    # 1,300 gallery columns: the two-stage (chunk maxima) top-k runs; several blocks per call with chunk_size=37
    x, y = small_integers(1300, 3, seed=2)
    ks = (1, 2, 5, 16, 64, 500)
    for args in ((x, y, None, None), (x[:300], y[:300], x[300:], y[300:])):
        got = evaluate(*args, metrics=("recall", "r_precision", "map@r"), recall_at=ks, distance=distance,
                       chunk_size=37, num_threads=num_threads)
        exp, _ = oracle(*args, ks=ks, distance=distance)
        assert_equal_to_oracle(got, exp)


def test_neighbour_lists_follow_the_oracle_order_and_scores_are_cosines():
    x, y = small_integers(300, 4, seed=3)
    res = retrieve(x, y, k=20, chunk_size=5)
    _, order = oracle(x, y, None, None, ks=(1,), distance="cosine")
    np.testing.assert_array_equal(res.neighbour_index.numpy(), order[:, :20])
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    expected = np.take_along_axis(xn @ xn.T, order[:, :20], axis=1)
    np.testing.assert_allclose(res.neighbour_score.numpy(), expected, rtol=0, atol=1e-15)


def test_results_do_not_depend_on_chunk_size_in_float64():
    x, y = binary_codes(300, 10, seed=4)
    runs = [retrieve(x, y, k=30, chunk_size=c, rank_depth=200) for c in (1, 2, 3, 5, 64, None)]
    for other in runs[1:]:
        np.testing.assert_array_equal(other.neighbour_index.numpy(), runs[0].neighbour_index.numpy())
        np.testing.assert_array_equal(other.first_relevant_rank.numpy(), runs[0].first_relevant_rank.numpy())
        assert other.metrics((1, 10, 200)) == runs[0].metrics((1, 10, 200))


def test_float32_ties_that_exist_in_float32_arithmetic_are_ordered_by_index():
    # ±1 codes of length 16 normalise to ±1/4 exactly, so every float32 product and partial sum is exact
    x, y = binary_codes(400, 16, seed=5)
    ks = (1, 2, 8, 100)
    got = evaluate(x.astype(np.float32), y, metrics=("recall", "r_precision", "map@r"), recall_at=ks, chunk_size=7)
    exp, _ = oracle(x, y, None, None, ks=ks, distance="cosine")
    assert_equal_to_oracle(got, exp)


@pytest.mark.parametrize("width", [8, 16, 32, None])
@pytest.mark.parametrize("tied", [True, False])
def test_block_topk_equals_a_stable_sort(width, tied):
    import torch

    from deepmetric.evaluation import stable_topk

    gen = torch.Generator().manual_seed(7)
    s = (torch.randint(0, 40, (48, 4096), generator=gen).float() if tied
         else torch.randn(48, 4096, generator=gen))
    s[:, ::97] = float("-inf")  # excluded items (own row, padding)
    for k in (1, 5, 16, 40):
        values, index = stable_topk(s, k, width=width)
        expected = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(index, expected) and torch.equal(values, s.gather(1, expected))
