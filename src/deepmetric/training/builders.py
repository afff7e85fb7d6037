"""Turn an :class:`ExperimentConfig` into datasets, model, criterion, optimizer and scheduler.

Registries are explicit dictionaries owned by each layer (``LOSSES``, ``MINERS``, ``DATASETS``, ...); this
module only looks names up and reports unknown ones with the list of known names.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from deepmetric.training.config import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    OptimizerConfig,
    SchedulerConfig,
)


def _lookup(registry: dict[str, Any], name: str, field: str) -> Any:
    if name not in registry:
        raise ConfigError(f"unknown {field} '{name}' (known: {', '.join(sorted(registry))})")
    return registry[name]


def _construct(cls: Any, params: dict[str, Any], field: str, **auto: Any) -> Any:
    """Call ``cls(**params)``, filling ``auto`` arguments (num_classes, embedding_size) the constructor accepts."""
    kwargs = dict(params)
    accepted = inspect.signature(cls).parameters
    for key, value in auto.items():
        if key in accepted and key not in kwargs:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{field}: cannot build {cls.__name__} with {kwargs}: {exc}") from exc


# --------------------------------------------------------------------------------------------- data ---------
@dataclass
class DataBundle:
    """Datasets of one experiment. ``query``/``gallery`` are set for query→gallery benchmarks (In-Shop)."""

    train: Dataset
    validation: Dataset | None
    test: Dataset | None
    query: Dataset | None = None
    gallery: Dataset | None = None
    train_eval: Dataset | None = None  # the training split with the evaluation transform (IAA estimation)

    @property
    def num_train_classes(self) -> int:
        return len(set(dataset_labels(self.train).tolist()))


def dataset_labels(dataset: Dataset) -> Tensor:
    labels = getattr(dataset, "labels", None)
    if labels is None:
        raise ConfigError(f"dataset {type(dataset).__name__} must expose a `labels` array")
    return torch.as_tensor(labels, dtype=torch.int64)


def build_transform(name: str, backbone: str | None = None, dataset: str | None = None) -> Any:
    """A transform preset by name; the colour convention follows the backbone (BN-Inception: BGR 0–255)."""
    from deepmetric.data.transforms import get_transform

    try:
        return get_transform(name, backbone=backbone, dataset=dataset)
    except KeyError as exc:
        raise ConfigError(f"data transform: {exc.args[0]}") from exc


def build_data(cfg: DataConfig, seed: int = 0, backbone: str | None = None) -> DataBundle:
    train_tf = build_transform(cfg.train_transform, backbone, cfg.dataset)
    eval_tf = build_transform(cfg.eval_transform, backbone, cfg.dataset)
    if cfg.dataset == "kanji_glyphs":
        from deepmetric.data.kanji import KanjiGlyphs

        def make(split: str, tf: Any) -> Dataset:
            return KanjiGlyphs(split=split, transform=tf, validation_fraction=cfg.validation_fraction,
                               max_classes=cfg.max_classes)

        return DataBundle(
            train=make("train", train_tf),
            validation=make("val", eval_tf) if cfg.validation_fraction > 0 else None,
            test=make("test", eval_tf),
            train_eval=make("train", eval_tf),
        )
    from deepmetric.data import build_benchmark_data

    return build_benchmark_data(cfg, train_tf, eval_tf, seed=seed, bundle_type=DataBundle)


# --------------------------------------------------------------------------------------------- model --------
def build_model(cfg: ModelConfig, in_channels: int | None = None) -> nn.Module:
    from deepmetric.models import build_model as _build

    return _build(cfg, in_channels=in_channels)


# --------------------------------------------------------------------------------------------- criterion ----
class Criterion(nn.Module):
    """Everything between the embedding and the scalar loss: miner → loss, optionally through cross-batch
    memory or an embedding-space synthesis wrapper. All state (proxies, memory, banks) lives in submodules, so
    ``state_dict()`` is complete.

    ``forward(embeddings, labels, features=None, head=None, step=None, epoch=None) -> (loss, {term: value})``.
    """

    def __init__(self, loss: nn.Module, miner: nn.Module | None = None, memory: nn.Module | None = None,
                 synthesis: nn.Module | None = None) -> None:
        super().__init__()
        self.loss = loss
        self.miner = miner
        self.memory = memory
        self.synthesis = synthesis

    @property
    def needs_features(self) -> bool:
        return bool(getattr(self.synthesis, "needs_features", False))

    def loss_parameters_lr_multiplier(self) -> float:
        return float(getattr(self.loss, "lr_multiplier", 1.0))

    def forward(self, embeddings: Tensor, labels: Tensor, features: Tensor | None = None,
                head: nn.Module | None = None, step: int | None = None,
                epoch: int | None = None) -> tuple[Tensor, dict[str, float]]:
        if self.synthesis is not None:
            return self.synthesis(embeddings, labels, features=features, head=head, step=step, epoch=epoch)
        if self.memory is not None:
            loss = self.memory(embeddings, labels)
            logs = {"loss": float(loss.detach())}
            for key in ("last_batch_loss", "last_memory_loss"):
                value = getattr(self.memory, key, None)
                if value is not None:
                    logs[key.replace("last_", "")] = float(value)
            return loss, logs
        if self.miner is not None:
            mined = self.miner(embeddings, labels)
            loss = self.loss(embeddings, labels, mined=mined)
        else:
            loss = self.loss(embeddings, labels)
        return loss, {"loss": float(loss.detach())}


def build_criterion(cfg: ExperimentConfig, num_classes: int, batches_per_epoch: int | None = None) -> Criterion:
    from deepmetric.losses import LOSSES

    auto: dict[str, Any] = {"num_classes": num_classes, "embedding_size": cfg.model.embedding_size}
    if batches_per_epoch:
        # epoch-scheduled methods (IAA's λ schedule) see the run length in sampler epochs
        auto["total_epochs"] = cfg.train.epochs or max(1, -(-cfg.train.iterations // batches_per_epoch))
    loss = _construct(_lookup(LOSSES, cfg.loss.name, "loss.name"), cfg.loss.params, "loss.params", **auto)
    miner = None
    if cfg.loss.miner:
        from deepmetric.miners import MINERS

        miner = _construct(_lookup(MINERS, cfg.loss.miner, "loss.miner"), cfg.loss.miner_params,
                           "loss.miner_params")
    memory = synthesis = None
    if cfg.memory.enabled:
        from deepmetric.memory import CrossBatchMemory

        if miner is not None:
            raise ConfigError("loss.miner cannot be combined with memory.enabled (mine inside the loss instead)")
        memory = CrossBatchMemory(loss, embedding_size=cfg.model.embedding_size,
                                  memory_size=cfg.memory.memory_size,
                                  start_iteration=cfg.memory.start_iteration, weight=cfg.memory.weight)
    if cfg.synthesis.name:
        from deepmetric.synthesis import SYNTHESIS

        if memory is not None:
            raise ConfigError("synthesis.name cannot be combined with memory.enabled in one run")
        synthesis = _construct(_lookup(SYNTHESIS, cfg.synthesis.name, "synthesis.name"),
                               {**cfg.synthesis.params, "loss": loss}, "synthesis.params", miner=miner, **auto)
        if miner is not None and "miner" not in inspect.signature(type(synthesis)).parameters:
            raise ConfigError(f"synthesis '{cfg.synthesis.name}' does not take a miner; remove loss.miner")
        wants_normalized = bool(getattr(synthesis, "expects_normalized_embeddings", True))
        if wants_normalized != cfg.model.normalize:
            raise ConfigError(
                f"synthesis '{cfg.synthesis.name}' expects {'L2-normalised' if wants_normalized else 'raw'} "
                f"embeddings: set model.normalize={'true' if wants_normalized else 'false'}"
            )
    return Criterion(loss, miner=miner, memory=memory, synthesis=synthesis)


# --------------------------------------------------------------------------------------------- optimizer ----
def parameter_groups(model: nn.Module, criterion: nn.Module, cfg: OptimizerConfig) -> list[dict[str, Any]]:
    """Backbone, head and loss parameters as separate groups whose lr multipliers really apply.

    Each group stores ``lr_multiplier``; the group's ``lr`` is set from it here and the schedulers below scale
    the *base* lr of every group, so the ratio is kept for the whole run (the lr_mult keys of Deep_Metric / MS
    code were silently ignored by torch.optim).
    """
    backbone = [p for p in model.backbone.parameters()] if hasattr(model, "backbone") else []
    backbone_ids = {id(p) for p in backbone}
    head = [p for p in model.parameters() if id(p) not in backbone_ids]
    loss_params = list(criterion.parameters())
    loss_mult = cfg.loss_lr_multiplier
    if loss_mult is None:
        loss_mult = criterion.loss_parameters_lr_multiplier() if isinstance(criterion, Criterion) else 1.0
    groups = [
        {"name": "backbone", "params": backbone, "lr_multiplier": cfg.backbone_lr_multiplier},
        {"name": "head", "params": head, "lr_multiplier": cfg.head_lr_multiplier},
        {"name": "loss", "params": loss_params, "lr_multiplier": loss_mult},
    ]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["lr"] = cfg.lr * g["lr_multiplier"]
    return groups


def build_optimizer(cfg: OptimizerConfig, model: nn.Module, criterion: nn.Module) -> torch.optim.Optimizer:
    groups = parameter_groups(model, criterion, cfg)
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
