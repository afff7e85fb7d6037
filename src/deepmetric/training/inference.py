"""Embedding a dataset with a model (batched, no grad, eval mode)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm


@torch.no_grad()
def embed_dataset(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    progress: bool = False,
    description: str = "embed",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (embeddings float32 N×d on CPU, labels int64 N) in dataset order."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    chunks, labels = [], []
    for images, targets in tqdm(loader, desc=description, disable=not progress, leave=False):
        out = model(images.to(device, non_blocking=True))
        chunks.append(out.float().cpu())
        labels.append(torch.as_tensor(np.asarray(targets), dtype=torch.int64))
    model.train(was_training)
    return torch.cat(chunks), torch.cat(labels)
