"""Shared dense math in deepmetric.functional."""

from __future__ import annotations

import math

import pytest
import torch

from deepmetric import functional as F


def _x(seed: int = 0, n: int = 5, d: int = 4) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_cosine_and_distance_matrices_match_brute_force() -> None:
    x, y = _x(0), _x(1, n=7)
    xn, yn = x / x.norm(dim=1, keepdim=True), y / y.norm(dim=1, keepdim=True)
    assert torch.allclose(F.cosine_similarity_matrix(x, y), xn @ yn.t())
    assert torch.allclose(F.pairwise_distance(x, y), torch.cdist(xn, yn), atol=1e-6)
    assert torch.allclose(F.pairwise_distance(x, y, normalize=False, squared=True), torch.cdist(x, y) ** 2)
    assert torch.allclose(F.distance_from_cosine(F.cosine_similarity_matrix(x, y)), torch.cdist(xn, yn), atol=1e-6)


def test_half_inputs_give_float32_matrices() -> None:
    x = _x().half()
    assert F.cosine_similarity_matrix(x, x).dtype == torch.float32
    assert F.pairwise_distance(x, x).dtype == torch.float32


def test_resolve_reference_ignores_diagonal_only_for_self_comparison() -> None:
    x, labels = _x(), torch.tensor([0, 0, 1, 1, 2])
    _, _, ignore = F.resolve_reference(x, labels, None, None, None)
    assert torch.equal(ignore, torch.eye(5, dtype=torch.bool))
    _, _, ignore = F.resolve_reference(x, labels, x, labels, None)
    assert ignore is None
    with pytest.raises(ValueError, match="together"):
        F.resolve_reference(x, labels, x, None, None)
    with pytest.raises(ValueError, match="ignore_mask"):
        F.resolve_reference(x, labels, x, labels, torch.zeros(2, 2, dtype=torch.bool))


def test_label_masks_exclude_ignored_pairs() -> None:
    labels = torch.tensor([0, 0, 1])
    pos, neg = F.label_masks(labels, labels, torch.eye(3, dtype=torch.bool))
    assert pos.tolist() == [[False, True, False], [True, False, False], [False, False, False]]
    assert neg.tolist() == [[False, False, True], [False, False, True], [True, True, False]]


def test_masked_reductions() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[True, False, True], [False, False, False]])
    assert F.masked_max(x, m).tolist() == [3.0, float("-inf")]
    assert F.masked_min(x, m).tolist() == [1.0, float("inf")]
    assert F.masked_mean(x, m).tolist() == [2.0, 0.0]
    lse = F.masked_logsumexp(x, m, add_one=True)
    assert torch.allclose(lse, torch.tensor([math.log(1 + math.e + math.e**3), 0.0]))


def test_zero_loss_has_zero_gradient() -> None:
    x = _x().requires_grad_()
    z = F.zero_loss(x)
    z.backward()
    assert float(z.detach()) == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_gram_matrix_accumulates_half_inputs_in_float32_under_autocast() -> None:
    x = _x().float()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        g = F.gram_matrix(x, x)
    assert g.dtype == torch.float32 and torch.allclose(g, x @ x.t())


def test_masked_logsumexp_is_stable_and_exact() -> None:
    x = torch.tensor([[0.0, -200.0, 300.0, 1.0], [5.0, 6.0, 7.0, 8.0]], dtype=torch.float64, requires_grad=True)
    m = torch.tensor([[True, True, False, True], [False, False, False, False]])
    lse = F.masked_logsumexp(x, m)
    assert torch.allclose(lse[0], torch.logsumexp(torch.tensor([0.0, -200.0, 1.0], dtype=torch.float64), 0))
    assert lse[1] < -1e29 and torch.isfinite(lse[1])  # empty row: very negative but finite
    (lse[0] + 0.0 * lse[1]).backward()
    assert torch.isfinite(x.grad).all() and float(x.grad[1].abs().sum()) == 0.0 and float(x.grad[0, 2]) == 0.0
    assert float(F.masked_logsumexp(x.detach() * 100, m, add_one=True)[1]) == 0.0
