"""``deepmetric embed`` / ``search`` / ``report`` through the CLI entry point, on fabricated run directories."""

import json

import numpy as np
import pytest
from _run_fixtures import fabricate_folder_model_run, fabricate_run_dir

from deepmetric.cli import main


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder_run")
    images = root / "images"
    run = fabricate_folder_model_run(root / "run", images)
    return run, images


def test_embed_image_folder_writes_arrays_and_paths(folder_run, tmp_path, capsys):
    run, images = folder_run
    out = tmp_path / "gallery"
    assert main(["embed", "--run", str(run), "--images", str(images), "--output", str(out)]) == 0
    assert "wrote 6 embeddings of size 8" in capsys.readouterr().out
    emb, labels = np.load(out / "embeddings.npy"), np.load(out / "labels.npy")
    paths = (out / "paths.txt").read_text().splitlines()
    assert emb.shape == (6, 8) and emb.dtype == np.float32
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert [p.split("/")[-2] for p in paths] == ["class0", "class0", "class1", "class1", "class2", "class2"]
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)  # model normalises


def test_embed_with_config_and_checkpoint_matches_run(folder_run, tmp_path):
    run, images = folder_run
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["embed", "--run", str(run), "--images", str(images), "--output", str(a)]) == 0
    assert main(["embed", "--config", str(run / "config.yaml"), "--checkpoint", str(run / "model.pt"),
                 "--images", str(images), "--output", str(b)]) == 0
    np.testing.assert_array_equal(np.load(a / "embeddings.npy"), np.load(b / "embeddings.npy"))


def test_search_finds_the_query_itself_first(folder_run, tmp_path, capsys):
    run, images = folder_run
    gallery = tmp_path / "gallery"
    assert main(["embed", "--run", str(run), "--images", str(images), "--output", str(gallery)]) == 0
    capsys.readouterr()
    query = images / "class1" / "0.png"
    rc = main(["search", "--gallery-embeddings", str(gallery / "embeddings.npy"), "--run", str(run),
               "--query", str(query), "--top-k", "3", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    hits = result[0]["neighbours"]
    assert len(hits) == 3 and hits[0]["path"] == str(query) and hits[0]["label"] == 1
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    # plain-text output names the path and score
    assert main(["search", "--gallery-embeddings", str(gallery / "embeddings.npy"), "--run", str(run),
                 "--query", str(query)]) == 0
    text = capsys.readouterr().out
    assert f"query: {query}" in text and "1.0000" in text


def test_missing_files_are_named(folder_run, tmp_path, capsys):
    run, images = folder_run
    missing_run = tmp_path / "nope"
    assert main(["embed", "--run", str(missing_run), "--images", str(images), "--output", str(tmp_path / "o")]) == 2
    assert str(missing_run) in capsys.readouterr().err
    no_model = tmp_path / "no_model"
    no_model.mkdir()
    (no_model / "config.yaml").write_text((run / "config.yaml").read_text())
    assert main(["embed", "--run", str(no_model), "--images", str(images), "--output", str(tmp_path / "o")]) == 2
    assert "model.pt" in capsys.readouterr().err
    assert main(["search", "--gallery-embeddings", str(tmp_path / "g.npy"), "--run", str(run),
                 "--query", str(images / "class0" / "0.png")]) == 2
    assert "g.npy" in capsys.readouterr().err
    np.save(tmp_path / "g.npy", np.zeros((2, 8), dtype=np.float32))
    assert main(["search", "--gallery-embeddings", str(tmp_path / "g.npy"), "--run", str(run),
                 "--query", str(tmp_path / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err


def test_report_cli_prints_written_path(tmp_path, capsys):
    run = fabricate_run_dir(tmp_path / "run")
    out = tmp_path / "custom" / "r.html"
    assert main(["report", str(run), "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.is_file()
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")


def test_train_refuses_a_bad_config_value_without_a_traceback(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--output", str(out), "--set", "train.protocol=test"]) == 2
    err = capsys.readouterr().err
    assert "train.protocol" in err and "'validation', 'legacy'" in err and "Traceback" not in err
    assert not out.exists()  # refused before the run directory is created
