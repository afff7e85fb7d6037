"""``deepmetric`` command line: argument parsing only; each sub-command lives in its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

from deepmetric import __version__

# sub-command name -> module under deepmetric.cli providing add_parser(subparsers) and run(args) -> int
COMMANDS = ("train", "evaluate", "embed", "search", "report", "recipes", "reality_check")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepmetric",
        description="Deep metric learning: train embeddings, evaluate retrieval, embed and search.",
    )
    parser.add_argument("--version", action="version", version=f"deepmetric {__version__}")
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
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
