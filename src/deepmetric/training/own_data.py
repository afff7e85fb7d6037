"""Defaults for training on your own photos (``deepmetric train --data PATH``).

The quickstart defaults (the grey-scale KanjiGlyphs, a small CNN with one input channel, glyph transforms) cannot
train on a folder of colour photos. When ``--data`` is given, whatever the user did not set is chosen for photos:

* ``data.dataset``: ``csv`` when PATH is a ``.csv`` file or a folder holding ``df.csv``, else ``folder``
  (``PATH/<class>/<image>``);
* ``model.backbone``: ``mobilenet_v2`` with ImageNet weights (the file shipped with the install, so no download);
* ``data.train_transform`` / ``data.eval_transform``: the ``xbm`` preset (224×224 crops, ImageNet normalisation).

Each choice is reported as a line, and the resolved ``config.yaml`` of the run records it. A key the user set in
the YAML file or with ``--set`` is never changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from deepmetric.models.factory import offline_imagenet_weights
from deepmetric.training.config import ConfigLoader, ExperimentConfig, check_config

PHOTO_BACKBONE = "mobilenet_v2"
PHOTO_TRANSFORMS = ("xbm_train", "xbm_eval")


def explicit_keys(config_path: str | Path | None, overrides: list[str]) -> set[str]:
    """The dotted keys a user set: in the YAML file and with ``--set`` (``data.root`` for ``--data``)."""
    keys = {item.split("=", 1)[0].strip() for item in overrides}
    if config_path is not None and Path(config_path).is_file():
        data = yaml.load(Path(config_path).read_text(), Loader=ConfigLoader) or {}

        def walk(node: Any, prefix: str) -> None:
            for key, value in node.items():
                dotted = f"{prefix}.{key}" if prefix else str(key)
                keys.add(dotted)
                if isinstance(value, dict):
                    walk(value, dotted)

        if isinstance(data, dict):
            walk(data, "")
    return keys


def infer_dataset(root: str | Path) -> str:
    """``csv`` for a CSV file or a folder holding ``df.csv``, else ``folder``."""
    path = Path(root).expanduser()
    return "csv" if path.suffix.lower() == ".csv" or (path / "df.csv").is_file() else "folder"


def apply_photo_defaults(config: ExperimentConfig, explicit: set[str], data_given: bool) -> list[str]:
    """Fill the settings a photo dataset needs that the user left at the quickstart's; return what was chosen."""
    notes = []
    data, model = config.data, config.model
    if data_given and data.dataset == "kanji_glyphs" and "data.dataset" not in explicit:
        data.dataset = infer_dataset(data.root or ".")
        layout = "a CSV (path,label,split)" if data.dataset == "csv" else "a folder of class sub-folders"
        notes.append(f"data: {data.root} is {layout}: data.dataset={data.dataset}")
    if data.dataset == "kanji_glyphs":
        return notes
    if model.backbone == "kanji_cnn" and "model.backbone" not in explicit:
        model.backbone = PHOTO_BACKBONE
        if "model.pretrained" not in explicit:
            model.pretrained = "imagenet"
        weights = offline_imagenet_weights(PHOTO_BACKBONE) if model.pretrained == "imagenet" else None
        source = f"the file shipped with the install, {weights}" if weights else "the torch hub cache or a download"
        notes.append(f"model: colour photos need an ImageNet backbone: model.backbone={PHOTO_BACKBONE}, "
                     f"model.pretrained={model.pretrained} ({source}); set model.backbone to choose another")
    chosen = []
    for key, preset in zip(("train_transform", "eval_transform"), PHOTO_TRANSFORMS):
        if getattr(data, key).startswith("kanji_") and f"data.{key}" not in explicit:
            setattr(data, key, preset)  # the glyph transforms take grey-scale 32×32 glyphs only
            chosen.append(f"data.{key}={preset}")
    if chosen:
        notes.append(f"data: {', '.join(chosen)} (224×224 crops, ImageNet normalisation)")
    check_config(config)
    return notes
