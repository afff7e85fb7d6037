import os

import pytest
import torch

from deepmetric.training.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_atomic
from deepmetric.training.run_dir import RunDirectoryExists, create_run_dir


def test_existing_output_is_never_overwritten_silently(tmp_path):
    run = tmp_path / "run"
    create_run_dir(run)
    (run / "results.json").write_text("{}")
    with pytest.raises(RunDirectoryExists, match=str(run)):
        create_run_dir(run)
    assert (run / "results.json").read_text() == "{}"
    create_run_dir(run, overwrite=True)  # explicit request only


def test_atomic_save_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_atomic({"step": 1, "w": torch.ones(3)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        save_atomic({"step": 2, "bad": Boom()}, path)
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_rng_state_round_trip_is_weights_only_loadable(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    save_atomic({"rng": capture_rng_state()}, tmp_path / "r.pt")
    a = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
