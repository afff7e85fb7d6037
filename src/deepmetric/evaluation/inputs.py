"""Validation and conversion of evaluation inputs (numpy or torch) into torch tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

DISTANCES = ("cosine", "euclidean", "dot")


def as_embeddings(x: Any, name: str, device: torch.device) -> Tensor:
    """2-D floating tensor on ``device`` (float64 kept, anything else computed in float32); finite, non-empty."""
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, Tensor) else x.detach()
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D array (n_items, dim), got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); evaluation needs at least one item")
    if not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    # float64 stays float64: exact ties in the input (e.g. methods.md §9) only survive in double precision
    t = t.to(device=device, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    # a row sum is finite iff the row is (barring overflow of huge values): a reduction is ~30× cheaper than
    # isfinite().all() on CPU, and the exact test runs only when the cheap one fails
    if not bool(torch.isfinite(t.sum(dim=1)).all()) and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).any(dim=1).sum())
        raise ValueError(f"{name} contains NaN or infinite values in {bad} row(s); evaluation needs finite values")
    return t


def as_labels(y: Any, name: str, n: int, device: torch.device) -> Tensor:
    """1-D int64 label tensor of length ``n``; integer labels only (never cast through float)."""
    t = torch.as_tensor(np.asarray(y)) if not isinstance(y, Tensor) else y.detach()
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one integer label per row), got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(
            f"{name} must be integer class ids (got dtype {t.dtype}); float labels lose precision above 2**24, "
            "so they are not accepted — convert them with np.asarray(labels, dtype=np.int64)"
        )
    if t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} entries but the embeddings have {n} rows")
    return t.to(device=device, dtype=torch.int64)
