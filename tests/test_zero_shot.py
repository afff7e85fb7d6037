"""``deepmetric evaluate --backbone``: the zero-shot baseline (a pretrained encoder, no training) on KanjiGlyphs
and on an image folder, its output files, its agreement with ``evaluate --embeddings``, and its errors
(random-init weights, no network)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures_layouts import make_cub
from PIL import Image

from deepmetric.cli import main
from deepmetric.training.recipes import configs_dir

pytest.importorskip("timm")
TINY_VIT = ["--backbone", "timm:vit_tiny_patch16_224", "--pretrained", "none", "--set", "data.max_classes=2",
            "--set", "train.threads=1"]


def test_zero_shot_vit_tiny_on_kanji_glyphs_prints_the_table_and_writes_embeddings(tmp_path, capsys):
    out = tmp_path / "zs"
    assert main(["evaluate", *TINY_VIT, "--split", "test", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kanji_glyphs test split" in printed and "192-d cls features" in printed
    assert "data.eval_transform=vit_eval" in printed
    rows = {line.split()[0]: float(line.split()[1]) for line in printed.splitlines()
            if line.startswith(("recall@", "precision@1", "r_precision", "map@r"))}
    assert set(rows) == {"recall@1", "recall@2", "recall@4", "recall@8", "precision@1", "r_precision", "map@r"}
    assert all(0.0 <= v <= 100.0 for v in rows.values())
    embeddings, labels = np.load(out / "test_embeddings.npy"), np.load(out / "test_labels.npy")
    assert embeddings.shape == (2 * 32, 192) and labels.shape == (64,) and len(np.unique(labels)) == 2
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert "projection: false" in (out / "config.yaml").read_text()

    # the same numbers as `evaluate --embeddings` on the written files (one evaluator for both)
    assert main(["evaluate", "--embeddings", str(out / "test_embeddings.npy"), "--labels",
                 str(out / "test_labels.npy"), "--json"]) == 0
    saved = json.loads(capsys.readouterr().out)
    for key, value in rows.items():
        assert 100 * saved[key] == pytest.approx(value, abs=0.006)


def test_zero_shot_json_on_an_image_folder_with_a_cnn(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for c in range(4):
        (tmp_path / "photos" / f"class_{c}").mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "photos" / f"class_{c}" / f"{i}.png")
    assert main(["evaluate", "--backbone", "resnet18", "--pretrained", "none", "--data", str(tmp_path / "photos"),
                 "--pooling", "gem", "--recall-at", "1", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dataset"] == "folder" and result["pooling"] == "gem" and result["eval_transform"] == "xbm_eval"
    assert set(result["metrics"]) >= {"recall@1", "recall@2", "map@r"}


@pytest.mark.parametrize(("transform", "eval_transform"), [([], "kanji_eval"), (["--transform", "xbm"], "xbm_eval")])
def test_zero_shot_kanji_cnn_reads_the_grey_glyphs(transform, eval_transform, capsys):
    """kanji_cnn keeps the glyphs' one channel, with the glyph transforms and with an RGB preset's geometry."""
    assert main(["evaluate", "--backbone", "kanji_cnn", "--pretrained", "none", *transform, "--set",
                 "data.max_classes=2", "--set", "train.threads=1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["eval_transform"] == eval_transform and result["metrics"]["n_queries"] == 64


def test_zero_shot_of_a_recipe_encoder_on_the_cub_layout(tmp_path, capsys):
    """`--config RECIPE`: the recipe's dataset, transforms and evaluation settings, its encoder untrained."""
    root = make_cub(tmp_path, {1: 2, 2: 2, 101: 3, 102: 3})
    recipe = configs_dir() / "cub200" / "triplet_vits16_dino.yaml"
    assert main(["evaluate", "--config", str(recipe), "--backbone", "timm:vit_small_patch16_224.dino",
                 "--pretrained", "none", "--data", str(root), "--json", "--set", "train.threads=1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dataset"] == "cub200" and result["eval_transform"] == "dino_eval" and result["pooling"] == "cls"
    assert set(result["metrics"]) >= {"recall@1", "recall@4", "map@r"}


def test_zero_shot_offline_error_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setenv("DEEPMETRIC_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    code = main(["evaluate", "--backbone", "timm:vit_small_patch16_224.dino", "--set", "data.max_classes=2"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("error: pretrained weights of timm:vit_small_patch16_224.dino not found")
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "timm" / "vit_small_patch16_224.dino.safetensors") in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--backbone", "resnet18", "--embeddings", "e.npy"], "either --backbone"),
        (["--data", "photos"], "--data need --backbone"),
        (["--backbone", "resnet18", "--backend", "faiss"], "apply to --embeddings"),
        (["--labels", "l.npy"], "pass --embeddings and --labels"),
        (["--backbone", "resnet18", "--split", "val", "--set", "data.validation_fraction=0.0",
          "--pretrained", "none"], "split 'val' is not available"),
        (["--backbone", "timm:vit_tiny_patch16_224", "--transform", "ms", "--pretrained", "none"], "patch size 16"),
    ],
)
def test_zero_shot_argument_errors(argv, message, capsys):
    assert main(["evaluate", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
