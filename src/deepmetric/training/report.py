"""``deepmetric report``: one self-contained HTML page describing a finished run.

The page has no external assets (inline CSS, inline SVG charts drawn here, base64 PNG thumbnails), so it can be
mailed, archived or opened offline. Sections (stable ``id``s, used by tests and links):

* ``training-curves`` — training loss and the selection-split metrics against the step (inline SVG polylines);
* ``metrics``         — test metrics before/after training, the selected step and the protocol (a legacy run,
  which selected on the *test* split, gets a loud warning);
* ``config``          — the resolved ``config.yaml`` and the paper's reported numbers, if the recipe has them;
* ``retrieval``       — sample queries and the worst queries with their top-8 neighbours (green = same class,
  red = wrong class), images taken from the dataset rebuilt from the config;
* ``embedding-map``   — a 2-D PCA projection of the test embeddings, ~20 classes coloured.

Charts are drawn as SVG by hand rather than with matplotlib, which is not a dependency of the library.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deepmetric.training.run_artifacts import EvalEmbeddings, RunArtifacts, load_run

SECTION_IDS = ("training-curves", "metrics", "config", "retrieval", "embedding-map")
NEIGHBOURS = 8
SAMPLE_QUERIES = 8
WORST_QUERIES = 8
MAP_CLASSES = 20
# worst-query search scores at most this many queries (an N×N pass over all of SOP would take minutes)
MAX_SCORED_QUERIES = 5000
THUMB = 72  # thumbnail edge in pixels

# 20 well-separated colours (a qualitative palette written out, so no plotting library is needed)
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#393b79", "#e6550d", "#31a354", "#ad494a", "#756bb1", "#843c39", "#de9ed6", "#636363", "#8ca252", "#6baed6",
)


# =========================================================================================== SVG charts ======
@dataclass
class Series:
    name: str
    x: Sequence[float]
    y: Sequence[float]
    color: str
    markers: bool = False


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [lo, hi] (steps of 1, 2, 2.5 or 5 × 10^k)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) * 0.1 or 1.0)
    raw = (hi - lo) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    value = start
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def _tick_formatter(ticks: Sequence[float]) -> Any:
    """One format for a whole axis (mixing 0.001 and 8.0e-04 on one axis reads badly)."""
    big = max(abs(t) for t in ticks) if ticks else 0.0
    scientific = big >= 1e4 or 0 < big < 1e-2

    def fmt(v: float) -> str:
        if v == 0:
            return "0"
        return f"{v:.1e}" if scientific else f"{v:g}"

    return fmt


def svg_line_chart(series: Sequence[Series], *, title: str, x_label: str, y_label: str, width: int = 560,
                   height: int = 300, marker_x: float | None = None, marker_label: str = "") -> str:
    """An inline SVG line chart with axes, round ticks, a legend and an optional vertical marker line."""
    series = [s for s in series if len(s.x) > 0]
    esc = html.escape
    if not series:
        return (f'<div class="empty-chart"><strong>{esc(title)}</strong><br>no data logged for this chart</div>')
    left, right, top, bottom = 64, 16, 50, 48
    pw, ph = width - left - right, height - top - bottom
    xs = [float(v) for s in series for v in s.x]
    ys = [float(v) for s in series for v in s.y if math.isfinite(float(v))]
    if marker_x is not None:
        xs.append(float(marker_x))
    x_ticks = nice_ticks(min(xs), max(xs))
    y_ticks = nice_ticks(min(ys) if ys else 0.0, max(ys) if ys else 1.0)
    fmt_x, fmt_y = _tick_formatter(x_ticks), _tick_formatter(y_ticks)
    x0, x1 = x_ticks[0], x_ticks[-1]
    y0, y1 = y_ticks[0], y_ticks[-1]

    def sx(v: float) -> float:
        return left + (v - x0) / (x1 - x0 or 1.0) * pw

    def sy(v: float) -> float:
        return top + ph - (v - y0) / (y1 - y0 or 1.0) * ph

    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">'),
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>',
           f'<text x="{left}" y="20" class="chart-title">{esc(title)}</text>']
    for t in y_ticks:
        y = sy(t)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e7eb"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{fmt_y(t)}</text>')
    for t in x_ticks:
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#6b7280"/>')
        out.append(f'<text x="{x:.1f}" y="{top + ph + 18}" text-anchor="middle" class="tick">{fmt_x(t)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#9ca3af"/>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{height - 8}" text-anchor="middle" class="axis">{esc(x_label)}</text>')
    out.append(f'<text transform="translate(14 {top + ph / 2:.1f}) rotate(-90)" text-anchor="middle" '
               f'class="axis">{esc(y_label)}</text>')
    if marker_x is not None:
        mx = sx(float(marker_x))
        out.append(f'<line x1="{mx:.1f}" x2="{mx:.1f}" y1="{top}" y2="{top + ph}" stroke="#111827" '
                   f'stroke-dasharray="5 4"/>')
        if marker_label:
            # at the bottom of the plot: the legend sits above it and curves usually rise away from the bottom
            anchor = "end" if mx > left + pw * 0.7 else "start"
            dx = -4 if anchor == "end" else 4
            out.append(f'<text x="{mx + dx:.1f}" y="{top + ph - 6}" text-anchor="{anchor}" class="marker">'
                       f'{esc(marker_label)}</text>')
    for s in series:
        pts = [(sx(float(a)), sy(float(b))) for a, b in zip(s.x, s.y) if math.isfinite(float(b))]
        if len(pts) > 1:
            path = " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{s.color}" stroke-width="1.8" '
                       f'stroke-linejoin="round"/>')
        if s.markers or len(pts) == 1:
            out.extend(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{s.color}"/>' for a, b in pts)
    # legend: one row between the title and the plot, so it never hides a curve
    lx = left
    for s in series:
        out.append(f'<rect x="{lx}" y="31" width="14" height="3" fill="{s.color}"/>')
        out.append(f'<text x="{lx + 19}" y="36" class="legend">{esc(s.name)}</text>')
        lx += 30 + 8 * len(s.name)
    out.append("</svg>")
    return "".join(out)


def svg_scatter(points: np.ndarray, colors: Sequence[str], *, title: str, width: int = 640, height: int = 480,
                legend: Sequence[tuple[str, str]] = (), radii: Sequence[float] | None = None) -> str:
    """An inline SVG scatter plot of 2-D ``points`` (n, 2) with one colour per point and a side legend."""
    esc = html.escape
    legend_w = 170 if legend else 0
    left, top, pad = 12, 30, 12
    pw, ph = width - legend_w - left - pad, height - top - pad
    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">'),
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>',
           f'<text x="{left}" y="20" class="chart-title">{esc(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#d1d5db"/>']
    if len(points):
        lo, hi = points.min(axis=0), points.max(axis=0)
        span = np.where(hi - lo > 0, hi - lo, 1.0)
        inner = 10
        px = left + inner + (points[:, 0] - lo[0]) / span[0] * (pw - 2 * inner)
        py = top + ph - inner - (points[:, 1] - lo[1]) / span[1] * (ph - 2 * inner)
        for i in range(len(points)):
            r = radii[i] if radii is not None else 3.0
            out.append(f'<circle cx="{px[i]:.1f}" cy="{py[i]:.1f}" r="{r}" fill="{colors[i]}" '
                       f'fill-opacity="0.8"/>')
    for i, (name, color) in enumerate(legend):
        x, y = width - legend_w + 8, top + 6 + i * 15
        out.append(f'<circle cx="{x + 5}" cy="{y + 5}" r="5" fill="{color}"/>')
        out.append(f'<text x="{x + 16}" y="{y + 9}" class="legend">{esc(name)}</text>')
    out.append("</svg>")
    return "".join(out)


# =========================================================================================== sections ======
def _curves_section(run: RunArtifacts) -> str:
    train = sorted((r for r in run.records if r.get("split") == "train" and "loss" in r), key=lambda r: r["step"])
    protocol = run.results.get("protocol", run.config.train.protocol)
    selection_split = "test" if protocol == "legacy" else "validation"
    # selection records carry no "phase"; the before/after test records do
    sel = sorted((r for r in run.records if r.get("split") == selection_split and "phase" not in r),
                 key=lambda r: r["step"])
    loss_terms = ["loss"] + sorted({k for r in train for k in r if k in ("batch_loss", "memory_loss")})
    loss_series = [Series(term, [r["step"] for r in train if term in r], [r[term] for r in train if term in r],
                          PALETTE[i]) for i, term in enumerate(loss_terms)]
    key = run.config.evaluation.selection_metric
    metric_keys = [key] + [k for k in ("recall@1", "map@r", "r_precision") if k != key]
    metric_series = [Series(k, [r["step"] for r in sel if k in r], [r[k] for r in sel if k in r],
                            PALETTE[(i + 2) % len(PALETTE)], markers=True) for i, k in enumerate(metric_keys)]
    selected = run.results.get("selected_step")
    charts = [
        svg_line_chart(loss_series, title="Training loss", x_label="step", y_label="loss"),
        svg_line_chart(metric_series, title=f"{selection_split.capitalize()} metrics (selection: {key})",
                       x_label="step", y_label="value", marker_x=selected,
                       marker_label=f"selected step {selected}" if selected is not None else ""),
    ]
    lr = [r for r in train if "lr" in r]
    if lr:
        charts.append(svg_line_chart([Series("lr", [r["step"] for r in lr], [r["lr"] for r in lr], PALETTE[4])],
                                     title="Learning rate (first parameter group)", x_label="step", y_label="lr"))
    note = ""
    if not sel:
        note = (f'<p class="note">No {selection_split} evaluations during training '
                f'(train.eval_every = {run.config.train.eval_every}); selection used the final step only.</p>')
    return _section("training-curves", "Training curves", '<div class="charts">' + "".join(charts) + "</div>" + note)


def _pct(v: Any) -> str:
    return "–" if not isinstance(v, (int, float)) else f"{100 * float(v):.2f}"


def _metric_order(keys: set[str]) -> list[str]:
    def rank(k: str) -> tuple[int, float, str]:
        if k.startswith("recall@"):
            try:
                return (0, float(k.split("@", 1)[1]), k)
            except ValueError:
                return (0, 0.0, k)
        order = ["precision@1", "r_precision", "map@r", "map", "nmi", "f1"]
        return (1, float(order.index(k)) if k in order else 99.0, k)

    return sorted(keys, key=rank)


def _metrics_section(run: RunArtifacts) -> str:
    res = run.results
    before = res.get("before", {}).get("test", {})
    after = res.get("after", {}).get("test", {})
    numeric = {k for d in (before, after) for k, v in d.items() if isinstance(v, (int, float))}
    rows = []
    for k in _metric_order(numeric):
        b, a = before.get(k), after.get(k)
        # counts (n_queries, n_queries_without_relevant) are shown as integers, not percentages
        pct = not k.startswith(("n_", "num_")) and not k.endswith("_count")
        delta = ""
        if pct and isinstance(a, (int, float)) and isinstance(b, (int, float)):
            d = 100 * (a - b)
            delta = f'<span class="{"up" if d >= 0 else "down"}">{d:+.2f}</span>'
        fmt = _pct if pct else (lambda v: "–" if v is None else f"{int(v):,}")
        rows.append(f"<tr><th>{html.escape(k)}</th><td>{fmt(b)}</td><td>{fmt(a)}</td><td>{delta}</td></tr>")
    table = ('<table class="metrics"><thead><tr><th>test metric (%)</th><th>before training</th>'
             '<th>after training</th><th>Δ</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>"
             if rows else '<p class="note">results.json has no test metrics (the run may not have finished).</p>')
    protocol = res.get("protocol", run.config.train.protocol)
    selection = res.get("selection") or {}
    sel_key = selection.get("key", run.config.evaluation.selection_metric)
    if protocol == "legacy":
        banner = ('<div class="legacy-warning"><strong>⚠ LEGACY PROTOCOL — MODEL SELECTED ON THE TEST SPLIT.</strong> '
                  "The reported checkpoint was chosen by its test-set score, as the original papers did. These "
                  "numbers are optimistically biased and are only meant to reproduce published tables; do not "
                  "compare them with validation-selected results.</div>")
    else:
        banner = ('<div class="protocol-ok">Model <strong>selected on validation</strong> (class-disjoint '
                  f"validation classes, metric {html.escape(str(sel_key))}); the test split was evaluated only "
                  "before and after training.</div>")
    facts = [
        ("protocol", protocol),
        ("selected step", res.get("selected_step", "–")),
        ("selection metric", f"{sel_key} = {_pct(selection.get('metric'))} %" if selection.get("metric") is not None
         else sel_key),
        ("steps trained", res.get("steps", "–")),
        ("wall time (s)", res.get("seconds", "–")),
    ]
    emb = run.embeddings
    if emb is not None:
        mode = ("self-retrieval (query = gallery, own item excluded)" if emb.self_retrieval
                else f"query → gallery ({len(emb.query)} queries, {len(emb.gallery)} gallery items)")
        facts.append(("evaluation", mode))
    fact_html = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    return _section("metrics", "Metrics",
                    banner + '<div class="two-col">' + table + f'<table class="facts">{fact_html}</table></div>')


def _config_section(run: RunArtifacts) -> str:
    reported = run.config.reported
    rep = ""
    if reported:
        rep = ('<h3>Reported in the paper</h3><pre class="reported">'
               + html.escape(json.dumps(reported, indent=2, sort_keys=False)) + "</pre>")
    cfg = run.config
    summary = (f"dataset <code>{html.escape(cfg.data.dataset)}</code> · loss <code>{html.escape(cfg.loss.name)}</code>"
               + (f" + miner <code>{html.escape(cfg.loss.miner)}</code>" if cfg.loss.miner else "")
               + (f" + synthesis <code>{html.escape(cfg.synthesis.name)}</code>" if cfg.synthesis.name else "")
               + (" + cross-batch memory" if cfg.memory.enabled else "")
               + f" · backbone <code>{html.escape(cfg.model.backbone)}</code> ({cfg.model.embedding_size}-d, "
               f"{html.escape(cfg.model.pooling)} pooling, BN {html.escape(cfg.model.bn_policy)})")
    return _section("config", "Configuration",
                    f"<p>{summary}</p>" + rep + '<h3>Resolved config.yaml</h3><pre class="config">'
                    + html.escape(run.config_text) + "</pre>")


# ------------------------------------------------------------------------------------------- retrieval -----
def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class Neighbours:
    queries: np.ndarray  # query indices
    index: np.ndarray  # (q, k) gallery indices, best first
    score: np.ndarray  # (q, k) cosine similarities


def top_neighbours(emb: EvalEmbeddings, queries: np.ndarray, k: int = NEIGHBOURS) -> Neighbours:
    """Cosine top-``k`` gallery items of the given queries, own item excluded in self-retrieval; stable ties."""
    q = _normalize(emb.query[queries])
    g = _normalize(emb.query if emb.gallery is None else emb.gallery)
    sims = q @ g.T
    if emb.gallery is None:
        sims[np.arange(len(queries)), queries] = -np.inf
    k = min(k, g.shape[0] - (1 if emb.gallery is None else 0))
    # stable sort on −similarity keeps lower indices first among ties
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return Neighbours(queries, order, np.take_along_axis(sims, order, axis=1))


def first_relevant_rank(emb: EvalEmbeddings, queries: np.ndarray, chunk: int = 512) -> np.ndarray:
    """0-based rank of the first same-class gallery item per query (number of wrong items scored above it);
    queries with no relevant item get −1."""
    g = _normalize(emb.query if emb.gallery is None else emb.gallery)
    g_labels = emb.query_labels if emb.gallery is None else emb.gallery_labels
    ranks = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        idx = queries[start:start + chunk]
        sims = _normalize(emb.query[idx]) @ g.T
        rel = emb.query_labels[idx][:, None] == g_labels[None, :]
        if emb.gallery is None:
            rows = np.arange(len(idx))
            sims[rows, idx] = -np.inf
            rel[rows, idx] = False
        best_pos = np.where(rel, sims, -np.inf).max(axis=1)
        wrong_above = ((sims > best_pos[:, None]) & ~rel).sum(axis=1)
        ranks[start:start + chunk] = np.where(np.isfinite(best_pos), wrong_above, -1)
    return ranks


def choose_queries(emb: EvalEmbeddings, n_sample: int = SAMPLE_QUERIES, n_worst: int = WORST_QUERIES,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample queries, worst queries, their first-relevant ranks).

    Samples are spread over distinct classes (deterministic). "Worst" = largest rank of the first correct
    neighbour among up to :data:`MAX_SCORED_QUERIES` queries; queries without any relevant gallery item are
    not retrieval failures and are skipped.
    """
    n = len(emb.query)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    seen: set[int] = set()
    sample: list[int] = []
    for i in perm:
        label = int(emb.query_labels[i])
        if label not in seen:
            seen.add(label)
            sample.append(int(i))
        if len(sample) == n_sample:
            break
    scored = np.sort(perm[:MAX_SCORED_QUERIES])
    ranks = first_relevant_rank(emb, scored)
    valid = ranks >= 0
    order = np.argsort(-ranks[valid], kind="stable")[:n_worst]
    worst = scored[valid][order]
    return np.asarray(sample, dtype=np.int64), worst, ranks[valid][order]


