"""Loss benchmark: median forward+backward time of every deepmetric loss vs its pytorch-metric-learning (PML)
equivalent in the same process, plus peak memory at B=4096 for MS, contrastive and triplet with a miner.

    python benchmarks/losses.py            # B=180 and B=1024, d=512, 15 reps; memory at B=4096
    python benchmarks/losses.py --small    # B=180 only, fewer repetitions, memory at B=1024
    python benchmarks/losses.py --only multi_similarity contrastive   # cases whose name starts with these

Timing protocol: torch threads pinned (``--threads``, default 1 so that a shared machine's other jobs disturb
less), one warm-up call each, then ours and PML alternate rep by rep (load changes hit both), median of
``--reps`` (≥ 15 by default). The machine's load average (os.getloadavg) is recorded before and after. The
ratio ours/PML is the number to read; absolute times on a loaded machine are not.

Prints a table and writes benchmarks/results/losses.json. Labels are m-per-class (4 per class), embeddings
Gaussian, float32, CPU unless --device is given. PML cases whose pair/triplet index lists would exceed
--pml-max-elements (its O(P·N) / O(B³) paths) are skipped and reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from deepmetric import losses as dm
from deepmetric import miners as dmm

PER_CLASS = 4
SLOW_PML_S = 20.0
N_PROXY_CLASSES = 100


def _labels(b: int, device: torch.device) -> torch.Tensor:
    return torch.arange(b, device=device) // PER_CLASS % max(b // PER_CLASS, 1)


def _once(fn: Callable[[torch.Tensor], torch.Tensor], emb: torch.Tensor) -> float:
    x = emb.clone().requires_grad_(True)
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(x).backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _time_pair(ours: Callable, pml: Callable | None, emb: torch.Tensor, reps: int) -> tuple[float, float | None]:
    """Median seconds of ours and PML, interleaved rep by rep so that load changes on a shared machine hit both."""
    _once(ours, emb)  # warm-up
    if pml is not None and _once(pml, emb) > SLOW_PML_S:
        # A PML path this slow (e.g. its Python-side miners at large B) is timed once more, not `reps` times.
        return statistics.median([_once(ours, emb) for _ in range(reps)]), _once(pml, emb)
    t_ours, t_pml = [], []
    for _ in range(reps):
        t_ours.append(_once(ours, emb))
        if pml is not None:
            t_pml.append(_once(pml, emb))
    return statistics.median(t_ours), (statistics.median(t_pml) if t_pml else None)


def cases(b: int, device: torch.device):
    """(name, ours(x) -> loss, pml(x) -> loss or None, pml size estimate in elements, note)."""
    import pytorch_metric_learning.losses as pl
    import pytorch_metric_learning.miners as pm

    y = _labels(b, device)
    py = y % N_PROXY_CLASSES  # proxy losses: labels in 0..C-1
    n_pos = b * (PER_CLASS - 1)
    n_neg = b * (b - PER_CLASS)
    cube = b * b * b
    d = 512

    def proxy_pair(ours_cls, pml_cls, **kw):
        o = ours_cls(N_PROXY_CLASSES, d, **kw).to(device)
        t = pml_cls(N_PROXY_CLASSES, d, **kw).to(device)
        return (lambda x: o(x, py)), (lambda x: t(x, py))

    ms_o, ms_p, ms_m = dm.MultiSimilarityLoss(), pl.MultiSimilarityLoss(), pm.MultiSimilarityMiner(0.1)
    yield "multi_similarity (+MS mining)", lambda x: ms_o(x, y), lambda x: ms_p(x, y, ms_m(x, y)), n_pos + n_neg, ""
    ms_nm = dm.MultiSimilarityLoss(mining=False)
    yield "multi_similarity (no mining)", lambda x: ms_nm(x, y), lambda x: ms_p(x, y), n_pos + n_neg, ""
    c_o, c_p = dm.ContrastiveLoss(), pl.ContrastiveLoss()
    yield "contrastive (distance)", lambda x: c_o(x, y), lambda x: c_p(x, y), n_pos + n_neg, ""
    cm_o, cm_p = dmm.MultiSimilarityMiner(0.1), pm.MultiSimilarityMiner(0.1)
    yield ("contrastive + ms_miner", lambda x: c_o(x, y, mined=cm_o(x, y)), lambda x: c_p(x, y, cm_p(x, y)),
           n_pos + n_neg, "")
    t_o, t_p = dm.TripletMarginLoss(0.05), pl.TripletMarginLoss(0.05)
    yield "triplet_margin (all triplets)", lambda x: t_o(x, y), lambda x: t_p(x, y), cube, "PML: B³ mask"
    bh_o, bh_p = dmm.BatchHardMiner(), pm.BatchHardMiner()
    yield ("triplet_margin + batch_hard", lambda x: t_o(x, y, mined=bh_o(x, y)),
           lambda x: t_p(x, y, bh_p(x, y)), n_pos + n_neg, "")
    l_o, l_p = dm.LiftedStructureLoss(), pl.LiftedStructureLoss()
    yield "lifted_structure (original)", lambda x: l_o(x, y), lambda x: l_p(x, y), n_pos * n_neg, "PML: P×N matrix"
    g_o, g_p = dm.LiftedStructureLoss(variant="generalized"), pl.GeneralizedLiftedStructureLoss()
    yield "lifted_structure (generalized)", lambda x: g_o(x, y), lambda x: g_p(x, y), n_pos + n_neg, ""
    lm = dm.LiftedStructureLoss(variant="modified")
    yield "lifted_structure (modified)", lambda x: lm(x, y), None, 0, "no PML equivalent"
    bd = dm.BinomialDevianceLoss()
    yield "binomial_deviance", lambda x: bd(x, y), None, 0, "no PML equivalent"
    m_o = dm.MarginLoss(num_classes=b).to(device)
    m_p = pl.MarginLoss(learn_beta=True, num_classes=b).to(device)
    yield "margin (all triplets)", lambda x: m_o(x, y), lambda x: m_p(x, y), cube, "PML: B³ mask"
    dw_o, dw_p = dmm.DistanceWeightedMiner(seed=0), pm.DistanceWeightedMiner()
    yield ("margin + distance_weighted", lambda x: m_o(x, y, mined=dw_o(x, y)),
           lambda x: m_p(x, y, dw_p(x, y)), n_pos + n_neg, "PML miner: 1 negative per positive pair")
    n_o, n_p = dm.NCALoss(), pl.NCALoss()
    yield "nca", lambda x: n_o(x, y), lambda x: n_p(x, y), b * b, ""
    w = dm.WeightLoss()
    yield "weight", lambda x: w(x, y), None, 0, "no PML equivalent"
    np_o, np_p = dm.NPairLoss(), pl.NPairsLoss()
    yield "npair", lambda x: np_o(x, y), lambda x: np_p(x, y), b * b, ""
    for name, oc, pc, kw in [
        ("proxy_nca", dm.ProxyNCALoss, pl.ProxyNCALoss, {}),
        ("proxy_anchor", dm.ProxyAnchorLoss, pl.ProxyAnchorLoss, {}),
        ("normalized_softmax", dm.NormalizedSoftmaxLoss, pl.NormalizedSoftmaxLoss, {}),
        ("arcface", dm.ArcFaceLoss, pl.ArcFaceLoss, {}),
        ("soft_triple", dm.SoftTripleLoss, pl.SoftTripleLoss, {}),
    ]:
        fo, fp = proxy_pair(oc, pc, **kw)
        yield name, fo, fp, b * N_PROXY_CLASSES, f"{N_PROXY_CLASSES} classes"


def run_timings(
    sizes: list[int], reps: int, device: torch.device, pml_max: float, only: list[str] | None = None,
) -> list[dict]:
    rows = []
    for b in sizes:
        emb = torch.randn(b, 512, generator=torch.Generator().manual_seed(0)).to(device)
        for name, ours, pml, size, note in cases(b, device):
            if only and not any(name.startswith(o) for o in only):
                continue
            if pml is not None and size > pml_max:
                pml = None
                note = (note + "; " if note else "") + f"PML skipped: ~{size:.1e} index elements"
            t_ours, t_pml = _time_pair(ours, pml, emb, reps)
            r = {"loss": name, "B": b, "d": 512, "ours_ms": 1e3 * t_ours, "note": note, "load1": os.getloadavg()[0],
                 "pml_ms": 1e3 * t_pml if t_pml is not None else None}
            r["ratio"] = r["ours_ms"] / r["pml_ms"] if r["pml_ms"] else None
            rows.append(r)
            print(_fmt(r), flush=True)
    return rows


def _fmt(r: dict) -> str:
    pml = f"{r['pml_ms']:9.2f}" if r["pml_ms"] is not None else "        -"
    ratio = f"{r['ratio']:6.3f}" if r["ratio"] is not None else "     -"
    return f"{r['loss']:34s} {r['B']:5d} {r['ours_ms']:9.2f} {pml} {ratio}  {r['note']}"


MEMORY_SNIPPET = """
import sys, torch
from deepmetric import losses as dm, miners as dmm
torch.manual_seed(0)
b, case = int(sys.argv[1]), sys.argv[2]
x = torch.randn(b, 512, requires_grad=True); y = torch.arange(b) // 4
dm.MultiSimilarityLoss()(x[:8], y[:8]).backward()  # load lazily-initialised kernels before measuring
def status_kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
try:  # reset the peak-RSS high-water mark (VmHWM) so that import-time peaks do not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
base = status_kib("VmRSS")
if case == "multi_similarity":
    dm.MultiSimilarityLoss()(x, y).backward()
