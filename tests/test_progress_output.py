"""Output piped to a file is a few plain lines (step, loss, images/s, ETA), not progress-bar redraws."""

from __future__ import annotations

import io

from deepmetric.training.config import load_config
from deepmetric.training.progress import TrainProgress
from deepmetric.training.run_dir import create_run_dir
from deepmetric.training.trainer import Trainer


def test_a_piped_40_step_run_prints_plain_lines(tmp_path, capsys):
    cfg = load_config(None, ["data.max_classes=24", "data.batch_size=32", "model.width=8", "train.threads=1",
                             "train.iterations=40", "train.eval_every=20", "train.progress=true"])
    Trainer(cfg, create_run_dir(tmp_path / "run")).fit()
    out, err = capsys.readouterr()
    assert "\r" not in out + err and "it/s" not in out + err  # no bar, neither training nor embedding
    lines = out.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["10/40", "20/40", "30/40", "40/40"]
    assert all("loss " in line and "img/s" in line and "ETA" in line for line in steps)
    assert sum(line.startswith("validation at step") for line in lines) == 2
    assert len(out) < 2000


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_keeps_the_bar():
    stream = _Terminal()
    progress = TrainProgress(total=20, initial=0, enabled=True, stream=stream)
    for step in range(1, 21):
        progress.update(step, 0.5, 100.0)
    progress.close()
    assert "\r" in stream.getvalue() and "step 10/20" not in stream.getvalue()


def test_long_runs_print_about_twenty_lines():
    stream = io.StringIO()
    progress = TrainProgress(total=10_000, initial=0, enabled=True, stream=stream)
    for step in range(1, 10_001):
        progress.update(step, 0.5, 100.0)
    assert 15 <= len(stream.getvalue().splitlines()) <= 25
