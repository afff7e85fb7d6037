"""``deepmetric report``: one self-contained HTML page describing a finished run.

The page has no external assets (inline CSS, inline SVG charts, base64 PNG thumbnails), so it can be mailed,
archived or opened offline. Sections (stable ``id``s, used by tests and links):

* ``training-curves`` — training loss and the selection-split metrics against the step (inline SVG polylines);
* ``metrics``         — test metrics before/after training, the selected step and the protocol (a legacy run,
  which selected on the *test* split, gets a loud warning);
* ``config``          — the resolved ``config.yaml`` and the paper's reported numbers, if the recipe has them;
* ``retrieval``       — sample queries and the worst queries (among all queries) with their top-8 neighbours
  (green = same class, red = wrong class), images taken from the dataset rebuilt from the config; neighbours,
  ranks and the per-category table of ``metrics`` come from one exact search of every query
  (:func:`deepmetric.evaluation.retrieve`);
* ``embedding-map``   — a 2-D PCA projection of the test embeddings, 20 classes in distinct colours; classes
  named by a glyph (KanjiGlyphs) show the glyph's image in the legend, so no CJK font is needed to read it.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from deepmetric.evaluation import RetrievalResults
from deepmetric.training.report.categories import category_table, item_categories
from deepmetric.training.report.charts import PALETTE, svg_scatter
from deepmetric.training.report.retrieval import (
    ClassNames,
    ImageSource,
    class_name,
    class_names_of,
    image_sources,
    names_are_glyphs,
    report_results,
    retrieval_section,
    visible_name,
)
from deepmetric.training.report.sections import config_section, curves_section, metrics_section, pct, section
from deepmetric.training.run_artifacts import RunArtifacts, load_run

SECTION_IDS = ("training-curves", "metrics", "config", "retrieval", "embedding-map")
MAP_CLASSES = 20


def normalize_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def pca_2d(x: np.ndarray, fit_rows: int = 5000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Project ``x`` onto its first two principal components (fit on at most ``fit_rows`` rows).

    Returns (projection (n, 2), explained-variance ratio of the two components)."""
    x = np.asarray(x, dtype=np.float64)
    rows = x if len(x) <= fit_rows else x[np.random.default_rng(seed).choice(len(x), fit_rows, replace=False)]
    mean = rows.mean(axis=0)
    _, s, vt = np.linalg.svd(rows - mean, full_matrices=False)
    comps = vt[:2]
    if comps.shape[0] < 2:  # 1-d embeddings: pad a zero axis
        comps = np.vstack([comps, np.zeros_like(comps)])
    var = s**2
    ratio = var[:2] / var.sum() if var.sum() > 0 else np.zeros(2)
    return (x - mean) @ comps.T, np.pad(ratio, (0, 2 - len(ratio)))


def _legend_glyphs(source: ImageSource | None, labels: np.ndarray, chosen: np.ndarray,
                   names: ClassNames | None) -> list[str | None] | None:
    """One small image per chosen class (its first item) when the class names are glyphs, else None."""
    if source is None or not names_are_glyphs(names):
        return None
    images: list[str | None] = []
    for c in chosen:
        try:
            images.append(source.png(int(np.flatnonzero(labels == c)[0]), size=32))
        except Exception:  # noqa: BLE001  (an unreadable item loses its legend image, not the page)
            images.append(None)
    return images


