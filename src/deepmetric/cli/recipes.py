"""``deepmetric recipes``: list the paper recipes (``configs/``) or print one."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "recipes",
        help="list the paper recipes, or show one",
        description="List the recipe YAMLs (dataset, loss, backbone, the paper's reported Recall@1), or print "
        "one with `deepmetric recipes show NAME`. The folder is configs/ of the checkout, or $DEEPMETRIC_CONFIGS. "
        "Train one with `deepmetric train --config <path>`.",
    )
    p.add_argument("action", nargs="?", choices=("list", "show"), default="list")
    p.add_argument("name", nargs="?", help="recipe name for `show`, e.g. cub200/ms_bninception")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def _table(rows: list[dict[str, object]]) -> str:
    cols = [("name", "recipe"), ("dataset", "dataset"), ("loss", "loss"), ("extras", "+"),
            ("backbone", "backbone"), ("embedding_size", "dim"), ("protocol", "protocol"),
            ("reported_recall@1", "paper R@1")]
    cells = [[h for _, h in cols]]
    for r in rows:
        r1 = r["reported_recall@1"]
        cells.append([str(r[k]) if k != "reported_recall@1" else ("–" if r1 is None else f"{r1:.2f}")
                      for k, _ in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from deepmetric.training.config import ConfigError
    from deepmetric.training.recipes import describe, find_recipe, list_recipes

    try:
        if args.action == "show":
            if not args.name:
                raise ConfigError("`deepmetric recipes show` needs a recipe NAME (see `deepmetric recipes`)")
            path = find_recipe(args.name)
            if args.json:
                info = describe(path)
                print(json.dumps({**info.as_dict(), "reported": info.reported}, indent=2))
            else:
                print(f"# {path}")
                print(path.read_text(), end="")
            return 0
        rows = [r.as_dict() for r in list_recipes()]
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=2) if args.json else _table(rows))
    return 0
