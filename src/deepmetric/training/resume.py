"""What ``--resume`` may change: the overrides that are safe on a resumed run, and the metric log's tail.

A resumed run continues the saved state bit for bit, so only settings that do not change what that state means
may be overridden: how long to train and how often to validate, checkpoint, log or print. Any other ``--set`` is
refused naming the keys (a different embedding size or loss would silently make a different experiment).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deepmetric.config_errors import ConfigError
from deepmetric.training.config import ExperimentConfig, apply_override, config_from_dict, config_to_dict

#: dotted config keys a resumed run may override
SAFE_ON_RESUME = (
    "train.iterations", "train.epochs", "train.eval_every", "train.checkpoint_every", "train.progress",
    "train.threads", "train.early_stopping_patience", "data.num_workers", "data.eval_batch_size",
)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and key not in ("params", "miner_params", "reported"):
            flat.update(_flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat


def resumed_config(saved: dict[str, Any], overrides: list[str], source: str) -> tuple[ExperimentConfig, list[str]]:
    """The saved config with ``overrides`` applied; also the keys that changed. Unsafe changes raise."""
    config = config_from_dict(saved, source=source)
    if not overrides:
        return config, []
    # the overrides are parsed and checked exactly like a fresh run's, on top of the saved values
    merged = config_to_dict(config)
    for item in overrides:
        apply_override(merged, item)
    new = config_from_dict(merged, source=f"{source} (+ --set overrides)")
    before, after = _flatten(config_to_dict(config)), _flatten(config_to_dict(new))
    changed = sorted(k for k in after if before.get(k) != after[k])
    unsafe = [k for k in changed if k not in SAFE_ON_RESUME]
    if unsafe:
        raise ConfigError(
            f"--resume: {', '.join(unsafe)} cannot change on a resumed run (the saved state was trained with the "
            f"old value); only {', '.join(SAFE_ON_RESUME)} may. Start a new run to change the others"
        )
    return new, changed


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the records of ``metrics.jsonl`` logged after ``step`` (the checkpoint's), which a resumed run
    writes again; return how many were dropped."""
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill: dropped with the rest of the unfinished tail
        if int(record.get("step", 0)) <= step:
            keep.append(line)
    if len(keep) != len(lines):
        path.write_text("".join(line + "\n" for line in keep))
    return len(lines) - len(keep)
