"""Fabricated run directories (what ``deepmetric train`` writes), for report / embed / search tests.

Building one takes milliseconds and needs neither a dataset nor training, so the report can be tested on its
own; the fabricated embeddings are clustered by class so retrieval has both hits and misses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from deepmetric.training.config import ExperimentConfig, config_to_dict


def fabricate_run_dir(path: Path, *, protocol: str = "validation", query_gallery: bool = False,
                      n_classes: int = 12, per_class: int = 6, dim: int = 16, steps: int = 100,
                      seed: int = 0) -> Path:
    """Write config.yaml, metrics.jsonl, results.json and test (or query/gallery) embeddings into ``path``."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    config = ExperimentConfig()
    config.name = "fabricated"
    config.train.protocol = protocol
    config.train.iterations = steps
    config.reported = {"paper": "none (fabricated run)", "metrics": {"recall@1": 0.5}}
    (path / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))

    records = []
    for step in range(10, steps + 1, 10):
        records.append({"step": step, "split": "train", "loss": float(2.0 * np.exp(-step / 40) + 0.1),
                        "lr": 1e-3 * (0.1 if step > 60 else 1.0), "images_per_second": 500.0})
    selection_split = "test" if protocol == "legacy" else "validation"
    for step in range(25, steps + 1, 25):
        records.append({"step": step, "split": selection_split, "recall@1": 0.3 + step / 400,
                        "map@r": 0.1 + step / 800, "r_precision": 0.2 + step / 900})
    before = {"recall@1": 0.21, "recall@2": 0.33, "map@r": 0.05, "r_precision": 0.12}
    after = {"recall@1": 0.55, "recall@2": 0.68, "map@r": 0.19, "r_precision": 0.29}
    records.insert(0, {"step": 0, "split": "test", "phase": "before", **before})
    records.append({"step": steps, "split": "test", "phase": "after", "selected_step": 75, **after})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    results = {"name": "fabricated", "protocol": protocol, "selected_step": 75,
               "selection": {"metric": 0.19, "step": 75, "split": selection_split, "key": "map@r"},
               "steps": steps, "seconds": 12.3, "before": {"test": before}, "after": {"test": after}}
    (path / "results.json").write_text(json.dumps(results, indent=2))

    centres = rng.normal(size=(n_classes, dim))
    labels = np.repeat(np.arange(n_classes), per_class)
    emb = (centres[labels] + 0.8 * rng.normal(size=(len(labels), dim))).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    if query_gallery:
        q = np.arange(len(labels)) % 2 == 0
        np.save(path / "query_embeddings.npy", emb[q])
        np.save(path / "query_labels.npy", labels[q])
        np.save(path / "gallery_embeddings.npy", emb[~q])
        np.save(path / "gallery_labels.npy", labels[~q])
    else:
        np.save(path / "test_embeddings.npy", emb)
        np.save(path / "test_labels.npy", labels)
    return path


def fabricate_folder_model_run(path: Path, images: Path, n_classes: int = 3, per_class: int = 2) -> Path:
    """A run directory (config.yaml + model.pt) for an image-folder dataset with a tiny untrained CNN, plus a
    folder of small solid-colour PNGs ``images/<class>/<i>.png`` — enough for embed/search round trips."""
    import torch
    from PIL import Image

    from deepmetric.training.builders import build_model

    rng = np.random.default_rng(0)
    for c in range(n_classes):
        (images / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
            Image.new("RGB", (40, 30), colour).save(images / f"class{c}" / f"{i}.png")
    path.mkdir(parents=True, exist_ok=True)
    config = ExperimentConfig()
    config.name = "folder-run"
    config.data.dataset = "folder"
    config.data.root = str(images)
    config.data.train_transform = "reality_check_train"
    config.data.eval_transform = "reality_check_eval"
    config.model.backbone = "kanji_cnn"
    config.model.width = 4
    config.model.embedding_size = 8
    (path / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    torch.manual_seed(0)
    model = build_model(config.model, in_channels=3)
    torch.save(model.state_dict(), path / "model.pt")
    return path
