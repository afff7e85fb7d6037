"""DAS — Densely-Anchored Sampling (Liu et al., ECCV 2022): DFS (discriminative feature scaling) + MTS (memorized
transformation shifting), methods.md §6.2, code ``lizhaoliu-Lec/DAS:modules/embedding_producer.py``.

Per training iteration, before the loss:

1. DFS statistics: for every real e_i the indices of its K largest *signed* values get F[y_i, idx] += 1
   (F ∈ ℕ^{C×d}, never decayed).
2. MTS memory: per class c in the batch, all ordered differences e_a − e_b (a ≠ b, same class, exact-zero rows
   dropped) are enqueued in the class's FIFO bank of Q rows (if more than Q arrive, the last Q are kept).
3. Produce P copies of the batch: ẽ_i = e_i with ẽ_i[k_i] = e_i[k_i] ⊙ σ, k_i = top-K dims of F[y_i],
   σ ~ U[left, right)^K; then ẽ_i ← ẽ_i + s_mts·t_i, t_i a uniformly drawn stored row of bank y_i (0 if the bank
   is empty); L2-normalise unless ``normalize=False``.
4. E' = [E; Ẽ¹; …; Ẽᴾ] (B(1+P) rows), y' = [y; …; y]; **every row is an anchor**. With ``aux_loss``:
   L = loss(E) + w·loss(E'); otherwise L = loss(E').

Composition: a miner mines on the rows the loss sees (E' or E); ``DAS(CrossBatchMemory(loss, miner))`` is XBM over
DAS-produced embeddings — the memory enqueues every row of E' (see :mod:`deepmetric.memory`). With ``aux_loss``
the inner loss runs twice per step, so it must not be a memory (it would enqueue the real rows twice).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from deepmetric.functional import l2_normalize
from deepmetric.loss_hooks import LossWrapper
from deepmetric.synthesis.base import (
    LossFn,
    RandomSource,
    SynthesisMethod,
    check_embeddings,
    check_labels,
)


def das_transform(
    embeddings: Tensor, dims: Tensor, scales: Tensor, shifts: Tensor, mts_scale: float, normalize: bool = True
) -> Tensor:
    """One DAS copy: ẽ = e with ẽ[dims] = e[dims]·scales, then ẽ + s_mts·shift, then optional L2-normalisation.

    ``dims`` (B×K long), ``scales`` (B×K), ``shifts`` (B×d). Differentiable w.r.t. ``embeddings`` (the scale and
    shift are constants).
    """
    factor = torch.ones_like(embeddings).scatter(1, dims, scales.to(embeddings.dtype))
    out = embeddings * factor + mts_scale * shifts.to(embeddings.dtype)
    return l2_normalize(out) if normalize else out


class DASProducer(nn.Module):
    """DFS + MTS embedding producer; state in buffers.

    Buffers: ``frequency`` F (C×d, int64), ``bank`` (C×Q×d), ``bank_ptr`` (C, next write slot),
    ``bank_count`` (C, number of filled slots ≤ Q). Randomness (σ and the bank row) comes from the module's
    :class:`RandomSource` (seed ``seed``, state saved in ``state_dict``).

    ``forward(e, y) -> (E', y', is_synthetic)`` updates the statistics (only in training mode) and produces P
    copies; :meth:`update` and :meth:`produce` are the two halves. ``produce`` accepts injected ``scales``
    (P×B×K) and ``shifts`` (P×B×d, the chosen bank rows) for deterministic use.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        num_produce: int = 3,
        dfs_num_scale: int = 4,
        scale_left: float = 0.5,
        scale_right: float = 2.0,
        bank_size: int = 10,
        mts_scale: float = 0.01,
        normalize: bool = True,
        detach: bool = False,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        if num_classes < 1 or embedding_size < 1:
            raise ValueError(f"num_classes and embedding_size must be ≥ 1, got {num_classes}, {embedding_size}")
        if not 0 <= dfs_num_scale <= embedding_size:
            raise ValueError(f"dfs_num_scale must be in [0, embedding_size={embedding_size}], got {dfs_num_scale}")
        if num_produce < 0 or bank_size < 1:
            raise ValueError(f"num_produce must be ≥ 0 and bank_size ≥ 1, got {num_produce}, {bank_size}")
        if scale_right < scale_left:
            raise ValueError(f"scale_left must be ≤ scale_right, got [{scale_left}, {scale_right})")
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.num_produce = num_produce
        self.dfs_num_scale = dfs_num_scale
        self.scale_left = scale_left
        self.scale_right = scale_right
        self.bank_size = bank_size
        self.mts_scale = mts_scale
        self.normalize = normalize
        self.detach = detach
        self.register_buffer("frequency", torch.zeros(num_classes, embedding_size, dtype=torch.long))
        self.register_buffer("bank", torch.zeros(num_classes, bank_size, embedding_size))
        self.register_buffer("bank_ptr", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("bank_count", torch.zeros(num_classes, dtype=torch.long))
        self.rng = RandomSource(seed)

    @torch.no_grad()
    def update(self, embeddings: Tensor, labels: Tensor) -> None:
        """DFS frequency update and MTS bank enqueue from the real batch (no gradient)."""
        check_embeddings(embeddings, labels, "DASProducer", self.embedding_size)
        check_labels(labels, self.num_classes, "DASProducer")
        e = embeddings.detach()
        k = self.dfs_num_scale
        if k > 0:
            idx = torch.topk(e, k, dim=1).indices
            rows = labels.unsqueeze(1).expand_as(idx)
            self.frequency.index_put_((rows.reshape(-1), idx.reshape(-1)),
                                      torch.ones(idx.numel(), dtype=torch.long, device=e.device), accumulate=True)
        self._enqueue_differences(e, labels)

    def _enqueue_differences(self, e: Tensor, labels: Tensor) -> None:
        b = e.shape[0]
        same = (labels.unsqueeze(1) == labels.unsqueeze(0)) & ~torch.eye(b, dtype=torch.bool, device=e.device)
        a_idx, b_idx = same.nonzero(as_tuple=True)  # row-major: anchor a, then b — the enqueue order
        if a_idx.numel() == 0:
            return
        diffs = e[a_idx] - e[b_idx]
        keep = (diffs != 0).any(dim=1)  # identical images give zero rows, which would read as "empty slot"
        diffs, cls = diffs[keep], labels[a_idx[keep]]
        if cls.numel() == 0:
            return
        order = torch.argsort(cls, stable=True)
        diffs, cls = diffs[order], cls[order]
        classes, per_class = torch.unique_consecutive(cls, return_counts=True)
        first = torch.cumsum(per_class, 0) - per_class
        rank = torch.arange(cls.numel(), device=e.device) - torch.repeat_interleave(first, per_class)
        n_c = torch.repeat_interleave(per_class, per_class)
        dropped = (n_c - self.bank_size).clamp_min(0)  # only the last Q of each class survive
        survive = rank >= dropped
        slot = (self.bank_ptr[cls] + rank - dropped) % self.bank_size
        self.bank[cls[survive], slot[survive]] = diffs[survive].to(self.bank.dtype)
        kept = per_class.clamp_max(self.bank_size)
        self.bank_ptr[classes] = (self.bank_ptr[classes] + kept) % self.bank_size
        self.bank_count[classes] = (self.bank_count[classes] + kept).clamp_max(self.bank_size)

    def class_dims(self, labels: Tensor) -> Tensor:
        """k_i = indices of the top-K entries of F[y_i] (B×K)."""
        return torch.topk(self.frequency[labels], self.dfs_num_scale, dim=1).indices

    def sample_scales(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        gen = self.rng.generator(device)
        u = torch.rand((self.num_produce, batch_size, self.dfs_num_scale), generator=gen, device=device, dtype=dtype)
        return self.scale_left + (self.scale_right - self.scale_left) * u

    def sample_shifts(self, labels: Tensor, dtype: torch.dtype) -> Tensor:
        """A uniformly drawn stored row of bank y_i per copy and row (zero vector where the bank is empty)."""
        gen = self.rng.generator(labels.device)
        count = self.bank_count[labels]  # B
        u = torch.rand((self.num_produce, labels.shape[0]), generator=gen, device=labels.device)
        row = (u * count.clamp_min(1)).floor().long().clamp_max(self.bank_size - 1)
        shifts = self.bank[labels.unsqueeze(0).expand_as(row), row].to(dtype)
        return shifts * (count > 0).unsqueeze(0).unsqueeze(2).to(dtype)

    def produce(
        self, embeddings: Tensor, labels: Tensor, *, scales: Tensor | None = None, shifts: Tensor | None = None
    ) -> Tensor:
        """P copies stacked copy-major ((P·B)×d); ``scales`` P×B×K and ``shifts`` P×B×d may be injected."""
        check_embeddings(embeddings, labels, "DASProducer", self.embedding_size)
        check_labels(labels, self.num_classes, "DASProducer")
        p, b = self.num_produce, embeddings.shape[0]
        source = embeddings.detach() if self.detach else embeddings
        if p == 0:
            return source[:0]
        dims = self.class_dims(labels)
        if scales is None:
            scales = self.sample_scales(b, embeddings.device, embeddings.dtype)
        if shifts is None:
            shifts = self.sample_shifts(labels, embeddings.dtype)
        expected = {"scales": (p, b, self.dfs_num_scale), "shifts": (p, b, self.embedding_size)}
        for name, t in (("scales", scales), ("shifts", shifts)):
            if tuple(t.shape) != expected[name]:
                raise ValueError(f"DASProducer.produce: {name} must have shape {expected[name]}, got {tuple(t.shape)}")
        copies = [das_transform(source, dims, scales[i], shifts[i], self.mts_scale, self.normalize) for i in range(p)]
        return torch.cat(copies, dim=0)

    def forward(
        self, embeddings: Tensor, labels: Tensor, *, scales: Tensor | None = None, shifts: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        if self.training:
            self.update(embeddings, labels)
        copies = self.produce(embeddings, labels, scales=scales, shifts=shifts)
        out = torch.cat([embeddings, copies], dim=0)
        out_labels = labels.repeat(1 + self.num_produce)
        is_synthetic = torch.arange(out.shape[0], device=embeddings.device) >= embeddings.shape[0]
        return out, out_labels, is_synthetic


class DAS(SynthesisMethod):
    """DAS wrapper around a base loss (Liu et al., "Densely-Anchored Sampling", ECCV 2022).

    Expects the model output the base loss would get: L2-normalised when ``normalize=True`` (the paper's
    ``normalize`` architectures), raw for unnormalised losses (lifted, N-pair: ``normalize=False``, the code's
    ``--das_not_normalize``), so ``expects_normalized_embeddings == normalize``.

    ``L = base(E', y')`` with every row an anchor (code semantics; an anchor's own copies are positives), or
    ``base(E, y) + aux_loss_weight·base(E', y')`` with ``aux_loss=True``. ``exclude_own_copies=True`` (not in
    the code) removes each row's own copies from its pairs via ``ignore_mask``. ``num_produce=0`` gives exactly
    the base loss. Statistics are updated only in training mode. ``miner`` is run on the rows the loss sees
    (E' or E, with the own-copy mask under ``exclude_own_copies``) and passed to the base loss as ``mined=``.
    """

    build_arguments: ClassVar[tuple[str, ...]] = ("num_classes", "embedding_size")

    def __init__(
        self,
        loss: LossFn,
        miner: nn.Module | None = None,
        *,
        num_classes: int,
        embedding_size: int,
        num_produce: int = 3,
        dfs_num_scale: int = 4,
        scale_left: float = 0.5,
        scale_right: float = 2.0,
        bank_size: int = 10,
        mts_scale: float = 0.01,
        normalize: bool = True,
        detach: bool = False,
        aux_loss: bool = False,
        aux_loss_weight: float = 1.0,
        exclude_own_copies: bool = False,
        seed: int | None = 0,
    ) -> None:
        super().__init__(loss, miner)
        if aux_loss and isinstance(loss, LossWrapper):
            raise ValueError(
                f"DAS: aux_loss=True calls the inner loss twice per step, but the inner loss is a "
                f"{type(loss).__name__}, whose state (e.g. a memory queue) would advance twice; use aux_loss=False"
            )
        self.aux_loss = aux_loss
        self.aux_loss_weight = aux_loss_weight
        self.exclude_own_copies = exclude_own_copies
        self.expects_normalized_embeddings = normalize
        self.producer = DASProducer(
            num_classes, embedding_size, num_produce=num_produce, dfs_num_scale=dfs_num_scale,
            scale_left=scale_left, scale_right=scale_right, bank_size=bank_size, mts_scale=mts_scale,
            normalize=normalize, detach=detach, seed=seed,
        )

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        self._refuse_references(ref_embeddings)
        p = self.producer.num_produce
        if p == 0:
            if self.training:
                self.producer.update(embeddings, labels)
            loss = self.inner_loss(embeddings, labels)
            self.last_logs = {"loss": loss.detach()}
            return loss
        e_all, y_all, _ = self.producer(embeddings, labels)
        b = embeddings.shape[0]
        if self.exclude_own_copies:
            idx = torch.arange(e_all.shape[0], device=embeddings.device) % b
            ignore = idx.unsqueeze(1) == idx.unsqueeze(0)  # row i ≡ column j (mod B): the same source sample
            loss = self.inner_loss(e_all, y_all, ignore_mask=ignore)
        else:
            loss = self.inner_loss(e_all, y_all)
        if self.aux_loss:
            loss = self.inner_loss(embeddings, labels) + self.aux_loss_weight * loss
        with torch.no_grad():
            real = e_all[:b].detach().repeat(p, 1)
            shift = (e_all[b:].detach() - real).norm(dim=1).mean()
        self.last_logs = {"loss": loss.detach(), "das_mean_shift": shift}
        return loss