# ------------------------------------------------------------------------------------------- images --------
class ImageSource:
    """Thumbnails (base64 PNG) of the items of one evaluation split, by dataset index.

    The dataset is rebuilt from the run's config: KanjiGlyphs exposes its uint8 ``images`` array; file-based
    datasets expose ``paths`` (read with PIL); anything else is rendered from the eval-transform tensor.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def png(self, index: int) -> str:
        from PIL import Image

        ds = self.dataset
        images = getattr(ds, "images", None)
        paths = getattr(ds, "paths", None)
        if images is not None:
            img = Image.fromarray(_to_uint8(np.asarray(images[index])))
        elif paths is not None:
            from deepmetric.data.image_dataset import load_rgb

            img = load_rgb(paths[index])
        else:
            tensor = ds[index][0]
            img = Image.fromarray(_to_uint8(np.asarray(tensor)))
        img = img.convert("RGB") if img.mode not in ("L", "RGB") else img
        if max(img.size) > THUMB:
            img.thumbnail((THUMB, THUMB), Image.BILINEAR)  # photos: smooth reduction
        elif max(img.size) < THUMB:
            # tiny glyphs: integer nearest-neighbour upscaling keeps strokes crisp
            scale = max(1, THUMB // max(img.size))
            img = img.resize((img.size[0] * scale, img.size[1] * scale), Image.NEAREST)
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
        return base64.b64encode(buf.getvalue()).decode("ascii")


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """HWC/HW uint8 from a uint8 array or a CHW float tensor (min-max rescaled per image)."""
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.transpose(a, (1, 2, 0))
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype != np.uint8:
        lo, hi = float(a.min()), float(a.max())
        a = ((a - lo) / (hi - lo or 1.0) * 255).round().astype(np.uint8)
    return a


def image_sources(run: RunArtifacts) -> tuple[ImageSource | None, ImageSource | None, str]:
    """(query source, gallery source, note). Sources are None with an explanatory note when the dataset cannot
    be rebuilt (e.g. a benchmark folder not present on this machine)."""
    cfg = run.config
    emb = run.embeddings
    try:
        if cfg.data.dataset == "kanji_glyphs":
            from deepmetric.data.kanji import KanjiGlyphs

            # only the raw uint8 glyphs are shown, so no transform is needed; the split arguments must match the
            # trainer's so that dataset index i is embedding row i
            ds = KanjiGlyphs(split="test", transform=None, validation_fraction=cfg.data.validation_fraction,
                             max_classes=cfg.data.max_classes)
            query = gallery = ImageSource(ds)
        else:
            from deepmetric.training.builders import build_data

            bundle = build_data(cfg.data, seed=cfg.train.seed, backbone=cfg.model.backbone)
            if emb is not None and not emb.self_retrieval:
                query, gallery = ImageSource(bundle.query), ImageSource(bundle.gallery)
            else:
                query = gallery = ImageSource(bundle.test)
    except Exception as exc:  # noqa: BLE001  (the report must still be written without pictures)
        return None, None, f"Images unavailable ({type(exc).__name__}: {exc}); showing labels only."
    if emb is not None:
        n_q = len(query.dataset)
        n_g = len(gallery.dataset)
        want_g = len(emb.query) if emb.self_retrieval else len(emb.gallery)
        if n_q != len(emb.query) or n_g != want_g:
            return None, None, (f"Images unavailable: the rebuilt dataset has {n_q} query / {n_g} gallery items but "
                                f"the saved embeddings have {len(emb.query)} / {want_g}; showing labels only.")
    return query, gallery, ""


def _tile(source: ImageSource | None, index: int, label: int, css: str, caption: str,
          class_names: Sequence[str] | None) -> str:
    name = _class_name(label, class_names)
    title = html.escape(f"#{index} · class {name}")
    img = '<div class="noimg">?</div>'
    if source is not None:
        try:
            img = f'<img alt="{title}" src="data:image/png;base64,{source.png(index)}">'
        except Exception as exc:  # noqa: BLE001  (one unreadable file should not lose the page)
            img = f'<div class="noimg" title="{html.escape(str(exc))}">!</div>'
    return (f'<figure class="tile {css}" title="{title}">{img}<figcaption>{html.escape(caption)}</figcaption>'
            "</figure>")


def _class_name(label: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= label < len(class_names):
        return f"{label} {class_names[label]}"
    return str(label)


def _retrieval_rows(emb: EvalEmbeddings, queries: np.ndarray, qsrc: ImageSource | None, gsrc: ImageSource | None,
                    extra: Sequence[str], class_names: Sequence[str] | None) -> str:
    nb = top_neighbours(emb, queries)
    g_labels = emb.query_labels if emb.gallery is None else emb.gallery_labels
    rows = []
    for r, qi in enumerate(queries):
        qlabel = int(emb.query_labels[qi])
        tiles = [_tile(qsrc, int(qi), qlabel, "query", f"query · {_class_name(qlabel, class_names)}", class_names)]
        for gi, score in zip(nb.index[r], nb.score[r]):
            glabel = int(g_labels[gi])
            ok = glabel == qlabel
            tiles.append(_tile(gsrc, int(gi), glabel, "hit" if ok else "miss",
                               f"{'✓' if ok else '✗'} {score:.3f} · {glabel}", class_names))
        hits = int(sum(int(g_labels[gi]) == qlabel for gi in nb.index[r]))
        info = f"{hits}/{len(nb.index[r])} correct" + (f" · {extra[r]}" if extra else "")
        rows.append(f'<div class="qrow"><div class="qinfo">{html.escape(info)}</div>'
                    f'<div class="tiles">{"".join(tiles)}</div></div>')
    return "".join(rows)


def _retrieval_section(run: RunArtifacts, qsrc: ImageSource | None, gsrc: ImageSource | None, note: str) -> str:
    emb = run.embeddings
    if emb is None:
        return _section("retrieval", "Retrieval examples",
                        '<p class="note">No saved test embeddings (test_embeddings.npy or query_/gallery_embeddings'
                        ".npy) in the run directory.</p>")
    class_names = _class_names(qsrc)
    sample, worst, worst_ranks = choose_queries(emb, seed=run.config.train.seed)
    mode = ("self-retrieval: each test item queries all other test items" if emb.self_retrieval
            else "query split searched against the gallery split")
    body = [(f'<p>Top-{NEIGHBOURS} cosine neighbours ({mode}). Border: <span class="key hit">same class</span> '
             '<span class="key miss">different class</span>; caption = similarity · label.</p>')]
    if note:
        body.append(f'<p class="note">{html.escape(note)}</p>')
    body.append(f"<h3>Sample queries ({len(sample)} distinct classes)</h3>")
    body.append(_retrieval_rows(emb, sample, qsrc, gsrc, (), class_names))
    scored = min(len(emb.query), MAX_SCORED_QUERIES)
    body.append(f"<h3>Worst queries (largest rank of the first correct neighbour, among {scored} queries)</h3>")
    body.append(_retrieval_rows(emb, worst, qsrc, gsrc, [f"first correct at rank {int(r) + 1}" for r in worst_ranks],
                                class_names))
    return _section("retrieval", "Retrieval examples", "".join(body))


def _class_names(source: ImageSource | None) -> Sequence[str] | None:
    """Printable class names by label, when the dataset has them and they are short (glyphs, folder names)."""
    if source is None:
        return None
    names = getattr(source.dataset, "classes", None) or getattr(source.dataset, "class_names", None)
    if names is None:
        return None
    names = [str(n) for n in names]
    return names if all(len(n) <= 24 for n in names) else None


# ------------------------------------------------------------------------------------------- embedding map -
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


def _embedding_map_section(run: RunArtifacts, names: Sequence[str] | None) -> str:
    emb = run.embeddings
    if emb is None:
        return _section("embedding-map", "Embedding map", '<p class="note">No saved test embeddings.</p>')
    x = _normalize(emb.query if emb.gallery is None else np.vstack([emb.query, emb.gallery]))
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
    legend = [(f"class {_class_name(int(c), names)}", colour_of[int(c)]) for c in chosen]
    svg = svg_scatter(proj[keep], colours, title=f"PCA of the L2-normalised test embeddings "
                      f"(PC1 {100 * ratio[0]:.1f} %, PC2 {100 * ratio[1]:.1f} % of variance)",
                      legend=legend, width=760, height=520)
    text = (f"<p>{len(keep)} points of {len(chosen)} of {len(classes)} test classes (the most populated), projected "
            "with PCA fitted on all test embeddings. PCA is linear: well-separated clusters here are well separated "
            "in the embedding, but overlapping ones may still be separable in more dimensions.</p>")
    return _section("embedding-map", "Embedding map", text + svg)


# =========================================================================================== page ==========
CSS = """
:root { --ok: #16a34a; --bad: #dc2626; --ink: #111827; --muted: #6b7280; --line: #e5e7eb; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: var(--ink);
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


def _section(section_id: str, title: str, body: str) -> str:
    return f'<section id="{section_id}"><h2>{html.escape(title)}</h2>{body}</section>'


def render_report(run: RunArtifacts) -> str:
    """The full HTML page of ``run`` as a string."""
    cfg = run.config
    after = run.results.get("after", {}).get("test", {})
    headline = " · ".join(f"{k} {_pct(after[k])} %" for k in ("recall@1", "map@r") if k in after)
    protocol = run.results.get("protocol", cfg.train.protocol)
    nav = "".join(f'<a href="#{sid}">{sid.replace("-", " ")}</a>' for sid in SECTION_IDS)
    qsrc, gsrc, note = image_sources(run) if run.embeddings is not None else (None, None, "")
    sections = [_curves_section(run), _metrics_section(run), _config_section(run),
                _retrieval_section(run, qsrc, gsrc, note), _embedding_map_section(run, _class_names(qsrc))]
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
