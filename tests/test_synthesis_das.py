"""DAS: DFS frequency recorder, MTS banks, production (methods.md §6.2, §9 vector), wrapper semantics."""

from __future__ import annotations

import io
from collections import deque

import pytest
import torch
from torch import nn

from deepmetric.functional import l2_normalize
from deepmetric.losses import MultiSimilarityLoss
from deepmetric.synthesis import DAS, DASProducer, das_transform

E9 = torch.tensor([[0.5, -0.2, 0.7, 0.1, 0.3, 0.0]], dtype=torch.float64)
F9 = torch.tensor([5, 0, 9, 2, 7, 1])
T9 = torch.tensor([0.1, 0.0, -0.1, 0.2, 0.0, 0.05], dtype=torch.float64)
PRE9 = torch.tensor([[0.501, -0.2, 0.706, 0.102, 0.297, 0.0005]], dtype=torch.float64)
NORM9 = torch.tensor([[0.531642, -0.212232, 0.749180, 0.108238, 0.315165, 0.000531]], dtype=torch.float64)


def _section9_producer(normalize: bool) -> DASProducer:
    prod = DASProducer(1, 6, num_produce=1, dfs_num_scale=2, mts_scale=0.01, normalize=normalize).double()
    prod.frequency[0] = F9
    prod.bank[0, 0] = T9
    prod.bank_count[0] = 1
    return prod


@pytest.mark.parametrize("normalize, expected", [(False, PRE9), (True, NORM9)])
def test_das_production_section9(normalize, expected):
    prod = _section9_producer(normalize)
    y = torch.tensor([0])
    assert prod.class_dims(y).sort().values.tolist() == [[2, 4]]
    scales = torch.tensor([[[1.01, 0.99]]], dtype=torch.float64)  # for dims (2, 4) in top-k order
    out = prod.produce(E9, y, scales=scales)  # bank row drawn at random: the only stored row is T9
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # the pure function with everything injected
    pure = das_transform(E9, torch.tensor([[2, 4]]), scales[0], T9.unsqueeze(0), 0.01, normalize)
    torch.testing.assert_close(pure, expected, atol=1e-6, rtol=0)


def test_frequency_recorder_counts_top_k_signed_values():
    prod = DASProducer(3, 5, dfs_num_scale=2)
    e = torch.tensor([[0.9, -2.0, 0.1, 0.5, 0.0], [-1.0, 0.2, 0.3, 0.0, 0.1], [0.0, 0.0, 0.0, 4.0, 3.0]])
    y = torch.tensor([1, 1, 2])
    prod.update(e, y)
    prod.update(e[:1], y[:1])
    expected = torch.zeros(3, 5, dtype=torch.long)
    expected[1, [0, 3]] += 2  # sample 0 twice (−2.0 is large in magnitude but not in signed value)
    expected[1, [1, 2]] += 1
    expected[2, [3, 4]] += 1
    assert torch.equal(prod.frequency, expected)


def test_banks_are_per_class_fifo_of_intra_class_differences():
    torch.manual_seed(0)
    q = 4
    prod = DASProducer(3, 2, bank_size=q, dfs_num_scale=1)
    oracle = {c: deque(maxlen=q) for c in range(3)}
    batches = [
        (torch.randn(4, 2), torch.tensor([0, 0, 1, 1])),
        (torch.randn(6, 2), torch.tensor([0, 0, 0, 2, 1, 1])),  # class 0 sends 6 rows > Q
        (torch.randn(3, 2), torch.tensor([2, 1, 0])),  # no pairs at all
    ]
    dup = torch.tensor([[0.3, 0.3], [0.3, 0.3], [0.1, 0.2]])
    batches.append((dup, torch.tensor([1, 1, 1])))  # exact duplicates: their zero differences are dropped
    for e, y in batches:
        prod.update(e, y)
        for a in range(len(y)):
            for b in range(len(y)):
                if a != b and y[a] == y[b] and bool((e[a] - e[b]).ne(0).any()):
                    oracle[int(y[a])].append(e[a] - e[b])
    for c in range(3):
        count = int(prod.bank_count[c])
        assert count == len(oracle[c])
        stored = prod.bank[c, :count] if count < q else torch.roll(prod.bank[c], -int(prod.bank_ptr[c]), 0)
        expected = torch.stack(list(oracle[c])) if oracle[c] else torch.zeros(0, 2)
        torch.testing.assert_close(stored, expected)
    assert int(prod.bank_count[2]) == 0


def test_empty_bank_gives_zero_shift_and_scales_lie_in_range():
    prod = DASProducer(2, 8, num_produce=5, dfs_num_scale=3, scale_left=0.5, scale_right=2.0, seed=1)
    y = torch.tensor([0, 1, 1])
    assert torch.equal(prod.sample_shifts(y, torch.float32), torch.zeros(5, 3, 8))
    s = prod.sample_scales(1000, torch.device("cpu"), torch.float32)
    assert s.shape == (5, 1000, 3) and s.min() >= 0.5 and s.max() < 2.0 and s.std() > 0.3


