"""Typed experiment configuration, loaded from YAML with ``yaml.safe_load``.

Every training "trick" is an explicit field, so the resolved config written next to a run says exactly what
ran. Unknown keys are errors that name the file and the dotted key; ``--set a.b=value`` overrides are parsed as
YAML scalars and checked the same way.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names where."""


@dataclass
class DataConfig:
    dataset: str = "kanji_glyphs"  # kanji_glyphs | cub200 | cars196 | sop | inshop | folder | csv
    root: str | None = None  # dataset root (not needed for the embedded kanji_glyphs)
    train_transform: str = "kanji_train"  # transform preset name (deepmetric.data.transforms)
    eval_transform: str = "kanji_eval"
    batch_size: int = 64
    m_per_class: int = 4
    # m-per-class sampler variant (methods.md §1.4): class_choice / image_choice
    class_choice: str = "uniform_no_replacement"  # | proportional_to_remaining | with_replacement
    image_choice: str = "no_replacement_pad"  # | with_replacement
    sampler: str = "m_per_class"  # | random (plain shuffling, Proxy-Anchor)
    num_workers: int = 0
    eval_batch_size: int = 256
    validation_fraction: float = 0.2  # class-disjoint slice of the training classes used for model selection
    max_classes: int | None = None  # keep only the first N classes of each split (quick runs)
    # sampler "epoch" length in batches (default ⌊N/B⌋); epoch-scheduled methods (IAA start/re-estimation,
    # λ schedule) count these epochs
    batches_per_epoch: int | None = None


@dataclass
class ModelConfig:
    backbone: str = "kanji_cnn"  # kanji_cnn | bninception | googlenet | resnet50 | mobilenet_v2 | timm:<name>
    pretrained: str | None = None  # local weight file; "imagenet" fetches through torchvision/timm when online
    embedding_size: int = 128
    pooling: str = "avg"  # avg | max | avg+max
    bn_policy: str = "train"  # train | freeze_stats | freeze_stats_and_affine
    head_init: str = "default"  # default | kaiming_fan_out
    normalize: bool = True  # L2-normalise the embedding
    last_stride_one: bool = False  # ResNet layer4 stride 1 (XBM)
    width: int = 32  # kanji_cnn base channel width


@dataclass
class LossConfig:
    name: str = "multi_similarity"
    params: dict[str, Any] = field(default_factory=dict)  # constructor keyword arguments
    miner: str | None = None
    miner_params: dict[str, Any] = field(default_factory=dict)


@dataclass
class MemoryConfig:
    enabled: bool = False
    memory_size: int = 8192
    start_iteration: int = 0
    weight: float = 1.0


@dataclass
class SynthesisConfig:
    name: str | None = None  # None | iaa | das | mdr | sgar
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimizerConfig:
    name: str = "adam"  # adam | adamw | sgd | rmsprop
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd / rmsprop
    backbone_lr_multiplier: float = 1.0
    head_lr_multiplier: float = 1.0
    # loss parameters (proxies, margins) use the loss's own recommended multiplier unless set here
    loss_lr_multiplier: float | None = None
    grad_clip_value: float | None = None
    grad_clip_norm: float | None = None


@dataclass
class SchedulerConfig:
    name: str = "none"  # none | multistep | step | warmup_multistep | plateau
    milestones: list[int] = field(default_factory=list)  # in iterations
    step_size: int = 0
    gamma: float = 0.1
    warmup_iterations: int = 0
    warmup_factor: float = 0.01
    plateau_patience: int = 4
    # unit of milestones / step_size / warmup_iterations: "iterations" or "epochs" (sampler epochs)
    unit: str = "iterations"


@dataclass
class TrainConfig:
    iterations: int = 600
    epochs: int | None = None  # if set, train for this many sampler epochs instead of `iterations`
    eval_every: int = 150  # validate (model selection) every N iterations; 0 = only at the end
    frozen_backbone_iterations: int = 0  # warm-up: train only head (+ loss params) first
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | auto
    amp: str = "none"  # none | fp16 | bf16 (GPU only)
    deterministic: bool = False
    threads: int | None = None  # torch CPU threads
    protocol: str = "validation"  # validation (select on the class-disjoint val split) | legacy (select on test)
    early_stopping_patience: int | None = None
    checkpoint_every: int = 0  # 0 = final only
    progress: bool = True
    # extra metric sinks besides metrics.jsonl: "tensorboard" (extra `tensorboard`), "wandb" (extra `wandb`;
    # runs offline unless WANDB_MODE says otherwise)
    loggers: list[str] = field(default_factory=list)


@dataclass
class EvaluationConfig:
    recall_at: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    metrics: list[str] = field(default_factory=lambda: ["recall", "precision@1", "r_precision", "map@r"])
    selection_metric: str = "map@r"
    distance: str = "cosine"


@dataclass
class ExperimentConfig:
    name: str = "quickstart"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    # free-form record of the paper's reported numbers for recipes; never used by training
    reported: dict[str, Any] = field(default_factory=dict)


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return True
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        return any(_type_ok(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _build(cls: type, data: Any, where: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{where or 'top level'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: unknown config key '{dotted}' (known keys here: {known})")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _build(annotation, value, dotted, source)
            continue
        if annotation is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not _type_ok(value, annotation):
            raise ConfigError(
                f"{source}: config key '{dotted}' expects {_describe(annotation)}, got {value!r}"
            )
        kwargs[key] = value
    return cls(**kwargs)


def _describe(annotation: Any) -> str:
    return str(annotation).replace("typing.", "")


def config_from_dict(data: dict[str, Any], source: str = "<config>") -> ExperimentConfig:
    return _build(ExperimentConfig, data or {}, "", source)


def config_to_dict(config: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML config (or the quickstart defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        data = loaded or {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        _assign(data, key.strip(), value)
    return config_from_dict(data, source if not overrides else f"{source} (+ --set overrides)")


def _assign(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = {}
            node[part] = child
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
