"""Inline SVG charts for the report (drawn here: matplotlib is not a dependency of the library)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# 24 qualitative colours, pairwise CIELAB ΔE76 ≥ 27 (picked greedily for distance from a pool of published
# qualitative palettes, the first five kept for the line charts): the embedding map needs 20 distinguishable
# classes, and a 10-colour palette cycled twice made pairs of classes look alike
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#000000", "#c2b280", "#dcd300", "#f032e6", "#000075",
    "#469990", "#654522", "#b3446c", "#fabed4", "#808000", "#f99379", "#a1caf1", "#911eb4", "#882d17", "#008856",
    "#7f7f7f", "#2b3d26", "#e377c2", "#8db600",
)


@dataclass
class Series:
    name: str
    x: Sequence[float]
    y: Sequence[float]
    color: str
    markers: bool = False


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [lo, hi] (steps of 1, 2, 2.5 or 5 × 10^k); one tick for a
    constant series (lo == hi), so a flat curve gets one label instead of several equal ones."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        return [float(lo)]
    raw = (hi - lo) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    value = start
    while value <= hi + step * 1e-9:
        ticks.append(_round_to_step(value, step))
        value += step
    if ticks[-1] < hi:
        ticks.append(_round_to_step(ticks[-1] + step, step))
    return ticks


def _round_to_step(value: float, step: float) -> float:
    # accumulated float error (0.30000000000000004) would otherwise leak into the labels
    digits = max(0, 2 - math.floor(math.log10(step)))
    return round(value, digits)


def ticks_within(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round ticks inside [lo, hi] only (the axis spans exactly that range, e.g. the run's steps)."""
    span = (hi - lo) or 1.0
    return [t for t in nice_ticks(lo, hi, count) if lo - 1e-9 * span <= t <= hi + 1e-9 * span] or [lo]


def _axis(values: Sequence[float], fixed: tuple[float, float] | None) -> tuple[float, float, list[float]]:
    """(domain start, domain end, ticks). A constant series gets one tick in the middle of a padded domain."""
    if fixed is not None:
        lo, hi = float(fixed[0]), float(fixed[1])
        if hi > lo:
            return lo, hi, ticks_within(lo, hi)
        values = [lo]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    ticks = nice_ticks(lo, hi)
    if len(ticks) == 1:
        pad = abs(ticks[0]) * 0.5 or 1.0
        return ticks[0] - pad, ticks[0] + pad, ticks
    return ticks[0], ticks[-1], ticks


def tick_labels(ticks: Sequence[float]) -> list[str]:
    """One format for a whole axis (mixing 0.001 and 8.0e-04 reads badly), with the fewest digits that show
    every tick exactly, so neighbouring ticks get different labels (a slowly decaying learning rate has ticks
    that differ in the fourth digit; a fixed one-digit format printed them all as 1.0e-03)."""
    big = max((abs(t) for t in ticks), default=0.0)
    scientific = big >= 1e4 or 0 < big < 1e-2

    def fmt(v: float, digits: int) -> str:
        if v == 0:
            return "0"
        return f"{v:.{digits}e}" if scientific else f"{v:.{digits}f}"

    tolerance = 1e-9 * (big or 1.0)
    for digits in range(13):
        labels = [fmt(t, digits) for t in ticks]
        exact = all(abs(float(label) - t) <= tolerance for label, t in zip(labels, ticks))
        if exact and len(set(labels)) == len(labels):
            return labels
    return labels


def svg_line_chart(series: Sequence[Series], *, title: str, x_label: str, y_label: str, width: int = 560,
                   height: int = 300, marker_x: float | None = None, marker_label: str = "",
                   x_range: tuple[float, float] | None = None) -> str:
    """An inline SVG line chart with axes, round ticks, a legend and an optional vertical marker line.

    ``x_range`` fixes the x axis to exactly that span (the run's steps [0, length]): a chart with a single
    validation point otherwise invents an axis around it that runs past the end of the run."""
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
    x0, x1, x_ticks = _axis(xs, x_range)
    y0, y1, y_ticks = _axis(ys, None)

    def sx(v: float) -> float:
        return left + (v - x0) / (x1 - x0 or 1.0) * pw

    def sy(v: float) -> float:
        return top + ph - (v - y0) / (y1 - y0 or 1.0) * ph

    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">'),
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>',
           f'<text x="{left}" y="20" class="chart-title">{esc(title)}</text>']
    for t, label in zip(y_ticks, tick_labels(y_ticks)):
        y = sy(t)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e7eb"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{label}</text>')
    for t, label in zip(x_ticks, tick_labels(x_ticks)):
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#6b7280"/>')
        out.append(f'<text x="{x:.1f}" y="{top + ph + 18}" text-anchor="middle" class="tick">{label}</text>')
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
                legend: Sequence[tuple[str, str]] = (), radii: Sequence[float] | None = None,
                legend_images: Sequence[str | None] | None = None,
                legend_titles: Sequence[str] | None = None) -> str:
    """An inline SVG scatter plot of 2-D ``points`` (n, 2) with one colour per point and a side legend.

    ``legend_images`` (base64 PNGs, one per legend entry or None) are drawn beside the legend names: a class
    whose name is a glyph (a kanji) is shown by its image, which needs no font on the viewer's machine.
    ``legend_titles`` are the entries' tooltips (default: their names)."""
    esc = html.escape
    legend_w = 170 if legend else 0
    row_h = 23 if legend_images is not None and any(legend_images) else 15
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
        x, y = width - legend_w + 8, top + 6 + i * row_h
        tooltip = legend_titles[i] if legend_titles is not None and i < len(legend_titles) else name
        out.append(f'<g class="legend-entry"><title>{esc(tooltip)}</title>')
        out.append(f'<circle cx="{x + 5}" cy="{y + row_h / 2 - 2:.1f}" r="5" fill="{color}"/>')
        text_x = x + 16
        image = legend_images[i] if legend_images is not None and i < len(legend_images) else None
        if image:
            out.append(f'<image x="{text_x}" y="{y - 2}" width="{row_h - 2}" height="{row_h - 2}" '
                       f'href="data:image/png;base64,{image}"/>')
            text_x += row_h + 2
        out.append(f'<text x="{text_x}" y="{y + row_h / 2 + 2:.1f}" class="legend">{esc(name)}</text></g>')
    out.append("</svg>")
    return "".join(out)
