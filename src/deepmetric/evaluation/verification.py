"""Verification ("same item?") from a :class:`RetrievalResults`: a similarity threshold calibrated for a target
false-match rate, FNMR@FMR, ROC AUC and EER, with scikit-learn's ROC utilities.

A pair (q, j) is *genuine* when y_q = y_j and an *impostor* otherwise; "match" means s_qj ≥ t.
FMR(t) = #{impostor pairs with s ≥ t} / #impostor pairs, FNMR(t) = #{genuine pairs with s < t} / #genuine pairs.

Estimator (stratified, unbiased). Genuine pairs are few (Σ_q R_q) and all of them are scored: FNMR is exact.
Impostor pairs are ~N² and split per query q into two strata: the impostors in q's top-k list (all scored, weight
1) and the n_q^out unlisted impostors, of which m uniformly drawn ones are scored with weight n_q^out / m. Every
unlisted impostor of q scores ≤ the k-th listed score s_q^(k), so FMR(t) is exact for t above max_q s_q^(k) and
its sampling error elsewhere is SE(t) = (1 / N_imp) · sqrt(Σ_q (n_q^out)² · p̂_q(t)(1 − p̂_q(t)) / m), p̂_q(t) the
fraction of q's sampled impostors with s ≥ t (the usual plug-in binomial variance per stratum).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from deepmetric.atomic_files import write_text_atomic
from deepmetric.evaluation.inputs import as_embeddings
from deepmetric.evaluation.relevance import relevant_pairs
from deepmetric.evaluation.results import RetrievalResults
from deepmetric.evaluation.retrieval import prepare, retrieve
from deepmetric.random_source import RandomSource

DEFAULT_FMRS = (1e-2, 1e-3, 1e-4)
#: the false-match rate a training run calibrates its match threshold for
DEFAULT_TARGET_FMR = 1e-3
#: the file beside results.json that holds a run's calibrated threshold
THRESHOLD_FILE = "verification.json"


@dataclass
class PairScores:
    """Scored pairs with their stratum weights (see the module docstring)."""

    scores: np.ndarray  # float64
    genuine: np.ndarray  # bool
    weights: np.ndarray  # float64: 1 for exhaustive strata, n_out / m for sampled impostors
    sampled_row: np.ndarray  # result row of each sampled impostor (−1 for the exhaustive strata)
    n_out: np.ndarray  # per result row: unlisted impostors
    n_sampled: np.ndarray  # per result row: sampled impostors actually drawn
    n_impostor_pairs: float

    def false_match_rate(self, threshold: float) -> tuple[float, float]:
        """(estimated FMR at ``threshold``, its standard error)."""
        imp = ~self.genuine
        hit = self.scores >= threshold
        fmr = float((self.weights * (imp & hit)).sum() / self.n_impostor_pairs)
        sampled = self.sampled_row >= 0
        rows = self.sampled_row[sampled]
        above = np.bincount(rows, weights=hit[sampled].astype(np.float64), minlength=self.n_out.shape[0])
        m = np.maximum(self.n_sampled, 1)
        p = above / m
        var = (self.n_out.astype(np.float64) ** 2 * p * (1 - p) / m)[self.n_sampled > 0].sum()
        return fmr, float(np.sqrt(var) / self.n_impostor_pairs)

    def false_non_match_rate(self, threshold: float) -> float:
        g = self.scores[self.genuine]
        return float((g < threshold).mean()) if g.size else float("nan")


def _dot_rows(a: Tensor, b: Tensor, ia: Tensor, ib: Tensor, chunk: int = 1 << 20) -> Tensor:
    out = torch.empty(ia.shape[0], dtype=torch.float64, device=a.device)
    for p0 in range(0, ia.shape[0], chunk):
        sl = slice(p0, p0 + chunk)
        out[sl] = (a[ia[sl]] * b[ib[sl]]).sum(dim=1).to(torch.float64)
    return out


@torch.no_grad()
def pair_scores(results: RetrievalResults, query: Any, gallery: Any | None = None, *, negatives_per_query: int = 32,
                seed: int = 0) -> PairScores:
    """All genuine pairs, the listed impostors and ``negatives_per_query`` sampled unlisted impostors per query."""
    if results.distance == "euclidean":
        raise ValueError("verification thresholds a similarity: search with distance='cosine' or 'dot'")
    if results.self_retrieval != (gallery is None):
        raise ValueError("pass gallery=None exactly for self-retrieval results (and the gallery otherwise)")
    if results.query_labels is None or results.gallery_labels is None:
        raise ValueError("verification needs labelled results (query and gallery labels)")
    if negatives_per_query < 1:
        raise ValueError(f"negatives_per_query must be ≥ 1, got {negatives_per_query}")
    device = results.neighbour_index.device
    q = prepare(as_embeddings(query, "query", device).float(), results.distance)
    g = q if gallery is None else prepare(as_embeddings(gallery, "gallery", device).float(), results.distance)
    qv = q[results.query_ids]
    gl, ql = results.gallery_labels, results.query_labels
    n = results.n_queries
    n_candidates = results.n_gallery - int(results.self_retrieval)

    gen_row, gen_item = relevant_pairs(ql, gl, results.query_ids if results.self_retrieval else None)
    genuine_scores = _dot_rows(qv, g, gen_row, gen_item)

    listed_imp = ~results.relevant
    listed_scores = results.neighbour_score.to(torch.float64)[listed_imp]
    n_imp = (n_candidates - results.n_relevant).to(torch.float64)
    n_out = n_imp - listed_imp.sum(dim=1).to(torch.float64)

    # rejection sampling of unlisted impostors: a few rounds of candidates, the first valid ones kept per row
    gen = RandomSource(seed).generator(device)
    m = negatives_per_query
    draws = torch.randint(0, results.n_gallery, (n, 4 * m), generator=gen, device=device)
    valid = gl[draws] != ql.unsqueeze(1)
    if results.self_retrieval:
        valid &= draws != results.query_ids.unsqueeze(1)
    step = max(1, (1 << 24) // (4 * m * max(results.k, 1)))
    for r0 in range(0, n, step):  # listed items belong to the exhaustive stratum
        listed = draws[r0 : r0 + step].unsqueeze(2) == results.neighbour_index[r0 : r0 + step].unsqueeze(1)
        valid[r0 : r0 + step] &= ~listed.any(dim=2)
    valid &= valid.cumsum(dim=1) <= m
    rows, cols = torch.nonzero(valid, as_tuple=True)
    sampled_items = draws[rows, cols]
    n_sampled = torch.bincount(rows, minlength=n)
    sampled_scores = _dot_rows(qv, g, rows, sampled_items)
    w = (n_out / n_sampled.clamp_min(1).to(torch.float64))[rows]

    scores = torch.cat([genuine_scores, listed_scores, sampled_scores]).cpu().numpy()
    genuine = np.concatenate([np.ones(genuine_scores.shape[0], bool), np.zeros(listed_scores.shape[0] +
                                                                               sampled_scores.shape[0], bool)])
    weights = np.concatenate([np.ones(genuine_scores.shape[0] + listed_scores.shape[0]), w.cpu().numpy()])
    sampled_row = np.concatenate([np.full(genuine_scores.shape[0] + listed_scores.shape[0], -1, np.int64),
                                  rows.cpu().numpy()])
    # rows whose unlisted impostors could not be drawn (none exist, or all draws rejected) keep their mass out
    missing = (n_out > 0) & (n_sampled == 0)
    n_total = float(n_imp.sum() - n_out[missing].sum())
    return PairScores(scores, genuine, weights, sampled_row, n_out.cpu().numpy(), n_sampled.cpu().numpy(),
                      n_total)


def _roc(ps: PairScores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve

    return roc_curve(ps.genuine, ps.scores, sample_weight=ps.weights, drop_intermediate=False)


def calibrate_threshold(ps: PairScores, target_fmr: float) -> float:
    """The lowest threshold whose estimated FMR is ≤ ``target_fmr`` (so the most genuine pairs match)."""
    if not 0 < target_fmr < 1:
        raise ValueError(f"target_fmr must be in (0, 1), got {target_fmr}")
    fpr, _, thresholds = _roc(ps)
    ok = np.flatnonzero(fpr <= target_fmr)
    return float(thresholds[ok[-1]])


def verification_metrics(ps: PairScores, fmrs: tuple[float, ...] = DEFAULT_FMRS) -> dict[str, float]:
    """ROC AUC, EER and, for each target FMR, the FNMR at the lowest threshold meeting it (and that threshold)."""
    from sklearn.metrics import roc_auc_score

    fpr, tpr, thresholds = _roc(ps)
    fnr = 1 - tpr
    i = int(np.argmin(np.abs(fnr - fpr)))
    out: dict[str, float] = {
        "roc_auc": float(roc_auc_score(ps.genuine, ps.scores, sample_weight=ps.weights)),
        "eer": float((fnr[i] + fpr[i]) / 2),
        "n_genuine_pairs": int(ps.genuine.sum()),
        "n_impostor_pairs": ps.n_impostor_pairs,
        "n_scored_impostors": int((~ps.genuine).sum()),
    }
    for target in fmrs:
        ok = np.flatnonzero(fpr <= target)
        out[f"fnmr@fmr={target:g}"] = float(fnr[ok[-1]])
        out[f"threshold@fmr={target:g}"] = float(thresholds[ok[-1]])
    return out


def threshold_report(ps: PairScores, threshold: float) -> dict[str, float]:
    """Measured FMR (with its standard error) and FNMR of a fixed threshold on these pairs."""
    fmr, se = ps.false_match_rate(threshold)
    return {"threshold": threshold, "fmr": fmr, "fmr_standard_error": se, "fnmr": ps.false_non_match_rate(threshold)}


def calibrate_on_split(embeddings: Any, labels: Any, target_fmr: float = DEFAULT_TARGET_FMR, *,
                       split: str = "validation", negatives_per_query: int = 64, k: int = 100,
                       seed: int = 0) -> dict[str, Any]:
    """A "same item" cosine threshold for ``target_fmr`` calibrated on a labelled split (self-retrieval lists of
    ``k`` plus sampled impostors, see :func:`pair_scores`), with the FMR/FNMR it measured there."""
    lab = np.asarray(labels)
    if lab.ndim != 1 or np.unique(lab).shape[0] < 2:
        raise ValueError(f"the {split} split needs at least two classes to calibrate a match threshold")
    results = retrieve(embeddings, lab, k=min(k, lab.shape[0] - 1), list_metrics=())
    pairs = pair_scores(results, embeddings, negatives_per_query=negatives_per_query, seed=seed)
    threshold = calibrate_threshold(pairs, target_fmr)
    measured = threshold_report(pairs, threshold)
    return {"threshold": threshold, "target_fmr": target_fmr, "calibrated_on": split, "n_items": int(lab.shape[0]),
            "val_fmr": measured["fmr"], "val_fmr_standard_error": measured["fmr_standard_error"],
            "val_fnmr": measured["fnmr"], "rule": "match iff cosine similarity ≥ threshold"}


def write_threshold(path: str | Path, info: dict[str, Any]) -> Path:
    """Write a calibrated threshold as JSON atomically (a reader never sees a half-written file)."""
    return write_text_atomic(json.dumps(info, indent=2, sort_keys=True) + "\n", path)


def read_threshold(path: str | Path) -> dict[str, Any]:
    """A threshold written by :func:`write_threshold`; a clear error naming the file when it is not one."""
    p = Path(path)
    try:
        info = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{p}: cannot read a match threshold ({exc})") from exc
    value = info.get("threshold") if isinstance(info, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{p}: field 'threshold' must be a finite number, got {value!r}")
    return info


__all__ = ["DEFAULT_FMRS", "DEFAULT_TARGET_FMR", "THRESHOLD_FILE", "PairScores", "calibrate_on_split",
           "calibrate_threshold", "pair_scores", "read_threshold", "threshold_report", "verification_metrics",
           "write_threshold"]
