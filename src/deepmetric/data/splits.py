"""Class-disjoint splits: a validation slice of the training classes, and Reality-Check 4-fold CV.

Deep metric learning evaluates on classes never seen in training, so model selection must too: these
functions split by *class*, never by image (methods.md §7.3).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def class_disjoint_split(
    labels: Sequence[int] | np.ndarray, fraction: float, seed: int | str = "last"
) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into (train, validation) with no class in both.

    ``round(fraction · C)`` of the C classes (at least 1, at most C − 1) go to validation: with
    ``seed="last"`` the largest class ids (deterministic, like taking the tail of a sorted class list), with an
    integer seed a random subset drawn by ``numpy.random.default_rng(seed)``. Returns sorted int64 index arrays.
    """
    labels = np.asarray(labels).reshape(-1)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie strictly between 0 and 1, got {fraction}")
    classes = np.unique(labels)
    if classes.size < 2:
        raise ValueError(f"a class-disjoint split needs at least 2 classes, got {classes.size}")
    n_val = min(max(round(fraction * classes.size), 1), classes.size - 1)
    if seed == "last":
        val_classes = classes[-n_val:]
    elif isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        val_classes = np.random.default_rng(int(seed)).choice(classes, size=n_val, replace=False)
    else:
        raise ValueError(f"seed must be an integer or 'last', got {seed!r}")
    is_val = np.isin(labels, val_classes)
    return np.flatnonzero(~is_val).astype(np.int64), np.flatnonzero(is_val).astype(np.int64)


def reality_check_folds(
    class_ids: Sequence[int] | np.ndarray, n_folds: int = 4
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Class lists ``(train_classes, val_classes)`` of the Reality-Check k-fold cross-validation.

    The n distinct class ids are sorted. Fold k starts at ``⌊k·n/n_folds⌋``, trains on the contiguous
    (wrap-around) block of ``n − ⌊n/n_folds⌋`` classes from there and validates on the following
    ``⌊n/n_folds⌋`` classes — the block lengths and start indices of powerful-benchmarker's MLRCSplitManager.
    When ``n_folds`` divides n the validation blocks partition the classes; otherwise a few classes are never
    validated (as in the original).
    """
    classes = np.unique(np.asarray(class_ids).reshape(-1))
    n = classes.size
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    if n < n_folds:
        raise ValueError(f"{n_folds}-fold class-disjoint CV needs at least {n_folds} classes, got {n}")
    n_val = n // n_folds
    n_train = n - n_val
    folds = []
    for k in range(n_folds):
        start = (k * n) // n_folds
        order = np.roll(classes, -start)
        folds.append((np.sort(order[:n_train]), np.sort(order[n_train:])))
    return folds


def indices_of_classes(labels: Sequence[int] | np.ndarray, classes: Sequence[int] | np.ndarray) -> np.ndarray:
    """Sorted indices of the samples whose label is in ``classes`` (to turn a fold into a subset)."""
    return np.flatnonzero(np.isin(np.asarray(labels), np.asarray(classes))).astype(np.int64)
