"""Cross-batch memory: ring buffer mechanics, self-pair exclusion by slot id, gating, state, MS + XBM by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from deepmetric.losses.base import MetricLoss
from deepmetric.memory import CrossBatchMemory


class SpyLoss(MetricLoss):
    """Records every call (reference size, ignore mask) and returns a differentiable value that depends on it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def compute(self, embeddings, labels, ref_embeddings, ref_labels, ignore_mask, mined=None):
        self.calls.append({
            "ref": ref_embeddings.detach().clone(), "ref_labels": ref_labels.clone(),
            "ignore": None if ignore_mask is None else ignore_mask.clone(),
        })
        valid = torch.ones(embeddings.shape[0], ref_embeddings.shape[0], dtype=torch.bool)
        if ignore_mask is not None:
            valid &= ~ignore_mask
        sim = embeddings @ ref_embeddings.t()
        return (sim * valid).sum() / embeddings.shape[0]


class PositiveCount(MetricLoss):
    """Number of positive pairs the loss may use (a plain count, to see which pairs survive the masks)."""

    def compute(self, embeddings, labels, ref_embeddings, ref_labels, ignore_mask, mined=None):
        pos = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
        if ignore_mask is not None:
            pos &= ~ignore_mask
        return pos.sum().to(embeddings.dtype) + 0.0 * embeddings.sum()


def batches(n_steps: int, batch: int, dim: int = 3, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, dim, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (batch,), generator=g)) for _ in range(n_steps)]


# -- ring buffer -------------------------------------------------------------------------------------------------
def test_wrap_around_memory5_batch2() -> None:
    xbm = CrossBatchMemory(SpyLoss(), embedding_size=3, memory_size=5, dtype=torch.float64)
    data = batches(4, 2)
    expected_slots = [(0, 1), (2, 3), (4, 0), (1, 2)]
    for step, ((emb, lab), slots) in enumerate(zip(data, expected_slots)):
        xbm(emb, lab)
        ids = (2 * step, 2 * step + 1)
        for row, slot in enumerate(slots):
            assert int(xbm.slot_ids[slot]) == ids[row]
            torch.testing.assert_close(xbm.embedding_memory[slot], emb[row])
            assert int(xbm.label_memory[slot]) == int(lab[row])
        assert int(xbm.write_ptr) == (2 * (step + 1)) % 5
        assert int(xbm.num_filled) == min(5, 2 * (step + 1))
    assert xbm.is_full
    # the slot ids after step 4: slot 0 ← id 5, 1 ← 6, 2 ← 7, 3 ← 3, 4 ← 4
    assert xbm.slot_ids.tolist() == [5, 6, 7, 3, 4]
    assert int(xbm.iteration) == 4


def test_memory_view_grows_until_full() -> None:
    spy = SpyLoss()
    xbm = CrossBatchMemory(spy, embedding_size=3, memory_size=5, dtype=torch.float64)
    sizes = []
    for emb, lab in batches(4, 2):
        xbm(emb, lab)
        sizes.append(spy.calls[-1]["ref"].shape[0])  # last call = the memory term
    assert sizes == [2, 4, 5, 5]


def test_batch_larger_than_memory_keeps_last_rows() -> None:
    spy = SpyLoss()
    xbm = CrossBatchMemory(spy, embedding_size=3, memory_size=3, dtype=torch.float64)
    emb, lab = batches(1, 5)[0]
    xbm(emb, lab)
    torch.testing.assert_close(xbm.embedding_memory[torch.tensor([0, 1, 2])], emb[2:])
    ignore = spy.calls[-1]["ignore"]
    expected = torch.zeros(5, 3, dtype=torch.bool)
    expected[2, 0] = expected[3, 1] = expected[4, 2] = True
    assert torch.equal(ignore, expected)


def test_state_dict_round_trip_mid_wrap() -> None:
    data = batches(6, 2, seed=3)

    def make() -> CrossBatchMemory:
        return CrossBatchMemory(SpyLoss(), embedding_size=3, memory_size=5, start_iteration=1, dtype=torch.float64)

    a = make()
    for emb, lab in data[:3]:  # step 3 wrote slots 4, 0 (memory written from step 2 on: slots 0-1, 2-3)
        a(emb, lab)
    state = a.state_dict()
    for key in ("embedding_memory", "label_memory", "slot_ids", "write_ptr", "num_filled", "next_id", "iteration"):
        assert key in state
    b = make()
    b.load_state_dict(state)
    for emb, lab in data[3:]:
        la, lb = a(emb, lab), b(emb, lab)
        assert torch.equal(la, lb)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    # the check has teeth: a module that is not restored gives a different next loss
    restored, fresh = make(), make()
    restored.load_state_dict(state)
    assert not torch.equal(restored(*data[3]), fresh(*data[3]))


