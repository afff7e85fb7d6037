"""The "Metric Learning Reality Check" protocol (Musgrave et al., ECCV 2020; methods.md §7.3).

* **Folds.** The n sorted training classes are cut into 4 class-disjoint folds: fold k trains on the contiguous
  (wrap-around) block of 3n/4 classes starting at ⌊k·n/4⌋ and validates on the following n/4
  (:func:`deepmetric.data.splits.reality_check_folds`). Model selection uses only the validation classes.
* **Seeds.** The 4-fold training is repeated with N seeds.
* **Reporting.** *Separated*: the mean over the 4 fold models of their test metrics (128-d each).
  *Concatenated*: the 4 models' L2-normalised test embeddings are concatenated (4×128 = 512-d), renormalised and
  evaluated as one model. Each is given over the seeds as mean ± the half-width of a 95 % Student-t interval.

Training uses the ordinary :class:`~deepmetric.training.trainer.Trainer`; :func:`run_fold` only re-splits its
training data into the fold's train/validation classes before fitting.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepmetric.data.bundle import dataset_labels
from deepmetric.data.splits import indices_of_classes, reality_check_folds
from deepmetric.evaluation import evaluate
from deepmetric.training.config import ConfigError, ExperimentConfig
from deepmetric.training.run_artifacts import read_embeddings
from deepmetric.training.run_dir import create_run_dir
from deepmetric.training.trainer import Trainer, TrainResult

N_FOLDS = 4


# ============================================================================================ statistics ======
@dataclass(frozen=True)
class MeanCI:
    """Mean of n values with the half-width of its two-sided confidence interval (nan when n < 2)."""

    mean: float
    half_width: float
    n: int
    confidence: float = 0.95

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def __str__(self) -> str:
        if math.isnan(self.half_width):
            return f"{self.mean:.4f}"
        return f"{self.mean:.4f} ± {self.half_width:.4f}"

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "ci_half_width": self.half_width, "ci_low": self.low, "ci_high": self.high,
                "n": self.n, "confidence": self.confidence}


def mean_confidence_interval(values: Sequence[float], confidence: float = 0.95) -> MeanCI:
    """Mean ± t_{(1+c)/2, n−1} · s/√n, s the sample (n−1) standard deviation — the interval of the paper's tables."""
    from scipy.stats import t

    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("mean_confidence_interval needs at least one value")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    mean = float(x.mean())
    if x.size < 2:
        return MeanCI(mean, float("nan"), 1, confidence)
    sem = float(x.std(ddof=1)) / math.sqrt(x.size)
    return MeanCI(mean, float(t.ppf((1 + confidence) / 2, df=x.size - 1)) * sem, int(x.size), confidence)


# ============================================================================================ folds ===========
@dataclass(frozen=True)
class Fold:
    index: int
    train_classes: np.ndarray
    val_classes: np.ndarray


def make_folds(train_labels: Sequence[int] | np.ndarray, n_folds: int = N_FOLDS) -> list[Fold]:
    """The class-disjoint folds over the classes present in ``train_labels``."""
    return [Fold(k, tr, va) for k, (tr, va) in enumerate(reality_check_folds(np.asarray(train_labels), n_folds))]


def fold_configs(config: ExperimentConfig, seeds: Sequence[int] = (0,),
                 n_folds: int = N_FOLDS) -> list[tuple[int, int, ExperimentConfig]]:
    """(seed, fold, config) for every run of the protocol.

    Each config is a copy with its seed, a ``-s<seed>-f<fold>`` name suffix and the validation protocol. The
    class split itself is applied by :func:`run_fold` (fold k of the sorted training classes), so the copies set
    ``data.validation_fraction = 0``: the dataset builder must return *all* training classes, which the fold then
    divides.
    """
    if n_folds < 2:
        raise ConfigError(f"Reality Check needs at least 2 folds, got {n_folds}")
    if config.train.protocol == "legacy":
        raise ConfigError("the Reality-Check protocol selects on validation folds; train.protocol must not be 'legacy'")
    runs = []
    for seed in seeds:
        for fold in range(n_folds):
            cfg = copy.deepcopy(config)
            cfg.name = f"{config.name}-s{seed}-f{fold}"
            cfg.train.seed = int(seed)
            cfg.train.protocol = "validation"
            cfg.data.validation_fraction = 0.0
            runs.append((int(seed), fold, cfg))
    return runs


