"""Loss benchmark: forward+backward time of every deepmetric loss (and miner + loss pair) that
pytorch-metric-learning (PML) also has, as a ratio to PML measured in the same process, and the peak memory of
every loss at B=4096.

    python benchmarks/losses.py                  # B=180 and 1024, d=512, 1 and 2 threads; memory at B=4096
    python benchmarks/losses.py --small          # B=180 only, fewer reps, memory at B=1024
    python benchmarks/losses.py --only contrastive triplet --threads 1 --no-memory

Timing: for each case, ours, PML and the GEMM floor (below) alternate rep by rep (one warm-up call each first),
so that a load change on a shared machine hits all three alike; ``--rounds`` passes over the case list are
pooled. Reported: the median time of each, and the median (with quartiles) of the per-rep ratios ours/PML.

GEMM floor: L2-normalise, the similarity matrix through ``deepmetric.functional.gram_matrix`` (one GEMM) and
a plain sum, forward and backward (one more GEMM) — the part of every dense pair loss that no elementwise work
can remove. Its ratio to PML bounds the ratio a loss can reach on this host.

Memory: each loss runs one forward+backward at B=4096, d=512 in a fresh subprocess; the number is the peak
resident set size (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` just before the call) minus the
resident size before it, so imports, the inputs and the allocator's earlier peaks do not count.

Labels are m-per-class (4 per class), embeddings Gaussian, float32, CPU unless ``--device``. PML cases whose
index lists or masks would exceed ``--pml-max-elements`` (its O(B³) / O(P·N) paths) are skipped and say so.
Prints a table and writes ``benchmarks/results/losses.json`` (``losses_small.json`` with ``--small``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from deepmetric import losses as dm
from deepmetric import miners as dmm
from deepmetric.functional import gram_matrix, l2_normalize

PER_CLASS = 4
N_PROXY_CLASSES = 100
DIM = 512
SLOW_S = 20.0  # a function slower than this (PML's Python-side miners at large B) is timed once, not every rep

Fn = Callable[[torch.Tensor], torch.Tensor]


def _labels(b: int, device: torch.device) -> torch.Tensor:
    return torch.arange(b, device=device) // PER_CLASS % max(b // PER_CLASS, 1)


def _floor(x: torch.Tensor) -> torch.Tensor:
    xn = l2_normalize(x)
    return gram_matrix(xn, xn).sum()


def _proxy_floor(proxies: torch.Tensor) -> Fn:
    return lambda x: gram_matrix(l2_normalize(x), l2_normalize(proxies)).sum()


def cases(b: int, device: torch.device) -> Iterator[tuple[str, Fn, Fn | None, float, str, Fn | None]]:
    """(name, ours, PML or None, PML size in index elements, note, floor) for batch size ``b``."""
    import pytorch_metric_learning.losses as pl
    import pytorch_metric_learning.miners as pm

    y = _labels(b, device)
    n_pos, n_neg, cube = b * (PER_CLASS - 1), b * (b - PER_CLASS), float(b) ** 3

    def pair(name: str, ours: Fn, pml: Fn | None, size: float = 0.0, note: str = ""):
        return name, ours, pml, size, note, _floor

    ms, ms_nm, pml_ms = dm.MultiSimilarityLoss(), dm.MultiSimilarityLoss(mining=False), pl.MultiSimilarityLoss()
    ms_miner, pml_ms_miner = dmm.MultiSimilarityMiner(0.1), pm.MultiSimilarityMiner(0.1)
    yield pair("multi_similarity (built-in mining)", lambda x: ms(x, y), lambda x: pml_ms(x, y, pml_ms_miner(x, y)),
               note="PML: loss + MS miner")
    yield pair("multi_similarity (no mining)", lambda x: ms_nm(x, y), lambda x: pml_ms(x, y))
    yield pair("multi_similarity + ms_miner", lambda x: ms_nm(x, y, mined=ms_miner(x, y)),
               lambda x: pml_ms(x, y, pml_ms_miner(x, y)))
    c, pml_c = dm.ContrastiveLoss(), pl.ContrastiveLoss()
    yield pair("contrastive", lambda x: c(x, y), lambda x: pml_c(x, y))
    yield pair("contrastive + ms_miner", lambda x: c(x, y, mined=ms_miner(x, y)),
               lambda x: pml_c(x, y, pml_ms_miner(x, y)))
    t, pml_t = dm.TripletMarginLoss(0.05), pl.TripletMarginLoss(0.05)
    yield pair("triplet_margin (all triplets)", lambda x: t(x, y), lambda x: pml_t(x, y), cube, "PML: B³ mask")
    bh, pml_bh = dmm.BatchHardMiner(), pm.BatchHardMiner()
    yield pair("triplet_margin + batch_hard", lambda x: t(x, y, mined=bh(x, y)), lambda x: pml_t(x, y, pml_bh(x, y)))
    lo, pml_lo = dm.LiftedStructureLoss(), pl.LiftedStructureLoss()
    yield pair("lifted_structure (original)", lambda x: lo(x, y), lambda x: pml_lo(x, y), float(n_pos) * n_neg,
               "PML: P×N matrix")
    lg, pml_lg = dm.LiftedStructureLoss(variant="generalized"), pl.GeneralizedLiftedStructureLoss()
    yield pair("lifted_structure (generalized)", lambda x: lg(x, y), lambda x: pml_lg(x, y))
    m = dm.MarginLoss(num_classes=b).to(device)
    pml_m = pl.MarginLoss(learn_beta=True, num_classes=b).to(device)
    yield pair("margin (all triplets)", lambda x: m(x, y), lambda x: pml_m(x, y), cube, "PML: B³ mask")
    dw, pml_dw = dmm.DistanceWeightedMiner(seed=0), pm.DistanceWeightedMiner()
    yield pair("margin + distance_weighted", lambda x: m(x, y, mined=dw(x, y)), lambda x: pml_m(x, y, pml_dw(x, y)),
               note="PML miner: 1 negative per positive pair")
    nca, pml_nca = dm.NCALoss(), pl.NCALoss()
    yield pair("nca", lambda x: nca(x, y), lambda x: pml_nca(x, y))
    npair, pml_npair = dm.NPairLoss(), pl.NPairsLoss()
    yield "npair", lambda x: npair(x, y), lambda x: pml_npair(x, y), 0.0, "", None
    py = y % N_PROXY_CLASSES
    for name, ours_cls, pml_cls in [
        ("proxy_nca", dm.ProxyNCALoss, pl.ProxyNCALoss), ("proxy_anchor", dm.ProxyAnchorLoss, pl.ProxyAnchorLoss),
        ("normalized_softmax", dm.NormalizedSoftmaxLoss, pl.NormalizedSoftmaxLoss),
        ("arcface", dm.ArcFaceLoss, pl.ArcFaceLoss), ("soft_triple", dm.SoftTripleLoss, pl.SoftTripleLoss),
    ]:
        o, p = ours_cls(N_PROXY_CLASSES, DIM).to(device), pml_cls(N_PROXY_CLASSES, DIM).to(device)
        yield (name, (lambda x, o=o: o(x, py)), (lambda x, p=p: p(x, py)), 0.0, f"{N_PROXY_CLASSES} classes",
               _proxy_floor(o.proxies))


def _once(fn: Fn, emb: torch.Tensor) -> float:
    x = emb.clone().requires_grad_(True)
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(x).backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _time_interleaved(fns: list[Fn | None], emb: torch.Tensor, reps: int) -> list[list[float]]:
    """Seconds per rep of each function, alternating rep by rep after one warm-up call each."""
    fns = list(fns)
    times: list[list[float]] = [[] for _ in fns]
    for i, f in enumerate(fns):
        if f is not None and _once(f, emb) > SLOW_S:
            times[i].append(_once(f, emb))
            fns[i] = None
    for _ in range(reps):
        for i, f in enumerate(fns):
            if f is not None:
                times[i].append(_once(f, emb))
    return times


def _ratio(num: list[float], den: list[float]) -> tuple[float, float, float] | None:
    """Median and quartiles of the per-rep ratios (a slow path timed once: the ratio of the medians)."""
    if not num or not den:
        return None
    if len(num) != len(den):
        r = statistics.median(num) / statistics.median(den)
        return r, r, r
    ratios = sorted(a / b for a, b in zip(num, den))
    if len(ratios) == 1:
        return ratios[0], ratios[0], ratios[0]
    q1, q2, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q2, q1, q3


def run_timings(sizes: list[int], threads: list[int], reps: int, rounds: int, device: torch.device,
                pml_max: float, only: list[str] | None) -> list[dict]:
    pooled: dict[tuple[int, int, str], dict] = {}
    for _ in range(rounds):
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            for b in sizes:
                emb = torch.randn(b, DIM, generator=torch.Generator().manual_seed(0)).to(device)
                for name, ours, pml, size, note, floor in cases(b, device):
                    if only and not any(name.startswith(o) for o in only):
                        continue
                    if pml is not None and size > pml_max:
                        pml, note = None, f"{note}; PML skipped: ~{size:.1e} index elements".lstrip("; ")
                    times = _time_interleaved([ours, pml, floor if pml is not None else None], emb, reps)
                    entry = pooled.setdefault((n_threads, b, name), {"note": note, "times": [[], [], []]})
                    for acc, t in zip(entry["times"], times):
                        acc.extend(t)
    rows = []
    for (n_threads, b, name), entry in pooled.items():
        t_ours, t_pml, t_floor = entry["times"]
        ratio, floor_ratio = _ratio(t_ours, t_pml), _ratio(t_floor, t_pml)
        rows.append({
            "loss": name, "threads": n_threads, "B": b, "d": DIM, "note": entry["note"], "samples": len(t_ours),
            "ours_ms": 1e3 * statistics.median(t_ours),
            "pml_ms": 1e3 * statistics.median(t_pml) if t_pml else None,
            "floor_ms": 1e3 * statistics.median(t_floor) if t_floor else None,
            "ratio": ratio[0] if ratio else None, "ratio_q1": ratio[1] if ratio else None,
            "ratio_q3": ratio[2] if ratio else None, "floor_ratio": floor_ratio[0] if floor_ratio else None,
            "goal": 1.0 if name in PROXY_CASES else 0.5,
        })
    return rows


PROXY_CASES = {"proxy_nca", "proxy_anchor", "normalized_softmax", "arcface", "soft_triple"}

MEMORY_CASES = {
    "multi_similarity": "dm.MultiSimilarityLoss()(x, y)",
    "multi_similarity + ms_miner": "dm.MultiSimilarityLoss(mining=False)(x, y, mined=dmm.MultiSimilarityMiner()(x, y))",
    "weight": "dm.WeightLoss()(x, y)",
    "contrastive": "dm.ContrastiveLoss()(x, y)",
    "contrastive (similarity)": "dm.ContrastiveLoss(form='similarity')(x, y)",
    "contrastive + ms_miner": "dm.ContrastiveLoss()(x, y, mined=dmm.MultiSimilarityMiner()(x, y))",
    "triplet_margin (all triplets)": "dm.TripletMarginLoss()(x, y)",
    "triplet_margin + batch_hard": "dm.TripletMarginLoss()(x, y, mined=dmm.BatchHardMiner()(x, y))",
    "triplet_margin + semi_hard": "dm.TripletMarginLoss(0.2, squared=True)(x, y, mined=dmm.SemiHardMiner(seed=0)(x, y))",
    "lifted_structure (original)": "dm.LiftedStructureLoss()(x, y)",
    "lifted_structure (generalized)": "dm.LiftedStructureLoss(variant='generalized')(x, y)",
    "lifted_structure (modified)": "dm.LiftedStructureLoss(variant='modified', mining=True)(x, y)",
    "binomial_deviance": "dm.BinomialDevianceLoss()(x, y)",
    "margin (all triplets)": "dm.MarginLoss(num_classes=b)(x, y)",
    "margin + distance_weighted": "dm.MarginLoss(num_classes=b)(x, y, mined=dmm.DistanceWeightedMiner(seed=0)(x, y))",
    "nca": "dm.NCALoss()(x, y)",
    "npair": "dm.NPairLoss()(x, y)",
    "proxy_nca": "dm.ProxyNCALoss(100, 512)(x, y % 100)",
    "proxy_anchor": "dm.ProxyAnchorLoss(100, 512)(x, y % 100)",
    "normalized_softmax": "dm.NormalizedSoftmaxLoss(100, 512)(x, y % 100)",
    "arcface": "dm.ArcFaceLoss(100, 512)(x, y % 100)",
    "soft_triple": "dm.SoftTripleLoss(100, 512)(x, y % 100)",
}

# Subprocess code shared by the memory snippets (here and in rank_losses.py): reset the resident-set peak (VmHWM)
# to the current resident size and keep that size as ``base``; the snippet then runs its case and prints
# (VmHWM − base) in MiB.
PEAK_RESET = """
def status_kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status_kib("VmRSS")
"""
PEAK_PRINT = """print((status_kib("VmHWM") - base) / 1024.0)
"""

MEMORY_SNIPPET = """
import sys, torch
from deepmetric import losses as dm, miners as dmm
torch.manual_seed(0)
b, expr = int(sys.argv[1]), sys.argv[2]
x = torch.randn(b, 512, requires_grad=True)
y = torch.arange(b) // 4
small_x, small_y = x[:8].detach().requires_grad_(), y[:8]
def run(x, y):
    eval(expr).backward()
