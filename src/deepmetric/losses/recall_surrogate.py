"""Recall@k surrogate with optional similarity mixup (Patel, Tolias, Matas, CVPR 2022)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from deepmetric.functional import as_float, gram_matrix, l2_normalize
from deepmetric.losses.base import Mined, pair_masks
from deepmetric.losses.smooth_rank import DEFAULT_BLOCK_ELEMENTS, Reduction, SmoothRankLoss, clamped_sigmoid
from deepmetric.random_source import RandomSource


def simix_pairs(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(i, j) index tensors of every unordered same-class pair i < j of the batch, in row-major order."""
    same = labels.unsqueeze(1) == labels.unsqueeze(0)
    first, second = torch.triu(same, diagonal=1).nonzero(as_tuple=True)
    return first, second


class RecallSurrogateLoss(SmoothRankLoss):
    r"""Recall@k surrogate (RS@k). Patel, Tolias, Matas, "Recall@k Surrogate Loss with Large Batches and
    Similarity Mixup", CVPR 2022.

    On cosine similarities s_j = S_qj of query q to its retrieval set Ω_q (the query itself excluded) with
    positives P_q, the smooth rank (temperature τ₁) and the smooth "within the top k" step (temperature τ₂):

        r(p) = 1 + Σ_{j∈Ω_q, j≠p} σ((s_j − s_p)/τ₁)

        R̃@k(q) = min(Σ_{p∈P_q} σ((k − r(p))/τ₂), k) / min(k, |P_q|)

        L = mean_q [1 − (1/|K|) Σ_{k∈K} R̃@k(q)]   (``reduction="contributing"``: over queries with positives)

    As τ₁, τ₂ → 0, R̃@k(q) is the exact recall@k normalised by min(k, |P_q|) (1 when the first min(k, |P_q|)
    results are positives). The numerator's clip at k is the authors' code's: with smooth ranks Σ σ can exceed k.

    Parameters: ``k`` = K (paper: 1, 2, 4, 8, 16), ``rank_temperature`` τ₁ = 0.01, ``recall_temperature`` τ₂ = 1
    (one value, or one per k: the authors' script's default is τ₂ = k for each k).

    SiMix (``simix=True``, in training mode only, like dropout): for every unordered pair (i, j) of same-class
    samples of the batch a virtual sample v = α x̂_i + (1 − α) x̂_j of that class is added, α ~ U(0, 1) per
    pair, x̂ the L2-normalised embeddings. v is not re-normalised, so S(v, z) = α S(i, z) + (1 − α) S(j, z): the
    similarities are mixed. As in the authors' code (``yash0307/RecallatK_surrogate``, ``src/mixup.py`` and the
    training loop) virtual samples join both the queries and the retrieval set (a virtual query's own column is
    ignored). With explicit references (cross-batch memory) they are appended to the references too. α is drawn
    from ``self.rng`` (a :class:`~deepmetric.random_source.RandomSource` seeded by ``seed``, saved in
    ``state_dict()``). A class with m samples adds m(m−1)/2 virtual samples. SiMix does not take ``mined=``.

    Deviations from the authors' code: the code ranks a query's positives against the whole batch *including the
    query itself* (every rank ≈ 1 higher), needs class-sorted batches with a fixed number per class, and writes
    its mixing only for 3, 4 or 6 samples per class; here the query is excluded (the paper's r(q, x; Ω)), any
    label layout works, and ranks are computed for positives only in memory-bounded query blocks
    (:mod:`deepmetric.losses.smooth_rank`).
    """

    def __init__(
        self,
        k: Sequence[int] = (1, 2, 4, 8, 16),
        rank_temperature: float = 0.01,
        recall_temperature: float | Sequence[float] = 1.0,
        *,
        simix: bool = False,
        seed: int | None = 0,
        reduction: Reduction = "contributing",
        block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    ) -> None:
        super().__init__(rank_temperature, reduction=reduction, block_elements=block_elements)
        name = type(self).__name__
        ks = tuple(int(v) for v in k)
        if not ks or any(v < 1 or v != float(w) for v, w in zip(ks, k)):
            raise ValueError(f"{name}: k must be a non-empty list of integers ≥ 1, got {list(k)}")
        if isinstance(recall_temperature, (int, float)):
            temps = (float(recall_temperature),) * len(ks)
        else:
            temps = tuple(float(t) for t in recall_temperature)
        if len(temps) != len(ks) or not all(t > 0 for t in temps):
            raise ValueError(f"{name}: recall_temperature must be > 0, one value or one per k ({len(ks)}), "
                             f"got {recall_temperature}")
        self.k, self.recall_temperatures, self.simix = ks, temps, bool(simix)
        self.rng = RandomSource(seed)

    def compute(
        self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor, ref_labels: Tensor,
        ignore_mask: Tensor | None, mined: Mined | None = None,
    ) -> Tensor:
        if not (self.simix and self.training):
            return super().compute(embeddings, labels, ref_embeddings, ref_labels, ignore_mask, mined)
        if mined is not None:
            raise ValueError(f"{type(self).__name__}: simix=True does not take mined tuples (mined=)")
        same = ref_embeddings is embeddings
        x = l2_normalize(as_float(embeddings))
        refs = x if same else l2_normalize(as_float(ref_embeddings))
        first, second = simix_pairs(labels)
        alpha = torch.rand(first.shape[0], 1, generator=self.rng.generator(x.device), device=x.device, dtype=x.dtype)
        virtual = alpha * x[first] + (1.0 - alpha) * x[second]
        virtual_labels = labels[first]
        queries = torch.cat((x, virtual))
        refs = queries if same else torch.cat((refs, virtual))
        n_query, n_ref, n_virtual = x.shape[0], refs.shape[0] - virtual.shape[0], virtual.shape[0]
        ignore = torch.zeros(n_query + n_virtual, n_ref + n_virtual, dtype=torch.bool, device=x.device)
        if ignore_mask is not None:
            ignore[:n_query, :n_ref] = ignore_mask
        ignore[n_query:, n_ref:] = torch.eye(n_virtual, dtype=torch.bool, device=x.device)
        query_labels = torch.cat((labels, virtual_labels))
        all_ref_labels = torch.cat((ref_labels.to(labels.device), virtual_labels))
        return self.rank_loss(gram_matrix(queries, refs), *pair_masks(query_labels, all_ref_labels, ignore))

    def query_losses(self, ranks_all: Tensor, ranks_pos: Tensor, valid: Tensor, n_pos: Tensor) -> Tensor:
        k = torch.tensor(self.k, dtype=ranks_all.dtype, device=ranks_all.device)
        inverse = 1.0 / torch.tensor(self.recall_temperatures, dtype=ranks_all.dtype, device=ranks_all.device)
        within = clamped_sigmoid((k - ranks_all.unsqueeze(2)) * inverse) * valid.unsqueeze(2)
        recall = torch.minimum(within.sum(1), k) / torch.minimum(k, n_pos.unsqueeze(1)).clamp_min(1.0)
        return 1.0 - recall.mean(1)

    def extra_repr(self) -> str:
        return (f"k={list(self.k)}, rank_temperature={self.temperature}, "
                f"recall_temperature={list(self.recall_temperatures)}, simix={self.simix}, "
                f"reduction={self.reduction!r}, block_elements={self.block_elements}")