class LabelledSubset:
    """A subset of a dataset that keeps a ``labels`` array (samplers and the trainer read it)."""

    def __init__(self, dataset: Any, indices: np.ndarray) -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(dataset.labels)[self.indices]
        self.channels = getattr(dataset, "channels", 3)

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[int(self.indices[i])]


def apply_fold(trainer: Trainer, fold_index: int, n_folds: int = N_FOLDS) -> Fold:
    """Restrict ``trainer``'s training data to fold ``fold_index``'s training classes and validate on its
    validation classes (with the evaluation transform); rebuilds the sampler. Returns the fold."""
    data = trainer.data
    if data.validation is not None:
        raise ConfigError("apply_fold expects data.validation_fraction = 0 (the fold defines validation)")
    if data.train_eval is None:
        raise ConfigError(
            f"dataset '{trainer.config.data.dataset}' provides no evaluation-transform copy of the training split "
            "(DataBundle.train_eval); the fold's validation classes need one"
        )
    labels = dataset_labels(data.train).numpy()
    fold = make_folds(labels, n_folds)[fold_index]
    data.train = LabelledSubset(data.train, indices_of_classes(labels, fold.train_classes))
    data.validation = LabelledSubset(data.train_eval, indices_of_classes(labels, fold.val_classes))
    trainer.train_labels = dataset_labels(data.train)
    trainer.sampler = trainer._build_sampler()
    return fold


def run_fold(config: ExperimentConfig, fold_index: int, run_dir: str | Path, n_folds: int = N_FOLDS) -> TrainResult:
    """Train one fold into ``run_dir`` (created fresh) and return the trainer's result."""
    create_run_dir(run_dir)
    trainer = Trainer(config, run_dir)
    apply_fold(trainer, fold_index, n_folds)
    return trainer.fit()


# ============================================================================================ reporting =======
def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def concatenate_embeddings(per_model: Sequence[np.ndarray]) -> np.ndarray:
    """Normalise each model's embeddings, concatenate along features and renormalise (the paper's 512-d model)."""
    if not per_model:
        raise ValueError("concatenate_embeddings needs at least one embedding matrix")
    rows = {len(e) for e in per_model}
    if len(rows) != 1:
        raise ValueError(f"all models must embed the same items, got row counts {sorted(rows)}")
    return _unit(np.concatenate([_unit(e) for e in per_model], axis=1))


Evaluator = Callable[[np.ndarray, np.ndarray], Mapping[str, float]]


def default_evaluator(recall_at: Sequence[int] = (1,),
                      metrics: Sequence[str] = ("precision@1", "r_precision", "map@r")) -> Evaluator:
    def run(emb: np.ndarray, labels: np.ndarray) -> Mapping[str, float]:
        return evaluate(emb, labels, recall_at=tuple(recall_at), metrics=tuple(metrics))

    return run


@dataclass
class SeedResult:
    seed: int
    separated: dict[str, float]  # mean over the fold models
    concatenated: dict[str, float]
    per_fold: list[dict[str, float]] = field(default_factory=list)