def _embedding_map_section(run: RunArtifacts, names: ClassNames | None, source: ImageSource | None) -> str:
    emb = run.embeddings
    if emb is None:
        return section("embedding-map", "Embedding map", '<p class="note">No saved test embeddings.</p>')
    x = normalize_rows(emb.query if emb.gallery is None else np.vstack([emb.query, emb.gallery]))
    y = emb.query_labels if emb.gallery is None else np.concatenate([emb.query_labels, emb.gallery_labels])
    classes, counts = np.unique(y, return_counts=True)
    # the most populated classes read best; ties broken by label for determinism
    chosen = classes[np.lexsort((classes, -counts))][:MAP_CLASSES]
    chosen = np.sort(chosen)
    proj, ratio = pca_2d(x, seed=run.config.train.seed)
    keep = np.flatnonzero(np.isin(y, chosen))
    cap = 2000  # an SVG with tens of thousands of circles is slow to render
    if len(keep) > cap:
        keep = np.sort(np.random.default_rng(0).choice(keep, cap, replace=False))
    colour_of = {int(c): PALETTE[i % len(PALETTE)] for i, c in enumerate(chosen)}
    colours = [colour_of[int(y[i])] for i in keep]
    legend = [(f"class {visible_name(int(c), names)}", colour_of[int(c)]) for c in chosen]
    # the legend images are taken from the query split, whose rows are the first len(query) map rows
    glyphs = _legend_glyphs(source, emb.query_labels, chosen, names)
    svg = svg_scatter(proj[keep], colours, title=f"PCA of the L2-normalised test embeddings "
                      f"(PC1 {100 * ratio[0]:.1f} %, PC2 {100 * ratio[1]:.1f} % of variance)",
                      legend=legend, width=760, height=520, legend_images=glyphs,
                      legend_titles=[f"class {class_name(int(c), names)}" for c in chosen])
    text = (f"<p>{len(keep)} points of {len(chosen)} of {len(classes)} test classes (the most populated), projected "
            "with PCA fitted on all test embeddings. PCA is linear: well-separated clusters here are well separated "
            "in the embedding, but overlapping ones may still be separable in more dimensions.</p>")
    return section("embedding-map", "Embedding map", text + svg)


CSS = """
:root { --ok: #16a34a; --bad: #dc2626; --ink: #111827; --muted: #6b7280; --line: #e5e7eb; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, "Noto Sans CJK JP",
       "Noto Sans JP", "IPAexGothic", "IPAGothic", "TakaoGothic", "VL Gothic", "WenQuanYi Zen Hei",
       "Droid Sans Fallback", "Hiragino Sans", "Yu Gothic", "Meiryo", sans-serif; color: var(--ink);
       margin: 0; background: #f3f4f6; }
header { background: #111827; color: #fff; padding: 18px 28px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header .sub { color: #d1d5db; }
nav { padding: 8px 28px; background: #fff; border-bottom: 1px solid var(--line); position: sticky; top: 0; z-index: 2; }
nav a { margin-right: 16px; color: #2563eb; text-decoration: none; }
main { padding: 16px 28px 40px; max-width: 1240px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 16px 20px; margin: 16px 0; }
section h2 { margin: 0 0 10px; font-size: 18px; }
h3 { font-size: 15px; margin: 16px 0 8px; }
.charts { display: flex; flex-wrap: wrap; gap: 14px; }
.chart { border: 1px solid var(--line); border-radius: 6px; max-width: 100%; height: auto; }
.chart-title { font-size: 13px; font-weight: 600; fill: var(--ink); }
.tick, .legend { font-size: 11px; fill: #374151; }
.axis { font-size: 12px; fill: var(--muted); }
.marker { font-size: 11px; fill: #111827; font-weight: 600; }
.empty-chart { width: 560px; height: 120px; border: 1px dashed #d1d5db; border-radius: 6px; padding: 14px;
               color: var(--muted); }
table { border-collapse: collapse; }
table.metrics th, table.metrics td, table.facts th, table.facts td { border-bottom: 1px solid var(--line);
  padding: 4px 12px; text-align: right; }
table.metrics th:first-child, table.facts th { text-align: left; font-weight: 600; }
table.metrics thead th { background: #f9fafb; }
table.facts td { text-align: left; }
.two-col { display: flex; flex-wrap: wrap; gap: 28px; align-items: flex-start; }
.up { color: var(--ok); } .down { color: var(--bad); }
.legacy-warning { background: #fef2f2; border: 2px solid var(--bad); color: #7f1d1d; padding: 12px 14px;
                  border-radius: 6px; margin-bottom: 12px; font-size: 15px; }
.protocol-ok { background: #f0fdf4; border: 1px solid #86efac; color: #14532d; padding: 10px 14px; border-radius: 6px;
               margin-bottom: 12px; }
pre { background: #f9fafb; border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px; overflow: auto;
      max-height: 420px; font-size: 12px; }
code { background: #f3f4f6; padding: 0 4px; border-radius: 3px; }
.note { color: var(--muted); font-style: italic; }
.qrow { display: flex; align-items: center; gap: 10px; padding: 6px 0; border-bottom: 1px dashed var(--line); }
.qinfo { width: 130px; flex: none; color: #374151; font-size: 12px; }
.tiles { display: flex; gap: 6px; flex-wrap: nowrap; }
.tile { margin: 0; width: 84px; text-align: center; }
.tile img, .tile .noimg { width: 76px; height: 76px; object-fit: contain; display: block; margin: 0 auto;
  border: 4px solid #9ca3af; border-radius: 4px; background: #fff; image-rendering: pixelated; }
.tile .noimg { line-height: 68px; font-size: 22px; color: var(--muted); }
.tile.query img, .tile.query .noimg { border-color: #2563eb; }
.tile.hit img, .tile.hit .noimg { border-color: var(--ok); }
.tile.miss img, .tile.miss .noimg { border-color: var(--bad); }
.tile figcaption { font-size: 10.5px; color: #374151; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.tile.query figcaption { color: #1d4ed8; font-weight: 600; }
.key { padding: 1px 6px; border: 3px solid; border-radius: 4px; }
.key.hit { border-color: var(--ok); } .key.miss { border-color: var(--bad); }
footer { color: var(--muted); font-size: 12px; padding: 0 28px 24px; }
"""


