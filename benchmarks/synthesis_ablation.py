"""Synthesis / regularisation ablation on KanjiGlyphs through the real trainer, several seeds, equal budgets.

    python benchmarks/synthesis_ablation.py                         # all methods, 3 seeds, 2000 iterations (the reported run)
    python benchmarks/synthesis_ablation.py --small                 # CI-sized smoke run (< 2 min)
    python benchmarks/synthesis_ablation.py --methods ms,ms+iaa --seeds 0,1 --iterations 300
    # parallel invocations (distinct --out), then one table from all of them:
    python benchmarks/synthesis_ablation.py --methods ms,pa --seeds 0 --out /tmp/a.json    # then --merge /tmp/a.runs.jsonl

Methods (methods.md §2, §5, §6; every method-specific value is listed in METHODS below and written to the JSON):

* ``ms``          Multi-Similarity (library defaults α 2, β 50, λ 0.5, ε 0.1, ÷B), L2-normalised embeddings.
* ``ms+iaa``      MS + IAA with the **released code's** settings, written out here (``IAA_CODE_SETTINGS``, the
                  values of ``IAA.legacy_kwargs()`` when this run was set up) so the run does not follow later
                  changes of the library defaults: M = 3 copies, λ = 0.8 (CUB/Cars MS value) with the code's λ
                  schedule, running estimator update with momentum 0.2, **no neighbour correction** (the code
                  computes it and never applies it), the code's cumulative √ over copies; raw embeddings,
                  normalised inside. Estimation pass as the code's (``AblationTrainer._estimation_loader``):
                  every training image once, training transforms, model in eval mode, no gradients.
                  Schedule scaled to the run: start after 30 % of it (code: epoch 30 of 100), re-estimation
                  every ``--iaa-update-every`` (3) of the 10 sampler epochs (code: every 2 of 100, paper: 4; each
                  pass embeds the whole train split, the dominant CPU cost): passes at epochs 3, 6, 9.
* ``ms+das``      MS + DAS with the code's defaults: K = 4 dims, P = 3 copies, scales U[0.5, 2.0), bank Q = 10,
                  s_mts = 0.01, no detach, no auxiliary loss; L2-normalised embeddings.
* ``mdr``         MDR in its own setting (methods.md §5.1): triplet, margin 0.2 on raw Euclidean distances (mean
                  over triplets) + distance-weighted miner (cutoff 0.5, 1.4 upper cutoff, every positive pair) +
                  MDR regulariser (λ = 0.2, the Cars value — KanjiGlyphs' 32 images/class sits between Cars and
                  SOP, and 0.6 is tuned for CUB; ν = 0.01, levels (−3, 0, 3)), raw embeddings scaled by the mean
                  batch distance in training. Not MS+MDR: MS would normalise MDR's space away.
* ``triplet_dws`` MDR's own baseline: the MDR wrapper with λ = ν = 0 (exactly the base loss, tested), i.e. the
                  same triplet + miner on the same raw, batch-distance-scaled space and Euclidean evaluation.
* ``triplet_dws_l2`` (optional, not in the default list) the paper's ``--l2norm`` baseline: the same triplet +
                  miner on L2-normalised embeddings, cosine evaluation — a different embedding space from ``mdr``.
* ``pa``          Proxy-Anchor (α 32, δ 0.1), L2-normalised; proxies at lr ×10 = 1e-2, the code's absolute proxy
                  lr (×100 of its 1e-4; ×100 of our 1e-3 diverged to chance-level retrieval, see PA_PARAMS);
                  trained as the KanjiGlyphs Proxy-Anchor recipe (``PA_TRAINING``): plain shuffling, as in the
                  paper, and the paper code's frozen-backbone warm-up (50 iterations, head and proxies only).
* ``pa+sgar``     Proxy-Anchor + reconstructed SGAR with the library defaults (feature space, J = 5, a = 0.1,
                  gate cos(z, w_y) ≥ 0.5, m_r = 0.03, m_a = 0, η = 1, λ_r = 0.5) — methods.md §2.3 [RECON] — on
                  the same training; the JSON records how often the gate opened (``sgar_gate_counts``: every
                  step's share of gated samples and of batches with at least one gated sample).
* ``pa+sgar_top`` the same SGAR gated by ``top_fraction`` 0.5 (each batch's half closest to its own proxies), a
                  gate that always opens: what SGAR does when it acts.

Each method against its own baseline (``BASELINES``: same loss, embedding space and evaluation distance), as
per-seed differences: ms+iaa and ms+das against ms, mdr against triplet_dws, both SGAR variants against pa.

Equal budget: same iterations, batch 64 (m-per-class, 16 classes × 4 designs, for every method but Proxy-Anchor,
which shuffles as its paper does), ``kanji_cnn`` width 16, 128-d, Adam lr 1e-3 without weight decay, schedule
or clipping (the quickstart recipe; proxies ×10 for Proxy-Anchor). The sampler's epoch length is set to
``iterations / --epochs`` batches (10 pseudo-epochs) for every method, so IAA's epoch schedule scales with the run.

Budget: 2,000 iterations (~5 passes over the training images): validation MAP@R (every 250 iterations, in the JSON)
gains 0.7–1.2 points in the last 250 (11–34 in the second 250); the 400-iteration run is synthesis_ablation_400it.json.

Protocol: model selection on the class-disjoint validation split by MAP@R every ``iterations / --validations``
steps; the selected checkpoint is evaluated once on the test classes (the trainer's "before" test pass is skipped).
Prints mean ± std over seeds of test MAP@R and R@1 and writes benchmarks/results/synthesis_ablation.json
(``--small``: synthesis_ablation_small.json); per-run results go to ``<out>.runs.jsonl`` as they finish
(``--resume`` skips those).
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
from torch.utils.data import DataLoader

from deepmetric.synthesis.iaa import IAA
from deepmetric.synthesis.sgar import SGAR
from deepmetric.training.config import load_config
from deepmetric.training.trainer import Trainer

RESULTS_DIR = Path(__file__).parent / "results"
DEFAULT_METHODS = ("ms", "ms+iaa", "ms+das", "triplet_dws", "mdr", "pa", "pa+sgar", "pa+sgar_top")

MS_PARAMS = {"alpha": 2.0, "beta": 50.0, "base": 0.5, "epsilon": 0.1}
# Proxy lr: the code's proxies run at ×100 of AdamW lr 1e-4, i.e. an absolute 1e-2. With the shared Adam lr 1e-3
# used here, ×100 would be 0.1 — a first run with it left Proxy-Anchor at test MAP@R ≈ 1.5 % (loss stuck ≈ 12.6;
# benchmarks/results/synthesis_ablation_pa_proxy_lr100.runs.jsonl), so we keep the paper's absolute proxy lr: ×10.
PA_PARAMS = {"alpha": 32.0, "margin": 0.1, "lr_multiplier": 10.0}
# The KanjiGlyphs Proxy-Anchor recipe's training (configs/kanji_glyphs/proxy_anchor.yaml lists the probes behind
# it): plain shuffling as in the paper, and the paper code's frozen-backbone warm-up (head and proxies only).
PA_TRAINING = {"data.sampler": "random", "train.frozen_backbone_iterations": 50}
TRIPLET_DWS = {
    "loss.name": "triplet_margin",
    "loss.params": {"margin": 0.2, "normalize_embeddings": False, "reduction": "mean", "squared": False},
    "loss.miner": "distance_weighted",
    "loss.miner_params": {"cutoff": 0.5, "nonzero_loss_cutoff": 1.4, "positives": "all"},
}

# The released IAA code's settings (darkpromise98/IAA; IAA.legacy_kwargs() at the time of this run), spelled out
# so that a change of the library defaults or of legacy_kwargs() does not change this benchmark. The schedule keys
# (start_epoch, update_every, total_epochs) are scaled to the run by iaa_schedule().
IAA_CODE_SETTINGS = {"estimator_update": "running", "momentum": 0.2, "apply_neighbor_correction": False,
                     "legacy_cumulative_sqrt": True, "lambda_schedule": True}
MDR_PARAMS = {"nu": 0.01, "levels": [-3.0, 0.0, 3.0], "momentum": 0.9, "include_diagonal_in_stats": True,
              "scale_by_batch_distance": True}

# Method → config overrides (dotted keys). IAA's schedule is filled in by iaa_schedule() from the run length.
METHODS: dict[str, dict[str, Any]] = {
    "ms": {"loss.name": "multi_similarity", "loss.params": MS_PARAMS},
    "ms+iaa": {
        "loss.name": "multi_similarity", "loss.params": MS_PARAMS, "model.normalize": False,
        "synthesis.name": "iaa",
        "synthesis.params": {"num_copies": 3, "lam": 0.8, **IAA_CODE_SETTINGS, "detach": False, "normalize": True},
    },
    "ms+das": {
        "loss.name": "multi_similarity", "loss.params": MS_PARAMS, "synthesis.name": "das",
        "synthesis.params": {"num_produce": 3, "dfs_num_scale": 4, "scale_left": 0.5, "scale_right": 2.0,
                             "bank_size": 10, "mts_scale": 0.01, "normalize": True, "detach": False,
                             "aux_loss": False},
    },
    "mdr": {
        **TRIPLET_DWS, "model.normalize": False, "evaluation.distance": "euclidean", "synthesis.name": "mdr",
        "synthesis.params": {"lambda_mdr": 0.2, **MDR_PARAMS},
    },
    "triplet_dws": {
        **TRIPLET_DWS, "model.normalize": False, "evaluation.distance": "euclidean", "synthesis.name": "mdr",
        "synthesis.params": {**MDR_PARAMS, "lambda_mdr": 0.0, "nu": 0.0},
    },
    "triplet_dws_l2": {
        **TRIPLET_DWS,
        "loss.params": {**TRIPLET_DWS["loss.params"], "normalize_embeddings": True},
    },
    "pa": {"loss.name": "proxy_anchor", "loss.params": PA_PARAMS, **PA_TRAINING},
    "pa+sgar": {
        "loss.name": "proxy_anchor", "loss.params": PA_PARAMS, **PA_TRAINING, "synthesis.name": "sgar",
        "synthesis.params": {"space": "feature", "num_intensities": 5, "a": 0.1, "relative_step": True,
                             "gate": "proxy_sim", "tau_g": 0.5, "shared_direction": False, "m_r": 0.03,
                             "m_a": 0.0, "eta": 1.0, "lambda_r": 0.5, "detach_features": True},
    },
}
# the same SGAR with a gate that always opens: the half of each batch closest to its own proxies
METHODS["pa+sgar_top"] = {**METHODS["pa+sgar"], "synthesis.params": {
    **METHODS["pa+sgar"]["synthesis.params"], "gate": "top_fraction", "top_fraction": 0.5}}


def iaa_schedule(epochs: int, update_every: int) -> dict[str, int]:
    """Code: start after epoch 30 of 100 ⇒ start_epoch = round(0.3·E) (at least 1, at most E − 1)."""
    start = min(max(1, round(0.3 * epochs)), max(epochs - 1, 1))
    return {"start_epoch": start, "update_every": update_every, "total_epochs": epochs}


class AblationTrainer(Trainer):
    """The library trainer with two benchmark-only changes: no 'before' test pass, and IAA's estimation pass fixed
    to the released code's (the training images with their training transforms; IAA.estimate runs the model in
    eval mode without gradients), whatever the trainer's default becomes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._skip_before = True

    def _estimation_loader(self) -> DataLoader:
        return DataLoader(self.data.train, batch_size=self.config.data.eval_batch_size, shuffle=False,
                          num_workers=self.config.data.num_workers)

    def evaluate_split(self, split: str, save_embeddings: bool = False) -> dict[str, float] | None:
        if split == "test" and self.step == 0 and self._skip_before:
            return None
        return super().evaluate_split(split, save_embeddings=save_embeddings)


