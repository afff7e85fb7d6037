"""Typed experiment configuration, loaded from YAML with ``yaml.safe_load``.

Every training "trick" is an explicit field, so the resolved config written next to a run says exactly what
ran. Each layer owns its section (``DataConfig`` in :mod:`deepmetric.data.config`, ``ModelConfig`` in
:mod:`deepmetric.models.config`); this module composes them into :class:`ExperimentConfig`, loads and saves it.

Every value is checked on load (:func:`check_config`): its type, ``Literal`` fields against their allowed
values, the bounds a field declares in its ``metadata`` (``min``: value ≥ min, ``below``: value < below) and
the few rules that tie two fields together. Unknown keys are errors that name the file and the dotted key;
``--set a.b=value`` overrides are parsed as YAML scalars and checked the same way. Floats may be written in
scientific notation without a decimal point (``1e-4``; plain YAML 1.1 reads that as a string), and must be finite.
Names that select an implementation (backbone, dataset, transforms, metrics, device) are checked against their
registries here too, so a typo fails at load time, before any data is read or evaluation work starts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from deepmetric.config_errors import ConfigError
from deepmetric.data.config import DataConfig
from deepmetric.data.datasets import DATASETS
from deepmetric.data.transforms import TRANSFORMS
from deepmetric.evaluation.engine import ALL_METRICS
from deepmetric.models.backbones import BACKBONES
from deepmetric.models.config import ModelConfig

__all__ = [
    "ConfigError", "DataConfig", "EvaluationConfig", "ExperimentConfig", "LossConfig", "MemoryConfig",
    "ModelConfig", "OptimizerConfig", "SchedulerConfig", "SynthesisConfig", "TrainConfig", "apply_override",
    "check_config", "config_from_dict", "config_to_dict", "load_config", "save_config",
]


@dataclass
class LossConfig:
    """The base loss (``LOSSES[name](**params)``) and an optional miner (``MINERS[miner](**miner_params)``).

    Run facts a class declares in ``build_arguments`` (``num_classes``, ``embedding_size``) are filled in.
    """

    name: str = "multi_similarity"
    params: dict[str, Any] = field(default_factory=dict)  # constructor keyword arguments
    miner: str | None = None
    miner_params: dict[str, Any] = field(default_factory=dict)


@dataclass
class MemoryConfig:
    """Cross-batch memory around the loss: ``MEMORIES[name](loss, miner, **params)``; ``name: null`` = none.

    ``params`` are the constructor arguments of :class:`deepmetric.memory.CrossBatchMemory`: ``memory_size``
    (required), ``start_iteration``, ``weight``, ``enqueue_fraction`` or ``enqueue_count``,
    ``fill_during_warmup``, ``include_batch_loss``, ``dtype`` (float32 | float64 | float16 | bfloat16).
    ``embedding_size`` comes from ``model.embedding_size``.
    """

    name: str | None = None  # None | xbm
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class SynthesisConfig:
    """Synthesis wrapper outside the loss (and outside the memory): ``SYNTHESIS[name](stack, miner, **params)``."""

    name: str | None = None  # None | iaa | das | mdr | sgar
    params: dict[str, Any] = field(default_factory=dict)


_MEMORY_MIGRATION = (
    "the memory section is now `name` + `params`, like synthesis: write `memory: {name: xbm, params: "
    "{memory_size: 8192, start_iteration: 0, weight: 1.0}}` (every CrossBatchMemory argument may go in params), "
    "or leave `memory.name` null for no memory"
)
#: keys of the old config shape, with what to write instead
REMOVED_KEYS: dict[str, str] = {
    f"memory.{key}": _MEMORY_MIGRATION for key in ("enabled", "memory_size", "start_iteration", "weight")
}


@dataclass
class OptimizerConfig:
    name: Literal["adam", "adamw", "sgd", "rmsprop"] = "adam"
    lr: float = field(default=1e-3, metadata={"min": 0.0})
    weight_decay: float = field(default=0.0, metadata={"min": 0.0})
    momentum: float = field(default=0.9, metadata={"min": 0.0})  # sgd / rmsprop
    backbone_lr_multiplier: float = field(default=1.0, metadata={"min": 0.0})
    head_lr_multiplier: float = field(default=1.0, metadata={"min": 0.0})
    layer_decay: float = field(default=1.0, metadata={"above": 0.0, "max": 1.0})  # ViT layer-wise lr decay; 1 = off
    # loss parameters (proxies, margins) use the loss's own recommended multiplier unless set here
    loss_lr_multiplier: float | None = field(default=None, metadata={"min": 0.0})
    # weight decay of the loss parameters (margin β, proxies, MDR levels); null = optimizer.weight_decay
    loss_weight_decay: float | None = field(default=None, metadata={"min": 0.0})
    grad_clip_value: float | None = field(default=None, metadata={"min": 0.0})
    grad_clip_norm: float | None = field(default=None, metadata={"min": 0.0})


@dataclass
class SchedulerConfig:
    name: Literal["none", "multistep", "step", "warmup_multistep", "plateau"] = "none"
    milestones: list[int] = field(default_factory=list)  # in `unit`s
    step_size: int = field(default=0, metadata={"min": 0})  # > 0 for name=step
    gamma: float = field(default=0.1, metadata={"min": 0.0})
    warmup_iterations: int = field(default=0, metadata={"min": 0})
    warmup_factor: float = field(default=0.01, metadata={"min": 0.0})
    plateau_patience: int = field(default=4, metadata={"min": 0})
    # unit of milestones / step_size / warmup_iterations (sampler epochs or iterations)
    unit: Literal["iterations", "epochs"] = "iterations"

    def in_iterations(self, batches_per_epoch: int) -> SchedulerConfig:
        """This schedule with milestones, step size and warm-up counted in iterations."""
        if self.unit == "iterations":
            return self
        return dataclasses.replace(
            self, unit="iterations", milestones=[m * batches_per_epoch for m in self.milestones],
            step_size=self.step_size * batches_per_epoch,
            warmup_iterations=self.warmup_iterations * batches_per_epoch,
        )


LoggerName = Literal["tensorboard", "wandb"]


@dataclass
class TrainConfig:
    iterations: int = field(default=600, metadata={"min": 1})
    # if set, train for this many sampler epochs instead of `iterations`
    epochs: int | None = field(default=None, metadata={"min": 1})
    # validate (model selection) every N iterations; 0 = only at the end
    eval_every: int = field(default=150, metadata={"min": 0})
    # warm-up: train only head (+ loss params) first
    frozen_backbone_iterations: int = field(default=0, metadata={"min": 0})
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | cuda:<index> | auto
    amp: Literal["none", "fp16", "bf16"] = "none"  # GPU only
    deterministic: bool = False
    threads: int | None = field(default=None, metadata={"min": 1})  # torch CPU threads
    # validation: select on the class-disjoint val split | legacy: select on test (published tables only)
    protocol: Literal["validation", "legacy"] = "validation"
    early_stopping_patience: int | None = field(default=None, metadata={"min": 0})
    checkpoint_every: int = field(default=0, metadata={"min": 0})  # 0 = final only
    progress: bool = True
    # extra metric sinks besides metrics.jsonl: "tensorboard" (extra `tensorboard`), "wandb" (extra `wandb`;
    # runs offline unless WANDB_MODE says otherwise)
    loggers: list[LoggerName] = field(default_factory=list)

    def total_iterations(self, batches_per_epoch: int) -> int:
        """The run length: ``epochs`` sampler epochs when set, else ``iterations``."""
        return self.iterations if self.epochs is None else self.epochs * batches_per_epoch


@dataclass
class EvaluationConfig:
    recall_at: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    metrics: list[str] = field(default_factory=lambda: ["recall", "precision@1", "r_precision", "map@r"])
    selection_metric: str = "map@r"
    distance: Literal["cosine", "euclidean", "dot"] = "cosine"


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
    if origin is typing.Union or origin is types.UnionType:
        return any(_type_ok(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
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


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return f"a list of ({_describe(args[0])})"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _build(cls: type, data: Any, where: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{where or 'top level'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in fields:
            if dotted in REMOVED_KEYS:
                raise ConfigError(f"{source}: config key '{dotted}' was removed: {REMOVED_KEYS[dotted]}")
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: unknown config key '{dotted}' (known keys here: {known})")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _build(annotation, value, dotted, source)
            continue
        if annotation is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kwargs[key] = value
    return cls(**kwargs)


def _check_fields(section: Any, where: str, source: str) -> None:
    """Type, allowed values and declared bounds of every field of a config dataclass, recursively."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        dotted = f"{where}.{f.name}" if where else f.name
        value = getattr(section, f.name)
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            _check_fields(value, dotted, source)
            continue
        if not _type_ok(value, annotation):
            raise ConfigError(f"{source}: config key '{dotted}' expects {_describe(annotation)}, got {value!r}")
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{source}: config key '{dotted}' must be a finite number, got {value!r}")
        low, above, high, below = (f.metadata.get(k) for k in ("min", "above", "max", "below"))
        if low is not None and value < low:
            raise ConfigError(f"{source}: config key '{dotted}' must be >= {low}, got {value!r}")
        if above is not None and value <= above:
            raise ConfigError(f"{source}: config key '{dotted}' must be > {above}, got {value!r}")
        if high is not None and value > high:
            raise ConfigError(f"{source}: config key '{dotted}' must be <= {high}, got {value!r}")
        if below is not None and value >= below:
            raise ConfigError(f"{source}: config key '{dotted}' must be < {below}, got {value!r}")