# -- self-pair exclusion -------------------------------------------------------------------------------------------
def test_self_pairs_excluded_by_slot_even_with_exact_duplicates() -> None:
    spy = SpyLoss()
    xbm = CrossBatchMemory(spy, embedding_size=3, memory_size=8, dtype=torch.float64)
    first, _ = batches(1, 2, seed=1)[0]
    xbm(first, torch.tensor([0, 1]))  # occupies slots 0, 1
    a = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    emb = torch.stack([a, a.clone(), a.clone(), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)])
    lab = torch.tensor([0, 0, 1, 1])
    xbm(emb, lab)  # rows 0..3 → slots 2..5
    ignore = spy.calls[-1]["ignore"]
    expected = torch.zeros(4, 6, dtype=torch.bool)
    for row in range(4):
        expected[row, 2 + row] = True
    assert torch.equal(ignore, expected)

    counter = CrossBatchMemory(PositiveCount(), embedding_size=3, memory_size=8, dtype=torch.float64)
    counter(first, torch.tensor([0, 1]))
    counter(emb, lab)
    # memory labels [0,1, 0,0,1,1]; positives by anchor (own slot excluded): row0: slot0 + row1's copy = 2,
    # row1: 2, row2: slot1 + row3 = 2, row3: 2. The exact duplicate (rows 0/1, S = 1) is kept.
    assert float(counter.last_logs["memory_loss"]) == 8.0
    # the in-batch term also keeps the duplicate pair (0, 1): positives (0,1), (1,0), (2,3), (3,2)
    assert float(counter.last_logs["batch_loss"]) == 4.0


def test_partial_enqueue_count_fraction_and_mask() -> None:
    emb, lab = batches(1, 4, seed=2)[0]
    spy = SpyLoss()
    xbm = CrossBatchMemory(spy, embedding_size=3, memory_size=10, enqueue_count=1, dtype=torch.float64)
    xbm(emb, lab)
    assert int(xbm.num_filled) == 1
    assert torch.equal(spy.calls[-1]["ignore"], torch.tensor([[True], [False], [False], [False]]))

    xbm = CrossBatchMemory(SpyLoss(), embedding_size=3, memory_size=10, enqueue_fraction=0.5, dtype=torch.float64)
    xbm(emb, lab)
    torch.testing.assert_close(xbm.memory_embeddings, emb[:2])

    spy = SpyLoss()
    xbm = CrossBatchMemory(spy, embedding_size=3, memory_size=10, dtype=torch.float64)
    xbm(emb, lab, enqueue_mask=torch.tensor([False, True, False, True]))
    torch.testing.assert_close(xbm.memory_embeddings, emb[[1, 3]])
    expected = torch.zeros(4, 2, dtype=torch.bool)
    expected[1, 0] = expected[3, 1] = True
    assert torch.equal(spy.calls[-1]["ignore"], expected)


# -- gating ------------------------------------------------------------------------------------------------------
def test_start_iteration_gating_default_enqueues_only_when_active() -> None:
    spy = SpyLoss()
    xbm = CrossBatchMemory(spy, embedding_size=3, memory_size=20, start_iteration=2, weight=0.5,
                           dtype=torch.float64)
    data = batches(3, 2, seed=4)
    for emb, lab in data[:2]:
        n_calls = len(spy.calls)
        loss = xbm(emb, lab)
        assert len(spy.calls) == n_calls + 1  # batch term only
        assert xbm.last_logs.get("memory_loss") is None and torch.equal(loss, xbm.last_logs["batch_loss"])
        assert int(xbm.num_filled) == 0
    loss = xbm(*data[2])  # step 3 > start_iteration 2: enqueue, then memory = this batch only
    assert int(xbm.iteration) == 3 and int(xbm.num_filled) == 2
    assert spy.calls[-1]["ref"].shape[0] == 2
    torch.testing.assert_close(loss, xbm.last_logs["batch_loss"] + 0.5 * xbm.last_logs["memory_loss"])


def test_fill_during_warmup_and_memory_only_mode() -> None:
    spy = SpyLoss()
    xbm = CrossBatchMemory(spy, embedding_size=3, memory_size=20, start_iteration=2, fill_during_warmup=True,
                           include_batch_loss=False, dtype=torch.float64)
    data = batches(3, 2, seed=5)
    for emb, lab in data[:2]:
        xbm(emb, lab)
        assert xbm.last_logs.get("memory_loss") is None
    assert int(xbm.num_filled) == 4
    n_calls = len(spy.calls)
    loss = xbm(*data[2])
    assert len(spy.calls) == n_calls + 1  # memory term only
    assert spy.calls[-1]["ref"].shape[0] == 6
    assert xbm.last_logs.get("batch_loss") is None and torch.equal(loss, xbm.last_logs["memory_loss"])


