"""Cross-batch memory benchmark: step time and peak memory of the loss with and without a 55,000 × 512 memory.

    python benchmarks/xbm.py                 # M = 55,000, d = 512, B = 180 (XBM's SOP setting), MS + contrastive
    python benchmarks/xbm.py --small         # M = 5,000, fewer repetitions (CI smoke run)
    python benchmarks/xbm.py --pml           # also PML's CrossBatchMemory(ContrastiveLoss) for comparison

Measured: the loss part of a training step only — forward + backward with the embeddings a leaf tensor that
requires grad (no backbone) — median over ``--reps`` steps after one warm-up. The memory is filled before timing,
so every timed step uses all M rows (the steady state after the first M/B steps).

Peak memory is honest: every case runs in its own subprocess and reports ``ru_maxrss`` (the process's peak
resident set, including the ~M·d·4 bytes of the memory buffer), its RSS just before the timed steps, and the
largest tensor produced by any operator during one step, forward and backward (recorded with a
``TorchDispatchMode``), next to B·R and R·d (R = reference rows: M with memory, B without): it is at most
max(B·R, R·d), i.e. no B×M×M tensor exists (that would be 180 × 55,000² floats ≈ 2.2 TB).

Prints a table and writes benchmarks/results/xbm.json (``--small``: xbm_small.json).
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
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

N_CLASSES = 11_318  # SOP training classes: memory labels are drawn from them
PER_CLASS = 5       # batch = B/5 classes × 5 images


class LargestOutput(TorchDispatchMode):
    """Remembers the largest number of elements of any operator output."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel, self.op = 0, ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.max_numel:
                self.max_numel, self.op = t.numel(), str(func)
        return out


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _make_loss(name: str):
    from deepmetric.losses import ContrastiveLoss, MultiSimilarityLoss

    if name == "ms":  # authors' code defaults (methods.md §4.2)
        return MultiSimilarityLoss(alpha=2.0, beta=40.0, base=0.5, epsilon=0.1)
    if name == "contrastive":  # XBM's headline loss (§4.4): Σ(1 − S_ap) + Σ_{S_an > 0.5} S_an, ÷ B
        return ContrastiveLoss(1.0, 0.5, form="similarity")
    raise ValueError(name)


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """One case in this (fresh) process."""
    torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    b, d, m = case["batch"], case["dim"], case["memory"]
    g = torch.Generator().manual_seed(0)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        classes = torch.randint(0, N_CLASSES, (b // PER_CLASS,), generator=g)
        emb = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1)
        return emb, classes.repeat_interleave(PER_CLASS)

    if case["impl"] == "pml":
        from pytorch_metric_learning.losses import ContrastiveLoss as PmlContrastive
        from pytorch_metric_learning.losses import CrossBatchMemory as PmlXBM

        criterion = PmlXBM(PmlContrastive(pos_margin=1.0, neg_margin=0.5), embedding_size=d, memory_size=m)
        for _ in range(-(-m // b)):  # fill the queue without computing the loss
            e, y = batch()
            criterion.add_to_memory(e, y, b)
        assert criterion.has_been_filled
    else:
        from deepmetric.memory import CrossBatchMemory

        loss = _make_loss(case["loss"])
        if m:
            criterion = CrossBatchMemory(loss, embedding_size=d, memory_size=m)
            with torch.no_grad():  # fill the ring so every timed step sees all M rows
                for _ in range(-(-m // b)):
                    e, y = batch()
                    criterion.enqueue(e, y)
            assert criterion.is_full
        else:
            criterion = loss

    steps = [batch() for _ in range(case["reps"] + 1)]
    rss_before = _rss_mb()
    times = []
    for i, (e, y) in enumerate(steps):
        x = e.clone().requires_grad_(True)
        t0 = time.perf_counter()
        criterion(x, y).backward()
        if i:  # the first step is a warm-up
            times.append(time.perf_counter() - t0)
    spy = LargestOutput()
    x = steps[0][0].clone().requires_grad_(True)
    with spy:
        criterion(x, steps[0][1]).backward()
    return {
        **case,
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "max_ms": 1e3 * max(times),
        "rss_before_steps_mb": rss_before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "largest_tensor_numel": spy.max_numel,
        "largest_tensor_op": spy.op,
        "B_times_R": b * max(m, b),
        "R_times_d": max(m, b) * d,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--memory", type=int, default=None)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=180)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--pml", action="store_true", help="also time PML's CrossBatchMemory (contrastive)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case (JSON) and print JSON
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return

    memory = args.memory or (5_000 if args.small else 55_000)
    reps = args.reps or (5 if args.small else 15)
    base = {"batch": args.batch, "dim": args.dim, "reps": reps, "threads": args.threads}
    cases = []
    for loss in ("ms", "contrastive"):
        cases.append({**base, "impl": "deepmetric", "loss": loss, "memory": 0})
        cases.append({**base, "impl": "deepmetric", "loss": loss, "memory": memory})
    if args.pml:
        cases.append({**base, "impl": "pml", "loss": "contrastive", "memory": memory})

    results = []
    header = f"{'impl':<11}{'loss':<12}{'memory':>8}{'median ms':>11}{'min ms':>9}{'RSS before MB':>15}" \
             f"{'peak RSS MB':>13}{'largest tensor':>16}{'B·R':>12}{'R·d':>12}"
    print(f"B={args.batch}, d={args.dim}, threads={args.threads}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}")
    print(header)
    for case in cases:
        proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True,
                              text=True, check=False)
        if proc.returncode:
            print(f"case {case} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            results.append({**case, "error": proc.stderr[-2000:]})
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"{r['impl']:<11}{r['loss']:<12}{r['memory']:>8}{r['median_ms']:>11.1f}{r['min_ms']:>9.1f}"
              f"{r['rss_before_steps_mb']:>15.0f}{r['peak_rss_mb']:>13.0f}{r['largest_tensor_numel']:>16,}"
              f"{r['B_times_R']:>12,}{r['R_times_d']:>12,}")

    out = Path(__file__).parent / "results" / ("xbm_small.json" if args.small else "xbm.json")
    out.parent.mkdir(exist_ok=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "note": "loss forward+backward only; embeddings are a leaf tensor"}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
