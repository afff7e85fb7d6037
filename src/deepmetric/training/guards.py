"""Checks that keep a failing run from looking like a working one: divergence and embedding collapse.

A diverged run (a too-large learning rate, an fp16 overflow in the weights) need not show it in the loss: once
the weights are NaN every similarity comparison is false, a mining loss finds nothing to mine and reports 0.0.
So the parameters, buffers and gradients are checked too, with one device synchronisation per check; only on
failure are the tensors searched for a name. A collapsed run is finite but useless: every image gets (nearly) the
same embedding and retrieval is at chance; :func:`embedding_spread` measures it on the training batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

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
