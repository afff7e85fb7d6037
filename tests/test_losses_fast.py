"""The lean forward/backward paths (``fast_compute``, analytic backward) against the reference ``compute`` paths."""

from __future__ import annotations

import pytest
import torch

from deepmetric import losses as dm
from deepmetric import miners as dmm
from deepmetric.losses import _fast
from deepmetric.losses.base import MinedPairs, MinedTriplets

SPECS = {
    "ms": lambda: dm.MultiSimilarityLoss(),
    "ms_no_mining": lambda: dm.MultiSimilarityLoss(mining=False),
    "ms_contributing": lambda: dm.MultiSimilarityLoss(reduction="contributing"),
    "ms_no_mining_contributing": lambda: dm.MultiSimilarityLoss(mining=False, reduction="contributing"),
    "ms_large_beta_stable_path": lambda: dm.MultiSimilarityLoss(beta=200.0, mining=False),
    "weight": lambda: dm.WeightLoss(),
    "contrastive": lambda: dm.ContrastiveLoss(),
    "contrastive_similarity": lambda: dm.ContrastiveLoss(form="similarity"),
    "contrastive_similarity_hinge_mean": lambda: dm.ContrastiveLoss(form="similarity", negative_term="hinge",
                                                                     reduction="mean"),
    # avg_nonzero with m⁻ < 0: an active negative with m⁻ < S ≤ 0 has a loss ≤ 0 and is not counted
    "contrastive_similarity_negative_margin": lambda: dm.ContrastiveLoss(form="similarity", neg_margin=-0.2,
                                                                          reduction="avg_nonzero"),
    "contrastive_sum": lambda: dm.ContrastiveLoss(pos_margin=0.3, neg_margin=1.2, reduction="sum"),
    "contrastive_unnormalized": lambda: dm.ContrastiveLoss(normalize_embeddings=False, neg_margin=4.0),
    "triplet": lambda: dm.TripletMarginLoss(0.05),
    "triplet_squared_mean": lambda: dm.TripletMarginLoss(0.2, squared=True, reduction="mean"),
    "triplet_unnormalized": lambda: dm.TripletMarginLoss(0.3, normalize_embeddings=False),
    "proxy_anchor": lambda: dm.ProxyAnchorLoss(6, 8),
    "proxy_nca": lambda: dm.ProxyNCALoss(6, 8),
    "proxy_nca_scale32": lambda: dm.ProxyNCALoss(6, 8, softmax_scale=32.0),
    "normalized_softmax": lambda: dm.NormalizedSoftmaxLoss(6, 8),
    "arcface": lambda: dm.ArcFaceLoss(6, 8),
    "arcface_margin_past_pi": lambda: dm.ArcFaceLoss(6, 8, margin=100.0, scale=8.0),
    "soft_triple": lambda: dm.SoftTripleLoss(6, 8, centers_per_class=3),
    "soft_triple_sharp": lambda: dm.SoftTripleLoss(6, 8, centers_per_class=3, gamma=0.01, margin=0.2),
    "nca": lambda: dm.NCALoss(),
    "nca_scale30": lambda: dm.NCALoss(30.0),
    "nca_unnormalized": lambda: dm.NCALoss(0.5, normalize_embeddings=False),
    "binomial": lambda: dm.BinomialDevianceLoss(),
    "binomial_contributing": lambda: dm.BinomialDevianceLoss(reduction="contributing"),
    "binomial_steep_unbounded_path": lambda: dm.BinomialDevianceLoss(alpha=100.0, margin=0.3),
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


def _assert_fast_matches_reference(loss, x, y, kw, tag) -> None:
    """Value and every gradient (inputs and parameters) of the lean path equal the reference path's."""
    v0, g0 = _value_and_grads(loss, False, x, y, kw)
    v1, g1 = _value_and_grads(loss, True, x, y, kw)
    assert torch.allclose(v0, v1, rtol=1e-9, atol=1e-10), (tag, sorted(kw), v0, v1)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-9), (tag, sorted(kw))


