"""Atomic, verified checkpoint writes and safe loads.

A checkpoint is serialised in memory, refused if any floating-point tensor in it is non-finite (a diverged run must
never overwrite the last good state), written to a temporary file in the destination folder, flushed to disk and
renamed over the target, so a crash mid-write never leaves a truncated file and the previous checkpoint stays
intact. Next to it, ``<name>.sha256`` holds the SHA-256 of the bytes, written the same way; a load verifies it and
refuses a file whose bytes changed (disk corruption, a partial copy). Loads use ``weights_only=True``: checkpoints
hold only tensors and plain Python containers (RNG states are converted).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import random
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepmetric.atomic_files import write_bytes_atomic

CHECKSUM_SUFFIX = ".sha256"


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or trusted: corrupt, truncated, checksum mismatch, non-finite values."""


def checksum_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def _named_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix or "<root>", obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _named_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _named_tensors(value, f"{prefix}[{i}]")


def first_non_finite_named(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor of ``named`` holding a NaN or ±inf, else None; one device
    synchronisation in the common (all finite) case."""
    tensors = [(name, t) for name, t in named if t.is_floating_point() and t.numel()]
    if not tensors:
        return None
    flags = torch.stack([torch.isfinite(t).all().to(tensors[0][1].device) for _, t in tensors])
    if bool(flags.all()):
        return None
    return tensors[int(torch.nonzero(~flags)[0])][0]


def first_non_finite(obj: Any) -> str | None:
    """The name (dotted path) of the first floating-point tensor in ``obj`` holding a NaN or ±inf, else None."""
    return first_non_finite_named(_named_tensors(obj))


def save_atomic(obj: Any, path: str | Path) -> None:
    """Write ``obj`` to ``path`` atomically with its SHA-256 sidecar; refuse non-finite floating-point tensors."""
    path = Path(path)
    bad = first_non_finite(obj)
    if bad is not None:
        raise CheckpointError(f"refusing to write {path}: tensor '{bad}' holds NaN/inf values; the previous "
                              "checkpoint is kept")
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    write_bytes_atomic(data, path)
    digest = hashlib.sha256(data).hexdigest()
    write_bytes_atomic(f"{digest}  {path.name}\n".encode(), checksum_path(path))


def _recorded_digest(path: Path) -> str | None:
    sidecar = checksum_path(path)
    if not sidecar.is_file():
        return None
    fields = sidecar.read_text(encoding="utf-8", errors="replace").split()
    if not fields or len(fields[0]) != 64:
        raise CheckpointError(f"checksum file {sidecar} is malformed (expected '<sha256>  {path.name}')")
    return fields[0].lower()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_atomic`, verifying its SHA-256 sidecar when present.

    Files written before checksums existed (no sidecar) still load. Empty, truncated or corrupt files and checksum
    mismatches raise :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    data = path.read_bytes()
    if not data:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    expected = _recorded_digest(path)
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(
            f"checkpoint {path} does not match its checksum in {checksum_path(path).name}: the file is corrupt "
            "or was modified after it was written"
        )
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or not a checkpoint): {exc}") from None


def capture_rng_state() -> dict[str, Any]:
    """Every RNG the training loop touches, as tensors / plain containers (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        ("MT19937", np_state["key"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"],
         np_state["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]
