"""The second collapse signal: validation metrics at the chance level of a random ranking of the split."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from deepmetric.data.bundle import DataBundle
from deepmetric.evaluation import evaluate
from deepmetric.training.config import ExperimentConfig, load_config
from deepmetric.training.guards import CHANCE_WARNING, chance_levels, chance_warning
from deepmetric.training.run_dir import create_run_dir
from deepmetric.training.selection import SplitEvaluator
from deepmetric.training.trainer import Trainer


def _metrics_of_ranking(rel: tuple[int, ...], r: int, ks: tuple[int, ...]) -> dict[str, float]:
    hits = np.cumsum(rel)
    precision_at = hits / np.arange(1, len(rel) + 1)
    out = {f"recall@{k}": float(any(rel[:k])) for k in ks}
    out["precision@1"] = float(rel[0])
    out["r_precision"] = sum(rel[:r]) / r
    out["map@r"] = float(sum(precision_at[i] * rel[i] for i in range(r)) / r)
    return out


def test_chance_levels_equal_the_mean_over_every_ranking():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 2])  # R = 2, 3 and 0 (class 2 has no relevant item) of M = 7
    ks = (1, 2, 4)
    expected: dict[str, list[float]] = {}
    for label in labels:
        r = int((labels == label).sum()) - 1
        if r == 0:
            continue
        # every distinct placement of the R relevant items among the M candidates is equally likely
        rankings = [tuple(int(i in chosen) for i in range(7)) for chosen in itertools.combinations(range(7), r)]
        per_query = [_metrics_of_ranking(rel, r, ks) for rel in rankings]
        for name in per_query[0]:
            expected.setdefault(name, []).append(float(np.mean([m[name] for m in per_query])))
    chance = chance_levels(labels, recall_at=ks)
    assert set(chance) == set(expected)
    for name, values in expected.items():
        assert chance[name] == pytest.approx(np.mean(values), rel=1e-12), name


def test_chance_levels_query_gallery_equal_the_mean_over_every_ranking():
    query, gallery = np.array([0, 1, 1, 5]), np.array([0, 0, 1, 2, 2])  # label 5 has no gallery item
    chance = chance_levels(query, gallery, recall_at=(1, 3))
    # query label 0: R = 2 of M = 5; label 1: R = 1 of 5
    p_miss_3 = {2: 1 / 10, 1: 2 / 5}  # C(3,3)/C(5,3), C(4,3)/C(5,3)
    assert chance["recall@1"] == pytest.approx((2 / 5 + 2 * 1 / 5) / 3)
    assert chance["recall@3"] == pytest.approx(((1 - p_miss_3[2]) + 2 * (1 - p_miss_3[1])) / 3)
    map_r2 = (1.5 / 5 + 1 * (2 - 1.5) / 20)  # H_2 / M + (R − 1)(R − H_R) / (M(M − 1))
    assert chance["map@r"] == pytest.approx((map_r2 + 2 * (1 / 5)) / 3)


def test_random_embeddings_score_at_their_chance_level():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 25, size=2000)
    measured = evaluate(rng.normal(size=(2000, 32)).astype(np.float32), labels, recall_at=(1, 8))
    chance = chance_levels(labels, recall_at=(1, 8))
    for name in ("recall@1", "recall@8", "r_precision", "map@r"):
        se = np.sqrt(chance[name] * (1 - chance[name]) / 2000)
        assert abs(measured[name] - chance[name]) < 4 * se, name
    assert chance_warning("validation", measured, chance, step=100) is not None


def test_the_warning_fires_at_chance_and_not_above_it():
    chance = {"recall@1": 0.04, "map@r": 0.007}
    at = {"recall@1": 0.045, "map@r": 0.03, "n_queries": 768, "n_queries_without_relevant": 0}
    message = chance_warning("validation", at, chance, step=40)
    assert message.startswith(CHANCE_WARNING) and "step 40" in message and "optimizer.lr" in message
    assert "recall@1 4.50 % (chance 4.00 %)" in message
    # 3 standard errors of 768 queries at 4 % is 2.1 points: 6.0 % is still chance, 7 % is not
    assert chance_warning("validation", {**at, "recall@1": 0.060}, chance, step=40) is not None
    assert chance_warning("validation", {**at, "recall@1": 0.070}, chance, step=40) is None
    assert chance_warning("validation", {"map@r": 0.0}, chance, step=40) is None  # nothing to judge by


class _Labelled(torch.utils.data.Dataset):
    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)


def test_the_evaluator_judges_only_after_a_quarter_of_the_run():
    labels = np.repeat(np.arange(10), 5)
    data = DataBundle(train=_Labelled(labels), validation=_Labelled(labels), test=None)
    evaluator = SplitEvaluator(torch.nn.Identity(), data, ExperimentConfig(), SimpleNamespace(is_main=True),
                               torch.device("cpu"), None)
    at_chance = {"recall@1": 0.08, "n_queries": 50}
    assert evaluator.chance_warning("validation", at_chance, step=24, iterations=100) is None
    assert evaluator.chance_warning("validation", at_chance, step=25, iterations=100) is not None
    assert evaluator.chance_warning("validation", {"recall@1": 0.9, "n_queries": 50}, 100, 100) is None
    warnings: list[str] = []
    evaluator.warn_at_chance("validation", at_chance, 50, 100, warnings)
    evaluator.warn_at_chance("validation", at_chance, 100, 100, warnings)
    assert len(warnings) == 1  # once per run


def test_a_collapsed_run_warns_that_validation_is_at_chance(tmp_path, capsys):
    overrides = ["data.max_classes=24", "data.batch_size=32", "data.m_per_class=4", "model.width=8",
                 "model.embedding_size=32", "train.progress=false", "train.threads=1", "train.eval_every=5",
                 "evaluation.recall_at=[1, 2]", "train.iterations=10", "optimizer.lr=0"]
    trainer = Trainer(load_config(None, overrides), create_run_dir(tmp_path / "run"))
    with torch.no_grad():  # every image gets one embedding: the head's bias
        trainer.model.head.linear.weight.zero_()
    trainer.fit()
    out = capsys.readouterr().out
    assert out.count(CHANCE_WARNING) == 1 and "on the validation split at step 5" in out
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert sum(w.startswith(CHANCE_WARNING) for w in saved["warnings"]) == 1