elif case == "contrastive+ms_miner":
    dm.ContrastiveLoss()(x, y, mined=dmm.MultiSimilarityMiner()(x, y)).backward()
elif case == "triplet+semi_hard":
    dm.TripletMarginLoss(0.2, squared=True)(x, y, mined=dmm.SemiHardMiner(seed=0)(x, y)).backward()
elif case == "triplet (all triplets)":
    dm.TripletMarginLoss(0.05)(x, y).backward()
print((status_kib("VmHWM") - base) / 1024.0)
"""


def run_memory(b: int) -> list[dict]:
    """Peak RSS (VmHWM, reset before the call) above the pre-call RSS, in MiB, of one forward+backward in a fresh
    subprocess (Linux /proc)."""
    rows = []
    for case in ["multi_similarity", "contrastive+ms_miner", "triplet+semi_hard", "triplet (all triplets)"]:
        out = subprocess.run([sys.executable, "-c", MEMORY_SNIPPET, str(b), case], capture_output=True, text=True,
                             check=True)
        mib = float(out.stdout.strip().splitlines()[-1])
        rows.append({"case": case, "B": b, "d": 512, "peak_extra_mib": mib, "under_2gb": mib < 2048})
        print(f"memory {case:26s} B={b}: +{mib:8.1f} MiB", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="B=180 only, 5 repetitions, memory at B=1024")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per case (median reported)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (pinned)")
    ap.add_argument("--only", nargs="*", default=None, help="only the cases whose name starts with one of these")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--pml-max-elements", type=float, default=3e8,
                    help="skip a PML case whose index lists/masks would exceed this many elements")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "losses.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = [180] if args.small else [180, 1024]
    reps = args.reps or (5 if args.small else 15)
    load_before = os.getloadavg()
    print(f"{'loss':34s} {'B':>5s} {'ours ms':>9s} {'PML ms':>9s} {'ratio':>6s}  note")
    rows = run_timings(sizes, reps, device, args.pml_max_elements, args.only)
    mem = [] if args.no_memory else run_memory(1024 if args.small else 4096)
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    result = {
        "device": str(device), "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "cpu_count": os.cpu_count(), "repetitions": reps,
        "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
        "protocol": "median of reps, ours/PML interleaved per rep, one warm-up each, threads pinned",
        "timings": rows, "memory": mem,
        "median_ratio": statistics.median(ratios) if ratios else None,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    if result["median_ratio"] is not None:
        print(f"median ours/PML time ratio: {result['median_ratio']:.3f}")
    print(f"load average before {load_before}, after {result['loadavg_after']}; wrote {args.out}")


if __name__ == "__main__":
    main()
