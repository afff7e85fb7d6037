"""Every loss: registry, gradcheck (float64), degenerate batches, zero-with-gradient, reference convention, fp16."""

from __future__ import annotations

import pytest
import torch

from deepmetric.losses import LOSSES, MetricLoss, MinedPairs, MinedTriplets, ProxyLoss

N_CLASSES, DIM = 4, 3
PAIR_LOSSES = sorted(n for n, c in LOSSES.items() if not issubclass(c, ProxyLoss))


def make(name: str, **kw) -> MetricLoss:
    cls = LOSSES[name]
    if issubclass(cls, ProxyLoss):
        torch.manual_seed(0)
        extra = {"centers_per_class": 2} if name == "soft_triple" else {}
        return cls(N_CLASSES, DIM, **extra, **kw)
    if name == "margin":
        return cls(num_classes=N_CLASSES, **kw)
    return cls(**kw)


def test_registry_names() -> None:
    assert set(LOSSES) == {
        "multi_similarity", "contrastive", "triplet_margin", "lifted_structure", "binomial_deviance", "margin",
        "nca", "weight", "proxy_nca", "proxy_anchor", "npair", "normalized_softmax", "arcface", "soft_triple",
        "smooth_ap", "recall_surrogate",
    }


GRADCHECK = sorted(LOSSES) + ["lifted_structure:modified", "lifted_structure:generalized",
                              "contrastive:similarity", "multi_similarity:no_mining"]


def _make_variant(spec: str) -> MetricLoss:
    name, _, variant = spec.partition(":")
    kw = {}
    if variant in ("modified", "generalized"):
        kw = {"variant": variant}
    elif variant == "similarity":
        kw = {"form": "similarity"}
    elif variant == "no_mining":
        kw = {"mining": False}
    return make(name, **kw)


@pytest.mark.parametrize("spec", GRADCHECK)
def test_gradcheck_float64(spec: str) -> None:
    loss = _make_variant(spec).double()
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    emb = torch.randn(7, DIM, generator=g, dtype=torch.float64, requires_grad=True)
    params = [p for p in loss.parameters()]
    assert torch.autograd.gradcheck(lambda x, *ps: loss(x, labels), (emb, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_double_backward_float64(name: str) -> None:
    # autograd does every backward, so second derivatives (gradient penalties, meta-learning) are available
    loss = make(name).double()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    emb = torch.randn(7, DIM, generator=torch.Generator().manual_seed(2), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: loss(x, labels), (emb,), eps=1e-6, atol=1e-4)


def _edge_batches() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return {
        "one_class": (torch.randn(6, DIM, generator=g), torch.zeros(6, dtype=torch.long)),
        "single_sample_classes": (torch.randn(4, DIM, generator=g), torch.arange(4)),
        "identical_embeddings": (torch.ones(6, DIM), torch.tensor([0, 0, 1, 1, 2, 2])),
        "b_equals_2_same": (torch.randn(2, DIM, generator=g), torch.tensor([1, 1])),
        "b_equals_2_diff": (torch.randn(2, DIM, generator=g), torch.tensor([0, 1])),
    }


@pytest.mark.parametrize("case", sorted(_edge_batches()))
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_degenerate_batches_give_finite_values_and_grads(name: str, case: str) -> None:
    emb, labels = _edge_batches()[case]
    x = emb.clone().requires_grad_()
    loss = make(name)
    value = loss(x, labels)
    assert value.dim() == 0 and value.requires_grad
    value.backward()
    assert torch.isfinite(value), f"{name} on {case}: {value}"
    assert torch.isfinite(x.grad).all(), f"{name} on {case}: non-finite gradient"
    for p in loss.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_nothing_mined_gives_zero_with_gradient(name: str) -> None:
    x = torch.randn(6, DIM).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    empty = torch.zeros(6, 6, dtype=torch.bool)
    for mined in (MinedPairs(empty, empty.clone()), MinedTriplets(*(torch.empty(0, dtype=torch.long),) * 3)):
        value = make(name)(x, labels, mined=mined)
        value.backward()
        assert float(value.detach()) == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
        x.grad = None


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_explicit_reference_with_ignored_diagonal_equals_self_comparison(name: str) -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, DIM, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    loss = make(name).double()
    a = loss(x, labels)
    # A copy (not the same object) as references, self removed through ignore_mask: same value.
    b = loss(x, labels, x.clone(), labels.clone(), ignore_mask=torch.eye(8, dtype=torch.bool))
    assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_duplicates_stay_positives(name: str) -> None:
    # Self-pairs are removed by index: an exact duplicate of an anchor is still a valid positive.
    x = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.2, 1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    assert torch.isfinite(make(name).double()(x, labels))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_half_precision_inputs_accumulate_in_float32(name: str) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, DIM, generator=g).half().requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    value = make(name)(x, labels)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", ["proxy_anchor", "arcface"])
def test_proxy_losses_refuse_mined_and_bad_labels(name: str) -> None:
    loss = make(name)
    x, labels = torch.randn(4, DIM), torch.tensor([0, 1, 2, 3])
    with pytest.raises(TypeError):
        loss(x, labels, mined=MinedPairs(torch.ones(4, 4, dtype=torch.bool), torch.ones(4, 4, dtype=torch.bool)))
    with pytest.raises(ValueError, match="labels must be in"):
        loss(x, torch.tensor([0, 1, 2, 9]))
    # references are accepted and ignored
    assert torch.allclose(loss(x, labels), loss(x, labels, x * 2, labels))


def test_lr_multipliers() -> None:
    assert LOSSES["proxy_anchor"].lr_multiplier == 100.0
    assert make("margin", lr_multiplier=50.0).lr_multiplier == 50.0
    assert make("proxy_nca").lr_multiplier == 1.0
