"""Base classes, the one signature shared by every loss, and the dense representation of mined tuples.

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

:class:`PairLoss` is the base of every loss on a B×R matrix: it computes the matrix (cosine similarity, distance
or squared distance) and the positive/negative masks once, and a subclass is its formula on them
(:meth:`PairLoss.pair_loss`). Autograd does every backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from deepmetric.functional import (
    as_float,
    cosine_similarity_matrix,
    l2_normalize,
    label_masks,
    pairwise_distance,
    resolve_reference,
    row_distance,
)


@dataclass(frozen=True)
class MinedPairs:
    """Dense pair selection: ``positive`` and ``negative`` are B×R bool masks (True = use this pair)."""

    positive: Tensor
    negative: Tensor

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
    """Triplets as index tensors: ``anchor`` rows of the batch, ``positive``/``negative`` columns of the reference."""

    anchor: Tensor
    positive: Tensor
    negative: Tensor

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
    """The (positive, negative) B×R bool masks a pair loss uses: all valid pairs, or the mined ones ∩ valid."""
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

    Subclasses implement :meth:`compute` on already-resolved references (for a self comparison the references
    are ``embeddings`` itself and the diagonal is in ``ignore_mask``). Subclasses with ``accepts_mined = True``
    receive ``mined`` as a keyword; others are called with the five positional arguments only.

    ``lr_multiplier``: the learning-rate multiplier the trainer applies to this module's own parameters
    (proxies, learnable margins). ``build_arguments``: the facts of the run (e.g. ``"num_classes"``,
    ``"embedding_size"``) that a builder must pass to the constructor.
    """

    lr_multiplier: float = 1.0
    accepts_mined: ClassVar[bool] = False
    build_arguments: ClassVar[tuple[str, ...]] = ()

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
        ref_e, ref_l, ignore = resolve_reference(embeddings, labels, ref_embeddings, ref_labels, ignore_mask)
        if mined is None:
            return self.compute(embeddings, labels, ref_e, ref_l, ignore)
        if not self.accepts_mined:
            raise TypeError(f"{type(self).__name__} does not take mined tuples (mined=); it is not a pair/triplet loss")
        if not isinstance(mined, (MinedPairs, MinedTriplets)):
            raise TypeError(f"mined must be MinedPairs or MinedTriplets, got {type(mined).__name__}")
        return self.compute(embeddings, labels, ref_e, ref_l, ignore, mined=mined)

    def compute(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, mined: Mined | None = None,
    ) -> Tensor:
        raise NotImplementedError


Metric = Literal["cosine", "distance", "squared_distance"]


@dataclass(frozen=True)
class Pairs:
    """What a pair loss reads: the B×R ``matrix``, its pair masks and the anchors' ``labels``.

    ``positive`` / ``negative``: 0/1 in the matrix's dtype (same label / other label, minus ignored and
    self pairs, ∩ mined pairs). Losses select with them by multiplication, a plain dense pass.
    """

    matrix: Tensor
    positive: Tensor
    negative: Tensor
    labels: Tensor

    @property
    def batch_size(self) -> int:
        return self.positive.shape[0]


class PairLoss(MetricLoss):
    """A loss that is a formula on one B×R matrix and its masks, both computed here once.

    ``metric`` (set by the subclass): ``"cosine"`` similarity, Euclidean ``"distance"`` or
    ``"squared_distance"`` (between L2-normalised rows when ``normalize_embeddings``). Subclasses implement
    :meth:`pair_loss`.
    """

    accepts_mined = True
    metric: Metric = "cosine"
    normalize_embeddings: bool = True

    def compute(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, mined: Mined | None = None,
    ) -> Tensor:
        pairs = self.pairs(embeddings, labels, ref_embeddings, ref_labels, ignore_mask, mined)
        return self.pair_loss(pairs, embeddings, ref_embeddings)

    def pairs(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, mined: Mined | None = None,
    ) -> Pairs:
        matrix = self.pair_matrix(embeddings, ref_embeddings)
        pos, neg = pair_masks(labels, ref_labels, ignore_mask, mined)
        return Pairs(matrix, pos.to(matrix.dtype), neg.to(matrix.dtype), labels)

    def pair_matrix(self, embeddings: Tensor, ref_embeddings: Tensor) -> Tensor:
        if self.metric == "cosine":
            return cosine_similarity_matrix(embeddings, ref_embeddings)
        return pairwise_distance(embeddings, ref_embeddings, normalize=self.normalize_embeddings,
                                 squared=self.metric == "squared_distance")

    def pair_loss(self, pairs: Pairs, embeddings: Tensor, ref_embeddings: Tensor) -> Tensor:
        """The loss from ``pairs``; ``embeddings``/``ref_embeddings`` for losses that also read the rows."""
        raise NotImplementedError

    def triplet_distances(
        self, embeddings: Tensor, ref_embeddings: Tensor, anchor: Tensor, positive: Tensor, negative: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """(D_ap, D_an) of T given triplets in this loss's distance, from the 3T gathered rows: O(T·d), no B×R
        matrix (triplet losses on :class:`MinedTriplets`)."""
        if self.metric == "cosine":
            raise TypeError(f"{type(self).__name__} compares cosine similarities, not triplet distances")
        same = ref_embeddings is embeddings
        x = as_float(embeddings)
        r = x if same else as_float(ref_embeddings)
        if self.normalize_embeddings:
            x = l2_normalize(x)
            r = x if same else l2_normalize(r)
        xa = x.index_select(0, anchor)
        squared = self.metric == "squared_distance"
        return (row_distance(xa, r.index_select(0, positive), squared),
                row_distance(xa, r.index_select(0, negative), squared))
