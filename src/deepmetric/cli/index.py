"""``deepmetric index``: embed a gallery once and persist it as a search index for ``deepmetric search --index``.

Writes embeddings, labels, paths (image folders), every item's exact top-k gallery neighbours (``--neighbour-k``,
for re-ranking at search time) and, for ``--kind ivf|hnsw``, a faiss index with its measured recall against exact
search (see :mod:`deepmetric.evaluation.index`). With ``--target-fmr`` the run's validation
split is embedded too and a "same item" similarity threshold is calibrated on it for that false-match rate
(:mod:`deepmetric.evaluation.verification`); without it the threshold the training run saved
(``verification.json`` in the run directory) is copied. ``search`` then answers match / no match.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Any

from deepmetric.cli.embed import add_model_and_items_arguments


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "index",
        help="embed a split or an image folder once and save it as a search index",
        description="Embed a gallery with a trained model and write a persisted search index (exact, IVF or "
        "HNSW) that `deepmetric search --index` loads without re-embedding the gallery.",
    )
    add_model_and_items_arguments(p, "index")
    p.add_argument("--output", required=True, metavar="INDEX_DIR", help="folder to write the index into")
    p.add_argument("--kind", choices=("exact", "ivf", "hnsw"), default="exact",
                   help="exact (no faiss needed) or an approximate faiss index (default exact)")
    p.add_argument("--nlist", type=int, help="IVF: inverted lists (default 4·√N)")
    p.add_argument("--nprobe", type=int, help="IVF: lists visited per query")
    p.add_argument("--hnsw-m", type=int, help="HNSW: links per node (default 32)")
    p.add_argument("--ef-search", type=int, help="HNSW: search breadth (default 128)")
    p.add_argument("--neighbour-k", type=int, default=32, metavar="K",
                   help="store every gallery item's exact top-K gallery neighbours, so that `search --rerank dba|"
                   "kreciprocal` needs no gallery-against-gallery search (default 32, ≥ k-reciprocal's k1 = 20; "
                   "0 = none)")
    p.add_argument("--target-fmr", type=float, metavar="FMR",
                   help="calibrate a match threshold on the validation split for this false-match rate (default: "
                   "copy the run's verification.json, written at the end of training, when there is one)")
    p.add_argument("--negatives", type=int, default=64, help="sampled impostors per query for the calibration")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's data.eval_batch_size")
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=run)


def model_fingerprint(config: Any, weights: Path) -> dict[str, Any]:
    """What identifies the model that embedded a gallery: its weights' SHA-256, embedding size and backbone."""
    digest = hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    return {"weights_sha256": digest, "embedding_size": int(config.model.embedding_size),
            "backbone": str(config.model.backbone)}


def calibrate(config: Any, weights: Path, target_fmr: float, negatives: int, batch_size: int | None,
              device: str) -> dict[str, Any]:
    """Threshold for ``target_fmr`` on the validation split, with what it measured there."""
    from deepmetric.cli.embed import embed_items
    from deepmetric.evaluation.verification import calibrate_on_split

    emb, labels, _ = embed_items(config, weights, split="val", batch_size=batch_size, device=device)
    return calibrate_on_split(emb, labels, target_fmr, split="val", negatives_per_query=negatives)


def run_threshold(run_dir: str | None) -> dict[str, Any] | None:
    """The match threshold a training run saved beside its results (``verification.json``), if any."""
    from deepmetric.evaluation.verification import THRESHOLD_FILE, read_threshold

    if not run_dir or not (Path(run_dir) / THRESHOLD_FILE).is_file():
        return None
    return {**read_threshold(Path(run_dir) / THRESHOLD_FILE), "source": str(Path(run_dir) / THRESHOLD_FILE)}


def run(args: argparse.Namespace) -> int:
    from deepmetric.cli.embed import embed_items, resolve_model_source
    from deepmetric.evaluation.index import SearchIndex
    from deepmetric.training.config import ConfigError

    params = {key: value for key, value in (("nlist", args.nlist), ("nprobe", args.nprobe),
                                            ("hnsw_m", args.hnsw_m), ("ef_search", args.ef_search))
              if value is not None}
    try:
        if args.target_fmr is not None and not 0 < args.target_fmr < 1:
            raise ValueError(f"--target-fmr must be in (0, 1), got {args.target_fmr}")
        config, weights = resolve_model_source(args)
        emb, labels, paths = embed_items(config, weights, split=args.split, images=args.images,
                                         batch_size=args.batch_size, device=args.device)
        info: dict[str, Any] = {"source": {"split": args.split} if args.split else {"images": str(args.images)},
                                "run_dir": str(Path(args.run_dir).resolve()) if args.run_dir else None}
        if args.target_fmr is not None:
            info["threshold"] = calibrate(config, weights, args.target_fmr, args.negatives, args.batch_size,
                                          args.device)
        elif (saved := run_threshold(args.run_dir)) is not None:
            info["threshold"] = saved  # the one the training run calibrated for this model
        if args.neighbour_k < 0:
            raise ValueError(f"--neighbour-k must be ≥ 0, got {args.neighbour_k}")
        index = SearchIndex.build(emb, labels, paths, kind=args.kind, params=params,
                                  model=model_fingerprint(config, weights), info=info, neighbour_k=args.neighbour_k)
        out = index.save(args.output)
    except (ConfigError, FileNotFoundError, ValueError, KeyError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"indexed {index.meta['n_items']} items of dimension {index.dim} ({args.kind}) in {out}")
    if "recall" in index.meta:
        print("approximate index recall against exact search: "
              + ", ".join(f"{k} {v:.4f}" for k, v in index.meta["recall"].items() if k.startswith("recall@")))
    if index.threshold is not None:
        t = index.meta["threshold"]
        print(f"match threshold {t['threshold']:.4f} (validation FMR {t['val_fmr']:.2e}, FNMR {t['val_fnmr']:.4f})")
    return 0