def _batch(seed: int, b: int, r: int, d: int, classes: int):
    """float64 anchors and references with random labels: (x, y, xr, yr, generator)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (b,), generator=g)
    xr = torch.randn(r, d, generator=g, dtype=torch.float64)
    yr = torch.randint(0, classes, (r,), generator=g)
    return x, y, xr, yr, g


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_fast_path_matches_reference(spec: str) -> None:
    x, y, xr, yr, g = _batch(7, 24, 30, 8, 6)
    loss = SPECS[spec]().double()
    assert type(loss).fast
    cases = [{}, {"ref": xr, "ref_labels": yr, "ignore_mask": torch.rand(24, 30, generator=g) < 0.1},
             {"ignore_mask": torch.rand(24, 24, generator=g) < 0.1}]
    if loss.accepts_mined:
        cases += [{"mined": dmm.MultiSimilarityMiner()(x, y)}, {"mined": dmm.BatchHardMiner()(x, y)},
                  {"mined": dmm.SemiHardMiner(seed=0, positives="all")(x, y)}]
    for kw in cases:
        _assert_fast_matches_reference(loss, x, y, kw, spec)


@pytest.mark.parametrize("b", [2, 3, 25, 256, 301])
def test_self_gram_is_the_gram_matrix(b: int) -> None:
    g = torch.Generator().manual_seed(b)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(b, 40, generator=g, dtype=dtype)
        for split_from in (2, _fast.GRAM_SPLIT_MIN_ROWS):
            old = _fast.GRAM_SPLIT_MIN_ROWS
            _fast.GRAM_SPLIT_MIN_ROWS = split_from
            try:
                gram = _fast.self_gram(x)
            finally:
                _fast.GRAM_SPLIT_MIN_ROWS = old
            tol = 1e-5 if dtype == torch.float32 else 1e-12
            assert torch.allclose(gram, x @ x.t(), rtol=tol, atol=tol), (b, dtype, split_from)
            if b >= split_from:  # the off-diagonal blocks mirror each other exactly
                h = b // 2
                assert torch.equal(gram[h:, :h], gram[:h, h:].t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softplus_and_sigmoid_match_torch_to_rounding(dtype: torch.dtype) -> None:
    """log1p through log with the rounding of 1 + eᵃ corrected: relative accuracy near the dtype's epsilon, also
    where eᵃ is below half an ulp of 1 (softplus ≈ eᵃ) and where it is huge (softplus ≈ a)."""
    a = torch.cat([torch.linspace(-79.0, 79.0, 20001, dtype=dtype),
                   torch.tensor([-60.0, -30.0, -17.0, -1e-3, 0.0, 1e-6, 17.0, 60.0], dtype=dtype)])
    sp, sig = _fast.softplus_and_sigmoid(a.clone())
    ref_sp = torch.nn.functional.softplus(a.double(), threshold=1000.0)
    ref_sig = torch.sigmoid(a.double())
    eps = torch.finfo(dtype).eps
    assert ((sp.double() - ref_sp).abs() <= 4 * eps * ref_sp).all()
    assert ((sig.double() - ref_sig).abs() <= 4 * eps * ref_sig).all()


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_fast_path_matches_reference_with_the_split_gram_matrix(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Self comparisons from ``GRAM_SPLIT_MIN_ROWS`` rows on form S from 3/4 of the products: force that path on a
    small batch of odd size (unequal halves), for the losses and for the miners feeding them."""
    monkeypatch.setattr(_fast, "GRAM_SPLIT_MIN_ROWS", 2)
    x, y, _, _, g = _batch(13, 25, 30, 8, 6)
    loss = SPECS[spec]().double()
    cases = [{}, {"ignore_mask": torch.rand(25, 25, generator=g) < 0.1}]
    if loss.accepts_mined:
        cases += [{"mined": dmm.MultiSimilarityMiner()(x, y)}, {"mined": dmm.BatchHardMiner()(x, y)},
                  {"mined": dmm.DistanceWeightedMiner(seed=0)(x, y)}]
    for kw in cases:
        _assert_fast_matches_reference(loss, x, y, kw, spec)


