"""The combinations users asked for build from YAML, train 20 steps on KanjiGlyphs, and a run resumed from its
step-10 checkpoint ends bit-exactly where the uninterrupted run ends (model and criterion state)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from deepmetric.memory import CrossBatchMemory
from deepmetric.training.config import load_config
from deepmetric.training.run_dir import create_run_dir
from deepmetric.training.trainer import Trainer

BASE = """
name: combination
data: {dataset: kanji_glyphs, max_classes: 12, batch_size: 16, m_per_class: 4, eval_batch_size: 512,
       validation_fraction: 0.0, batches_per_epoch: 8}
model: {backbone: kanji_cnn, width: 4, embedding_size: 16, normalize: true}
optimizer: {name: adam, lr: 0.01}
train: {iterations: 20, eval_every: 0, checkpoint_every: 10, progress: false, threads: 1, seed: 3}
evaluation: {recall_at: [1], metrics: [recall]}
"""
MEMORY = "memory: {name: xbm, params: {memory_size: 96, start_iteration: 4}}\n"
COMBINATIONS = {
    "memory+miner": "loss: {name: contrastive, params: {form: similarity}, miner: multi_similarity}\n" + MEMORY,
    "memory+das": "loss: {name: multi_similarity}\n" + MEMORY + "synthesis: {name: das, params: {num_produce: 2}}\n",
    "memory+iaa": (
        "loss: {name: contrastive, params: {form: similarity}}\n" + MEMORY
        + "synthesis: {name: iaa, params: {start_epoch: 0, update_every: 1, num_copies: 2}}\n"
        + "model: {backbone: kanji_cnn, width: 4, embedding_size: 16, normalize: false}\n"
    ),
    "miner+das": ("loss: {name: triplet_margin, miner: semi_hard, miner_params: {seed: 1}}\n"
                  "synthesis: {name: das, params: {num_produce: 2}}\n"),
}


class _Interrupted(Exception):
    pass


def _config_file(tmp_path: Path, combination: str) -> Path:
    data = yaml.safe_load(BASE)
    data.update(yaml.safe_load(COMBINATIONS[combination]))
    path = tmp_path / f"{combination.replace('+', '_')}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _same(a: object, b: object) -> bool:
    """Bit-exact equality of tensors, also inside the dicts of modules' extra state (random generators)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _final_state(trainer: Trainer) -> dict[str, object]:
    state = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    state.update({f"criterion.{k}": v for k, v in trainer.criterion.state_dict().items()})
    return state


@pytest.mark.parametrize("combination", sorted(COMBINATIONS))
def test_combination_trains_and_resumes_bit_exactly(combination: str, tmp_path: Path) -> None:
    config = load_config(_config_file(tmp_path, combination))
    reference = Trainer(config, create_run_dir(tmp_path / "reference"))
    assert isinstance(reference.criterion.loss, CrossBatchMemory) or reference.criterion.loss.loss is not None
    result = reference.fit()
    assert result.steps == 20
    expected = _final_state(reference)
    memory = next((m for m in reference.criterion.modules() if isinstance(m, CrossBatchMemory)), None)
    if memory is not None:
        assert int(memory.iteration) == 20 and bool(memory.is_full)  # the memory was used and wrapped
    if combination == "memory+iaa":
        assert bool(reference.criterion.loss.estimator.initialized)

    interrupted = Trainer(config, create_run_dir(tmp_path / "interrupted"))
    save = interrupted.save_checkpoint

    def save_then_crash(name: str = "last.pt") -> Path:
        path = save(name)
        if interrupted.step == 10:
            raise _Interrupted
        return path

    interrupted.save_checkpoint = save_then_crash  # the process dies right after the step-10 checkpoint
    with pytest.raises(_Interrupted):
        interrupted.fit()
    resumed = Trainer.resume(tmp_path / "interrupted")
    assert resumed.step == 10
    resumed.fit()
    got = _final_state(resumed)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert _same(got[key], value), f"{combination}: {key} differs after resuming"
