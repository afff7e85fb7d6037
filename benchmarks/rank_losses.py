"""Rank-surrogate loss benchmark: forward+backward time of Smooth-AP and the Recall@k surrogate (with and without
SiMix) as a ratio to Multi-Similarity measured in the same process, and their peak memory at B = 1024 and 4096.

    python benchmarks/rank_losses.py                 # B=180 and 1024, d=512, 1 and 2 threads; memory at 1024, 4096
    python benchmarks/rank_losses.py --small         # B=180 only, fewer reps, memory at B=1024

Timing: MS (the library default, built-in mining) and each rank loss alternate rep by rep after one warm-up call
each, so a load change on a shared machine hits both alike. Reported: the median time of each and the median
(with quartiles) of the per-rep ratios loss / MS.

Memory: each case runs one forward+backward at d=512 in a fresh subprocess; the number is the peak resident set
size (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` just before the call) minus the resident size
before it. glibc's malloc serves every allocation ≥ 1 MiB by mmap (``MALLOC_MMAP_THRESHOLD_``), so a freed
block leaves the resident set at once and the peak is that of live memory: with glibc's dynamic threshold the
freed 32 MiB block tensors stayed on the heap and one case measured 0.6 GB in one run and 7 GB in the next.
Besides the default query blocks (2²³ (query, positive, item) triples), "one block" rows disable
blocking and the "64 per class" rows use 63 positives per query, where the triples would be 16× larger.

Labels are m-per-class (4 per class unless said), embeddings Gaussian, float32, CPU. Prints a table and writes
``benchmarks/results/rank_losses.json`` (``rank_losses_small.json`` with ``--small``) with the host of each part
(CPU model and flags, torch's BLAS, threads, load average before and after). ``--parts memory`` re-measures the
memory only and keeps the timing section of the existing file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from deepmetric import losses as dm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from losses import PEAK_PRINT, PEAK_RESET, host  # the loss benchmark's peak-memory code and host description

PER_CLASS = 4
DIM = 512
Fn = Callable[[torch.Tensor], torch.Tensor]

CASES = {
    "smooth_ap": "dm.SmoothAPLoss()",
    "recall_surrogate": "dm.RecallSurrogateLoss()",
    "recall_surrogate + simix": "dm.RecallSurrogateLoss(simix=True)",
}
BASELINE = "dm.MultiSimilarityLoss()"


def _labels(b: int, per_class: int = PER_CLASS) -> torch.Tensor:
    return torch.arange(b) // per_class


def _once(fn: Fn, emb: torch.Tensor) -> float:
    x = emb.clone().requires_grad_(True)
    t0 = time.perf_counter()
    fn(x).backward()
    return time.perf_counter() - t0


def run_timings(sizes: list[int], threads: list[int], reps: int) -> list[dict]:
    rows = []
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for b in sizes:
            emb = torch.randn(b, DIM, generator=torch.Generator().manual_seed(0))
            y = _labels(b)
            baseline = eval(BASELINE, {"dm": dm})
            for name, expr in CASES.items():
                loss = eval(expr, {"dm": dm})
                fns = [lambda x, loss=loss, y=y: loss(x, y), lambda x, base=baseline, y=y: base(x, y)]
                times: list[list[float]] = [[], []]
                for f in fns:
                    _once(f, emb)
                for _ in range(reps):
                    for i, f in enumerate(fns):
                        times[i].append(_once(f, emb))
                ratios = sorted(a / c for a, c in zip(*times))
                q1, q2, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
                row = {"loss": name, "B": b, "d": DIM, "threads": n_threads, "reps": reps,
                       "ms": 1e3 * statistics.median(times[0]), "baseline_ms": 1e3 * statistics.median(times[1]),
                       "ratio_to_ms": q2, "ratio_q1": q1, "ratio_q3": q3}
                rows.append(row)
                print(f"{name:26s} {n_threads:>2d} {b:5d} {row['ms']:10.2f} {row['baseline_ms']:10.2f} "
                      f"{q2:7.2f} {q1:5.2f}-{q3:<5.2f}", flush=True)
    return rows


MEMORY_SNIPPET = """
import sys, torch
from deepmetric import losses as dm
from deepmetric.losses.smooth_rank import smooth_ranks
b, per_class, expr = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
x = torch.randn(b, 512, generator=torch.Generator().manual_seed(0)).requires_grad_()
y = torch.arange(b) // per_class
loss = eval(expr)
small = x[:16].detach().requires_grad_()
loss(small, y[:16]).backward()  # load lazily initialised kernels first
s = torch.randn(4, 4, requires_grad=True)
pos = torch.eye(4)
ranks = smooth_ranks(s, pos, torch.ones(4, 4), 0.01, block_elements=1)  # and the checkpoint machinery
sum(r.sum() for r in ranks).backward()
""" + PEAK_RESET + """loss(x, y).backward()
""" + PEAK_PRINT


def memory_cases(sizes: list[int]) -> list[tuple[str, int, int, str]]:
    cases = []
    for b in sizes:
        cases.append(("multi_similarity", b, PER_CLASS, BASELINE))
        cases += [(name, b, PER_CLASS, expr) for name, expr in CASES.items()]
        cases.append(("smooth_ap (one block)", b, PER_CLASS, "dm.SmoothAPLoss(block_elements=2**40)"))
    big = max(sizes)
    cases.append(("smooth_ap, 64 per class", big, 64, "dm.SmoothAPLoss()"))
    cases.append(("recall_surrogate, 64 per class", big, 64, "dm.RecallSurrogateLoss()"))
    return cases


def run_memory(sizes: list[int]) -> list[dict]:
    rows = []
    for name, b, per_class, expr in memory_cases(sizes):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", MEMORY_SNIPPET, str(b), str(per_class), expr],
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(2**20)})
        mib = float(out.stdout.strip().splitlines()[-1])
        seconds = time.perf_counter() - t0
        rows.append({"loss": name, "B": b, "per_class": per_class, "d": DIM, "peak_extra_mib": round(mib, 1),
                     "subprocess_seconds": round(seconds, 1)})
        print(f"memory  {name:32s} B={b:5d} m={per_class:3d}: {mib:8.1f} MiB", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="B=180 only, 5 reps, memory at B=1024")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--parts", nargs="+", choices=["timing", "memory"], default=["timing", "memory"],
                        help="what to measure; a part not measured keeps its entries (and host) from the last JSON")
    args = parser.parse_args(argv)
    sizes = [180] if args.small else [180, 1024]
    reps = args.reps or (5 if args.small else 11)
    name = "rank_losses_small.json" if args.small else "rank_losses.json"
    out = Path(__file__).resolve().parent / "results" / name
    previous = json.loads(out.read_text()) if out.exists() else {}
    info = host()
    info["load_average"] = list(os.getloadavg())
    result = {"baseline": BASELINE, "per_class": PER_CLASS}
    for part in ("timing", "memory"):
        if part in args.parts:
            if part == "timing":
                print(f"{'loss':26s} th     B    loss ms      MS ms   ratio  quartiles", flush=True)
                result[part] = run_timings(sizes, args.threads, reps)
            else:
                result[part] = run_memory([1024] if args.small else [1024, 4096])
            result[f"{part}_host"] = {**info, "load_average_after": list(os.getloadavg())}
        elif part in previous:
            result[part], result[f"{part}_host"] = previous[part], previous.get(f"{part}_host")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