def _categories(run: RunArtifacts, source: ImageSource | None, results: RetrievalResults | None) -> str:
    """The per-category table when the query split's items carry categories (SOP super-classes)."""
    if source is None or results is None:
        return ""
    found = item_categories(source.dataset)
    if found is None or len(found[0]) != results.n_queries:
        return ""
    return category_table(results, found[0], found[1], run.config.evaluation.recall_at)


def render_report(run: RunArtifacts) -> str:
    """The full HTML page of ``run`` as a string."""
    cfg = run.config
    after = run.results.get("after", {}).get("test", {})
    headline = " · ".join(f"{k} {pct(after[k])} %" for k in ("recall@1", "map@r") if k in after)
    protocol = run.results.get("protocol", cfg.train.protocol)
    nav = "".join(f'<a href="#{sid}">{sid.replace("-", " ")}</a>' for sid in SECTION_IDS)
    qsrc, gsrc, note = image_sources(run) if run.embeddings is not None else (None, None, "")
    results = report_results(run)  # one search of every query, read by the metrics and retrieval sections
    names = class_names_of(qsrc)
    sections = [curves_section(run), metrics_section(run, _categories(run, qsrc, results)), config_section(run),
                retrieval_section(run, qsrc, gsrc, note, results), _embedding_map_section(run, names, qsrc)]
    legacy_tag = ' · <strong style="color:#fca5a5">LEGACY (test-selected)</strong>' if protocol == "legacy" else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>deepmetric report · {html.escape(cfg.name)}</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{CSS}</style></head><body>"
        f"<header><h1>{html.escape(cfg.name)}</h1><div class=\"sub\">{html.escape(cfg.data.dataset)} · "
        f"{html.escape(cfg.loss.name)} · {html.escape(cfg.model.backbone)} · {html.escape(str(run.run_dir))}"
        f"{(' · ' + html.escape(headline)) if headline else ''}{legacy_tag}</div></header>"
        f"<nav>{nav}</nav><main>{''.join(sections)}</main>"
        "<footer>Generated by deepmetric report. Self-contained: no external resources.</footer>"
        "</body></html>\n"
    )


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Render the report of ``run_dir`` into ``output`` (default ``run_dir/report.html``) and return its path."""
    run = load_run(run_dir)
    path = Path(output) if output is not None else Path(run_dir) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(run), encoding="utf-8")
    return path
