"""Reality-Check protocol helpers: fold construction, CI math, separated/concatenated reporting."""

import math

import numpy as np
import pytest

from deepmetric.training.config import ConfigError, ExperimentConfig
from deepmetric.training.reality_check import (
    concatenate_embeddings,
    evaluate_seed,
    fold_configs,
    format_summary,
    make_folds,
    mean_confidence_interval,
    summarize,
)


def test_folds_are_contiguous_wraparound_blocks_of_sorted_classes():
    labels = np.repeat(np.arange(100, 108), 3)[::-1]  # 8 classes, unsorted input
    folds = make_folds(labels)
    assert len(folds) == 4
    classes = np.arange(100, 108)
    for k, fold in enumerate(folds):
        start = (k * 8) // 4
        expected_val = np.sort(np.roll(classes, -start)[6:])
        np.testing.assert_array_equal(fold.val_classes, expected_val)
        assert set(fold.train_classes) | set(fold.val_classes) == set(classes)
        assert not set(fold.train_classes) & set(fold.val_classes)
        assert len(fold.train_classes) == 6
    # fold 0 validates on the last quarter; the validation blocks partition the classes
    np.testing.assert_array_equal(folds[0].val_classes, [106, 107])
    np.testing.assert_array_equal(folds[1].val_classes, [100, 101])
    np.testing.assert_array_equal(folds[3].train_classes, [100, 101, 102, 103, 106, 107])
    assert sorted(np.concatenate([f.val_classes for f in folds]).tolist()) == classes.tolist()


def test_fold_starts_use_floor_for_non_divisible_class_counts():
    folds = make_folds(np.arange(10))  # n=10: starts 0, 2, 5, 7; validation blocks of ⌊10/4⌋ = 2
    assert [f.val_classes.tolist() for f in folds] == [[8, 9], [0, 1], [3, 4], [5, 6]]
    assert all(len(f.train_classes) == 8 for f in folds)


def test_mean_confidence_interval_matches_t_formula():
    values = [0.60, 0.62, 0.61, 0.65, 0.59]
    ci = mean_confidence_interval(values)
    x = np.array(values)
    # t_{0.975, 4} = 2.776445105
    expected = 2.776445105 * x.std(ddof=1) / math.sqrt(5)
    assert ci.mean == pytest.approx(x.mean())
    assert ci.half_width == pytest.approx(expected, rel=1e-8)
    assert ci.low < ci.mean < ci.high and ci.n == 5
    # two values: t_{0.975, 1} = 12.7062047
    ci2 = mean_confidence_interval([1.0, 3.0])
    assert ci2.half_width == pytest.approx(12.7062047 * math.sqrt(2) / math.sqrt(2), rel=1e-7)
    assert math.isnan(mean_confidence_interval([0.5]).half_width)
    assert mean_confidence_interval([0.3, 0.3, 0.3]).half_width == 0.0
    with pytest.raises(ValueError):
        mean_confidence_interval([])


def test_concatenation_normalises_each_model_then_the_result():
    a = np.array([[3.0, 4.0], [1.0, 0.0]])
    b = np.array([[0.0, 10.0], [2.0, 2.0]])
    c = concatenate_embeddings([a, b])
    assert c.shape == (2, 4)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, rtol=1e-6)
    # each model contributes equally regardless of its scale
    np.testing.assert_allclose(c[0], np.array([0.6, 0.8, 0.0, 1.0]) / math.sqrt(2), rtol=1e-6)
    with pytest.raises(ValueError):
        concatenate_embeddings([a, b[:1]])


def _nn_accuracy(emb, labels):
    s = emb @ emb.T
    np.fill_diagonal(s, -np.inf)
    return {"precision@1": float((labels[s.argmax(1)] == labels).mean())}


def test_separated_is_mean_of_folds_and_concatenated_can_beat_it():
    labels = np.array([0, 0, 1, 1])
    # model 1 separates only class 0 well, model 2 only class 1; together they separate both
    m1 = np.array([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.7, 0.7]])
    m2 = np.array([[0.0, 1.0], [0.7, 0.7], [1.0, 0.0], [1.0, 0.01]])
    r = evaluate_seed(0, [m1, m2], labels, _nn_accuracy)
    assert r.separated["precision@1"] == pytest.approx(np.mean([m["precision@1"] for m in r.per_fold]))
    assert r.concatenated["precision@1"] >= r.separated["precision@1"]
    summary = summarize([r, evaluate_seed(1, [m1, m1], labels, _nn_accuracy)])
    assert set(summary) == {"separated", "concatenated"}
    assert summary["separated"]["precision@1"].n == 2
    assert "precision@1" in format_summary(summary)


def test_fold_configs_one_run_per_seed_and_fold():
    cfg = ExperimentConfig()
    runs = fold_configs(cfg, seeds=(0, 1))
    assert [(s, f) for s, f, _ in runs] == [(s, f) for s in (0, 1) for f in range(4)]
    assert all(c.train.seed == s and c.data.validation_fraction == 0.0 for s, _, c in runs)
    assert cfg.data.validation_fraction == 0.2  # the input config is not mutated
    assert len({c.name for _, _, c in runs}) == 8
    cfg.train.protocol = "legacy"
    with pytest.raises(ConfigError, match="legacy"):
        fold_configs(cfg)
