"""Zero-shot baselines: the retrieval metrics of a pretrained encoder on a dataset split, with no training at all.

The model is the backbone and its pooling without a projection: the pooled features (L2-normalised) are the
embedding, as in OML's model-zoo table. It is embedded and scored by the :class:`SplitEvaluator` that training
uses, so the numbers are the ones a recipe's "before" column would show for that encoder. Defaults, each
reported in :attr:`ZeroShotSetup.notes` and kept when the user sets the key (config file or ``--set``):

* ``model.pooling``: ``cls`` for a ViT with a class token, else the config's (``avg``);
* transforms: the encoder family's preset (``dino``, ``dinov2``, ``clip``, ``vit``; ``xbm`` for CNNs), which
  also turns the grey-scale KanjiGlyphs into 3-channel input;
* ``data.dataset``: ``folder`` / ``csv`` for a ``--data`` path, as ``deepmetric train --data`` does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deepmetric.config_errors import ConfigError
from deepmetric.data.bundle import build_data
from deepmetric.data.transforms import family_preset, input_channels
from deepmetric.models.factory import build_configured_backbone, build_model
from deepmetric.models.timm_backbone import TimmBackbone
from deepmetric.training.config import ExperimentConfig, check_config, load_config, save_config
from deepmetric.training.own_data import explicit_keys, infer_dataset
from deepmetric.training.process_group import get_context, resolve_device
from deepmetric.training.selection import SplitEvaluator

SPLITS = {"test": "test", "val": "validation"}


@dataclass
class ZeroShotSetup:
    config: ExperimentConfig
    explicit: set[str]
    notes: list[str] = field(default_factory=list)


def zero_shot_config(backbone: str, *, config_path: str | Path | None = None, overrides: list[str] | None = None,
                     root: str | None = None, dataset: str | None = None, pretrained: str | None = "imagenet",
                     pooling: str | None = None, transform: str | None = None) -> ZeroShotSetup:
    """The experiment config of a zero-shot evaluation: ``config_path`` (default the quickstart, i.e. the embedded
    KanjiGlyphs) with the encoder, its weights and no projection; ``overrides`` (``key=value``) win over all."""
    flags = [f"model.backbone={backbone}", "model.projection=false",
             f"model.pretrained={'null' if pretrained in (None, 'none') else pretrained}"]
    flags += [f"data.root={root}"] if root else []
    flags += [f"data.dataset={dataset}"] if dataset else []
    flags += [f"model.pooling={pooling}"] if pooling else []
    flags += [f"data.train_transform={transform}_train", f"data.eval_transform={transform}_eval"] if transform else []
    user = list(overrides or [])
    config = load_config(config_path, flags + user)
    explicit = explicit_keys(config_path, flags + user)
    setup = ZeroShotSetup(config, explicit)
    data = config.data
    if root and "data.dataset" not in explicit and data.dataset == "kanji_glyphs":
        data.dataset = infer_dataset(root)
        setup.notes.append(f"data: {root} is read as data.dataset={data.dataset} (--dataset to choose another)")
    if backbone != "kanji_cnn":
        preset = family_preset(backbone)
        chosen = []
        for key in ("train_transform", "eval_transform"):
            if f"data.{key}" not in explicit:
                setattr(data, key, f"{preset}_{key.split('_')[0]}")
                chosen.append(f"data.{key}={getattr(data, key)}")
        if chosen:
            setup.notes.append(f"data: {', '.join(chosen)} (the {preset!r} preset of this encoder family)")
    check_config(config)
    return setup


def evaluate_zero_shot(setup: ZeroShotSetup, split: str = "test",
                       output: str | Path | None = None) -> tuple[dict[str, float], float]:
    """(metrics of ``split`` — "test" or "val" —, wall seconds); with ``output`` the embeddings, labels and the
    resolved config are written there."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    start = time.perf_counter()
    config = setup.config
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    device = resolve_device(config.train.device)
    data = build_data(config.data, seed=config.train.seed, backbone=config.model.backbone)
    in_channels = input_channels(config.data, config.model.backbone)
    backbone = build_configured_backbone(config.model, in_channels)
    if "model.pooling" not in setup.explicit and isinstance(backbone, TimmBackbone) and backbone.has_class_token:
        config.model.pooling = "cls"
        setup.notes.append("model: pooling=cls (the class token; --pooling avg|max|gem pools the patch tokens)")
    config.model.embedding_size = int(backbone.out_channels)  # no projection: the pooled features' width
    model = build_model(config.model, in_channels, backbone=backbone).to(device)
    run_dir = Path(output) if output is not None else Path(".")
    if output is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    evaluator = SplitEvaluator(model, data, config, get_context(), device, run_dir)
    metrics = evaluator(SPLITS[split], save_embeddings=output is not None)
    if metrics is None:
        raise ConfigError(f"split {split!r} is not available for data.dataset={config.data.dataset}"
                          + (" (data.validation_fraction is 0)" if split == "val" else ""))
    return metrics, time.perf_counter() - start
