"""Shared pieces of the synthesis wrappers: the trainer-facing base class, a seedable random source whose state is
part of ``state_dict()``, and the ignore mask for "an anchor's own synthetic copies".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deepmetric.functional import check_loss_inputs
from deepmetric.random_source import RandomSource

LossFn = Callable[..., Tensor]


class SynthesisMethod(nn.Module):
    """Base class of every synthesis wrapper (IAA, DAS, MDR, SGAR).

    A wrapper owns a base loss (any module with the library signature
    ``loss(embeddings, labels, ref_embeddings=None, ref_labels=None, *, ignore_mask=None)``) and is called by the
    trainer instead of it::

        loss, logs = method(embeddings, labels, features=pooled, head=model.head, step=it, epoch=ep)

    Class attributes tell the trainer what to feed it:

    * ``expects_normalized_embeddings`` — whether ``embeddings`` must be the L2-normalised model output (True) or
      the raw head output (False). Instances may override it from their constructor arguments.
    * ``needs_features`` / ``needs_head`` — whether ``features`` (pooled backbone output before the head) and the
      ``head`` module must be passed.
    * ``needs_num_classes`` — the constructor takes ``num_classes`` and ``embedding_size`` (per-class state).

    ``on_epoch_start(epoch, model, loader)`` is called by the trainer before each epoch. ``epoch`` (here and in
    ``forward``) is the trainer's **0-based** epoch counter; methods that follow a paper's 1-based schedule
    convert it themselves (IAA). The default does nothing.

    ``logs`` always contains ``"loss"`` (the returned total, as a float) plus method-specific terms.
    """

    expects_normalized_embeddings: bool = True
    needs_features: bool = False
    needs_head: bool = False
    needs_num_classes: ClassVar[bool] = False
    lr_multiplier: float = 1.0

    def on_epoch_start(self, epoch: int, model: nn.Module | None = None, loader: Iterable[Any] | None = None) -> None:
        """Hook called before every (0-based) epoch; stateless methods ignore it."""

    def forward(  # pragma: no cover - interface only
        self,
        embeddings: Tensor,
        labels: Tensor,
        *,
        features: Tensor | None = None,
        head: nn.Module | None = None,
        step: int | None = None,
        epoch: int | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError


def own_copy_ignore_mask(batch_size: int, num_copies: int, device: torch.device | str | None = None) -> Tensor:
    """B × B(1+M) bool mask, True where column j is anchor i itself or one of its own copies (j ≡ i mod B).

    Used when real rows are the only anchors and the reference set is [real; copy¹; …; copyᴹ] (IAA, §5.3
    ``pos_neg_mask_xy``): an anchor's own copies are neither positives nor negatives.
    """
    rows = torch.arange(batch_size, device=device)
    cols = torch.arange(batch_size * (1 + num_copies), device=device) % batch_size
    return rows.unsqueeze(1) == cols.unsqueeze(0)


def check_labels(labels: Tensor, num_classes: int, where: str) -> None:
    """Per-class state is indexed by label: labels must be integers in [0, num_classes)."""
    if labels.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise TypeError(f"{where}: labels must be an integer tensor, got {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{where}: labels must lie in [0, num_classes={num_classes}), got range "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )


def check_embeddings(embeddings: Tensor, labels: Tensor, where: str, dim: int | None = None) -> None:
    try:
        check_loss_inputs(embeddings, labels, None, None)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if dim is not None and embeddings.shape[1] != dim:
        raise ValueError(f"{where}: expected embedding_size={dim}, got embeddings of width {embeddings.shape[1]}")
