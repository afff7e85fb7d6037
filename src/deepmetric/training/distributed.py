r"""Multi-process training with ``torchrun`` / DDP, made exactly equivalent to one process on the global batch.

Every helper is a no-op (identity) when no process group is initialised, so one training loop serves both cases.
The process-group basics (context, init/destroy, barrier, broadcast) live in
:mod:`deepmetric.training.process_group` and are re-exported here.

How a training step uses them (the trainer does this; W = world size)::

    ctx = init_distributed()                              # reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
    model = model.to(ctx.device)
    train_model = wrap_model(model, ctx)                  # DDP (identity in one process)
    criterion = wrap_criterion(criterion.to(ctx.device), ctx)   # NOT DDP: scales its parameters' grads by 1/W
    sampler = MPerClassBatchSampler(labels, B, m, rank=ctx.rank, world_size=ctx.world_size, seed=seed)
    for x, y in DataLoader(dataset, batch_sampler=sampler):     # B / W rows per rank, whole classes
        z, y_all = all_gather_embeddings(train_model(x.to(ctx.device)), y.to(ctx.device), ctx)
        loss = criterion(z, y_all)                        # the global-batch loss, same value on every rank
        optimizer.zero_grad()
        scale_for_ddp(loss).backward()                    # W·L: DDP all-reduces (averages) the gradients
        sync_loss_parameter_grads(criterion)              # optional: bit-identical proxies on every rank
        optimizer.step()

    # (global_batch_loss(criterion, z_local, y_local) does the gather and returns (W·L, L) in one call)

    # evaluation: every rank embeds a contiguous shard, rank 0 gets everything in dataset order
    emb, labels = embed_dataset_distributed(model, dataset, ctx, batch_size=256)    # (None, None) off rank 0
    if ctx.is_main: metrics = evaluate(emb, labels)
    stop = broadcast_object(stop if ctx.is_main else None, ctx)    # decisions made on rank 0, shared with all

Gradient semantics (derivation). Let Z = [Z₀; …; Z_{W−1}] be the global batch (rank r produced the rows Z_r from
its shard of the data) and L(Z) any loss of the global batch. One process on the whole batch computes

    g = ∂L/∂θ = Σ_r Σ_{i ∈ rows(r)} (∂L/∂z_i)·(∂z_i/∂θ).

:func:`all_gather_embeddings` gives every rank the same Z, with only its own rows Z_r attached to its graph (the
others are constants). Every rank therefore evaluates the *same* value L(Z), and backward on rank r yields

    g_r = Σ_{i ∈ rows(r)} (∂L/∂z_i)·(∂z_i/∂θ),   so   Σ_r g_r = g.

DDP averages gradients: it applies (1/W)·Σ_r g_r = g / W. Backpropagating W·L on every rank cancels that factor,
so the optimizer sees exactly g — the single-process gradient on the concatenated batch — for *any* loss,
including normalisations that do not decompose over anchors (÷ contributing anchors, MS mining thresholds over
the whole batch). :func:`global_batch_loss` returns (W·L for backward, L for logging). The price: each rank
evaluates the whole B×B (or B×M) loss, which is cheap next to the backbone. (PML's "efficient" mode, local
anchors only, gives different gradients; it is deliberately not offered.)

Learnable loss parameters (proxies, per-class margins). They are identical on every rank and enter the full
loss L(Z) on every rank, so backward of W·L leaves W·∂L/∂P on *each* rank, not a share of it. Wrapping the loss
in DDP would average these to W·∂L/∂P — wrong by a factor W (PML issues #710/#218 in another guise; DDP would
also broadcast the XBM buffers every step). Instead :func:`wrap_criterion` keeps the module as it is and
registers a gradient hook dividing its parameters' gradients by W, so every rank holds exactly ∂L/∂P without
any communication (every rank evaluates the same graph on the same data). :func:`sync_loss_parameter_grads`
additionally averages them over ranks (one small all-reduce) to rule out floating-point drift between ranks
(non-deterministic GPU kernels); on CPU it changes nothing.

Cross-batch memory. Call ``CrossBatchMemory`` on the gathered global batch (what :func:`global_batch_loss`
does): every rank enqueues the same rows in the same order, so the memories stay identical without any extra
communication, and the memory loss is also the single-process one.

Caveats: BatchNorm in the model sees only the local B/W rows (use ``nn.SyncBatchNorm`` for batch statistics of
the global batch; with frozen BN statistics, as in most DML recipes, nothing differs). Data-dependent randomness
(augmentation) must be seeded per rank by the caller.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset, Sampler, Subset

from deepmetric.training.inference import embed_dataset
from deepmetric.training.process_group import (
    DistributedContext,
    barrier,
    broadcast_object,
    comm_device,
    destroy_distributed,
    get_context,
    get_world_size,
    init_distributed,
    is_distributed,
)

__all__ = [
    "DistributedContext",
    "ShardSampler",
    "all_gather_embeddings",
    "all_gather_rows",
    "barrier",
    "broadcast_object",
    "destroy_distributed",
    "embed_dataset_distributed",
    "gather_rows",
    "get_context",
    "get_world_size",
    "global_batch_loss",
    "init_distributed",
    "is_distributed",
    "scale_for_ddp",
    "shard_bounds",
    "sync_loss_parameter_grads",
    "wrap_criterion",
    "wrap_model",
]


# -- gathering --------------------------------------------------------------------------------------------------
def _gather_sizes(n: int, device: torch.device) -> list[int]:
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=device))
    return [int(s) for s in sizes]


def _all_gather_padded(tensor: Tensor, sizes: list[int]) -> list[Tensor]:
    """all_gather of per-rank tensors whose first dimension is ``sizes[r]`` (padded to the max, then trimmed)."""
    longest = max(sizes)
    local = tensor.detach()
    if local.shape[0] < longest:
        pad = local.new_zeros((longest - local.shape[0], *local.shape[1:]))
        local = torch.cat([local, pad])
    buffers = [torch.empty_like(local) for _ in sizes]
    dist.all_gather(buffers, local.contiguous())
    return [buf[:n] for buf, n in zip(buffers, sizes)]


def all_gather_rows(tensor: Tensor) -> Tensor:
    """Concatenate every rank's rows in rank order (sizes may differ); no gradient. Identity in one process."""
    if not is_distributed():
        return tensor
    device = comm_device()
    sizes = _gather_sizes(tensor.shape[0], device)
    return torch.cat(_all_gather_padded(tensor.to(device), sizes)).to(tensor.device)


