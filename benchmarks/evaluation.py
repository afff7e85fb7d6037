"""Evaluation engine benchmark: deepmetric ``evaluate`` vs the bare GEMM bound vs PML AccuracyCalculator + faiss.

Data: synthetic, shaped like the real test sets.
* SOP-shaped: 60,502 × 512 float32, L2-normalised, 11,316 classes of 2–12 items; x = normalise(c_y + σ·ε) with
  random unit class centres c and σ tuned so the metrics are far from 0 and 1.
* In-Shop-shaped: 14,218 queries × 12,612 gallery items, 3,985 classes, every class in both sets.

Methods (b and c each in a fresh subprocess; peak memory = ru_maxrss after the first run − ru_maxrss after loading
the data):
  (a) gemm        blocked S = Q_b·Gᵀ with evaluate's default block size and padded gallery layout, nothing else
                  (the compute bound), timed in the same process as (b), alternating with it run by run (order
                  swapped every pair), after one untimed warm-up of each on the first 2,048 queries
  (b) deepmetric  evaluate(recall@{1,10,100,1000} (In-Shop: 1,10,20,30,40,50), r_precision, map@r)
  (c) pml+faiss   AccuracyCalculator(k="max_bin_count", precision_at_1 / r_precision / MAP@R) + Recall@K from a
                  faiss IndexFlatIP kNN with k = max K (+1 for the own row, removed by index)
  (d) profile     (optional, --profile) one evaluate with per-phase timers — the block top-k (knn.stable_topk)
                  and the rank counting (knn.count_ranked_before), summed over the worker threads (CPU seconds) —
                  next to the same-process GEMM, plus at one thread the self CPU time of the top torch operators
Every method runs at each thread count of --threads (default 1 and 2) in the same invocation, so b/a compares
deepmetric with the bare GEMM at the same thread count, in the same process and under the same machine load.
Reported: median wall time, b/a (target ≤ 1.15), b/c (target ≤ 0.5), peak memory beyond the embeddings
(target ≤ 1.5 GB), and the host (CPU model, AVX-512 or not, BLAS, load average before and after).

Usage: python benchmarks/evaluation.py [--small | --scale S] [--repeats N] [--inshop-repeats N] [--pml-repeats N]
       [--threads 1 2] [--cases sop inshop] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
#: queries of the untimed warm-up run of evaluate and of the GEMM in each deepmetric worker
WARM_UP_QUERIES = 2048


# ------------------------------------------------------------------------------------------------ data -----
def _class_sizes(rng: np.random.Generator, n_items: int, n_classes: int, lo: int, hi: int) -> np.ndarray:
    """n_classes sizes in [lo, hi] summing to n_items (start at lo, add one item to random non-full classes)."""
    if not n_classes * lo <= n_items <= n_classes * hi:
        raise ValueError("impossible class-size constraints")
    sizes = np.full(n_classes, lo, dtype=np.int64)
    while (left := n_items - int(sizes.sum())) > 0:
        open_ = np.flatnonzero(sizes < hi)
        picks = rng.choice(open_, size=min(left, open_.shape[0]), replace=False)
        sizes[picks] += 1
    return sizes


def _embed(rng: np.random.Generator, centres: np.ndarray, labels: np.ndarray, sigma: float) -> np.ndarray:
    x = centres[labels]
    x += sigma * rng.standard_normal(x.shape, dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_sop(n_items: int, n_classes: int, dim: int, sigma: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = _class_sizes(rng, n_items, n_classes, 2, 12)
    labels = rng.permutation(np.repeat(np.arange(n_classes, dtype=np.int64), sizes))
    centres = rng.standard_normal((n_classes, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    return _embed(rng, centres, labels, sigma), labels


def make_inshop(n_query: int, n_gallery: int, n_classes: int, dim: int, sigma: float, seed: int = 1):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    ql = rng.permutation(np.repeat(np.arange(n_classes), _class_sizes(rng, n_query, n_classes, 1, 12)))
    gl = rng.permutation(np.repeat(np.arange(n_classes), _class_sizes(rng, n_gallery, n_classes, 1, 12)))
    return _embed(rng, centres, ql, sigma), ql, _embed(rng, centres, gl, sigma), gl


# --------------------------------------------------------------------------------------------- workers -----
def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _run_gemm(q, ql, g, gl, recall_at):
    import torch

    from deepmetric.evaluation import default_chunk_size
    from deepmetric.evaluation.retrieval import DEFAULT_BLOCK_BYTES

    # exactly evaluate's operands: gallery rows padded to a multiple of 64 (an aligned leading dimension makes
    # sgemm markedly faster than n = 60,502) in a fresh torch allocation, queries = its first rows in
    # self-retrieval, same block size, output buffer reused
    g_raw = torch.from_numpy(q if g is None else g)
    n_pad = -(-g_raw.shape[0] // 64) * 64
    gt = g_raw.new_zeros(n_pad, g_raw.shape[1])
    gt[: g_raw.shape[0]] = g_raw
    qt = gt[: q.shape[0]] if g is None else torch.from_numpy(q).clone()
    b = default_chunk_size(qt.shape[0], n_pad, 4, DEFAULT_BLOCK_BYTES)
    buf = torch.empty(b, n_pad)
    for start in range(0, qt.shape[0], b):
        block = qt[start : start + b]
        torch.mm(block, gt.t(), out=buf[: block.shape[0]])
    return {}


def _run_deepmetric(q, ql, g, gl, recall_at):
    from deepmetric.evaluation import evaluate

    return evaluate(q, ql, g, gl, metrics=("recall", "precision@1", "r_precision", "map@r"), recall_at=recall_at)


def _run_pml(q, ql, g, gl, recall_at):
    import faiss
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    self_mode = g is None
    ref, ref_labels = (q, ql) if self_mode else (g, gl)
    calc = AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
                              k="max_bin_count")
    out = calc.get_accuracy(torch.from_numpy(q), torch.from_numpy(ql), torch.from_numpy(ref),
                            torch.from_numpy(ref_labels), ref_includes_query=self_mode)
    k = max(recall_at)
    index = faiss.IndexFlatIP(q.shape[1])
    index.add(ref)
    _, idx = index.search(q, k + int(self_mode))
    if self_mode:
        drop = idx == np.arange(q.shape[0])[:, None]
        drop[~drop.any(axis=1), -1] = True
        idx = idx[~drop].reshape(q.shape[0], k)
    rel = ref_labels[idx] == ql[:, None]
    has_rel = np.isin(ql, ref_labels) if not self_mode else np.bincount(ql)[ql] > 1
    first = np.where(rel.any(axis=1), rel.argmax(axis=1), k)[has_rel]
    out.update({f"recall@{kk}": float((first < kk).mean()) for kk in recall_at})
    return {key: float(v) for key, v in out.items()}


def _run_profile(q, ql, g, gl, recall_at):
    import threading

    import torch
    from torch.profiler import ProfilerActivity, profile

    from deepmetric.evaluation import retrieval

    phases: dict[str, float] = {"topk": 0.0, "count": 0.0}
    lock = threading.Lock()

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with lock:
                    phases[name] += time.perf_counter() - t0
        return wrapper

    originals = retrieval.stable_topk, retrieval.count_ranked_before
    retrieval.stable_topk, retrieval.count_ranked_before = timed("topk", originals[0]), timed("count", originals[1])
    try:
        t0 = time.perf_counter()
        _run_gemm(q, ql, g, gl, recall_at)
        gemm = time.perf_counter() - t0
        t0 = time.perf_counter()
        _run_deepmetric(q, ql, g, gl, recall_at)
        total = time.perf_counter() - t0
    finally:
        retrieval.stable_topk, retrieval.count_ranked_before = originals
    out = {"phase_s:gemm_same_process": gemm, "phase_s:evaluate": total, "phase_cpu_s:topk": phases["topk"],
           "phase_cpu_s:count": phases["count"]}
    if torch.get_num_threads() == 1:  # the profiler sees only the calling thread's operators
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _run_deepmetric(q, ql, g, gl, recall_at)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        share = sum(e.self_cpu_time_total for e in events) or 1
        out.update({f"self_cpu_share:{e.key}": e.self_cpu_time_total / share for e in events[:12]})
    return out


WORKERS = {"gemm": _run_gemm, "deepmetric": _run_deepmetric, "pml+faiss": _run_pml, "profile": _run_profile}


def _seconds(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def worker(method: str, data: str, repeats: int, recall_at: list[int], threads: int | None) -> None:
    arrays = np.load(data)
    q, ql = arrays["q"], arrays["ql"]
    g, gl = (arrays["g"], arrays["gl"]) if "g" in arrays else (None, None)
    import torch  # imported before the baseline so library code is not counted as memory

    import deepmetric.evaluation  # noqa: F401

    if method == "pml+faiss":
        import faiss
        import pytorch_metric_learning.utils.accuracy_calculator  # noqa: F401

        if threads:
            faiss.omp_set_num_threads(threads)
    if threads:
        torch.set_num_threads(threads)
    baseline = _maxrss_mb()
    warm_up: dict[str, float] = {}
    if method == "deepmetric":
        # untimed warm-up of both on the first queries: the first call in a process pays one-time costs, and
        # without it the first (evaluate, GEMM) pair was the slowest pair of every earlier run
        few = min(q.shape[0], WARM_UP_QUERIES)
        for name, fn in (("deepmetric", _run_deepmetric), ("gemm", _run_gemm)):
            warm_up[name] = _seconds(fn, q[:few], ql[:few], g, gl, recall_at)
    times, gemm_times, result, peak = [], [], {}, None
    for rep in range(repeats):
        if method == "deepmetric" and rep % 2 == 1:  # alternate the order so slow drift of the load cancels
            gemm_times.append(_seconds(_run_gemm, q, ql, g, gl, recall_at))
        t0 = time.perf_counter()
        result = WORKERS[method](q, ql, g, gl, recall_at)
        times.append(time.perf_counter() - t0)
        peak = _maxrss_mb() - baseline if peak is None else peak  # after the first full run
        if method == "deepmetric" and rep % 2 == 0:
            gemm_times.append(_seconds(_run_gemm, q, ql, g, gl, recall_at))
    print(json.dumps({"times": times, "gemm_times_same_process": gemm_times, "peak_extra_mb": peak,
                      "baseline_mb": baseline, "warm_up_s": warm_up, "metrics": result}))


def run_method(method: str, data: str, repeats: int, recall_at: list[int], threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--data", data, "--repeats", str(repeats),
           "--recall-at", *map(str, recall_at)] + (["--threads", str(threads)] if threads else [])
    # the OpenMP pools of torch and faiss start at this size, so nothing runs wider than asked
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} worker failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["median_s"] = statistics.median(res["times"])
    if res.get("gemm_times_same_process"):
        res["gemm_median_s"] = statistics.median(res["gemm_times_same_process"])
    return res


# ------------------------------------------------------------------------------------------------- main -----
def bench_case(
    name: str, arrays: dict, recall_at: list[int], repeats: int, pml_repeats: int, threads: list[int], profile: bool
) -> dict:
    per_threads = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data.npz")
        np.savez(data, **arrays)
        emb_mb = sum(a.nbytes for k, a in arrays.items() if k in ("q", "g")) / 2**20
        for t in threads:
            runs = {}
            plan = [("deepmetric", repeats), ("pml+faiss", pml_repeats)]
            if profile:
                plan.append(("profile", 1))
            for method, reps in plan:
                print(f"[{name}, {t} thread(s)] {method} × {reps} ...", file=sys.stderr, flush=True)
                runs[method] = run_method(method, data, reps, recall_at, t)
            dm = runs["deepmetric"]
            runs["gemm"] = {"times": dm["gemm_times_same_process"], "median_s": dm["gemm_median_s"],
                            "peak_extra_mb": float("nan"), "metrics": {}, "note": "same process as deepmetric"}
            a, b, c = (runs[m]["median_s"] for m in ("gemm", "deepmetric", "pml+faiss"))
            # the same-process runs alternate (evaluate, GEMM), so each pair saw about the same machine load: the
            # median of the per-pair ratios and the ratio of the fastest runs are less noisy than b/a on a shared VM
            pairs = [e / g for e, g in zip(dm["times"], dm["gemm_times_same_process"], strict=True)]
            per_threads[str(t)] = {
                "runs": runs, "ratio_b_over_a": b / a, "ratio_b_over_c": b / c,
                "ratio_b_over_a_paired_median": statistics.median(pairs), "ratio_b_over_a_paired": pairs,
                "ratio_b_over_a_fastest": min(dm["times"]) / min(dm["gemm_times_same_process"]),
                "targets": {"b/a<=1.15": b / a <= 1.15, "b/c<=0.5": b / c <= 0.5,
                            "deepmetric_peak<=1.5GB": runs["deepmetric"]["peak_extra_mb"] <= 1536},
            }
    return {
        "case": name,
        "shape": {k: list(v.shape) for k, v in arrays.items() if k in ("q", "g")},
        "n_classes": int(np.unique(arrays["ql"]).shape[0]),
        "embeddings_mb": emb_mb,
        "recall_at": recall_at,
        "threads": per_threads,
    }


def print_table(case: dict) -> None:
    print(f"\n{case['case']}: {case['shape']}, {case['n_classes']} classes, embeddings {case['embeddings_mb']:.0f} MB")
    print(f"{'threads':>7} {'method':<12} {'median s':>9} {'runs':>5} {'peak MB':>9}   metrics")
    for t, entry in case["threads"].items():
        for method, res in entry["runs"].items():
            if method == "profile":
                continue
            shown = {k: round(v, 4) for k, v in res["metrics"].items() if not k.startswith("n_")}
            print(f"{t:>7} {method:<12} {res['median_s']:>9.2f} {len(res['times']):>5} {res['peak_extra_mb']:>9.0f}"
                  f"   {shown}")
        print(f"{t:>7} b/a = {entry['ratio_b_over_a']:.3f} (target ≤ 1.15; per-pair median "
              f"{entry['ratio_b_over_a_paired_median']:.3f}, fastest/fastest {entry['ratio_b_over_a_fastest']:.3f})"
              f"   b/c = {entry['ratio_b_over_c']:.3f} (target ≤ 0.5)")
        if "profile" in entry["runs"]:
            prof = entry["runs"]["profile"]["metrics"]
            gemm, total = prof["phase_s:gemm_same_process"], prof["phase_s:evaluate"]
            print(f"{t:>7} phases: gemm {gemm:.2f} s, evaluate {total:.2f} s (non-GEMM {total - gemm:.2f} s); "
                  f"CPU s over workers: top-k {prof['phase_cpu_s:topk']:.2f}, rank counting "
                  f"{prof['phase_cpu_s:count']:.2f}")
            top = sorted(((k, v) for k, v in prof.items() if k.startswith("self_cpu_share:")), key=lambda kv: -kv[1])
            if top:
                print(f"{t:>7} operators: " + ", ".join(f"{k.split(':', 1)[1]} {100 * v:.1f}%" for k, v in top[:6]))


def host_info() -> dict:
    """CPU model, vector extensions and the BLAS torch uses: the ratios depend on all three."""
    import torch

    model, flags = platform.processor(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.processor()):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = line
    except OSError:
        pass
    config = torch.__config__.show()
    blas = next((ln.strip() for ln in config.splitlines() if "Math Kernel" in ln or "OpenBLAS" in ln), "")
    capability = next((ln.strip() for ln in config.splitlines() if "CPU capability" in ln), "")
    return {"platform": platform.platform(), "cpu_model": model, "cpus": os.cpu_count(),
            "avx512f": "avx512f" in flags.split(), "blas": blas, "torch_cpu_capability": capability,
            "torch": torch.__version__}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="6,000-item SOP-shaped case (= --scale 10), < 1 minute")
    p.add_argument("--scale", type=int, default=None, help="divide every size by this factor (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="runs of gemm and deepmetric (default 3, --small 2)")
    p.add_argument("--inshop-repeats", type=int, default=None,
                   help="runs of gemm and deepmetric on the In-Shop case, ~20× cheaper than SOP (default 7)")
    p.add_argument("--pml-repeats", type=int, default=None, help="runs of PML + faiss (default 1)")
    p.add_argument("--sigma", type=float, default=0.1, help="per-dimension noise scale of the synthetic data")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="thread counts to measure, each for every method (default: 1 2)")
    p.add_argument("--profile", action="store_true", help="also profile one evaluate per thread count")
    p.add_argument("--cases", nargs="+", choices=("sop", "inshop"), default=["sop", "inshop"],
                   help="which shapes to measure (default both)")
    p.add_argument("--output", default=None)
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--recall-at", type=int, nargs="+", default=[1, 10, 100, 1000], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.data, args.repeats, args.recall_at, args.threads[0])
        return
    repeats = args.repeats or (2 if args.small else 3)
    pml_repeats = args.pml_repeats or 1
    scale = args.scale or (10 if args.small else 1)
    load_before = os.getloadavg()
    inshop_repeats = args.inshop_repeats or args.repeats or (2 if args.small else 7)
    cases = []
    if "sop" in args.cases:
        x, y = make_sop(60502 // scale, 11316 // scale, 512, args.sigma)
        cases.append(bench_case("sop", {"q": x, "ql": y}, [1, 10, 100, 1000], repeats, pml_repeats, args.threads,
                                args.profile))
        del x, y
    if "inshop" in args.cases:
        q, ql, g, gl = make_inshop(14218 // scale, 12612 // scale, 3985 // scale, 512, args.sigma)
        cases.append(bench_case("inshop", {"q": q, "ql": ql, "g": g, "gl": gl}, [1, 10, 20, 30, 40, 50],
                                inshop_repeats, pml_repeats, args.threads, args.profile))
    report = {
        "benchmark": "evaluation",
        "small": args.small,
        "scale": scale,
        "sigma": args.sigma,
        "threads": args.threads,
        "repeats": {"sop": repeats, "inshop": inshop_repeats},
        "load_average_before": load_before,
        "load_average_at_end": os.getloadavg(),
        "machine": host_info(),
        "cases": cases,
    }
    for case in cases:
        print_table(case)
    default_name = "evaluation.json" if scale == 1 else ("evaluation_small.json" if scale == 10 else
                                                          f"evaluation_scale{scale}.json")
    if len(args.cases) == 1:
        default_name = default_name.replace("evaluation", f"evaluation_{args.cases[0]}")
    out = Path(args.output) if args.output else RESULTS / default_name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
