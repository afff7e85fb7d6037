"""Re-ranking and verification on the KanjiGlyphs test split, from a trained run (the demo model).

Inputs: a run directory written by ``deepmetric train`` (its ``test_embeddings.npy`` / ``test_labels.npy``) and
the validation split embedded by ``deepmetric embed --run RUN --split val --output VAL_DIR``.

* Re-ranking: MAP@R, R-Precision and Recall@1 of the exact top-k lists (k = --list-size) before and after αQE,
  DBA and k-reciprocal re-ranking (deepmetric.evaluation.rerank), with each method's wall time.
* Verification: thresholds calibrated on the validation split for FMR 1e-2 / 1e-3 / 1e-4 and applied to the
  test split (measured FMR ± standard error, FNMR), plus test ROC AUC, EER and FNMR@FMR with test-chosen
  thresholds (deepmetric.evaluation.verification; estimator in its docstring).

Usage:
    deepmetric train --output runs/demo && deepmetric embed --run runs/demo --split val --output runs/demo-val
    python benchmarks/retrieval_toolkit.py --run runs/demo --val runs/demo-val [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from deepmetric.evaluation import retrieve
from deepmetric.evaluation.rerank import RERANKERS, rerank
from deepmetric.evaluation.verification import (
    DEFAULT_FMRS,
    calibrate_threshold,
    pair_scores,
    threshold_report,
    verification_metrics,
)

RESULTS = Path(__file__).resolve().parent / "results"
PARAMS = {"aqe": {"n": 2, "alpha": 3.0}, "dba": {"n": 2, "alpha": 3.0},
          "kreciprocal": {"k1": 20, "k2": 6, "lambda_value": 0.3}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory with test_embeddings.npy / test_labels.npy")
    p.add_argument("--val", required=True, help="folder with embeddings.npy / labels.npy of the validation split")
    p.add_argument("--list-size", type=int, default=100, help="neighbours kept and re-ranked per query")
    p.add_argument("--negatives", type=int, default=64, help="sampled unlisted impostors per query")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=str(RESULTS / "retrieval_toolkit.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    x, y = np.load(run / "test_embeddings.npy"), np.load(run / "test_labels.npy")
    vx, vy = np.load(Path(args.val) / "embeddings.npy"), np.load(Path(args.val) / "labels.npy")
    metrics = ("precision@1", "r_precision", "map@r")

    t0 = time.perf_counter()
    base = retrieve(x, y, k=args.list_size, list_metrics=metrics)
    search_s = time.perf_counter() - t0
    rows = {"exact (no re-ranking)": {**_means(base), "seconds": search_s}}
    for name in RERANKERS:
        t0 = time.perf_counter()
        out = rerank(base, name, x, **PARAMS[name])
        rows[name] = {**_means(out), "seconds": time.perf_counter() - t0, "params": PARAMS[name]}

    t0 = time.perf_counter()
    val_res = retrieve(vx, vy, k=args.list_size, list_metrics=())
    val_pairs = pair_scores(val_res, vx, negatives_per_query=args.negatives, seed=0)
    test_pairs = pair_scores(base, x, negatives_per_query=args.negatives, seed=1)
    calibrated = {}
    for fmr in DEFAULT_FMRS:
        t = calibrate_threshold(val_pairs, fmr)
        calibrated[f"{fmr:g}"] = {"threshold_from_val": t, "val": threshold_report(val_pairs, t),
                                  "test": threshold_report(test_pairs, t)}
    verification = {"test": verification_metrics(test_pairs), "calibrated_on_val": calibrated,
                    "seconds": time.perf_counter() - t0}

    report = {
        "benchmark": "retrieval_toolkit",
        "data": {"test": list(x.shape), "test_classes": int(np.unique(y).shape[0]), "val": list(vx.shape),
                 "val_classes": int(np.unique(vy).shape[0]), "run": str(run)},
        "list_size": args.list_size, "negatives_per_query": args.negatives, "threads": args.threads,
        "load_average_at_end": os.getloadavg(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "reranking": rows,
        "verification": verification,
    }
    print(f"test {x.shape}, {report['data']['test_classes']} classes; lists of {args.list_size}")
    print(f"{'method':<24} {'MAP@R':>7} {'R-Prec':>7} {'R@1':>7} {'seconds':>8}")
    for name, r in rows.items():
        print(f"{name:<24} {100 * r['map@r']:>7.2f} {100 * r['r_precision']:>7.2f} {100 * r['recall@1']:>7.2f} "
              f"{r['seconds']:>8.2f}")
    v = verification["test"]
    print(f"\ntest ROC AUC {v['roc_auc']:.5f}, EER {100 * v['eer']:.3f} %")
    print(f"{'target FMR':>10} {'t (val)':>9} {'test FMR':>10} {'± SE':>9} {'test FNMR':>10} {'FNMR@FMR test-chosen':>21}")
    for fmr, c in calibrated.items():
        print(f"{fmr:>10} {c['threshold_from_val']:>9.4f} {c['test']['fmr']:>10.2e} {c['test']['fmr_standard_error']:>9.1e} "
              f"{100 * c['test']['fnmr']:>9.2f}% {100 * v[f'fnmr@fmr={fmr}']:>20.2f}%")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten {out}")


def _means(res) -> dict[str, float]:
    m = res.metrics(recall_at=(1,))
    return {k: m[k] for k in ("recall@1", "precision@1", "r_precision", "map@r")}


if __name__ == "__main__":
    main()
