"""Loss benchmark: median forward+backward time of every deepmetric loss vs its pytorch-metric-learning (PML)
equivalent in the same process, plus peak memory at B=4096 for MS, contrastive and triplet with a miner.

    python benchmarks/losses.py            # B=180 and B=1024, d=512, 3 rounds × 7 reps; memory at B=4096
    python benchmarks/losses.py --small    # B=180 only, one round of 5 reps, memory at B=1024
    python benchmarks/losses.py --only multi_similarity contrastive   # cases whose name starts with these

Timing protocol: torch threads pinned (``--threads``, default 1 so that a shared machine's other jobs disturb
less). ``--rounds`` passes over the case list; in each, one warm-up call per function, then ours, PML and the
floor alternate rep by rep for ``--reps`` reps. Times are the median over all reps of all rounds; the ratio is
the median of the per-rep ratios ours/PML (each pair timed back to back, so a load change between reps cancels),
printed with its quartiles. On a shared 2-core VM a ratio still moves by about ±10% between runs: read the
quartiles. The machine's load average (os.getloadavg) is recorded before and after.

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


class _GemmFloor(torch.autograd.Function):
    """The work every exact loss on a dense similarity matrix must do, and nothing else: normalise x (and the
    references), S = x̂ r̂ᵀ, one read of S (value = ΣS); backward with an all-ones ∂L/∂S (dense, written once):
    (G + Gᵀ)·x̂ for a self comparison, G·r̂ and Gᵀ·x̂ with separate references, and the normalisation backward.
    Its time over PML's is the lowest ratio any implementation with a dense gradient can reach on this CPU."""

    @staticmethod
    def forward(ctx, x, r):  # type: ignore[override]
        ix = torch.linalg.vector_norm(x, dim=1, keepdim=True).reciprocal_()
        xn = x * ix
        if r is None:
            rn, ir = xn, ix
        else:
            ir = torch.linalg.vector_norm(r, dim=1, keepdim=True).reciprocal_()
            rn = r * ir
        ctx.save_for_backward(xn, rn, ix, ir)
        ctx.same = r is None
        b = xn.shape[0]
        if ctx.same and b >= 256 and xn.device.type == "cpu":
            # a self comparison needs only 3/4 of the products (top rows × all, bottom-right block, mirror)
            h = b // 2
            s = xn.new_empty(b, b)
            torch.mm(xn[:h], xn.t(), out=s[:h])
            torch.mm(xn[h:], xn[h:].t(), out=s[h:, h:])
            s[h:, :h].copy_(s[:h, h:].t())
            return s.sum()
        return torch.mm(xn, rn.t()).sum()

    @staticmethod
    def backward(ctx, go):  # type: ignore[override]
        xn, rn, ix, ir = ctx.saved_tensors
        g = torch.ones(xn.shape[0], rn.shape[0], dtype=xn.dtype, device=xn.device)

        def unnormalise(gn: torch.Tensor, n: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
            return gn.addcmul_(n, torch.linalg.vecdot(n, gn).unsqueeze(1), value=-1.0).mul_(inv)

        if ctx.same:
            return unnormalise(torch.mm(g.t().contiguous().add_(g), xn), xn, ix), None
        return unnormalise(torch.mm(g, rn), xn, ix), unnormalise(torch.mm(g.t(), xn), rn, ir)


class _NPairFloor(torch.autograd.Function):
    """The least an exact N-pair loss computes once its (anchor, positive) rows are known (their selection is
    done outside the timing, free): gather and normalise the 2C rows, the C×C logits GEMM, log-sum-exp minus the
    diagonal; backward: softmax − I, the two C×d GEMMs, the normalisation backward, one copy into a zero B×d
    gradient. At small B this is a few dozen small operations, and their fixed cost is the floor."""

    @staticmethod
    def forward(ctx, x, rows):  # type: ignore[override]
        z = x.index_select(0, rows)
        inv = torch.linalg.vector_norm(z, dim=1, keepdim=True).reciprocal_()
        zn = z.mul_(inv)
        n = rows.shape[0] // 2
        logits = torch.mm(zn[:n], zn[n:].t())
        e = logits.exp()
        s = e.sum(1)
        ctx.save_for_backward(zn, e, s, inv, rows)
        ctx.b = x.shape[0]
        return (s.log().sum() - logits.diagonal().sum()) / n

    @staticmethod
    def backward(ctx, go):  # type: ignore[override]
        zn, e, s, inv, rows = ctx.saved_tensors
        n = e.shape[0]
        w = e.div_(s.unsqueeze(1) * n)
        w.diagonal().sub_(1.0 / n)
        g = torch.empty_like(zn)
        torch.mm(w, zn[n:], out=g[:n])
        torch.mm(w.t(), zn[:n], out=g[n:])
        g.addcmul_(zn, torch.linalg.vecdot(zn, g).unsqueeze(1), value=-1.0).mul_(inv * go)
        return g.new_zeros(ctx.b, g.shape[1]).index_copy_(0, rows, g), None


def _npair_rows(labels: torch.Tensor) -> torch.Tensor:
    """The first and second row of every label with two or more rows: anchors, then their positives."""
    seen: dict[int, list[int]] = {}
    for i, y in enumerate(labels.tolist()):
        seen.setdefault(y, []).append(i)
    pairs = [r[:2] for r in seen.values() if len(r) >= 2]
    return torch.tensor([p[0] for p in pairs] + [p[1] for p in pairs], device=labels.device)


def _floor(kind: str, b: int, device: torch.device) -> Callable | None:
    """The floor of a case: ``self`` (B×B GEMMs), ``proxies`` (B×C with learnable C×d), ``npair`` (the minimal
    N-pair computation), or None (not binding)."""
    if kind == "self":
        return lambda x: _GemmFloor.apply(x, None)
    if kind == "npair":
        rows = _npair_rows(_labels(b, device))
        return lambda x: _NPairFloor.apply(x, rows)
    n_ref = {"proxies": N_PROXY_CLASSES, "proxies10": 10 * N_PROXY_CLASSES}.get(kind)
    if n_ref is None:
        return None
    w = torch.randn(n_ref, 512, device=device, requires_grad=True)
    return lambda x: _GemmFloor.apply(x, w)


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


def _time_cases(fns: list[Callable | None], emb: torch.Tensor, reps: int) -> list[list[float]]:
    """Seconds of each function (ours, PML, floor) per rep, interleaved rep by rep so that load changes on a shared
    machine hit all of them alike (one warm-up call each first)."""
    fns = list(fns)
    first = [None if f is None else _once(f, emb) for f in fns]  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for i, t in enumerate(first):
        if t is not None and t > SLOW_PML_S:
            # A path this slow (PML's Python-side miners at large B) is timed once more, not `reps` times.
            times[i].append(_once(fns[i], emb))
            fns[i] = None
    for _ in range(reps):
        for i, f in enumerate(fns):
            if f is not None:
                times[i].append(_once(f, emb))
    return times


def _paired_ratio(num: list[float], den: list[float]) -> tuple[float, float, float] | None:
    """Median and quartiles of num_i / den_i over the reps both were timed in (adjacent in time, so a load change
    between reps cancels); the median of the two medians' ratio when they were not timed alike (a slow PML path
    timed once)."""
    if not num or not den:
        return None
    if len(num) != len(den):
        r = statistics.median(num) / statistics.median(den)
        return r, r, r
    ratios = sorted(a / b for a, b in zip(num, den))
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
    return q[1], q[0], q[2]


def cases(b: int, device: torch.device):
    """(name, ours(x) -> loss, pml(x) -> loss or None, pml size estimate in elements, note, floor kind)."""
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
    yield ("multi_similarity (+MS mining)", lambda x: ms_o(x, y), lambda x: ms_p(x, y, ms_m(x, y)), n_pos + n_neg, "",
           "self")
    ms_nm = dm.MultiSimilarityLoss(mining=False)
    yield "multi_similarity (no mining)", lambda x: ms_nm(x, y), lambda x: ms_p(x, y), n_pos + n_neg, "", "self"
    c_o, c_p = dm.ContrastiveLoss(), pl.ContrastiveLoss()
    yield "contrastive (distance)", lambda x: c_o(x, y), lambda x: c_p(x, y), n_pos + n_neg, "", "self"
    cm_o, cm_p = dmm.MultiSimilarityMiner(0.1), pm.MultiSimilarityMiner(0.1)
    yield ("contrastive + ms_miner", lambda x: c_o(x, y, mined=cm_o(x, y)), lambda x: c_p(x, y, cm_p(x, y)),
           n_pos + n_neg, "", "self")
    t_o, t_p = dm.TripletMarginLoss(0.05), pl.TripletMarginLoss(0.05)
    yield "triplet_margin (all triplets)", lambda x: t_o(x, y), lambda x: t_p(x, y), cube, "PML: B³ mask", "self"
    bh_o, bh_p = dmm.BatchHardMiner(), pm.BatchHardMiner()
    yield ("triplet_margin + batch_hard", lambda x: t_o(x, y, mined=bh_o(x, y)),
           lambda x: t_p(x, y, bh_p(x, y)), n_pos + n_neg, "", "self")
    l_o, l_p = dm.LiftedStructureLoss(), pl.LiftedStructureLoss()
    yield ("lifted_structure (original)", lambda x: l_o(x, y), lambda x: l_p(x, y), n_pos * n_neg, "PML: P×N matrix",
           "self")
    g_o, g_p = dm.LiftedStructureLoss(variant="generalized"), pl.GeneralizedLiftedStructureLoss()
    yield "lifted_structure (generalized)", lambda x: g_o(x, y), lambda x: g_p(x, y), n_pos + n_neg, "", "self"
    lm = dm.LiftedStructureLoss(variant="modified")
    yield "lifted_structure (modified)", lambda x: lm(x, y), None, 0, "no PML equivalent", None
    bd = dm.BinomialDevianceLoss()
    yield "binomial_deviance", lambda x: bd(x, y), None, 0, "no PML equivalent", None
    m_o = dm.MarginLoss(num_classes=b).to(device)
    m_p = pl.MarginLoss(learn_beta=True, num_classes=b).to(device)
    yield "margin (all triplets)", lambda x: m_o(x, y), lambda x: m_p(x, y), cube, "PML: B³ mask", "self"
    dw_o, dw_p = dmm.DistanceWeightedMiner(seed=0), pm.DistanceWeightedMiner()
    yield ("margin + distance_weighted", lambda x: m_o(x, y, mined=dw_o(x, y)),
           lambda x: m_p(x, y, dw_p(x, y)), n_pos + n_neg, "PML miner: 1 negative per positive pair", "self")
    n_o, n_p = dm.NCALoss(), pl.NCALoss()
    yield "nca", lambda x: n_o(x, y), lambda x: n_p(x, y), b * b, "", "self"
    w = dm.WeightLoss()
    yield "weight", lambda x: w(x, y), None, 0, "no PML equivalent", None
    np_o, np_p = dm.NPairLoss(), pl.NPairsLoss()
    yield "npair", lambda x: np_o(x, y), lambda x: np_p(x, y), b * b, "", "npair"
    for name, oc, pc, kw in [
        ("proxy_nca", dm.ProxyNCALoss, pl.ProxyNCALoss, {}),
        ("proxy_anchor", dm.ProxyAnchorLoss, pl.ProxyAnchorLoss, {}),
        ("normalized_softmax", dm.NormalizedSoftmaxLoss, pl.NormalizedSoftmaxLoss, {}),
        ("arcface", dm.ArcFaceLoss, pl.ArcFaceLoss, {}),
        ("soft_triple", dm.SoftTripleLoss, pl.SoftTripleLoss, {}),
    ]:
        fo, fp = proxy_pair(oc, pc, **kw)
        floor = "proxies10" if name == "soft_triple" else "proxies"
        yield name, fo, fp, b * N_PROXY_CLASSES, f"{N_PROXY_CLASSES} classes", floor


def run_timings(
    sizes: list[int], reps: int, device: torch.device, pml_max: float, only: list[str] | None = None,
    rounds: int = 1,
) -> list[dict]:
    """Every case timed ``reps`` times in each of ``rounds`` passes over the case list (a slow phase of a shared
    machine then falls on different reps of every case); one row per case with the pooled times."""
    pooled: dict[tuple[int, str], dict] = {}
    for k in range(rounds):
        for b in sizes:
            emb = torch.randn(b, 512, generator=torch.Generator().manual_seed(0)).to(device)
            for name, ours, pml, size, note, floor_kind in cases(b, device):
                if only and not any(name.startswith(o) for o in only):
                    continue
                if pml is not None and size > pml_max:
                    pml = None
                    note = (note + "; " if note else "") + f"PML skipped: ~{size:.1e} index elements"
                floor = _floor(floor_kind, b, device) if pml is not None and floor_kind else None
                times = _time_cases([ours, pml, floor], emb, reps)
                entry = pooled.setdefault((b, name), {"note": note, "times": [[], [], []], "load1": []})
                for acc, t in zip(entry["times"], times):
                    acc.extend(t)
                entry["load1"].append(os.getloadavg()[0])
                if k == rounds - 1:
                    r = _row(name, b, entry)
                    print(_fmt(r), flush=True)
    return [_row(name, b, e) for (b, name), e in pooled.items()]


def _row(name: str, b: int, entry: dict) -> dict:
    t_ours, t_pml, t_floor = entry["times"]

    def ms(t: list[float]) -> float | None:
        return 1e3 * statistics.median(t) if t else None

    r = {"loss": name, "B": b, "d": 512, "ours_ms": ms(t_ours), "pml_ms": ms(t_pml), "floor_ms": ms(t_floor),
         "note": entry["note"], "load1": max(entry["load1"]), "samples": len(t_ours)}
    ratio = _paired_ratio(t_ours, t_pml)
    r["ratio"], r["ratio_q1"], r["ratio_q3"] = ratio if ratio else (None, None, None)
    # the ratio an implementation doing only the dense similarity GEMMs would reach
    floor = _paired_ratio(t_floor, t_pml)
    r["floor_ratio"] = floor[0] if floor else None
    return r


def _fmt(r: dict) -> str:
    def num(v: float | None, fmt: str, width: int) -> str:
        return format(v, fmt) if v is not None else "-".rjust(width)

    spread = f"{r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}" if r["ratio"] is not None else "-"
    return (f"{r['loss']:34s} {r['B']:5d} {r['ours_ms']:9.2f} {num(r['pml_ms'], '9.2f', 9)} "
            f"{num(r['floor_ms'], '9.2f', 9)} {num(r['ratio'], '6.3f', 6)} {spread:>9s} "
            f"{num(r['floor_ratio'], '6.3f', 6)}  {r['note']}")


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


def _host() -> dict:
    """What the ratios depend on besides the code: the CPU model, its vector extensions, and the BLAS torch uses
    (the same code measured MS at B = 1024 at 0.27 on one host and 0.36 on another, an AMD EPYC whose MKL GEMM is
    relatively slower)."""
    model, flags = platform.processor(), []
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = [f for f in line.split(":", 1)[1].split()
                         if f.startswith(("avx512", "avx_vnni", "amx", "avx2", "fma"))]
                break
    except OSError:
        pass
    blas = next((ln.strip() for ln in torch.__config__.show().splitlines() if "BLAS_INFO" in ln), "")
    return {"cpu_model": model, "cpu_flags": sorted(set(flags)),
            "blas": blas.split("BLAS_INFO=")[1].split(",")[0] if "BLAS_INFO=" in blas else None}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="B=180 only, 5 repetitions, memory at B=1024")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per case and round")
    ap.add_argument("--rounds", type=int, default=None, help="passes over the case list (times pooled)")
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
    reps = args.reps or (5 if args.small else 7)
    rounds = args.rounds or (1 if args.small else 3)
    load_before = os.getloadavg()
    print(f"{'loss':34s} {'B':>5s} {'ours ms':>9s} {'PML ms':>9s} {'floor ms':>9s} {'ratio':>6s} {'q1-q3':>9s} "
          f"{'floor':>6s}  note")
    rows = run_timings(sizes, reps, device, args.pml_max_elements, args.only, rounds)
    mem = [] if args.no_memory else run_memory(1024 if args.small else 4096)
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    result = {
        "device": str(device), "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "cpu_count": os.cpu_count(), **_host(), "repetitions": reps, "rounds": rounds,
        "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
        "protocol": ("ours/PML/floor interleaved per rep, one warm-up each per round, threads pinned; times: median "
                     "over all reps of all rounds; ratio: median (and quartiles) of the per-rep ratios"),
        "timings": rows, "memory": mem,
        "median_ratio": statistics.median(ratios) if ratios else None,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    if result["median_ratio"] is not None:
        print(f"median ours/PML time ratio: {result['median_ratio']:.3f}")
    print(f"host: {result['cpu_model']} ({', '.join(result['cpu_flags'])}), BLAS {result['blas']}")
    print(f"load average before {load_before}, after {result['loadavg_after']}; wrote {args.out}")


if __name__ == "__main__":
    main()
