"""The lean forward/backward paths (``fast_compute``, analytic backward) against the reference ``compute`` paths."""

from __future__ import annotations

import pytest
import torch

from deepmetric import losses as dm
from deepmetric import miners as dmm

SPECS = {
    "ms": lambda: dm.MultiSimilarityLoss(),
    "ms_no_mining": lambda: dm.MultiSimilarityLoss(mining=False),
    "ms_contributing": lambda: dm.MultiSimilarityLoss(reduction="contributing"),
    "ms_large_beta_stable_path": lambda: dm.MultiSimilarityLoss(beta=200.0, mining=False),
    "weight": lambda: dm.WeightLoss(),
    "contrastive": lambda: dm.ContrastiveLoss(),
    "contrastive_similarity": lambda: dm.ContrastiveLoss(form="similarity"),
    "contrastive_similarity_hinge_mean": lambda: dm.ContrastiveLoss(form="similarity", negative_term="hinge",
                                                                     reduction="mean"),
    "contrastive_sum": lambda: dm.ContrastiveLoss(pos_margin=0.3, neg_margin=1.2, reduction="sum"),
    "contrastive_unnormalized": lambda: dm.ContrastiveLoss(normalize_embeddings=False, neg_margin=4.0),
    "triplet": lambda: dm.TripletMarginLoss(0.05),
    "triplet_squared_mean": lambda: dm.TripletMarginLoss(0.2, squared=True, reduction="mean"),
    "triplet_unnormalized": lambda: dm.TripletMarginLoss(0.3, normalize_embeddings=False),
    "proxy_anchor": lambda: dm.ProxyAnchorLoss(6, 8),
    "nca": lambda: dm.NCALoss(),
    "nca_scale30": lambda: dm.NCALoss(30.0),
    "nca_unnormalized": lambda: dm.NCALoss(0.5, normalize_embeddings=False),
    "binomial": lambda: dm.BinomialDevianceLoss(),
    "binomial_contributing": lambda: dm.BinomialDevianceLoss(reduction="contributing"),
    "lifted_original": lambda: dm.LiftedStructureLoss(),
    "lifted_original_unnormalized": lambda: dm.LiftedStructureLoss(0.5, 0.1, normalize_embeddings=False),
    "lifted_generalized": lambda: dm.LiftedStructureLoss(variant="generalized"),
    "lifted_generalized_das": lambda: dm.LiftedStructureLoss(
        variant="generalized", normalize_embeddings=False, l2_weight=0.005, reduction="contributing"),
    "lifted_modified": lambda: dm.LiftedStructureLoss(variant="modified"),
    "lifted_modified_mining": lambda: dm.LiftedStructureLoss(variant="modified", mining=True,
                                                             reduction="contributing"),
    "margin": lambda: dm.MarginLoss(),
    "margin_per_class_nu": lambda: dm.MarginLoss(0.3, 0.1, num_classes=6),
    "margin_fixed_beta_unnormalized": lambda: dm.MarginLoss(nu=0.2, beta=2.0, learn_beta=False,
                                                            normalize_embeddings=False),
    "npair": lambda: dm.NPairLoss(),
}


def _value_and_grads(loss, fast: bool, x, y, kw):
    loss.fast = fast
    xs = x.clone().requires_grad_(True)
    kw = dict(kw)
    r = kw.pop("ref", None)
    if r is not None:
        r = r.clone().requires_grad_(True)
        v = loss(xs, y, r, kw.pop("ref_labels"), **kw)
    else:
        v = loss(xs, y, **kw)
    inputs = [xs] + ([r] if r is not None else []) + [p for p in loss.parameters()]
    grads = torch.autograd.grad(v, inputs, allow_unused=True)
    return v.detach(), [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, grads)]


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_fast_path_matches_reference(spec: str) -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(24, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (24,), generator=g)
    xr = torch.randn(30, 8, generator=g, dtype=torch.float64)
    yr = torch.randint(0, 6, (30,), generator=g)
    loss = SPECS[spec]().double()
    assert type(loss).fast
    cases = [{}, {"ref": xr, "ref_labels": yr, "ignore_mask": torch.rand(24, 30, generator=g) < 0.1},
             {"ignore_mask": torch.rand(24, 24, generator=g) < 0.1}]
    if loss.accepts_mined:
        cases += [{"mined": dmm.MultiSimilarityMiner()(x, y)}, {"mined": dmm.BatchHardMiner()(x, y)},
                  {"mined": dmm.SemiHardMiner(seed=0, positives="all")(x, y)}]
    for kw in cases:
        v0, g0 = _value_and_grads(loss, False, x, y, kw)
        v1, g1 = _value_and_grads(loss, True, x, y, kw)
        assert torch.allclose(v0, v1, rtol=1e-9, atol=1e-10), (spec, sorted(kw), v0, v1)
        for a, b in zip(g0, g1):
            assert torch.allclose(a, b, rtol=1e-7, atol=1e-9), (spec, sorted(kw))


