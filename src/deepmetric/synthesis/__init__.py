"""Embedding-space synthesis and regularisation wrappers: IAA, DAS, MDR, SGAR (methods.md §2.3, §5, §6).

Interface
---------
Every method is a loss around a base loss, with the library signature, built from the registry as
``SYNTHESIS[name](loss, miner=None, **params)``; ``cls.build_arguments`` names the run facts its constructor
takes (IAA: ``num_classes``, ``embedding_size``, ``total_epochs``; DAS: ``num_classes``, ``embedding_size``).
Per training step::

    method.on_step_start(StepContext(step=step, epoch=epoch, features=pooled, head=model_head))
    loss = method(embeddings, labels)
    logs = method.last_logs                     # detached terms, always "loss"

* ``embeddings`` — the model output, B×d. ``method.expects_normalized_embeddings`` says which one:
  IAA False (raw head output; normalised inside after synthesis), MDR False (raw; batch-distance scaling inside),
  DAS == its ``normalize`` flag (True by default), SGAR True.
* :class:`~deepmetric.loss_hooks.StepContext` — pooled backbone features before the head and the head module,
  required when ``method.needs_features`` / ``method.needs_head`` (SGAR with ``space='feature'``); ``epoch`` is
  the trainer's **0-based** epoch counter (IAA converts to the code's 1-based ep = epoch + 1).
* ``method.on_epoch_start(epoch, model, loader)`` — called before each epoch. IAA re-estimates its class
  Gaussians with a no-grad eval-mode pass of ``model`` over ``loader`` every ``update_every`` epochs after
  ``start_epoch``; the model must return raw embeddings (or give IAA an ``embed_fn``).
* ``miner`` — every method accepts one; it mines on exactly the rows each base-loss call compares, and the
  result goes to the base loss as ``mined=``.
* Composition: the base loss may be a :class:`~deepmetric.memory.CrossBatchMemory` (the memory is the inner
  wrapper and enqueues the rows the method hands it; then the miner belongs to the memory). The methods
  build their own references, so they refuse ``ref_embeddings`` and never sit inside a memory.
* All state (estimator statistics, DAS banks and frequencies, MDR running statistics, random generator state)
  is in buffers / extra state, so ``state_dict()`` round-trips and a resumed run draws the same numbers.
* Learnable parameters: MDR levels (the wrapper's ``lr_multiplier = 1``); the base loss's own parameters
  (proxies) keep the base loss's ``lr_multiplier``.

Building blocks usable on their own: :class:`ClassGaussianEstimator`, :class:`IAASynthesizer`,
:func:`iaa_synthesize`, :func:`iaa_lambda`, :func:`neighbor_weight`, :func:`neighbor_corrected_variances`,
:class:`DASProducer`, :func:`das_transform`, :class:`MDRRegularizer`, :class:`BatchDistanceScale`,
:func:`ranking_loss`, :func:`own_copy_ignore_mask`.
"""

from __future__ import annotations

from deepmetric.synthesis.base import RandomSource, SynthesisMethod, own_copy_ignore_mask
from deepmetric.synthesis.das import DAS, DASProducer, das_transform
from deepmetric.synthesis.iaa import IAA, IAASynthesizer, iaa_lambda, iaa_synthesize
from deepmetric.synthesis.iaa_estimator import (
    ClassGaussianEstimator,
    neighbor_corrected_variances,
    neighbor_weight,
)
from deepmetric.synthesis.mdr import MDR, BatchDistanceScale, MDRRegularizer
from deepmetric.synthesis.sgar import SGAR, SynthesisRankingRegularizer, anchor_loss, ranking_loss

SYNTHESIS: dict[str, type[SynthesisMethod]] = {
    "iaa": IAA,
    "das": DAS,
    "mdr": MDR,
    "sgar": SynthesisRankingRegularizer,
}

__all__ = [
    "DAS",
    "IAA",
    "MDR",
    "SGAR",
    "SYNTHESIS",
    "BatchDistanceScale",
    "ClassGaussianEstimator",
    "DASProducer",
    "IAASynthesizer",
    "MDRRegularizer",
    "RandomSource",
    "SynthesisMethod",
    "SynthesisRankingRegularizer",
    "anchor_loss",
    "das_transform",
    "iaa_lambda",
    "iaa_synthesize",
    "neighbor_corrected_variances",
    "neighbor_weight",
    "own_copy_ignore_mask",
    "ranking_loss",
]
