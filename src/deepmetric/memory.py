"""Cross-batch memory (XBM): a FIFO ring buffer of past embeddings used as extra reference rows of any loss.

Wang, Zhang, Huang, Scott, "Cross-Batch Memory for Embedding Learning", CVPR 2020 (methods.md §4.4).

``CrossBatchMemory(loss, miner=None, *, embedding_size, memory_size, ...)`` is itself a loss with the library
signature. Semantics of one training step (``t`` is the 1-based number of training-mode calls, kept in a buffer)::

    active = t > start_iteration                      # memory used from step start_iteration + 1 on
    if active or fill_during_warmup:                  # XBM code: enqueue only when active (default)
        enqueue(embeddings.detach(), labels)          # BEFORE the loss, as in XBM and PML
    L_batch = loss(embeddings, labels, ref_embeddings, ref_labels, ignore_mask=ignore_mask)
                                                      # no references: batch vs itself, diagonal ignored by index
    if active:
        L_memory = loss(embeddings, labels, M_emb, M_lab, ignore_mask=own_slot)
        L = L_batch + weight · L_memory               # (only weight · L_memory with include_batch_loss=False)
    else:
        L = L_batch

``last_logs`` holds the detached ``"loss"``, ``"batch_loss"`` (absent when skipped) and ``"memory_loss"`` (absent
while the memory is not used).

Composition: the memory is the inner wrapper, and it enqueues its anchors — the ``embeddings`` it is called
with. An outer synthesis wrapper decides what those rows are:

* ``DAS(CrossBatchMemory(loss))``: every row of DAS's E' = [E; Ẽ¹; …; Ẽᴾ] is an anchor, so the memory holds
  DAS-produced rows (real and synthetic; P+1 rows per sample and step) — XBM over DAS-produced embeddings.
  An ``ignore_mask`` given without references (DAS's ``exclude_own_copies``) removes the same pairs in the memory
  term against the rows just enqueued, so a row's own copies stay excluded there too.
* ``IAA(CrossBatchMemory(loss))``: the anchors are IAA's normalised real rows, so the memory holds real rows only;
  IAA's copies are the batch term's extra references (with its own-copy ``ignore_mask``), and the memory term
  ignores each anchor's own slot.
* ``MDR(CrossBatchMemory(loss))``: the memory holds MDR's batch-distance-scaled rows.

A synthesis wrapper produces its own references, so it refuses ``ref_embeddings``; the memory therefore never
goes outside one.

Choices and how they compare with the two reference implementations:

* **When enqueueing starts.** By default only once the memory is in use (t > ``start_iteration``), exactly as the
  authors' code (``research-xbm``): the warm-up exists because early embeddings drift fast, and enqueueing only
  afterwards guarantees that every row the loss ever sees was produced in the slow-drift regime. Consequently the
  memory holds only the current batch at step ``start_iteration + 1`` and grows from there. PML's
  ``CrossBatchMemory`` has no warm-up and always enqueues; that is ``start_iteration=0`` here (both conventions
  coincide). ``fill_during_warmup=True`` enqueues during the warm-up too, so the memory is (partly) full at the
  first step that uses it — the "initial fill" PML users ask for (PML issue #478).
* **Self-pairs are removed by slot id, never by similarity.** Every enqueued row gets a fresh, monotonically
  increasing int64 id stored next to it; the memory loss ignores, for anchor i, exactly the slot whose id is the id
  just given to row i. The XBM code instead drops positives with S ≥ 1 − 1e-5, which also throws away exact
  duplicates of *other* rows; here those stay valid positives. Rows not enqueued (partial enqueue) have no slot,
  so nothing of theirs is ignored.
* **Pairs inside the current batch count twice** (once in L_batch, once in L_memory, because the batch is enqueued
  first), as in the authors' code; ``include_batch_loss=False`` gives PML's single "batch vs memory" term.
* **Miner.** ``CrossBatchMemory(loss, miner)`` mines each term on exactly the rows that term compares: the batch
  term on (batch vs batch, or vs the given references), the memory term on (batch vs memory, own slot ignored),
  and passes the tuples to the loss as ``mined=`` — PML's ``CrossBatchMemory(loss, miner=...)`` mines on
  (batch vs memory) for its single term likewise.
* **Ring buffer.** A true modular ring (PML-style): rows go to slots ``ptr, ptr+1, … (mod memory_size)``. The XBM
  code instead writes an overflowing batch into the *last* B slots and resets the pointer, and decides "full" by
  testing whether the last stored label is non-zero (wrong for class 0); here the fill count is a buffer.
  ``legacy_xbm=True`` reproduces both quirks of ``research-xbm``'s ``modeling/xbm.py`` for reproducing its
  numbers: a batch that does not fit behind the pointer (``ptr + B > M``, also when the queue is exactly full)
  overwrites the last B slots — the newest rows when M is a multiple of B — and the pointer restarts at 0; the
  valid rows are all M when the label in the last slot is non-zero and the first ``ptr`` rows otherwise (so after
  a wrap whose last row has label 0 the memory shrinks to the rows written since). The valid count is still kept
  in the ``num_filled`` buffer, so ``state_dict()`` resumes the legacy queue exactly too.
* **Complete state.** Memory rows, labels, slot ids, write pointer, fill count, the next id and the iteration
  counter are registered buffers, so ``state_dict()`` resumes a run exactly, also in the middle of a wrap
  (PML keeps its pointer and "filled" flag as plain attributes).
* **Partial enqueue.** ``enqueue_count=k`` or ``enqueue_fraction=f`` enqueues the first k (⌊f·B⌋) rows of each
  batch; ``forward(..., enqueue_mask=...)`` selects rows explicitly for one call. Every row is still an anchor
  (unlike PML's ``enqueue_mask``, whose enqueued rows are *not* anchors, MoCo-style).
* **Evaluation mode** (``module.eval()``) reads the memory without changing any state (no enqueue, no step).

Memory is stored as given (detached): losses normalise themselves. The memory loss costs O(B·M) time and memory
(one B×M similarity matrix plus masks); no B×M×M tensor is ever formed. Under DDP call the module on the gathered
global batch (:func:`deepmetric.training.distributed.all_gather_embeddings`) so every rank keeps the same memory.

The memory rows passed to the loss are a view of the buffer, which the next call overwrites in place: call
``backward()`` for a step before the next ``forward`` (autograd raises an error otherwise, it never silently
uses overwritten rows).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from deepmetric.loss_hooks import LossWrapper

_HALF = (torch.float16, torch.bfloat16)


class CrossBatchMemory(LossWrapper):
    """Wrap ``loss`` with a cross-batch memory of ``memory_size`` rows of width ``embedding_size``.

    Args:
        loss: any module with the library signature ``loss(emb, labels, ref_emb, ref_labels, *, ignore_mask)``.
        miner: optional miner run on the rows of each term (batch, memory); its tuples go to ``loss`` as ``mined=``.
        embedding_size: width d of the embeddings (checked on every call).
        memory_size: number of rows M kept (XBM's ``XBM.SIZE``; 55,000 for SOP).
        start_iteration: T₀; the memory is used from training step T₀ + 1 on (1-based steps).
        weight: w in L = L_batch + w·L_memory.
        enqueue_fraction: enqueue the first ⌊f·B⌋ rows of each batch (0 < f ≤ 1).
        enqueue_count: enqueue the first min(k, B) rows of each batch (exclusive with ``enqueue_fraction``).
        fill_during_warmup: also enqueue during the first T₀ steps (default False, the authors' code).
        include_batch_loss: add L_batch (authors' code, default); False gives PML's memory-only loss.
        dtype: storage dtype of the memory rows.
        legacy_xbm: reproduce the research-xbm queue (overflow into the last B slots, "full" ⇔ last label ≠ 0)
            instead of the true ring (default False; see the module docstring).
    """

    build_arguments: ClassVar[tuple[str, ...]] = ("embedding_size",)

    def __init__(
        self,
        loss: nn.Module,
        miner: nn.Module | None = None,
        *,
        embedding_size: int,
        memory_size: int,
        start_iteration: int = 0,
        weight: float = 1.0,
        enqueue_fraction: float = 1.0,
        enqueue_count: int | None = None,
        fill_during_warmup: bool = False,
        include_batch_loss: bool = True,
        dtype: torch.dtype = torch.float32,
        legacy_xbm: bool = False,
    ) -> None:
        super().__init__(loss, miner)
        if embedding_size < 1 or memory_size < 1:
            raise ValueError(
                f"CrossBatchMemory: embedding_size and memory_size must be >= 1, got {embedding_size}, {memory_size}"
            )
        if start_iteration < 0:
            raise ValueError(f"CrossBatchMemory: start_iteration must be >= 0, got {start_iteration}")
        if not 0.0 < enqueue_fraction <= 1.0:
            raise ValueError(f"CrossBatchMemory: enqueue_fraction must be in (0, 1], got {enqueue_fraction}")
        if enqueue_count is not None:
            if enqueue_fraction != 1.0:
                raise ValueError("CrossBatchMemory: give enqueue_fraction or enqueue_count, not both")
            if enqueue_count < 0:
                raise ValueError(f"CrossBatchMemory: enqueue_count must be >= 0, got {enqueue_count}")
        self.embedding_size = int(embedding_size)
        self.memory_size = int(memory_size)
        self.start_iteration = int(start_iteration)
        self.weight = float(weight)
        self.enqueue_fraction = float(enqueue_fraction)
        self.enqueue_count = enqueue_count
        self.fill_during_warmup = fill_during_warmup
        self.include_batch_loss = include_batch_loss
        self.legacy_xbm = bool(legacy_xbm)
        self.register_buffer("embedding_memory", torch.zeros(memory_size, embedding_size, dtype=dtype))
        self.register_buffer("label_memory", torch.zeros(memory_size, dtype=torch.long))
        # −1 marks an empty slot; real ids start at 0 and only grow, so an id is never reused.
        self.register_buffer("slot_ids", torch.full((memory_size,), -1, dtype=torch.long))
        self.register_buffer("write_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("next_id", torch.zeros((), dtype=torch.long))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    # -- read-only views -------------------------------------------------------------------------------------
    @property
    def is_full(self) -> bool:
        return int(self.num_filled) == self.memory_size

    @property
    def memory_embeddings(self) -> Tensor:
        """The valid rows (slots 0..n−1 until the first wrap, all M afterwards)."""
        return self.embedding_memory[: int(self.num_filled)]

    @property
    def memory_labels(self) -> Tensor:
        return self.label_memory[: int(self.num_filled)]

    @property
    def is_active(self) -> bool:
        """Whether the memory loss is used at the current step (after the last training call)."""
        return int(self.iteration) > self.start_iteration

    def reset(self) -> None:
        """Empty the memory and restart the step counter."""
        self.embedding_memory.zero_()
        self.label_memory.zero_()
        self.slot_ids.fill_(-1)
        for name in ("write_ptr", "num_filled", "next_id", "iteration"):
            getattr(self, name).zero_()
        self.last_logs = {}

    # -- queue ----------------------------------------------------------------------------------------------
    def _enqueue_selection(self, batch: int, enqueue_mask: Tensor | None, device: torch.device) -> Tensor:
        """Indices of the batch rows to enqueue."""
        if enqueue_mask is not None:
            if enqueue_mask.dtype != torch.bool or enqueue_mask.shape != (batch,):
                raise ValueError(
                    f"CrossBatchMemory: enqueue_mask must be a bool tensor of shape ({batch},), "
                    f"got {enqueue_mask.dtype} {tuple(enqueue_mask.shape)}"
                )
            return torch.nonzero(enqueue_mask.to(device), as_tuple=True)[0]
        if self.enqueue_count is not None:
            k = min(self.enqueue_count, batch)
        else:
            k = int(self.enqueue_fraction * batch)
        return torch.arange(k, device=device)

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Write rows into the ring (FIFO); returns the ids given to them (one per input row, in order).

        A batch larger than the memory keeps only its last ``memory_size`` rows (the others would be overwritten
        by the same write); their ids are still consumed, so they match no slot.
        """
        n = embeddings.shape[0]
        ids = self.next_id + torch.arange(n, device=self.slot_ids.device)
        self.next_id += n
        keep = min(n, self.memory_size)
        if keep == 0:
            return ids
        emb, lab, kept_ids = embeddings[n - keep:], labels[n - keep:], ids[n - keep:]
        offsets = torch.arange(keep, device=self.slot_ids.device)
        overflow = self.legacy_xbm and int(self.write_ptr) + keep > self.memory_size
        if overflow:
            slots = self.memory_size - keep + offsets
        else:
            slots = (self.write_ptr + offsets) % self.memory_size
        self.embedding_memory.index_copy_(0, slots, emb.detach().to(self.embedding_memory.dtype))
        self.label_memory.index_copy_(0, slots, lab.to(self.label_memory.dtype))
        self.slot_ids.index_copy_(0, slots, kept_ids)
        if not self.legacy_xbm:
            self.write_ptr.copy_((self.write_ptr + keep) % self.memory_size)
            self.num_filled.clamp_(max=self.memory_size - keep).add_(keep)
            return ids
        # research-xbm: the pointer may equal M (exactly full) and only resets on overflow; the valid view is
        # decided afresh from the label in the last slot at every read, which only an enqueue can change.
        self.write_ptr.copy_(torch.zeros_like(self.write_ptr) if overflow else self.write_ptr + keep)
        last_label_set = bool(self.label_memory[-1] != 0)
        self.num_filled.copy_(torch.full_like(self.num_filled, self.memory_size) if last_label_set else self.write_ptr)
        return ids

    # -- loss -----------------------------------------------------------------------------------------------
    def _check_inputs(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"CrossBatchMemory: embeddings must have shape (batch, {self.embedding_size}) (embedding_size), "
                f"got {tuple(embeddings.shape)}"
            )
        if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"CrossBatchMemory: labels must be 1-D with one label per row, got {tuple(labels.shape)} "
                f"for embeddings {tuple(embeddings.shape)}"
            )
        if embeddings.device != self.embedding_memory.device:
            raise ValueError(
                f"CrossBatchMemory: embeddings are on {embeddings.device} but the memory is on "
                f"{self.embedding_memory.device}; move the module with .to(device)"
            )
        return labels.to(device=embeddings.device, dtype=torch.long)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
        *,
        ignore_mask: Tensor | None = None,
        enqueue_mask: Tensor | None = None,
    ) -> Tensor:
        labels = self._check_inputs(embeddings, labels)
        batch = embeddings.shape[0]
        row_ids = None
        if self.training:
            self.iteration += 1
            active = self.is_active
            if active or self.fill_during_warmup:
                rows = self._enqueue_selection(batch, enqueue_mask, embeddings.device)
                # −1 = "no slot": never equal to a slot id, and empty slots are outside the valid view anyway
                row_ids = torch.full((batch,), -1, dtype=torch.long, device=embeddings.device)
                row_ids[rows] = self.enqueue(embeddings.index_select(0, rows), labels[rows])
        else:
            active = self.is_active

        use_memory = active and int(self.num_filled) > 0
        logs: dict[str, Tensor | float] = {}
        self.last_logs = logs
        batch_loss = None
        if self.include_batch_loss or not use_memory:
            batch_loss = self.inner_loss(embeddings, labels, ref_embeddings, ref_labels, ignore_mask=ignore_mask)
            logs["batch_loss"] = batch_loss.detach()
        if not use_memory:
            logs["loss"] = batch_loss.detach()
            return batch_loss

        mem_emb, mem_lab = self.memory_embeddings, self.memory_labels
        if mem_emb.dtype != embeddings.dtype and embeddings.dtype not in _HALF:
            mem_emb = mem_emb.to(embeddings.dtype)  # half inputs: losses promote to fp32 themselves
        ignore = None
        if row_ids is not None:
            own_slot = (row_ids.unsqueeze(1) == self.slot_ids[: mem_emb.shape[0]].unsqueeze(0)) & (
                row_ids.unsqueeze(1) >= 0
            )
            ignore = own_slot
            if ignore_mask is not None and ref_embeddings is None:
                ignore = own_slot | self._carried_ignore(ignore_mask, own_slot)
        memory_loss = self.inner_loss(embeddings, labels, mem_emb, mem_lab, ignore_mask=ignore)
        logs["memory_loss"] = memory_loss.detach()
        weighted = self.weight * memory_loss
        total = weighted if batch_loss is None else batch_loss + weighted
        logs["loss"] = total.detach()
        return total

    @staticmethod
    def _carried_ignore(ignore_mask: Tensor, own_slot: Tensor) -> Tensor:
        """B×M: pair (i, slot of batch row j) for every pair (i, j) the caller's B×B ``ignore_mask`` removes."""
        batch = own_slot.shape[0]
        if ignore_mask.shape != (batch, batch):
            raise ValueError(
                f"CrossBatchMemory: without ref_embeddings, ignore_mask must be ({batch}, {batch}), "
                f"got {tuple(ignore_mask.shape)}"
            )
        rows, slots = torch.nonzero(own_slot, as_tuple=True)  # batch row j sits in memory slot s
        carried = torch.zeros_like(own_slot)
        carried[:, slots] = ignore_mask[:, rows].to(device=own_slot.device, dtype=torch.bool)
        return carried

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, memory_size={self.memory_size}, "
            f"start_iteration={self.start_iteration}, weight={self.weight}, "
            f"enqueue={'count=' + str(self.enqueue_count) if self.enqueue_count is not None else self.enqueue_fraction}, "
            f"fill_during_warmup={self.fill_during_warmup}, include_batch_loss={self.include_batch_loss}, "
            f"legacy_xbm={self.legacy_xbm}"
        )


#: memory wrappers by config name (``memory.name``)
MEMORIES: dict[str, type[CrossBatchMemory]] = {"xbm": CrossBatchMemory}
