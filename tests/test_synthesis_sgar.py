"""SGAR synthesis-ranking regularizer [RECON] on Proxy-Anchor (methods.md §2.3)."""

from __future__ import annotations

import io
import itertools

import pytest
import torch
from torch import nn

from deepmetric.functional import l2_normalize
from deepmetric.loss_hooks import StepContext
from deepmetric.losses import MultiSimilarityLoss, ProxyAnchorLoss
from deepmetric.synthesis import SynthesisRankingRegularizer, anchor_loss, ranking_loss


def _setup(seed: int = 0, b: int = 8, f: int = 12, d: int = 6, c: int = 4):
    torch.manual_seed(seed)
    head = nn.Linear(f, d).double()
    features = torch.randn(b, f, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(b) % c
    pa = ProxyAnchorLoss(c, d).double()
    return head, features, labels, pa


def _step(method, emb, labels, features=None, head=None):
    """One trainer-style call: the step context (features, head) first, then the loss; returns (loss, logs)."""
    method.on_step_start(StepContext(features=features, head=head))
    return method(emb, labels), method.last_logs


def test_ranking_loss_zero_when_ordered_by_margin_and_matches_bruteforce():
    # gaps of exactly m_r = 1/16 (binary-exact, so "ordered by ≥ m_r" is tested at the boundary)
    ordered = torch.tensor([[1.0, 0.9375, 0.875, 0.8125, 0.75], [0.5, 0.375, 0.25, 0.125, 0.0]], dtype=torch.float64)
    assert torch.equal(ranking_loss(ordered, 0.0625), torch.zeros(2, dtype=torch.float64))
    assert (ranking_loss(ordered, 0.0625 + 1e-9)[0] > 0) and ranking_loss(ordered, 0.0625 + 1e-9)[1] == 0
    s = torch.randn(3, 5, dtype=torch.float64)
    brute = torch.stack([
        sum(torch.clamp(s[g, k] - s[g, j] + 0.03, min=0) for j, k in itertools.combinations(range(5), 2)) / 10
        for g in range(3)
    ])
    torch.testing.assert_close(ranking_loss(s, 0.03), brute)
    assert torch.equal(ranking_loss(s[:, :1], 0.1), torch.zeros(3, dtype=torch.float64))  # J = 1: no pairs
    assert float(anchor_loss(torch.tensor(0.6), torch.tensor(0.7), 0.0)) == 0.0
    assert float(anchor_loss(torch.tensor(0.6), torch.tensor(0.5), 0.05)) == pytest.approx(0.15)


def test_a_zero_and_lambda_zero_equals_proxy_anchor():
    head, features, labels, pa = _setup()
    emb = l2_normalize(head(features))
    expected = pa(emb, labels)
    g_expected = torch.autograd.grad(expected, features, retain_graph=True)[0]
    sgar = SynthesisRankingRegularizer(pa, a=0.0, lambda_r=0.0, gate="all")
    loss, logs = _step(sgar, emb, labels, features, head)
    assert torch.equal(loss, expected)
    assert torch.equal(torch.autograd.grad(loss, features)[0], g_expected)
    assert logs["sgar_gated_fraction"] == 1.0 and logs["loss"] == pytest.approx(float(expected.detach()))


def test_radial_trajectory_is_ordered_so_rank_term_vanishes():
    # embedding space, one shared direction per source: cos(z, z + t·u) decreases in t ⇒ ordered, L_rank = 0
    torch.manual_seed(1)
    emb = l2_normalize(torch.randn(6, 5, dtype=torch.float64))
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    sgar = SynthesisRankingRegularizer(MultiSimilarityLoss(), space="embedding", gate="all", shared_direction=True,
                                       a=0.2, m_r=0.0, eta=0.0)
    reg, logs = sgar.regularizer(emb, labels)
    assert float(reg) == 0.0 and logs["sgar_rank"] == 0.0
    fresh = SynthesisRankingRegularizer(MultiSimilarityLoss(), space="embedding", gate="all", a=0.2, m_r=0.5)
    assert float(fresh.regularizer(emb, labels)[0]) > 0  # a large margin cannot be met


def test_gradient_is_zero_for_ungated_samples():
    head, features, labels, pa = _setup(seed=2)
    emb = l2_normalize(head(features))
    with torch.no_grad():  # put the proxies of the first half of the batch onto its samples: those pass the gate
        pa.proxies.copy_(torch.randn_like(pa.proxies))
        pa.proxies[labels[:4]] = emb[:4]
    sgar = SynthesisRankingRegularizer(pa, gate="proxy_sim", tau_g=0.99, a=0.3, m_r=0.2, m_a=0.5,
                                       detach_features=False)
    gate, _ = sgar.gate_mask(emb, labels)
    assert gate.tolist() == [True] * 4 + [False] * 4
    reg, _ = sgar.regularizer(emb, labels, features=features, head=head)
    g_feat, g_head = torch.autograd.grad(reg, [features, head.weight])
    assert g_feat[4:].abs().max() == 0 and g_feat[:4].abs().sum() > 0
    assert g_head.abs().sum() > 0  # the regularizer trains g
    # detached sources (default): the synthetic branch reaches the backbone only through the real z_i
    sgar_d = SynthesisRankingRegularizer(pa, gate="proxy_sim", tau_g=0.99, a=0.3, m_r=0.2)
    emb2 = l2_normalize(head(features))
    g2 = torch.autograd.grad(sgar_d.regularizer(emb2, labels, features=features, head=head)[0], features)[0]
    assert g2[4:].abs().max() == 0


def test_gate_modes_and_errors():
    head, features, labels, pa = _setup(seed=3)
    emb = l2_normalize(head(features)).detach()
    top = SynthesisRankingRegularizer(pa, gate="top_fraction", top_fraction=0.25)
    gate, sim = top.gate_mask(emb, labels)
    assert int(gate.sum()) == 2 and sim[gate].min() >= sim[~gate].max()
    assert bool(SynthesisRankingRegularizer(pa, gate="all").gate_mask(emb, labels)[0].all())
    nobody = SynthesisRankingRegularizer(pa, gate="proxy_sim", tau_g=2.0)
    loss, logs = _step(nobody, emb, labels, features, head)
    assert torch.equal(loss, pa(emb, labels)) and logs["sgar_gated_fraction"] == 0.0
    with pytest.raises(ValueError, match="proxies"):
        SynthesisRankingRegularizer(MultiSimilarityLoss(), gate="proxy_sim").gate_mask(emb, labels)
    with pytest.raises(ValueError, match="features"):
        SynthesisRankingRegularizer(pa, gate="all")(emb, labels)
    with pytest.raises(ValueError, match="space"):
        SynthesisRankingRegularizer(pa, space="latent")  # type: ignore[arg-type]


def test_interface_flags_and_state_dict_round_trip():
    head, features, labels, pa = _setup(seed=4)
    sgar = SynthesisRankingRegularizer(pa, gate="all", seed=5)
    assert sgar.needs_features and sgar.needs_head and sgar.expects_normalized_embeddings
    assert not SynthesisRankingRegularizer(pa, space="embedding").needs_features
    emb = l2_normalize(head(features)).detach()
    f = features.detach()
    _step(sgar, emb, labels, f, head)
    buf = io.BytesIO()
    torch.save(sgar.state_dict(), buf)
    buf.seek(0)
    fresh = SynthesisRankingRegularizer(ProxyAnchorLoss(4, 6).double(), gate="all", seed=0)
    fresh.load_state_dict(torch.load(buf))
    for _ in range(2):
        assert torch.equal(_step(sgar, emb, labels, f, head)[0], _step(fresh, emb, labels, f, head)[0])
