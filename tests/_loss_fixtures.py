"""§9 fixture of methods.md shared by the loss/miner tests."""

from __future__ import annotations

import math

import torch

ANGLES_DEG = [0.0, 50.0, 20.0, 80.0, 140.0, 170.0]
LABELS = [0, 0, 1, 1, 2, 2]


def circle(angles_deg: list[float], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    rad = torch.tensor([math.radians(a) for a in angles_deg], dtype=dtype)
    return torch.stack([torch.cos(rad), torch.sin(rad)], dim=1)


def section9(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    return circle(ANGLES_DEG, dtype).requires_grad_(True), torch.tensor(LABELS)
