"""Search-index scale benchmark: a 1,000,000 × 128 synthetic gallery (``--small``: 100,000).

Data: unit vectors x = normalise(c_y + σ·ε) around 10,000 random unit centres (100 items per centre on average),
and 1,000 held-out queries drawn the same way. Measured in one process (peak memory = ru_maxrss):

* exact: ``retrieve(queries, gallery=G, k=10)`` — the ground truth, and the streaming rate of the exact engine
  (queries per second against the full gallery, in bounded memory: one 256 MB score block at a time);
* IVF (faiss IndexIVFFlat, inner product, ``--nlist`` lists) built through ``SearchIndex.build``: build time, then
  for each nprobe the query throughput and recall@10 = mean |IVF top-10 ∩ exact top-10| / 10;
* the saved index size on disk and the load time of ``SearchIndex.load`` (checksums verified).

Usage: python benchmarks/index_scale.py [--small] [--threads 1] [--nlist 1024] [--nprobe 16 64 128 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from deepmetric.evaluation import retrieve
from deepmetric.evaluation.faiss_backend import overlap_at_k
from deepmetric.evaluation.index import SearchIndex

RESULTS = Path(__file__).resolve().parent / "results"


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_data(n: int, n_queries: int, dim: int, n_centres: int, sigma: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_centres, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(m: int) -> np.ndarray:
        # filled in slices, so generating the data does not set the process's memory high-water mark
        out = np.empty((m, dim), dtype=np.float32)
        for start in range(0, m, 65536):
            x = centres[rng.integers(0, n_centres, size=min(65536, m - start))]
            x += sigma * rng.standard_normal(x.shape, dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            out[start : start + x.shape[0]] = x
        return out

    return draw(n), draw(n_queries)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="100,000-item gallery")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 64, 128, 256])
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--sigma", type=float, default=0.08, help="per-dimension noise around the centres")
    p.add_argument("--output", default=None)
    args = p.parse_args()
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    n = 100_000 if args.small else 1_000_000
    base_mb = _maxrss_mb()
    t0 = time.perf_counter()
    g, q = make_data(n, args.queries, 128, 10_000, args.sigma)
    data_s = time.perf_counter() - t0
    data_mb = _maxrss_mb()

    t0 = time.perf_counter()
    exact = retrieve(q, gallery=g, k=10).neighbour_index
    exact_s = time.perf_counter() - t0
    exact_peak = _maxrss_mb()

    t0 = time.perf_counter()
    index = SearchIndex.build(g, kind="ivf", params={"nlist": args.nlist, "nprobe": args.nprobe[0]}, recall_sample=0)
    build_s = time.perf_counter() - t0
    rows = []
    for nprobe in args.nprobe:
        index.faiss_index.nprobe = nprobe
        t0 = time.perf_counter()
        approx = index.search(q, 10).neighbour_index
        seconds = time.perf_counter() - t0
        rows.append({"nprobe": nprobe, "seconds": seconds, "queries_per_s": args.queries / seconds,
                     "recall@10": overlap_at_k(exact, approx)})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        index.save(tmp)
        save_s = time.perf_counter() - t0
        size_mb = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 2**20
        t0 = time.perf_counter()
        SearchIndex.load(tmp)
        load_s = time.perf_counter() - t0

    report = {
        "benchmark": "index_scale", "small": args.small, "gallery": [n, 128], "queries": args.queries,
        "centres": 10_000, "sigma": args.sigma, "threads": args.threads, "nlist": args.nlist,
        "data_seconds": data_s,
        "exact": {"seconds": exact_s, "queries_per_s": args.queries / exact_s,
                  "gallery_rows_scored_per_s": args.queries * n / exact_s,
                  "peak_extra_mb_over_data": exact_peak - data_mb,
                  "full_self_evaluation_estimate_s": n * exact_s / args.queries},
        "ivf": {"build_seconds": build_s, "per_nprobe": rows, "save_seconds": save_s, "load_seconds": load_s,
                "size_on_disk_mb": size_mb},
        "peak_rss_mb": _maxrss_mb(), "rss_before_data_mb": base_mb, "data_mb": g.nbytes / 2**20,
        "load_average_at_end": os.getloadavg(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "faiss": faiss.__version__},
    }
    print(f"gallery {n:,} × 128 ({g.nbytes / 2**20:.0f} MB), {args.queries} queries, {args.threads} thread(s)")
    print(f"exact top-10: {exact_s:.2f} s = {args.queries / exact_s:.1f} queries/s "
          f"({args.queries * n / exact_s / 1e6:.0f} M scored pairs/s), peak +{exact_peak - data_mb:.0f} MB; "
          f"exact self-evaluation of all {n:,} would take ~{n * exact_s / args.queries / 60:.0f} min")
    print(f"IVF build (nlist {args.nlist}): {build_s:.1f} s; saved {size_mb:.0f} MB in {save_s:.1f} s, "
          f"loaded + verified in {load_s:.1f} s")
    print(f"{'nprobe':>6} {'queries/s':>10} {'recall@10':>10}")
    for r in rows:
        print(f"{r['nprobe']:>6} {r['queries_per_s']:>10.0f} {r['recall@10']:>10.4f}")
    print(f"peak RSS {report['peak_rss_mb']:.0f} MB")
    out = Path(args.output) if args.output else RESULTS / ("index_scale_small.json" if args.small else "index_scale.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