def test_fast_path_backward_can_run_twice_and_under_no_grad() -> None:
    x = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    y = torch.arange(12) // 3
    for loss in (dm.MultiSimilarityLoss(), dm.TripletMarginLoss(), dm.ContrastiveLoss()):
        v = loss(x, y)
        (g1,) = torch.autograd.grad(v, x, retain_graph=True)
        (g2,) = torch.autograd.grad(v, x)
        assert torch.equal(g1, g2)
        with torch.no_grad():
            assert torch.allclose(loss(x, y), v.detach())
    bh = dmm.BatchHardMiner()(x, y)
    v = dm.TripletMarginLoss()(x, y, mined=bh)
    (g1,) = torch.autograd.grad(v, x, retain_graph=True)
    (g2,) = torch.autograd.grad(v, x)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("spec", ["nca", "nca_unnormalized", "binomial", "lifted_original", "lifted_generalized_das",
                                  "lifted_modified_mining", "margin_per_class_nu"])
def test_new_fast_paths_gradcheck(spec: str) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 4, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y, yr = torch.arange(10) % 3, torch.arange(7) % 3
    loss = SPECS[spec]().double()
    assert torch.autograd.gradcheck(lambda a: loss(a, y), (x,))
    assert torch.autograd.gradcheck(lambda a, b: loss(a, y, b, yr), (x, r))


@pytest.mark.parametrize("spec", ["contrastive", "contrastive_unnormalized", "contrastive_similarity", "ms",
                                  "margin_per_class_nu"])
def test_sparse_backward_matches_reference(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the O(nnz·d) sparse backward (used at large B when ∂L/∂S is sparse) on small batches."""
    from deepmetric.losses import _fast

    monkeypatch.setattr(_fast, "SPARSE_FRACTION", 0.5)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(20, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (20,), generator=g)
    xr = torch.randn(16, 6, generator=g, dtype=torch.float64)
    yr = torch.randint(0, 5, (16,), generator=g)
    loss = SPECS[spec]().double()
    for kw in [{}, {"ref": xr, "ref_labels": yr}]:
        v0, g0 = _value_and_grads(loss, False, x, y, kw)
        v1, g1 = _value_and_grads(loss, True, x, y, kw)
        assert torch.allclose(v0, v1, rtol=1e-9, atol=1e-10)
        for a, b in zip(g0, g1):
            assert torch.allclose(a, b, rtol=1e-7, atol=1e-9), spec
    xx = x[:10].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: loss(z, y[:10]), (xx,))


def test_lean_path_leaves_no_reference_cycle_behind():
    """The lean autograd Function must not keep its B×R state alive through a loss → node → state → loss cycle
    (that held ~155 MB per step under cross-batch memory until the garbage collector happened to run)."""
    import gc
    import weakref

    from deepmetric.losses import ContrastiveLoss, MultiSimilarityLoss

    for loss_fn in (MultiSimilarityLoss(), ContrastiveLoss()):
        x = torch.randn(16, 8, requires_grad=True)
        labels = torch.arange(4).repeat_interleave(4)
        gc.collect()
        gc.disable()
        try:
            loss = loss_fn(x, labels)
            ref = weakref.ref(loss)
            loss.backward()
            del loss
            assert ref() is None, type(loss_fn).__name__
        finally:
            gc.enable()