@pytest.mark.parametrize("path", ["compare", "compare_in_blocks", "sort"])
@pytest.mark.parametrize("spec", sorted(s for s in SPECS if s.startswith("triplet")))
def test_all_triplets_by_comparison_and_by_sorting_match_reference(
    spec: str, path: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both ways of summing the hinge over all triplets (positive pairs compared with their anchor's row; rows of
    negatives sorted), forced either way, on few and many positives per anchor, singletons, references, ignored
    and mined pairs."""
    cls = dm.TripletMarginLoss
    monkeypatch.setattr(cls, "_compare_max_positives_per_row", lambda self, r: -1.0 if path == "sort" else 1e9)
    if path == "compare_in_blocks":  # blocks of B rows: several blocks per call
        monkeypatch.setattr(cls, "_COMPARE_BLOCK_ENTRIES", 1)
    for classes in (2, 6, 24):  # ~12, ~4 and ~1 rows per label
        x, y, xr, yr, g = _batch(17 + classes, 24, 30, 8, classes)
        loss = SPECS[spec]().double()
        cases = [{}, {"ref": xr, "ref_labels": yr, "ignore_mask": torch.rand(24, 30, generator=g) < 0.1},
                 {"ignore_mask": torch.rand(24, 24, generator=g) < 0.1},
                 {"mined": dmm.MultiSimilarityMiner()(x, y)}]
        for kw in cases:
            _assert_fast_matches_reference(loss, x, y, kw, f"{spec} {path} {classes}")


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_fast_path_matches_reference_when_rows_lack_positives_or_negatives(spec: str) -> None:
    x, y, xr, yr, _ = _batch(11, 24, 30, 8, 6)
    yr = yr.masked_fill(yr == 5, 4)
    y = y.clone()
    y[0], y[1] = 5, 3  # anchor 0: no positive among the references (none has label 5)
    yr[0] = 3
    ignore = (yr != y[1]).unsqueeze(0) & (torch.arange(24) == 1).unsqueeze(1)  # anchor 1: positives only
    loss = SPECS[spec]().double()
    _assert_fast_matches_reference(loss, x, y, {"ref": xr, "ref_labels": yr, "ignore_mask": ignore}, spec)
    _assert_fast_matches_reference(loss, x, y, {"ref": xr, "ref_labels": yr}, spec + " (no ignore_mask)")


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


@pytest.mark.parametrize("spec", ["proxy_anchor", "proxy_nca", "normalized_softmax", "arcface",
                                  "arcface_margin_past_pi", "soft_triple_sharp"])
def test_proxy_fast_paths_gradcheck(spec: str) -> None:
    """Gradients wrt the embeddings and the proxies; labels cover some classes, not all (absent proxies)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 1, 3, 3, 4, 0])
    loss = SPECS[spec]().double()
    proxies = loss.proxies.detach().clone().requires_grad_(True)

    def value(a: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(loss, {"proxies": p}, (a, y))

    assert torch.autograd.gradcheck(value, (x, proxies))


@pytest.mark.parametrize("spec", ["contrastive", "contrastive_unnormalized", "contrastive_similarity", "ms",
                                  "margin_per_class_nu"])
def test_sparse_backward_matches_reference(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the O(nnz·d) sparse backward (used at large B when ∂L/∂S is sparse) on small batches."""
    from deepmetric.losses import _fast

    monkeypatch.setattr(_fast, "SPARSE_FRACTION", 0.5)
    x, y, xr, yr, _ = _batch(11, 20, 16, 6, 5)
    loss = SPECS[spec]().double()
    for kw in [{}, {"ref": xr, "ref_labels": yr}]:
        _assert_fast_matches_reference(loss, x, y, kw, spec)
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


@pytest.mark.parametrize("spec", sorted(s for s in SPECS if s.startswith("contrastive")))
def test_contrastive_pair_list_path_matches_reference(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pair-list path (positives from the labels, negatives from one threshold pass, sparse ∂L/∂S) is taken
    whenever no mined tuples are given and the pairs are few; here it is forced (no dense label masks at all)."""
    from deepmetric.losses import _fast

    monkeypatch.setattr(_fast, "SPARSE_FRACTION", 1)
    monkeypatch.setattr(_fast, "PAIR_LIST_MIN_GRID", 0)

    def no_masks(*args, **kwargs):
        raise AssertionError("dense masks built")

    x, y, xr, yr, g = _batch(13, 24, 30, 8, 6)
    x[5] = x[4]  # an exact duplicate pair
    loss = SPECS[spec]().double()
    cases = [{}, {"ref": xr, "ref_labels": yr}]
    if loss.reduction != "mean":
        cases.append({"ref": xr, "ref_labels": yr, "ignore_mask": torch.rand(24, 30, generator=g) < 0.2})
    monkeypatch.setattr(_fast, "masks", no_masks)  # the reference path builds its masks elsewhere
    for kw in cases:
        _assert_fast_matches_reference(loss, x, y, kw, spec)


@pytest.mark.parametrize("spec", ["ms_no_mining", "ms_no_mining_contributing", "weight_no_mining",
                                  "lifted_generalized", "lifted_generalized_margins"])
@pytest.mark.parametrize("classes", [6, 2])
def test_positive_pair_list_paths_match_reference(spec: str, classes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """MS without mining and generalized lifted (unit rows) on a large grid take their positive term from the list
    of positive pairs (forced here on a small one, with any number of pairs allowed); with 2 classes the pairs are
    more than B·R/16 and the dense masks are used. Ignored or mined pairs keep the dense path."""
    monkeypatch.setattr(_fast, "PAIR_LIST_MIN_GRID", 0)
    if classes == 6:
        monkeypatch.setattr(_fast, "SPARSE_FRACTION", 1)
    calls = []
    real = _fast.same_label_pairs

    def counted(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(_fast, "same_label_pairs", counted)
    x, y, xr, yr, g = _batch(29, 24, 30, 8, classes)
    x[5] = x[4]  # an exact duplicate pair
    extra = {"weight_no_mining": lambda: dm.WeightLoss(mining=False),
             "lifted_generalized_margins": lambda: dm.LiftedStructureLoss(0.8, 0.2, variant="generalized")}
    loss = extra.get(spec, SPECS.get(spec))().double()
    for kw in [{}, {"ref": xr, "ref_labels": yr}, {"ignore_mask": torch.rand(24, 24, generator=g) < 0.2},
               {"mined": dmm.BatchHardMiner()(x, y)}]:
        calls.clear()
        _assert_fast_matches_reference(loss, x, y, kw, spec)
        dense_only = "ignore_mask" in kw or "mined" in kw
        assert calls == ([] if dense_only else [classes == 6]), (spec, sorted(kw), calls)


def test_same_label_pairs_enumerates_exactly_the_label_mask() -> None:
    from deepmetric.losses import _fast

    g = torch.Generator().manual_seed(2)
    for self_cmp, (b, r) in [(True, (17, 17)), (False, (9, 23))]:
        y = torch.randint(0, 5, (b,), generator=g)
        yr = y if self_cmp else torch.randint(0, 5, (r,), generator=g)
        rows, cols = _fast.same_label_pairs(y, yr, self_cmp, b * r)
        got = torch.zeros(b, r, dtype=torch.bool)
        got[rows, cols] = True
        want = y[:, None] == yr[None, :]
        if self_cmp:
            want.fill_diagonal_(False)
        assert torch.equal(got, want) and rows.shape[0] == int(want.sum())
        assert _fast.same_label_pairs(y, yr, self_cmp, int(want.sum()) - 1) is None


@pytest.mark.parametrize("spec", ["ms", "contrastive", "contrastive_similarity", "triplet", "nca", "npair",
                                  "proxy_anchor", "normalized_softmax", "arcface", "soft_triple"])
def test_lean_paths_compute_in_fp32_under_autocast(spec: str) -> None:
    """Under (CPU bf16) autocast the similarity GEMMs of the lean paths still run in fp32: same value and
    gradient as without autocast (a bf16 GEMM would be off by ~1e-2)."""
    g = torch.Generator().manual_seed(17)
    x = torch.randn(24, 8, generator=g)
    y = torch.randint(0, 6, (24,), generator=g)
    loss = SPECS[spec]()
    cases = [{}]
    if loss.accepts_mined:
        cases += [{"mined": dmm.BatchHardMiner()(x, y)}, {"mined": dmm.MultiSimilarityMiner()(x, y)}]
    for kw in cases:
        v0, g0 = _value_and_grads(loss, True, x, y, kw)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v1, g1 = _value_and_grads(loss, True, x, y, kw)
        assert v1.dtype == torch.float32
        assert torch.allclose(v0, v1, rtol=1e-6, atol=1e-7), (spec, sorted(kw), v0, v1)
        for a, b in zip(g0, g1):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), (spec, sorted(kw))
    if loss.accepts_mined:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mined = dmm.MultiSimilarityMiner()(x, y)
        reference = dmm.MultiSimilarityMiner()(x, y)
        assert torch.equal(mined.positive, reference.positive) and torch.equal(mined.negative, reference.negative)


def test_contrastive_pair_lists_fall_back_to_masks_when_pairs_are_many(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two classes in the batch: half of all pairs are positives, more than the sparse budget B·R/16, so the
    dense mask path runs (and gives the reference result)."""
    from deepmetric.losses import _fast

    monkeypatch.setattr(_fast, "PAIR_LIST_MIN_GRID", 0)
    calls = []
    real_masks = _fast.float_pair_masks

    def counting_masks(*args, **kwargs):
        calls.append(1)
        return real_masks(*args, **kwargs)

    monkeypatch.setattr(_fast, "float_pair_masks", counting_masks)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(32, 8, generator=g, dtype=torch.float64)
    y = torch.arange(32) % 2
    loss = dm.ContrastiveLoss().double()
    _assert_fast_matches_reference(loss, x, y, {}, "two classes")
    assert calls, "the mask path should have run"


def test_npair_with_the_batch_passed_as_its_own_reference() -> None:
    """loss(x, y, x, y): no self-pair removal, so an anchor may be its own positive; its two gradient blocks
    land on the same row and must add up (reference path vs lean path)."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(12, 6, generator=g, dtype=torch.float64)
    y = torch.arange(12) % 4
    loss = dm.NPairLoss()
    out = []
    for fast in (False, True):
        loss.fast = fast
        xs = x.clone().requires_grad_(True)
        v = loss(xs, y, xs, y)
        (gx,) = torch.autograd.grad(v, xs)
        out.append((v.detach(), gx))
    assert torch.allclose(out[0][0], out[1][0], rtol=1e-9)
    assert torch.allclose(out[0][1], out[1][1], rtol=1e-7, atol=1e-9)


def _triplet_value_and_grad(loss, x, y, mined, fast: bool, **kw):
    loss.fast = fast
    xs = x.detach().clone().requires_grad_(True) if not fast else x
    v = loss(xs, y, mined=mined, **kw)
    (g,) = torch.autograd.grad(v, xs)
    return v.detach(), g


@pytest.mark.parametrize("miner", ["batch_hard", "semi_hard_random", "semi_hard_all"])
@pytest.mark.parametrize("squared", [False, True])
def test_triplet_loss_on_the_miners_own_inputs_reuses_its_normalisation(miner: str, squared: bool) -> None:
    """A built-in miner's triplets on the very tensors it mined: the loss takes the miner's normalisation and
    the triplets as valid (no re-validation); value and gradient equal the reference path's."""
    make = {"batch_hard": lambda: dmm.BatchHardMiner(),
            "semi_hard_random": lambda: dmm.SemiHardMiner(seed=0),
            "semi_hard_all": lambda: dmm.SemiHardMiner(seed=0, positives="all")}[miner]
    x, y, xr, yr, g = _batch(3, 24, 30, 8, 6)
    y[0] = 99  # an anchor without positives: not every row is an anchor
    if miner == "semi_hard_all":
        # one class of 3 (6 pairs), 3 singletons, 9 classes of 2: 24 anchor entries for 24 rows, not 0..23
        y = torch.tensor([0, 0, 0, 97, 98, 99] + [1 + i // 2 for i in range(18)])
        assert int(((y[:, None] == y[None]).sum(1) - 1).sum()) == 24
    ignore = torch.rand(24, 30, generator=g) < 0.1
    loss = dm.TripletMarginLoss(0.3, squared=squared).double()
    for kw in ({}, {"ignore_mask": ignore[:, :24]}, {"ref_embeddings": xr, "ref_labels": yr, "ignore_mask": ignore}):
        xs = x.clone().requires_grad_(True)
        mined = make()(xs, y, kw.get("ref_embeddings"), kw.get("ref_labels"), kw.get("ignore_mask"))
        ref_e = kw.get("ref_embeddings", xs)
        source = mined._source
        assert source is not None
        assert source.state_for(xs, ref_e, y, kw.get("ref_labels", y), kw.get("ignore_mask"), "ref_labels" not in kw,
                                True) is not None
        v1, g1 = _triplet_value_and_grad(loss, xs, y, mined, True, **kw)
        plain = MinedTriplets(mined.anchor, mined.positive, mined.negative)
        v0, g0 = _triplet_value_and_grad(loss, x, y, plain, False, **kw)
        assert torch.allclose(v0, v1, rtol=1e-9, atol=1e-12) and torch.allclose(g0, g1, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("miner", ["batch_hard", "semi_hard_all", "distance_weighted", "distance_weighted_all"])
@pytest.mark.parametrize("per_class", [False, True])
def test_margin_loss_on_the_miners_own_inputs_reuses_its_normalisation(miner: str, per_class: bool) -> None:
    """Margin loss on mined triplets (the paper's distance-weighted setting): O(T) gathers on the miner's
    normalisation; value and gradients wrt the embeddings and β equal the reference path's on the same triplets."""
    make = {"batch_hard": lambda: dmm.BatchHardMiner(),
            "semi_hard_all": lambda: dmm.SemiHardMiner(seed=0, positives="all"),
            "distance_weighted": lambda: dmm.DistanceWeightedMiner(seed=0),
            "distance_weighted_all": lambda: dmm.DistanceWeightedMiner(1.0, 1.2, seed=0, positives="all")}[miner]
    x, y, xr, yr, g = _batch(5, 24, 30, 8, 6)
    y[0] = 7  # an anchor without positives
    ignore = torch.rand(24, 30, generator=g) < 0.1
    for kw in ({}, {"ignore_mask": ignore[:, :24]}, {"ref_embeddings": xr, "ref_labels": yr, "ignore_mask": ignore}):
        xs = x.clone().requires_grad_(True)
        mined = make()(xs, y, kw.get("ref_embeddings"), kw.get("ref_labels"), kw.get("ignore_mask"))
        assert mined._source is not None and mined._source.state_for(
            xs, kw.get("ref_embeddings", xs), y, kw.get("ref_labels", y), kw.get("ignore_mask"),
            "ref_labels" not in kw, True) is not None
        plain = MinedTriplets(mined.anchor, mined.positive, mined.negative)
        shift = torch.rand(8 if per_class else 1, generator=g, dtype=torch.float64) * 0.4 - 0.2  # β 1.0–1.4
        results = []
        for fast, tuples in ((True, mined), (False, plain)):
            loss = dm.MarginLoss(0.2, 0.1, num_classes=8 if per_class else None).double()
            with torch.no_grad():
                loss.beta.add_(shift)
            loss.fast = fast
            xi = xs if fast else x.clone().requires_grad_(True)
            v = loss(xi, y, mined=tuples, **kw)
            results.append((v.detach(), *torch.autograd.grad(v, [xi, loss.beta])))
        (v1, gx1, gb1), (v0, gx0, gb0) = results
        assert torch.allclose(v0, v1, rtol=1e-9, atol=1e-12), (miner, sorted(kw))
        assert torch.allclose(gx0, gx1, rtol=1e-7, atol=1e-10) and torch.allclose(gb0, gb1, rtol=1e-7, atol=1e-10)


def test_triplet_loss_does_not_reuse_a_miners_work_on_changed_or_other_inputs() -> None:
    """Embeddings or labels changed in place after mining, other labels, another normalisation: the loss
    normalises and validates again (a stale normalisation or an invalid triplet would change the result)."""
    x, y, _, _, g = _batch(5, 20, 20, 8, 5)
    loss = dm.TripletMarginLoss(0.3).double()

    def check(xs, labels, mined, loss=loss):
        v1, g1 = _triplet_value_and_grad(loss, xs, labels, mined, True)
        plain = MinedTriplets(mined.anchor, mined.positive, mined.negative)
        v0, g0 = _triplet_value_and_grad(loss, xs, labels, plain, False)
        assert torch.allclose(v0, v1, rtol=1e-9, atol=1e-12) and torch.allclose(g0, g1, rtol=1e-7, atol=1e-10)

    xs = x.clone().requires_grad_(True)
    mined = dmm.BatchHardMiner()(xs, y)
    with torch.no_grad():
        xs.add_(torch.randn(20, 8, generator=g, dtype=torch.float64))  # new directions, same tensor object
    assert mined._source.state_for(xs, xs, y, y, None, True, True) is None
    check(xs, y, mined)

    labels = y.clone()
    xs = x.clone().requires_grad_(True)
    mined = dmm.BatchHardMiner()(xs, labels)
    labels[mined.anchor[0]] = 99  # its triplet is no longer valid
    assert mined._source.state_for(xs, xs, labels, labels, None, True, True) is None
    check(xs, labels, mined)

    mined = dmm.BatchHardMiner()(xs, y)
    other = y.clone()  # equal values, another tensor: used, but validated again
    assert mined._source.state_for(xs, xs, other, other, None, True, True) is None
    check(xs, other, mined)
    check(xs, y, mined, dm.TripletMarginLoss(0.3, normalize_embeddings=False).double())


def test_float_pair_masks_are_the_bool_masks_for_any_labels() -> None:
    """The 0/1 masks built by arithmetic on the labels equal the bool masks: negative and int32 labels, labels
    float32 cannot hold (2²⁴ and 2²⁴ + 1 round to one float), with references, an ignore_mask and mined pairs."""
    from deepmetric.losses import _fast

    g = torch.Generator().manual_seed(7)
    base = torch.randint(0, 4, (12,), generator=g)
    ref_base = torch.randint(0, 4, (9,), generator=g)
    ignore = torch.rand(12, 9, generator=g) < 0.2
    x = torch.randn(12, 5, generator=g)
    mined = dmm.MultiSimilarityMiner(0.5)(x, base)
    for shift, dtype in ((0, torch.float32), (-3, torch.float32), (1 << 24, torch.float32), (1 << 40, torch.float64),
                         (1 << 60, torch.float64)):
        labels, ref_labels = base + shift, ref_base + shift
        for lab in (labels, labels.int()) if abs(shift) < 1 << 30 else (labels,):
            pos, neg = _fast.float_pair_masks(lab, lab, None, True, dtype)
            bpos, bneg = _fast.masks(lab, lab, None, True)
            assert pos.dtype == dtype and torch.equal(pos.bool(), bpos) and torch.equal(neg.bool(), bneg), shift
            pos, neg = _fast.float_pair_masks(lab, ref_labels, ignore, False, dtype)
            bpos, bneg = _fast.masks(lab, ref_labels, ignore, False)
            assert torch.equal(pos.bool(), bpos) and torch.equal(neg.bool(), bneg), shift
            pos, neg = _fast.float_pair_masks(lab, lab, None, True, dtype, mined)
            bpos, bneg = _fast.masks(lab, lab, None, True, mined)
            assert torch.equal(pos.bool(), bpos) and torch.equal(neg.bool(), bneg), shift


def _pair_value_and_grad(loss, x, y, mined, fast: bool, **kw):
    loss.fast = fast
    v = loss(x, y, mined=mined, **kw)
    (g,) = torch.autograd.grad(v, x)
    return v.detach(), g


@pytest.mark.parametrize("spec", ["contrastive", "contrastive_similarity", "contrastive_similarity_hinge_mean",
                                  "contrastive_sum"])
def test_contrastive_on_the_ms_miners_own_pairs_reuses_its_similarity(spec: str) -> None:
    """MS-mined pairs on the very tensors mined on: the loss takes the miner's normalisation, similarity matrix
    and masks (reuse asserted), leaves the shared similarity untouched, and equals the reference path."""
    x, y, xr, yr, g = _batch(13, 24, 30, 8, 5)
    ignore = torch.rand(24, 30, generator=g) < 0.1
    loss = SPECS[spec]().double()
    for kw in ({}, {"ignore_mask": ignore[:, :24]}, {"ref_embeddings": xr, "ref_labels": yr, "ignore_mask": ignore}):
        xs = x.clone().requires_grad_(True)
        mined = dmm.MultiSimilarityMiner(0.3)(xs, y, kw.get("ref_embeddings"), kw.get("ref_labels"),
                                              kw.get("ignore_mask"))
        source = mined._source
        assert source is not None and source.similarity is not None
        assert source.state_for(xs, kw.get("ref_embeddings", xs), y, kw.get("ref_labels", y), kw.get("ignore_mask"),
                                "ref_labels" not in kw, True, mined.tensors()) is not None
        shared = source.similarity.clone()
        v1, g1 = _pair_value_and_grad(loss, xs, y, mined, True, **kw)
        assert torch.equal(source.similarity, shared)
        plain = MinedPairs(mined.positive, mined.negative)
        v0, g0 = _pair_value_and_grad(loss, xs, y, plain, False, **kw)
        assert torch.allclose(v0, v1, rtol=1e-9, atol=1e-12) and torch.allclose(g0, g1, rtol=1e-7, atol=1e-10)


def test_contrastive_does_not_reuse_ms_pairs_changed_after_mining() -> None:
    """Mined masks changed in place (an invalid pair added), a copy of the masks under the same source, or
    embeddings changed in place: the miner's work is not reused and invalid pairs are dropped as usual."""
    x, y, _, _, g = _batch(17, 20, 20, 8, 4)
    loss = dm.ContrastiveLoss(neg_margin=1.6).double()

    def check(xs, mined):
        v1, g1 = _pair_value_and_grad(loss, xs, y, mined, True)
        v0, g0 = _pair_value_and_grad(loss, xs, y, MinedPairs(mined.positive, mined.negative), False)
        assert torch.allclose(v0, v1, rtol=1e-9, atol=1e-12) and torch.allclose(g0, g1, rtol=1e-7, atol=1e-10)

    xs = x.clone().requires_grad_(True)
    mined = dmm.MultiSimilarityMiner(1.0)(xs, y)
    other = int((y != y[0]).nonzero()[0])
    mined.positive[0, other] = True  # a different-label "positive"
    mined.positive[1, 1] = True  # a self-pair
    assert mined._source.state_for(xs, xs, y, y, None, True, True, mined.tensors()) is None
    check(xs, mined)

    mined = dmm.MultiSimilarityMiner(1.0)(xs, y)
    copy = MinedPairs(mined.positive.clone(), mined.negative, _source=mined._source)
    assert mined._source.state_for(xs, xs, y, y, None, True, True, copy.tensors()) is None
    check(xs, copy)

    mined = dmm.MultiSimilarityMiner(1.0)(xs, y)
    with torch.no_grad():
        xs.add_(torch.randn(20, 8, generator=g, dtype=torch.float64))
    assert mined._source.state_for(xs, xs, y, y, None, True, True, mined.tensors()) is None
    check(xs, mined)
