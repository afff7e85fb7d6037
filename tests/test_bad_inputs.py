"""Every bad input of the command line ends in one clear message and a non-zero exit, never a traceback.

The cases (command, what it must say) are listed in ``tests/_bad_input_cases.py``; the few that must now succeed
(scientific-notation floats, duplicates allowed with a warning, skipped bad images, photos with the default
model, resuming a finished run, retrying a failed start) say what they did.
"""

from __future__ import annotations

import pytest
from _bad_input_cases import CASES, check, run_cli

from deepmetric.cli import main


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, tmp_path):
    outcome = run_cli(case.argv(tmp_path))
    problem = check(case, outcome)
    assert problem is None, problem


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="optimizer.lr"):
        main(["--debug", "train", "--output", str(tmp_path / "r"), "--set", "optimizer.lr=-1"])


def test_the_case_list_covers_every_category():
    categories = {c.category for c in CASES}
    assert categories == {"config", "data", "checkpoint", "commands"} and len(CASES) >= 40