run(small_x, small_y)  # load lazily initialised kernels before measuring
""" + PEAK_RESET + """run(x, y)
""" + PEAK_PRINT


def run_memory(b: int, only: list[str] | None) -> list[dict]:
    rows = []
    for name, expr in MEMORY_CASES.items():
        if only and not any(name.startswith(o) for o in only):
            continue
        out = subprocess.run([sys.executable, "-c", MEMORY_SNIPPET, str(b), expr], capture_output=True, text=True,
                             check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        mib = float(out.stdout.strip().splitlines()[-1])
        rows.append({"loss": name, "B": b, "d": DIM, "peak_extra_mib": round(mib, 1), "under_2gb": mib < 2048})
        print(f"memory  {name:34s} B={b}: {mib:8.1f} MiB", flush=True)
    return rows


def host() -> dict:
    """What the ratios depend on besides the code: CPU model and vector extensions, torch's BLAS and threads."""
    model, flags = platform.processor(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = sorted({f for f in line.split(":", 1)[1].split()
                                if f.startswith(("avx512", "avx_vnni", "amx", "avx2", "fma"))})
                break
    except OSError:
        pass
    config = torch.__config__.show()

    def setting(pattern: str) -> str | None:
        found = re.search(pattern, config)
        return found.group(1).strip() if found else None

    return {"cpu_model": model, "cpu_flags": flags, "cpu_count": os.cpu_count(), "blas": setting(r"BLAS_INFO=([^,]+)"),
            "lapack": setting(r"LAPACK_INFO=([^,]+)"), "cpu_capability": setting(r"CPU capability usage: (\S+)"),
            "blas_library": setting(r"(Intel\(R\) oneAPI Math Kernel Library[^\n]*|OpenBLAS[^\n]*)"),
            "parallel": torch.__config__.parallel_info().splitlines()[1:4], "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine()}


def _fmt(r: dict) -> str:
    def num(v: float | None, fmt: str) -> str:
        return format(v, fmt) if v is not None else "-"

    spread = f"{r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}" if r["ratio"] is not None else "-"
    return (f"{r['loss']:34s} {r['threads']:>2d} {r['B']:5d} {r['ours_ms']:9.2f} {num(r['pml_ms'], '9.2f'):>9s} "
            f"{num(r['ratio'], '6.3f'):>6s} {spread:>9s} {num(r['floor_ratio'], '6.3f'):>6s}  {r['note']}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="B=180 only, 5 reps, 1 round, memory at B=1024")
    ap.add_argument("--sizes", type=int, nargs="*", default=None, help="batch sizes (default 180 1024)")
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2], help="torch CPU thread counts")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per case and round")
    ap.add_argument("--rounds", type=int, default=None, help="passes over the case list (times pooled)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", nargs="*", default=None, help="only the cases whose name starts with one of these")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--memory-batch", type=int, default=None, help="batch size of the memory runs (default 4096)")
    ap.add_argument("--pml-max-elements", type=float, default=3e8,
                    help="skip a PML case whose index lists/masks would exceed this many elements")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    sizes = args.sizes or ([180] if args.small else [180, 1024])
    reps = args.reps or (5 if args.small else 7)
    rounds = args.rounds or (1 if args.small else 2)
    out = Path(args.out or Path(__file__).parent / "results" / ("losses_small.json" if args.small else "losses.json"))
    load_before = os.getloadavg()
    rows = run_timings(sizes, args.threads, reps, rounds, device, args.pml_max_elements, args.only)
    print(f"{'loss':34s} {'th':>2s} {'B':>5s} {'ours ms':>9s} {'PML ms':>9s} {'ratio':>6s} {'q1-q3':>9s} "
          f"{'floor':>6s}  note")
    for r in rows:
        print(_fmt(r))
    memory_b = args.memory_batch or (1024 if args.small else 4096)
    memory = [] if args.no_memory else run_memory(memory_b, args.only)
    result = {
        "host": host(), "device": str(device), "sizes": sizes, "threads": args.threads, "repetitions": reps,
        "rounds": rounds, "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
        "protocol": ("ours / PML / GEMM floor interleaved rep by rep after one warm-up each, rounds pooled; time: "
                     "median; ratio: median and quartiles of the per-rep ratios ours/PML"),
        "memory_method": ("peak RSS (VmHWM after /proc/self/clear_refs) minus RSS before one forward+backward, "
                          "fresh subprocess per loss, 1 thread"),
        "timings": rows, "memory": memory,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    h = result["host"]
    print(f"host: {h['cpu_model']} ({', '.join(h['cpu_flags'])}), {h['cpu_count']} CPUs, BLAS {h['blas']}; "
          f"load average before {load_before[0]:.2f}, after {result['loadavg_after'][0]:.2f}; wrote {out}")


if __name__ == "__main__":
    main()
