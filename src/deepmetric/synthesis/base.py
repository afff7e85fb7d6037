"""Shared pieces of the synthesis wrappers: their base class, the ignore mask for "an anchor's own synthetic
copies" and input checks. (:class:`~deepmetric.random_source.RandomSource` is re-exported for the wrappers.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from deepmetric.functional import check_loss_inputs
from deepmetric.loss_hooks import LossWrapper, TrainingHooks
from deepmetric.random_source import RandomSource

LossFn = Callable[..., Tensor]

__all__ = ["LossFn", "RandomSource", "SynthesisMethod", "check_embeddings", "check_labels", "own_copy_ignore_mask"]


class SynthesisMethod(LossWrapper, TrainingHooks):
    """Base class of every synthesis wrapper (IAA, DAS, MDR, SGAR): a loss around a base loss.

    ``method(embeddings, labels) -> scalar`` with the library loss signature; the base loss is any module with
    ``loss(embeddings, labels, ref_embeddings=None, ref_labels=None, *, ignore_mask=None)`` — a plain loss or a
    :class:`~deepmetric.memory.CrossBatchMemory` (the memory is always the inner wrapper: it sees and enqueues
    the rows the method hands it). A method builds its own reference rows (the batch and its synthetic copies),
    so ``ref_embeddings`` is refused. Detached terms are in ``last_logs`` after each call (always ``"loss"``).

    Class attributes tell the trainer and the builder what to feed it:

    * ``expects_normalized_embeddings`` — whether ``embeddings`` must be the L2-normalised model output (True) or
      the raw head output (False). Instances may override it from their constructor arguments.
    * ``needs_features`` / ``needs_head`` — whether :class:`~deepmetric.loss_hooks.StepContext` must carry the
      pooled backbone features and the head module (SGAR in feature space).
    * ``build_arguments`` — run facts the constructor takes (``num_classes``, ``embedding_size``,
      ``total_epochs``).

    Step and epoch arrive through the :class:`~deepmetric.loss_hooks.TrainingHooks` methods
    ``on_step_start(context)`` and ``on_epoch_start(epoch, model, loader)``; ``epoch`` is the trainer's
    **0-based** epoch counter, and methods that follow a paper's 1-based schedule convert it themselves (IAA).
    """

    expects_normalized_embeddings: bool = True
    needs_head: bool = False

    def _refuse_references(self, ref_embeddings: Tensor | None) -> None:
        if ref_embeddings is not None:
            name = type(self).__name__
            raise ValueError(
                f"{name} builds its own reference rows and takes no ref_embeddings; to add a cross-batch memory, "
                f"wrap it inside: {name}(CrossBatchMemory(loss, ...))"
            )


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
