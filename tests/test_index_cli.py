"""``deepmetric index`` + ``deepmetric search --index``: build, load without re-embedding, refuse bad indexes."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from _run_fixtures import fabricate_folder_model_run

from deepmetric.cli import main
from deepmetric.evaluation.index import IndexFormatError, SearchIndex


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("index_run")
    images = root / "images"
    run = fabricate_folder_model_run(root / "run", images)
    return run, images


def _search(args, capsys):
    capsys.readouterr()
    rc = main(["search", *args, "--json"])
    captured = capsys.readouterr()
    return rc, (json.loads(captured.out) if rc == 0 else captured.err)


def test_exact_index_round_trip_and_match_threshold(folder_run, tmp_path, capsys):
    run, images = folder_run
    index = tmp_path / "idx"
    assert main(["index", "--run", str(run), "--images", str(images), "--output", str(index)]) == 0
    meta = json.loads((index / "meta.json").read_text())
    assert meta["kind"] == "exact" and meta["n_items"] == 6 and meta["dim"] == 8
    assert set(meta["files"]) == {"embeddings.npy", "labels.npy", "paths.txt", "neighbours_index.npy",
                                  "neighbours_score.npy"}
    assert meta["neighbours"]["k"] == 5  # --neighbour-k 32 capped at the 5 other items
    query = images / "class2" / "1.png"
    rc, out = _search(["--index", str(index), "--query", str(query), "--top-k", "3"], capsys)
    assert rc == 0
    hits = out[0]["neighbours"]
    assert hits[0]["path"] == str(query) and hits[0]["label"] == 2 and hits[0]["score"] == pytest.approx(1, abs=1e-5)
    assert "match" not in hits[0]
    # the same answer as searching the embed output, and the run is found from the index metadata
    rc, gallery_out = _search(["--gallery-embeddings", str(index / "embeddings.npy"), "--run", str(run),
                               "--query", str(query), "--top-k", "3"], capsys)
    assert rc == 0 and [h["index"] for h in gallery_out[0]["neighbours"]] == [h["index"] for h in hits]
    rc, out = _search(["--index", str(index), "--query", str(query), "--top-k", "3", "--threshold", "0.99999"],
                      capsys)
    assert out[0]["neighbours"][0]["match"] is True and out[0]["threshold"] == 0.99999
    assert all(h["match"] == (h["score"] >= 0.99999) for h in out[0]["neighbours"])
    rc, out = _search(["--index", str(index), "--query", str(query), "--top-k", "2", "--rerank", "aqe",
                       "--threshold", "0.5"], capsys)
    assert rc == 0 and len(out[0]["neighbours"]) == 2
    top = out[0]["neighbours"][0]
    # the re-ranker orders the list; the reported score and the match decision stay the cosine similarity
    assert top["path"] == str(query) and top["score"] == pytest.approx(1, abs=1e-5) and top["match"] is True
    assert "rerank_score" in top


def test_hnsw_index_stores_recall_and_searches(folder_run, tmp_path, capsys):
    pytest.importorskip("faiss")
    run, images = folder_run
    index = tmp_path / "hnsw"
    assert main(["index", "--run", str(run), "--images", str(images), "--output", str(index), "--kind", "hnsw"]) == 0
    assert "recall against exact search: recall@6 1.0000" in capsys.readouterr().out
    meta = json.loads((index / "meta.json").read_text())
    assert meta["recall"]["recall@6"] == 1.0 and "faiss.index" in meta["files"]
    rc, out = _search(["--index", str(index), "--run", str(run), "--query", str(images / "class0" / "0.png")], capsys)
    assert rc == 0 and out[0]["neighbours"][0]["path"].endswith("class0/0.png")


def test_corrupt_or_foreign_indexes_are_refused(folder_run, tmp_path, capsys):
    run, images = folder_run
    index = tmp_path / "idx"
    assert main(["index", "--run", str(run), "--images", str(images), "--output", str(index)]) == 0
    query = str(images / "class0" / "0.png")
    # another model (same architecture, other weights)
    other = tmp_path / "other_run"
    shutil.copytree(run, other)
    state = torch.load(other / "model.pt")
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, other / "model.pt")
    rc, err = _search(["--index", str(index), "--run", str(other), "--query", query], capsys)
    assert rc == 2 and "another model" in err and "weights_sha256" in err
    # another embedding size
    small = tmp_path / "small_run"
    small.mkdir()
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["embedding_size"] = 4
    (small / "config.yaml").write_text(yaml.safe_dump(config))
    from deepmetric.training.builders import build_model
    from deepmetric.training.config import load_config

    cfg = load_config(small / "config.yaml")
    torch.save(build_model(cfg.model, in_channels=3).state_dict(), small / "model.pt")
    rc, err = _search(["--index", str(index), "--run", str(small), "--query", query], capsys)
    assert rc == 2 and "embedding_size: index 8 ≠ current 4" in err
    # a changed data file, a missing one, no index at all
    emb = np.load(index / "embeddings.npy")
    np.save(index / "embeddings.npy", emb[::-1].copy())
    rc, err = _search(["--index", str(index), "--query", query], capsys)
    assert rc == 2 and "embeddings.npy is corrupt" in err
    np.save(index / "embeddings.npy", emb)
    SearchIndex.load(index)  # restored: valid again
    (index / "labels.npy").unlink()
    with pytest.raises(IndexFormatError, match="labels.npy is missing"):
        SearchIndex.load(index)
    rc, err = _search(["--index", str(tmp_path), "--run", str(run), "--query", query], capsys)
    assert rc == 2 and "meta.json is missing" in err


def test_threshold_calibrated_on_validation_answers_match(tmp_path, capsys):
    from PIL import Image

    from deepmetric.data.kanji import KanjiGlyphs

    run = tmp_path / "run"
    assert main(["train", "--output", str(run), "--set", "train.iterations=5", "--set", "train.progress=false",
                 "--set", "data.max_classes=24", "--set", "train.threads=1"]) == 0
    index = tmp_path / "idx"
    capsys.readouterr()
    assert main(["index", "--run", str(run), "--split", "test", "--output", str(index),
                 "--target-fmr", "0.05"]) == 0
    assert "match threshold" in capsys.readouterr().out
    meta = json.loads((index / "meta.json").read_text())
    t = meta["threshold"]
    assert t["calibrated_on"] == "val" and t["target_fmr"] == 0.05 and t["val_fmr"] <= 0.05
    glyphs = KanjiGlyphs(split="test", max_classes=24)
    query = tmp_path / "q.png"
    Image.fromarray(np.asarray(glyphs.images[0])).save(query)
    rc, out = _search(["--index", str(index), "--query", str(query), "--top-k", "4"], capsys)
    assert rc == 0 and out[0]["threshold"] == pytest.approx(t["threshold"])
    assert all(h["match"] == (h["score"] >= t["threshold"]) for h in out[0]["neighbours"])
    assert out[0]["neighbours"][0]["index"] == 0 and out[0]["neighbours"][0]["match"]