def test_wrapper_shapes_every_row_an_anchor_and_mts_scaling():
    torch.manual_seed(1)
    base = MultiSimilarityLoss(mining=False)
    das = DAS(base, num_classes=4, embedding_size=8, num_produce=3, seed=7)
    e, y = l2_normalize(torch.randn(8, 8)), torch.arange(8) % 4
    e_all, y_all, is_syn = das.producer(e, y)
    assert e_all.shape == (32, 8) and y_all.tolist() == y.tolist() * 4 and int(is_syn.sum()) == 24
    torch.testing.assert_close(e_all[8:].norm(dim=1), torch.ones(24))
    # wrapper = base loss on [E; Ẽ¹; Ẽ²; Ẽ³] (all rows anchors) with the same draws
    das = DAS(base, num_classes=4, embedding_size=8, num_produce=3, seed=7)
    loss = das(e, y)
    logs = das.last_logs
    expected = base(*DAS(base, num_classes=4, embedding_size=8, num_produce=3, seed=7).producer(e, y)[:2])
    torch.testing.assert_close(loss, expected)
    assert logs["loss"] == pytest.approx(float(loss)) and logs["das_mean_shift"] > 0


def test_zero_produce_gives_base_loss_and_aux_loss_formula():
    torch.manual_seed(2)
    base = MultiSimilarityLoss(mining=False)
    e, y = l2_normalize(torch.randn(8, 6)), torch.arange(8) % 4
    assert torch.equal(DAS(base, num_classes=4, embedding_size=6, num_produce=0)(e, y), base(e, y))
    aux = DAS(base, num_classes=4, embedding_size=6, aux_loss=True, aux_loss_weight=0.3, seed=4)(e, y)
    e_all, y_all, _ = DAS(base, num_classes=4, embedding_size=6, seed=4).producer(e, y)
    torch.testing.assert_close(aux, base(e, y) + 0.3 * base(e_all, y_all))


def test_detach_and_gradient_flow():
    e = l2_normalize(torch.randn(4, 6)).requires_grad_(True)
    y = torch.tensor([0, 0, 1, 1])
    assert not DASProducer(2, 6, detach=True).produce(e, y).requires_grad
    out = DASProducer(2, 6, detach=False).produce(e, y)
    out.sum().backward()
    assert e.grad is not None and e.grad.abs().sum() > 0


def test_exclude_own_copies_option_masks_same_source_pairs():
    class Rec(nn.Module):
        def forward(self, emb, lab, ref=None, ref_lab=None, *, ignore_mask=None):
            self.mask = ignore_mask
            return emb.sum()

    rec = Rec()
    das = DAS(rec, num_classes=2, embedding_size=4, num_produce=2, exclude_own_copies=True)
    das(l2_normalize(torch.randn(3, 4)), torch.tensor([0, 1, 0]))
    idx = torch.arange(9) % 3
    assert torch.equal(rec.mask, idx.unsqueeze(1) == idx.unsqueeze(0))


def test_statistics_update_only_in_training_mode():
    das = DAS(MultiSimilarityLoss(mining=False), num_classes=2, embedding_size=4)
    e, y = l2_normalize(torch.randn(4, 4)), torch.tensor([0, 0, 1, 1])
    das.eval()
    das(e, y)
    assert int(das.producer.frequency.sum()) == 0 and int(das.producer.bank_count.sum()) == 0
    das.train()
    das(e, y)
    assert int(das.producer.frequency.sum()) == 4 * 4 and das.producer.bank_count.tolist() == [2, 2]


def test_state_dict_round_trip_gives_identical_next_outputs():
    torch.manual_seed(3)
    base = MultiSimilarityLoss(mining=False)
    das = DAS(base, num_classes=5, embedding_size=8, seed=11)
    for _ in range(3):
        das(l2_normalize(torch.randn(10, 8)), torch.randint(0, 5, (10,)))
    buf = io.BytesIO()
    torch.save(das.state_dict(), buf)
    buf.seek(0)
    fresh = DAS(base, num_classes=5, embedding_size=8, seed=0)
    fresh.load_state_dict(torch.load(buf))
    for name in ("frequency", "bank", "bank_ptr", "bank_count"):
        assert torch.equal(getattr(fresh.producer, name), getattr(das.producer, name))
    e, y = l2_normalize(torch.randn(10, 8)), torch.randint(0, 5, (10,))
    for _ in range(2):
        assert torch.equal(das(e, y), fresh(e, y))


def test_clear_errors():
    with pytest.raises(ValueError, match="dfs_num_scale"):
        DASProducer(2, 4, dfs_num_scale=5)
    with pytest.raises(ValueError, match="num_classes"):
        DASProducer(2, 4).update(torch.zeros(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="scales"):
        DASProducer(2, 4, num_produce=1).produce(torch.zeros(2, 4), torch.tensor([0, 1]), scales=torch.ones(1, 2, 3))
