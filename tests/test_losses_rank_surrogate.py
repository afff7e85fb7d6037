"""Smooth-AP and the Recall@k surrogate: loop-based brute force of the ranking terms, the τ → 0 limits against
sorted exact AP / recall@k, references, query blocks, SiMix, gradcheck (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from deepmetric.functional import l2_normalize
from deepmetric.losses import LOSSES, MinedPairs, RecallSurrogateLoss, SmoothAPLoss

LABELS = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])
KS = (1, 2, 4)


def _embeddings(n: int = 9, dim: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _sim_lists(x: torch.Tensor, refs: torch.Tensor, normalize: bool = True) -> list[list[float]]:
    if normalize:
        x, refs = l2_normalize(x), l2_normalize(refs)
    return [[float((x[i] * refs[j]).sum()) for j in range(refs.shape[0])] for i in range(x.shape[0])]


def _query_sets(q: int, labels: list[int], ref_labels: list[int], ignore: list[list[bool]]):
    retrieval = [j for j in range(len(ref_labels)) if not ignore[q][j]]
    return retrieval, [j for j in retrieval if ref_labels[j] == labels[q]]


def _smooth_rank(s: list[float], p: int, items: list[int], tau: float) -> float:
    return 1.0 + sum(_sigmoid((s[j] - s[p]) / tau) for j in items if j != p)


def brute_smooth_ap(sim, labels, ref_labels, ignore, tau: float) -> float:
    losses = []
    for q in range(len(labels)):
        retrieval, positives = _query_sets(q, labels, ref_labels, ignore)
        if positives:
            ap = sum(_smooth_rank(sim[q], p, positives, tau) / _smooth_rank(sim[q], p, retrieval, tau)
                     for p in positives) / len(positives)
            losses.append(1.0 - ap)
    return sum(losses) / max(len(losses), 1)


def brute_recall(sim, labels, ref_labels, ignore, tau1: float, tau2: float, ks=KS) -> float:
    losses = []
    for q in range(len(labels)):
        retrieval, positives = _query_sets(q, labels, ref_labels, ignore)
        if positives:
            recalls = []
            for k in ks:
                hits = sum(_sigmoid((k - _smooth_rank(sim[q], p, retrieval, tau1)) / tau2) for p in positives)
                recalls.append(min(hits, k) / min(k, len(positives)))
            losses.append(1.0 - sum(recalls) / len(recalls))
    return sum(losses) / max(len(losses), 1)


def _self_ignore(n: int) -> list[list[bool]]:
    return torch.eye(n, dtype=torch.bool).tolist()


def test_registered_under_yaml_names() -> None:
    assert LOSSES["smooth_ap"] is SmoothAPLoss and LOSSES["recall_surrogate"] is RecallSurrogateLoss


def test_smooth_ap_equals_brute_force() -> None:
    x = _embeddings()
    expected = brute_smooth_ap(_sim_lists(x, x), LABELS.tolist(), LABELS.tolist(), _self_ignore(9), 0.05)
    assert float(SmoothAPLoss(0.05)(x, LABELS)) == pytest.approx(expected, abs=1e-12)
    # the paper's default τ as well (steeper, values near 0 / 1)
    expected = brute_smooth_ap(_sim_lists(x, x), LABELS.tolist(), LABELS.tolist(), _self_ignore(9), 0.01)
    assert float(SmoothAPLoss()(x, LABELS)) == pytest.approx(expected, abs=1e-12)


def test_recall_surrogate_equals_brute_force() -> None:
    x = _embeddings(seed=1)
    sim = _sim_lists(x, x)
    expected = brute_recall(sim, LABELS.tolist(), LABELS.tolist(), _self_ignore(9), 0.05, 1.0)
    assert float(RecallSurrogateLoss(KS, 0.05, 1.0)(x, LABELS)) == pytest.approx(expected, abs=1e-12)
    # one temperature per k
    loss = RecallSurrogateLoss(KS, 0.05, [0.5, 1.0, 2.0])
    per_k = [brute_recall(sim, LABELS.tolist(), LABELS.tolist(), _self_ignore(9), 0.05, t, (k,))
             for k, t in zip(KS, (0.5, 1.0, 2.0))]
    assert float(loss(x, LABELS)) == pytest.approx(sum(per_k) / 3, abs=1e-12)


def test_references_and_ignore_mask_equal_brute_force() -> None:
    x, memory = _embeddings(seed=2), _embeddings(n=12, seed=3)
    memory_labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4, 4, 0, 2])
    ignore = torch.zeros(9, 12, dtype=torch.bool)
    ignore[0, 0] = ignore[4, 1] = ignore[6, 2] = True
    sim = _sim_lists(x, memory)
    for mask in (None, ignore):
        rows = torch.zeros(9, 12, dtype=torch.bool) if mask is None else mask
        args = (sim, LABELS.tolist(), memory_labels.tolist(), rows.tolist())
        value = SmoothAPLoss(0.05)(x, LABELS, memory, memory_labels, ignore_mask=mask)
        assert float(value) == pytest.approx(brute_smooth_ap(*args, 0.05), abs=1e-12)
        value = RecallSurrogateLoss(KS, 0.05)(x, LABELS, memory, memory_labels, ignore_mask=mask)
        assert float(value) == pytest.approx(brute_recall(*args, 0.05, 1.0), abs=1e-12)


def _exact_ranks(sim: list[float], retrieval: list[int], positives: list[int]) -> list[int]:
    order = sorted(retrieval, key=lambda j: -sim[j])
    return [order.index(p) + 1 for p in positives]


def _exact_ap_and_recall(x: torch.Tensor, labels: torch.Tensor, ks) -> tuple[float, float]:
    sim, lab = _sim_lists(x, x), labels.tolist()
    aps, recall_losses = [], []
    for q in range(len(lab)):
        retrieval, positives = _query_sets(q, lab, lab, _self_ignore(len(lab)))
        if not positives:
            continue
        ranks = sorted(_exact_ranks(sim[q], retrieval, positives))
        aps.append(sum((i + 1) / r for i, r in enumerate(ranks)) / len(ranks))
        recall = [sum(r <= k for r in ranks) / min(k, len(ranks)) for k in ks]
        recall_losses.append(1.0 - sum(recall) / len(recall))
    return 1.0 - sum(aps) / len(aps), sum(recall_losses) / len(recall_losses)


def _min_gap(x: torch.Tensor) -> float:
    sim = l2_normalize(x) @ l2_normalize(x).t()
    gaps = (sim.reshape(-1, 1) - sim.reshape(1, -1)).abs()
    return float(gaps[gaps > 1e-12].min())


def test_small_temperatures_approach_exact_ap_and_recall() -> None:
    x = _embeddings(n=12, dim=6, seed=4)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3])
    tau = _min_gap(x) / 50  # every sigmoid of a similarity difference is within e^-50 of its step
    exact_ap, exact_recall = _exact_ap_and_recall(x, labels, KS)
    assert float(SmoothAPLoss(tau)(x, labels)) == pytest.approx(exact_ap, abs=1e-9)
    # at the default τ the surrogate is not the metric
    assert abs(float(SmoothAPLoss()(x, labels)) - exact_ap) > 1e-4
    # The recall step σ((k − r)/τ₂) is ½ for a positive at rank exactly k (the paper's formula): the limit counts
    # such a positive ½. This batch has positives at ranks 1, 2 and 4, so the limit is not recall@k there ...
    value = float(RecallSurrogateLoss(KS, tau, 1e-3)(x, labels))
    assert value == pytest.approx(_half_step_recall(x, labels, KS), abs=1e-9)
    assert abs(value - exact_recall) > 0.01


def _half_step_recall(x: torch.Tensor, labels: torch.Tensor, ks) -> float:
    sim, lab = _sim_lists(x, x), labels.tolist()
    losses = []
    for q in range(len(lab)):
        retrieval, positives = _query_sets(q, lab, lab, _self_ignore(len(lab)))
        ranks = _exact_ranks(sim[q], retrieval, positives)
        recall = [min(sum(1.0 if r < k else 0.5 if r == k else 0.0 for r in ranks), k) / min(k, len(ranks))
                  for k in ks]
        losses.append(1.0 - sum(recall) / len(recall))
    return sum(losses) / len(losses)


@pytest.mark.parametrize(("k", "seed"), [(3, 7), (4, 6), (5, 2)])
def test_recall_surrogate_limit_is_exact_recall_when_no_positive_sits_at_rank_k(k: int, seed: int) -> None:
    # ... and where no positive sits at rank exactly k (seeds chosen for that, asserted below) it is recall@k
    x = _embeddings(n=9, dim=3, seed=seed)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    sim, lab = _sim_lists(x, x), labels.tolist()
    ranks = [r for q in range(9) for r in _exact_ranks(sim[q], *_query_sets(q, lab, lab, _self_ignore(9)))]
    assert k not in ranks
    _, exact = _exact_ap_and_recall(x, labels, (k,))
    assert 0.0 < exact < 1.0
    assert float(RecallSurrogateLoss((k,), _min_gap(x) / 50, 1e-3)(x, labels)) == pytest.approx(exact, abs=1e-9)


@pytest.mark.parametrize("name", ["smooth_ap", "recall_surrogate"])
def test_query_blocks_equal_one_block(name: str) -> None:
    x = _embeddings(n=16, seed=5)
    labels = torch.arange(16) // 3
    kw = {"temperature": 0.05} if name == "smooth_ap" else {"rank_temperature": 0.05}
    values, grads = [], []
    for block in (10**9, 3 * 16, 7):  # one block; 1 query per block; fewer triples than one query has
        e = x.clone().requires_grad_()
        value = LOSSES[name](**kw, block_elements=block)(e, labels)
        value.backward()
        values.append(value.detach())
        grads.append(e.grad)
    for v, g in zip(values[1:], grads[1:]):
        assert torch.allclose(v, values[0], atol=1e-14) and torch.allclose(g, grads[0], atol=1e-13)


@pytest.mark.parametrize("loss", [SmoothAPLoss(0.1), SmoothAPLoss(0.1, block_elements=5),
                                  RecallSurrogateLoss(KS, 0.1), RecallSurrogateLoss(KS, 0.1, block_elements=5),
                                  RecallSurrogateLoss(KS, 0.1, simix=True, seed=3)],
                         ids=["smooth_ap", "smooth_ap_blocks", "recall", "recall_blocks", "recall_simix"])
def test_gradcheck_float64(loss) -> None:
    x = _embeddings(n=7, dim=4, seed=6).requires_grad_()
    memory = _embeddings(n=5, dim=4, seed=7).requires_grad_()
    labels, memory_labels = torch.tensor([0, 0, 1, 1, 1, 2, 3]), torch.tensor([0, 1, 2, 3, 1])

    def run(e: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        if isinstance(loss, RecallSurrogateLoss):
            loss.rng.manual_seed(3)  # the same α on every call of the numerical derivative
        return loss(e, labels) + loss(e, labels, m, memory_labels)

    assert torch.autograd.gradcheck(run, (x, memory), eps=1e-6, atol=1e-6)


def test_simix_adds_mixed_samples_as_queries_and_references() -> None:
    x = _embeddings(n=6, dim=4, seed=8)
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    loss = RecallSurrogateLoss(KS, 0.05, simix=True, seed=11)
    value = float(loss(x, labels))
    # the same draws by hand: pairs (0,1), (0,2), (1,2), (3,4); v = α x̂_i + (1 − α) x̂_j, not re-normalised
    alpha = torch.rand(4, 1, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    xn = l2_normalize(x)
    first, second = torch.tensor([0, 0, 1, 3]), torch.tensor([1, 2, 2, 4])
    rows = torch.cat([xn, alpha * xn[first] + (1 - alpha) * xn[second]])
    all_labels = torch.cat([labels, labels[first]]).tolist()
    sim = _sim_lists(rows, rows, normalize=False)
    assert value == pytest.approx(brute_recall(sim, all_labels, all_labels, _self_ignore(10), 0.05, 1.0), abs=1e-12)


def test_simix_is_deterministic_under_a_seed_and_saved_in_state_dict() -> None:
    x = _embeddings(n=12, dim=6, seed=9)
    labels = torch.arange(12) // 4
    a, b = RecallSurrogateLoss(simix=True, seed=5), RecallSurrogateLoss(simix=True, seed=5)
    first = a(x, labels)
    assert torch.equal(first, b(x, labels))
    assert not torch.allclose(first, RecallSurrogateLoss()(x, labels))  # the virtual samples change the loss
    assert not torch.equal(first, RecallSurrogateLoss(simix=True, seed=6)(x, labels))
    state = a.state_dict()
    second = a(x, labels)
    assert not torch.equal(first, second)  # the stream advances
    resumed = RecallSurrogateLoss(simix=True, seed=0)
    resumed.load_state_dict(state)
    assert torch.equal(resumed(x, labels), second)
    a.eval()  # like dropout: no virtual samples outside training
    assert torch.equal(a(x, labels), RecallSurrogateLoss()(x, labels))


def test_simix_with_memory_and_refusal_of_mined() -> None:
    x, memory = _embeddings(n=6, seed=10), _embeddings(n=4, seed=12)
    labels, memory_labels = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 2, 3])
    loss = RecallSurrogateLoss(simix=True)
    assert torch.isfinite(loss(x, labels, memory, memory_labels, ignore_mask=torch.zeros(6, 4, dtype=torch.bool)))
    mined = MinedPairs(torch.ones(6, 6, dtype=torch.bool), torch.ones(6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="simix=True does not take mined"):
        loss(x, labels, mined=mined)


def test_mined_pairs_restrict_positives_and_retrieval_set() -> None:
    x = _embeddings(seed=13)
    positive = torch.zeros(9, 9, dtype=torch.bool)
    negative = torch.zeros(9, 9, dtype=torch.bool)
    positive[0, 1] = positive[3, 4] = True
    negative[0, 3] = negative[0, 5] = negative[3, 0] = True
    ignore = (~(positive | negative)).tolist()  # the brute force's retrieval set = the mined pairs
    expected = brute_smooth_ap(_sim_lists(x, x), LABELS.tolist(), LABELS.tolist(), ignore, 0.05)
    assert float(SmoothAPLoss(0.05)(x, LABELS, mined=MinedPairs(positive, negative))) == pytest.approx(expected,
                                                                                                        abs=1e-12)


def test_batch_reduction_and_bad_parameters() -> None:
    x = _embeddings(seed=14)
    labels = torch.tensor([0, 0, 1, 1, 2, 3, 4, 5, 6])  # 5 queries without positives
    contributing = float(SmoothAPLoss(0.05)(x, labels))
    assert float(SmoothAPLoss(0.05, reduction="batch")(x, labels)) == pytest.approx(contributing * 4 / 9, abs=1e-12)
    for bad in ({"temperature": 0.0}, {"block_elements": 0}, {"reduction": "mean"}):
        with pytest.raises(ValueError):
            SmoothAPLoss(**bad)
    for bad in ({"k": []}, {"k": [0, 2]}, {"k": [1.5]}, {"recall_temperature": [1.0, 2.0]},
                {"recall_temperature": -1.0}):
        with pytest.raises(ValueError):
            RecallSurrogateLoss(**bad)
