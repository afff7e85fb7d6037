"""Per-category test metrics for datasets whose items carry a coarser category than their class (SOP's 12
super-classes, a dataset exposing a ``categories`` array), from the report's search of every query."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import PurePath
from typing import Any

import numpy as np

from deepmetric.evaluation import RetrievalResults
from deepmetric.training.report.sections import pct

# per-item category arrays a dataset may expose, most specific name first
CATEGORY_ATTRIBUTES = ("categories", "super_labels")


def item_categories(dataset: Any) -> tuple[np.ndarray, list[str]] | None:
    """(category id per item of ``dataset``, a printable name per category id) or None without categories.

    A :class:`~deepmetric.data.image_dataset.LabelledSubset` is looked through to the dataset it indexes. Names
    come from a ``category_names`` attribute, else from the one parent folder every item of a category shares
    (SOP keeps each super-class in its own folder, ``bicycle_final/…``), else the id."""
    base, rows = dataset, None
    if not any(getattr(dataset, a, None) is not None for a in CATEGORY_ATTRIBUTES):
        base, rows = getattr(dataset, "dataset", None), getattr(dataset, "indices", None)
        if base is None or rows is None:
            return None
    values = next((getattr(base, a) for a in CATEGORY_ATTRIBUTES if getattr(base, a, None) is not None), None)
    if values is None:
        return None
    categories = np.asarray(values, dtype=np.int64)
    if rows is not None:
        categories = categories[np.asarray(rows, dtype=np.int64)]
    if len(categories) != len(dataset):
        return None
    paths = getattr(dataset, "paths", None)
    given = getattr(base, "category_names", None)
    names = []
    for c in range(int(categories.max()) + 1 if len(categories) else 0):
        if given is not None and c < len(given):
            names.append(str(given[c]))
            continue
        folders = {PurePath(paths[i]).parent.name for i in np.flatnonzero(categories == c)} if paths else set()
        names.append(folders.pop() if len(folders) == 1 else str(c))
    return categories, names


def category_table(results: RetrievalResults, categories: np.ndarray, names: Sequence[str],
                   recall_at: Sequence[int]) -> str:
    """An HTML table with one row per category of the queries: their count and metric means (in %)."""
    ks = [k for k in sorted(set(recall_at)) if 1 <= k <= results.rank_depth] or [1]
    groups = results.metrics_by_group(categories, recall_at=ks)
    overall = results.metrics(recall_at=ks)
    keys = [f"recall@{k}" for k in ks] + [m for m in ("r_precision", "map@r") if m in overall]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)

    def row(name: str, values: dict[str, Any]) -> str:
        cells = "".join(f"<td>{pct(values.get(k))}</td>" for k in keys)
        return f"<tr><th>{html.escape(name)}</th><td>{int(values['n_queries']):,}</td>{cells}</tr>"

    body = [row(names[int(c)] if 0 <= int(c) < len(names) else str(c), v) for c, v in sorted(groups.items())]
    body.append(row("all queries", overall))
    return ('<h3>Per-category test metrics (%)</h3><p class="note">From the saved test embeddings, every query '
            'counted in its own category; neighbours are searched in the whole gallery.</p>'
            f'<table class="metrics categories"><thead><tr><th>category</th><th>queries</th>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')
