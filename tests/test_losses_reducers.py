"""The shared reducers, and the arguments each loss declares for the builder."""

from __future__ import annotations

import itertools

import pytest
import torch

from deepmetric.losses import LOSSES, ContrastiveLoss, MarginLoss, MetricLoss, ProxyLoss, reducers


def test_reducers_on_known_terms() -> None:
    losses = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 3.0]])
    selected = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert float(reducers.avg_nonzero(losses)) == pytest.approx(6.0 / 3)
    assert float(reducers.avg_nonzero(losses, weights=torch.tensor([[1.0], [2.0]]))) == pytest.approx(10.0 / 5)
    assert float(reducers.avg_nonzero(losses, nonzero=torch.full_like(losses, 2.0))) == pytest.approx(6.0 / 12)
    assert float(reducers.mean(losses, selected)) == pytest.approx(6.0 / 5)
    assert float(reducers.batch(losses, 2)) == pytest.approx(3.0)
    assert float(reducers.contributing(losses.sum(1), torch.tensor([True, False]))) == pytest.approx(6.0)
    assert float(reducers.total(losses)) == pytest.approx(6.0)
    # nothing selected or nothing non-zero: 0, not 0/0
    zeros = torch.zeros(2, 3)
    assert float(reducers.avg_nonzero(zeros)) == 0.0 and float(reducers.mean(zeros, zeros)) == 0.0
    with pytest.raises(ValueError, match="reduction must be one of"):
        reducers.reduce("median", losses)
    with pytest.raises(ValueError, match="batch_size"):
        reducers.reduce("batch", losses)


def _brute_force_similarity_contrastive(x: torch.Tensor, labels: list[int], m_pos: float, m_neg: float) -> float:
    """Σ ℓ⁺ / #(ℓ⁺ > 0) + Σ ℓ⁻ / #(ℓ⁻ > 0) over ordered pairs i ≠ j, ℓ⁺ = [m⁺ − S]₊, ℓ⁻ = [S − m⁻]₊."""
    pos, neg = [], []
    for i, j in itertools.permutations(range(len(labels)), 2):
        s = float(x[i] @ x[j])
        if labels[i] == labels[j]:
            pos.append(max(m_pos - s, 0.0))
        else:
            neg.append(max(s - m_neg, 0.0))

    def avg(terms: list[float]) -> float:
        nonzero = [t for t in terms if t > 0]
        return sum(nonzero) / max(len(nonzero), 1)

    return avg(pos) + avg(neg)


def test_avg_nonzero_counts_only_terms_whose_loss_is_positive() -> None:
    # an exact duplicate positive pair (S = 1 = m⁺, loss exactly 0) and an orthogonal negative pair (S = 0 = m⁻,
    # loss exactly 0): neither is counted in the divisor
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    labels = [0, 0, 0, 1, 1]
    loss = ContrastiveLoss(1.0, 0.0, form="similarity", negative_term="hinge", reduction="avg_nonzero")
    value = float(loss(x, torch.tensor(labels)))
    assert value == pytest.approx(_brute_force_similarity_contrastive(x, labels, 1.0, 0.0), abs=1e-12)
    # dividing by every selected pair instead would give a different value
    assert value != pytest.approx(float(ContrastiveLoss(1.0, 0.0, form="similarity", negative_term="hinge",
                                                        reduction="mean")(x, torch.tensor(labels))), abs=1e-6)


def test_build_arguments_are_declared() -> None:
    for name, cls in LOSSES.items():
        if issubclass(cls, ProxyLoss):
            assert cls.build_arguments == ("num_classes", "embedding_size"), name
        elif cls is MarginLoss:
            assert cls.build_arguments == ("num_classes",)
        else:
            assert cls.build_arguments == (), name
    assert MetricLoss.build_arguments == ()
    facts = {"num_classes": 4, "embedding_size": 3}
    for cls in LOSSES.values():  # what a builder does: pass exactly the declared facts
        loss = cls(**{k: facts[k] for k in cls.build_arguments})
        assert isinstance(loss, MetricLoss)
