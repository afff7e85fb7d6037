"""``deepmetric train``: run an experiment from a YAML config (default: the KanjiGlyphs quickstart)."""

from __future__ import annotations

import argparse
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
    # imported when the sub-command runs: parsing the command line must not load the whole training stack
    from deepmetric.training.config import load_config
    from deepmetric.training.distributed import barrier, destroy_distributed, init_distributed
    from deepmetric.training.own_data import apply_photo_defaults, explicit_keys
    from deepmetric.training.run_dir import create_run_dir, default_run_dir, remove_failed_start
    from deepmetric.training.selection import format_results_table
    from deepmetric.training.trainer import Trainer

    distributed = init_distributed()  # one process unless launched by torchrun with WORLD_SIZE > 1
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.root={args.data}")
    try:
        if args.resume:
            trainer = Trainer.resume(args.resume, distributed=distributed, overrides=args.overrides)
            if trainer.finished:
                if distributed.is_main:
                    print(f"{args.resume} already finished at step {trainer.step} (see its results.json); nothing "
                          f"was changed. To train longer: --resume {args.resume} --set train.iterations=N "
                          f"with N > {trainer.step}")
                return 0
            changed = f" with {', '.join(trainer.resumed_changes)} changed" if trainer.resumed_changes else ""
            print(f"resuming {args.resume} at step {trainer.step} of {trainer.iterations}{changed}")
        else:
            config = load_config(args.config, overrides)
            notes = apply_photo_defaults(config, explicit_keys(args.config, overrides), data_given=bool(args.data))
            if distributed.is_main:
                for note in notes:
                    print(note, flush=True)
            run_dir = Path(args.output) if args.output else default_run_dir(config.name)
            if distributed.is_main:
                create_run_dir(run_dir, overwrite=args.overwrite)
            barrier(distributed)
            try:
                trainer = Trainer(config, run_dir, distributed=distributed)
            except BaseException:
                if distributed.is_main:  # nothing was trained: a retry with the same --output must work
                    remove_failed_start(run_dir)
                raise
        result = trainer.fit()
        # rank 0 writes the results after the last collective: the ranks tear gloo down together, not while a
        # peer still holds its connections
        barrier(distributed)
    finally:
        destroy_distributed()
    if distributed.is_main:
        print()
        print(f"run directory: {result.run_dir}")
        print(f"steps: {result.steps}, time: {result.seconds:.1f}s, selected step: {result.best_step}")
        print("test metrics (unseen classes), % :")
        print(format_results_table(result.before, result.after))
        for warning in result.warnings:
            print(warning)
    return 0
