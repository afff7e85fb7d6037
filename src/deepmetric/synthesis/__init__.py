"""Embedding-space synthesis and regularisation wrappers: IAA, DAS, MDR, SGAR (methods.md §2.3, §5, §6).

Trainer interface
-----------------
Every method is an ``nn.Module`` wrapper around a base loss (any module with the library loss signature) and
is built from the registry as ``SYNTHESIS[name](loss=base_loss, **params)``; methods with per-class state
(``needs_num_classes``: IAA, DAS) also take ``num_classes`` and ``embedding_size``. Per training step::

    loss, logs = method(embeddings, labels, features=pooled, head=model_head, step=step, epoch=epoch)

* ``embeddings`` — the model output, B×d. ``method.expects_normalized_embeddings`` says which one:
  IAA False (raw head output; normalised inside after synthesis), MDR False (raw; batch-distance scaling inside),
  DAS == its ``normalize`` flag (True by default), SGAR True.
* ``features`` / ``head`` — pooled backbone features before the head and the head module; required when
  ``method.needs_features`` / ``method.needs_head`` (SGAR with ``space='feature'``).
* ``logs`` — a dict of floats for the progress log; always has ``"loss"``.
* ``epoch`` — the trainer's **0-based** epoch counter (IAA converts to the code's 1-based ep = epoch + 1).
* ``method.on_epoch_start(epoch, model, loader)`` — called before each epoch. IAA re-estimates its class
  Gaussians with a no-grad eval-mode pass of ``model`` over ``loader`` every ``update_every`` epochs after
  ``start_epoch``; the model must return raw embeddings (or give IAA an ``embed_fn``).
* ``miner`` — MDR and DAS accept a miner module (``miner(embeddings, labels) -> mined``) whose result is passed
  to the base loss as ``mined=`` (MDR's triplet + distance-weighted sampling); IAA and SGAR do not.
* All state (estimator statistics, DAS banks and frequencies, MDR running statistics, random generator state)
  is in buffers / extra state, so ``state_dict()`` round-trips and a resumed run draws the same numbers.
* Learnable parameters: MDR levels (``lr_multiplier = 1``); the base loss's own parameters (proxies) keep
  the base loss's ``lr_multiplier``.

Building blocks usable on their own: :class:`ClassGaussianEstimator`, :class:`IAASynthesizer`,
:func:`iaa_synthesize`, :func:`iaa_lambda`, :func:`neighbor_weight`, :func:`neighbor_corrected_variances`,
:class:`DASProducer`, :func:`das_transform`, :class:`MDRRegularizer`, :class:`BatchDistanceScale`,
:func:`ranking_loss`, :func:`own_copy_ignore_mask`.
"""

from __future__ import annotations

from deepmetric.synthesis.base import RandomSource, SynthesisMethod, own_copy_ignore_mask
from deepmetric.synthesis.das import DAS, DASProducer, das_transform
from deepmetric.synthesis.iaa import (
    IAA,
    ClassGaussianEstimator,
    IAASynthesizer,
    iaa_lambda,
    iaa_synthesize,
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
