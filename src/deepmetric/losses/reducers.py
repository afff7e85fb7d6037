"""The reductions shared by every loss: how per-term losses become one scalar.

A "term" is one pair, triplet or anchor, depending on the loss. Terms outside the selection are 0 in ``losses``.

* ``avg_nonzero`` — Σ ℓ / #{terms with ℓ > 0} (PML's AvgNonZeroReducer). The count is taken on the loss value
  itself, so a term at exactly 0 (e.g. a positive pair at distance 0 with margin 0) is not counted.
* ``mean`` — Σ ℓ / #{selected terms} (DAS; an empty selection gives 0).
* ``batch`` — Σ ℓ / B (Deep_Metric, research-ms-loss, XBM and IAA code; anchors without pairs count as 0).
* ``contributing`` — Σ ℓ / #{anchors that have pairs} (DAS / Revisiting-DML).
* ``active_triplets`` — Σ (ℓ⁺ + ℓ⁻) / #{triplets with ℓ⁺ > 0 or ℓ⁻ > 0} (DAS ``loss/margin.py`` and
  research-ms-loss ``losses/margin_loss.py``: their ``(ℓ⁺ > 0) + (ℓ⁻ > 0)`` adds two bool tensors, a logical OR,
  so they count triplets, where ``avg_nonzero`` counts the two terms separately). Only for two-term triplet losses.
* ``sum`` — Σ ℓ.

No reducer reads a value back to the host: empty selections are handled by clamping divisors at 1.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Reduction = Literal["avg_nonzero", "mean", "batch", "contributing", "active_triplets", "sum"]
REDUCTIONS: tuple[str, ...] = ("avg_nonzero", "mean", "batch", "contributing", "active_triplets", "sum")


def check_reduction(owner: str, reduction: str, allowed: tuple[str, ...]) -> str:
    """``reduction`` if it is one of ``allowed``, else a ValueError naming ``owner`` and the choices."""
    if reduction not in allowed:
        raise ValueError(f"{owner}.reduction must be one of {', '.join(allowed)}; got {reduction!r}")
    return reduction


def avg_nonzero(losses: Tensor, weights: Tensor | None = None, nonzero: Tensor | None = None) -> Tensor:
    """Σ w·ℓ / Σ w·[ℓ > 0], the divisor at least 1.

    ``weights``: how many identical terms each entry stands for (default 1), e.g. a pair that occurs in |N_a|
    triplets. ``nonzero``: for entries that already sum several terms (the all-triplets hinge sums), how many
    of those terms are > 0; by default it is ``[ℓ > 0]`` of each entry.
    """
    weighted = losses if weights is None else losses * weights
    return weighted.sum() / nonzero_count(losses, weights, nonzero).clamp_min(1)


def nonzero_count(losses: Tensor, weights: Tensor | None = None, nonzero: Tensor | None = None) -> Tensor:
    """The divisor of :func:`avg_nonzero` before clamping: Σ w·[ℓ > 0] (or Σ w·``nonzero``)."""
    if nonzero is None:
        # [ℓ > 0] as 0/1 by arithmetic (sign, then negatives to 0): cheaper than a comparison and a conversion
        nonzero = torch.sign(losses.detach()).clamp_min_(0.0)
    return (nonzero if weights is None else nonzero * weights).sum()


def mean(losses: Tensor, selected: Tensor) -> Tensor:
    """Σ ℓ / Σ selected: ``selected`` is the selection mask (or per-entry term counts) of ``losses``."""
    return losses.sum() / selected.sum().clamp_min(1)


def batch(losses: Tensor, batch_size: int) -> Tensor:
    """Σ ℓ / B."""
    return losses.sum() / batch_size


def contributing(losses: Tensor, anchors: Tensor) -> Tensor:
    """Σ ℓ / #anchors with pairs; ``anchors`` is the B-vector mask (bool or 0/1) of those anchors."""
    return losses.sum() / anchors.sum().clamp_min(1)


def active_triplets(losses: Tensor, active: Tensor) -> Tensor:
    """Σ ℓ / Σ active: ``active`` is the indicator (or, for entries that stand for several triplets, the count)
    of triplets with at least one term > 0. With none active every term is 0, so clamping the divisor at 1 gives
    the plain sum (0), as the DAS code does."""
    return losses.sum() / active.sum().clamp_min(1)


def total(losses: Tensor) -> Tensor:
    """Σ ℓ (the ``sum`` reduction)."""
    return losses.sum()


def reduce(
    reduction: str, losses: Tensor, *, selected: Tensor | None = None, anchors: Tensor | None = None,
    batch_size: int | None = None, weights: Tensor | None = None, nonzero: Tensor | None = None,
    active: Tensor | None = None,
) -> Tensor:
    """Dispatch on the reduction's name; each reduction reads only the arguments it needs (``weights`` and
    ``nonzero`` are ``avg_nonzero``'s, ``active`` is ``active_triplets``')."""
    if reduction == "avg_nonzero":
        return avg_nonzero(losses, weights, nonzero)
    if reduction == "sum":
        return total(losses)
    if reduction == "mean":
        if selected is None:
            raise ValueError("the 'mean' reduction needs the selection (selected=)")
        return mean(losses, selected)
    if reduction == "batch":
        if batch_size is None:
            raise ValueError("the 'batch' reduction needs batch_size=")
        return batch(losses, batch_size)
    if reduction == "contributing":
        if anchors is None:
            raise ValueError("the 'contributing' reduction needs the anchors with pairs (anchors=)")
        return contributing(losses, anchors)
    if reduction == "active_triplets":
        if active is None:
            raise ValueError("the 'active_triplets' reduction needs the active-triplet indicator (active=)")
        return active_triplets(losses, active)
    raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
