"""SGAR's gate counters: per-call logs and the cumulative counts the ablation benchmark reports."""

from __future__ import annotations

import torch

from deepmetric.functional import l2_normalize
from deepmetric.loss_hooks import StepContext
from deepmetric.losses import ProxyAnchorLoss
from deepmetric.synthesis import SynthesisRankingRegularizer


def _method(tau_g: float = 0.5) -> SynthesisRankingRegularizer:
    pa = ProxyAnchorLoss(4, 4).double()
    with torch.no_grad():
        pa.proxies.copy_(torch.eye(4, dtype=torch.float64))  # proxy c = basis vector e_c
    return SynthesisRankingRegularizer(pa, space="embedding", gate="proxy_sim", tau_g=tau_g, seed=0)


def _batch(own_proxy_cos: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit embeddings whose cosine to their own proxy is exactly the given value (labels 0, 1, 2, 3, 0, ...)."""
    labels = torch.arange(len(own_proxy_cos)) % 4
    rows = []
    for i, c in enumerate(own_proxy_cos):
        own, other = int(labels[i]), (int(labels[i]) + 1) % 4
        row = torch.zeros(4, dtype=torch.float64)
        row[own], row[other] = c, (1.0 - c * c) ** 0.5
        rows.append(row)
    return torch.stack(rows), labels


def _call(method: SynthesisRankingRegularizer, cos: list[float]) -> dict[str, float]:
    emb, labels = _batch(cos)
    method.on_step_start(StepContext())
    method(emb, labels)
    return {k: float(v) for k, v in method.last_logs.items()}


def test_gate_counts_accumulate_samples_and_batches():
    method = _method(tau_g=0.5)
    assert method.gate_counts()["sample_fraction"] == 0.0 and method.gate_counts()["batches"] == 0
    logs = _call(method, [0.9, 0.2, 0.5, -0.3, 0.1, 0.7])  # 0.9, 0.5 (at τ exactly), 0.7 pass
    assert logs["sgar_gated_fraction"] == 0.5 and logs["sgar_gate_opened"] == 1.0
    logs = _call(method, [0.1, 0.2, 0.3, 0.4])  # none passes
    assert logs["sgar_gated_fraction"] == 0.0 and logs["sgar_gate_opened"] == 0.0
    logs = _call(method, [0.6, 0.0])
    assert logs["sgar_gate_opened"] == 1.0
    counts = method.gate_counts()
    assert (counts["samples"], counts["gated_samples"], counts["batches"], counts["opened_batches"]) == (12, 4, 3, 2)
    assert counts["sample_fraction"] == 4 / 12 and counts["batch_fraction"] == 2 / 3


def test_gate_counts_match_the_gate_mask_and_reset():
    torch.manual_seed(1)
    method = _method(tau_g=0.3)
    expected_gated = expected_opened = total = 0
    for _ in range(5):
        emb = l2_normalize(torch.randn(10, 4, dtype=torch.float64))
        labels = torch.randint(0, 4, (10,))
        gate, _ = method.gate_mask(emb, labels)
        expected_gated += int(gate.sum())
        expected_opened += int(gate.any())
        total += 10
        method.on_step_start(StepContext())
        method(emb, labels)
    counts = method.gate_counts()
    assert (counts["samples"], counts["gated_samples"], counts["opened_batches"]) == (
        total, expected_gated, expected_opened)
    assert 0 < expected_gated < total  # the check distinguishes open from closed gates
    method.reset_gate_counts()
    assert method.gate_counts()["samples"] == 0 and method.gate_counts()["gated_samples"] == 0
