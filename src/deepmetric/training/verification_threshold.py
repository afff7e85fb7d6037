"""The run's "same item" threshold: calibrated at the end of training on the validation split and saved beside
results.json as ``verification.json``, so that ``deepmetric search --run`` (and ``deepmetric index``, which copies
it) answer match / no match with the model the run selected.

The calibration is :func:`deepmetric.evaluation.verification.calibrate_on_split` (cosine similarity, target
false-match rate :data:`~deepmetric.evaluation.verification.DEFAULT_TARGET_FMR`).
"""

from __future__ import annotations

from typing import Any

from deepmetric.evaluation.verification import (
    DEFAULT_TARGET_FMR,
    THRESHOLD_FILE,
    calibrate_on_split,
    write_threshold,
)
from deepmetric.training.distributed import embed_dataset_distributed
from deepmetric.training.selection import SplitEvaluator


def save_verification_threshold(evaluator: SplitEvaluator, selected_step: int | None,
                                target_fmr: float = DEFAULT_TARGET_FMR) -> dict[str, Any] | None:
    """Calibrate on the validation split with the evaluator's (selected) model and write ``verification.json``.

    Every rank takes part in the embedding; rank 0 writes. Returns what was written, or None off rank 0 and when
    there is no validation split with two classes to calibrate on.
    """
    dataset = evaluator.data.validation
    if dataset is None:
        return None
    dc = evaluator.config.data
    embeddings, labels = embed_dataset_distributed(
        evaluator.model, dataset, evaluator.context, batch_size=dc.eval_batch_size, device=evaluator.device,
        num_workers=dc.num_workers, progress=False, description="embed validation (threshold)",
    )
    if not evaluator.context.is_main:
        return None
    n_classes = len(set(labels.tolist()))
    if n_classes < 2 or n_classes == len(labels):  # no impostor pairs, or no genuine pair
        return None
    info = {**calibrate_on_split(embeddings, labels, target_fmr), "selected_step": selected_step}
    write_threshold(evaluator.run_dir / THRESHOLD_FILE, info)
    return info


__all__ = ["save_verification_threshold"]
