"""Wrappers compose: memory + miner against a brute force over the queue, memory inside DAS and IAA, the builder's
stacks and refusals, loss-side parameter groups, and the hooks reaching nested modules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deepmetric.functional import l2_normalize
from deepmetric.loss_hooks import LossWrapper
from deepmetric.losses import ContrastiveLoss, MultiSimilarityLoss
from deepmetric.memory import CrossBatchMemory
from deepmetric.miners import MultiSimilarityMiner
from deepmetric.synthesis import DAS, IAA, MDR, DASProducer
from deepmetric.training.builders import build_optimizer
from deepmetric.training.config import ConfigError, ExperimentConfig, load_config
from deepmetric.training.criterion import Criterion, build_criterion


def _cos(u: list[float], v: list[float]) -> float:
    return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))


def _mined_contrastive(anchors: list[list[float]], labels: list[int], cands: list[list[float]],
                       cand_labels: list[int], own: list[int], eps: float, m_pos: float, m_neg: float,
                       mine: bool = True) -> float:
    """MS-mined similarity-form contrastive, Σ over pairs ÷ B, with explicit loops; candidate ``own[i]`` is
    anchor i itself (its own slot) and is skipped by index."""
    total = 0.0
    for i, (u, y) in enumerate(zip(anchors, labels)):
        sims = [(_cos(u, v), c == y) for j, (v, c) in enumerate(zip(cands, cand_labels)) if j != own[i]]
        pos0 = [s for s, same in sims if same]
        neg0 = [s for s, same in sims if not same]
        if mine:
            if not pos0 or not neg0:
                continue
            pos = [s for s in pos0 if s - eps < max(neg0)]
            neg = [s for s in neg0 if s + eps > min(pos0)]
        else:
            pos, neg = pos0, neg0
        total += sum(max(0.0, m_pos - s) for s in pos) + sum(s for s in neg if s > m_neg)
    return total / len(anchors)


def test_memory_plus_miner_equals_brute_force_over_the_queue() -> None:
    eps, m_pos, m_neg, weight, size = 0.1, 0.9, 0.3, 0.5, 7
    loss = ContrastiveLoss(m_pos, m_neg, form="similarity", negative_term="similarity", reduction="batch")
    xbm = CrossBatchMemory(loss, MultiSimilarityMiner(epsilon=eps), embedding_size=3, memory_size=size,
                           weight=weight, dtype=torch.float64)
    g = torch.Generator().manual_seed(11)
    ring: list[tuple[list[float], int] | None] = [None] * size
    ptr = written = 0
    mining_mattered = False
    for _ in range(4):  # batches of 4 into 7 slots: the third step wraps
        emb = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
        lab = torch.randint(0, 2, (4,), generator=g)
        got = xbm(emb, lab)
        rows, labels = emb.detach().tolist(), lab.tolist()
        own = []
        for r in range(4):
            ring[ptr] = (rows[r], labels[r])
            own.append(ptr)
            ptr, written = (ptr + 1) % size, written + 1
        valid = ring[: min(size, written)]  # slots 0..n−1 until the first wrap, all of them afterwards
        cands, cand_labels = [v[0] for v in valid], [v[1] for v in valid]
        l_batch = _mined_contrastive(rows, labels, rows, labels, list(range(4)), eps, m_pos, m_neg)
        l_memory = _mined_contrastive(rows, labels, cands, cand_labels, own, eps, m_pos, m_neg)
        unmined = _mined_contrastive(rows, labels, cands, cand_labels, own, eps, m_pos, m_neg, mine=False)
        mining_mattered |= abs(unmined - l_memory) > 1e-6
        assert float(xbm.last_logs["batch_loss"]) == pytest.approx(l_batch, abs=1e-12)
        assert float(xbm.last_logs["memory_loss"]) == pytest.approx(l_memory, abs=1e-12)
        assert float(got.detach()) == pytest.approx(l_batch + weight * l_memory, abs=1e-12)
        got.backward()
        assert torch.isfinite(emb.grad).all()
    assert mining_mattered  # the miner removed pairs the plain memory loss would have used


def test_das_over_memory_enqueues_das_rows_and_equals_the_manual_stack() -> None:
    torch.manual_seed(0)
    base = MultiSimilarityLoss(mining=False)
    das = DAS(CrossBatchMemory(base, embedding_size=6, memory_size=40), num_classes=3, embedding_size=6,
              num_produce=2, seed=5)
    producer = DASProducer(3, 6, num_produce=2, seed=5)
    memory = CrossBatchMemory(base, embedding_size=6, memory_size=40)
    for step in range(3):  # 18 rows per step into 40 slots: wraps in step 3
        e, y = l2_normalize(torch.randn(6, 6)), torch.tensor([0, 0, 1, 1, 2, 2])
        got = das(e, y)
        e_all, y_all, _ = producer(e, y)
        assert torch.equal(got, memory(e_all, y_all))
        if step == 0:
            torch.testing.assert_close(das.loss.memory_embeddings, e_all, rtol=0, atol=0)  # real + DAS copies
        for key, value in memory.state_dict().items():
            assert torch.equal(das.loss.state_dict()[key], value), key
        assert set(das.last_logs) == {"loss", "das_mean_shift"}
        assert set(das.loss.last_logs) == {"loss", "batch_loss", "memory_loss"}


class _Recording(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.masks: list[torch.Tensor | None] = []

    def forward(self, emb, lab, ref=None, ref_lab=None, *, ignore_mask=None):
        self.masks.append(ignore_mask)
        return emb.sum()


def test_das_own_copies_stay_excluded_in_the_memory_term() -> None:
    rec = _Recording()
    das = DAS(CrossBatchMemory(rec, embedding_size=4, memory_size=50), num_classes=2, embedding_size=4,
              num_produce=2, exclude_own_copies=True)
    das(l2_normalize(torch.randn(3, 4)), torch.tensor([0, 1, 0]))
    idx = torch.arange(9) % 3
    same_source = idx.unsqueeze(1) == idx.unsqueeze(0)
    batch_mask, memory_mask = rec.masks
    assert torch.equal(batch_mask, same_source)
    assert torch.equal(memory_mask, same_source)  # the 9 rows sit in slots 0..8, in order


def test_iaa_over_memory_enqueues_the_normalised_real_rows() -> None:
    ms = MultiSimilarityLoss(2.0, 40.0, 0.5, mining=False)
    z, y = torch.randn(6, 2, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 2])
    stats_z, stats_y = torch.randn(30, 2, dtype=torch.float64), torch.arange(30) % 3
    plain = IAA(ms, num_classes=3, embedding_size=2, start_epoch=0, seed=5).double()
    stacked = IAA(CrossBatchMemory(ms, embedding_size=2, memory_size=50), num_classes=3, embedding_size=2,
                  start_epoch=0, seed=5).double()
    for method in (plain, stacked):
        method.estimator.update(stats_z, stats_y)
    criterion = Criterion(stacked)
    total, logs = criterion(z, y, epoch=0)
    expected_batch = plain(z, y)
    memory = stacked.loss
    torch.testing.assert_close(memory.memory_embeddings, l2_normalize(z), rtol=0, atol=0)
    assert torch.equal(memory.last_logs["batch_loss"], expected_batch.detach())
    torch.testing.assert_close(total.detach(), memory.last_logs["batch_loss"] + memory.last_logs["memory_loss"])
    assert logs["iaa_active"] == 1.0 and {"batch_loss", "memory_loss", "iaa_lambda"} <= set(logs)
    assert logs["loss"] == pytest.approx(float(total))


def test_synthesis_refuses_references_and_a_miner_above_a_wrapper() -> None:
    base = MultiSimilarityLoss()
    das = DAS(base, num_classes=2, embedding_size=4)
    with pytest.raises(ValueError, match="DAS\\(CrossBatchMemory"):
        das(torch.randn(2, 4), torch.tensor([0, 1]), torch.randn(3, 4), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="innermost"):
        DAS(CrossBatchMemory(base, embedding_size=4, memory_size=8), MultiSimilarityMiner(), num_classes=2,
            embedding_size=4)
    with pytest.raises(ValueError, match="twice"):
        DAS(CrossBatchMemory(base, embedding_size=4, memory_size=8), num_classes=2, embedding_size=4, aux_loss=True)


# ------------------------------------------------------------------------------------------- the builder -----
def _config(**sections: dict) -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.model.embedding_size = 8
    for name, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, name), key, value)
    return cfg


def test_builder_composes_memory_miner_and_synthesis() -> None:
    cfg = _config(
        loss={"name": "contrastive", "miner": "multi_similarity"},
        memory={"name": "xbm", "params": {"memory_size": 32, "start_iteration": 2, "weight": 0.5,
                                          "enqueue_count": 4, "fill_during_warmup": True,
                                          "include_batch_loss": False, "dtype": "float64"}},
        synthesis={"name": "das", "params": {"num_produce": 1}},
    )
    criterion = build_criterion(cfg, num_classes=4)
    das, memory = criterion.loss, criterion.loss.loss
    assert isinstance(das, DAS) and isinstance(memory, CrossBatchMemory) and isinstance(memory.loss, ContrastiveLoss)
    assert isinstance(memory.miner, MultiSimilarityMiner) and das.miner is None and criterion.miner is None
    assert (memory.memory_size, memory.start_iteration, memory.weight, memory.enqueue_count) == (32, 2, 0.5, 4)
    assert memory.fill_during_warmup and not memory.include_batch_loss
    assert memory.embedding_memory.dtype == torch.float64 and memory.embedding_size == 8
    emb, labels = l2_normalize(torch.randn(8, 8)), torch.arange(8) % 4
    for step in (1, 2, 3):
        _, logs = criterion(emb, labels, step=step, epoch=0)
    assert {"loss", "memory_loss", "das_mean_shift"} <= set(logs) and "batch_loss" not in logs

    bare = build_criterion(_config(loss={"name": "contrastive", "miner": "multi_similarity"}), num_classes=4)
    assert isinstance(bare.miner, MultiSimilarityMiner) and not isinstance(bare.loss, LossWrapper)
    iaa = build_criterion(_config(model={"normalize": False}, loss={"name": "contrastive", "miner": "batch_hard"},
                                  synthesis={"name": "iaa", "params": {}}), num_classes=4, batches_per_epoch=5)
    assert iaa.loss.miner is not None and iaa.loss.total_epochs == 120  # 600 iterations ÷ 5 per epoch


@pytest.mark.parametrize("sections, message", [
    ({"loss": {"name": "proxy_anchor", "miner": "multi_similarity"}}, "takes no mined pairs"),
    ({"loss": {"name": "proxy_nca"}, "memory": {"name": "xbm", "params": {"memory_size": 8}}},
     "ignores reference rows"),
    ({"loss": {"name": "proxy_anchor"}, "model": {"normalize": False}, "synthesis": {"name": "iaa"}},
     "only as reference rows"),
    ({"memory": {"name": "xbm", "params": {"memory_size": 8}},
      "synthesis": {"name": "das", "params": {"aux_loss": True}}}, "twice"),
    ({"synthesis": {"name": "das", "params": {"loss": "x"}}}, "loss cannot be set here"),
    ({"memory": {"name": "queue"}}, "unknown memory.name 'queue'"),
    ({"memory": {"name": "xbm", "params": {"memory_size": 8, "dtype": "int8"}}}, "memory.params.dtype"),
    ({"memory": {"name": "xbm", "params": {"size": 8}}}, "memory.params"),
])
def test_builder_refuses_meaningless_combinations_and_says_why(sections: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_criterion(_config(**sections), num_classes=4)


def test_old_memory_shape_is_a_clear_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"memory.enabled' was removed.*name: xbm, params"):
        load_config(None, ["memory.enabled=true"])
    old = tmp_path / "old.yaml"
    old.write_text("memory:\n  memory_size: 100\n")
    with pytest.raises(ConfigError, match=r"old.yaml: config key 'memory.memory_size' was removed"):
        load_config(old)


def test_loss_side_parameter_groups_follow_each_module_multiplier() -> None:
    cfg = _config(model={"normalize": False}, loss={"name": "proxy_anchor"}, synthesis={"name": "mdr"})
    criterion = build_criterion(cfg, num_classes=4)
    assert isinstance(criterion.loss, MDR)
    groups = criterion.parameter_groups()
    by_mult = {g["lr_multiplier"]: g["params"] for g in groups}
    assert set(by_mult) == {100.0, 1.0}
    assert by_mult[100.0] == [criterion.loss.loss.proxies] and by_mult[1.0] == [criterion.loss.regularizer.levels]
    single = criterion.parameter_groups(3.0)
    assert len(single) == 1 and single[0]["lr_multiplier"] == 3.0 and len(single[0]["params"]) == 2
    cfg.optimizer.lr = 1e-4
    optimizer = build_optimizer(cfg.optimizer, nn.Linear(2, 2), criterion)
    lrs = sorted(g["lr"] for g in optimizer.param_groups)
    assert lrs == pytest.approx([1e-4, 1e-4, 1e-2])  # head, levels ×1, proxies ×100


def test_hooks_reach_nested_modules_and_features_flow_through_the_criterion() -> None:
    torch.manual_seed(1)
    cfg = _config(model={"normalize": False}, memory={"name": "xbm", "params": {"memory_size": 16}},
                  synthesis={"name": "iaa", "params": {"start_epoch": 0, "update_every": 1}})
    criterion = build_criterion(cfg, num_classes=4)
    assert not criterion.needs_features
    model = nn.Linear(5, 8)
    x, y = torch.randn(16, 5), torch.arange(16) % 4
    criterion.on_epoch_start(0, model, [(x, y)])
    assert bool(criterion.loss.estimator.initialized)
    _, logs = criterion(model(x), y, step=1, epoch=0)
    assert logs["iaa_active"] == 1.0 and "memory_loss" in logs

    sgar_cfg = _config(loss={"name": "multi_similarity"}, memory={"name": "xbm", "params": {"memory_size": 16}},
                       synthesis={"name": "sgar", "params": {"gate": "all"}})
    sgar = build_criterion(sgar_cfg, num_classes=4)
    assert sgar.needs_features
    head = nn.Linear(6, 8)
    features = torch.randn(16, 6, requires_grad=True)
    loss, logs = sgar(l2_normalize(head(features)), y, features=features, head=head, step=1, epoch=0)
    loss.backward()
    assert "sgar_rank" in logs and "memory_loss" in logs and head.weight.grad.abs().sum() > 0
