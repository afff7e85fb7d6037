"""Metric sinks: JSON lines in the run directory (always), TensorBoard and Weights & Biases (optional extras)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, get_args

from deepmetric.training.config import ConfigError, LoggerName
from deepmetric.training.run_dir import JsonlLogger

LOGGERS: tuple[str, ...] = get_args(LoggerName)


class MetricLogger:
    """Fans each record out to metrics.jsonl and the configured optional backends.

    A record is a flat dict with ``step`` and ``split``; numeric fields become scalars named ``split/key``.
    """

    def __init__(self, run_dir: str | Path, backends: list[str] | None = None, run_name: str = "run",
                 config: dict[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.jsonl = JsonlLogger(self.run_dir / "metrics.jsonl")
        self._tensorboard = None
        self._wandb = None
        for name in backends or []:
            if name not in LOGGERS:
                raise ConfigError(f"train.loggers: unknown logger {name!r} (known: {', '.join(LOGGERS)})")
            if name == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as exc:
                    raise ConfigError("train.loggers: tensorboard needs the extra: pip install "
                                      "'deepmetric[tensorboard]'") from exc
                self._tensorboard = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            else:
                try:
                    import wandb
                except ImportError as exc:
                    raise ConfigError("train.loggers: wandb needs the extra: pip install 'deepmetric[wandb]'") from exc
                # offline by default: no account or network needed; `wandb sync` uploads later
                os.environ.setdefault("WANDB_MODE", "offline")
                self._wandb = wandb.init(project="deepmetric", name=run_name, dir=str(self.run_dir),
                                         config=config or {})

    def log(self, record: dict[str, Any]) -> None:
        self.jsonl.log(record)
        if self._tensorboard is None and self._wandb is None:
            return
        step = int(record.get("step", 0))
        prefix = str(record.get("split", "train"))
        if "phase" in record:
            prefix = f"{prefix}_{record['phase']}"
        scalars = {f"{prefix}/{k}": float(v) for k, v in record.items()
                   if k not in ("step", "split", "phase") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def read(self) -> list[dict[str, Any]]:
        return self.jsonl.read()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
