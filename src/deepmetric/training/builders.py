"""Turn an :class:`ExperimentConfig` into datasets, model, criterion, optimizer and scheduler.

Registries are explicit dictionaries owned by each layer (``LOSSES``, ``MINERS``, ``DATASETS``, ...); this
module only looks names up and reports unknown ones with the list of known names.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# the data and model sections are built by their own layers; re-exported for callers of the old import path
from deepmetric.data.bundle import DataBundle, build_data, build_transform, dataset_labels  # noqa: F401
from deepmetric.models.factory import build_model  # noqa: F401
from deepmetric.models.timm_backbone import layer_decay_groups
from deepmetric.training.config import ConfigError, OptimizerConfig, SchedulerConfig
from deepmetric.training.criterion import Criterion
from deepmetric.training.proxy_lr import check_proxy_steps


# --------------------------------------------------------------------------------------------- optimizer ----
def parameter_groups(model: nn.Module, criterion: Criterion, cfg: OptimizerConfig) -> list[dict[str, Any]]:
    """Backbone, head and loss parameters as separate groups whose lr multipliers really apply.

    Each group stores ``lr_multiplier``; the group's ``lr`` is set from it here and the schedulers below scale
    the *base* lr of every group, so the ratio is kept for the whole run (the lr_mult keys of Deep_Metric / MS
    code were silently ignored by torch.optim). Loss-side groups come from
    :meth:`~deepmetric.training.criterion.Criterion.parameter_groups` (one per multiplier: proxies, MDR levels).
    """
    backbone = [p for p in model.backbone.parameters()] if hasattr(model, "backbone") else []
    backbone_ids = {id(p) for p in backbone}
    head = [p for p in model.parameters() if id(p) not in backbone_ids]
    backbone_groups = [{"name": "backbone", "params": backbone, "lr_multiplier": cfg.backbone_lr_multiplier}]
    if cfg.layer_decay != 1.0 and backbone:  # one group per ViT block, lr decaying from the last block down
        backbone_groups = layer_decay_groups(model.backbone, cfg.backbone_lr_multiplier, cfg.layer_decay)
    loss_groups = criterion.parameter_groups(cfg.loss_lr_multiplier)
    if cfg.loss_weight_decay is not None:  # e.g. margin β without weight decay (DAS, Reality Check)
        for g in loss_groups:
            g["weight_decay"] = cfg.loss_weight_decay
    groups = [
        *backbone_groups,
        {"name": "head", "params": head, "lr_multiplier": cfg.head_lr_multiplier},
        *loss_groups,
    ]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["lr"] = cfg.lr * g["lr_multiplier"]
    return groups


def build_optimizer(cfg: OptimizerConfig, model: nn.Module, criterion: Criterion) -> torch.optim.Optimizer:
    groups = parameter_groups(model, criterion, cfg)
    check_proxy_steps(cfg.name, groups, criterion)  # warns when one step would replace the proxies' initialisation
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    raise ConfigError(f"unknown optimizer.name '{cfg.name}' (known: adam, adamw, sgd, rmsprop)")


def lr_factor(cfg: SchedulerConfig, step: int) -> float:
    """Multiplicative lr factor after ``step`` completed iterations (per-iteration schedules)."""
    if cfg.name in ("none", "plateau"):
        return 1.0
    if cfg.name == "step":
        if cfg.step_size <= 0:
            raise ConfigError("scheduler.step_size must be > 0 for scheduler.name=step")
        return cfg.gamma ** (step // cfg.step_size)
    if cfg.name in ("multistep", "warmup_multistep"):
        factor = cfg.gamma ** sum(step >= m for m in cfg.milestones)
        if cfg.name == "warmup_multistep" and step < cfg.warmup_iterations:
            alpha = step / max(1, cfg.warmup_iterations)
            factor *= cfg.warmup_factor * (1 - alpha) + alpha
        return factor
    raise ConfigError(
        f"unknown scheduler.name '{cfg.name}' (known: none, step, multistep, warmup_multistep, plateau)"
    )


def build_scheduler(cfg: SchedulerConfig, optimizer: torch.optim.Optimizer) -> Any:
    if cfg.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.gamma,
                                                          patience=cfg.plateau_patience, threshold=1e-3)
    lr_factor(cfg, 0)  # validate the name early
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step))
