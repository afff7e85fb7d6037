"""Miners: §9 distance-weighted probabilities, PML parity, semantics, determinism, usability by every loss."""

from __future__ import annotations

import copy

import pytest
import pytorch_metric_learning.losses as pml_losses
import pytorch_metric_learning.miners as pml_miners
import torch

from deepmetric import losses as dm
from deepmetric.miners import (
    MINERS,
    BatchHardMiner,
    DistanceWeightedMiner,
    MinedPairs,
    MinedTriplets,
    MultiSimilarityMiner,
    SemiHardMiner,
    distance_weighted_probabilities,
)

DIST = torch.tensor([[0.0, 0.3, 0.8, 1.2, 1.6, 1.9]], dtype=torch.float64)
LAB = torch.tensor([0, 0, 1, 1, 1, 2])
NEG = (LAB != 0).unsqueeze(0)


@pytest.mark.parametrize(
    ("dim", "upper", "expected"),
    [
        (8, None, [0, 0, 0.397272, 0.068832, 0.051624, 0.482273]),
        (8, 1.4, [0, 0, 0.852325, 0.147675, 0, 0]),
        (16, None, [0, 0, 0.130856, 0.002625, 0.001969, 0.864549]),
        (16, 1.4, [0, 0, 0.980333, 0.019667, 0, 0]),
        (128, None, [0, 0, 0, 0, 0, 1]),
        (128, 1.4, [0, 0, 1, 0, 0, 0]),
    ],
)
def test_distance_weighted_probabilities_section9(dim: int, upper: float | None, expected: list[float]) -> None:
    probs = distance_weighted_probabilities(DIST, NEG, dim, cutoff=0.5, nonzero_loss_cutoff=upper)
    assert torch.allclose(probs[0], torch.tensor(expected, dtype=torch.float64), atol=1e-6)


def test_distance_weighted_uniform_fallback() -> None:
    probs = distance_weighted_probabilities(DIST, NEG, 8, nonzero_loss_cutoff=0.1)  # every negative cut off
    assert torch.allclose(probs[0], torch.tensor([0, 0, 0.25, 0.25, 0.25, 0.25], dtype=torch.float64))