def all_gather_embeddings(
    embeddings: Tensor, labels: Tensor, ctx: DistributedContext | None = None
) -> tuple[Tensor, Tensor]:
    """The global batch on every rank: rows of rank 0, then rank 1, …; gradient flows into the *local* rows only.

    Other ranks' rows are detached copies. Backpropagating ``world_size × loss(global batch)`` under DDP gives
    exactly the single-process gradient (derivation in the module docstring; :func:`global_batch_loss`).
    Per-rank batch sizes may differ. In one process this returns the inputs unchanged.
    """
    if not is_distributed():
        return embeddings, labels
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels ({labels.shape[0]}) and embeddings ({embeddings.shape[0]}) must have equal rows")
    device = comm_device()
    sizes = _gather_sizes(embeddings.shape[0], device)
    parts = [p.to(embeddings.device) for p in _all_gather_padded(embeddings.to(device), sizes)]
    parts[dist.get_rank()] = embeddings  # the one slice that stays in this rank's graph
    label_parts = _all_gather_padded(labels.to(device), sizes)
    return torch.cat(parts), torch.cat(label_parts).to(labels.device)


def global_batch_loss(criterion: nn.Module, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Gather the global batch, evaluate ``criterion`` on it; return ``(world_size · L, L.detach())``.

    Backpropagate the first (DDP's averaging turns it into the single-process gradient), log the second (the
    same on every rank). ``criterion`` may be a loss or a ``CrossBatchMemory`` (then every rank enqueues the same
    global batch).
    """
    global_embeddings, global_labels = all_gather_embeddings(embeddings, labels)
    loss = criterion(global_embeddings, global_labels)
    return scale_for_ddp(loss), loss.detach()


def scale_for_ddp(loss: Tensor) -> Tensor:
    """``world_size · loss``, the value to backpropagate under DDP when ``loss`` is the loss of the gathered global
    batch (module docstring); ``loss`` itself in one process."""
    return loss * get_world_size() if is_distributed() else loss


def wrap_model(
    model: nn.Module, ctx: DistributedContext | None = None, sync_batchnorm: bool = False, **ddp_kwargs: Any
) -> nn.Module:
    """``DistributedDataParallel(model, **ddp_kwargs)`` on the context's device (the model itself in one process).

    ``sync_batchnorm=True`` converts BatchNorm layers so their statistics are those of the global batch. Keep
    the unwrapped model for evaluation and checkpoints. Parameters that stop receiving gradients after wrapping
    (a temporarily frozen backbone) need ``find_unused_parameters=True``; a forward that bypasses the wrapper
    (calling ``model.features`` directly) gets no gradient all-reduce at all.
    """
    if not is_distributed():
        return model
    ctx = ctx or get_context()
    if sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **ddp_kwargs)


_HOOKS_ATTR = "_deepmetric_ddp_grad_hooks"


def wrap_criterion(criterion: nn.Module, ctx: DistributedContext | None = None) -> nn.Module:
    """Prepare a loss/criterion module for the W·L convention; returns the same module (state_dict unchanged).

    Registers, once, a hook on each of its parameters that divides the incoming gradient by W, turning the
    W·∂L/∂P each rank receives into ∂L/∂P (module docstring). No-op in one process. Do not wrap it in DDP.
    """
    if not is_distributed() or hasattr(criterion, _HOOKS_ATTR):
        return criterion
    world_size = get_world_size()
    handles = [p.register_hook(lambda g, w=world_size: g / w) for p in criterion.parameters() if p.requires_grad]
    object.__setattr__(criterion, _HOOKS_ATTR, handles)
    return criterion


@torch.no_grad()
def sync_loss_parameter_grads(criterion: nn.Module) -> None:
    """Average the gradients of a :func:`wrap_criterion`-ed module's parameters over ranks (one all-reduce).

    After :func:`wrap_criterion`'s hooks every rank already holds ∂L/∂P; averaging makes the copies bit-identical
    even if GPU kernels were non-deterministic, so the proxies cannot drift apart. Parameters without a gradient
    are skipped (the same set on every rank: every rank runs the same loss graph). No-op in one process.
    """
    if not is_distributed():
        return
    if not hasattr(criterion, _HOOKS_ATTR):
        raise RuntimeError("sync_loss_parameter_grads: pass the criterion through wrap_criterion() first "
                           "(its gradients would otherwise be world_size times too large)")
    grads = [p.grad for p in criterion.parameters() if p.grad is not None]
    if not grads:
        return
    device = comm_device()
    flat = torch.cat([g.reshape(-1).to(device, torch.float64 if g.dtype == torch.float64 else torch.float32)
                      for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


# -- evaluation ---------------------------------------------------------------------------------------------------
def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous shard [start, end) of ``range(n)`` for ``rank``: no padding, no duplicates, sizes differ ≤ 1."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world_size {world_size}")
    return n * rank // world_size, n * (rank + 1) // world_size


class ShardSampler(Sampler[int]):
    """Sequential sampler over this rank's contiguous shard; gathering shards in rank order restores dataset order.

    Unlike ``DistributedSampler`` it never pads with duplicates, so metrics on the gathered set count every item
    exactly once.
    """

    def __init__(self, n: int, rank: int | None = None, world_size: int | None = None) -> None:
        ctx = get_context()
        self.rank = ctx.rank if rank is None else rank
        self.world_size = ctx.world_size if world_size is None else world_size
        self.start, self.end = shard_bounds(n, self.rank, self.world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.end))

    def __len__(self) -> int:
        return self.end - self.start


def gather_rows(tensor: Tensor, dst: int | None = 0) -> Tensor | None:
    """Concatenate per-rank rows in rank order; the result on rank ``dst`` (None elsewhere) or everywhere if None.

    Uses all_gather underneath (supported by every backend); the identity in one process.
    """
    out = all_gather_rows(tensor)
    if dst is None or not is_distributed() or dist.get_rank() == dst:
        return out
    return None


def embed_dataset_distributed(
    model: nn.Module, dataset: Dataset, ctx: DistributedContext | None = None, *, dst: int | None = 0,
    **embed_kwargs: Any,
) -> tuple[Tensor, Tensor] | tuple[None, None]:
    """Embed ``dataset`` with every rank taking a contiguous shard; (embeddings, labels) in dataset order on ``dst``.

    Pass the model *without* its DDP wrapper. ``embed_kwargs`` go to
    :func:`deepmetric.training.inference.embed_dataset` (batch_size, num_workers, ...; ``device`` defaults to
    the context's). Ranks other than ``dst`` get ``(None, None)`` (``dst=None``: everything on every rank).
    """
    explicit = ctx is not None
    ctx = ctx if explicit and is_distributed() else get_context()
    if explicit or ctx.is_distributed:
        embed_kwargs.setdefault("device", ctx.device)
    n = len(dataset)  # type: ignore[arg-type]
    if n < ctx.world_size:
        raise ValueError(f"embed_dataset_distributed: {n} items cannot be sharded over {ctx.world_size} ranks")
    start, end = shard_bounds(n, ctx.rank, ctx.world_size)
    shard = dataset if not ctx.is_distributed else Subset(dataset, range(start, end))
    embeddings, labels = embed_dataset(model, shard, **embed_kwargs)
    all_embeddings = gather_rows(embeddings, dst)
    all_labels = gather_rows(labels, dst)
    if all_embeddings is None or all_labels is None:
        return None, None
    return all_embeddings, all_labels
