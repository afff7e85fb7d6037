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


def create_run_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Create ``path``; refuse if it exists and is not empty (unless ``overwrite`` is explicitly requested)."""
    path = Path(path)
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
