"""``deepmetric reality-check``: the Reality-Check protocol (4-fold class-disjoint CV × N seeds)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "reality-check",
        help="4-fold class-disjoint cross-validation × seeds, separated and concatenated test metrics",
        description="Train the config on each of the 4 class-disjoint folds of its training classes (model "
        "selection on the fold's validation classes) for every seed, then report the test metrics of the "
        "separated (mean of the 4 models) and concatenated (4 embeddings joined) models as mean ± 95 %% CI.",
    )
    p.add_argument("--config", help="YAML experiment config (e.g. configs/reality_check/cub200_ms.yaml)")
    p.add_argument("--output", required=True, help="folder to create for the fold runs and reality_check.json")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default: 0)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--data", help="dataset root (shortcut for --set data.root=...)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from deepmetric.training.config import ConfigError, load_config
    from deepmetric.training.reality_check import MeanCI, format_summary, run_protocol
    from deepmetric.training.run_dir import RunDirectoryExists

    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        print(f"error: output directory {output} already exists and is not empty", file=sys.stderr)
        return 2
    overrides = list(args.overrides) + ["data.validation_fraction=0"]  # the folds define validation
    if args.data:
        overrides.append(f"data.root={args.data}")
    try:
        config = load_config(args.config, overrides)
        payload = run_protocol(config, output, seeds=args.seeds)
    except (ConfigError, RunDirectoryExists, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {
        mode: {k: MeanCI(v["mean"], v["ci_half_width"], int(v["n"]), v["confidence"]) for k, v in metrics.items()}
        for mode, metrics in payload["summary"].items()
    }
    print(format_summary(summary))
    print(f"written: {output / 'reality_check.json'}")
    return 0
