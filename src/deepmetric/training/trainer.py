"""The training loop: iterations, parameter groups, schedules, validation-based model selection, atomic
checkpoints with complete state, exact resumption and NaN detection.

Protocol (methods.md §7): by default the model is selected on the class-disjoint *validation* split and the
test split is evaluated before training (a baseline) and once at the end. ``train.protocol = "legacy"`` selects
on the test split — only to reproduce published tables — and says so loudly.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from deepmetric.data.samplers import MPerClassBatchSampler, RandomBatchSampler
from deepmetric.training.builders import (
    Criterion,
    DataBundle,
    build_criterion,
    build_data,
    build_model,
    build_optimizer,
    build_scheduler,
    dataset_labels,
)
from deepmetric.training.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_atomic
from deepmetric.training.config import ConfigError, ExperimentConfig, config_from_dict, save_config
from deepmetric.training.inference import embed_dataset
from deepmetric.training.loggers import MetricLogger


class TrainingDiverged(RuntimeError):
    """Raised when a loss term becomes NaN/inf; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    before: dict[str, dict[str, float]] = field(default_factory=dict)
    after: dict[str, dict[str, float]] = field(default_factory=dict)
    best_step: int | None = None
    steps: int = 0
    seconds: float = 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available on this machine")
    return device


class Trainer:
    """Builds everything from an :class:`ExperimentConfig` and trains it into ``run_dir``.

    ``distributed`` is a :class:`deepmetric.training.distributed.DistributedContext` (or None): under torchrun
    each rank trains on its class-complete share of the global batch, embeddings are all-gathered so the loss
    sees the global batch, and evaluation metrics are computed once on rank 0.
    """

    def __init__(self, config: ExperimentConfig, run_dir: str | Path, distributed: Any = None) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.dist = distributed
        self.rank = getattr(distributed, "rank", 0)
        self.world_size = getattr(distributed, "world_size", 1)
        self.is_main = self.rank == 0
        tc = config.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        if tc.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=False)
        self.device = getattr(distributed, "device", None) or resolve_device(tc.device)
        if tc.amp not in ("none", "fp16", "bf16"):
            raise ConfigError(f"train.amp must be none, fp16 or bf16, got {tc.amp!r}")
        if tc.amp != "none" and self.device.type != "cuda":
            # bf16 autocast on CPUs without AMX runs hundreds of times slower than fp32; fp16 autocast on CPU is
            # not a supported speed-up either. AMP is a GPU feature here.
            raise ConfigError(f"train.amp={tc.amp!r} is only supported on a CUDA device (got {self.device})")
        if tc.protocol not in ("validation", "legacy"):
            raise ConfigError(f"train.protocol must be 'validation' or 'legacy', got {tc.protocol!r}")
        seed_everything(tc.seed)
        self.data: DataBundle = build_data(config.data, seed=tc.seed, backbone=config.model.backbone)
        self.train_labels = dataset_labels(self.data.train)
        self.num_classes = int(self.train_labels.max()) + 1
        in_channels = getattr(self.data.train, "channels", None)  # None: the backbone default
        self.model = build_model(config.model, in_channels=in_channels).to(self.device)
        self.sampler = self._build_sampler()
        self.criterion: Criterion = build_criterion(
            config, num_classes=self.num_classes, batches_per_epoch=len(self.sampler)
        ).to(self.device)
        self.train_model: nn.Module = self.model
        if self.world_size > 1:
            from deepmetric.training import distributed as dist_utils

            # a temporarily frozen backbone stops producing gradients after wrapping: DDP must tolerate that
            self.train_model = dist_utils.wrap_model(
                self.model, self.dist, find_unused_parameters=config.train.frozen_backbone_iterations > 0
            )
            self.criterion = dist_utils.wrap_criterion(self.criterion, self.dist)
        self.optimizer = build_optimizer(config.optimizer, self.model, self.criterion)
        self.iterations = self._resolve_length()
        self.scheduler = build_scheduler(self._scheduler_in_iterations(), self.optimizer)
        self.scaler = torch.amp.GradScaler("cuda", enabled=tc.amp == "fp16")
        self.logger = MetricLogger(self.run_dir, tc.loggers if self.is_main else [], run_name=config.name,
                                   config=_plain(config))
        self.step = 0
        self.best: dict[str, Any] = {"metric": None, "step": None}
        self.evaluations_without_improvement = 0
        self.before: dict[str, dict[str, float]] = {}
        self.last_epoch_started = -1  # epoch hooks (IAA re-estimation) run once per epoch, also across resumes
        self._frozen_backbone_params: list[nn.Parameter] = []

    # ---------------------------------------------------------------------------------------------- setup ----
    def _build_sampler(self) -> Any:
        dc = self.config.data
        labels = self.train_labels.numpy()
        if dc.sampler == "m_per_class":
            return MPerClassBatchSampler(
                labels, batch_size=dc.batch_size, m=dc.m_per_class, class_choice=dc.class_choice,
                image_choice=dc.image_choice, length=dc.batches_per_epoch, seed=self.config.train.seed,
                rank=self.rank, world_size=self.world_size,
            )
        if dc.sampler == "random":
            if dc.batches_per_epoch is not None:
                raise ConfigError("data.batches_per_epoch applies to the m_per_class sampler only "
                                  "(random sampling is one pass over the data per epoch)")
            return RandomBatchSampler(len(labels), batch_size=dc.batch_size, seed=self.config.train.seed,
                                      rank=self.rank, world_size=self.world_size)
        raise ConfigError(f"unknown data.sampler '{dc.sampler}' (known: m_per_class, random)")

    def _resolve_length(self) -> int:
        """Total iterations: ``train.epochs`` sampler epochs when set, else ``train.iterations``."""
        tc = self.config.train
        if tc.epochs is not None:
            if tc.epochs < 1:
                raise ConfigError(f"train.epochs must be >= 1, got {tc.epochs}")
            return tc.epochs * len(self.sampler)
        if tc.iterations < 1:
            raise ConfigError(f"train.iterations must be >= 1, got {tc.iterations}")
        return tc.iterations

    def _scheduler_in_iterations(self) -> Any:
        """The scheduler config with epoch-based milestones converted to iterations."""
        import dataclasses

        sc = self.config.scheduler
        if sc.unit == "iterations":
            return sc
        if sc.unit != "epochs":
            raise ConfigError(f"scheduler.unit must be 'iterations' or 'epochs', got {sc.unit!r}")
        per_epoch = len(self.sampler)
        return dataclasses.replace(
            sc, unit="iterations", milestones=[m * per_epoch for m in sc.milestones],
            step_size=sc.step_size * per_epoch, warmup_iterations=sc.warmup_iterations * per_epoch,
        )

    def _loader(self) -> DataLoader:
        # A private generator: creating a DataLoader iterator draws a worker base seed from it, and drawing
        # that from the global RNG would make a resumed run (one extra iterator) diverge from an uninterrupted one.
        generator = torch.Generator()
        generator.manual_seed(self.config.train.seed * 1_000_003 + self.sampler.epoch)
        return DataLoader(self.data.train, batch_sampler=self.sampler, num_workers=self.config.data.num_workers,
                          generator=generator)

    # ---------------------------------------------------------------------------------------------- state ----
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "criterion": _unwrap(self.criterion).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": capture_rng_state(),
            "best": dict(self.best),
            "evaluations_without_improvement": self.evaluations_without_improvement,
            "before": self.before,
            "last_epoch_started": self.last_epoch_started,
            "config": _plain(self.config),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.model.load_state_dict(state["model"])
        _unwrap(self.criterion).load_state_dict(state["criterion"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        restore_rng_state(state["rng"])
        self.best = dict(state["best"])
        self.evaluations_without_improvement = int(state["evaluations_without_improvement"])
        self.before = state.get("before", {})
        self.last_epoch_started = int(state.get("last_epoch_started", -1))

    def save_checkpoint(self, name: str = "last.pt") -> Path:
        path = self.run_dir / "checkpoints" / name
        if self.is_main:
            save_atomic(self.state_dict(), path)
        return path

    @classmethod
    def resume(cls, run_dir: str | Path, distributed: Any = None) -> Trainer:
        run_dir = Path(run_dir)
        ckpt_path = run_dir / "checkpoints" / "last.pt"
        state = load_checkpoint(ckpt_path)
        config = config_from_dict(state["config"], source=str(ckpt_path))
        trainer = cls(config, run_dir, distributed=distributed)
        trainer.load_state_dict(state)
        return trainer

    # ---------------------------------------------------------------------------------------------- eval -----
    def evaluate_split(self, split: str, save_embeddings: bool = False) -> dict[str, float] | None:
        """Embed ``split`` ("validation" | "test") and compute the configured retrieval metrics.

        Self-retrieval (query = gallery, own row excluded) unless the dataset is a query→gallery benchmark.
        With ``save_embeddings`` the embeddings and labels are written to the run directory (used by
        ``deepmetric report``).
        """
        from deepmetric.evaluation import evaluate

        ec = self.config.evaluation
        kwargs = {"metrics": tuple(ec.metrics), "distance": ec.distance}
        if split == "test" and self.data.query is not None:
            q, ql = self._embed(self.data.query, "query")
            g, gl = self._embed(self.data.gallery, "gallery")
            if not self.is_main:
                return None
            if save_embeddings:
                for name, arr in (("query_embeddings", q), ("query_labels", ql), ("gallery_embeddings", g),
                                  ("gallery_labels", gl)):
                    np.save(self.run_dir / f"{name}.npy", arr.numpy())
            recall_at = tuple(k for k in ec.recall_at if k <= len(gl)) or (1,)
            return evaluate(q, ql, g, gl, recall_at=recall_at, **kwargs)
        dataset = {"validation": self.data.validation, "test": self.data.test}[split]
        if dataset is None:
            return None
        emb, labels = self._embed(dataset, split)
        if not self.is_main:
            return None
        if save_embeddings:
            np.save(self.run_dir / f"{split}_embeddings.npy", emb.numpy())
            np.save(self.run_dir / f"{split}_labels.npy", labels.numpy())
        recall_at = tuple(k for k in ec.recall_at if k < len(labels)) or (1,)
        return evaluate(emb, labels, recall_at=recall_at, **kwargs)

    def _embed(self, dataset: Dataset, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.world_size > 1:
            from deepmetric.training import distributed as dist_utils

            return dist_utils.embed_dataset_distributed(
                self.model, dataset, self.dist, batch_size=self.config.data.eval_batch_size
            )
        return embed_dataset(self.model, dataset, batch_size=self.config.data.eval_batch_size,
                             device=self.device, num_workers=self.config.data.num_workers,
                             progress=self.config.train.progress, description=f"embed {split}")

    def _selection_split(self) -> str:
        if self.config.train.protocol == "legacy":
            return "test"
        return "validation" if self.data.validation is not None else "none"

    # ---------------------------------------------------------------------------------------------- train ----
    def _set_backbone_frozen(self, frozen: bool) -> None:
        backbone = getattr(self.model, "backbone", None)
        if backbone is None:
            return
        if frozen:
            self._frozen_backbone_params = [p for p in backbone.parameters() if p.requires_grad]
            for p in self._frozen_backbone_params:
                p.requires_grad_(False)
        else:
            for p in self._frozen_backbone_params:
                p.requires_grad_(True)
            self._frozen_backbone_params = []

    def _autocast(self) -> Any:
        amp = self.config.train.amp
        if amp == "none":
            return torch.autocast(device_type=self.device.type, enabled=False)
        dtype = torch.float16 if amp == "fp16" else torch.bfloat16
        return torch.autocast(device_type="cuda", dtype=dtype)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        self.train_model.train()
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with self._autocast():
            if self.criterion_needs_features:
                embeddings, features = self.train_model(images, return_features=True)
            else:
                features = None
                embeddings = self.train_model(images)
        if self.world_size > 1:
            from deepmetric.training import distributed as dist_utils

            embeddings, labels = dist_utils.all_gather_embeddings(embeddings, labels, self.dist)
        epoch = self.sampler.epoch
        loss, logs = self.criterion(embeddings.float(), labels, features=features, head=self.model.head,
                                    step=self.step + 1, epoch=epoch)
        if self.world_size > 1:
            loss = loss * self.world_size  # see distributed.all_gather_embeddings: DDP averages over ranks
        bad = {k: v for k, v in logs.items() if not math.isfinite(v)}
        if not torch.isfinite(loss.detach()) or bad:
            term = ", ".join(sorted(bad)) if bad else "loss"
            # parameters are still those of the last good step: keep them as the checkpoint
            path = self.save_checkpoint("last.pt")
            self.logger.log({"step": self.step + 1, "event": "diverged", "terms": term})
            raise TrainingDiverged(
                f"non-finite loss at step {self.step + 1} in term(s): {term}; "
                f"the last good state is kept in {path}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        if not loss.requires_grad:
            # a constant loss (e.g. nothing mined by a custom loss that returns a plain zero): nothing to learn
            loss = loss + 0.0 * sum(p.sum() for p in self.model.parameters() if p.requires_grad)
        self.scaler.scale(loss).backward()
        if self.world_size > 1:
            from deepmetric.training import distributed as dist_utils

            dist_utils.sync_loss_parameter_grads(self.criterion)  # proxies/margins stay identical on all ranks
        oc = self.config.optimizer
        if oc.grad_clip_value is not None or oc.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            if oc.grad_clip_value is not None:
                torch.nn.utils.clip_grad_value_(params, oc.grad_clip_value)
            if oc.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, oc.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if not isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step()
        return logs

    @property
    def criterion_needs_features(self) -> bool:
        return bool(getattr(_unwrap(self.criterion), "needs_features", False))

    def _on_epoch_start(self, epoch: int) -> None:
        hook = getattr(getattr(_unwrap(self.criterion), "synthesis", None), "on_epoch_start", None)
        if hook is not None:
            hook(epoch, self.model, self._estimation_loader())

    def _estimation_loader(self) -> DataLoader:
        dataset = self.data.train_eval or self.data.train
        return DataLoader(dataset, batch_size=self.config.data.eval_batch_size, shuffle=False,
                          num_workers=self.config.data.num_workers)

    def _validate(self) -> bool:
        """Evaluate the selection split; keep the best weights; return True when early stopping triggers."""
        split = self._selection_split()
        if split == "none":
            return False
        metrics = self.evaluate_split(split)
        stop = False
        if self.is_main and metrics is not None:
            key = self.config.evaluation.selection_metric
            if key not in metrics:
                raise ConfigError(f"evaluation.selection_metric '{key}' not among computed metrics {sorted(metrics)}")
            value = metrics[key]
            self.logger.log({"step": self.step, "split": split, **metrics})
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step(value)
            if self.best["metric"] is None or value > self.best["metric"]:
                self.best = {"metric": value, "step": self.step, "split": split, "key": key}
                self.evaluations_without_improvement = 0
                save_atomic({"model": self.model.state_dict(), "step": self.step, "metric": value},
                            self.run_dir / "checkpoints" / "best.pt")
            else:
                self.evaluations_without_improvement += 1
            patience = self.config.train.early_stopping_patience
            stop = patience is not None and self.evaluations_without_improvement > patience
        if self.world_size > 1:
            from deepmetric.training import distributed as dist_utils

            stop = bool(dist_utils.broadcast_object(stop, self.dist))
        return stop

    def fit(self) -> TrainResult:
        tc = self.config.train
        start_time = time.perf_counter()
        if self.is_main:
            save_config(self.config, self.run_dir / "config.yaml")
            if tc.protocol == "legacy":
                print("WARNING: protocol=legacy selects the model on the TEST split. Use it only to reproduce "
                      "published tables; these numbers are optimistically biased.")
        if self.step == 0:
            self.before = {}
            metrics = self.evaluate_split("test")  # untrained baseline; never used for selection
            if metrics is not None:
                self.before["test"] = metrics
                self.logger.log({"step": 0, "split": "test", "phase": "before", **metrics})
        iterations = self.iterations
        loader_iter = None
        progress = tqdm(total=iterations, initial=self.step, desc="train", disable=not (tc.progress and self.is_main),
                        dynamic_ncols=True)
        images_seen, window_start = 0, time.perf_counter()
        stopped_early = False
        while self.step < iterations:
            if loader_iter is None:
                loader_iter = iter(self._loader())
            try:
                images, labels = next(loader_iter)
            except StopIteration:
                loader_iter = None
                continue
            if self.sampler.epoch > self.last_epoch_started:
                self.last_epoch_started = self.sampler.epoch
                self._on_epoch_start(self.last_epoch_started)
            freeze = self.step < tc.frozen_backbone_iterations
            if freeze and not self._frozen_backbone_params:
                self._set_backbone_frozen(True)
            elif not freeze and self._frozen_backbone_params:
                self._set_backbone_frozen(False)
            logs = self.train_step(images, labels)
            self.step += 1
            images_seen += len(images)
            elapsed = time.perf_counter() - window_start
            if self.is_main and (self.step % 10 == 0 or self.step == iterations):
                rate = images_seen * self.world_size / max(elapsed, 1e-9)
                progress.set_postfix(loss=f"{logs['loss']:.4f}", img_s=f"{rate:.0f}")
                self.logger.log({"step": self.step, "split": "train", "lr": self.optimizer.param_groups[0]["lr"],
                                 "images_per_second": rate, **logs})
                images_seen, window_start = 0, time.perf_counter()
            progress.update(1)
            validate_now = tc.eval_every and self.step % tc.eval_every == 0 and self.step < iterations
            if validate_now and self._validate():
                stopped_early = True
                self.save_checkpoint("last.pt")
                break
            if tc.checkpoint_every and self.step % tc.checkpoint_every == 0:
                self.save_checkpoint("last.pt")
        progress.close()
        if not stopped_early:
            self._validate()
        self.save_checkpoint("last.pt")
        if self.best["step"] is not None and self.best["step"] != self.step:
            best = load_checkpoint(self.run_dir / "checkpoints" / "best.pt", map_location=self.device)
            self.model.load_state_dict(best["model"])
        after = {}
        metrics = self.evaluate_split("test", save_embeddings=True)
        if metrics is not None:
            after["test"] = metrics
            self.logger.log({"step": self.step, "split": "test", "phase": "after",
                             "selected_step": self.best["step"], **metrics})
        result = TrainResult(run_dir=self.run_dir, before=self.before, after=after, best_step=self.best["step"],
                             steps=self.step, seconds=time.perf_counter() - start_time)
        if self.is_main:
            self._write_results(result)
        self.logger.close()
        return result

    def _write_results(self, result: TrainResult) -> None:
        save_atomic(self.model.state_dict(), self.run_dir / "model.pt")
        payload = {
            "name": self.config.name,
            "protocol": self.config.train.protocol,
            "selected_step": result.best_step,
            "selection": self.best,
            "steps": result.steps,
            "seconds": round(result.seconds, 2),
            "before": result.before,
            "after": result.after,
        }
        (self.run_dir / "results.json").write_text(json.dumps(payload, indent=2, sort_keys=True))


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def _plain(config: ExperimentConfig) -> dict[str, Any]:
    from deepmetric.training.config import config_to_dict

    return config_to_dict(config)


def format_results_table(result: TrainResult, keys: tuple[str, ...] = ()) -> str:
    """A plain-text table of test metrics before and after training."""
    before = result.before.get("test", {})
    after = result.after.get("test", {})
    keys = keys or tuple(k for k in after if k.startswith("recall@") or k in ("precision@1", "r_precision",
                                                                                "map@r", "nmi", "f1"))
    lines = [f"{'metric':<14}{'before':>10}{'after':>10}", "-" * 34]
    for k in keys:
        b, a = before.get(k), after.get(k)
        lines.append(f"{k:<14}{_fmt(b):>10}{_fmt(a):>10}")
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"
