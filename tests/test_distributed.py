"""DDP helpers: 2-process gloo runs equal 1-process runs on the global batch; DDP-aware m-per-class sampler."""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from deepmetric.data.samplers import MPerClassBatchSampler
from deepmetric.losses import MultiSimilarityLoss
from deepmetric.losses.base import MetricLoss
from deepmetric.memory import CrossBatchMemory
from deepmetric.training import distributed as D

WORLD = 2
STEPS = 5
GLOBAL_BATCH = 8          # 4 classes × 2 images; each rank gets 2 whole classes
IN_DIM, EMB_DIM, N_CLASSES = 6, 4, 4


class ProxyLoss(MetricLoss):
    """Tiny proxy softmax loss with learnable proxies (tests gradient sync of loss parameters)."""

    def __init__(self, n_classes: int, dim: int) -> None:
        super().__init__()
        self.proxies = nn.Parameter(torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(7)))

    def compute(self, embeddings, labels, ref_embeddings, ref_labels, ignore_mask, mined=None):
        logits = 4.0 * nn.functional.normalize(embeddings, dim=1) @ nn.functional.normalize(self.proxies, dim=1).t()
        return nn.functional.cross_entropy(logits, labels)


def _global_batch(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, IN_DIM, generator=g)
    y = torch.arange(N_CLASSES).repeat_interleave(GLOBAL_BATCH // N_CLASSES)
    return x, y


def _train(scenario: str, rank: int, world_size: int) -> dict[str, Tensor]:
    """Five steps of one scenario; in one process (world_size 1) the helpers are identities."""
    torch.manual_seed(0)
    model: nn.Module = nn.Sequential(nn.Linear(IN_DIM, 8), nn.Tanh(), nn.Linear(8, EMB_DIM))
    if scenario == "ms_sgd":
        criterion: nn.Module = MultiSimilarityLoss(alpha=2.0, beta=10.0, base=0.5, mining=False)
    elif scenario == "xbm_momentum":
        criterion = CrossBatchMemory(MultiSimilarityLoss(alpha=2.0, beta=10.0, base=0.5, mining=False),
                                     embedding_size=EMB_DIM, memory_size=20, start_iteration=1)
    else:
        criterion = ProxyLoss(N_CLASSES, EMB_DIM)
    params = list(model.parameters()) + list(criterion.parameters())
    train_model = D.wrap_model(model)
    criterion = D.wrap_criterion(criterion)
    # SGD (with momentum for XBM): unlike Adam it is not scale-invariant, so a wrong ×W factor would show
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9 if scenario == "xbm_momentum" else 0.0)
    share = GLOBAL_BATCH // world_size
    losses = []
    first_loss_param_grad = torch.zeros(0)
    for step in range(STEPS):
        x, y = _global_batch(step)
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        opt.zero_grad()
        backward_loss, value = D.global_batch_loss(criterion, train_model(x), y)
        backward_loss.backward()
        if step == 0 and scenario == "proxy":
            first_loss_param_grad = criterion.proxies.grad.clone()
        D.sync_loss_parameter_grads(criterion)
        opt.step()
        losses.append(value)
    assert (train_model is not model) == (world_size > 1)
    out = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    out.update({f"crit.{k}": v.detach().clone() for k, v in criterion.state_dict().items()})
    out["losses"] = torch.stack(losses)
    out["first_loss_param_grad"] = first_loss_param_grad
    return out


def _eval_dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(5)
    return TensorDataset(torch.randn(7, IN_DIM, generator=g), torch.arange(7) % 3)  # 7 rows: shards of 3 and 4