def check_config(config: ExperimentConfig, source: str = "<config>") -> ExperimentConfig:
    """Check every field of ``config`` and the rules between fields; return it. Errors name the key and value."""
    _check_fields(config, "", source)
    data, scheduler = config.data, config.scheduler
    if data.batches_per_epoch is not None and data.sampler != "m_per_class":
        raise ConfigError(f"{source}: data.batches_per_epoch applies to the m_per_class sampler only (random "
                          "sampling is one pass over the data per epoch); remove it or set data.sampler=m_per_class")
    if (data.sampler == "m_per_class" and data.class_choice != "permutation"
            and data.batch_size % data.m_per_class):
        raise ConfigError(f"{source}: data.batch_size ({data.batch_size}) must be a multiple of data.m_per_class "
                          f"({data.m_per_class}) for class_choice {data.class_choice!r}")
    if scheduler.name == "step" and scheduler.step_size <= 0:
        raise ConfigError(f"{source}: scheduler.step_size must be > 0 for scheduler.name=step, "
                          f"got {scheduler.step_size}")
    _check_names(config, source)
    return config


def _check_names(config: ExperimentConfig, source: str) -> None:
    """Registry names and the evaluation settings: the errors that would otherwise surface mid-run."""
    data, ec, backbone = config.data, config.evaluation, config.model.backbone
    if not (backbone in BACKBONES or backbone == "bn_inception" or backbone.startswith("timm:")):
        raise ConfigError(f"{source}: config key 'model.backbone' is {backbone!r}; known: "
                          f"{', '.join(sorted(BACKBONES))} or 'timm:<model name>'")
    if data.dataset != "kanji_glyphs" and data.dataset not in DATASETS:
        raise ConfigError(f"{source}: config key 'data.dataset' is {data.dataset!r}; known: kanji_glyphs, "
                          f"{', '.join(sorted(DATASETS))}")
    for key in ("train_transform", "eval_transform"):
        if getattr(data, key) not in TRANSFORMS:
            raise ConfigError(f"{source}: config key 'data.{key}' is {getattr(data, key)!r}; known: "
                              f"{', '.join(sorted(TRANSFORMS))}")
    metrics = []
    for name in ec.metrics:
        key = "recall" if name.lower().startswith("recall@") else name.lower()
        if key not in ALL_METRICS:
            raise ConfigError(f"{source}: config key 'evaluation.metrics' has unknown metric {name!r}; known: "
                              f"{', '.join(ALL_METRICS)}")
        metrics.append(key)
    if any(k < 1 for k in ec.recall_at) or ("recall" in metrics and not ec.recall_at):
        raise ConfigError(f"{source}: config key 'evaluation.recall_at' must be a non-empty list of positive "
                          f"integers, got {ec.recall_at}")
    computed = {f"recall@{k}" for k in ec.recall_at} if "recall" in metrics else set()
    computed |= {m for m in metrics if m != "recall"}
    selects = config.train.protocol == "legacy" or data.validation_fraction > 0 or data.dataset == "csv"
    if selects and ec.selection_metric not in computed:  # also catches an empty metrics list
        raise ConfigError(f"{source}: config key 'evaluation.selection_metric' is {ec.selection_metric!r}, which "
                          f"evaluation.metrics / recall_at do not compute; computed: {sorted(computed)}")
    device = config.train.device
    if device != "auto":
        try:
            torch.device(device)
        except RuntimeError:
            raise ConfigError(f"{source}: config key 'train.device' is {device!r}; expected cpu, cuda, "
                              "cuda:<index>, mps or auto") from None


def config_from_dict(data: dict[str, Any], source: str = "<config>") -> ExperimentConfig:
    return check_config(_build(ExperimentConfig, data or {}, "", source), source)


def config_to_dict(config: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-4`` / ``5E3`` as floats (YAML 1.1 wants ``1.0e-4``)."""


ConfigLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


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
            loaded = yaml.load(p.read_text(), Loader=ConfigLoader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        data = loaded or {}
    for item in overrides or []:
        apply_override(data, item)
    return config_from_dict(data, source if not overrides else f"{source} (+ --set overrides)")


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``--set key=value`` (value parsed as a YAML scalar) to a nested config mapping."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got '{item}'")
    key, raw = item.split("=", 1)
    try:
        value = yaml.load(raw, Loader=ConfigLoader) if raw != "" else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: the value {raw!r} is not valid YAML: {exc}") from None
    _assign(data, key.strip(), value)


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
