"""Verification (FMR/FNMR thresholds, ROC AUC, EER) from kNN lists + sampled impostors vs all pairs."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from deepmetric.evaluation import retrieve
from deepmetric.evaluation.verification import (
    calibrate_threshold,
    pair_scores,
    threshold_report,
    verification_metrics,
)


def _data(n=120, d=6, classes=15, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d))
    y = rng.integers(0, classes, size=n)
    return (centres[y] + 0.8 * rng.normal(size=(n, d))).astype(np.float32), y


def _all_pairs(x, y):
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = (u @ u.T).astype(np.float64)
    off = ~np.eye(len(x), dtype=bool)
    return s[off], (y[:, None] == y[None, :])[off]


def test_full_lists_give_the_exact_pair_statistics():
    x, y = _data()
    res = retrieve(x, y, k=len(x) - 1)
    ps = pair_scores(res, x)
    assert ps.n_out.sum() == 0  # everything is listed: no sampling
    s, gen = _all_pairs(x, y)
    assert ps.genuine.sum() == gen.sum() and ps.n_impostor_pairs == (~gen).sum()
    m = verification_metrics(ps, fmrs=(0.1, 0.01))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(gen, s), abs=1e-6)
    for t in (0.2, 0.5, 0.8):
        rep = threshold_report(ps, t)
        assert rep["fmr"] == pytest.approx(((s >= t) & ~gen).sum() / (~gen).sum(), abs=1e-6)
        assert rep["fnmr"] == pytest.approx(((s < t) & gen).sum() / gen.sum(), abs=1e-6)
        assert rep["fmr_standard_error"] == 0
    t = calibrate_threshold(ps, 0.01)
    assert ((s >= t) & ~gen).sum() / (~gen).sum() <= 0.01
    # the next lower score would break the target: the threshold is the lowest that meets it
    lower = s[s < t].max()
    assert ((s >= lower) & ~gen).sum() / (~gen).sum() > 0.01
    fnr = 1 - ((s >= m["threshold@fmr=0.01"]) & gen).sum() / gen.sum()
    assert m["fnmr@fmr=0.01"] == pytest.approx(fnr, abs=1e-9)
    assert 0 <= m["eer"] <= 0.5


def test_sampled_impostors_are_unbiased_and_exact_above_the_lists():
    x, y = _data(n=200, seed=1)
    s, gen = _all_pairs(x, y)
    res = retrieve(x, y, k=10)
    kth = float(res.neighbour_score[:, -1].max())
    true_at = {t: ((s >= t) & ~gen).sum() / (~gen).sum() for t in (0.3, 0.6, kth + 1e-6)}
    estimates = {t: [] for t in true_at}
    for seed in range(20):
        ps = pair_scores(res, x, negatives_per_query=8, seed=seed)
        assert ps.n_impostor_pairs == (~gen).sum()
        for t in true_at:
            fmr, se = ps.false_match_rate(t)
            estimates[t].append((fmr, se))
    fmr, se = estimates[kth + 1e-6][0]
    assert se == 0 and fmr == pytest.approx(true_at[kth + 1e-6], abs=1e-12)
    for t in (0.3, 0.6):
        values = np.array([e[0] for e in estimates[t]])
        mean_se = np.mean([e[1] for e in estimates[t]])
        assert mean_se > 0
        # the mean of 20 independent estimates lies within 4 of its standard errors of the truth
        assert abs(values.mean() - true_at[t]) < 4 * mean_se / np.sqrt(20)
    again = pair_scores(res, x, negatives_per_query=8, seed=3)
    assert np.array_equal(again.scores, pair_scores(res, x, negatives_per_query=8, seed=3).scores)


def test_query_gallery_mode_and_bad_input():
    x, y = _data(seed=2)
    gx, gy = _data(n=90, seed=3)
    res = retrieve(x, y, gx, gy, k=gx.shape[0])
    ps = pair_scores(res, x, gx)
    u, v = x / np.linalg.norm(x, axis=1, keepdims=True), gx / np.linalg.norm(gx, axis=1, keepdims=True)
    s, gen = (u @ v.T).ravel(), (y[:, None] == gy[None, :]).ravel()
    assert verification_metrics(ps)["roc_auc"] == pytest.approx(roc_auc_score(gen, s), abs=1e-6)
    with pytest.raises(ValueError, match="gallery=None"):
        pair_scores(res, x)
    with pytest.raises(ValueError, match="similarity"):
        pair_scores(retrieve(x, y, k=3, distance="euclidean"), x)
    with pytest.raises(ValueError, match="target_fmr"):
        calibrate_threshold(ps, 0)