def _eval_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Linear(IN_DIM, EMB_DIM)


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    ctx = D.init_distributed(backend="gloo", timeout_s=60)
    try:
        results: dict[str, object] = {"ctx": (ctx.rank, ctx.world_size, ctx.local_rank, str(ctx.device), ctx.is_main)}
        for scenario in ("ms_sgd", "xbm_momentum", "proxy"):
            results[scenario] = _train(scenario, rank, WORLD)
        # without wrap_criterion a loss parameter receives W·∂L/∂P on every rank (the derivation's premise)
        torch.manual_seed(0)
        raw, model = ProxyLoss(N_CLASSES, EMB_DIM), nn.Linear(IN_DIM, EMB_DIM)
        x, y = _global_batch(0)
        D.global_batch_loss(raw, model(x[rank * 4:(rank + 1) * 4]), y[rank * 4:(rank + 1) * 4])[0].backward()
        results["raw_proxy_grad"] = raw.proxies.grad.clone()
        with pytest.raises(RuntimeError, match="wrap_criterion"):
            D.sync_loss_parameter_grads(raw)
        # uneven per-rank batches: gradient flows only into the local rows
        local = torch.full((rank + 1, 2), float(rank + 1), requires_grad=True)
        emb, lab = D.all_gather_embeddings(local, torch.full((rank + 1,), rank))
        (emb * torch.arange(1.0, 4.0).unsqueeze(1)).sum().backward()
        results["gather"] = (emb.detach(), lab, local.grad)
        results["embed"] = D.embed_dataset_distributed(_eval_model(), _eval_dataset(), ctx, batch_size=2)
        results["embed_all"] = D.embed_dataset_distributed(_eval_model(), _eval_dataset(), dst=None, batch_size=2)
        results["broadcast"] = D.broadcast_object({"best": 0.5} if ctx.is_main else None, ctx)
        D.barrier(ctx)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        D.destroy_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("ddp")
    procs = mp.start_processes(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=False,
                               start_method="spawn")
    deadline = time.monotonic() + 180
    while not procs.join(timeout=2):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail("2-process gloo run timed out")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single_results() -> dict[str, dict[str, Tensor]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {s: _train(s, 0, 1) for s in ("ms_sgd", "xbm_momentum", "proxy")}
    finally:
        torch.set_num_threads(threads)


# -- 2 processes vs 1 --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", ["ms_sgd", "xbm_momentum", "proxy"])
def test_ddp_two_ranks_equal_single_process(scenario: str, ddp_results: list[dict], single_results: dict) -> None:
    ref = single_results[scenario]
    assert ref["losses"][-1] != ref["losses"][0]  # training actually moved
    for rank in range(WORLD):
        got = ddp_results[rank][scenario]
        assert set(got) == set(ref)
        for key in ref:
            if key == "first_loss_param_grad":
                continue
            torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-5, msg=f"rank {rank}: {key}")


def test_xbm_memory_identical_on_ranks_and_holds_global_batch(ddp_results: list[dict], single_results) -> None:
    mem = [ddp_results[r]["xbm_momentum"] for r in range(WORLD)]
    # steps 2..5 enqueue the global batch (4 × 8 rows) into 20 slots: full, wrapped, pointer at 32 mod 20
    assert int(mem[0]["crit.num_filled"]) == 20 and int(mem[0]["crit.write_ptr"]) == 12
    assert int(mem[0]["crit.next_id"]) == 4 * GLOBAL_BATCH
    for key in ("crit.label_memory", "crit.slot_ids", "crit.write_ptr", "crit.iteration"):
        assert torch.equal(mem[0][key], mem[1][key])
        assert torch.equal(mem[0][key], single_results["xbm_momentum"][key])


def test_loss_parameter_grads_raw_are_w_times_and_wrapped_are_exact(ddp_results, single_results) -> None:
    torch.manual_seed(0)
    raw, model = ProxyLoss(N_CLASSES, EMB_DIM), nn.Linear(IN_DIM, EMB_DIM)
    raw(model(_global_batch(0)[0]), _global_batch(0)[1]).backward()
    for rank in range(WORLD):
        # backward of W·L: every rank receives the *whole* W·∂L/∂P, so DDP-averaging it would be W× too large
        torch.testing.assert_close(ddp_results[rank]["raw_proxy_grad"], WORLD * raw.proxies.grad, rtol=0, atol=1e-5)
        # wrap_criterion's hook divides by W: exactly the single-process gradient, before any communication
        torch.testing.assert_close(ddp_results[rank]["proxy"]["first_loss_param_grad"],
                                   single_results["proxy"]["first_loss_param_grad"], rtol=0, atol=1e-6)


def test_all_gather_uneven_sizes_and_local_gradient(ddp_results: list[dict]) -> None:
    for rank in range(WORLD):
        emb, lab, grad = ddp_results[rank]["gather"]
        torch.testing.assert_close(emb, torch.tensor([[1.0, 1.0], [2.0, 2.0], [2.0, 2.0]]))
        assert lab.tolist() == [0, 1, 1]
        # d/d(local) of Σ_i c_i·row_i with c = (1, 2, 3): only this rank's rows, with their global coefficients
        expected = torch.tensor([[1.0, 1.0]]) if rank == 0 else torch.tensor([[2.0, 2.0], [3.0, 3.0]])
        torch.testing.assert_close(grad, expected)


def test_distributed_embedding_gathers_dataset_order_on_main(ddp_results: list[dict]) -> None:
    ref_emb, ref_lab = D.embed_dataset_distributed(_eval_model(), _eval_dataset(), batch_size=2)
    main_emb, main_lab = ddp_results[0]["embed"]
    torch.testing.assert_close(main_emb, ref_emb, rtol=0, atol=1e-6)
    assert torch.equal(main_lab, ref_lab) and main_emb.shape[0] == 7
    assert ddp_results[1]["embed"] == (None, None)
    torch.testing.assert_close(ddp_results[1]["embed_all"][0], ref_emb, rtol=0, atol=1e-6)


