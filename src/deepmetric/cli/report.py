"""``deepmetric report RUN_DIR``: write a self-contained HTML report of a finished run."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="write a self-contained HTML report of a run",
        description="Render training curves, before/after metrics, the resolved config, retrieval examples and "
        "an embedding map of a run directory into one HTML file with no external assets.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by `deepmetric train`")
    p.add_argument("--output", metavar="FILE", help="HTML file to write (default: RUN_DIR/report.html)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from deepmetric.training.config import ConfigError
    from deepmetric.training.report import write_report

    try:
        path = write_report(args.run_dir, args.output)
    except (ConfigError, FileNotFoundError) as exc:  # RunArtifactError is a FileNotFoundError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0
