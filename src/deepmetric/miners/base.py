"""Miner base class: one signature, dense outputs (:class:`~deepmetric.losses.base.MinedPairs` or
:class:`~deepmetric.losses.base.MinedTriplets`), a seedable random stream that is module state."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from deepmetric.functional import as_float, label_masks, resolve_reference
from deepmetric.losses.base import Mined
from deepmetric.random_source import RandomSource


class Miner(nn.Module):
    """``miner(embeddings, labels, ref_embeddings=None, ref_labels=None, ignore_mask=None) -> Mined``.

    Same reference convention as the losses (``ref=None`` ⇒ batch vs itself, self-pairs removed by index).
    Runs without gradient and with autocast off (the tuples come from fp32 distances, as the loss's). Sampling
    miners draw from ``self.rng`` (:class:`~deepmetric.random_source.RandomSource`, seeded by ``seed``), never
    from the global RNG; its state is in ``state_dict()``, so a resumed run mines exactly the tuples the
    uninterrupted run would have. ``seed=None`` draws the seed from the global RNG once, at construction.
    ``build_arguments``: facts of the run a builder must pass to the constructor (none for the built-in miners).
    """

    build_arguments: ClassVar[tuple[str, ...]] = ()

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self.seed = int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        self.rng = RandomSource(self.seed)

    def rand(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """U[0, 1) numbers from this miner's stream, in ``like``'s device and dtype."""
        return torch.rand(shape, generator=self.rng.generator(like.device), device=like.device, dtype=like.dtype)

    @torch.no_grad()
    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
        ignore_mask: Tensor | None = None,
    ) -> Mined:
        ref_e, ref_l, ignore = resolve_reference(embeddings, labels, ref_embeddings, ref_labels, ignore_mask)
        x = as_float(embeddings.detach())
        r = x if ref_e is embeddings else as_float(ref_e.detach())  # one object: normalised once
        pos, neg = label_masks(labels, ref_l, ignore)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.mine(x, r, pos, neg)

    def mine(self, embeddings: Tensor, ref_embeddings: Tensor, pos: Tensor, neg: Tensor) -> Mined:
        """Mine on (embeddings, references) given the B×R bool positive and negative pair masks."""
        raise NotImplementedError


def sample_one_per_row(mask: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """Uniformly pick one True column per row using uniform noise ``u`` (B×R); returns (index, row has one)."""
    keys = torch.where(mask, u, torch.full_like(u, -1.0))
    return keys.argmax(1), mask.any(1)
