"""The README's "Train on your own images" commands, run as written on a generated folder of RGB photos and a CSV.

Only run-length settings are appended to the two train commands (2 iterations, 8-image batches: a test data set
of 8 classes cannot fill the default 16-class batch); everything else, the photo defaults included, is what a
new user gets.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from deepmetric.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
CLASSES = [f"sneaker_{c}" for c in "abcdefgh"]
FAST = ["--set", "train.iterations=2", "--set", "data.batch_size=8", "--set", "data.eval_batch_size=64",
        "--set", "train.progress=false", "--set", "train.threads=1"]


def readme_commands() -> list[list[str]]:
    text = README.read_text()
    block = re.search(r"<!-- own-images:.*?-->\s*```bash\n(.*?)```", text, flags=re.DOTALL)
    assert block, "README lost its own-images block"
    return [shlex.split(line) for line in block.group(1).splitlines() if line.strip()]


def write_photos(root: Path) -> None:
    """8 classes × 4 JPEG photos (class colour + noise), and photos.csv listing them (last 4 classes: test)."""
    rng = np.random.default_rng(0)
    rows = ["path,label,split"]
    for label, name in enumerate(CLASSES):
        (root / "photos" / name).mkdir(parents=True)
        colour = rng.integers(0, 256, size=3)
        for i in range(1, 5):
            pixels = np.clip(colour + rng.normal(0, 20, size=(48, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(root / "photos" / name / f"{i:03d}.jpg")
            rows.append(f"photos/{name}/{i:03d}.jpg,{label},{'test' if label >= 4 else 'train'}")
    (root / "photos.csv").write_text("\n".join(rows) + "\n")


@pytest.fixture
def in_photo_dir(tmp_path, monkeypatch):
    write_photos(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_own_images_section_runs_verbatim(in_photo_dir, capsys):
    commands = readme_commands()
    assert [c[:2] for c in commands] == [["deepmetric", "train"], ["deepmetric", "train"],
                                         ["deepmetric", "embed"], ["deepmetric", "search"]]
    for command in commands:
        argv = command[1:] + (FAST if command[1] == "train" else [])
        code = main(argv)
        out = capsys.readouterr()
        assert code == 0, f"{' '.join(command)} failed: {out.err[-2000:]}"
        if command[1] == "train":
            # the output says what was chosen for photos, and the run records it
            assert "model.backbone=mobilenet_v2" in out.out and "data.train_transform=xbm_train" in out.out
            run = Path(argv[argv.index("--output") + 1])
            config = yaml.safe_load((run / "config.yaml").read_text())
            assert config["model"]["backbone"] == "mobilenet_v2" and config["model"]["pretrained"] == "imagenet"
            expected = "csv" if argv[argv.index("--data") + 1].endswith(".csv") else "folder"
            assert config["data"]["dataset"] == expected
            results = json.loads((run / "results.json").read_text())
            assert results["after"]["test"]["recall@1"] >= 0
        if command[1] == "search":
            assert "sneaker_b/001.jpg" in out.out  # the query finds itself in the gallery
    gallery = in_photo_dir / "runs" / "photos" / "gallery"
    assert np.load(gallery / "embeddings.npy").shape[0] == 32
