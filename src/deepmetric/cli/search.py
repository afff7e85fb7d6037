"""``deepmetric search``: nearest gallery items of query images, by cosine similarity.

The gallery is either a persisted index written by ``deepmetric index`` (``--index``: loaded and verified, never
re-embedded; refused when it was built by another model) or a matrix written by ``deepmetric embed``
(``--gallery-embeddings``; ``paths.txt`` and ``labels.npy`` beside it are picked up automatically unless given
explicitly). Query images are embedded with the run's model and evaluation transform, searched with the
library's exact search (or the index's faiss index) and optionally re-ranked. With a match threshold
(``--threshold``, else the index's, else the run's ``verification.json`` written at the end of training) every
neighbour says match / no match.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "search",
        help="find the most similar gallery images for query images",
        description="Embed query images with a trained model and list their top-k gallery neighbours by cosine "
        "similarity.",
    )
    gallery = p.add_mutually_exclusive_group(required=True)
    gallery.add_argument("--index", metavar="INDEX_DIR", help="search index written by `deepmetric index`")
    gallery.add_argument("--gallery-embeddings", metavar="G.npy", help="gallery matrix (N×d)")
    p.add_argument("--gallery-paths", metavar="paths.txt",
                   help="one path per gallery row (default: paths.txt next to G.npy, if present)")
    p.add_argument("--gallery-labels", metavar="labels.npy",
                   help="gallery labels (default: labels.npy next to G.npy, if present)")
    p.add_argument("--run", dest="run_dir", metavar="RUN_DIR", help="run directory (config.yaml + model.pt)")
    p.add_argument("--config", help="experiment YAML (with --checkpoint), instead of --run")
    p.add_argument("--checkpoint", help="model weights (with --config)")
    p.add_argument("--query", required=True, nargs="+", metavar="IMAGE", help="query image file(s)")
    p.add_argument("--top-k", type=int, default=5, help="neighbours per query (default 5)")
    p.add_argument("--rerank", choices=("aqe", "dba", "kreciprocal"),
                   help="re-rank the top candidates: α-query expansion, database augmentation or k-reciprocal "
                   "(the order follows the re-ranker; scores and match decisions stay cosine similarities)")
    p.add_argument("--rerank-candidates", type=int, default=50, help="candidates re-ranked per query (default 50)")
    p.add_argument("--threshold", type=float,
                   help="match threshold on the cosine similarity (overrides the index's and the run's)")
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


def _search(args: argparse.Namespace, emb: Any, gallery: Any, index: Any | None) -> tuple[Any, Any]:
    """(results, cosine similarity of every listed pair): a re-ranker orders the list by its own score, but
    similarities (and the match threshold, calibrated on them) stay cosine."""
    import numpy as np

    from deepmetric.evaluation import retrieve
    from deepmetric.evaluation.rerank import rerank

    depth = max(args.top_k, args.rerank_candidates) if args.rerank else args.top_k
    results = index.search(emb, depth) if index is not None else retrieve(emb, gallery=gallery, k=depth)
    if not args.rerank:
        return results, results.neighbour_score.numpy()
    if bool((results.neighbour_index < 0).any()):
        raise ValueError("the approximate index returned short lists; re-ranking needs full candidate lists")
    stored = index.gallery_neighbours if index is not None else None
    if index is not None and stored is None and args.rerank != "aqe":
        print(f"note: {args.index} stores no gallery neighbour lists, so the gallery is searched against itself "
              "for this re-ranking; `deepmetric index --neighbour-k 32` stores them", file=sys.stderr)
    results = rerank(results, args.rerank, emb, gallery, gallery_neighbours=stored).truncated(
        min(args.top_k, results.k))
    idx = results.neighbour_index.numpy()

    def unit(x: Any) -> Any:
        x = np.asarray(x, dtype=np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    return results, np.einsum("qd,qkd->qk", unit(emb), unit(np.asarray(gallery)[idx]))


def run(args: argparse.Namespace) -> int:
    import torch

    from deepmetric.cli.embed import resolve_model_source
    from deepmetric.cli.index import model_fingerprint, run_threshold
    from deepmetric.evaluation.index import SearchIndex
    from deepmetric.training.config import ConfigError
    from deepmetric.training.run_artifacts import image_loader, load_model, require_file

    threshold = args.threshold
    try:
        if args.top_k < 1:
            raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
        index = None
        if args.index:
            if not (Path(args.index) / "meta.json").is_file():
                raise FileNotFoundError(f"{args.index} is not a search index: meta.json is missing")
            if not args.run_dir and not args.config:
                args.run_dir = json.loads((Path(args.index) / "meta.json").read_text()).get("run_dir")
        config, weights = resolve_model_source(args)
        if args.index:
            index = SearchIndex.load(args.index, model=model_fingerprint(config, weights))
            gallery, paths, labels = index.embeddings, index.paths, index.labels
            threshold = index.threshold if threshold is None else threshold
        else:
            gallery, paths, labels = _load_gallery(args)
        if threshold is None and (saved := run_threshold(args.run_dir)) is not None:
            threshold = float(saved["threshold"])  # calibrated on the validation split at the end of training
        model = load_model(config, weights, device=args.device)  # type: ignore[arg-type]
        load = image_loader(config)  # type: ignore[arg-type]
        queries = [require_file(Path(q), "query image") for q in args.query]
        with torch.no_grad():
            batch = torch.stack([load(q) for q in queries]).to(args.device)
            emb = model(batch).float().cpu().numpy()
        if emb.shape[1] != gallery.shape[1]:  # type: ignore[attr-defined]
            raise ValueError(f"the model embeds to {emb.shape[1]} dimensions but the gallery has "
                             f"{gallery.shape[1]} (was it embedded with another model?)")  # type: ignore[attr-defined]
        results, similarity = _search(args, emb, gallery, index)
    except (ConfigError, FileNotFoundError, ValueError, KeyError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    order, scores, reranked = results.neighbour_index.numpy(), similarity, results.neighbour_score.numpy()
    out = []
    for qi, q in enumerate(queries):
        hits = []
        for rank, (gi, s) in enumerate(zip(order[qi], scores[qi]), start=1):
            if gi < 0:
                continue
            hit: dict[str, Any] = {"rank": rank, "index": int(gi), "score": round(float(s), 6)}
            if args.rerank:
                hit["rerank_score"] = round(float(reranked[qi, rank - 1]), 6)
            if paths is not None:
                hit["path"] = paths[gi]
            if labels is not None:
                hit["label"] = int(labels[gi])
            if threshold is not None:
                hit["match"] = bool(float(s) >= threshold)
            hits.append(hit)
        entry: dict[str, Any] = {"query": str(q), "neighbours": hits}
        if threshold is not None:
            entry["threshold"] = threshold
        out.append(entry)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for r in out:
        print(f"query: {r['query']}" + (f"  (match threshold {threshold:.4f})" if threshold is not None else ""))
        for h in r["neighbours"]:
            where = h.get("path", f"row {h['index']}")
            label = f"  label {h['label']}" if "label" in h else ""
            verdict = ("  match" if h["match"] else "  no match") if "match" in h else ""
            print(f"  {h['rank']:>3}. {h['score']:.4f}  {where}{label}{verdict}")
    return 0
