"""Checkpoint integrity: SHA-256 sidecar verified on load, corrupt/truncated/empty files refused with a message naming
the file, non-finite tensors never written (the previous checkpoint stays)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepmetric.training.checkpoint import CheckpointError, checksum_path, load_checkpoint, save_atomic


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"model": {"w": torch.randn(64, 32, generator=g), "b": torch.zeros(32)}, "step": 7}


def test_round_trip_writes_a_sidecar_and_verifies(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_atomic(_state(), path)
    assert checksum_path(path).is_file()
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and torch.equal(loaded["model"]["w"], _state()["model"]["w"])


def test_flipped_bytes_are_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_atomic(_state(), path)
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    for i in range(start, min(start + 2000, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="last.pt.*checksum"):
        load_checkpoint(path)


def test_a_single_flipped_byte_inside_tensor_data_is_refused(tmp_path: Path) -> None:
    # a flip inside raw tensor bytes still unpickles fine: only the checksum can catch it
    path = tmp_path / "c.pt"
    save_atomic(_state(), path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)


@pytest.mark.parametrize("keep", [0, 100])
def test_empty_and_truncated_files_get_a_clear_error(tmp_path: Path, keep: int) -> None:
    path = tmp_path / "last.pt"
    save_atomic(_state(), path)
    path.write_bytes(path.read_bytes()[:keep])
    checksum_path(path).unlink()  # without the sidecar the load itself must fail cleanly
    with pytest.raises(CheckpointError, match=str(path.name)):
        load_checkpoint(path)


def test_file_without_sidecar_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save(_state(), path)
    assert load_checkpoint(path)["step"] == 7


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensors_are_never_written(tmp_path: Path, bad: float) -> None:
    path = tmp_path / "last.pt"
    save_atomic(_state(), path)
    before = path.read_bytes()
    poisoned = _state()
    poisoned["model"]["w"][3, 4] = bad
    with pytest.raises(CheckpointError, match=r"model\.w"):
        save_atomic(poisoned, path)
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 7
    assert not list(tmp_path.glob(".*.tmp"))
