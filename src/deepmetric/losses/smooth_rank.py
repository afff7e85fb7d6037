"""Smooth ranks: the shared base of the rank-surrogate losses (Smooth-AP, the Recall@k surrogate).

For a query q with similarities s_j = S_qj to its retrieval set Ω_q (every reference that is not ignored, the
query itself excluded; with ``mined=`` the mined positives and negatives) and positives P_q ⊆ Ω_q, the Heaviside
step of a rank is replaced by a sigmoid of temperature τ:

    r_Ω(p) = 1 + Σ_{j∈Ω_q, j≠p} σ((s_j − s_p)/τ),      r_P(p) = 1 + Σ_{j∈P_q, j≠p} σ((s_j − s_p)/τ)

Only the ranks of positives enter either loss, so the differences are formed for (query, positive, item)
triples: B × P × R with P = the largest |P_q| of the batch (positives gathered into a padded B×P index), not the
B × R × R cube of the authors' code. Queries are processed in blocks of at most ``block_elements`` triples; when
there is more than one block each is checkpointed (recomputed in backward), so peak memory is one block's
triples plus the B×R matrices, whatever the batch size. Sigmoid arguments are clamped to ±30 (below). Autograd
does every backward.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from deepmetric.functional import cosine_similarity_matrix, zero_loss
from deepmetric.losses import reducers
from deepmetric.losses.base import MetricLoss, Mined, pair_masks

Reduction = Literal["contributing", "batch"]
# 2²³ triples: 32 MiB per float32 block tensor; a block's forward and backward hold about four of them.
DEFAULT_BLOCK_ELEMENTS = 2**23
# Sigmoid arguments are clamped to ±30 (σ is within 1e-13 of 0 or 1 there): a product of two sigmoid derivatives
# (rank step × recall step) then stays above float32's smallest normal number. Denormal gradients make the CPU
# similarity GEMMs of the backward several times slower.
SIGMOID_RANGE = 30.0


def clamped_sigmoid(x: Tensor) -> Tensor:
    """σ(x) with x clamped to ±``SIGMOID_RANGE`` (zero gradient beyond, where σ′ < 1e-13)."""
    return torch.sigmoid(x.clamp(-SIGMOID_RANGE, SIGMOID_RANGE))


def _block_ranks(sim: Tensor, positive: Tensor, retrieval: Tensor, index: Tensor, inverse_temperature: float) -> Tensor:
    """(r_Ω, r_P) of the gathered positives of a block of queries: b×P×2 from b×R rows and a b×P index."""
    anchor = sim.gather(1, index)
    # out of place: under checkpointing, in-place steps on the block kept about 2.5× its size alive per block
    step = clamped_sigmoid((sim.unsqueeze(1) - anchor.unsqueeze(2)) * inverse_temperature)
    counts = torch.bmm(step, torch.stack((retrieval, positive), dim=2).to(sim.dtype))
    # Σ_j runs over p itself too: its term is σ(0) = 1/2 exactly (and its gradient cancels), so 1 + Σ − 1/2.
    return counts + 0.5


def smooth_ranks(
    sim: Tensor, positive: Tensor, retrieval: Tensor, temperature: float, block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> tuple[Tensor, Tensor, Tensor]:
    """(r_Ω, r_P, valid), each B×P, for the positives of every query (module docstring).

    ``positive`` and ``retrieval`` are B×R bool masks, ``positive`` ⊆ ``retrieval``; they stay bool until a
    block needs them. Row q's first |P_q| columns are its positives in some order and ``valid`` (in ``sim``'s
    dtype) is 1 there; padded columns hold finite values that callers multiply by ``valid``. P is read back
    from the device once (it sets the shape).
    """
    n_pos = int(positive.sum(1).max()) if positive.numel() else 0
    if n_pos == 0:
        empty = sim.new_zeros(sim.shape[0], 0)
        return empty, empty, empty
    valid, index = torch.topk(positive.to(torch.uint8), n_pos, dim=1)
    rows = max(1, block_elements // (n_pos * sim.shape[1]))
    inverse = 1.0 / temperature
    if rows >= sim.shape[0]:
        counts = _block_ranks(sim, positive, retrieval, index, inverse)
    else:
        counts = torch.cat([
            checkpoint(_block_ranks, sim[s:s + rows], positive[s:s + rows], retrieval[s:s + rows],
                       index[s:s + rows], inverse, use_reentrant=False)
            for s in range(0, sim.shape[0], rows)
        ])
    return counts[..., 0], counts[..., 1], valid.to(sim.dtype)


class SmoothRankLoss(MetricLoss):
    """Base of the losses on smooth ranks of cosine similarities; a subclass maps ranks to per-query losses.

    ``reduction``: ``"contributing"`` = mean over queries with at least one positive (a query without positives
    has no AP or recall); ``"batch"`` = Σ_q L_q / B (the authors' codes, whose m-per-class batches give every
    query positives, so both agree there). ``mined=`` restricts positives and the retrieval set to the mined
    pairs. ``block_elements``: query-block size in (query, positive, item) triples (see the module docstring).
    """

    accepts_mined = True

    def __init__(self, temperature: float, *, reduction: Reduction = "contributing",
                 block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> None:
        super().__init__()
        name = type(self).__name__
        if not temperature > 0:
            raise ValueError(f"{name}: temperature must be > 0, got {temperature}")
        if int(block_elements) < 1:
            raise ValueError(f"{name}: block_elements must be ≥ 1, got {block_elements}")
        self.temperature, self.block_elements = float(temperature), int(block_elements)
        self.reduction = reducers.check_reduction(name, reduction, ("contributing", "batch"))

    def compute(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, mined: Mined | None = None,
    ) -> Tensor:
        sim = cosine_similarity_matrix(embeddings, ref_embeddings)
        return self.rank_loss(sim, *pair_masks(labels, ref_labels, ignore_mask, mined))

    def rank_loss(self, sim: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        """The reduced loss from a B×R similarity matrix and its bool positive / negative masks."""
        ranks_all, ranks_pos, valid = smooth_ranks(sim, positive, positive | negative, self.temperature,
                                                   self.block_elements)
        if valid.shape[1] == 0:
            return zero_loss(sim)
        n_pos = valid.sum(1)
        has_pos = (n_pos > 0).to(sim.dtype)
        per_query = self.query_losses(ranks_all, ranks_pos, valid, n_pos) * has_pos
        return reducers.reduce(self.reduction, per_query, batch_size=sim.shape[0], anchors=has_pos)

    def query_losses(self, ranks_all: Tensor, ranks_pos: Tensor, valid: Tensor, n_pos: Tensor) -> Tensor:
        """Per-query loss (B) from the B×P ranks of the gathered positives (``valid`` marks real ones)."""
        raise NotImplementedError
