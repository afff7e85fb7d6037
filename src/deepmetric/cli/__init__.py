"""``deepmetric`` command line: argument parsing only; each sub-command lives in its own module."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings
from collections.abc import Iterator

from deepmetric import __version__
from deepmetric.config_errors import ConfigError
from deepmetric.data.csv_dataset import CSVFormatError
from deepmetric.data.image_dataset import BadImageError, DatasetLayoutError
from deepmetric.models.pretrained import PretrainedWeightsError
from deepmetric.training.checkpoint import CheckpointError
from deepmetric.training.guards import TrainingDiverged

#: what a user can cause (a bad config, file, dataset, checkpoint or weight file): one line and exit status 2,
#: no traceback unless --debug or DEEPMETRIC_DEBUG=1. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, CSVFormatError, CheckpointError, BadImageError, DatasetLayoutError, FileNotFoundError,
               FileExistsError, PretrainedWeightsError)

# sub-command name -> module under deepmetric.cli providing add_parser(subparsers) and run(args) -> int
COMMANDS = ("train", "evaluate", "embed", "index", "search", "report", "recipes", "reality_check")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepmetric",
        description="Deep metric learning: train embeddings, evaluate retrieval, embed and search.",
    )
    parser.add_argument("--version", action="version", version=f"deepmetric {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: environment DEEPMETRIC_DEBUG=1)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"deepmetric.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"deepmetric.cli.{name}":
                continue  # sub-command not shipped in this build
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("DEEPMETRIC_DEBUG", "").strip().lower() in ("1", "true", "yes")
    try:
        with _printed_warnings():
            return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except TrainingDiverged as exc:
        if debug:
            raise
        print(f"error: training diverged: {exc}", file=sys.stderr)
        return 3
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"error: {_one_message(exc)}", file=sys.stderr)
        return 2


def _one_message(exc: BaseException) -> str:
    """The message of ``exc``; an error re-raised from a DataLoader worker carries the worker's traceback in its
    message, of which the last line is the original message."""
    text = str(exc)
    if "Traceback (most recent call last)" in text:
        lines = [line for line in text.splitlines() if line.strip()]
        text = lines[-1].split(": ", 1)[-1] if lines else text
    return text


@contextlib.contextmanager
def _printed_warnings() -> Iterator[None]:
    """Library warnings (duplicated CSV rows allowed, ...) as one ``warning: ...`` line each on stderr."""

    def show(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("default", UserWarning)
        warnings.showwarning = show
        yield


if __name__ == "__main__":
    sys.exit(main())
