"""Cross-batch memory benchmark: one training step of the loss with a 55,000 × 512 memory, against PML.

    python benchmarks/xbm.py                 # M = 55,000, d = 512, B = 180 (XBM's SOP setting), 1 and 2 threads
    python benchmarks/xbm.py --small         # M = 5,000, fewer repetitions (CI smoke run)

Compared: ``deepmetric.memory.CrossBatchMemory`` and PML's ``CrossBatchMemory`` around the same loss — the
distance-form contrastive loss with PML's defaults (m_pos 0, m_neg 1, L2-normalised Euclidean distance,
average over non-zero terms) — without and with PML-equivalent multi-similarity mining (ε = 0.1) on
(batch vs memory). deepmetric runs with ``include_batch_loss=False``, i.e. PML's single "batch vs memory" term,
so both compute the same number (reported: the largest |difference| of the step losses).

Measured: the loss part of a training step — enqueue + forward + backward, the embeddings a leaf tensor that
requires grad (no backbone). Both memories are filled with the same rows before timing, so every timed step uses
all M rows (the steady state). Each case runs ``--runs`` times, each run in its own fresh process (deepmetric and
PML runs interleaved, so a busy machine slows both alike), ``--reps`` timed steps per run after one warm-up; the
table shows the median over all timed steps and the spread of the per-run medians.

Peak memory per run: ``ru_maxrss`` of the process (including the ~M·d·4 bytes of the memory buffer), its RSS
just before the timed steps, and the largest tensor produced by any operator during one step, forward and
backward (recorded with a ``TorchDispatchMode``), next to B·M and M·d: no B×M×M tensor ever exists.

Prints a table and writes benchmarks/results/xbm.json (``--small``: xbm_small.json) with the host's details.
"""

from __future__ import annotations

import argparse
import datetime
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
EPSILON = 0.1       # multi-similarity mining


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


