"""Rank-surrogate losses on KanjiGlyphs through the real CLI: Smooth-AP and the Recall@k surrogate beside MS.

    nice -n 5 python benchmarks/rank_losses_kanji.py --parallel 3 --threads 1   # 3 seeds × 3 recipes (reported run)
    python benchmarks/rank_losses_kanji.py --seeds 0 --methods smooth_ap  # one run
    python benchmarks/rank_losses_kanji.py --iterations 20                # smoke run (overrides train.iterations)

Each run is ``deepmetric train --config RECIPE --set train.seed=N --output RUNS/<method>-seed<N>``: the
quickstart budget and pipeline unchanged (600 iterations, batch 64 = 16 classes × 4, ``kanji_cnn`` width 32,
128-d, Adam 1e-3, validation MAP@R every 150 iterations for model selection, test split before and after):

* ``ms``               configs/quickstart.yaml (Multi-Similarity, library defaults)
* ``smooth_ap``        configs/kanji_glyphs/smooth_ap.yaml (τ = 0.01)
* ``recall_surrogate`` configs/kanji_glyphs/recall_surrogate.yaml (k 1–16, τ₁ 0.01, τ₂ 1, no SiMix)

Runs go seed by seed (every method of seed 0 first; ``--parallel 3 --threads 1`` trains the three methods of a
seed at once, one thread each: on a shared CPU this gets the comparison of a seed done together), so an interrupted benchmark still compares methods on the
same seeds; a run whose ``results.json`` exists is read, not repeated. The test MAP@R and R@1 of the selected
checkpoint come from each run's ``results.json``. Prints a table (mean ± std over seeds, %) and writes
benchmarks/results/rank_losses_kanji.json after every run.
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
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "ms": "configs/quickstart.yaml",
    "smooth_ap": "configs/kanji_glyphs/smooth_ap.yaml",
    "recall_surrogate": "configs/kanji_glyphs/recall_surrogate.yaml",
}


def deepmetric_command() -> list[str]:
    script = Path(sys.executable).with_name("deepmetric")
    return [str(script)] if script.exists() else [sys.executable, "-m", "deepmetric"]


def start_run(method: str, seed: int, runs: Path, iterations: int | None, threads: int | None):
    """The training subprocess of one run (None when its results.json already exists)."""
    out = runs / f"{method}-seed{seed}"
    if (out / "results.json").exists():
        return None
    cmd = [*deepmetric_command(), "train", "--config", str(ROOT / RECIPES[method]),
           "--set", f"train.seed={seed}", "--set", "train.progress=false", "--output", str(out), "--overwrite"]
    if threads is not None:
        cmd += ["--set", f"train.threads={threads}"]
    if iterations is not None:
        cmd += ["--set", f"train.iterations={iterations}", "--set", f"train.eval_every={max(1, iterations // 4)}"]
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd)}", flush=True)
    log = (runs / f"{method}-seed{seed}.log").open("w")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def read_run(method: str, seed: int, runs: Path) -> dict:
    out = runs / f"{method}-seed{seed}"
    payload = json.loads((out / "results.json").read_text())
    test = payload["after"]["test"]
    return {"method": method, "seed": seed, "recipe": RECIPES[method], "run_dir": str(out),
            "selected_step": payload["selected_step"], "steps": payload["steps"], "seconds": payload["seconds"],
            "test_map_at_r": test["map@r"], "test_recall_at_1": test["recall@1"],
            "before_test_map_at_r": payload["before"].get("test", {}).get("map@r")}


def summarize(rows: list[dict], methods: list[str]) -> dict[str, dict]:
    summary = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        entry: dict = {"seeds": [r["seed"] for r in mine]}
        for key in ("test_map_at_r", "test_recall_at_1"):
            values = [100.0 * r[key] for r in mine]
            entry[key] = {"mean": statistics.fmean(values),
                          "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
        summary[method] = entry
    return summary


def host() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--runs", default="/tmp/rank_runs", help="directory of the run directories")
    parser.add_argument("--iterations", type=int, default=None, help="override train.iterations (smoke runs)")
    parser.add_argument("--parallel", type=int, default=1, help="runs of one seed trained at the same time")
    parser.add_argument("--threads", type=int, default=None, help="train.threads of every run (default: torch's)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/rank_losses_kanji.json"))
    args = parser.parse_args()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    summary: dict[str, dict] = {}
    for seed in args.seeds:
        pending = list(args.methods)
        while pending:
            group, pending = pending[:args.parallel], pending[args.parallel:]
            procs = {m: start_run(m, seed, runs, args.iterations, args.threads) for m in group}
            for method in group:
                proc = procs[method]
                if proc is not None and proc.wait() != 0:
                    raise SystemExit(f"{method} seed {seed} failed: see {runs / f'{method}-seed{seed}.log'}")
                rows.append(read_run(method, seed, runs))
            summary = summarize(rows, args.methods)
            Path(args.output).write_text(json.dumps({
                "settings": {"recipes": {m: RECIPES[m] for m in args.methods}, "seeds": args.seeds,
                             "iterations": args.iterations or "recipe (600)", "parallel_runs": args.parallel,
                             "threads_per_run": args.threads or "torch default",
                             "metric": "test split, checkpoint selected on validation MAP@R, %"},
                "host": host(), "summary": summary, "runs": rows}, indent=2) + "\n")
    print(f"\n{'method':<18} {'seeds':>5}  {'test MAP@R (%)':>16}  {'test R@1 (%)':>16}")
    for method, entry in summary.items():
        m, r = entry["test_map_at_r"], entry["test_recall_at_1"]
        print(f"{method:<18} {len(entry['seeds']):>5}  {m['mean']:>8.2f} ± {m['std']:<5.2f}  "
              f"{r['mean']:>8.2f} ± {r['std']:<5.2f}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
