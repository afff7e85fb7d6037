"""``--resume``: corrupt checkpoints refused with nothing written, safe overrides applied, a finished run left
alone, the metric log without duplicated lines and the wall time summed over segments."""

from __future__ import annotations

import json

import torch
from _bad_input_cases import TINY, finished_run, flip_bytes, run_cli, sets, stopped_run


def test_resume_of_a_checkpoint_with_2000_flipped_bytes_is_refused_and_writes_nothing(tmp_path):
    run = stopped_run(tmp_path, "run")
    flip_bytes(run / "checkpoints" / "last.pt", 2000)
    before = sorted(p.name for p in run.rglob("*"))
    out = run_cli(["train", "--resume", str(run)])
    assert out.code == 2 and "Traceback" not in out.stderr
    assert f"{run / 'checkpoints' / 'last.pt'}" in out.stderr and "checksum" in out.stderr
    assert sorted(p.name for p in run.rglob("*")) == before  # no model.pt / results.json written


def test_resumed_run_sums_wall_time_and_logs_each_step_once(tmp_path):
    run = stopped_run(tmp_path, "run")
    first_segment = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["seconds"]
    with (run / "metrics.jsonl").open("a") as f:  # written after the checkpoint, before a kill
        f.write(json.dumps({"step": 3, "split": "train", "loss": 1.0}) + "\n")
    out = run_cli(["train", "--resume", str(run), "--set", "train.iterations=20"])
    assert out.code == 0, out.stderr
    assert "at step 2 of 20 with train.iterations changed" in out.stdout
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 20 and results["seconds"] >= round(first_segment, 2)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r.get("split") == "train"]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 20


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    run = finished_run(tmp_path)
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    out = run_cli(["train", "--resume", str(run)])
    assert out.code == 0 and "already finished at step 2" in out.stdout
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files


def test_unsafe_override_on_resume_is_refused_naming_it(tmp_path):
    run = stopped_run(tmp_path, "run")
    out = run_cli(["train", "--resume", str(run), *sets(["loss.name=contrastive", "train.eval_every=1"])])
    assert out.code == 2 and "loss.name cannot change" in out.stderr and "train.eval_every" not in out.stderr.split(
        "cannot")[0]


def test_failed_start_leaves_no_directory_behind(tmp_path):
    out = run_cli(["train", "--output", str(tmp_path / "r"), *sets(TINY + ["model.pretrained=/nope/w.pth"])])
    assert out.code == 2 and not (tmp_path / "r").exists()