def _batch(seed: int, b: int = 16, n_classes: int = 4, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(b // n_classes)
    return torch.randn(b, d, generator=g, dtype=torch.float64), labels[torch.randperm(b, generator=g)]


def test_distance_weighted_sampling_frequencies_follow_probabilities() -> None:
    emb, labels = _batch(0, b=8, n_classes=2, d=3)
    miner = DistanceWeightedMiner(seed=0)
    d = torch.cdist(torch.nn.functional.normalize(emb), torch.nn.functional.normalize(emb))
    probs = distance_weighted_probabilities(d, labels.unsqueeze(1) != labels.unsqueeze(0), 3)
    counts = torch.zeros_like(probs)
    for _ in range(400):
        t = miner(emb, labels)
        counts[t.anchor, t.negative] += 1
    assert torch.allclose(counts / counts.sum(1, keepdim=True), probs, atol=0.1)


@pytest.mark.parametrize("seed", range(10))
def test_ms_miner_matches_pml_and_feeds_the_loss(seed: int) -> None:
    emb, labels = _batch(seed)
    ours = MultiSimilarityMiner(0.1)(emb, labels)
    a1, p, a2, n = pml_miners.MultiSimilarityMiner(0.1)(emb, labels)
    pos = torch.zeros_like(ours.positive)
    neg = torch.zeros_like(ours.negative)
    pos[a1, p] = True
    neg[a2, n] = True
    assert torch.equal(pos, ours.positive) and torch.equal(neg, ours.negative)
    x1, x2 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    v1 = dm.MultiSimilarityLoss(2, 50, 0.5, mining=False)(x1, labels, mined=ours)
    v2 = pml_losses.MultiSimilarityLoss(2, 50, 0.5)(x2, labels, (a1, p, a2, n))
    v1.backward()
    v2.backward()
    assert torch.allclose(v1, v2, atol=1e-6) and torch.allclose(x1.grad, x2.grad, atol=1e-6)


@pytest.mark.parametrize("seed", range(10))
def test_batch_hard_matches_pml(seed: int) -> None:
    emb, labels = _batch(seed)
    ours = BatchHardMiner()(emb, labels)
    a, p, n = pml_miners.BatchHardMiner()(emb, labels)
    order = torch.argsort(a)
    assert torch.equal(ours.anchor, a[order]) and torch.equal(ours.positive, p[order])
    assert torch.equal(ours.negative, n[order])


@pytest.mark.parametrize("normalize", [True, False])
def test_batch_hard_matches_brute_force(normalize: bool) -> None:
    emb, labels = _batch(5, b=30, n_classes=6)
    emb = emb.double()
    labels = labels.clone()
    labels[0] = 99  # an anchor without positives is left out
    x = torch.nn.functional.normalize(emb) if normalize else emb
    d = torch.cdist(x, x)
    same = labels[:, None] == labels[None]
    pos = same & ~torch.eye(30, dtype=torch.bool)
    ours = BatchHardMiner(normalize_embeddings=normalize)(emb, labels)
    keep = pos.any(1) & (~same).any(1)
    anchors = torch.nonzero(keep).squeeze(1)
    assert torch.equal(ours.anchor, anchors)
    assert torch.equal(ours.positive, d.masked_fill(~pos, -1.0).argmax(1)[anchors])
    assert torch.equal(ours.negative, d.masked_fill(same, float("inf")).argmin(1)[anchors])


@pytest.mark.parametrize("positives", ["random", "all"])
def test_semi_hard_triplets_are_semi_hard_when_possible(positives: str) -> None:
    emb, labels = _batch(3, b=24, n_classes=4)
    margin = 0.5
    t = SemiHardMiner(margin, squared=True, positives=positives, seed=1)(emb, labels)
    x = torch.nn.functional.normalize(emb)
    d = torch.cdist(x, x) ** 2
    neg = labels.unsqueeze(1) != labels.unsqueeze(0)
    assert len(t) == (24 if positives == "random" else int(((labels.unsqueeze(1) == labels) & ~torch.eye(24, dtype=torch.bool)).sum()))
    assert bool((labels[t.anchor] == labels[t.positive]).all()) and bool((t.anchor != t.positive).all())
    assert bool((labels[t.anchor] != labels[t.negative]).all())
    d_ap, d_an = d[t.anchor, t.positive], d[t.anchor, t.negative]
    semi_exists = ((d[t.anchor] > d_ap.unsqueeze(1)) & (d[t.anchor] < d_ap.unsqueeze(1) + margin) & neg[t.anchor]).any(1)
    chosen_semi = (d_an > d_ap) & (d_an < d_ap + margin)
    assert bool(semi_exists.any())
    assert torch.equal(chosen_semi, semi_exists)


@pytest.mark.parametrize("name", ["semi_hard", "distance_weighted"])
def test_sampling_miners_are_seeded_and_deterministic(name: str) -> None:
    emb, labels = _batch(5, b=32, n_classes=8)
    a = MINERS[name](seed=7)(emb, labels)
    b = MINERS[name](seed=7)(emb, labels)
    c = MINERS[name](seed=8)(emb, labels)
    assert torch.equal(a.negative, b.negative) and torch.equal(a.positive, b.positive)
    assert not (torch.equal(a.negative, c.negative) and torch.equal(a.positive, c.positive))


@pytest.mark.parametrize("name", sorted(MINERS))
def test_miners_respect_self_and_ignore_mask(name: str) -> None:
    emb, labels = _batch(1)
    ignore = torch.zeros(16, 16, dtype=torch.bool)
    ignore[:, :4] = True  # e.g. the anchor's own synthetic copies or memory slots
    out = MINERS[name]()(emb, labels, emb, labels, ignore_mask=ignore | torch.eye(16, dtype=torch.bool))
    pos, neg = out.to_masks((16, 16))
    assert not bool((pos | neg)[:, :4].any()) and not bool(pos.diagonal().any())
    assert bool(pos.any()) and bool(neg.any())


@pytest.mark.parametrize("miner", sorted(MINERS))
@pytest.mark.parametrize("loss", ["contrastive", "triplet_margin", "margin", "multi_similarity", "lifted_structure",
                                  "binomial_deviance", "nca", "npair", "weight"])
def test_every_pair_or_triplet_loss_accepts_every_miner(miner: str, loss: str) -> None:
    emb, labels = _batch(2)
    mined = MINERS[miner](seed=0)(emb, labels)
    assert isinstance(mined, (MinedPairs, MinedTriplets))
    x = emb.clone().requires_grad_()
    value = dm.LOSSES[loss]()(x, labels, mined=mined)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()


def test_miner_with_reference_set() -> None:
    emb, labels = _batch(4)
    ref, ref_labels = _batch(5, b=40, n_classes=4)
    t = DistanceWeightedMiner(seed=0)(emb, labels, ref, ref_labels)
    assert len(t) == 16 and bool((ref_labels[t.negative] != labels[t.anchor]).all())
    assert bool((ref_labels[t.positive] == labels[t.anchor]).all())


@pytest.mark.parametrize("name", ["semi_hard", "distance_weighted"])
def test_sampling_miner_resumes_bit_exactly_from_its_state_dict(name: str) -> None:
    emb, labels = _batch(6, b=32, n_classes=8)
    miner = MINERS[name](seed=3)
    for _ in range(3):
        miner(emb, labels)
    state = copy.deepcopy(miner.state_dict())
    assert any(key.startswith("rng.") for key in state)  # the random stream is module state
    expected = [miner(emb, labels) for _ in range(4)]
    # successive steps draw different tuples, so equality below is not trivial
    assert not torch.equal(expected[0].negative, expected[1].negative)
    resumed = MINERS[name](seed=99)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed(emb, labels)
        assert all(torch.equal(a, b) for a, b in zip(got.tensors(), want.tensors()))


def test_miners_declare_no_build_arguments() -> None:
    assert all(cls.build_arguments == () for cls in MINERS.values())
