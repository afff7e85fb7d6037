"""The verification threshold saved with a training run (issue 20): calibrated on the validation split at the end
of training into ``verification.json``, used by ``search --run`` and copied by ``index``."""

import json

import numpy as np
import pytest

from deepmetric.cli import main
from deepmetric.evaluation.verification import DEFAULT_TARGET_FMR, calibrate_on_split, read_threshold


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from PIL import Image

    from deepmetric.data.kanji import KanjiGlyphs

    root = tmp_path_factory.mktemp("threshold_run")
    run = root / "run"
    assert main(["train", "--output", str(run), "--set", "train.iterations=4", "--set", "train.progress=false",
                 "--set", "data.max_classes=24", "--set", "train.threads=1", "--set", "model.width=8"]) == 0
    query = root / "q.png"
    Image.fromarray(np.asarray(KanjiGlyphs(split="test", max_classes=24).images[0])).save(query)
    return run, query


def _search(args, capsys):
    capsys.readouterr()
    rc = main(["search", *args, "--json"])
    captured = capsys.readouterr()
    return rc, (json.loads(captured.out) if rc == 0 else captured.err)


def test_training_writes_the_validation_threshold(trained):
    from deepmetric.cli.embed import embed_items
    from deepmetric.training.run_artifacts import read_config, run_model_path

    run, _ = trained
    saved = read_threshold(run / "verification.json")
    assert saved["target_fmr"] == DEFAULT_TARGET_FMR and saved["calibrated_on"] == "validation"
    assert saved["selected_step"] == json.loads((run / "results.json").read_text())["selected_step"]
    assert not (run / "verification.json.tmp").exists()
    # the same threshold from the saved model's validation embeddings
    config, _ = read_config(run)
    emb, labels, _ = embed_items(config, run_model_path(run), split="val")
    again = calibrate_on_split(emb, labels, DEFAULT_TARGET_FMR)
    assert saved["n_items"] == len(labels)
    assert saved["threshold"] == pytest.approx(again["threshold"], abs=1e-5)
    assert saved["val_fmr"] <= DEFAULT_TARGET_FMR


def test_search_with_the_run_answers_match_and_index_copies_it(trained, tmp_path, capsys):
    run, query = trained
    threshold = read_threshold(run / "verification.json")["threshold"]
    rc, out = _search(["--gallery-embeddings", str(run / "test_embeddings.npy"), "--run", str(run),
                       "--query", str(query), "--top-k", "4"], capsys)
    assert rc == 0 and out[0]["threshold"] == pytest.approx(threshold)
    assert all(h["match"] == (h["score"] >= threshold) for h in out[0]["neighbours"])
    assert out[0]["neighbours"][0]["index"] == 0 and out[0]["neighbours"][0]["match"] is True
    index = tmp_path / "idx"
    assert main(["index", "--run", str(run), "--split", "test", "--output", str(index), "--neighbour-k", "0"]) == 0
    copied = json.loads((index / "meta.json").read_text())["threshold"]
    assert copied["threshold"] == threshold and copied["source"].endswith("verification.json")
    rc, out = _search(["--index", str(index), "--query", str(query), "--top-k", "2"], capsys)
    assert rc == 0 and out[0]["threshold"] == pytest.approx(threshold)
    # --threshold still overrides the run's
    rc, out = _search(["--index", str(index), "--query", str(query), "--top-k", "2", "--threshold", "1.5"], capsys)
    assert rc == 0 and out[0]["threshold"] == 1.5 and not out[0]["neighbours"][0]["match"]


def test_a_corrupt_threshold_file_is_a_one_line_error(trained, tmp_path, capsys):
    import shutil

    run, query = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "verification.json").write_text(json.dumps({"threshold": "high"}))
    rc, err = _search(["--gallery-embeddings", str(copy / "test_embeddings.npy"), "--run", str(copy),
                       "--query", str(query)], capsys)
    assert rc == 2 and "verification.json: field 'threshold' must be a finite number" in err
    assert "Traceback" not in err
