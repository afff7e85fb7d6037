"""Base class, the one signature shared by every loss, and the dense representation of mined tuples.

Signature::

    loss(embeddings, labels, ref_embeddings=None, ref_labels=None, *, ignore_mask=None, mined=None) -> scalar

Mined tuples (what a miner returns and what ``mined=`` accepts) come in two dense forms, both O(B·R):

* :class:`MinedPairs` — two B×R boolean masks (positive pairs, negative pairs) over the same anchor × reference
  grid as the loss's similarity matrix. Pair losses use them directly; triplet losses read them as "every mined
  positive of an anchor combined with every mined negative of the same anchor" (PML's pair→triplet convention)
  and evaluate that set densely, without materialising the triplets.
* :class:`MinedTriplets` — three 1-D long tensors (anchor row, positive column, negative column) of equal length
  T ≤ B·R. Triplet losses gather their two distances per triplet; pair losses read them as the set of (a, p) and
  (a, n) pairs (duplicates collapse: a pair is used once however many triplets contain it).

Both are validated against the labels and ``ignore_mask`` before use: a "positive" with a different label or an
ignored pair is dropped, so a miner can never re-introduce a self-pair removed by index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from deepmetric.functional import label_masks, resolve_reference
from deepmetric.losses import _fast


@dataclass(frozen=True)
class MinedPairs:
    """Dense pair selection: ``positive`` and ``negative`` are B×R bool masks (True = use this pair).

    ``_source``: set by the built-in miners, as for :class:`MinedTriplets`; a lean pair loss given the very inputs
    mined on reuses the miner's normalisation and similarity matrix and takes the masks as valid.
    """

    positive: Tensor
    negative: Tensor
    _source: _fast.MiningSource | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.positive.shape != self.negative.shape or self.positive.dim() != 2:
            raise ValueError(
                f"MinedPairs: positive and negative must be B×R masks of one shape, got "
                f"{tuple(self.positive.shape)} and {tuple(self.negative.shape)}"
            )

    def __repr__(self) -> str:
        return (f"MinedPairs(shape={tuple(self.positive.shape)}, positives={int(self.positive.sum())}, "
                f"negatives={int(self.negative.sum())})")

    def tensors(self) -> tuple[Tensor, Tensor]:
        return self.positive, self.negative

    def to_masks(self, shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
        if tuple(self.positive.shape) != tuple(shape):
            raise ValueError(f"MinedPairs masks have shape {tuple(self.positive.shape)}, expected (B, R) = {shape}")
        return self.positive.bool(), self.negative.bool()


@dataclass(frozen=True)
class MinedTriplets:
    """Triplets as index tensors: ``anchor`` rows of the batch, ``positive``/``negative`` columns of the reference.

    ``_source`` is set by the built-in miners (:class:`deepmetric.losses._fast.MiningSource`): a lean loss given
    the very inputs mined on reuses the miner's normalisation and skips re-validating the triplets.
    """

    anchor: Tensor
    positive: Tensor
    negative: Tensor
    _source: _fast.MiningSource | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = self.anchor.shape
        if self.anchor.dim() != 1 or self.positive.shape != n or self.negative.shape != n:
            raise ValueError(
                "MinedTriplets: anchor, positive and negative must be 1-D index tensors of equal length, got "
                f"{tuple(self.anchor.shape)}, {tuple(self.positive.shape)}, {tuple(self.negative.shape)}"
            )

    def __len__(self) -> int:
        return int(self.anchor.shape[0])

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.anchor, self.positive, self.negative

    def __repr__(self) -> str:
        return f"MinedTriplets(n={len(self)})"

    def to_masks(self, shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
        device = self.anchor.device
        pos = torch.zeros(shape, dtype=torch.bool, device=device)
        neg = torch.zeros(shape, dtype=torch.bool, device=device)
        pos[self.anchor, self.positive] = True
        neg[self.anchor, self.negative] = True
        return pos, neg


Mined = MinedPairs | MinedTriplets


def pair_masks(
    labels: Tensor, ref_labels: Tensor, ignore_mask: Tensor | None, mined: Mined | None = None
) -> tuple[Tensor, Tensor]:
    """The (positive, negative) B×R masks a pair loss should use: all valid pairs, or the mined ones ∩ valid."""
    pos, neg = label_masks(labels, ref_labels, ignore_mask)
    if mined is None:
        return pos, neg
    mpos, mneg = mined.to_masks((labels.shape[0], ref_labels.shape[0]))
    return pos & mpos.to(pos.device), neg & mneg.to(neg.device)


def valid_triplets(
    triplets: MinedTriplets, labels: Tensor, ref_labels: Tensor, ignore_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Index tensors of the triplets whose labels agree and whose two pairs are not ignored (O(T))."""
    a, p, n = triplets.anchor.long(), triplets.positive.long(), triplets.negative.long()
    ok = (labels[a] == ref_labels[p]) & (labels[a] != ref_labels[n])
    if ignore_mask is not None:
        ok = ok & ~ignore_mask[a, p] & ~ignore_mask[a, n]
    return a[ok], p[ok], n[ok]


