"""Checks that keep a failing run from looking like a working one: divergence and embedding collapse.

A diverged run (a too-large learning rate, an fp16 overflow in the weights) need not show it in the loss: once
the weights are NaN every similarity comparison is false, a mining loss finds nothing to mine and reports 0.0.
So the parameters, buffers and gradients are checked too, with one device synchronisation per check; only on
failure are the tensors searched for a name. A collapsed run is finite but useless: every image gets (nearly) the
same embedding and retrieval is at chance; :func:`embedding_spread` measures it on the training batch, and
:func:`chance_levels` / :func:`chance_warning` compare a validation evaluation with what a random ranking of the
same split would score.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deepmetric.training.checkpoint import first_non_finite_named, load_checkpoint


class TrainingDiverged(RuntimeError):
    """A loss term, gradient, weight or buffer became NaN/inf; the message names the step, the tensor and the
    checkpoint that was kept."""


#: below this spread a batch's embeddings are treated as collapsed (random unit vectors give about 1)
COLLAPSE_SPREAD = 1e-3


def _named_float_tensors(modules: dict[str, nn.Module], grads: bool) -> Iterable[tuple[str, torch.Tensor]]:
    for prefix, module in modules.items():
        for name, param in module.named_parameters():
            tensor = param.grad if grads else param
            if tensor is not None and tensor.is_floating_point():
                yield f"{prefix}.{name}", tensor
        if not grads:
            for name, buffer in module.named_buffers():
                if buffer.is_floating_point():
                    yield f"{prefix}.{name}", buffer


def first_non_finite_tensor(modules: dict[str, nn.Module], grads: bool = False) -> str | None:
    """The name of the first parameter or floating buffer (or gradient, ``grads=True``) of ``modules`` holding a
    NaN or ±inf, else None. ``modules`` maps a prefix ("model", "criterion") to a module."""
    return first_non_finite_named(_named_float_tensors(modules, grads))


def embedding_spread(embeddings: torch.Tensor) -> float:
    """‖per-dimension standard deviation across the batch‖ / mean embedding norm: about 1 for well spread
    (e.g. random unit) embeddings, 0 when the batch's embeddings are identical."""
    embeddings = embeddings.detach().float()
    if embeddings.shape[0] < 2:
        return float("nan")
    scale = embeddings.norm(dim=1).mean().clamp_min(1e-12)
    return float(embeddings.std(dim=0).norm() / scale)


def collapse_message(step: int, spread: float, lr: float) -> str:
    return (f"WARNING: embeddings collapsed at step {step}: the batch's embeddings are nearly identical (spread "
            f"{spread:.2e}, about 1 when healthy), so retrieval will be at chance. The learning rate "
            f"(optimizer.lr={lr:g}) is probably too high.")


#: a validation evaluation is "at chance" when recall@1 is below chance + max(this, 3 standard errors)
CHANCE_MARGIN = 0.01
#: ... and it is only judged once this fraction of the run has been trained (an early model may still be near it)
CHANCE_AFTER_FRACTION = 0.25
CHANCE_WARNING = "WARNING: validation metrics at chance level"


def chance_levels(query_labels: Sequence[int] | np.ndarray, gallery_labels: Sequence[int] | np.ndarray | None = None,
                  recall_at: Sequence[int] = (1,)) -> dict[str, float]:
    """Expected metric values of a uniformly random ranking, averaged over the queries with R_q > 0.

    With M candidates (N − 1 in self-retrieval, the gallery size otherwise) of which R = R_q are relevant:
    E[Recall@K] = 1 − C(M − R, K) / C(M, K) (at least one relevant item among K drawn without replacement),
    E[Precision@1] = E[R-Precision] = R / M, and, from E[rel(i)·rel(j)] = R(R − 1) / (M(M − 1)) for i ≠ j,
    E[MAP@R] = H_R / M + (R − 1)(R − H_R) / (M(M − 1)) with H_R the R-th harmonic number. Computed per class,
    so it costs O(classes · max R) whatever the split size."""
    query = np.asarray(query_labels, dtype=np.int64)
    gallery = query if gallery_labels is None else np.asarray(gallery_labels, dtype=np.int64)
    classes, queries_per_class = np.unique(query, return_counts=True)
    gallery_classes, gallery_counts = np.unique(gallery, return_counts=True)
    in_gallery = dict(zip(gallery_classes.tolist(), gallery_counts.tolist()))
    relevant = np.array([in_gallery.get(c, 0) for c in classes.tolist()], dtype=np.float64)
    candidates = float(len(gallery) - (1 if gallery_labels is None else 0))
    if gallery_labels is None:
        relevant -= 1.0
    keep = relevant > 0
    weights, r = queries_per_class[keep].astype(np.float64), relevant[keep]
    if not len(r) or candidates < 1:
        return {}
    m = candidates
    harmonic = np.array([np.sum(1.0 / np.arange(1, int(n) + 1)) for n in r])
    pair = (r - 1) * (r - harmonic) / (m * (m - 1)) if m > 1 else np.zeros_like(r)
    per_class = {"precision@1": r / m, "r_precision": r / m, "map@r": harmonic / m + pair}
    for k in sorted({int(k) for k in recall_at if 1 <= int(k) <= m}):
        # log C(M − R, K) − log C(M, K) with lgamma; no relevant-free K-subset exists when M − R < K
        free = m - r
        log_miss = np.array([math.lgamma(f + 1) - math.lgamma(f - k + 1) - math.lgamma(m + 1) + math.lgamma(m - k + 1)
                             if f >= k else -math.inf for f in free])
        per_class[f"recall@{k}"] = 1.0 - np.exp(log_miss)
    return {name: float(np.average(v, weights=weights)) for name, v in per_class.items()}