def test_eval_mode_reads_without_changing_state() -> None:
    xbm = CrossBatchMemory(SpyLoss(), embedding_size=3, memory_size=5, dtype=torch.float64)
    data = batches(2, 2, seed=6)
    xbm(*data[0])
    before = {k: v.clone() for k, v in xbm.state_dict().items()}
    xbm.eval()
    xbm(*data[1])
    assert xbm.last_logs.get("memory_loss") is not None
    for key, value in xbm.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_memory_is_detached_and_grads_reach_anchors() -> None:
    xbm = CrossBatchMemory(SpyLoss(), embedding_size=3, memory_size=5, dtype=torch.float64)
    emb, lab = batches(1, 2)[0]
    emb.requires_grad_(True)
    xbm(emb, lab).backward()
    assert emb.grad is not None and not xbm.embedding_memory.requires_grad


def test_errors() -> None:
    xbm = CrossBatchMemory(SpyLoss(), embedding_size=3, memory_size=5)
    with pytest.raises(ValueError, match="embedding_size"):
        xbm(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one label per row"):
        xbm(torch.randn(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="not both"):
        CrossBatchMemory(SpyLoss(), embedding_size=3, memory_size=5, enqueue_fraction=0.5, enqueue_count=2)
    with pytest.raises(ValueError, match="enqueue_fraction"):
        CrossBatchMemory(SpyLoss(), embedding_size=3, memory_size=5, enqueue_fraction=0.0)
    with pytest.raises(ValueError, match="enqueue_mask"):
        xbm(torch.randn(2, 3), torch.tensor([0, 1]), enqueue_mask=torch.tensor([1, 0]))


# -- MS + XBM against a hand-written brute force --------------------------------------------------------------------
def _ms_brute_force(anchors: list[list[float]], labels: list[int], cands: list[list[float]], cand_labels: list[int],
                    own: list[int | None], alpha: float, beta: float, lam: float, eps: float) -> float:
    """methods.md §4.2 with explicit loops; the anchor's own candidate (index ``own[i]``) is skipped by index."""

    def cos(u: list[float], v: list[float]) -> float:
        return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))

    total = 0.0
    for i, (u, y) in enumerate(zip(anchors, labels)):
        pos0 = [cos(u, v) for j, (v, c) in enumerate(zip(cands, cand_labels)) if c == y and j != own[i]]
        neg0 = [cos(u, v) for j, (v, c) in enumerate(zip(cands, cand_labels)) if c != y and j != own[i]]
        if not pos0 or not neg0:
            continue
        neg = [s for s in neg0 if s + eps > min(pos0)]
        pos = [s for s in pos0 if s - eps < max(neg0)]
        if not pos or not neg:
            continue
        total += math.log(1 + sum(math.exp(-alpha * (s - lam)) for s in pos)) / alpha
        total += math.log(1 + sum(math.exp(beta * (s - lam)) for s in neg)) / beta
    return total / len(anchors)


def test_ms_plus_xbm_equals_brute_force() -> None:
    from deepmetric.losses import MultiSimilarityLoss

    alpha, beta, lam, eps, weight = 2.0, 40.0, 0.5, 0.1, 0.5
    angles1, labels1 = [0.0, 35.0, 100.0], [0, 0, 1]
    angles2, labels2 = [20.0, 60.0, 90.0], [0, 1, 0]

    def pts(angles: list[float]) -> list[list[float]]:
        return [[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles]

    b1, b2 = pts(angles1), pts(angles2)
    xbm = CrossBatchMemory(MultiSimilarityLoss(alpha=alpha, beta=beta, base=lam, epsilon=eps), embedding_size=2,
                           memory_size=4, weight=weight, dtype=torch.float64)
    xbm(torch.tensor(b1, dtype=torch.float64), torch.tensor(labels1))
    emb2 = torch.tensor(b2, dtype=torch.float64, requires_grad=True)
    loss = xbm(emb2, torch.tensor(labels2))

    # ring of 4 after batches of 3: step 1 → slots 0,1,2; step 2 → slots 3,0,1
    memory = [b2[1], b2[2], b1[2], b2[0]]
    memory_labels = [labels2[1], labels2[2], labels1[2], labels2[0]]
    own_slot = [3, 0, 1]
    l_batch = _ms_brute_force(b2, labels2, b2, labels2, [0, 1, 2], alpha, beta, lam, eps)
    l_memory = _ms_brute_force(b2, labels2, memory, memory_labels, own_slot, alpha, beta, lam, eps)
    assert l_memory > 0 and l_batch > 0 and abs(l_memory - l_batch) > 1e-3  # the memory term is not a copy
    assert float(xbm.last_logs["batch_loss"]) == pytest.approx(l_batch, abs=1e-10)
    assert float(xbm.last_logs["memory_loss"]) == pytest.approx(l_memory, abs=1e-10)
    assert float(loss.detach()) == pytest.approx(l_batch + weight * l_memory, abs=1e-10)
    loss.backward()
    assert torch.isfinite(emb2.grad).all() and emb2.grad.abs().sum() > 0
