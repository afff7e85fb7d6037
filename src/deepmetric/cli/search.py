"""``deepmetric search``: nearest gallery items of query images, by cosine similarity.

The gallery is a matrix written by ``deepmetric embed`` (``embeddings.npy``); ``paths.txt`` and ``labels.npy``
beside it are picked up automatically unless given explicitly. Query images are embedded with the run's model
and evaluation transform.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "search",
        help="find the most similar gallery images for query images",
        description="Embed query images with a trained model and list their top-k gallery neighbours by cosine "
        "similarity.",
    )
    p.add_argument("--gallery-embeddings", required=True, metavar="G.npy", help="gallery matrix (N×d)")
    p.add_argument("--gallery-paths", metavar="paths.txt",
                   help="one path per gallery row (default: paths.txt next to G.npy, if present)")
    p.add_argument("--gallery-labels", metavar="labels.npy",
                   help="gallery labels (default: labels.npy next to G.npy, if present)")
    p.add_argument("--run", dest="run_dir", metavar="RUN_DIR", help="run directory (config.yaml + model.pt)")
    p.add_argument("--config", help="experiment YAML (with --checkpoint), instead of --run")
    p.add_argument("--checkpoint", help="model weights (with --config)")
    p.add_argument("--query", required=True, nargs="+", metavar="IMAGE", help="query image file(s)")
    p.add_argument("--top-k", type=int, default=5, help="neighbours per query (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=run)


def _load_gallery(args: argparse.Namespace) -> tuple[object, list[str] | None, object | None]:
    import numpy as np

    from deepmetric.training.run_artifacts import RunArtifactError, require_file

    g_path = require_file(Path(args.gallery_embeddings), "gallery embeddings")
    gallery = np.load(g_path)
    if gallery.ndim != 2 or len(gallery) == 0:
        raise RunArtifactError(f"{g_path}: expected a non-empty (N, d) matrix, got shape {gallery.shape}")
    paths_file = Path(args.gallery_paths) if args.gallery_paths else g_path.parent / "paths.txt"
    paths = None
    if args.gallery_paths or paths_file.is_file():
        paths = require_file(paths_file, "gallery paths").read_text().splitlines()
        if len(paths) != len(gallery):
            raise RunArtifactError(f"{paths_file} has {len(paths)} lines but {g_path} has {len(gallery)} rows")
    labels_file = Path(args.gallery_labels) if args.gallery_labels else g_path.parent / "labels.npy"
    labels = None
    if args.gallery_labels or labels_file.is_file():
        labels = np.load(require_file(labels_file, "gallery labels"))
        if len(labels) != len(gallery):
            raise RunArtifactError(f"{labels_file} has {len(labels)} entries but {g_path} has {len(gallery)} rows")
    return gallery, paths, labels


def search(query: object, gallery: object, top_k: int) -> tuple[object, object]:
    """(indices (q, k), cosine scores (q, k)) of the top-k gallery rows per query; ties keep the lower index."""
    import numpy as np

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    sims = unit(np.asarray(query, dtype=np.float32)) @ unit(np.asarray(gallery, dtype=np.float32)).T
    k = min(top_k, sims.shape[1])
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)


def run(args: argparse.Namespace) -> int:
    import torch

    from deepmetric.cli.embed import resolve_model_source
    from deepmetric.training.config import ConfigError
    from deepmetric.training.run_artifacts import image_loader, load_model, require_file

    try:
        if args.top_k < 1:
            raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
        gallery, paths, labels = _load_gallery(args)
        config, weights = resolve_model_source(args)
        model = load_model(config, weights, device=args.device)  # type: ignore[arg-type]
        load = image_loader(config)  # type: ignore[arg-type]
        queries = [require_file(Path(q), "query image") for q in args.query]
        with torch.no_grad():
            batch = torch.stack([load(q) for q in queries]).to(args.device)
            emb = model(batch).float().cpu().numpy()
        if emb.shape[1] != gallery.shape[1]:  # type: ignore[attr-defined]
            raise ValueError(f"the model embeds to {emb.shape[1]} dimensions but the gallery has "
                             f"{gallery.shape[1]} (was it embedded with another model?)")  # type: ignore[attr-defined]
        order, scores = search(emb, gallery, args.top_k)
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = []
    for qi, q in enumerate(queries):
        hits = []
        for rank, (gi, s) in enumerate(zip(order[qi], scores[qi]), start=1):
            hit = {"rank": rank, "index": int(gi), "score": round(float(s), 6)}
            if paths is not None:
                hit["path"] = paths[gi]
            if labels is not None:
                hit["label"] = int(labels[gi])
            hits.append(hit)
        results.append({"query": str(q), "neighbours": hits})
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(f"query: {r['query']}")
        for h in r["neighbours"]:
            where = h.get("path", f"row {h['index']}")
            label = f"  label {h['label']}" if "label" in h else ""
            print(f"  {h['rank']:>3}. {h['score']:.4f}  {where}{label}")
    return 0