def chance_warning(split: str, metrics: Mapping[str, float], chance: Mapping[str, float], step: int) -> str | None:
    """A loud message when the split's recall@1 (precision@1 if absent) is within max(:data:`CHANCE_MARGIN`,
    3 standard errors) of its chance level, else None.

    Recall@1 is the judge because it stays at chance under every tie order: a collapsed model ties every
    candidate, and the stable order (gallery index) can lift MAP@R of the first class well above chance.
    The standard error uses the Bernoulli bound √(c(1 − c)/n), which holds for any [0, 1]-valued metric with
    mean c over n independent queries."""
    key = next((k for k in ("recall@1", "precision@1") if k in metrics and k in chance), None)
    if key is None:
        return None
    level, value = chance[key], float(metrics[key])
    n = max(int(metrics.get("n_queries", 0)) - int(metrics.get("n_queries_without_relevant", 0)), 1)
    margin = max(CHANCE_MARGIN, 3.0 * math.sqrt(level * (1.0 - level) / n))
    if not value <= level + margin:
        return None
    shown = ", ".join(f"{k} {100 * float(metrics[k]):.2f} % (chance {100 * chance[k]:.2f} %)"
                      for k in ("recall@1", "map@r") if k in metrics and k in chance)
    return (f"{CHANCE_WARNING} on the {split} split at step {step}: {shown}. The embeddings carry no class "
            "information (collapsed, or not learning): check optimizer.lr, the loss and the data labels.")


class DivergenceGuard:
    """Stops a run at the first non-finite loss term, gradient, weight or buffer of ``modules``.

    ``save_last()`` writes the current state as the last checkpoint ``last_path``; it is called only while the
    weights are still those of the last good step (a bad loss or gradient has not reached them yet). Bad weights
    are never written (``save_atomic`` refuses), so the previous ``last.pt`` stays. ``log`` records the event.
    """

    def __init__(self, modules: dict[str, nn.Module], last_path: Path, save_last: Callable[[], object],
                 log: Callable[[dict], None]) -> None:
        self.modules, self.last_path, self.save_last, self.log = modules, last_path, save_last, log

    def check_loss(self, step: int, loss: torch.Tensor, logs: dict[str, float]) -> None:
        bad = {k: v for k, v in logs.items() if not math.isfinite(v)}
        if torch.isfinite(loss.detach()) and not bad:
            return
        term = ", ".join(sorted(bad)) if bad else "loss"
        self._stop(f"non-finite loss at step {step} in term(s): {term}", term, step, weights_ok=True)

    def check_tensors(self, step: int, grads: bool) -> None:
        name = first_non_finite_tensor(self.modules, grads=grads)
        if name is None:
            return
        what = f"gradient of {name}" if grads else f"weight {name}"
        self._stop(f"non-finite {what} at step {step} (NaN/inf; try a lower optimizer.lr or optimizer.grad_clip_norm)",
                   what, step, weights_ok=grads)

    def _stop(self, message: str, what: str, step: int, weights_ok: bool) -> None:
        # a forward pass may already have written NaN into normalisation statistics: then keep the older file
        if weights_ok and first_non_finite_tensor(self.modules) is None:
            self.save_last()
        self.log({"step": step, "event": "diverged", "terms": what})
        path = self.last_path
        kept = (f"the last finite state (step {int(load_checkpoint(path)['step'])}) is kept in {path}"
                if path.is_file() else "no checkpoint was written before it (set train.checkpoint_every to keep one)")
        raise TrainingDiverged(f"{message}; {kept}")
