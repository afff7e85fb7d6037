"""``deepmetric evaluate`` sub-command: argparse interface and output."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from deepmetric.cli import evaluate as cli_evaluate
from deepmetric.evaluation import evaluate


def _parse(argv):
    parser = argparse.ArgumentParser()
    cli_evaluate.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["evaluate", *argv])


@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=60)
    np.save(tmp_path / "e.npy", x)
    np.save(tmp_path / "l.npy", y)
    return tmp_path, x, y


def test_json_output_equals_library(files, capsys):
    tmp, x, y = files
    args = _parse(["--embeddings", str(tmp / "e.npy"), "--labels", str(tmp / "l.npy"), "--recall-at", "1", "5",
                   "--json"])
    assert args.run(args) == 0
    assert json.loads(capsys.readouterr().out) == evaluate(x, y, recall_at=(1, 5))


def test_gallery_mode_table_and_errors(files, capsys):
    tmp, x, y = files
    np.save(tmp / "g.npy", x[:30])
    np.save(tmp / "gl.npy", y[:30])
    args = _parse(["--embeddings", str(tmp / "e.npy"), "--labels", str(tmp / "l.npy"), "--gallery-embeddings",
                   str(tmp / "g.npy"), "--gallery-labels", str(tmp / "gl.npy"), "--distance", "euclidean",
                   "--metrics", "recall", "map@r"])
    assert cli_evaluate.run(args) == 0
    out = capsys.readouterr().out
    expected = evaluate(x, y, x[:30], y[:30], recall_at=(1, 2, 4, 8), metrics=("recall", "map@r"),
                        distance="euclidean")
    assert f"{expected['map@r']:.6f}" in out and "recall@8" in out
    bad = _parse(["--embeddings", str(tmp / "e.npy"), "--labels", str(tmp / "missing.npy")])
    assert cli_evaluate.run(bad) == 2
    assert "file not found" in capsys.readouterr().err
    bad = _parse(["--embeddings", str(tmp / "e.npy"), "--labels", str(tmp / "l.npy"), "--recall-at", "100"])
    assert cli_evaluate.run(bad) == 2
    assert "recall@100" in capsys.readouterr().err
