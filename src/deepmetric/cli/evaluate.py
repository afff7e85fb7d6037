"""``deepmetric evaluate``: retrieval metrics of saved embeddings (.npy / .pt) — parsing and printing only."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="compute Recall@K / Precision@1 / R-Precision / MAP@R of saved embeddings",
        description="Exact retrieval metrics of saved embeddings. Without gallery files every item is a query "
        "against all others (its own row excluded); with them, queries are searched in the gallery.",
    )
    p.add_argument("--embeddings", required=True, metavar="E.npy", help="query embeddings (n, d): .npy or .pt")
    p.add_argument("--labels", required=True, metavar="L.npy", help="query labels (n,), integers")
    p.add_argument("--gallery-embeddings", metavar="G.npy", help="gallery embeddings (m, d)")
    p.add_argument("--gallery-labels", metavar="GL.npy", help="gallery labels (m,)")
    p.add_argument("--recall-at", type=int, nargs="+", default=[1, 2, 4, 8], metavar="K")
    p.add_argument("--metrics", nargs="+", default=["recall", "precision@1", "r_precision", "map@r"],
                   help="recall precision@1 r_precision map@r map nmi f1")
    p.add_argument("--distance", choices=["cosine", "euclidean", "dot"], default="cosine")
    p.add_argument("--ties", choices=["stable", "optimistic"], default="stable")
    p.add_argument("--backend", choices=["torch", "faiss", "faiss-ivf", "faiss-hnsw"], default="torch")
    p.add_argument("--chunk-size", type=int, default=None, help="queries per block (default: 256 MB budget)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
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
    from deepmetric.evaluation import evaluate

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
        result = evaluate(q, ql, g, gl, metrics=tuple(args.metrics), recall_at=tuple(args.recall_at),
                          distance=args.distance, ties=args.ties, backend=args.backend,
                          chunk_size=args.chunk_size, device=args.device, progress=args.progress)
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