class MetricLoss(nn.Module):
    """``loss(embeddings, labels, ref_embeddings=None, ref_labels=None, *, ignore_mask=None, mined=None)``.

    * ``ref_embeddings=None``: the batch is compared with itself; self-pairs are removed by index.
    * ``ref_embeddings`` given: anchors are compared with the reference rows (cross-batch memory, gathered
      batches under DDP, query/gallery training). ``ignore_mask`` (B×R bool) removes pairs that must never be
      used, e.g. an anchor's own memory slot.
    * ``mined``: a :class:`MinedPairs` or :class:`MinedTriplets` from a miner, computed on the same
      (embeddings, references); restricts the loss to those tuples. Losses that cannot use tuples (proxy and
      classification losses) set ``accepts_mined = False`` and raise a ``TypeError`` when given one.

    Subclasses implement :meth:`compute` on already-resolved references. Subclasses with
    ``accepts_mined = True`` receive ``mined`` as a keyword; others are called with the five positional
    arguments only (the original contract). ``lr_multiplier`` is the learning-rate multiplier the trainer
    applies to this module's own parameters (proxies, learnable margins).
    """

    lr_multiplier: float = 1.0
    accepts_mined: bool = False
    fast: bool = False  # True: forward() uses fast_compute()

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
        *,
        ignore_mask: Tensor | None = None,
        mined: Mined | None = None,
    ) -> Tensor:
        if self.fast:
            # Lean path: no B×B identity, masks built once, analytic backward (see deepmetric.losses._fast).
            ref_e, ref_l, ignore, self_cmp = _fast.resolve(embeddings, labels, ref_embeddings, ref_labels, ignore_mask)
            if mined is not None:
                self._check_mined(mined)
            # autocast off: similarities, softmaxes and row dots accumulate in fp32 (half inputs are promoted)
            with _fast.full_precision(embeddings.device):
                return self.fast_compute(embeddings, labels, ref_e, ref_l, ignore, self_cmp, mined)
        ref_e, ref_l, ignore = resolve_reference(embeddings, labels, ref_embeddings, ref_labels, ignore_mask)
        if mined is None:
            return self.compute(embeddings, labels, ref_e, ref_l, ignore)
        if not self.accepts_mined:
            raise TypeError(f"{type(self).__name__} does not take mined tuples (mined=); it is not a pair/triplet loss")
        if not isinstance(mined, (MinedPairs, MinedTriplets)):
            raise TypeError(f"mined must be MinedPairs or MinedTriplets, got {type(mined).__name__}")
        return self.compute(embeddings, labels, ref_e, ref_l, ignore, mined=mined)

    def _check_mined(self, mined: object) -> None:
        if not self.accepts_mined:
            raise TypeError(f"{type(self).__name__} does not take mined tuples (mined=); it is not a pair/triplet loss")
        if not isinstance(mined, (MinedPairs, MinedTriplets)):
            raise TypeError(f"mined must be MinedPairs or MinedTriplets, got {type(mined).__name__}")

    def compute(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, mined: Mined | None = None,
    ) -> Tensor:
        raise NotImplementedError

    def fast_compute(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, self_cmp: bool, mined: Mined | None = None,
    ) -> Tensor:
        """Lean implementation used by :meth:`forward` when ``fast`` is True; same value and gradient as
        :meth:`compute` (the reference implementation, kept for tests and subclasses). ``self_cmp``: the
        references are the batch itself and the diagonal is an ignored pair (not included in ``ignore_mask``)."""
        raise NotImplementedError
