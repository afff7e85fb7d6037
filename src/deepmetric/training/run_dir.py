"""Run directories: created fresh, never overwritten silently."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any


class RunDirectoryExists(FileExistsError):
    pass


def default_run_dir(name: str, root: str | Path = "runs") -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{name}-{stamp}"


# what a start that failed before training (a bad value found while building the data or model) leaves behind
_FAILED_START_FILES = {"config.yaml", "metrics.jsonl", "checkpoints"}


def is_failed_start(path: Path) -> bool:
    """True for a run directory holding only what a failed start writes: no checkpoint, no results."""
    if not path.is_dir():
        return False
    entries = {p.name for p in path.iterdir()}
    checkpoints = path / "checkpoints"
    return entries <= _FAILED_START_FILES and not (checkpoints.is_dir() and any(checkpoints.iterdir()))


def remove_failed_start(path: str | Path) -> None:
    """Delete a run directory that :func:`is_failed_start` (nothing of value in it); leave anything else."""
    path = Path(path)
    if is_failed_start(path):
        for name in _FAILED_START_FILES:
            entry = path / name
            if entry.is_dir():
                entry.rmdir()
            elif entry.exists():
                entry.unlink()
        path.rmdir()


def create_run_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Create ``path``; refuse if it exists and is not empty (unless ``overwrite`` is explicitly requested).

    A directory holding only a failed start's files (:func:`is_failed_start`) is reused.
    """
    path = Path(path)
    if path.exists() and is_failed_start(path):
        remove_failed_start(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise RunDirectoryExists(
            f"output directory {path} already exists and is not empty; choose another --output, "
            f"resume it with --resume {path}, or pass --overwrite to replace its contents"
        )
    path.mkdir(parents=True, exist_ok=True)
    (path / "checkpoints").mkdir(exist_ok=True)
    return path


class JsonlLogger:
    """Appends one JSON object per line to ``metrics.jsonl`` in the run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
