"""Shared pieces of the synthesis wrappers: the trainer-facing base class, a seedable random source whose state is
part of ``state_dict()``, and the ignore mask for "an anchor's own synthetic copies".
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deepmetric.functional import check_loss_inputs

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


class RandomSource(nn.Module):
    """A ``torch.Generator`` whose seed *and current state* are saved in ``state_dict()`` (as extra state).

    Saving the state means a resumed run draws exactly the numbers the uninterrupted run would have drawn. The
    generator lives on the device of the tensors it is asked to produce; moving to another device re-seeds it
    deterministically from the current generator, so CPU and CUDA streams differ but each is reproducible.
    """

    def __init__(self, seed: int | None = 0) -> None:
        super().__init__()
        self.seed = int(torch.seed() if seed is None else seed) % (2**63)
        self._generator: torch.Generator | None = None

    def manual_seed(self, seed: int) -> None:
        """Restart the stream from ``seed`` (on the generator's current device)."""
        self.seed = int(seed)
        device = self._generator.device if self._generator is not None else torch.device("cpu")
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(self.seed)

    def generator(self, device: torch.device | str) -> torch.Generator:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        gen = self._generator
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
        elif gen.device != device:
            # derive the new stream from the old one, so the switch itself is deterministic
            new_seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item())
            gen = torch.Generator(device=device)
            gen.manual_seed(new_seed)
        self._generator = gen
        return gen

    def get_extra_state(self) -> dict[str, Any]:
        gen = self._generator
        return {
            "seed": self.seed,
            "device": None if gen is None else str(gen.device),
            "state": None if gen is None else gen.get_state(),
        }

    def set_extra_state(self, state: Mapping[str, Any]) -> None:
        self.seed = int(state["seed"])
        if state.get("state") is None:
            self._generator = None
            return
        device = torch.device(state["device"])
        if device.type == "cuda" and not torch.cuda.is_available():
            # e.g. a GPU checkpoint opened on a CPU machine for evaluation: keep loading, restart the stream
            warnings.warn(
                "RandomSource: the saved generator state is a CUDA state but CUDA is not available; the random "
                f"stream restarts from seed {self.seed}, so synthesis draws differ from the saved run",
                RuntimeWarning,
                stacklevel=2,
            )
            self._generator = None
            return
        gen = torch.Generator(device=device)
        gen.set_state(state["state"].cpu() if isinstance(state["state"], Tensor) else state["state"])
        self._generator = gen


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