def evaluate_seed(seed: int, fold_embeddings: Sequence[np.ndarray], labels: np.ndarray,
                  evaluator: Evaluator) -> SeedResult:
    """Separated and concatenated test metrics of one seed's fold models (embeddings of the same test items)."""
    per_fold = [dict(evaluator(_unit(e), labels)) for e in fold_embeddings]
    keys = sorted(set.intersection(*(set(m) for m in per_fold)))
    separated = {k: float(np.mean([m[k] for m in per_fold])) for k in keys}
    concatenated = {k: float(v) for k, v in evaluator(concatenate_embeddings(fold_embeddings), labels).items()}
    return SeedResult(seed, separated, concatenated, per_fold)


def summarize(results: Sequence[SeedResult], confidence: float = 0.95) -> dict[str, dict[str, MeanCI]]:
    """{"separated"|"concatenated": {metric: mean ± CI over seeds}}."""
    if not results:
        raise ValueError("summarize needs at least one seed result")
    out: dict[str, dict[str, MeanCI]] = {}
    for mode in ("separated", "concatenated"):
        keys = sorted(set.intersection(*(set(getattr(r, mode)) for r in results)))
        out[mode] = {k: mean_confidence_interval([getattr(r, mode)[k] for r in results], confidence) for k in keys}
    return out


def format_summary(summary: Mapping[str, Mapping[str, MeanCI]]) -> str:
    """A plain-text table in percent: metric, separated, concatenated."""
    keys = sorted(k for k in set(summary.get("separated", {})) | set(summary.get("concatenated", {}))
                  if not k.startswith("n_"))  # query counts are bookkeeping, not metrics

    def cell(ci: MeanCI | None) -> str:
        if ci is None:
            return "–"
        if math.isnan(ci.half_width):
            return f"{100 * ci.mean:.2f}"
        return f"{100 * ci.mean:.2f} ± {100 * ci.half_width:.2f}"

    lines = [f"{'metric':<14}{'separated':>20}{'concatenated':>20}", "-" * 54]
    for k in keys:
        lines.append(f"{k:<14}{cell(summary.get('separated', {}).get(k)):>20}"
                     f"{cell(summary.get('concatenated', {}).get(k)):>20}")
    return "\n".join(lines)


def run_protocol(config: ExperimentConfig, output: str | Path, seeds: Sequence[int] = (0,),
                 n_folds: int = N_FOLDS, evaluator: Evaluator | None = None) -> dict[str, Any]:
    """Train every (seed, fold), then write and return the separated/concatenated summary.

    Fold runs go to ``output/seed<s>/fold<k>``; ``output/reality_check.json`` holds per-seed and summary numbers.
    Query→gallery datasets are not supported (the paper's benchmarks are all self-retrieval).
    """
    output = Path(output)
    evaluator = evaluator or default_evaluator(config.evaluation.recall_at)
    by_seed: dict[int, list[Path]] = {}
    for seed, fold, cfg in fold_configs(config, seeds, n_folds):
        run_dir = output / f"seed{seed}" / f"fold{fold}"
        run_fold(cfg, fold, run_dir, n_folds)
        by_seed.setdefault(seed, []).append(run_dir)
    results = []
    for seed, dirs in by_seed.items():
        embs, labels = [], None
        for d in dirs:
            saved = read_embeddings(d)
            if saved is None or not saved.self_retrieval:
                raise ConfigError(f"{d}: expected test_embeddings.npy (self-retrieval) after training")
            if labels is not None and not np.array_equal(labels, saved.query_labels):
                raise ConfigError(f"{d}: test labels differ between folds; the test split must be identical")
            labels = saved.query_labels
            embs.append(saved.query)
        results.append(evaluate_seed(seed, embs, labels, evaluator))
    summary = summarize(results)
    payload = {
        "seeds": [r.seed for r in results],
        "per_seed": [{"seed": r.seed, "separated": r.separated, "concatenated": r.concatenated,
                      "per_fold": r.per_fold} for r in results],
        "summary": {mode: {k: ci.as_dict() for k, ci in d.items()} for mode, d in summary.items()},
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "reality_check.json").write_text(json.dumps(payload, indent=2, sort_keys=True))
    return payload
