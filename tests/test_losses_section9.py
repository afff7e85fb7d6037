"""methods.md §9 reference values (independent NumPy implementation of the formulas)."""

from __future__ import annotations

import pytest
import torch

from deepmetric.losses import (
    BinomialDevianceLoss,
    ContrastiveLoss,
    MultiSimilarityLoss,
    ProxyAnchorLoss,
    WeightLoss,
)

try:
    from tests._loss_fixtures import circle, section9
except ImportError:  # tests/ is not a package: pytest puts this directory on sys.path
    from _loss_fixtures import circle, section9


def _value(loss: torch.nn.Module) -> float:
    emb, labels = section9()
    out = loss(emb, labels)
    out.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()
    return float(out.detach())


def test_ms_code_semantics_batch_reduction() -> None:
    assert _value(MultiSimilarityLoss(2, 40, 0.5, epsilon=0.1)) == pytest.approx(0.480618, abs=1e-6)


def test_ms_code_semantics_four_of_six_anchors_contribute() -> None:
    # 0.480618·6 / 4 = 0.720927: the same per-anchor sum divided by the 4 contributing anchors.
    assert _value(MultiSimilarityLoss(2, 40, 0.5, reduction="contributing")) == pytest.approx(0.720928, abs=1e-6)


def test_ms_paper_values() -> None:
    assert _value(MultiSimilarityLoss(2, 50, 1.0)) == pytest.approx(0.404687, abs=1e-6)


def test_ms_without_mining() -> None:
    assert _value(MultiSimilarityLoss(2, 40, 0.5, mining=False)) == pytest.approx(0.548951, abs=1e-6)


def test_weight_loss_is_twice_ms_without_mining() -> None:
    assert _value(WeightLoss(alpha=40, beta=2, mining=False)) == pytest.approx(1.097901, abs=1e-6)


def test_contrastive_similarity_form_xbm() -> None:
    loss = ContrastiveLoss(form="similarity", neg_margin=0.5)  # pos margin 1, Σ pairs / B, negatives count S
    assert _value(loss) == pytest.approx(1.387643, abs=1e-6)


def test_contrastive_iaa_two_margins() -> None:
    loss = ContrastiveLoss(0.8, 0.5, form="similarity", negative_term="hinge")
    assert _value(loss) == pytest.approx(0.542985, abs=1e-6)


def test_binomial_deviance() -> None:
    assert _value(BinomialDevianceLoss(alpha=40, beta=2, margin=0.5)) == pytest.approx(4.512351, abs=1e-6)


def test_proxy_anchor_fixed_proxies() -> None:
    loss = ProxyAnchorLoss(num_classes=3, embedding_size=2, margin=0.1, alpha=32).double()
    with torch.no_grad():
        loss.proxies.copy_(circle([25.0, 50.0, 155.0]))
    assert _value(loss) == pytest.approx(27.253487, abs=1e-5)
    assert loss.lr_multiplier == 100.0
