"""Parity with pytorch-metric-learning (PML) in float64: value and gradients within 1e-5 on 20 random batches.

PML is part of the dev extra that provides pytest, so it is imported unconditionally: a missing PML fails this
module instead of skipping it.

Each case names our configuration and the matched PML configuration (docs/losses.md lists the mapping).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import pytorch_metric_learning.losses as pml_losses
import torch

from deepmetric import losses as dm

N_BATCHES = 20
TOL = 1e-5


def _batch(seed: int, m_per_class: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n_classes = int(torch.randint(2, 6, (1,), generator=g))
    if m_per_class:  # every anchor has a positive and a negative
        per = int(torch.randint(2, 5, (1,), generator=g))
        labels = torch.arange(n_classes).repeat_interleave(per)
    else:  # arbitrary layout, including single-sample classes
        labels = torch.randint(0, n_classes, (int(torch.randint(6, 20, (1,), generator=g)),), generator=g)
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    emb = torch.randn(labels.numel(), 8, generator=g, dtype=torch.float64)
    return emb, labels


def _grads(loss_fn: Callable[[torch.Tensor], torch.Tensor], emb: torch.Tensor, params: list[torch.Tensor]):
    x = emb.clone().requires_grad_(True)
    out = loss_fn(x)
    grads = torch.autograd.grad(out, [x, *params], allow_unused=True)
    return out.detach(), grads


def _compare(ours, theirs, *, m_per_class: bool, param_pairs=lambda o, t: []) -> None:
    ours, theirs = ours.double(), theirs.double()
    for seed in range(N_BATCHES):
        emb, labels = _batch(seed, m_per_class)
        pairs = param_pairs(ours, theirs)
        with torch.no_grad():
            for p_ours, p_theirs in pairs:
                p_theirs.copy_(p_ours if p_ours.shape == p_theirs.shape else p_ours.t())
        vo, go = _grads(lambda x, y=labels: ours(x, y), emb, [p for p, _ in pairs])
        vt, gt = _grads(lambda x, y=labels: theirs(x, y), emb, [p for _, p in pairs])
        assert torch.allclose(vo, vt, atol=TOL, rtol=TOL), f"seed {seed}: value {float(vo)} vs PML {float(vt)}"
        for k, (a, b) in enumerate(zip(go, gt)):
            a = torch.zeros_like(b) if a is None else a
            b = torch.zeros_like(a) if b is None else b
            if a.shape != b.shape:
                b = b.t()
            assert torch.allclose(a, b, atol=TOL, rtol=TOL), f"seed {seed}: gradient {k} differs"


ALL_LAYOUTS = [True, False]


@pytest.mark.parametrize("m_per_class", ALL_LAYOUTS)
def test_multi_similarity_no_mining(m_per_class: bool) -> None:
    _compare(dm.MultiSimilarityLoss(2, 50, 0.5, mining=False), pml_losses.MultiSimilarityLoss(2, 50, 0.5),
             m_per_class=m_per_class)


@pytest.mark.parametrize("m_per_class", ALL_LAYOUTS)
@pytest.mark.parametrize("margins", [(0.0, 1.0), (0.3, 0.8)])
def test_contrastive_distance_form(m_per_class: bool, margins: tuple[float, float]) -> None:
    _compare(dm.ContrastiveLoss(*margins), pml_losses.ContrastiveLoss(*margins), m_per_class=m_per_class)


@pytest.mark.parametrize("m_per_class", ALL_LAYOUTS)
@pytest.mark.parametrize("margin", [0.05, 0.5])
def test_triplet_margin_all_triplets(m_per_class: bool, margin: float) -> None:
    _compare(dm.TripletMarginLoss(margin), pml_losses.TripletMarginLoss(margin=margin), m_per_class=m_per_class)


def test_lifted_original() -> None:
    _compare(dm.LiftedStructureLoss(1.0, 0.1, variant="original"),
             pml_losses.LiftedStructureLoss(neg_margin=1.0, pos_margin=0.1), m_per_class=True)


def test_lifted_generalized() -> None:
    _compare(dm.LiftedStructureLoss(1.0, 0.0, variant="generalized"),
             pml_losses.GeneralizedLiftedStructureLoss(neg_margin=1.0, pos_margin=0.0), m_per_class=True)


@pytest.mark.parametrize("m_per_class", ALL_LAYOUTS)
def test_margin_per_class_learnable_beta(m_per_class: bool) -> None:
    _compare(dm.MarginLoss(0.2, nu=0.1, beta=1.2, learn_beta=True, num_classes=6),
             pml_losses.MarginLoss(margin=0.2, nu=0.1, beta=1.2, learn_beta=True, num_classes=6),
             m_per_class=m_per_class, param_pairs=lambda o, t: [(o.beta, t.beta)])


def test_margin_shared_beta() -> None:
    _compare(dm.MarginLoss(0.2, nu=0.05, beta=1.0, learn_beta=True),
             pml_losses.MarginLoss(margin=0.2, nu=0.05, beta=1.0, learn_beta=True),
             m_per_class=True, param_pairs=lambda o, t: [(o.beta, t.beta)])


@pytest.mark.parametrize("m_per_class", ALL_LAYOUTS)
def test_nca(m_per_class: bool) -> None:
    _compare(dm.NCALoss(softmax_scale=3.0), pml_losses.NCALoss(softmax_scale=3.0), m_per_class=m_per_class)


def test_npair() -> None:
    _compare(dm.NPairLoss(), pml_losses.NPairsLoss(), m_per_class=True)


PROXY_CASES = {
    "proxy_nca": (lambda: dm.ProxyNCALoss(6, 8, softmax_scale=4.0),
                  lambda: pml_losses.ProxyNCALoss(6, 8, softmax_scale=4.0), "proxies"),
    "proxy_anchor": (lambda: dm.ProxyAnchorLoss(6, 8, margin=0.1, alpha=32),
                     lambda: pml_losses.ProxyAnchorLoss(6, 8, margin=0.1, alpha=32), "proxies"),
    "normalized_softmax": (lambda: dm.NormalizedSoftmaxLoss(6, 8, temperature=0.1),
                           lambda: pml_losses.NormalizedSoftmaxLoss(6, 8, temperature=0.1), "W"),
    "arcface": (lambda: dm.ArcFaceLoss(6, 8, margin=28.6, scale=16),
                lambda: pml_losses.ArcFaceLoss(6, 8, margin=28.6, scale=16), "W"),
    "soft_triple": (lambda: dm.SoftTripleLoss(6, 8, centers_per_class=3),
                    lambda: pml_losses.SoftTripleLoss(6, 8, centers_per_class=3), "fc"),
}


@pytest.mark.parametrize("name", sorted(PROXY_CASES))
def test_proxy_losses(name: str) -> None:
    make_ours, make_theirs, attr = PROXY_CASES[name]
    _compare(make_ours(), make_theirs(), m_per_class=False,
             param_pairs=lambda o, t: [(o.proxies, getattr(t, attr))])
