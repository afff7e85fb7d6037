"""m-per-class batch samplers: one class reproducing every variant of the seed repos (methods.md §1.4).

``class_choice``
  * ``uniform_no_replacement`` — MS repo ``RandomIdentitySampler``: each class's images are shuffled and cut into
    chunks of m; a batch picks B/m distinct classes uniformly among classes that still have chunks; the pools are
    re-prepared when fewer than B/m classes remain.
  * ``proportional_to_remaining`` — XBM repo: as above, but classes are picked with probability proportional to
    their number of remaining chunks (still distinct within a batch).
  * ``with_replacement`` — DAS / Revisiting ``class_random``: B/m independent class draws with replacement
    (a class can appear twice in a batch).
  * ``permutation`` — MDR / IAA ``MImagesPerClassSampler``: a random permutation of all classes, take
    min(m, n_c) images of each until ≥ B are collected, truncate to B (classes may contribute < m images).

``image_choice``
  * ``no_replacement_pad`` — sample without replacement, padding with replacement only when a class has < m images.
  * ``with_replacement`` — always sample with replacement (DAS).

Determinism and resumption: the batch stream of "epoch" e is a pure function of (seed, e), so the sampler's state
is just (epoch, position) — saved in checkpoints and restored by skipping. Under DDP every rank generates the same
global batch and keeps its own class-complete share (B/m classes are split across ranks).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import get_args

import numpy as np
from torch.utils.data import Sampler

from deepmetric.config_errors import ConfigError
from deepmetric.data.config import ClassChoice, DataConfig, ImageChoice

CLASS_CHOICES: tuple[str, ...] = get_args(ClassChoice)
IMAGE_CHOICES: tuple[str, ...] = get_args(ImageChoice)


class MPerClassBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices: B/m classes × m images each (where the variant promises it).

    Args:
        labels: one integer label per dataset item.
        batch_size: global batch size B (must be a multiple of m except for ``permutation``).
        m: images per class.
        length: batches per epoch (default ⌊N/B⌋).
        rank, world_size: distributed share; each rank yields ``B / world_size`` indices forming whole classes.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        batch_size: int,
        m: int,
        class_choice: str = "uniform_no_replacement",
        image_choice: str = "no_replacement_pad",
        length: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError("labels must be a non-empty 1-D sequence of integers")
        if class_choice not in CLASS_CHOICES:
            raise ValueError(f"class_choice must be one of {CLASS_CHOICES}, got {class_choice!r}")
        if image_choice not in IMAGE_CHOICES:
            raise ValueError(f"image_choice must be one of {IMAGE_CHOICES}, got {image_choice!r}")
        if m < 1 or batch_size < m:
            raise ValueError(f"need 1 <= m <= batch_size, got m={m}, batch_size={batch_size}")
        if class_choice != "permutation" and batch_size % m:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of m ({m}) for {class_choice}")
        self.classes_per_batch = batch_size // m
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        if world_size > 1 and (class_choice == "permutation" or self.classes_per_batch % world_size):
            raise ValueError(
                f"under DDP the {self.classes_per_batch} classes per batch must split evenly over "
                f"{world_size} ranks (and class_choice 'permutation' cannot be split class-completely)"
            )
        classes, inverse = np.unique(labels, return_inverse=True)
        if class_choice != "with_replacement" and class_choice != "permutation" and len(classes) < self.classes_per_batch:
            raise ValueError(
                f"the dataset has {len(classes)} classes but a batch needs {self.classes_per_batch} distinct ones "
                f"(batch_size={batch_size}, m={m})"
            )
        if len(classes) < 2:
            raise ValueError(
                f"the training labels hold a single class ({int(classes[0])}): metric learning needs at least two "
                "classes (no pair would ever be a negative)"
            )
        order = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse)
        if class_choice != "permutation" and m > int(counts.max()):
            raise ValueError(
                f"m={m} images per class, but the largest class has {int(counts.max())} images: every class would "
                "be padded with repeated images; lower m (data.m_per_class)"
            )
        self._members = np.split(order, np.cumsum(counts)[:-1])
        self.labels = labels
        self.batch_size = batch_size
        self.m = m
        self.class_choice = class_choice
        self.image_choice = image_choice
        self.length = length if length is not None else max(1, len(labels) // batch_size)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0  # batches already yielded in the current epoch

    def __len__(self) -> int:
        return self.length

    # -- state for exact resumption -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    # -- sampling ------------------------------------------------------------------------------------------
    def _take(self, rng: np.random.Generator, members: np.ndarray, k: int) -> np.ndarray:
        if self.image_choice == "with_replacement":
            return rng.choice(members, size=k, replace=True)
        if len(members) >= k:
            return rng.choice(members, size=k, replace=False)
        extra = rng.choice(members, size=k - len(members), replace=True)
        return np.concatenate([rng.permutation(members), extra])

    def _prepare_chunks(self, rng: np.random.Generator) -> list[list[np.ndarray]]:
        chunks = []
        for members in self._members:
            if self.image_choice == "with_replacement":
                n_chunks = max(1, len(members) // self.m)
                chunks.append([rng.choice(members, self.m, replace=True) for _ in range(n_chunks)])
                continue
            pool = rng.permutation(members)
            if len(pool) < self.m:
                pool = np.concatenate([pool, rng.choice(members, self.m - len(pool), replace=True)])
            elif self.class_choice == "proportional_to_remaining" and len(pool) % self.m:
                # the XBM variant pads every class up to a multiple of m
                pool = np.concatenate([pool, rng.choice(members, self.m - len(pool) % self.m, replace=True)])
            n_chunks = len(pool) // self.m
            chunks.append([pool[i * self.m:(i + 1) * self.m] for i in range(n_chunks)])
        return chunks

    def _global_batches(self, epoch: int) -> Iterator[np.ndarray]:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        n_classes = len(self._members)
        if self.class_choice == "with_replacement":
            for _ in range(self.length):
                picked = rng.integers(0, n_classes, size=self.classes_per_batch)
                yield np.concatenate([self._take(rng, self._members[c], self.m) for c in picked])
            return
        if self.class_choice == "permutation":
            for _ in range(self.length):
                out: list[np.ndarray] = []
                total = 0
                for c in rng.permutation(n_classes):
                    members = self._members[c]
                    take = rng.choice(members, size=min(self.m, len(members)), replace=False)
                    out.append(take)
                    total += len(take)
                    if total >= self.batch_size:
                        break
                yield np.concatenate(out)[: self.batch_size]
            return
        chunks = self._prepare_chunks(rng)
        for _ in range(self.length):
            remaining = np.array([len(c) for c in chunks])
            available = np.flatnonzero(remaining)
            if len(available) < self.classes_per_batch:
                chunks = self._prepare_chunks(rng)
                remaining = np.array([len(c) for c in chunks])
                available = np.flatnonzero(remaining)
            if self.class_choice == "proportional_to_remaining":
                p = remaining[available] / remaining[available].sum()
                picked = rng.choice(available, size=self.classes_per_batch, replace=False, p=p)
            else:
                picked = rng.choice(available, size=self.classes_per_batch, replace=False)
            yield np.concatenate([chunks[c].pop() for c in picked])

    def __iter__(self) -> Iterator[list[int]]:
        share = self.batch_size // self.world_size
        skip = self.position
        for i, batch in enumerate(self._global_batches(self.epoch)):
            if i < skip:
                continue
            self.position = i + 1
            if self.world_size > 1:
                batch = batch[self.rank * share:(self.rank + 1) * share]
            yield batch.tolist()
        self.epoch += 1
        self.position = 0


class RandomBatchSampler(Sampler[list[int]]):
    """Plain shuffling in batches (Proxy-Anchor's default), with the same resumable (epoch, position) state.

    Each epoch is a permutation drawn from (seed, epoch); ``drop_last`` semantics. Under DDP every rank draws
    the same permutation and keeps its contiguous share of each global batch.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if num_items < batch_size:
            raise ValueError(f"dataset has {num_items} items, fewer than batch_size={batch_size}")
        if batch_size % world_size:
            raise ValueError(f"batch_size ({batch_size}) must be divisible by world_size ({world_size})")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return self.num_items // self.batch_size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch]))
        order = rng.permutation(self.num_items)
        share = self.batch_size // self.world_size
        for i in range(self.position, len(self)):
            batch = order[i * self.batch_size:(i + 1) * self.batch_size]
            self.position = i + 1
            if self.world_size > 1:
                batch = batch[self.rank * share:(self.rank + 1) * share]
            yield batch.tolist()
        self.epoch += 1
        self.position = 0


def build_sampler(
    cfg: DataConfig, labels: Sequence[int] | np.ndarray, seed: int = 0, rank: int = 0, world_size: int = 1
) -> MPerClassBatchSampler | RandomBatchSampler:
    """The batch sampler ``cfg.sampler`` names, over the training ``labels``; this rank's share of each batch.

    A sampler that cannot be built from these labels (too few classes or images for the batch) raises
    :class:`ConfigError` naming the data fields.
    """
    try:
        if cfg.sampler == "random":
            return RandomBatchSampler(len(labels), batch_size=cfg.batch_size, seed=seed, rank=rank,
                                      world_size=world_size)
        return MPerClassBatchSampler(
            labels, batch_size=cfg.batch_size, m=cfg.m_per_class, class_choice=cfg.class_choice,
            image_choice=cfg.image_choice, length=cfg.batches_per_epoch, seed=seed, rank=rank,
            world_size=world_size,
        )
    except ValueError as exc:
        raise ConfigError(f"data (sampler {cfg.sampler!r}): {exc}") from exc
