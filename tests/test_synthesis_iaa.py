"""IAA: estimator, neighbor correction, synthesis (paper vs legacy), λ schedule, loss integration (methods.md §5, §9)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from deepmetric.functional import l2_normalize
from deepmetric.loss_hooks import StepContext
from deepmetric.losses import ContrastiveLoss, MultiSimilarityLoss
from deepmetric.synthesis import (
    IAA,
    ClassGaussianEstimator,
    IAASynthesizer,
    iaa_lambda,
    iaa_synthesize,
    neighbor_corrected_variances,
    neighbor_weight,
    own_copy_ignore_mask,
)

ATOL = 1e-6


class RecordingLoss(nn.Module):
    """Stores what the wrapper passed and returns a differentiable scalar."""

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None, *, ignore_mask=None):
        self.args = (embeddings, labels, ref_embeddings, ref_labels, ignore_mask)
        ref = embeddings if ref_embeddings is None else ref_embeddings
        return (embeddings @ ref.t()).sum()


def _circle_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ang = torch.tensor([0, 50, 20, 80, 140, 170], dtype=torch.float64) * math.pi / 180
    return torch.stack([ang.cos(), ang.sin()], 1), torch.tensor([0, 0, 1, 1, 2, 2])


def _at_epoch(iaa: IAA, z: torch.Tensor, y: torch.Tensor, epoch: int) -> tuple[torch.Tensor, dict]:
    """A trainer-style call in 0-based ``epoch``: the step context first, then the loss; returns (loss, logs)."""
    iaa.on_step_start(StepContext(step=1, epoch=epoch))
    return iaa(z, y), iaa.last_logs


def _initialized_iaa(loss: nn.Module, **kw) -> IAA:
    torch.manual_seed(0)
    kw = {"num_classes": 3, "embedding_size": 2, "start_epoch": 0, **kw}
    iaa = IAA(loss, **kw).double()
    z = torch.randn(30, 2, dtype=torch.float64)
    y = torch.arange(30) % 3
    iaa.estimator.update(z, y)
    return iaa


# --------------------------------------------------------------------------------------- §9 vectors ----------
def test_lambda_schedule_section9():
    epochs = [31, 40, 41, 60, 61, 80, 81, 100]
    expected = [0.8, 0.8, 0.72, 0.72, 0.6, 0.6, 0.48, 0.48]
    assert [iaa_lambda(0.8, e, 100) for e in epochs] == pytest.approx(expected, abs=1e-12)
    # the wrapper takes the trainer's 0-based epoch: code epoch = epoch + 1
    iaa = IAA(RecordingLoss(), num_classes=3, embedding_size=2, lam=0.8, total_epochs=100, lambda_schedule=True)
    assert [iaa.lambda_at(e - 1) for e in epochs] == pytest.approx(expected, abs=1e-12)
    assert IAA(RecordingLoss(), num_classes=3, embedding_size=2, lam=0.8, lambda_schedule=False).lambda_at(99) == 0.8


def test_synthesis_paper_vs_legacy_section9():
    z = torch.tensor([[0.3, -0.1, 0.2]], dtype=torch.float64)
    var = torch.tensor([[0.0016, 0.0004, 0.01]], dtype=torch.float64)
    eps = torch.tensor([1.0, -0.5, 0.2], dtype=torch.float64).expand(3, 1, 3)
    paper = iaa_synthesize(z, var, 0.8, 3, noise=eps)
    for m in range(3):
        torch.testing.assert_close(paper[m], torch.tensor([0.335777, -0.108944, 0.217889], dtype=torch.float64),
                                   atol=ATOL, rtol=0)
    legacy = iaa_synthesize(z, var, 0.8, 3, noise=eps, legacy_cumulative_sqrt=True)
    expected = torch.tensor([[0.335777, -0.108944, 0.217889], [0.478885, -0.163246, 0.256569],
                             [0.700000, -0.268179, 0.300595]], dtype=torch.float64)
    torch.testing.assert_close(legacy, expected, atol=ATOL, rtol=0)


def test_neighbor_weight_section9():
    a = neighbor_weight(torch.tensor([1, 2, 5, 10, 39, 40]), beta=0.1, tau=40)
    torch.testing.assert_close(a, torch.tensor([1.0, 0.912983, 0.748239, 0.609068, 0.389315, 0.0]), atol=ATOL, rtol=0)
    # edge: the code's n < τ (paper: n ≤ τ); no estimate (n = 0) ⇒ no correction
    assert neighbor_weight(torch.tensor([0, 41]))[0] == 0 and neighbor_weight(torch.tensor([0, 41]))[1] == 0


def _one_class_batch(mean: float, var: float, n: int = 10) -> torch.Tensor:
    # n values mean ± √var alternately: batch mean = mean, biased variance = var (per dimension)
    signs = torch.tensor([1.0, -1.0] * (n // 2), dtype=torch.float64)
    return (mean + math.sqrt(var) * signs).unsqueeze(1).repeat(1, 2)


def test_running_estimator_update_section9():
    est = ClassGaussianEstimator(2, 2, update="running", momentum=0.2, apply_neighbor_correction=False).double()
    est.means[0] = 0.2
    est.variances[0] = 0.01
    est.counts[0] = 50
    est.means[1] = 0.7
    est.update(_one_class_batch(0.3, 0.02), torch.zeros(10, dtype=torch.long))
    # w = max(10/60, 1 − 0.2) = 0.8
    torch.testing.assert_close(est.variances[0], torch.full((2,), 0.0196, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(est.means[0], torch.full((2,), 0.28, dtype=torch.float64), atol=1e-12, rtol=0)
    assert est.counts.tolist() == [60, 0]
    assert est.means[1].tolist() == [0.7, 0.7]  # absent class untouched (w = 0)
    # a large pass dominates: w = n/(n + A) when above 1 − momentum
    est.update(_one_class_batch(1.0, 0.0, n=240), torch.zeros(240, dtype=torch.long))
    w = 240 / 300
    torch.testing.assert_close(est.means[0, 0], torch.tensor((1 - w) * 0.28 + w * 1.0, dtype=torch.float64))


def test_plain_estimator_and_first_running_pass_equal_batch_statistics():
    torch.manual_seed(1)
    z, y = torch.randn(40, 4, dtype=torch.float64), torch.arange(40) % 4
    for rule in ("plain", "running"):
        est = ClassGaussianEstimator(5, 4, update=rule, apply_neighbor_correction=False).double()
        est.update(torch.randn(40, 4, dtype=torch.float64), y)  # something old
        if rule == "running":
            est = ClassGaussianEstimator(5, 4, update=rule, apply_neighbor_correction=False).double()
        # streaming in chunks equals one pass
        est.begin_pass()
        for chunk in range(4):
            est.accumulate(z[chunk * 10:(chunk + 1) * 10], y[chunk * 10:(chunk + 1) * 10])
        est.end_pass()
        for c in range(4):
            torch.testing.assert_close(est.means[c], z[y == c].mean(0))
            torch.testing.assert_close(est.variances[c], z[y == c].var(0, unbiased=False))
        assert bool(est.initialized)
        assert est.pass_counts.tolist() == [10, 10, 10, 10, 0]


# --------------------------------------------------------------------------------------- neighbor correction ----
def _correction_oracle(mu, var, n, K, beta, gamma, tau):
    c = mu.shape[0]
    valid = n >= 2
    glob = (var[valid] * n[valid, None]).sum(0) / n[valid].sum()
    out = var.copy()
    for k in range(c):
        cands = [i for i in range(c) if i != k and valid[i]]
        dm = {i: np.linalg.norm(mu[i] ** 2 - mu[k] ** 2) for i in cands}
        nb = sorted(cands, key=lambda i: dm[i])[:K]
        w = np.array([n[i] * math.exp(-dm[i] ** 2 / 2 - np.linalg.norm(var[i] - var[k]) ** 2 / 2) for i in nb])
        sigma_nb = (w[:, None] * var[nb]).sum(0) / w.sum()
        a = 1 / (1 + math.log(1 + beta * (n[k] - 1))) if 1 <= n[k] < tau else 0.0
        out[k] = (1 - a) * var[k] + a * ((1 - gamma) * sigma_nb + gamma * glob)
    return out


def test_neighbor_correction_matches_bruteforce_oracle():
    rng = np.random.default_rng(0)
    c, d = 7, 3
    mu = rng.normal(size=(c, d)) * 0.7
    var = rng.uniform(0.01, 0.5, size=(c, d))
    n = np.array([1, 3, 50, 8, 39, 40, 2], dtype=np.float64)
    var[0] = 0.0  # a singleton class has no variance and is nobody's neighbour
    got = neighbor_corrected_variances(torch.tensor(mu), torch.tensor(var), torch.tensor(n), num_neighbors=3,
                                       chunk_size=2)
    expected = _correction_oracle(mu, var, n, 3, 0.1, 0.1, 40)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-10, rtol=0)
    # classes with n ≥ τ are not corrected; the singleton gets (1−γ)Σ^nb + γΣ_global (a = 1)
    np.testing.assert_allclose(got[[2, 5]].numpy(), var[[2, 5]], atol=0)
    assert (got[0] > 0).all()


def test_neighbor_correction_flag_controls_what_synthesis_uses():
    torch.manual_seed(2)
    z, y = torch.randn(12, 3, dtype=torch.float64), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2])
    on = ClassGaussianEstimator(3, 3, num_neighbors=2, apply_neighbor_correction=True).double()
    off = ClassGaussianEstimator(3, 3, num_neighbors=2, apply_neighbor_correction=False).double()
    on.update(z, y)
    off.update(z, y)
    torch.testing.assert_close(on.variances, off.variances)
    torch.testing.assert_close(off.class_variances(y), off.variances[y])  # released code: never applied
    expected = neighbor_corrected_variances(on.means, on.variances, on.pass_counts, num_neighbors=2)
    torch.testing.assert_close(on.class_variances(y), expected[y])
    assert not torch.allclose(on.corrected_variances, on.variances)


# --------------------------------------------------------------------------------------- synthesizer / wrapper ---
def test_synthesizer_shapes_and_ignore_mask():
    synth = IAASynthesizer(4, 5, num_copies=3, seed=0)
    synth.estimator.update(torch.randn(20, 5), torch.arange(20) % 4)
    z, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 0, 1])
    out, out_y, is_syn = synth(z, y, lam=0.5)
    assert out.shape == (24, 5) and out_y.tolist() == y.tolist() * 4
    assert is_syn.tolist() == [False] * 6 + [True] * 18
    torch.testing.assert_close(out[:6], z)
    mask = own_copy_ignore_mask(6, 3)
    assert mask.shape == (6, 24) and mask.sum().item() == 24
    for i in range(6):
        assert mask[i].nonzero().flatten().tolist() == [i, i + 6, i + 12, i + 18]


def test_wrapper_real_rows_anchor_synthetic_rows_candidates():
    rec = RecordingLoss()
    iaa = _initialized_iaa(rec, num_copies=2)
    z = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    loss, logs = _at_epoch(iaa, z, y, 0)
    emb, _lab, ref, ref_lab, ignore = rec.args
    assert logs["iaa_active"] == 1.0 and logs["loss"] == pytest.approx(float(loss.detach()))
    assert emb.shape == (6, 2) and ref.shape == (18, 2) and ref_lab.tolist() == y.tolist() * 3
    torch.testing.assert_close(emb, l2_normalize(z))
    torch.testing.assert_close(ref[:6], emb)
    torch.testing.assert_close(ref.norm(dim=1), torch.ones(18, dtype=torch.float64))  # copies normalised too
    assert torch.equal(ignore, own_copy_ignore_mask(6, 2))
    loss.backward()  # gradient flows through the copies (detach=False, as in the code)
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_wrapper_matches_manual_composition_with_ms_loss():
    ms = MultiSimilarityLoss(2.0, 40.0, 0.5, mining=False)
    iaa = _initialized_iaa(ms, num_copies=3, lam=0.7, lambda_schedule=False, seed=5)
    z, y = torch.randn(6, 2, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 2])
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn((3, 6, 2), generator=gen, dtype=torch.float64)
    copies = iaa_synthesize(z, iaa.estimator.corrected_variances[y], 0.7, 3, noise=noise)
    all_n = l2_normalize(torch.cat([z, copies]))
    expected = ms(all_n[:6], y, all_n, y.repeat(4), ignore_mask=own_copy_ignore_mask(6, 3))
    got, _ = _at_epoch(iaa, z, y, 0)
    torch.testing.assert_close(got, expected)


def test_zero_strength_and_inactive_epochs_give_exactly_the_base_loss():
    z, y = _circle_batch()
    base = ContrastiveLoss(0.8, 0.5, form="similarity", negative_term="hinge")
    expected = base(l2_normalize(z), y)
    assert float(expected) == pytest.approx(0.542985, abs=1e-6)  # §9 IAA contrastive, no synthetic rows
    for kw in ({"num_copies": 0}, {"lam": 0.0}):
        iaa = _initialized_iaa(base, **kw)
        assert torch.equal(_at_epoch(iaa, z, y, 5)[0], expected)
    late_start = _initialized_iaa(base, start_epoch=30)
    assert torch.equal(_at_epoch(late_start, z, y, 29)[0], expected)  # code epoch 30: still the baseline
    assert not torch.equal(_at_epoch(late_start, z, y, 30)[0], expected)
    fresh = IAA(base, num_classes=3, embedding_size=2, start_epoch=0).double()  # never estimated ⇒ inactive
    assert torch.equal(_at_epoch(fresh, z, y, 10)[0], expected)


def test_state_dict_round_trip_gives_identical_next_outputs():
    iaa = _initialized_iaa(MultiSimilarityLoss(mining=False), seed=3)
    z, y = torch.randn(6, 2, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 2])
    _at_epoch(iaa, z, y, 1)  # advance the generator
    buf = io.BytesIO()
    torch.save(iaa.state_dict(), buf)
    buf.seek(0)
    fresh = IAA(MultiSimilarityLoss(mining=False), num_classes=3, embedding_size=2, start_epoch=0, seed=99).double()
    fresh.load_state_dict(torch.load(buf))
    for name in ("means", "variances", "counts", "pass_counts", "corrected_variances", "initialized"):
        assert torch.equal(getattr(fresh.estimator, name), getattr(iaa.estimator, name))
    for _ in range(2):
        assert torch.equal(_at_epoch(iaa, z, y, 1)[0], _at_epoch(fresh, z, y, 1)[0])


class _TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x):
        return self.bn(self.lin(x))


def test_on_epoch_start_estimates_on_schedule_in_eval_mode_without_grad():
    torch.manual_seed(4)
    model = _TinyModel()
    model.train()
    model.bn.eval()  # a trainer's BN-freezing policy must survive the pass
    x, y = torch.randn(24, 3), torch.arange(24) % 3
    loader = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 24, 8)]
    iaa = IAA(RecordingLoss(), num_classes=3, embedding_size=2, start_epoch=2, update_every=2)
    bn_mean = model.bn.running_mean.clone()
    updates = []
    for epoch in range(6):
        before = iaa.estimator.counts.sum().item()
        iaa.on_epoch_start(epoch, model, loader)
        updates.append(iaa.estimator.counts.sum().item() > before)
    assert updates == [False, False, True, False, True, False]  # code epochs 3 and 5
    assert model.training and model.lin.training and not model.bn.training
    assert torch.equal(model.bn.running_mean, bn_mean)
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        model.eval()
        emb = model(x)
    torch.testing.assert_close(iaa.estimator.means[1], emb[y == 1].mean(0))
    assert int(iaa.current_epoch) == 5
    with pytest.raises(TypeError, match="embed_fn"):
        IAA(RecordingLoss(), num_classes=3, embedding_size=2, start_epoch=0).on_epoch_start(0, model, [x])


def test_legacy_kwargs_and_clear_errors():
    legacy = IAA(RecordingLoss(), num_classes=3, embedding_size=2, **IAA.legacy_kwargs())
    assert legacy.synthesizer.legacy_cumulative_sqrt and not legacy.estimator.apply_neighbor_correction
    assert legacy.estimator.update_rule == "running" and legacy.update_every == 2 and legacy.lambda_schedule
    assert not IAA(RecordingLoss(), num_classes=3, embedding_size=2).lambda_schedule  # paper: constant λ
    with pytest.raises(ValueError, match="num_classes"):
        ClassGaussianEstimator(2, 2).update(torch.zeros(2, 2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="update"):
        ClassGaussianEstimator(2, 2, update="ema")  # type: ignore[arg-type]
