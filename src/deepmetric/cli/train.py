"""``deepmetric train``: run an experiment from a YAML config (default: the KanjiGlyphs quickstart)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train an embedding model",
        description="Train an embedding model. Without --config the quickstart (KanjiGlyphs, small CNN, "
        "Multi-Similarity loss) runs offline on the embedded dataset.",
    )
    p.add_argument("--config", help="YAML experiment config (see `deepmetric recipes`)")
    p.add_argument("--output", help="run directory to create (default: runs/<name>-<timestamp>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.iterations=100 (repeatable)")
    p.add_argument("--data", help="dataset root (shortcut for --set data.root=...)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="allow writing into an existing non-empty --output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from deepmetric.training.config import ConfigError, load_config
    from deepmetric.training.run_dir import RunDirectoryExists, create_run_dir, default_run_dir
    from deepmetric.training.trainer import Trainer, TrainingDiverged, format_results_table

    distributed = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from deepmetric.training.distributed import init_distributed

        distributed = init_distributed()
    is_main = distributed is None or distributed.rank == 0
    try:
        if args.resume:
            trainer = Trainer.resume(args.resume, distributed=distributed)
            print(f"resuming {args.resume} at step {trainer.step}")
        else:
            overrides = list(args.overrides)
            if args.data:
                overrides.append(f"data.root={args.data}")
            config = load_config(args.config, overrides)
            run_dir = Path(args.output) if args.output else default_run_dir(config.name)
            if is_main:
                create_run_dir(run_dir, overwrite=args.overwrite)
            if distributed is not None:
                from deepmetric.training.distributed import barrier

                barrier(distributed)
            trainer = Trainer(config, run_dir, distributed=distributed)
        result = trainer.fit()
    except (ConfigError, RunDirectoryExists, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    finally:
        if distributed is not None:
            from deepmetric.training.distributed import destroy_distributed

            destroy_distributed()
    if is_main:
        print()
        print(f"run directory: {result.run_dir}")
        print(f"steps: {result.steps}, time: {result.seconds:.1f}s, selected step: {result.best_step}")
        print("test metrics (unseen classes), % :")
        print(format_results_table(result))
    return 0
