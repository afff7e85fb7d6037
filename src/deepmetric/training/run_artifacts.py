"""Reading what ``deepmetric train`` left in a run directory: config, metric log, results, embeddings, weights.

Shared by ``deepmetric report``, ``embed`` and ``search``. Every missing or malformed file raises
:class:`RunArtifactError` naming the file and what was expected, so the CLI can print it as is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepmetric.data.bundle import build_transform
from deepmetric.data.image_dataset import load_rgb
from deepmetric.data.kanji import IMAGE_SIZE
from deepmetric.data.transforms import input_channels as data_input_channels
from deepmetric.models.factory import build_model
from deepmetric.training.checkpoint import load_checkpoint
from deepmetric.training.config import ExperimentConfig, load_config


class RunArtifactError(FileNotFoundError):
    """A run directory lacks a file the command needs, or the file is malformed; the message names it."""


@dataclass
class EvalEmbeddings:
    """Test-time embeddings saved by the trainer.

    Self-retrieval runs (CUB, Cars, SOP, KanjiGlyphs) have ``gallery is None``: queries are searched against
    themselves with the query's own row excluded. Query→gallery runs (In-Shop) set both.
    """

    query: np.ndarray
    query_labels: np.ndarray
    gallery: np.ndarray | None = None
    gallery_labels: np.ndarray | None = None
    query_split: str = "test"
    gallery_split: str | None = None

    @property
    def self_retrieval(self) -> bool:
        return self.gallery is None


@dataclass
class RunArtifacts:
    run_dir: Path
    config: ExperimentConfig
    config_text: str
    records: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    embeddings: EvalEmbeddings | None = None


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise RunArtifactError(f"{what} not found: {path}")
    return path


def read_config(run_dir: Path) -> tuple[ExperimentConfig, str]:
    path = require_file(run_dir / "config.yaml", "resolved run config (config.yaml)")
    return load_config(path), path.read_text()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Records of ``metrics.jsonl`` (empty list when the file is absent; a bad line is an error naming it)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise RunArtifactError(f"{path}:{lineno}: not a JSON object: {exc}") from exc
    return records


def read_results(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "results.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunArtifactError(f"{path}: not valid JSON: {exc}") from exc


def read_embeddings(run_dir: Path) -> EvalEmbeddings | None:
    """The saved test embeddings: ``test_*`` (self-retrieval) or ``query_*`` + ``gallery_*`` files; None if absent."""

    def pair(prefix: str) -> tuple[np.ndarray, np.ndarray] | None:
        emb, lab = run_dir / f"{prefix}_embeddings.npy", run_dir / f"{prefix}_labels.npy"
        if not emb.is_file() and not lab.is_file():
            return None
        require_file(emb, f"{prefix} embeddings")
        require_file(lab, f"{prefix} labels")
        e, y = np.load(emb), np.load(lab)
        if e.ndim != 2 or y.ndim != 1 or len(e) != len(y):
            raise RunArtifactError(
                f"{emb} has shape {e.shape} and {lab} has shape {y.shape}; expected (N, d) and (N,)"
            )
        return e.astype(np.float32), y.astype(np.int64)

    query, gallery = pair("query"), pair("gallery")
    if query is not None or gallery is not None:
        if query is None or gallery is None:
            missing = "query" if query is None else "gallery"
            raise RunArtifactError(f"{run_dir}: {missing}_embeddings.npy / {missing}_labels.npy missing")
        return EvalEmbeddings(query[0], query[1], gallery[0], gallery[1], "query", "gallery")
    test = pair("test")
    if test is None:
        return None
    return EvalEmbeddings(test[0], test[1])


def load_run(run_dir: str | Path) -> RunArtifacts:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunArtifactError(f"run directory not found: {run_dir}")
    config, text = read_config(run_dir)
    return RunArtifacts(run_dir=run_dir, config=config, config_text=text, records=read_metrics(run_dir),
                        results=read_results(run_dir), embeddings=read_embeddings(run_dir))


# ------------------------------------------------------------------------------------------- model ---------
def _state_dict_from(obj: Any, path: Path) -> dict[str, Any]:
    """Accept a bare state_dict (model.pt), a best.pt ({"model": ...}) or a full last.pt checkpoint."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj["model"]
    if isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj):
        return obj
    raise RunArtifactError(f"{path}: expected a model state_dict or a checkpoint with a 'model' entry")


def load_model(config: ExperimentConfig, checkpoint: str | Path, in_channels: int | None = None,
               device: str = "cpu") -> Any:
    """Build the model of ``config`` and load the weights in ``checkpoint`` (eval mode).

    ``in_channels`` defaults to what the trainer built the model for (:func:`deepmetric.data.input_channels`
    of the config's data and backbone).
    """
    path = require_file(Path(checkpoint), "model weights")
    if in_channels is None:
        in_channels = data_input_channels(config.data, config.model.backbone)
    model = build_model(config.model, in_channels=in_channels)
    state = _state_dict_from(load_checkpoint(path, map_location=device), path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise RunArtifactError(f"{path}: weights do not match the model built from the config: {exc}") from exc
    return model.to(device).eval()


def run_model_path(run_dir: Path) -> Path:
    """``model.pt`` (the selected weights) if present, else ``checkpoints/best.pt``, else ``checkpoints/last.pt``."""
    for candidate in (run_dir / "model.pt", run_dir / "checkpoints" / "best.pt", run_dir / "checkpoints" / "last.pt"):
        if candidate.is_file():
            return candidate
    raise RunArtifactError(
        f"no model weights in {run_dir}: expected model.pt, checkpoints/best.pt or checkpoints/last.pt"
    )


# ------------------------------------------------------------------------------------------- images --------
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def list_images(folder: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """Image files under ``folder`` (recursive, sorted) with labels from their first-level sub-folder.

    Returns (paths, labels, class names). Images directly in ``folder`` get label −1 ("unknown"); class ids
    are indices into the sorted sub-folder names, like :class:`deepmetric.data.folder.ImageFolderDataset`.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise RunArtifactError(f"image folder not found: {root}")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise RunArtifactError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    class_names = sorted({p.relative_to(root).parts[0] for p in paths if len(p.relative_to(root).parts) > 1})
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.array([index[p.relative_to(root).parts[0]] if len(p.relative_to(root).parts) > 1 else -1
                       for p in paths], dtype=np.int64)
    return paths, labels, class_names


def image_loader(config: ExperimentConfig) -> Any:
    """A function ``path -> input tensor`` applying the run's evaluation transform to an image file.

    KanjiGlyphs models are trained on 32×32 grey glyphs, so files are converted to grey-scale and resized to the
    glyph size, and the transform gets the PIL "L" image the dataset gives it (a float tensor would be resized and
    cropped differently by an RGB preset); other datasets use the RGB image. Both apply the config's
    ``data.eval_transform`` preset, exactly as at test time.
    """
    transform = build_transform(config.data.eval_transform, config.model.backbone, config.data.dataset)
    if config.data.dataset == "kanji_glyphs":

        def load_glyph(path: Path) -> Any:
            return transform(load_rgb(path).convert("L").resize((IMAGE_SIZE, IMAGE_SIZE)))

        return load_glyph

    def load(path: Path) -> Any:
        return transform(load_rgb(path))

    return load


class ImageFileDataset:
    """``(input tensor, label)`` items from image files, for embedding a folder with a run's model."""

    def __init__(self, paths: list[Path], labels: np.ndarray, loader: Any) -> None:
        self.paths, self.labels, self.loader = paths, labels, loader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.loader(self.paths[index]), int(self.labels[index])
