"""Evaluating the splits of an experiment during training, and selecting the model on them.

:class:`SplitEvaluator` embeds a split (every rank a contiguous shard, gathered on rank 0) and computes the
configured retrieval metrics once, on rank 0. :class:`ModelSelection` keeps the best weights by the selection
metric and decides early stopping. Protocol (methods.md §7): the selection split is the class-disjoint
validation split; ``train.protocol = "legacy"`` selects on the test split, only to reproduce published tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from deepmetric.config_errors import ConfigError
from deepmetric.data.bundle import DataBundle, dataset_labels
from deepmetric.evaluation import evaluate
from deepmetric.training.checkpoint import save_atomic
from deepmetric.training.config import ExperimentConfig
from deepmetric.training.distributed import DistributedContext, embed_dataset_distributed
from deepmetric.training.guards import CHANCE_AFTER_FRACTION, CHANCE_WARNING, chance_levels, chance_warning
from deepmetric.training.progress import is_terminal


class SplitEvaluator:
    """``evaluator(split, save_embeddings=False)``: the retrieval metrics of ``model`` on a split of ``data``.

    Self-retrieval (query = gallery, own row excluded) unless the dataset is a query→gallery benchmark. Returns
    None on ranks other than 0 and for a split the data does not have. With ``save_embeddings`` the embeddings
    and labels are written to ``run_dir`` (read by ``deepmetric report``). ``data`` is read at each call, so a
    caller may replace its splits (the Reality-Check folds do).
    """

    def __init__(self, model: nn.Module, data: DataBundle, config: ExperimentConfig, context: DistributedContext,
                 device: torch.device, run_dir: Path) -> None:
        self.model, self.data, self.config = model, data, config
        self.context, self.device, self.run_dir = context, device, run_dir

    def __call__(self, split: str, save_embeddings: bool = False) -> dict[str, float] | None:
        ec = self.config.evaluation
        kwargs: dict[str, Any] = {"metrics": tuple(ec.metrics), "distance": ec.distance}
        if split == "test" and self.data.query is not None:
            q, ql = self._embed(self.data.query, "query")
            g, gl = self._embed(self.data.gallery, "gallery")
            if not self.context.is_main:
                return None
            if save_embeddings:
                self._save({"query_embeddings": q, "query_labels": ql, "gallery_embeddings": g,
                            "gallery_labels": gl})
            recall_at = tuple(k for k in ec.recall_at if k <= len(gl)) or (1,)
            return evaluate(q, ql, g, gl, recall_at=recall_at, **kwargs)
        dataset = {"validation": self.data.validation, "test": self.data.test}[split]
        if dataset is None:
            return None
        embeddings, labels = self._embed(dataset, split)
        if not self.context.is_main:
            return None
        if save_embeddings:
            self._save({f"{split}_embeddings": embeddings, f"{split}_labels": labels})
        recall_at = tuple(k for k in ec.recall_at if k < len(labels)) or (1,)
        return evaluate(embeddings, labels, recall_at=recall_at, **kwargs)

    def chance_warning(self, split: str, metrics: dict[str, float], step: int, iterations: int) -> str | None:
        """A warning when ``metrics`` of ``split`` sit at the chance level of a random ranking of that split
        (:func:`~deepmetric.training.guards.chance_warning`), judged once a quarter of the run has trained."""
        if step < CHANCE_AFTER_FRACTION * iterations:
            return None
        if split == "test" and self.data.query is not None:
            query, gallery = dataset_labels(self.data.query), dataset_labels(self.data.gallery)
            chance = chance_levels(query.numpy(), gallery.numpy())
        else:
            dataset = {"validation": self.data.validation, "test": self.data.test}[split]
            if dataset is None:
                return None
            chance = chance_levels(dataset_labels(dataset).numpy())
        return chance_warning(split, metrics, chance, step)

    def warn_at_chance(self, split: str, metrics: dict[str, float], step: int, iterations: int,
                       warnings: list[str]) -> None:
        """Print :meth:`chance_warning` loudly and append it to the run's ``warnings`` (results.json), once."""
        message = self.chance_warning(split, metrics, step, iterations)
        if message and not any(w.startswith(CHANCE_WARNING) for w in warnings):
            warnings.append(message)
            print(message, flush=True)

    def _embed(self, dataset: Dataset | None, split: str) -> tuple[Any, Any]:
        # bars only on a terminal: in a log file their redraws are kilobytes of carriage returns
        dc, progress = self.config.data, self.config.train.progress and self.context.is_main and is_terminal()
        return embed_dataset_distributed(
            self.model, dataset, self.context, batch_size=dc.eval_batch_size, device=self.device,
            num_workers=dc.num_workers, progress=progress, description=f"embed {split}",
        )

    def _save(self, arrays: dict[str, torch.Tensor]) -> None:
        for name, array in arrays.items():
            np.save(self.run_dir / f"{name}.npy", array.numpy())


def selection_split(config: ExperimentConfig, data: DataBundle) -> str:
    """The split the model is selected on: "validation", "test" (legacy protocol) or "none"."""
    if config.train.protocol == "legacy":
        return "test"
    return "validation" if data.validation is not None else "none"


@dataclass
class ModelSelection:
    """The best evaluation of a run by ``metric`` (higher is better), its weights saved to ``best_path``.

    :meth:`update` returns True when early stopping triggers: more than ``patience`` evaluations in a row
    without improvement (``patience=None``: never).
    """

    metric: str
    best_path: Path
    patience: int | None = None
    best: dict[str, Any] = field(default_factory=lambda: {"metric": None, "step": None})
    evaluations_without_improvement: int = 0

    def update(self, metrics: dict[str, float], step: int, split: str, model: nn.Module) -> bool:
        if self.metric not in metrics:
            raise ConfigError(
                f"evaluation.selection_metric '{self.metric}' not among computed metrics {sorted(metrics)}"
            )
        value = metrics[self.metric]
        if self.best["metric"] is None or value > self.best["metric"]:
            self.best = {"metric": value, "step": step, "split": split, "key": self.metric}
            self.evaluations_without_improvement = 0
            save_atomic({"model": model.state_dict(), "step": step, "metric": value}, self.best_path)
        else:
            self.evaluations_without_improvement += 1
        return self.patience is not None and self.evaluations_without_improvement > self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": dict(self.best), "evaluations_without_improvement": self.evaluations_without_improvement}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = dict(state["best"])
        self.evaluations_without_improvement = int(state["evaluations_without_improvement"])


def format_results_table(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]],
                         keys: tuple[str, ...] = ()) -> str:
    """A plain-text table of test metrics (in %) before and after training."""
    before_test, after_test = before.get("test", {}), after.get("test", {})
    keys = keys or tuple(k for k in after_test if k.startswith("recall@") or k in ("precision@1", "r_precision",
                                                                                     "map@r", "nmi", "f1"))
    lines = [f"{'metric':<14}{'before':>10}{'after':>10}", "-" * 34]
    for k in keys:
        lines.append(f"{k:<14}{_percent(before_test.get(k)):>10}{_percent(after_test.get(k)):>10}")
    return "\n".join(lines)


def _percent(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"
