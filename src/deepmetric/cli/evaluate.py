"""``deepmetric evaluate``: retrieval metrics of saved embeddings (.npy / .pt), or of a pretrained encoder with no
training (``--backbone``: the zero-shot baseline, :mod:`deepmetric.training.zero_shot`) — parsing and printing only."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="retrieval metrics of saved embeddings, or of a pretrained encoder without training (--backbone)",
        description="Exact retrieval metrics. With --embeddings: of saved embeddings; without gallery files every "
        "item is a query against all others (its own row excluded), with them queries are searched in the gallery. "
        "With --backbone: embed a dataset split with a pretrained encoder, no training (the zero-shot baseline), "
        "and print the metric table training prints; the dataset is the embedded KanjiGlyphs unless --data / "
        "--dataset / --config say otherwise.",
    )
    p.add_argument("--embeddings", metavar="E.npy", help="query embeddings (n, d): .npy or .pt")
    p.add_argument("--labels", metavar="L.npy", help="query labels (n,), integers")
    p.add_argument("--gallery-embeddings", metavar="G.npy", help="gallery embeddings (m, d)")
    p.add_argument("--gallery-labels", metavar="GL.npy", help="gallery labels (m,)")
    p.add_argument("--recall-at", type=int, nargs="+", default=None, metavar="K", help="default 1 2 4 8")
    p.add_argument("--metrics", nargs="+", default=None,
                   help="recall precision@1 r_precision map@r map nmi f1 (default: recall precision@1 r_precision "
                   "map@r)")
    p.add_argument("--distance", choices=["cosine", "euclidean", "dot"], default=None, help="default cosine")
    p.add_argument("--ties", choices=["stable", "optimistic"], default="stable")
    p.add_argument("--backend", choices=["torch", "faiss", "faiss-ivf", "faiss-hnsw"], default="torch")
    p.add_argument("--chunk-size", type=int, default=None, help="queries per block (default: 256 MB budget)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    z = p.add_argument_group("zero-shot baseline (--backbone)")
    z.add_argument("--backbone", metavar="NAME", help="encoder, e.g. timm:vit_small_patch16_224.dino, "
                   "timm:vit_small_patch14_dinov2.lvd142m, timm:vit_base_patch16_clip_224.openai, mobilenet_v2")
    z.add_argument("--pretrained", default="imagenet", metavar="WEIGHTS",
                   help="imagenet (the published weights; for timm:<model>.<tag> that tag's), a weight file, or "
                   "none (random init)")
    z.add_argument("--data", metavar="DIR", help="dataset root (default: the embedded KanjiGlyphs)")
    z.add_argument("--dataset", help="kanji_glyphs, cub200, cars196, sop, inshop, folder, csv (default: from "
                   "--config, else folder/csv for --data, else kanji_glyphs)")
    z.add_argument("--split", choices=["test", "val"], default="test")
    z.add_argument("--config", help="take data, evaluation and model options from this YAML (e.g. a recipe)")
    z.add_argument("--pooling", choices=["cls", "avg", "max", "avg+max", "gem"],
                   help="default: cls for ViTs with a class token, else avg")
    z.add_argument("--transform", metavar="PRESET", help="transform preset, e.g. dino, clip, xbm (default: the "
                   "encoder family's)")
    z.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.max_classes=10 (repeatable)")
    z.add_argument("--output", metavar="DIR", help="also write the embeddings, labels and config.yaml here")
    p.set_defaults(run=run)


def _load(path: str, what: str) -> np.ndarray:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what}: file not found: {file}")
    if file.suffix in (".pt", ".pth"):
        import torch

        return torch.load(file, map_location="cpu", weights_only=True).numpy()
    if file.suffix != ".npy":
        raise ValueError(f"{what}: expected a .npy or .pt file, got {file}")
    return np.load(file, allow_pickle=False)


def run(args: argparse.Namespace) -> int:
    if args.backbone is not None:
        if args.embeddings or args.labels or args.gallery_embeddings or args.gallery_labels:
            print("error: give either --backbone (zero-shot) or --embeddings/--labels, not both", file=sys.stderr)
            return 2
        return _zero_shot(args)
    zero_shot_only = [f"--{name.replace('_', '-')}" for name in ("data", "dataset", "config", "pooling", "transform",
                                                                  "output") if getattr(args, name)]
    if args.overrides or zero_shot_only:
        print(f"error: {', '.join(zero_shot_only or ['--set'])} need --backbone", file=sys.stderr)
        return 2
    return _saved_embeddings(args)


def _saved_embeddings(args: argparse.Namespace) -> int:
    from deepmetric.evaluation import evaluate

    if args.embeddings is None or args.labels is None:
        print("error: pass --embeddings and --labels (saved embeddings), or --backbone (zero-shot)", file=sys.stderr)
        return 2
    if (args.gallery_embeddings is None) != (args.gallery_labels is None):
        print("error: --gallery-embeddings and --gallery-labels must be given together", file=sys.stderr)
        return 2
    try:
        q = _load(args.embeddings, "--embeddings")
        ql = _load(args.labels, "--labels")
        g = gl = None
        if args.gallery_embeddings is not None:
            g = _load(args.gallery_embeddings, "--gallery-embeddings")
            gl = _load(args.gallery_labels, "--gallery-labels")
        result = evaluate(q, ql, g, gl, metrics=tuple(args.metrics or DEFAULT_METRICS),
                          recall_at=tuple(args.recall_at or (1, 2, 4, 8)), distance=args.distance or "cosine",
                          ties=args.ties, backend=args.backend, chunk_size=args.chunk_size, device=args.device,
                          progress=args.progress)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        width = max(len(k) for k in result)
        for key, value in result.items():
            text = f"{value:d}" if isinstance(value, int) else f"{value:.6f}"
            print(f"{key:<{width}}  {text:>12}")
    return 0


DEFAULT_METRICS = ("recall", "precision@1", "r_precision", "map@r")


def _zero_shot(args: argparse.Namespace) -> int:
    from deepmetric.training.zero_shot import evaluate_zero_shot, zero_shot_config

    if args.ties != "stable" or args.backend != "torch" or args.chunk_size is not None:
        print("error: --ties, --backend and --chunk-size apply to --embeddings; the zero-shot evaluation uses "
              "the training evaluator's settings", file=sys.stderr)
        return 2
    overrides = [f"train.device={args.device}"] if args.device else []
    overrides += [f"evaluation.recall_at=[{', '.join(map(str, args.recall_at))}]"] if args.recall_at else []
    overrides += [f"evaluation.metrics=[{', '.join(args.metrics)}]"] if args.metrics else []
    overrides += [f"evaluation.distance={args.distance}"] if args.distance else []
    overrides += [f"train.progress={'true' if args.progress else 'false'}"]
    try:
        setup = zero_shot_config(args.backbone, config_path=args.config, overrides=overrides + args.overrides,
                                 root=args.data, dataset=args.dataset, pretrained=args.pretrained,
                                 pooling=args.pooling, transform=args.transform)
        metrics, seconds = evaluate_zero_shot(setup, args.split, args.output)
    except ImportError as err:  # an optional extra (timm) that is not installed
        print(f"error: {err}", file=sys.stderr)
        return 2
    config = setup.config
    if args.json:
        print(json.dumps({"backbone": config.model.backbone, "pretrained": config.model.pretrained,
                          "dataset": config.data.dataset, "split": args.split, "pooling": config.model.pooling,
                          "eval_transform": config.data.eval_transform, "seconds": round(seconds, 3),
                          "metrics": metrics}, indent=2))
        return 0
    for note in setup.notes:
        print(note)
    print(f"zero-shot: {config.model.backbone} (weights: {config.model.pretrained or 'random init'}), "
          f"{config.model.embedding_size}-d {config.model.pooling} features, no training; "
          f"{config.data.dataset} {args.split} split, {seconds:.1f}s")
    print(f"{args.split} metrics (unseen classes), % :")
    print(format_metrics_table(metrics))
    if args.output:
        print(f"embeddings and config.yaml written to {args.output}")
    return 0


def format_metrics_table(metrics: dict[str, float]) -> str:
    """The rows of training's results table (Recall@K, P@1, R-Precision, MAP@R, NMI, F1) in %, one column."""
    keys = [k for k in metrics if k.startswith("recall@") or k in ("precision@1", "r_precision", "map@r", "nmi", "f1")]
    lines = [f"{'metric':<14}{'zero-shot':>10}", "-" * 24]
    lines += [f"{k:<14}{100 * metrics[k]:>10.2f}" for k in keys]
    return "\n".join(lines)
