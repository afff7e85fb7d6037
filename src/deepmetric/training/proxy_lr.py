"""A guard on the learning rate of class proxies, checked when the optimizer is built.

A proxy multiplier is an absolute rule stated as a relative one: Proxy-Anchor's ×100 assumes AdamW at lr 1e-4,
i.e. a proxy lr of 1e-2, with ~100 classes. An adaptive optimizer's first step moves every element that has a
gradient by about its lr, whatever the gradient's size, so one step moves a C×d proxy matrix P by

    ‖ΔP‖ ≈ k·lr·√(C·d),   k = 1 (Adam, AdamW), 1/√(1 − 0.99) = 10 (RMSprop with torch's default α)

while kaiming fan_out initialisation gives ‖P‖ = √(2d), so the ratio is k·lr·√(C/2): 0.07 for the paper's CUB
setting, 2.0 for Adam at lr 1e-3 ×100 with 783 classes (the step is twice the whole initialisation). Every
proxy-loss proxy gets a gradient at every step (each proxy is a negative of the batch), so this is the step,
not a bound nobody reaches. Plain SGD's step is lr·gradient and depends on the gradient's size: not checked.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from torch import nn

from deepmetric.losses.proxy import ProxyLoss

# A larger first step no longer refines the initial proxies: it replaces them.
PROXY_STEP_LIMIT = 1.0

# Size of an optimizer's first step per element, in units of its lr.
FIRST_STEP_PER_LR: dict[str, float] = {"adam": 1.0, "adamw": 1.0, "rmsprop": 1.0 / math.sqrt(1.0 - 0.99)}


class ProxyStepWarning(UserWarning):
    """One optimizer step moves a proxy matrix by more than :data:`PROXY_STEP_LIMIT` times its norm."""


def proxy_step_ratio(optimizer_name: str, lr: float, proxies: nn.Parameter) -> float | None:
    """‖ΔP‖ / ‖P‖ of the first step of ``optimizer_name`` at ``lr`` on ``proxies``; None when the step size
    depends on the gradient (SGD) or ‖P‖ = 0."""
    per_lr = FIRST_STEP_PER_LR.get(optimizer_name)
    norm = float(proxies.detach().norm())
    if per_lr is None or norm == 0.0:
        return None
    return per_lr * lr * math.sqrt(proxies.numel()) / norm


def check_proxy_steps(
    optimizer_name: str, groups: list[dict[str, Any]], criterion: nn.Module, limit: float = PROXY_STEP_LIMIT,
) -> dict[str, float]:
    """The first-step ratio of every proxy matrix of ``criterion`` in the optimizer ``groups`` (``{"params",
    "lr"}`` dicts), by loss class name; warns :class:`ProxyStepWarning` for each ratio above ``limit``."""
    owners = {id(m.proxies): type(m).__name__ for m in criterion.modules() if isinstance(m, ProxyLoss)}
    ratios: dict[str, float] = {}
    for group in groups:
        for param in group["params"]:
            if id(param) not in owners:
                continue
            ratio = proxy_step_ratio(optimizer_name, float(group["lr"]), param)
            if ratio is None:
                continue
            owner = owners[id(param)]
            ratios[owner] = ratio
            if ratio > limit:
                rows, dim = param.shape
                warnings.warn(ProxyStepWarning(
                    f"{owner}: one {optimizer_name} step at proxy lr {float(group['lr']):g} moves the {rows}×{dim} "
                    f"proxy matrix by ≈{ratio:.2f}× its norm (limit {limit:g}), replacing its initialisation. "
                    "Proxy-Anchor's ×100 proxy multiplier assumes AdamW at lr 1e-4 with ~100 classes; lower "
                    "optimizer.loss_lr_multiplier (or optimizer.lr) so that k·lr·√(C·d) stays below the proxies' norm"
                ), stacklevel=2)
    return ratios
