"""``deepmetric report``: a self-contained HTML page of a finished run (see :mod:`.page` for its sections)."""

from deepmetric.training.report.charts import PALETTE, Series, nice_ticks, svg_line_chart, svg_scatter
from deepmetric.training.report.page import MAP_CLASSES, SECTION_IDS, pca_2d, render_report, write_report
from deepmetric.training.report.retrieval import (
    MAX_SCORED_QUERIES,
    NEIGHBOURS,
    ImageSource,
    Neighbours,
    choose_queries,
    first_relevant_rank,
    image_sources,
    retrieval_results,
    top_neighbours,
)

__all__ = [
    "MAP_CLASSES",
    "MAX_SCORED_QUERIES",
    "NEIGHBOURS",
    "PALETTE",
    "SECTION_IDS",
    "ImageSource",
    "Neighbours",
    "Series",
    "choose_queries",
    "first_relevant_rank",
    "image_sources",
    "nice_ticks",
    "pca_2d",
    "render_report",
    "retrieval_results",
    "svg_line_chart",
    "svg_scatter",
    "top_neighbours",
    "write_report",
]