def build_overrides(method: str, args: argparse.Namespace, seed: int) -> tuple[list[str], dict[str, Any]]:
    spec = dict(METHODS[method])
    if method == "ms+iaa":
        spec["synthesis.params"] = {**spec["synthesis.params"], **iaa_schedule(args.epochs, args.iaa_update_every),
                                    "seed": seed}
    elif "synthesis.params" in spec and method in ("ms+das", "pa+sgar", "pa+sgar_top"):
        spec["synthesis.params"] = {**spec["synthesis.params"], "seed": seed}
    if method.startswith("pa") and args.pa_proxy_lr_mult is not None:
        spec["loss.params"] = {**spec["loss.params"], "lr_multiplier": args.pa_proxy_lr_mult}
    common = {
        "name": f"ablation_{method}",
        "data.batch_size": args.batch_size, "data.m_per_class": args.m_per_class,
        "data.max_classes": args.max_classes, "data.batches_per_epoch": args.epoch_length,
        "model.backbone": "kanji_cnn", "model.width": args.width, "model.embedding_size": args.embedding_size,
        "optimizer.name": "adam", "optimizer.lr": args.lr, "optimizer.weight_decay": 0.0,
        "scheduler.name": "none",
        "train.iterations": args.iterations, "train.eval_every": args.eval_every, "train.seed": seed,
        "train.threads": args.threads, "train.progress": False, "train.device": "cpu",
        "evaluation.selection_metric": "map@r",
    }
    merged = {**common, **spec}  # a method's own data/train keys (Proxy-Anchor's sampler) win
    if merged.get("data.sampler") == "random":
        del merged["data.batches_per_epoch"]  # shuffling: one pass per epoch (no epoch-scheduled method uses it)
    overrides = [f"{k}={json.dumps(v)}" for k, v in merged.items()]
    return overrides, merged


