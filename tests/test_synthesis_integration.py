"""Registry and trainer-facing contract of the synthesis wrappers: built through ``build_criterion`` and driven
through the criterion the way ``Trainer.train_step`` / ``_on_epoch_start`` drive them (features + head, 0-based
epochs, logs["loss"])."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepmetric.synthesis import SYNTHESIS, SynthesisMethod
from deepmetric.training.config import ExperimentConfig
from deepmetric.training.criterion import build_criterion

CASES = {
    "iaa": ("multi_similarity", {"start_epoch": 0, "update_every": 1, "total_epochs": 4}, False),
    "das": ("multi_similarity", {}, True),
    "mdr": ("triplet_margin", {}, False),
    "sgar": ("proxy_anchor", {"gate": "all"}, True),
}


class _Model(nn.Module):
    """features(x) = pooled backbone output; head(features) = embedding; forward = head(features(x))."""

    def __init__(self, normalize: bool) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(10, 16), nn.ReLU())
        self.head = nn.Linear(16, 8)
        self.normalize = normalize

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.head(self.features(x))
        return nn.functional.normalize(z, dim=1) if self.normalize else z


def test_registry_names_and_interface():
    assert set(SYNTHESIS) == {"iaa", "das", "mdr", "sgar"}
    for cls in SYNTHESIS.values():
        assert issubclass(cls, SynthesisMethod)
        assert isinstance(cls.expects_normalized_embeddings, bool)
    for name in ("iaa", "das"):
        assert {"num_classes", "embedding_size"} <= set(SYNTHESIS[name].build_arguments)
    assert "total_epochs" in SYNTHESIS["iaa"].build_arguments
    assert not SYNTHESIS["iaa"].expects_normalized_embeddings and not SYNTHESIS["mdr"].expects_normalized_embeddings


def test_builder_refuses_a_normalisation_mismatch():
    from deepmetric.training.config import ConfigError

    cfg = ExperimentConfig()
    cfg.synthesis.name = "iaa"
    cfg.model.normalize = True
    with pytest.raises(ConfigError, match="model.normalize=false"):
        build_criterion(cfg, num_classes=4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_trainer_style_steps(name):
    torch.manual_seed(0)
    loss_name, params, normalized = CASES[name]
    cfg = ExperimentConfig()
    cfg.model.embedding_size = 8
    cfg.loss.name = loss_name
    cfg.synthesis.name = name
    cfg.synthesis.params = params
    cfg.model.normalize = normalized  # the builder refuses a model/method mismatch
    criterion = build_criterion(cfg, num_classes=4)
    method = criterion.loss
    assert method.expects_normalized_embeddings is normalized
    model = _Model(normalize=method.expects_normalized_embeddings)
    opt = torch.optim.SGD(list(model.parameters()) + list(criterion.parameters()), lr=0.05)
    x, y = torch.randn(16, 10), torch.arange(16) % 4
    loader = [(x[:8], y[:8]), (x[8:], y[8:])]
    before = [p.detach().clone() for p in model.parameters()]
    for epoch in range(2):
        criterion.on_epoch_start(epoch, model, loader)
        for step in range(2):
            if criterion.needs_features:
                features = model.features(x)
                emb = model.head(features)
                emb = nn.functional.normalize(emb, dim=1) if model.normalize else emb
            else:
                features, emb = None, model(x)
            loss, logs = criterion(emb, y, features=features, head=model.head, step=step + 1, epoch=epoch)
            assert torch.isfinite(loss) and logs["loss"] == pytest.approx(float(loss.detach()))
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    if name == "iaa":
        assert bool(method.estimator.initialized) and logs["iaa_active"] == 1.0
    state = criterion.state_dict()
    rebuilt = build_criterion(cfg, num_classes=4)
    rebuilt.load_state_dict(state)
    assert set(rebuilt.state_dict()) == set(state)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_cuda_generator_state_loads_on_cpu_with_a_warning():
    from deepmetric.synthesis import RandomSource

    src = RandomSource(seed=7)
    with pytest.warns(RuntimeWarning, match="CUDA"):
        src.set_extra_state({"seed": 7, "device": "cuda:0", "state": torch.zeros(16, dtype=torch.uint8)})
    expected = torch.rand(3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.rand(3, generator=src.generator("cpu")), expected)