def test_context_broadcast_and_barrier(ddp_results: list[dict]) -> None:
    assert ddp_results[0]["ctx"] == (0, 2, 0, "cpu", True)
    assert ddp_results[1]["ctx"] == (1, 2, 1, "cpu", False)
    assert all(ddp_results[r]["broadcast"] == {"best": 0.5} for r in range(WORLD))


# -- one process: identities --------------------------------------------------------------------------------------
def test_single_process_helpers_are_identities(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = D.init_distributed()
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.is_distributed) == (0, 1, True, False)
    emb, lab = torch.randn(3, 2, requires_grad=True), torch.tensor([0, 0, 1])
    g_emb, g_lab = D.all_gather_embeddings(emb, lab)
    assert g_emb is emb and g_lab is lab
    scaled, value = D.global_batch_loss(MultiSimilarityLoss(mining=False), emb, lab)
    assert torch.equal(scaled.detach(), value)
    assert D.broadcast_object([1, 2]) == [1, 2]
    D.barrier()
    D.sync_loss_parameter_grads(ProxyLoss(2, 2))
    model, crit = nn.Linear(2, 2), ProxyLoss(2, 2)
    assert D.wrap_model(model) is model and D.wrap_criterion(crit) is crit


def test_context_from_env_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = D.DistributedContext.from_env(backend="gloo")
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.device.type, ctx.is_main) == (3, 4, 1, "cpu", False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        D.init_distributed(backend="gloo")
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK=4"):
        D.DistributedContext.from_env()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        D.DistributedContext.from_env()


def test_shards_cover_without_padding() -> None:
    for n, w in [(7, 2), (10, 3), (3, 3), (100, 8)]:
        shards = [list(D.ShardSampler(n, r, w)) for r in range(w)]
        assert [i for shard in shards for i in shard] == list(range(n))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


# -- DDP-aware m-per-class sampler ----------------------------------------------------------------------------------
def _dataset_labels(n_classes: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.repeat(np.arange(n_classes), rng.integers(3, 9, size=n_classes))


@pytest.mark.parametrize("class_choice", ["uniform_no_replacement", "proportional_to_remaining", "with_replacement"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_sampler_ranks_share_one_global_batch_class_complete(class_choice: str, world_size: int) -> None:
    labels = _dataset_labels()
    m, batch = 2, 12  # 6 classes per batch, 6 / world_size classes per rank
    kwargs = {"labels": labels, "batch_size": batch, "m": m, "class_choice": class_choice, "length": 15, "seed": 3}
    single = list(MPerClassBatchSampler(**kwargs))
    per_rank = [list(MPerClassBatchSampler(**kwargs, rank=r, world_size=world_size)) for r in range(world_size)]
    assert all(len(batches) == len(single) for batches in per_rank)
    for step, global_batch in enumerate(single):
        shares = [per_rank[r][step] for r in range(world_size)]
        flat = [i for share in shares for i in share]
        assert flat == global_batch  # rank order = all_gather order = the single-process batch
        assert all(len(s) == batch // world_size for s in shares)
        for share in shares:
            counts = Counter(labels[share].tolist())
            assert all(c % m == 0 for c in counts.values())  # whole m-chunks of classes only
        if class_choice != "with_replacement":
            rank_classes = [set(labels[s].tolist()) for s in shares]
            assert sum(map(len, rank_classes)) == batch // m  # classes distinct across ranks, m images each
            assert all(c == m for s in shares for c in Counter(labels[s].tolist()).values())
        if class_choice == "uniform_no_replacement":
            assert len(set(flat)) == len(flat)  # every class has ≥ m images: no padding, no repeated index


def test_sampler_ddp_resume_and_errors() -> None:
    labels = _dataset_labels()
    sampler = MPerClassBatchSampler(labels, 12, 2, length=6, seed=1, rank=1, world_size=2)
    it = iter(sampler)
    first = [next(it) for _ in range(2)]
    state = sampler.state_dict()
    rest = list(it)
    resumed = MPerClassBatchSampler(labels, 12, 2, length=6, seed=1, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert list(resumed) == rest and len(first + rest) == 6
    with pytest.raises(ValueError, match="split evenly"):
        MPerClassBatchSampler(labels, 10, 2, rank=0, world_size=2)  # 5 classes over 2 ranks
    with pytest.raises(ValueError, match="permutation"):
        MPerClassBatchSampler(labels, 12, 2, class_choice="permutation", rank=0, world_size=2)
    with pytest.raises(ValueError, match="invalid rank"):
        MPerClassBatchSampler(labels, 12, 2, rank=2, world_size=2)