def run_one(method: str, seed: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    overrides, merged = build_overrides(method, args, seed)
    config = load_config(None, overrides)
    run_dir = workdir / f"{method.replace('+', '_')}_s{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    trainer = AblationTrainer(config, run_dir)
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    # every step's gate decisions (the train log keeps only every 10th step)
    gate = next((m.gate_counts() for m in trainer.criterion.modules() if isinstance(m, SGAR)), None)
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
        **({"sgar_gate_counts": gate} if gate is not None else {}),
        "overrides": {k: v for k, v in merged.items() if k.startswith(("loss.", "synthesis.", "model.normalize", "evaluation.distance"))
                      or k in PA_TRAINING},
    }


# Each method against its own baseline: same loss, same embedding space, same evaluation distance.
BASELINES = {"ms+iaa": "ms", "ms+das": "ms", "mdr": "triplet_dws", "pa+sgar": "pa", "pa+sgar_top": "pa"}


def paired_delta(runs: list[dict[str, Any]], method: str, baseline: str, key: str) -> dict[str, Any] | None:
    """Per-seed difference method − baseline (percentage points) over the seeds both have."""
    by_seed = {r["seed"]: 100 * r["test"][key] for r in runs if r["method"] == baseline and r.get("test")}
    d = [100 * r["test"][key] - by_seed[r["seed"]] for r in runs
         if r["method"] == method and r.get("test") and r["seed"] in by_seed]
    if not d:
        return None
    return {"mean": statistics.fmean(d), "std": statistics.stdev(d) if len(d) > 1 else 0.0, "values": d}


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
        row["seconds"] = [r["seconds"] for r in rs]
        row["selected_steps"] = [r["selected_step"] for r in rs]
        base = BASELINES.get(m)
        if base is not None and base in methods:
            deltas = {key: paired_delta(runs, m, base, key) for key in ("map@r", "recall@1")}
            if all(deltas.values()):
                row["vs_baseline"] = {"baseline": base, **deltas}
        gates = [r["sgar_gate_counts"] for r in rs if "sgar_gate_counts" in r]
        if gates:
            row["sgar_gate"] = {k: statistics.fmean(g[k] for g in gates) for k in ("sample_fraction", "batch_fraction")}
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (f"{'method':<15}{'seeds':>6}{'MAP@R (%)':>16}{'R@1 (%)':>16}{'Δ MAP@R vs base':>30}{'s/run':>7}"
              "  selected steps")
    lines = [header, "-" * 110]
    for r in rows:
        mr, r1 = r["map@r"], r["recall@1"]
        vs = r.get("vs_baseline")
        delta = f"{vs['map@r']['mean']:+.2f} ± {vs['map@r']['std']:.2f} ({vs['baseline']})" if vs else ""
        gate = r.get("sgar_gate")
        extra = f"  gate open: {100 * gate['sample_fraction']:.1f} % samples, {100 * gate['batch_fraction']:.1f} % batches" if gate else ""
        lines.append(f"{r['method']:<15}{r['n_seeds']:>6}{mr['mean']:>9.2f} ± {mr['std']:<4.2f}"
                     f"{r1['mean']:>9.2f} ± {r1['std']:<4.2f}{delta:>30}{r['mean_seconds']:>7.0f}  {r['selected_steps']}{extra}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=None, help="training iterations per run (default 2000)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--small", action="store_true", help="CI-sized: 12 iterations, 40 classes, 1 seed")
    parser.add_argument("--validations", type=int, default=None,
                        help="validation evaluations per run, incl. the end (default 8, --small 4)")
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
    parser.add_argument("--merge", nargs="*", default=[],
                        help="runs.jsonl files of parallel invocations (same settings) to add to <out>.runs.jsonl")
    args = parser.parse_args()

    if args.small:
        args.iterations = args.iterations or 12
        args.seeds = args.seeds or "0"
        args.max_classes = args.max_classes or 40
        args.epochs = min(args.epochs, 4)
        args.iaa_update_every = 1
    args.iterations = args.iterations or 2000
    args.validations = args.validations or (4 if args.small else 8)
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
    for extra in args.merge:
        for line in Path(extra).read_text().splitlines():
            r = json.loads(line) if line.strip() else None
            if r is not None and (r["method"], r["seed"]) not in done:
                runs.append(r)
                done.add((r["method"], r["seed"]))
                with runs_log.open("a") as f:
                    f.write(json.dumps(r) + "\n")

    torch.set_num_threads(args.threads)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "workdir", "resume", "merge")}
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
            "metrics": "test split (unseen classes), self-retrieval, cosine (mdr and triplet_dws: Euclidean on raw "
                       "embeddings, MDR's protocol); mean ± sample std over seeds, in %; vs_baseline: per-seed "
                       "differences method − baseline in points",
            "iaa": {"settings_used": IAA_CODE_SETTINGS, "legacy_kwargs_at_run": IAA.legacy_kwargs(),
                    "estimation_pass": "every training image once with the training transforms, model.eval(), "
                                       "no gradients (AblationTrainer._estimation_loader)"},
            "baselines": BASELINES}
    if args.merge:
        meta["merged_from"] = args.merge  # parallel invocations: per-run "seconds" are the wall times to compare
    payload = {"meta": meta, "settings": settings,
               "methods": {m: METHODS[m] for m in methods}, "summary": rows, "runs": runs}
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(payload, indent=2))
    tmp_out.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
