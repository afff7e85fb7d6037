"""``deepmetric report``: a self-contained HTML page of a finished run (see :mod:`.page` for its sections)."""

from deepmetric.training.report.categories import category_table, item_categories
from deepmetric.training.report.charts import (
    PALETTE,
    Series,
    nice_ticks,
    svg_line_chart,
    svg_scatter,
    tick_labels,
    ticks_within,
)
from deepmetric.training.report.page import MAP_CLASSES, SECTION_IDS, pca_2d, render_report, write_report
from deepmetric.training.report.retrieval import (
    NEIGHBOURS,
    ImageSource,
    Neighbours,
    choose_queries,
    first_relevant_rank,
    image_sources,
    names_are_glyphs,
    report_results,
    retrieval_results,
    top_neighbours,
)

__all__ = [
    "MAP_CLASSES",
    "NEIGHBOURS",
    "PALETTE",
    "SECTION_IDS",
    "ImageSource",
    "Neighbours",
    "Series",
    "category_table",
    "choose_queries",
    "first_relevant_rank",
    "image_sources",
    "item_categories",
    "names_are_glyphs",
    "nice_ticks",
    "pca_2d",
    "render_report",
    "report_results",
    "retrieval_results",
    "svg_line_chart",
    "svg_scatter",
    "tick_labels",
    "ticks_within",
    "top_neighbours",
    "write_report",
]
