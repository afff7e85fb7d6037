"""Bad-input cases of the command line: each is a command, the exit status and the message it must give.

Shared by ``tests/test_bad_inputs.py`` and by anyone who wants the before/after table (run this file: it prints
one row per case with what the command did). A case runs ``deepmetric.cli.main`` in this process, so an
exception escaping it is a traceback a user would have seen.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

TINY = [
    "data.max_classes=24", "data.batch_size=32", "data.m_per_class=4", "data.eval_batch_size=512",
    "model.width=8", "model.embedding_size=32", "train.progress=false", "train.threads=1",
    "evaluation.recall_at=[1, 2]", "train.iterations=2", "train.eval_every=0",
]
# a folder / CSV of RGB photos with the small CNN: fast enough for a data-validation case
PHOTO = [
    "data.batch_size=8", "data.m_per_class=4", "model.backbone=kanji_cnn", "model.width=4",
    "model.embedding_size=8", "data.train_transform=reality_check_train", "data.eval_transform=reality_check_eval",
    "train.progress=false", "train.threads=1", "train.iterations=2", "train.eval_every=0",
    "evaluation.recall_at=[1]",
]


def sets(items: list[str]) -> list[str]:
    return [x for item in items for x in ("--set", item)]


@dataclass
class Outcome:
    code: int | None  # None: an exception escaped main (a traceback)
    stdout: str
    stderr: str
    exception: str = ""

    @property
    def kind(self) -> str:
        if self.code is None or "Traceback (most recent call last)" in self.stderr:
            return "traceback"
        if self.code == 0:
            return "ok (exit 0)"
        return f"error (exit {self.code})"


def run_cli(argv: list[str]) -> Outcome:
    from deepmetric.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code: int | None = main(argv)
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
        except Exception as exc:  # noqa: BLE001 - the point is to see what escapes
            return Outcome(None, out.getvalue(), err.getvalue(), f"{type(exc).__name__}: {exc}")
    return Outcome(code, out.getvalue(), err.getvalue())


# ------------------------------------------------------------------------------------------ inputs ----------
def write_photo_folder(root: Path, classes: int = 8, per_class: int = 4, size: int = 24) -> Path:
    """``root/class<i>/<j>.png``: solid-colour RGB images with a little noise, distinct per class."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, size=3)
        for j in range(per_class):
            pixels = np.clip(base + rng.normal(0, 12, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(folder / f"{j}.png")
    return root


def write_csv(root: Path, rows: list[str], header: str = "path,label,split", name: str = "df.csv") -> Path:
    """A CSV next to a photo folder; rows reference ``class<c>/<j>.png`` files of :func:`write_photo_folder`."""
    write_photo_folder(root)
    path = root / name
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def good_rows(classes: int = 8, per_class: int = 4, test_from: int = 4) -> list[str]:
    return [f"class{c}/{j}.png,{c},{'test' if c >= test_from else 'train'}"
            for c in range(classes) for j in range(per_class)]


def finished_run(tmp: Path) -> Path:
    run = tmp / "finished"
    if not (run / "results.json").is_file():
        code = run_cli(["train", "--output", str(run), *sets(TINY)]).code
        assert code == 0, "the tiny reference run failed"
    return run


def stopped_run(tmp: Path, name: str) -> Path:
    """A run stopped at step 2 of 4: its last.pt is a mid-run checkpoint (for the corrupt-checkpoint cases)."""
    import torch

    from deepmetric.training.config import load_config
    from deepmetric.training.run_dir import create_run_dir
    from deepmetric.training.trainer import Trainer

    torch.set_num_threads(1)
    config = load_config(None, TINY + ["train.iterations=4", "train.checkpoint_every=2"])
    trainer = Trainer(config, create_run_dir(tmp / name))
    trainer.iterations = 2  # stop after step 2 as a killed run would, leaving last.pt at step 2
    trainer.fit()
    (tmp / name / "results.json").unlink()
    (tmp / name / "model.pt").unlink()
    return tmp / name


def flip_bytes(path: Path, count: int = 2000) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    for i in range(start, min(start + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------ cases -----------
@dataclass
class Case:
    name: str
    category: str
    argv: Callable[[Path], list[str]]  # builds its inputs under the given folder, returns the command
    expect: str  # regex the output (stderr + stdout) must contain
    exit_zero: bool = False  # a case that must now succeed (with a warning or message)


def _train(*items: str, extra: tuple[str, ...] = ()) -> Callable[[Path], list[str]]:
    return lambda tmp: ["train", "--output", str(tmp / "run"), *sets(TINY + list(items)), *extra]


def _yaml(text: str) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        path = tmp / "c.yaml"
        path.write_text(text)
        return ["train", "--config", str(path), "--output", str(tmp / "run"), *sets(TINY)]

    return make


def _photo(rows: Callable[[Path], Path | None] | None = None, *items: str) -> Callable[[Path], list[str]]:
    """Train on a photo folder (``rows`` None) or on the CSV / folder that ``rows`` prepares."""

    def make(tmp: Path) -> list[str]:
        data = rows(tmp) if rows is not None else write_photo_folder(tmp / "photos")
        dataset = "csv" if Path(str(data)).suffix == ".csv" else "folder"
        return ["train", "--output", str(tmp / "run"), "--data", str(data),
                *sets(PHOTO + [f"data.dataset={dataset}", *items])]

    return make


def _broken_image(kind: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        root = write_photo_folder(tmp / "photos")
        bad = root / "class1" / "9.png"
        if kind == "empty":
            bad.write_bytes(b"")
        elif kind == "text":
            bad.write_text("this is not an image")
        else:
            good = (root / "class1" / "0.png").read_bytes()
            bad.write_bytes(good[: len(good) // 2])
        return root

    return make


def _csv(rows: Callable[[], list[str]], header: str = "path,label,split") -> Callable[[Path], Path]:
    return lambda tmp: write_csv(tmp / "photos", rows(), header)


def _dup_test() -> list[str]:
    rows = good_rows()
    return rows + [rows[-1]]


def _leak() -> list[str]:
    return good_rows() + ["class0/0.png,0,test"]


def _missing_file() -> list[str]:
    return good_rows() + ["class7/99.png,7,test"]


def _resume_corrupt(kind: str) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        run = stopped_run(tmp, f"stopped-{kind}")
        ckpt = run / "checkpoints" / "last.pt"
        if kind == "flip":
            flip_bytes(ckpt)
        elif kind == "truncate":
            ckpt.write_bytes(ckpt.read_bytes()[:1000])
        else:
            ckpt.write_bytes(b"")
        return ["train", "--resume", str(run)]

    return make


def _resume_finished(tmp: Path) -> list[str]:
    return ["train", "--resume", str(finished_run(tmp))]


def _resume_with_set(item: str) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        return ["train", "--resume", str(stopped_run(tmp, "stopped-set")), "--set", item]

    return make


def _failed_start_retry(tmp: Path) -> list[str]:
    first = run_cli(["train", "--output", str(tmp / "run"), *sets(TINY + ["model.pretrained=/nonexistent/w.pth"])])
    assert first.code != 0  # fails while building the model, after the run directory was created
    return ["train", "--output", str(tmp / "run"), *sets(TINY)]


def _embeddings(tmp: Path, **arrays: np.ndarray) -> list[str]:
    paths = []
    for name, array in arrays.items():
        np.save(tmp / f"{name}.npy", array)
        paths.append(str(tmp / f"{name}.npy"))
    return paths


def _evaluate_bad_shapes(tmp: Path) -> list[str]:
    e, lab = _embeddings(tmp, e=np.zeros((5, 4), np.float32), l=np.zeros(7, np.int64))
    return ["evaluate", "--embeddings", e, "--labels", lab]


def _folder_model_run(tmp: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from _run_fixtures import fabricate_folder_model_run

    return fabricate_folder_model_run(tmp / "frun", tmp / "fimages")


def _embed_bad_image(tmp: Path) -> list[str]:
    run = _folder_model_run(tmp)
    (tmp / "fimages" / "class0" / "broken.png").write_text("not an image")
    return ["embed", "--run", str(run), "--images", str(tmp / "fimages"), "--output", str(tmp / "emb")]


def _search_bad_query(tmp: Path) -> list[str]:
    run = _folder_model_run(tmp)
    g = _embeddings(tmp, g=np.eye(6, 8, dtype=np.float32))[0]
    (tmp / "q.png").write_bytes(b"")
    return ["search", "--run", str(run), "--gallery-embeddings", g, "--query", str(tmp / "q.png")]


def _embed_wrong_shapes(tmp: Path) -> list[str]:
    run = _folder_model_run(tmp)
    import torch

    torch.save({"head.fc.weight": torch.zeros(3, 3)}, tmp / "wrong.pt")
    return ["embed", "--config", str(run / "config.yaml"), "--checkpoint", str(tmp / "wrong.pt"),
            "--images", str(tmp / "fimages"), "--output", str(tmp / "emb")]


CASES: list[Case] = [
    # ---------------------------------------------------------------------------------------- config values
    Case("negative lr", "config", _train("optimizer.lr=-0.1"), r"optimizer\.lr"),
    Case("lr NaN", "config", _train("optimizer.lr=.nan"), r"optimizer\.lr.*finite"),
    Case("lr infinite", "config", _train("optimizer.lr=.inf"), r"optimizer\.lr.*finite"),
    Case("batch not a multiple of m", "config", _train("data.batch_size=30"), r"multiple of data\.m_per_class"),
    Case("embedding size 0", "config", _train("model.embedding_size=0"), r"model\.embedding_size"),
    Case("validation fraction 1.5", "config", _train("data.validation_fraction=1.5"), r"validation_fraction"),
    Case("unknown backbone", "config", _train("model.backbone=resnet5"), r"model\.backbone.*resnet5"),
    Case("unknown dataset", "config", _train("data.dataset=imagenet22k"), r"data\.dataset.*imagenet22k"),
    Case("benchmark without --data", "config", _train("data.dataset=cub200"), r"data\.root.*--data"),
    Case("unknown loss", "config", _train("loss.name=nope"), r"loss\.name.*nope"),
    Case("unknown loss parameter", "config", _train("loss.params={bogus: 1}"), r"loss\.params.*bogus"),
    Case("unknown miner", "config", _train("loss.miner=nope"), r"loss\.miner.*nope"),
    Case("unknown memory", "config", _train("memory.name=nope"), r"memory\.name.*nope"),
    Case("unknown synthesis", "config", _train("synthesis.name=nope"), r"synthesis\.name.*nope"),
    Case("selection metric not computed", "config", _train("evaluation.selection_metric=recall@3"),
         r"evaluation\.selection_metric.*recall@3"),
    Case("unknown evaluation metric", "config", _train("evaluation.metrics=[bogus]"), r"evaluation\.metrics.*bogus"),
    Case("recall@0", "config", _train("evaluation.recall_at=[0]"), r"evaluation\.recall_at"),
    Case("eval_every -1", "config", _train("train.eval_every=-1"), r"train\.eval_every"),
    Case("iterations 0", "config", _train("train.iterations=0"), r"train\.iterations"),
    Case("unknown device", "config", _train("train.device=banana"), r"train\.device.*banana"),
    Case("m larger than every class", "config", _train("data.m_per_class=40", "data.batch_size=80"),
         r"m=40"),
    Case("single training class", "config", _train("data.max_classes=1", "data.batch_size=4"),
         r"single class|one class"),
    Case("missing pretrained file", "config", _train("model.pretrained=/nonexistent/w.pth"), r"/nonexistent/w\.pth"),
    Case("unknown transform", "config", _train("data.train_transform=nope"), r"nope"),
    Case("scheduler step without step_size", "config", _train("scheduler.name=step"), r"scheduler\.step_size"),
    Case("--set without '='", "config", _train(extra=("--set", "train.iterations")), r"key=value"),
    Case("--set of a string for an int", "config", _train("train.iterations=abc"), r"train\.iterations"),
    Case("unknown key", "config", _train("train.iteration=5"), r"train\.iteration"),
    Case("invalid YAML", "config", _yaml("train: [\n"), r"not valid YAML"),
    Case("YAML lr 1e-4 accepted", "config", _yaml("optimizer:\n  lr: 1e-4\n"), r"run directory", exit_zero=True),
    Case("--set lr=1e-4 accepted", "config", _train("optimizer.lr=1e-4"), r"run directory", exit_zero=True),
    # ---------------------------------------------------------------------------------------- data
    Case("missing data folder", "data", lambda t: _photo(lambda _t: t / "nowhere")(t), r"nowhere"),
    Case("zero-byte image", "data", _photo(_broken_image("empty")), r"class1/9\.png"),
    Case("text file named .png", "data", _photo(_broken_image("text")), r"class1/9\.png"),
    Case("truncated PNG", "data", _photo(_broken_image("truncated")), r"class1/9\.png"),
    Case("bad image skipped (on_bad_image=skip)", "data",
         _photo(_broken_image("empty"), "data.on_bad_image=skip"), r"skipped 1 unreadable", exit_zero=True),
    Case("CSV missing column", "data", _photo(_csv(good_rows, "path,label")), r"df\.csv.*split"),
    Case("CSV non-integer label", "data", _photo(_csv(lambda: good_rows() + ["class0/0.png,x,test"])),
         r"df\.csv:\d+.*label"),
    Case("CSV unknown split", "data", _photo(_csv(lambda: good_rows() + ["class0/1.png,0,tset"])),
         r"df\.csv:\d+.*split"),
    Case("CSV extra field", "data", _photo(_csv(lambda: good_rows() + ["class0/1.png,0,test,x"])),
         r"df\.csv:\d+.*more fields"),
    Case("CSV duplicate test row", "data", _photo(_csv(_dup_test)), r"twice in split 'test'"),
    Case("CSV path in train and test", "data", _photo(_csv(_leak)), r"in splits 'train' and 'test'"),
    Case("CSV duplicates allowed with a warning", "data",
         _photo(_csv(_dup_test), "data.allow_duplicate_paths=true"), r"(?i)warning.*twice", exit_zero=True),
    Case("CSV without test rows", "data", _photo(_csv(lambda: good_rows(test_from=99))), r"no .*test"),
    Case("CSV row naming a missing file", "data", _photo(_csv(_missing_file)), r"class7/99\.png"),
    Case("CSV empty file", "data", _photo(_csv(list, "")), r"df\.csv"),
    Case("RGB folder with the default model", "data",
         lambda t: ["train", "--output", str(t / "run"), "--data", str(write_photo_folder(t / "photos")),
                    *sets(["train.iterations=1", "train.eval_every=0", "train.progress=false",
                           "data.batch_size=8", "data.eval_batch_size=64", "evaluation.recall_at=[1]"])],
         r"mobilenet_v2", exit_zero=True),
    # ---------------------------------------------------------------------------------------- checkpoints
    Case("resume a missing run", "checkpoint", lambda t: ["train", "--resume", str(t / "nowhere")], r"nowhere"),
    Case("resume, 2000 bytes flipped", "checkpoint", _resume_corrupt("flip"), r"last\.pt.*checksum"),
    Case("resume, truncated last.pt", "checkpoint", _resume_corrupt("truncate"), r"last\.pt"),
    Case("resume, empty last.pt", "checkpoint", _resume_corrupt("empty"), r"last\.pt.*empty"),
    Case("resume a finished run", "checkpoint", _resume_finished, r"already finished", exit_zero=True),
    Case("resume --set iterations (safe)", "checkpoint", _resume_with_set("train.iterations=3"),
         r"train\.iterations", exit_zero=True),
    Case("resume --set embedding size (unsafe)", "checkpoint", _resume_with_set("model.embedding_size=16"),
         r"model\.embedding_size.*cannot change"),
    Case("retry after a failed start", "checkpoint", _failed_start_retry, r"run directory", exit_zero=True),
    Case("embed weights of the wrong shapes", "checkpoint", _embed_wrong_shapes, r"wrong\.pt"),
    # ---------------------------------------------------------------------------------------- other commands
    Case("embed a folder with a bad image", "commands", _embed_bad_image, r"broken\.png"),
    Case("search with an empty query image", "commands", _search_bad_query, r"q\.png"),
    Case("evaluate, labels of the wrong length", "commands", _evaluate_bad_shapes, r"5.*7|7.*5"),
    Case("report on a missing run", "commands", lambda t: ["report", str(t / "nowhere")], r"nowhere"),
]


def check(case: Case, outcome: Outcome) -> str | None:
    """None when ``outcome`` is what ``case`` demands, else why not."""
    text = outcome.stderr + outcome.stdout
    if outcome.kind == "traceback":
        return f"traceback: {outcome.exception or outcome.stderr[-500:]}"
    if case.exit_zero != (outcome.code == 0):
        return f"exit {outcome.code}: {text[-800:]}"
    if not re.search(case.expect, text, flags=re.DOTALL):
        return f"message does not match {case.expect!r}: {text[-800:]}"
    return None


def first_line(outcome: Outcome) -> str:
    text = outcome.exception or outcome.stderr.strip() or outcome.stdout.strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return (lines[-1] if outcome.exception else (lines[0] if lines else ""))[:150]


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("default")
    rows = []
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                outcome = run_cli(case.argv(Path(tmp)))
            except Exception as exc:  # noqa: BLE001 - the fixture itself failed
                outcome = Outcome(None, "", "", f"setup: {type(exc).__name__}: {exc}")
        verdict = check(case, outcome)
        rows.append({"case": case.name, "category": case.category, "kind": outcome.kind,
                     "passes": verdict is None, "says": first_line(outcome)})
        print(json.dumps(rows[-1]), flush=True)
