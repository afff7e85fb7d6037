"""What the trainer tells loss modules beyond the embeddings, and the base class of the loss wrappers.

A loss wrapper (cross-batch memory, IAA, DAS, MDR, SGAR) is itself a loss with the one signature
``wrapper(embeddings, labels, ref_embeddings=None, ref_labels=None) -> scalar``, so wrappers nest:
``DAS(CrossBatchMemory(loss, miner))`` is XBM over DAS-produced embeddings. Each wrapper leaves its detached
per-term values in ``last_logs`` after every call.

Some wrappers need more than the embeddings: backbone features and the head (SGAR in feature space), the step
or the epoch (IAA's schedule), a pass over the training set before an epoch (IAA's estimation). They inherit
:class:`TrainingHooks`, and the trainer's criterion calls the two hooks on every such submodule, found by
``isinstance``: :meth:`TrainingHooks.on_step_start` with a :class:`StepContext` before each forward, and
:meth:`TrainingHooks.on_epoch_start` before each epoch. ``needs_features`` tells the trainer to compute the
pooled features at all.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn


@dataclass(frozen=True)
class StepContext:
    """The training step about to run: 1-based ``step``, **0-based** ``epoch`` (sampler epochs), the pooled
    backbone ``features`` (B×D, set when some module ``needs_features``) and the embedding ``head`` module."""

    step: int | None = None
    epoch: int | None = None
    features: Tensor | None = None
    head: nn.Module | None = None


class TrainingHooks:
    """Mixin of loss modules that the trainer informs about steps and epochs; both hooks default to nothing."""

    #: whether :attr:`StepContext.features` must be filled (costs the trainer one extra output of the model)
    needs_features: bool = False
    #: which transform the epoch-start loader over the training set applies: ``"eval"`` or ``"train"``
    estimation_transform: str = "eval"

    def on_step_start(self, context: StepContext) -> None:
        """Called before every training forward with what the step knows besides the embeddings."""

    def on_epoch_start(self, epoch: int, model: nn.Module | None = None, loader: Iterable[Any] | None = None) -> None:
        """Called before every 0-based sampler ``epoch`` with the model and a loader over the training set."""


class LossWrapper(nn.Module):
    """Base of the loss wrappers: holds the wrapped ``loss`` and an optional ``miner``, exposes ``last_logs``.

    ``miner`` (``miner(embeddings, labels, ref_embeddings, ref_labels, ignore_mask) -> mined``) is run on exactly
    the rows each call of the wrapped loss sees, and its result passed as ``mined=``. A wrapped loss that is
    itself a wrapper takes no ``mined=``: give the miner to the innermost wrapper.

    ``build_arguments`` names the run facts (``num_classes``, ``embedding_size``, ``total_epochs``) the
    constructor takes, which the config builder fills in. ``lr_multiplier`` applies to the wrapper's own
    parameters (MDR's levels); the wrapped loss's parameters keep the loss's own multiplier.
    """

    build_arguments: ClassVar[tuple[str, ...]] = ()
    lr_multiplier: float = 1.0

    def __init__(self, loss: nn.Module, miner: nn.Module | None = None) -> None:
        super().__init__()
        if miner is not None and isinstance(loss, LossWrapper):
            raise ValueError(
                f"{type(self).__name__}: the wrapped loss is a {type(loss).__name__}, which takes no mined tuples; "
                "give the miner to the innermost wrapper"
            )
        self.loss = loss
        self.miner = miner
        #: detached values of the last call: "loss" (the returned total) and the wrapper's own terms
        self.last_logs: dict[str, Tensor | float] = {}

    def inner_loss(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
        *,
        ignore_mask: Tensor | None = None,
    ) -> Tensor:
        """The wrapped loss on these rows, restricted to the miner's tuples mined on the same rows."""
        kwargs: dict[str, Any] = {}
        if ignore_mask is not None:
            kwargs["ignore_mask"] = ignore_mask
        if self.miner is not None:
            kwargs["mined"] = self.miner(embeddings, labels, ref_embeddings, ref_labels, ignore_mask)
        if ref_embeddings is None:
            return self.loss(embeddings, labels, **kwargs)
        return self.loss(embeddings, labels, ref_embeddings, ref_labels, **kwargs)