def _build(case: dict[str, Any]) -> tuple[Any, Any]:
    """(criterion, enqueue(embeddings, labels)) for one implementation."""
    d, m, mined = case["dim"], case["memory"], case["miner"]
    if case["impl"] == "pml":
        from pytorch_metric_learning.losses import ContrastiveLoss, CrossBatchMemory
        from pytorch_metric_learning.miners import MultiSimilarityMiner

        criterion = CrossBatchMemory(ContrastiveLoss(pos_margin=0.0, neg_margin=1.0), embedding_size=d,
                                     memory_size=m, miner=MultiSimilarityMiner(EPSILON) if mined else None)
        return criterion, lambda e, y: criterion.add_to_memory(e, y, len(e))
    from deepmetric.losses import ContrastiveLoss
    from deepmetric.memory import CrossBatchMemory
    from deepmetric.miners import MultiSimilarityMiner

    criterion = CrossBatchMemory(ContrastiveLoss(form="distance"), MultiSimilarityMiner(EPSILON) if mined else None,
                                 embedding_size=d, memory_size=m, include_batch_loss=False)
    return criterion, criterion.enqueue


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """One run of one case, in this (fresh) process."""
    torch.set_num_threads(case["threads"])
    b, d, m = case["batch"], case["dim"], case["memory"]
    g = torch.Generator().manual_seed(0)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        classes = torch.randint(0, N_CLASSES, (b // PER_CLASS,), generator=g)
        emb = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1)
        return emb, classes.repeat_interleave(PER_CLASS)

    criterion, enqueue = _build(case)
    with torch.no_grad():  # the same rows in both rings: every timed step sees all M of them
        for _ in range(-(-m // b)):
            enqueue(*batch())
    steps = [batch() for _ in range(case["reps"] + 2)]  # fresh rows each step: no duplicates in the ring
    rss_before = _rss_mb()
    times, losses = [], []
    for i, (e, y) in enumerate(steps[:-1]):
        x = e.clone().requires_grad_(True)
        t0 = time.perf_counter()
        loss = criterion(x, y)
        loss.backward()
        elapsed = time.perf_counter() - t0
        losses.append(float(loss.detach()))
        if i:  # the first step is a warm-up
            times.append(elapsed)
    spy = LargestOutput()
    x = steps[-1][0].clone().requires_grad_(True)
    with spy:
        criterion(x, steps[-1][1]).backward()
    return {
        **case,
        "step_ms": [1e3 * t for t in times],
        "median_ms": 1e3 * statistics.median(times),
        "losses": losses,
        "rss_before_steps_mb": rss_before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "largest_tensor_numel": spy.max_numel,
        "largest_tensor_op": spy.op,
        "B_times_M": b * m,
        "M_times_d": m * d,
    }


def host_info() -> dict[str, Any]:
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    import pytorch_metric_learning

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": model or platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
        "pytorch_metric_learning": pytorch_metric_learning.__version__,
        "load_average_at_start": list(os.getloadavg()),
        "note": "loss enqueue + forward + backward only; embeddings are a leaf tensor; shared machine",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--memory", type=int, default=None)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=180)
    parser.add_argument("--reps", type=int, default=None, help="timed steps per run")
    parser.add_argument("--runs", type=int, default=None, help="fresh processes per case")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case (JSON) and print JSON
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return

    memory = args.memory or (5_000 if args.small else 55_000)
    reps, runs = args.reps or (3 if args.small else 5), args.runs or (1 if args.small else 3)
    meta = {**host_info(), "batch": args.batch, "dim": args.dim, "memory": memory, "reps": reps, "runs": runs}
    results: list[dict[str, Any]] = []
    print(f"B={args.batch}, d={args.dim}, M={memory}, {reps} steps × {runs} runs per case, {meta['cpu']}, "
          f"torch {torch.__version__}, PML {meta['pytorch_metric_learning']}")
    for threads in (int(t) for t in args.threads.split(",")):
        for miner in (False, True):
            for run in range(runs):
                for impl in ("deepmetric", "pml"):
                    case = {"impl": impl, "miner": miner, "threads": threads, "run": run, "batch": args.batch,
                            "dim": args.dim, "memory": memory, "reps": reps}
                    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
                    proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], env=env,
                                          capture_output=True, text=True, check=False)
                    if proc.returncode:
                        raise SystemExit(f"case {case} failed:\n{proc.stderr[-2000:]}")
                    results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    meta["load_average_at_end"] = list(os.getloadavg())

    summary = []
    print(f"{'threads':>7} {'miner':<6}{'impl':<11}{'median ms':>10}{'run medians ms':>24}{'peak RSS MB':>13}"
          f"{'largest tensor':>16}{'ratio':>7}{'max |ΔL|':>10}")
    for threads in sorted({r["threads"] for r in results}):
        for miner in (False, True):
            rows = {impl: [r for r in results if r["impl"] == impl and r["miner"] == miner
                           and r["threads"] == threads] for impl in ("deepmetric", "pml")}
            medians = {impl: statistics.median([t for r in rs for t in r["step_ms"]]) for impl, rs in rows.items()}
            diff = max(abs(a - b) for ra, rb in zip(rows["deepmetric"], rows["pml"])
                       for a, b in zip(ra["losses"], rb["losses"]))
            ratio = medians["deepmetric"] / medians["pml"]
            for impl, rs in rows.items():
                runs_ms = ", ".join(f"{r['median_ms']:.0f}" for r in rs)
                peak = max(r["peak_rss_mb"] for r in rs)
                print(f"{threads:>7} {'MS' if miner else '-':<6}{impl:<11}{medians[impl]:>10.1f}{runs_ms:>24}"
                      f"{peak:>13.0f}{rs[0]['largest_tensor_numel']:>16,}"
                      + (f"{ratio:>7.2f}{diff:>10.1e}" if impl == "pml" else ""))
                summary.append({"threads": threads, "miner": "multi_similarity" if miner else None, "impl": impl,
                                "median_ms": medians[impl], "run_median_ms": [r["median_ms"] for r in rs],
                                "peak_rss_mb": peak, "rss_before_steps_mb": max(r["rss_before_steps_mb"] for r in rs),
                                "largest_tensor_numel": rs[0]["largest_tensor_numel"],
                                "ratio_to_pml": ratio if impl == "deepmetric" else 1.0,
                                "max_abs_loss_difference": diff})

    out = Path(__file__).parent / "results" / ("xbm_small.json" if args.small else "xbm.json")
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "summary": summary, "runs": results}, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
