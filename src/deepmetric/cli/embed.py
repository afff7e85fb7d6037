"""``deepmetric embed``: embed a dataset split or a folder of images with a trained model.

Writes ``embeddings.npy`` (N×d float32, as the model outputs them — L2-normalised when the model normalises),
``labels.npy`` (N int64; −1 for images without a class folder) and, for image folders, ``paths.txt`` (one path
per line, row order) into ``--output``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SPLITS = ("train", "val", "test", "query", "gallery")


def add_model_and_items_arguments(p: argparse.ArgumentParser, verb: str) -> None:
    """The model (--run, or --config with --checkpoint) and what to ``verb`` (--split or --images): shared by the
    sub-commands that embed items with a trained model (embed, index)."""
    src = p.add_argument_group("model (either --run or --config with --checkpoint)")
    src.add_argument("--run", dest="run_dir", metavar="RUN_DIR", help="run directory (uses config.yaml and model.pt)")
    src.add_argument("--config", help="experiment YAML (with --checkpoint)")
    src.add_argument("--checkpoint", help="model weights: model.pt, best.pt or last.pt")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--split", choices=SPLITS, help=f"dataset split to {verb} (train uses the eval transform)")
    what.add_argument("--images", metavar="FOLDER", help=f"{verb} every image under FOLDER (sub-folders = classes)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "embed",
        help="embed a dataset split or an image folder with a trained model",
        description="Embed a split of the run's dataset (rebuilt from its config with the evaluation transform) "
        "or every image under a folder, and write embeddings.npy + labels.npy (+ paths.txt) to --output.",
    )
    add_model_and_items_arguments(p, "embed")
    p.add_argument("--output", required=True, metavar="OUT_DIR", help="folder to write the arrays into")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's data.eval_batch_size")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.set_defaults(run=run)


def resolve_model_source(args: argparse.Namespace) -> tuple[object, Path]:
    """(ExperimentConfig, weights path) from ``--run`` or ``--config`` + ``--checkpoint``."""
    from deepmetric.training.config import load_config
    from deepmetric.training.run_artifacts import RunArtifactError, read_config, require_file, run_model_path

    if args.run_dir:
        if args.config or args.checkpoint:
            raise RunArtifactError("give either --run or --config/--checkpoint, not both")
        run_dir = Path(args.run_dir)
        if not run_dir.is_dir():
            raise RunArtifactError(f"run directory not found: {run_dir}")
        config, _ = read_config(run_dir)
        return config, run_model_path(run_dir)
    if not (args.config and args.checkpoint):
        raise RunArtifactError("a model is needed: pass --run RUN_DIR, or both --config and --checkpoint")
    return load_config(args.config), require_file(Path(args.checkpoint), "checkpoint")


def split_dataset(config: object, split: str) -> object:
    from deepmetric.data.bundle import build_data

    bundle = build_data(config.data, seed=config.train.seed,  # type: ignore[attr-defined]
                        backbone=config.model.backbone)  # type: ignore[attr-defined]
    dataset = {
        "train": bundle.train_eval or bundle.train,
        "val": bundle.validation,
        "test": bundle.test,
        "query": bundle.query,
        "gallery": bundle.gallery,
    }[split]
    if dataset is None:
        hint = {
            "val": "this config has no validation split (data.validation_fraction = 0)",
            "query": "only query→gallery datasets (In-Shop) have a query split; use --split test",
            "gallery": "only query→gallery datasets (In-Shop) have a gallery split; use --split test",
            "test": "this dataset has no single test split; use --split query and --split gallery",
        }.get(split, "")
        raise ValueError(f"split '{split}' is not available for dataset {config.data.dataset}: {hint}")  # type: ignore[attr-defined]
    return dataset


def embed_items(config: object, weights: Path, *, split: str | None = None, images: str | None = None,
                batch_size: int | None = None, device: str = "cpu") -> tuple[object, object, list[str] | None]:
    """(embeddings (N, d) float32, labels (N,) int64, image paths or None) of a split or an image folder."""
    import numpy as np

    from deepmetric.training.inference import embed_dataset
    from deepmetric.training.run_artifacts import ImageFileDataset, image_loader, list_images, load_model

    model = load_model(config, weights, device=device)  # type: ignore[arg-type]
    paths = None
    if images:
        found, labels, _ = list_images(images)
        paths = [str(p) for p in found]
        dataset = ImageFileDataset(found, labels, image_loader(config))  # type: ignore[arg-type]
    else:
        dataset = split_dataset(config, split or "test")
    batch = batch_size or config.data.eval_batch_size  # type: ignore[attr-defined]
    emb, lab = embed_dataset(model, dataset, batch_size=batch, device=device)
    return emb.numpy().astype(np.float32), lab.numpy().astype(np.int64), paths


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from deepmetric.training.config import ConfigError

    try:
        config, weights = resolve_model_source(args)
        emb, lab, paths = embed_items(config, weights, split=args.split, images=args.images,
                                      batch_size=args.batch_size, device=args.device)
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "embeddings.npy", emb)
    np.save(out / "labels.npy", lab)
    if paths is not None:
        (out / "paths.txt").write_text("".join(f"{p}\n" for p in paths))
    print(f"wrote {len(emb)} embeddings of size {emb.shape[1]} to {out}")  # type: ignore[attr-defined]
    return 0
