"""MDR regularizer, batch-distance scaling and wrapper (methods.md §5.1, §9 first-call vector)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from deepmetric.losses import TripletMarginLoss
from deepmetric.synthesis import MDR, BatchDistanceScale, MDRRegularizer


def _circle() -> tuple[torch.Tensor, torch.Tensor]:
    ang = torch.tensor([0, 50, 20, 80, 140, 170], dtype=torch.float64) * math.pi / 180
    return torch.stack([ang.cos(), ang.sin()], 1), torch.tensor([0, 0, 1, 1, 2, 2])


def _oracle(z: np.ndarray, mu: float, sigma: float, levels=(-3.0, 0.0, 3.0)) -> float:
    n = len(z)
    vals = [min(abs((np.linalg.norm(z[i] - z[j]) - mu) / sigma - lv) for lv in levels)
            for i in range(n) for j in range(n) if i != j]
    return float(np.mean(vals))


def test_mdr_first_call_section9():
    z, _ = _circle()
    reg = MDRRegularizer().double()
    loss = reg(z)
    assert float(reg.running_mean) == pytest.approx(1.007065, abs=1e-6)
    assert float(reg.running_std) == pytest.approx(0.687442, abs=1e-6)
    assert float(loss.detach()) == pytest.approx(0.739865, abs=1e-6)
    assert bool(reg.initialized)


def test_running_statistics_momentum_and_corrected_variant():
    z, _ = _circle()
    reg = MDRRegularizer().double()
    reg(z)
    z2 = z * 2.0
    loss2 = reg(z2)
    d2 = torch.cdist(z2, z2)
    mu = 0.9 * 1.0070654 + 0.1 * float(d2.mean())
    sigma = 0.9 * 0.6874422 + 0.1 * float(d2.std())
    assert float(reg.running_mean) == pytest.approx(mu, abs=1e-6)
    assert float(reg.running_std) == pytest.approx(sigma, abs=1e-6)
    assert float(loss2.detach()) == pytest.approx(_oracle(z2.numpy(), mu, sigma), abs=1e-5)
    # corrected statistics: off-diagonal entries only
    corr = MDRRegularizer(include_diagonal_in_stats=False).double()
    val = corr(z)
    d = torch.cdist(z, z)[~torch.eye(6, dtype=torch.bool)]
    assert float(corr.running_mean) == pytest.approx(float(d.mean()), abs=1e-9)
    assert float(val.detach()) == pytest.approx(_oracle(z.numpy(), float(d.mean()), float(d.std())), abs=1e-9)


def test_eval_mode_does_not_update_statistics():
    z, _ = _circle()
    reg = MDRRegularizer().double().eval()
    reg(z)
    assert not bool(reg.initialized) and float(reg.running_mean) == 0.0


def test_state_dict_round_trip_keeps_initialized_flag():
    z, _ = _circle()
    reg = MDRRegularizer().double()
    reg(z)
    with torch.no_grad():
        reg.levels.add_(0.25)
    buf = io.BytesIO()
    torch.save(reg.state_dict(), buf)
    buf.seek(0)
    fresh = MDRRegularizer().double()
    fresh.load_state_dict(torch.load(buf))
    assert bool(fresh.initialized)
    assert torch.equal(fresh(z * 1.5), reg(z * 1.5))  # momentum update, not re-initialisation
    assert torch.equal(fresh.running_mean, reg.running_mean)


def test_batch_distance_scale_train_vs_eval():
    torch.manual_seed(0)
    e = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    scale = BatchDistanceScale()
    z = scale(e)
    d = torch.cdist(z, z)
    assert float(d.detach().sum() / (7 * 6)) == pytest.approx(1.0, abs=1e-12)
    z.sum().backward()  # gradient flows through the divisor too: not just 1/mean
    assert not torch.allclose(e.grad, torch.full_like(e.grad, float(e.grad[0, 0])))
    scale.eval()
    assert scale(e) is e


def test_wrapper_total_and_zero_strength():
    torch.manual_seed(1)
    base = TripletMarginLoss(margin=0.2, normalize_embeddings=False)
    e, y = torch.randn(8, 5, dtype=torch.float64), torch.arange(8) % 4
    scaled = BatchDistanceScale()(e)
    for scale_flag, inputs in ((True, scaled), (False, e)):
        zero = MDR(base, lambda_mdr=0.0, nu=0.0, scale_by_batch_distance=scale_flag).double()
        assert torch.equal(zero(e, y), base(inputs, y))
    mdr = MDR(base, lambda_mdr=0.6, nu=0.01).double()
    loss = mdr(e, y)
    logs = mdr.last_logs
    expected = base(scaled, y) + 0.6 * MDRRegularizer().double()(scaled) + 0.01 * 18.0
    torch.testing.assert_close(loss, expected)
    assert logs["loss"] == pytest.approx(float(loss.detach())) and "mdr_loss" in logs
    loss.backward()
    assert mdr.regularizer.levels.grad is not None and mdr.regularizer.levels.grad.abs().sum() > 0
    assert mdr.expects_normalized_embeddings is False
