"""The training loop: iterations, parameter groups, schedules, validation-based model selection, atomic
checkpoints with complete state, exact resumption and NaN detection.

Protocol (methods.md §7): by default the model is selected on the class-disjoint *validation* split and the
test split is evaluated before training (a baseline) and once at the end. ``train.protocol = "legacy"`` selects
on the test split — only to reproduce published tables — and says so loudly.

One loop serves one process and ``torchrun``: the distributed helpers are called on every step and are
identities without a process group (:mod:`deepmetric.training.distributed`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from deepmetric.atomic_files import write_text_atomic
from deepmetric.config_errors import ConfigError
from deepmetric.data.bundle import DataBundle, build_data, dataset_labels
from deepmetric.data.samplers import MPerClassBatchSampler, RandomBatchSampler, build_sampler
from deepmetric.data.transforms import input_channels
from deepmetric.models.factory import build_model
from deepmetric.training import guards, verification_threshold
from deepmetric.training.builders import build_optimizer, build_scheduler
from deepmetric.training.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_atomic
from deepmetric.training.config import (
    ExperimentConfig,
    check_config,
    config_to_dict,
    save_config,
)
from deepmetric.training.criterion import Criterion, build_criterion
from deepmetric.training.distributed import (
    DistributedContext,
    all_gather_embeddings,
    broadcast_object,
    get_context,
    scale_for_ddp,
    sync_loss_parameter_grads,
    wrap_criterion,
    wrap_model,
)
from deepmetric.training.guards import DivergenceGuard, TrainingDiverged, collapse_message, embedding_spread
from deepmetric.training.loggers import MetricLogger
from deepmetric.training.process_group import resolve_device, seed_everything
from deepmetric.training.progress import TrainProgress
from deepmetric.training.resume import resumed_config, truncate_metrics
from deepmetric.training.selection import ModelSelection, SplitEvaluator, selection_split

__all__ = ["TrainResult", "Trainer", "TrainingDiverged", "resolve_device", "seed_everything"]  # + re-exports


@dataclass
class TrainResult:
    run_dir: Path
    before: dict[str, dict[str, float]] = field(default_factory=dict)
    after: dict[str, dict[str, float]] = field(default_factory=dict)
    best_step: int | None = None
    steps: int = 0
    seconds: float = 0.0  # wall time of every segment of the run (a resumed run adds its earlier ones)
    warnings: list[str] = field(default_factory=list)


class Trainer:
    """Builds everything from an :class:`ExperimentConfig` and trains it into ``run_dir``.

    ``distributed`` is the :class:`~deepmetric.training.distributed.DistributedContext` of this process (default:
    the active process group's, or one process): under torchrun each rank trains on its class-complete share of
    the global batch, embeddings are all-gathered so the loss sees the global batch, and evaluation metrics are
    computed once on rank 0.
    """

    def __init__(self, config: ExperimentConfig, run_dir: str | Path,
                 distributed: DistributedContext | None = None) -> None:
        self.config = check_config(config)
        self.run_dir = Path(run_dir)
        self.dist = distributed if distributed is not None else get_context()
        self.is_main = self.dist.is_main
        tc = config.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        if tc.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=False)
        self.device = self.dist.device if self.dist.is_distributed else resolve_device(tc.device)
        if tc.amp != "none" and self.device.type != "cuda":
            # bf16 autocast on CPUs without AMX runs hundreds of times slower than fp32; fp16 autocast on CPU is
            # not a supported speed-up either. AMP is a GPU feature here.
            raise ConfigError(f"train.amp={tc.amp!r} is only supported on a CUDA device (got {self.device})")
        seed_everything(tc.seed)
        self.data: DataBundle = build_data(config.data, seed=tc.seed, backbone=config.model.backbone)
        self.train_labels = dataset_labels(self.data.train)
        self.num_classes = int(self.train_labels.max()) + 1
        self.model = build_model(config.model, input_channels(config.data, config.model.backbone)).to(self.device)
        self.sampler = self._build_sampler()
        criterion = build_criterion(config, num_classes=self.num_classes, batches_per_epoch=len(self.sampler))
        # not DDP: every rank evaluates the same global-batch loss; gradient hooks undo the W·L scaling
        self.criterion: Criterion = wrap_criterion(criterion.to(self.device), self.dist)
        # a temporarily frozen backbone stops producing gradients after wrapping: DDP must tolerate that
        self.train_model: nn.Module = wrap_model(self.model, self.dist,
                                                 find_unused_parameters=tc.frozen_backbone_iterations > 0)
        self.optimizer = build_optimizer(config.optimizer, self.model, self.criterion)
        self.iterations = tc.total_iterations(len(self.sampler))
        self.scheduler = build_scheduler(config.scheduler.in_iterations(len(self.sampler)), self.optimizer)
        self.scaler = torch.amp.GradScaler("cuda", enabled=tc.amp == "fp16")
        self.logger = MetricLogger(self.run_dir, tc.loggers if self.is_main else [], run_name=config.name,
                                   config=config_to_dict(config))
        self.evaluator = SplitEvaluator(self.model, self.data, config, self.dist, self.device, self.run_dir)
        self.selection = ModelSelection(config.evaluation.selection_metric, self.run_dir / "checkpoints" / "best.pt",
                                        patience=tc.early_stopping_patience)
        self.guard = DivergenceGuard({"model": self.model, "criterion": self.criterion},
                                     self.run_dir / "checkpoints" / "last.pt", self.save_checkpoint, self.logger.log)
        self.step = 0
        self.seconds_before = 0.0  # wall time of the earlier segments of a resumed run
        self._segment_start = time.perf_counter()
        self.warnings: list[str] = []
        self.resumed_changes: list[str] = []
        self.before: dict[str, dict[str, float]] = {}
        self.last_epoch_started = -1  # epoch hooks (IAA re-estimation) run once per epoch, also across resumes
        self._frozen_backbone_params: list[nn.Parameter] = []

    # ---------------------------------------------------------------------------------------------- setup ----
    def _build_sampler(self) -> MPerClassBatchSampler | RandomBatchSampler:
        return build_sampler(self.config.data, self.train_labels.numpy(), seed=self.config.train.seed,
                             rank=self.dist.rank, world_size=self.dist.world_size)

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
            "criterion": self.criterion.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": capture_rng_state(),
            **self.selection.state_dict(),
            "before": self.before,
            "last_epoch_started": self.last_epoch_started,
            "seconds": self.seconds_before + time.perf_counter() - self._segment_start,
            "warnings": list(self.warnings),
            "config": config_to_dict(self.config),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.model.load_state_dict(state["model"])
        self.criterion.load_state_dict(state["criterion"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        restore_rng_state(state["rng"])
        self.selection.load_state_dict(state)
        self.before = state.get("before", {})
        self.last_epoch_started = int(state.get("last_epoch_started", -1))
        self.seconds_before = float(state.get("seconds", 0.0))
        self.warnings = list(state.get("warnings", []))

    @property
    def best(self) -> dict[str, Any]:
        """The best evaluation so far: ``metric``, ``step`` (None before any), ``split``, ``key``."""
        return self.selection.best

    def save_checkpoint(self, name: str = "last.pt") -> Path:
        path = self.run_dir / "checkpoints" / name
        if self.is_main:
            save_atomic(self.state_dict(), path)
        return path

    @classmethod
    def resume(cls, run_dir: str | Path, distributed: DistributedContext | None = None,
               overrides: list[str] | None = None) -> Trainer:
        """The trainer of ``run_dir`` at its last checkpoint; ``overrides`` may change only what
        :data:`~deepmetric.training.resume.SAFE_ON_RESUME` lists (others raise ConfigError naming them)."""
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"--resume: run directory not found: {run_dir}")
        ckpt_path = run_dir / "checkpoints" / "last.pt"
        state = load_checkpoint(ckpt_path)
        config, changed = resumed_config(state["config"], overrides or [], str(ckpt_path))
        trainer = cls(config, run_dir, distributed=distributed)
        trainer.load_state_dict(state)
        trainer.resumed_changes = changed
        if trainer.is_main and not trainer.finished:
            truncate_metrics(run_dir / "metrics.jsonl", trainer.step)  # the tail after the checkpoint reruns
        return trainer

    @property
    def finished(self) -> bool:
        """True when the run reached its length and wrote its results (resuming it has nothing to do)."""
        return self.step >= self.iterations and (self.run_dir / "results.json").is_file()

    # ---------------------------------------------------------------------------------------------- eval -----
    def evaluate_split(self, split: str, save_embeddings: bool = False) -> dict[str, float] | None:
        """The retrieval metrics on ``split`` ("validation" | "test"); None off rank 0 or without that split."""
        return self.evaluator(split, save_embeddings=save_embeddings)

    def _validate(self, progress: TrainProgress | None = None) -> bool:
        """Evaluate the selection split; keep the best weights; return True when early stopping triggers."""
        split = selection_split(self.config, self.data)
        if split == "none":
            return False
        metrics = self.evaluate_split(split)
        stop = False
        if metrics is not None:  # rank 0
            stop = self.selection.update(metrics, self.step, split, self.model)
            self.logger.log({"step": self.step, "split": split, **metrics})
            self.evaluator.warn_at_chance(split, metrics, self.step, self.iterations, self.warnings)
            if progress is not None:
                key = self.selection.metric
                progress.note(f"{split} at step {self.step}: {key} {100 * metrics[key]:.2f} "
                              f"(best {100 * self.best['metric']:.2f} at step {self.best['step']})")
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step(metrics[self.selection.metric])
        return bool(broadcast_object(stop, self.dist))

    # ---------------------------------------------------------------------------------------------- train ----
    def _set_backbone_frozen(self, frozen: bool) -> None:
        if frozen:
            self._frozen_backbone_params = [p for p in self.model.backbone.parameters() if p.requires_grad]
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
            if self.criterion.needs_features:
                embeddings, features = self.train_model(images, return_features=True)
            else:
                embeddings, features = self.train_model(images), None
        # the global batch on every rank, only the local rows in this rank's graph (identity in one process)
        embeddings, labels = all_gather_embeddings(embeddings, labels, self.dist)
        loss, logs = self.criterion(embeddings.float(), labels, features=features, head=self.model.head,
                                    step=self.step + 1, epoch=self.sampler.epoch)
        self.guard.check_loss(self.step + 1, loss, logs)
        if (self.step + 1) % 10 == 0 or self.step == 0:
            logs["embedding_spread"] = spread = embedding_spread(embeddings)
            if spread < guards.COLLAPSE_SPREAD and self.is_main and not any("collapsed" in w for w in self.warnings):
                self.warnings.append(collapse_message(self.step + 1, spread, self.config.optimizer.lr))
                print(self.warnings[-1], flush=True)
        self.optimizer.zero_grad(set_to_none=True)
        if not loss.requires_grad:
            # a constant loss (e.g. nothing mined by a custom loss that returns a plain zero): nothing to learn
            loss = loss + 0.0 * sum(p.sum() for p in self.model.parameters() if p.requires_grad)
        self.scaler.scale(scale_for_ddp(loss)).backward()
        sync_loss_parameter_grads(self.criterion)  # proxies/margins stay identical on all ranks
        self._clip_gradients()
        self.guard.check_tensors(self.step + 1, grads=False)  # the forward pass updates normalisation buffers
        if not self.scaler.is_enabled():  # with fp16 loss scaling an inf gradient only skips the step
            self.guard.check_tensors(self.step + 1, grads=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.guard.check_tensors(self.step + 1, grads=False)
        if not isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step()
        return logs

    def _clip_gradients(self) -> None:
        oc = self.config.optimizer
        if oc.grad_clip_value is None and oc.grad_clip_norm is None:
            return
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if oc.grad_clip_value is not None:
            torch.nn.utils.clip_grad_value_(params, oc.grad_clip_value)
        if oc.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, oc.grad_clip_norm)

    def _on_epoch_start(self, epoch: int) -> None:
        self.criterion.on_epoch_start(epoch, self.model, self._estimation_loader())

    def _estimation_loader(self) -> DataLoader:
        dataset = self.criterion.estimation_dataset(self.data.train, self.data.train_eval)
        return DataLoader(dataset, batch_size=self.config.data.eval_batch_size, shuffle=False,
                          num_workers=self.config.data.num_workers)

    def fit(self) -> TrainResult:
        tc = self.config.train
        self._segment_start = time.perf_counter()
        if self.is_main:
            save_config(self.config, self.run_dir / "config.yaml")
            if tc.protocol == "legacy":
                print("WARNING: protocol=legacy selects the model on the TEST split. Use it only to reproduce "
                      "published tables; these numbers are optimistically biased.")
            if self.data.skipped_images:
                self.warnings.append(self.data.skipped_message())
                print(self.warnings[-1], flush=True)
        if self.step == 0:
            self.before = {}
            metrics = self.evaluate_split("test")  # untrained baseline; never used for selection
            if metrics is not None:
                self.before["test"] = metrics
                self.logger.log({"step": 0, "split": "test", "phase": "before", **metrics})
        iterations = self.iterations
        loader_iter = None
        progress = TrainProgress(iterations, self.step, enabled=tc.progress and self.is_main)
        images_seen, window_start = 0, time.perf_counter()
        loss_value: float | None = None
        rate: float | None = None
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
                rate = images_seen * self.dist.world_size / max(elapsed, 1e-9)
                loss_value = logs["loss"]
                self.logger.log({"step": self.step, "split": "train", "lr": self.optimizer.param_groups[0]["lr"],
                                 "images_per_second": rate, **logs})
                images_seen, window_start = 0, time.perf_counter()
            progress.update(self.step, loss_value, rate)
            validate_now = tc.eval_every and self.step % tc.eval_every == 0 and self.step < iterations
            if validate_now and self._validate(progress):
                stopped_early = True
                self.save_checkpoint("last.pt")
                break
            if tc.checkpoint_every and self.step % tc.checkpoint_every == 0:
                self.save_checkpoint("last.pt")
        progress.close()
        if not stopped_early:
            self._validate(progress)
        self.save_checkpoint("last.pt")
        if self.best["step"] is not None and self.best["step"] != self.step:
            best = load_checkpoint(self.selection.best_path, map_location=self.device)
            self.model.load_state_dict(best["model"])
        after = {}
        metrics = self.evaluate_split("test", save_embeddings=True)
        if metrics is not None:
            after["test"] = metrics
            self.logger.log({"step": self.step, "split": "test", "phase": "after",
                             "selected_step": self.best["step"], **metrics})
        verification_threshold.save_verification_threshold(self.evaluator, self.best["step"])  # verification.json
        seconds = self.seconds_before + time.perf_counter() - self._segment_start
        result = TrainResult(run_dir=self.run_dir, before=self.before, after=after, best_step=self.best["step"],
                             steps=self.step, seconds=seconds, warnings=list(self.warnings))
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
            "seconds": round(result.seconds, 2),  # every segment of a resumed run
            "before": result.before,
            "after": result.after,
            "warnings": result.warnings,
        }
        write_text_atomic(json.dumps(payload, indent=2, sort_keys=True), self.run_dir / "results.json")
