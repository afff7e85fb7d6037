"""Miner base class: one signature, dense outputs (:class:`~deepmetric.losses.base.MinedPairs` or
:class:`~deepmetric.losses.base.MinedTriplets`), explicit seedable random generators."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from deepmetric.losses import _fast
from deepmetric.losses.base import Mined


class Miner(nn.Module):
    """``miner(embeddings, labels, ref_embeddings=None, ref_labels=None, ignore_mask=None) -> Mined``.

    Same reference convention as the losses (``ref=None`` ⇒ batch vs itself, self-pairs removed by index).
    Runs without gradient. Sampling miners draw from their own ``torch.Generator`` seeded by ``seed``
    (one generator per device, all seeded identically), so results are reproducible and independent of the
    global RNG; ``seed=None`` seeds from the global RNG once at construction.
    """

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self.seed = int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        self._generators: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def rand(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """U[0, 1) numbers from this miner's generator, in ``like``'s device and dtype."""
        return torch.rand(shape, generator=self.generator(like.device), device=like.device, dtype=like.dtype)

    @torch.no_grad()
    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
        ignore_mask: Tensor | None = None,
    ) -> Mined:
        ref_e, ref_l, ignore, self_cmp = _fast.resolve(embeddings, labels, ref_embeddings, ref_labels, ignore_mask)
        x = embeddings.detach()
        # The same object for a self comparison: miners normalise it once (see deepmetric.losses._fast.prepare).
        # Autocast off: the mined tuples must come from the fp32 distances the loss will use.
        r = x if ref_e is embeddings else ref_e.detach()
        with _fast.full_precision(x.device):
            mined = self._mine_labels(x, r, labels, ref_l, ignore, self_cmp)
        source = getattr(mined, "_source", None)
        if source is not None:
            source.bind(x, r, labels, ref_l, ignore, self_cmp, mined.tensors())
        return mined

    def mine(self, embeddings: Tensor, ref_embeddings: Tensor, pos: Tensor, neg: Tensor) -> Mined:
        """Mine on (embeddings, references) given the B×R positive and negative pair masks."""
        raise NotImplementedError

    def _mine_labels(
        self, embeddings: Tensor, ref_embeddings: Tensor, labels: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, self_cmp: bool,
    ) -> Mined:
        """Mine from labels (what :meth:`forward` calls): the pair masks, then :meth:`mine`. A miner that reads
        other masks builds those instead."""
        pos, neg = _fast.masks(labels, ref_labels, ignore_mask, self_cmp)
        return self.mine(embeddings, ref_embeddings, pos, neg)


def sample_one_per_row(mask: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """Uniformly pick one True column per row using uniform noise ``u`` (B×R); returns (index, row has one)."""
    keys = torch.where(mask, u, torch.full_like(u, -1.0))
    return keys.argmax(1), mask.any(1)
