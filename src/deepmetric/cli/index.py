"""``deepmetric index``: embed a gallery once and persist it as a search index for ``deepmetric search --index``.

Writes embeddings, labels, paths (image folders) and, for ``--kind ivf|hnsw``, a faiss index with its measured
recall against exact search (see :mod:`deepmetric.evaluation.index`). With ``--target-fmr`` the run's validation
split is embedded too and a "same item" similarity threshold is calibrated on it for that false-match rate
(:mod:`deepmetric.evaluation.verification`); ``search`` then answers match / no match.
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
    p.add_argument("--target-fmr", type=float, metavar="FMR",
                   help="calibrate a match threshold on the validation split for this false-match rate")
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
    from deepmetric.evaluation import retrieve
    from deepmetric.evaluation.verification import calibrate_threshold, pair_scores, threshold_report

    emb, labels, _ = embed_items(config, weights, split="val", batch_size=batch_size, device=device)
    if len(set(labels.tolist())) < 2:  # type: ignore[attr-defined]
        raise ValueError("the validation split needs at least two classes to calibrate a threshold")
    results = retrieve(emb, labels, k=min(100, len(emb) - 1), list_metrics=())  # type: ignore[arg-type]
    pairs = pair_scores(results, emb, negatives_per_query=negatives)
    threshold = calibrate_threshold(pairs, target_fmr)
    measured = threshold_report(pairs, threshold)
    return {"threshold": threshold, "target_fmr": target_fmr, "calibrated_on": "val",
            "val_fmr": measured["fmr"], "val_fmr_standard_error": measured["fmr_standard_error"],
            "val_fnmr": measured["fnmr"], "rule": "match iff cosine similarity ≥ threshold"}


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
        index = SearchIndex.build(emb, labels, paths, kind=args.kind, params=params,
                                  model=model_fingerprint(config, weights), info=info)
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
