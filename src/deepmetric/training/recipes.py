"""Paper recipes: the YAML experiment configs under ``configs/`` (methods.md §10).

Where the folder is looked up, in order:

1. the ``DEEPMETRIC_CONFIGS`` environment variable (any folder of recipe YAMLs);
2. ``configs/`` at the root of a source checkout (``src/deepmetric/training/recipes.py`` → ``../../../configs``);
3. ``configs/`` inside the installed package (``deepmetric/configs``), if a wheel ships them.

A recipe's *name* is its path relative to that folder without ``.yaml`` (``cub200/ms_bninception``). Each
records the paper's numbers under ``reported:`` as ``{paper, table, metrics: {metric: percent}, note}``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepmetric.training.config import ConfigError, ExperimentConfig, load_config

ENV_VAR = "DEEPMETRIC_CONFIGS"


def configs_dir() -> Path:
    """The recipe folder (see the module docstring for the search order)."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise ConfigError(f"{ENV_VAR}={env} is not a folder")
        return path
    here = Path(__file__).resolve()
    for candidate in (here.parents[3] / "configs", here.parents[1] / "configs"):
        if candidate.is_dir():
            return candidate
    raise ConfigError(
        f"no recipe folder found: set {ENV_VAR} to the configs/ folder of a deepmetric checkout "
        f"(looked in {here.parents[3] / 'configs'} and {here.parents[1] / 'configs'})"
    )


@dataclass
class RecipeInfo:
    """One row of ``deepmetric recipes``."""

    name: str
    path: Path
    dataset: str
    loss: str
    extras: str  # miner / memory / synthesis, "+"-joined
    backbone: str
    embedding_size: int
    protocol: str
    paper: str
    reported_r1: float | None
    reported: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "path": str(self.path), "dataset": self.dataset, "loss": self.loss,
            "extras": self.extras, "backbone": self.backbone, "embedding_size": self.embedding_size,
            "protocol": self.protocol, "paper": self.paper, "reported_recall@1": self.reported_r1,
        }


def recipe_paths(root: Path | None = None) -> list[Path]:
    root = root or configs_dir()
    return sorted(p for p in root.rglob("*.yaml") if p.is_file())


def recipe_name(path: Path, root: Path | None = None) -> str:
    root = root or configs_dir()
    return path.relative_to(root).with_suffix("").as_posix()


def reported_recall_at_1(reported: dict[str, Any]) -> float | None:
    metrics = reported.get("metrics") if isinstance(reported, dict) else None
    value = metrics.get("recall@1") if isinstance(metrics, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def describe(path: Path, root: Path | None = None) -> RecipeInfo:
    cfg: ExperimentConfig = load_config(path)
    extras = [f"miner:{cfg.loss.miner}"] if cfg.loss.miner else []
    if cfg.memory.name:
        extras.append(cfg.memory.name)
    if cfg.synthesis.name:
        extras.append(cfg.synthesis.name)
    return RecipeInfo(
        name=recipe_name(path, root), path=path, dataset=cfg.data.dataset, loss=cfg.loss.name,
        extras="+".join(extras), backbone=cfg.model.backbone, embedding_size=cfg.model.embedding_size,
        protocol=cfg.train.protocol, paper=str(cfg.reported.get("paper", "")),
        reported_r1=reported_recall_at_1(cfg.reported), reported=cfg.reported,
    )


def list_recipes(root: Path | None = None) -> list[RecipeInfo]:
    root = root or configs_dir()
    return [describe(p, root) for p in recipe_paths(root)]


def find_recipe(name: str, root: Path | None = None) -> Path:
    """The YAML of recipe ``name`` (``cub200/ms_bninception``, with or without ``.yaml``, or a file path)."""
    direct = Path(name)
    if direct.suffix == ".yaml" and direct.is_file():
        return direct
    root = root or configs_dir()
    path = root / (name if name.endswith(".yaml") else f"{name}.yaml")
    if path.is_file():
        return path
    # a unique base name is enough ("ms_bninception" when only one dataset has it)
    stem = Path(name).with_suffix("").name if name.endswith(".yaml") else Path(name).name
    matches = [p for p in recipe_paths(root) if p.stem == stem]
    if len(matches) == 1:
        return matches[0]
    if matches:
        names = ", ".join(recipe_name(p, root) for p in matches)
        raise ConfigError(f"recipe '{name}' is ambiguous: {names}")
    raise ConfigError(f"unknown recipe '{name}' in {root}; run `deepmetric recipes` to list them")
