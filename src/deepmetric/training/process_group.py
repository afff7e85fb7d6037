"""The process group under ``torchrun``: where this process stands, setting it up and tearing it down, and the
two collectives decisions need (:func:`barrier`, :func:`broadcast_object`).

Every function is a no-op (identity) when no process group with more than one process is active, so callers
use them unconditionally. The gathering, gradient and evaluation helpers built on them are in
:mod:`deepmetric.training.distributed`, which re-exports everything here.
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from deepmetric.config_errors import ConfigError

__all__ = [
    "DistributedContext",
    "barrier",
    "broadcast_object",
    "comm_device",
    "destroy_distributed",
    "get_context",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "resolve_device",
    "seed_everything",
]


def seed_everything(seed: int) -> None:
    """Seed the global Python, NumPy and torch generators of this process."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a torch device ("auto": CUDA when available); CUDA asked for but absent is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available on this machine")
    return device


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``rank`` of ``world_size``, its ``local_rank`` on the node, its ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """True on the process that logs, evaluates and writes checkpoints (rank 0)."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, backend: str | None = None) -> DistributedContext:
        """Read ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` as set by ``torchrun`` (defaults: one process).

        The device is ``cuda:LOCAL_RANK`` when CUDA is available and the backend is not gloo, otherwise CPU.
        """
        rank = _env_int("RANK", 0)
        world_size = _env_int("WORLD_SIZE", 1)
        local_rank = _env_int("LOCAL_RANK", 0)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"environment: RANK={rank} is not valid for WORLD_SIZE={world_size}")
        use_cuda = torch.cuda.is_available() and backend != "gloo"
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def is_distributed() -> bool:
    """Whether a process group with more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_world_size() -> int:
    """The number of processes of the active group (1 without one)."""
    return dist.get_world_size() if is_distributed() else 1


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> DistributedContext:
    """Initialise the default process group from the ``torchrun`` environment and return the context.

    ``backend=None`` picks nccl when CUDA is available, gloo otherwise. With ``WORLD_SIZE`` unset or 1 nothing is
    initialised and a single-process context is returned. Calling it again returns the current context.
    """
    ctx = DistributedContext.from_env(backend)
    if ctx.world_size == 1 or dist.is_initialized():
        return get_context() if dist.is_initialized() else ctx
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={ctx.world_size} but {', '.join(missing)} is not set; launch with torchrun "
            "(which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    kwargs: dict[str, Any] = {}
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend=backend, init_method="env://", rank=ctx.rank, world_size=ctx.world_size,
                            **kwargs)
    return ctx


def destroy_distributed() -> None:
    """Tear the process group down (no-op when none is active)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_context() -> DistributedContext:
    """The context of the active process group (or of one process when none is active)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistributedContext()
    backend = dist.get_backend()
    ctx = DistributedContext.from_env(backend)
    return DistributedContext(dist.get_rank(), dist.get_world_size(), ctx.local_rank, ctx.device)


def barrier(ctx: DistributedContext | None = None) -> None:
    """Wait for every rank (no-op in one process). ``ctx`` is accepted for symmetry and not needed."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, ctx: DistributedContext | None = None, src: int = 0) -> Any:
    """Return ``obj`` of rank ``src`` on every rank (picklable objects; identity in one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    device = comm_device()
    dist.broadcast_object_list(box, src=src, device=device if device.type == "cuda" else None)
    return box[0]


def comm_device() -> torch.device:
    """Tensors in collectives must live where the backend works: CUDA for nccl, anywhere for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
