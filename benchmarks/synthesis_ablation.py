"""Synthesis / regularisation ablation on KanjiGlyphs through the real trainer, several seeds, equal budgets.

    python benchmarks/synthesis_ablation.py                         # all methods, 3 seeds, 300 iterations (the reported run)
    python benchmarks/synthesis_ablation.py --small                 # CI-sized smoke run (< 2 min)
    python benchmarks/synthesis_ablation.py --methods ms,ms+iaa --seeds 0,1 --iterations 300

Methods (methods.md §2, §5, §6; every method-specific value is listed in METHODS below and written to the JSON):

* ``ms``          Multi-Similarity (library defaults α 2, β 50, λ 0.5, ε 0.1, ÷B), L2-normalised embeddings.
* ``ms+iaa``      MS + IAA, paper defaults (M = 3 copies, λ = 0.8 (CUB/Cars MS value), plain diagonal estimate,
                  neighbour correction, σ for every copy, constant λ), raw embeddings normalised inside.
                  Schedule scaled to the run: the code starts at epoch 30 of 100, i.e. after 30 % of the run ⇒
                  ``start_epoch = round(0.3·E)`` of the E sampler epochs of this run; re-estimation every
                  ``--iaa-update-every`` (default 3) sampler epochs (code: every 2 of 100 epochs, paper: 4 — one
                  epoch is the finest granularity the trainer hook has, and each pass embeds the whole train
                  split, ~25k images, which is the dominant cost on a CPU; default: passes at epochs 3, 6, 9).
* ``ms+das``      MS + DAS with the code's defaults: K = 4 dims, P = 3 copies, scales U[0.5, 2.0), bank Q = 10,
                  s_mts = 0.01, no detach, no auxiliary loss; L2-normalised embeddings.
* ``mdr``         MDR in its own setting (methods.md §5.1): triplet, margin 0.2 on raw Euclidean distances (mean
                  over triplets) + distance-weighted miner (cutoff 0.5, 1.4 upper cutoff, every positive pair) +
                  MDR regulariser (λ = 0.2, the Cars value — KanjiGlyphs' 32 images/class sits between Cars and
                  SOP, and 0.6 is tuned for CUB; ν = 0.01, levels (−3, 0, 3)), raw embeddings scaled by the mean
                  batch distance in training. Not MS+MDR: MS works on cosine similarities of L2-normalised
                  embeddings, so MDR's un-normalised, batch-distance-scaled space would be normalised away by
                  the loss and the regulariser would act on a space the loss never sees.
* ``triplet_dws`` (optional, not in the default list) MDR's baseline: the same triplet + distance-weighted miner
                  on L2-normalised embeddings without MDR (the paper's ``--l2norm`` baseline).
* ``pa``          Proxy-Anchor (α 32, δ 0.1), L2-normalised; proxies at lr ×10 = 1e-2, the code's absolute proxy
                  lr (×100 of its 1e-4; ×100 of our 1e-3 diverged to chance-level retrieval, see PA_PARAMS).
* ``pa+sgar``     Proxy-Anchor + reconstructed SGAR with the library defaults (feature space, J = 5, a = 0.1,
                  gate cos(z, w_y) ≥ 0.5, m_r = 0.03, m_a = 0, η = 1, λ_r = 0.5) — methods.md §2.3 [RECON].

Equal budget for every method: same iterations, batch (64 = 16 classes × 4 glyph designs, m-per-class sampler —
Proxy-Anchor's paper uses plain shuffling; we keep the sampler fixed so every method sees the same batch
composition), backbone (``kanji_cnn``, width 16 by default — width 32 was ~3× slower per step on
the shared 2-core CPU the reported run used), embedding size 128, optimizer (Adam, lr 1e-3, no weight decay,
no schedule, no clipping — the quickstart recipe; proxies ×10 for Proxy-Anchor (see above), MDR levels ×1).

Sampler epochs: one pass of the m-per-class sampler over KanjiGlyphs is ⌊N/B⌋ ≈ 395 batches, so a 500-iteration
run would be ~1.3 epochs and IAA's epoch schedule could not be scaled. The benchmark therefore sets the
sampler's epoch length to ``iterations / --epochs`` batches (default 10 pseudo-epochs per run) for **every**
method (the batch distribution is the same, epochs only mark where the epoch hook runs).

Protocol: model selection on the class-disjoint validation split by MAP@R every ``iterations / --validations``
steps (and at the end); the selected checkpoint is evaluated once on the test classes. The "before training"
test evaluation of the trainer is skipped (it is identical for all methods of a seed and costs a full test pass).

Prints a table (mean ± std over seeds of test MAP@R and R@1) and writes
benchmarks/results/synthesis_ablation.json (``--small``: synthesis_ablation_small.json). Per-run results are
appended to ``<out>.runs.jsonl`` as they finish, so an interrupted run can be resumed with ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from deepmetric.training.config import load_config
from deepmetric.training.trainer import Trainer

RESULTS_DIR = Path(__file__).parent / "results"
DEFAULT_METHODS = ("ms", "ms+iaa", "ms+das", "mdr", "pa", "pa+sgar")

MS_PARAMS = {"alpha": 2.0, "beta": 50.0, "base": 0.5, "epsilon": 0.1}
# Proxy lr: the code's proxies run at ×100 of AdamW lr 1e-4, i.e. an absolute 1e-2. With the shared Adam lr 1e-3
# used here, ×100 would be 0.1 — a first run with it left Proxy-Anchor at test MAP@R ≈ 1.5 % (loss stuck ≈ 12.6;
# benchmarks/results/synthesis_ablation_pa_proxy_lr100.runs.jsonl), so we keep the paper's absolute proxy lr: ×10.
PA_PARAMS = {"alpha": 32.0, "margin": 0.1, "lr_multiplier": 10.0}
TRIPLET_DWS = {
    "loss.name": "triplet_margin",
    "loss.params": {"margin": 0.2, "normalize_embeddings": False, "reduction": "mean", "squared": False},
    "loss.miner": "distance_weighted",
    "loss.miner_params": {"cutoff": 0.5, "nonzero_loss_cutoff": 1.4, "positives": "all"},
}

# Method → config overrides (dotted keys). IAA's schedule is filled in by iaa_schedule() from the run length.
METHODS: dict[str, dict[str, Any]] = {
    "ms": {"loss.name": "multi_similarity", "loss.params": MS_PARAMS},
    "ms+iaa": {
        "loss.name": "multi_similarity", "loss.params": MS_PARAMS, "model.normalize": False,
        "synthesis.name": "iaa",
        "synthesis.params": {"num_copies": 3, "lam": 0.8, "lambda_schedule": False, "estimator_update": "plain",
                             "apply_neighbor_correction": True, "legacy_cumulative_sqrt": False, "detach": False,
                             "normalize": True},
    },
    "ms+das": {
        "loss.name": "multi_similarity", "loss.params": MS_PARAMS, "synthesis.name": "das",
        "synthesis.params": {"num_produce": 3, "dfs_num_scale": 4, "scale_left": 0.5, "scale_right": 2.0,
                             "bank_size": 10, "mts_scale": 0.01, "normalize": True, "detach": False,
                             "aux_loss": False},
    },
    "mdr": {
        **TRIPLET_DWS, "model.normalize": False, "evaluation.distance": "euclidean", "synthesis.name": "mdr",
        "synthesis.params": {"lambda_mdr": 0.2, "nu": 0.01, "levels": [-3.0, 0.0, 3.0], "momentum": 0.9,
                             "include_diagonal_in_stats": True, "scale_by_batch_distance": True},
    },
    "triplet_dws": {
        **TRIPLET_DWS,
        "loss.params": {**TRIPLET_DWS["loss.params"], "normalize_embeddings": True},
    },
    "pa": {"loss.name": "proxy_anchor", "loss.params": PA_PARAMS},
    "pa+sgar": {
        "loss.name": "proxy_anchor", "loss.params": PA_PARAMS, "synthesis.name": "sgar",
        "synthesis.params": {"space": "feature", "num_intensities": 5, "a": 0.1, "relative_step": True,
                             "gate": "proxy_sim", "tau_g": 0.5, "shared_direction": False, "m_r": 0.03,
                             "m_a": 0.0, "eta": 1.0, "lambda_r": 0.5, "detach_features": True},
    },
}


def iaa_schedule(epochs: int, update_every: int) -> dict[str, int]:
    """Code: start after epoch 30 of 100 ⇒ start_epoch = round(0.3·E) (at least 1, at most E − 1)."""
    start = min(max(1, round(0.3 * epochs)), max(epochs - 1, 1))
    return {"start_epoch": start, "update_every": update_every, "total_epochs": epochs}


class AblationTrainer(Trainer):
    """The library trainer with two benchmark-only changes: the sampler's epoch length, and no 'before' test pass."""

    def __init__(self, *args: Any, epoch_length: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if epoch_length:
            self.sampler.length = int(epoch_length)
        self._skip_before = True

    def evaluate_split(self, split: str, save_embeddings: bool = False) -> dict[str, float] | None:
        if split == "test" and self.step == 0 and self._skip_before:
            return None
        return super().evaluate_split(split, save_embeddings=save_embeddings)


def build_overrides(method: str, args: argparse.Namespace, seed: int) -> tuple[list[str], dict[str, Any]]:
    spec = dict(METHODS[method])
    if method == "ms+iaa":
        spec["synthesis.params"] = {**spec["synthesis.params"], **iaa_schedule(args.epochs, args.iaa_update_every),
                                    "seed": seed}
    elif "synthesis.params" in spec and method in ("ms+das", "pa+sgar"):
        spec["synthesis.params"] = {**spec["synthesis.params"], "seed": seed}
    if method in ("pa", "pa+sgar") and args.pa_proxy_lr_mult is not None:
        spec["loss.params"] = {**spec["loss.params"], "lr_multiplier": args.pa_proxy_lr_mult}
    common = {
        "name": f"ablation_{method}",
        "data.batch_size": args.batch_size, "data.m_per_class": args.m_per_class,
        "data.max_classes": args.max_classes,
        "model.backbone": "kanji_cnn", "model.width": args.width, "model.embedding_size": args.embedding_size,
        "optimizer.name": "adam", "optimizer.lr": args.lr, "optimizer.weight_decay": 0.0,
        "scheduler.name": "none",
        "train.iterations": args.iterations, "train.eval_every": args.eval_every, "train.seed": seed,
        "train.threads": args.threads, "train.progress": False, "train.device": "cpu",
        "evaluation.selection_metric": "map@r",
    }
    merged = {**common, **spec}
    overrides = [f"{k}={json.dumps(v)}" for k, v in merged.items()]
    return overrides, merged


def run_one(method: str, seed: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    overrides, merged = build_overrides(method, args, seed)
    config = load_config(None, overrides)
    run_dir = workdir / f"{method.replace('+', '_')}_s{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    trainer = AblationTrainer(config, run_dir, epoch_length=args.epoch_length)
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    test = result.after.get("test", {})
    vals, train_logs = [], []
    metrics_file = run_dir / "metrics.jsonl"
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("split") == "validation":
                vals.append({"step": rec["step"], "map@r": rec.get("map@r"), "recall@1": rec.get("recall@1")})
            elif rec.get("split") == "train":
                train_logs.append(rec)
    # method diagnostics (loss terms, IAA active/λ, DAS shift, MDR term, SGAR gate) averaged over the 2nd half
    late = [r for r in train_logs if r["step"] > args.iterations // 2]
    skip = {"step", "split", "lr", "images_per_second"}
    keys = sorted({k for r in late for k, v in r.items() if k not in skip and isinstance(v, (int, float))})
    diagnostics = {k: statistics.fmean(r[k] for r in late if k in r) for k in keys}
    return {
        "method": method, "seed": seed, "seconds": round(seconds, 1), "selected_step": result.best_step,
        "steps": result.steps, "test": test, "validation_curve": vals,
        "train_diagnostics_second_half": diagnostics,
        "overrides": {k: v for k, v in merged.items() if k.startswith(("loss.", "synthesis.", "model.normalize", "evaluation.distance"))},
    }


def summarize(runs: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    rows = []
    for m in methods:
        rs = [r for r in runs if r["method"] == m and r.get("test")]
        if not rs:
            continue
        row: dict[str, Any] = {"method": m, "n_seeds": len(rs)}
        for key in ("map@r", "recall@1"):
            v = [100 * r["test"][key] for r in rs]
            row[key] = {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                        "values": v}
        row["mean_seconds"] = statistics.fmean(r["seconds"] for r in rs)
        row["selected_steps"] = [r["selected_step"] for r in rs]
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'method':<13}{'seeds':>6}{'MAP@R (%)':>18}{'R@1 (%)':>18}{'s/run':>8}  selected steps",
             "-" * 82]
    for r in rows:
        mr, r1 = r["map@r"], r["recall@1"]
        lines.append(f"{r['method']:<13}{r['n_seeds']:>6}{mr['mean']:>11.2f} ± {mr['std']:<4.2f}"
                     f"{r1['mean']:>11.2f} ± {r1['std']:<4.2f}{r['mean_seconds']:>8.0f}  {r['selected_steps']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=None, help="training iterations per run (default 300)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--small", action="store_true", help="CI-sized: 12 iterations, 40 classes, 1 seed")
    parser.add_argument("--validations", type=int, default=4, help="validation evaluations per run (incl. the end)")
    parser.add_argument("--epochs", type=int, default=10, help="sampler epochs per run (sets the epoch length)")
    parser.add_argument("--iaa-update-every", type=int, default=3, help="IAA re-estimation period, sampler epochs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--m-per-class", type=int, default=4)
    parser.add_argument("--embedding-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-classes", type=int, default=None)
    parser.add_argument("--pa-proxy-lr-mult", type=float, default=None,
                        help="override the Proxy-Anchor proxies' lr multiplier (default 10, see PA_PARAMS)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="output JSON (default benchmarks/results/synthesis_ablation.json)")
    parser.add_argument("--workdir", default=None, help="run directories (default: a temporary directory)")
    parser.add_argument("--resume", action="store_true", help="skip (method, seed) pairs already in <out>.runs.jsonl")
    args = parser.parse_args()

    if args.small:
        args.iterations = args.iterations or 12
        args.seeds = args.seeds or "0"
        args.max_classes = args.max_classes or 40
        args.epochs = min(args.epochs, 4)
        args.iaa_update_every = 1
    args.iterations = args.iterations or 300
    seeds = [int(s) for s in (args.seeds or "0,1,2").split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    args.eval_every = max(1, args.iterations // args.validations)
    args.epoch_length = max(1, math.ceil(args.iterations / args.epochs))
    out = Path(args.out) if args.out else RESULTS_DIR / ("synthesis_ablation_small.json" if args.small
                                                          else "synthesis_ablation.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    runs_log = out.with_suffix(".runs.jsonl")
    runs: list[dict[str, Any]] = []
    if args.resume and runs_log.is_file():
        runs = [json.loads(line) for line in runs_log.read_text().splitlines() if line.strip()]
    elif runs_log.exists():
        runs_log.unlink()
    done = {(r["method"], r["seed"]) for r in runs}

    torch.set_num_threads(args.threads)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "workdir", "resume")}
    settings.update(seeds=seeds, methods=methods, iaa_schedule=iaa_schedule(args.epochs, args.iaa_update_every))
    print(f"settings: {json.dumps(settings)}", flush=True)
    tmp = tempfile.TemporaryDirectory(prefix="synth_ablation_") if not args.workdir else None
    workdir = Path(args.workdir) if args.workdir else Path(tmp.name)
    start = time.perf_counter()
    try:
        for seed in seeds:  # seed-major: partial results cover every method
            for method in methods:
                if (method, seed) in done:
                    continue
                r = run_one(method, seed, args, workdir)
                runs.append(r)
                with runs_log.open("a") as f:
                    f.write(json.dumps(r) + "\n")
                t = r["test"]
                print(f"[{time.perf_counter() - start:7.0f}s] {method:<12} seed {seed}: test MAP@R "
                      f"{100 * t.get('map@r', float('nan')):.2f}  R@1 {100 * t.get('recall@1', float('nan')):.2f}  "
                      f"(selected step {r['selected_step']}, {r['seconds']:.0f}s)", flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()

    rows = summarize(runs, methods)
    print()
    print(format_table(rows))
    meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "argv": sys.argv[1:], "wall_seconds": round(time.perf_counter() - start, 1),
            "metrics": "test split (unseen classes), self-retrieval, cosine (mdr: Euclidean on raw embeddings, its protocol); mean ± sample std over seeds, in %"}
    payload = {"meta": meta, "settings": settings,
               "methods": {m: METHODS[m] for m in methods}, "summary": rows, "runs": runs}
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(payload, indent=2))
    tmp_out.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
