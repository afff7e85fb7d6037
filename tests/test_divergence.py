"""Divergence and collapse are caught: the step and the tensor are named, the last finite checkpoint is kept."""

from __future__ import annotations

import json
import re

import pytest
import torch

from deepmetric.training.config import load_config
from deepmetric.training.guards import embedding_spread, first_non_finite_tensor
from deepmetric.training.run_dir import create_run_dir
from deepmetric.training.trainer import Trainer, TrainingDiverged

TINY = [
    "data.max_classes=24", "data.batch_size=32", "data.m_per_class=4", "data.eval_batch_size=512",
    "model.width=8", "model.embedding_size=32", "train.progress=false", "train.threads=1",
    "evaluation.recall_at=[1, 2]", "train.eval_every=0", "train.checkpoint_every=1",
]


def _finite_checkpoint(path) -> dict:
    state = torch.load(path, weights_only=True)
    for name, tensor in state["model"].items():
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), name
    return state


def test_sgd_at_lr_1e36_stops_naming_the_step_and_keeps_the_last_finite_checkpoint(tmp_path):
    cfg = load_config(None, TINY + ["optimizer.name=sgd", "optimizer.lr=1e36", "train.iterations=40"])
    trainer = Trainer(cfg, create_run_dir(tmp_path / "run"))
    with pytest.raises(TrainingDiverged) as info:
        trainer.fit()
    message = str(info.value)
    step = int(re.search(r"at step (\d+)", message).group(1))
    assert step < 40 and "non-finite" in message
    kept = int(re.search(r"last finite state \(step (\d+)\)", message).group(1))
    assert kept == step - 1
    state = _finite_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["step"] == kept
    assert not (tmp_path / "run" / "results.json").exists()
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "diverged" and events[-1]["step"] == step


def test_non_finite_weight_with_a_finite_loss_is_caught_and_named(tmp_path):
    """The case the loss guard misses: the weights go NaN, a mining loss then reads 0.0."""
    cfg = load_config(None, TINY + ["train.iterations=10"])
    trainer = Trainer(cfg, create_run_dir(tmp_path / "run"))

    def poison_after_step(optimizer, args, kwargs):
        if trainer.step + 1 == 5:
            with torch.no_grad():
                trainer.model.head.linear.weight[0, 0] = float("inf")

    trainer.optimizer.register_step_post_hook(poison_after_step)
    with pytest.raises(TrainingDiverged, match=r"non-finite weight model\.head\.linear\.weight at step 5") as info:
        trainer.fit()
    assert "last finite state (step 4)" in str(info.value)
    assert _finite_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 4


def test_non_finite_gradient_is_caught_before_it_reaches_the_weights(tmp_path, monkeypatch):
    cfg = load_config(None, TINY + ["train.iterations=10"])
    trainer = Trainer(cfg, create_run_dir(tmp_path / "run"))
    real_clip = trainer._clip_gradients

    def poisoned_clip():
        real_clip()
        if trainer.step + 1 == 3:
            trainer.model.head.linear.bias.grad[0] = float("nan")

    monkeypatch.setattr(trainer, "_clip_gradients", poisoned_clip)
    with pytest.raises(TrainingDiverged, match=r"non-finite gradient of model\.head\.linear\.bias at step 3"):
        trainer.fit()
    state = _finite_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["step"] == 2


def test_collapsed_embeddings_warn_loudly_and_are_recorded(tmp_path, capsys):
    cfg = load_config(None, TINY + ["train.iterations=10", "optimizer.lr=0"])
    trainer = Trainer(cfg, create_run_dir(tmp_path / "run"))
    with torch.no_grad():  # every image gets the embedding of the bias alone
        trainer.model.head.linear.weight.zero_()
    result = trainer.fit()
    out = capsys.readouterr().out
    assert "embeddings collapsed at step 1" in out and "optimizer.lr" in out
    assert any("collapsed" in w for w in result.warnings)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert any("collapsed" in w for w in saved["warnings"])


def test_a_healthy_run_gives_no_collapse_warning(tmp_path, capsys):
    result = Trainer(load_config(None, TINY + ["train.iterations=10"]), create_run_dir(tmp_path / "run")).fit()
    assert not result.warnings and "collapsed" not in capsys.readouterr().out


def test_guard_helpers():
    torch.manual_seed(0)
    spread = embedding_spread(torch.nn.functional.normalize(torch.randn(64, 32), dim=1))
    assert 0.5 < spread < 1.5
    assert embedding_spread(torch.ones(8, 4)) == 0.0
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    assert first_non_finite_tensor({"net": net}) is None
    net[1].running_var[1] = float("nan")
    assert first_non_finite_tensor({"net": net}) == "net.1.running_var"
