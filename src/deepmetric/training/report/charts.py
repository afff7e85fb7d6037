"""Inline SVG charts for the report (drawn here: matplotlib is not a dependency of the library)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# 20 well-separated colours (a qualitative palette written out, so no plotting library is needed)
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#393b79", "#e6550d", "#31a354", "#ad494a", "#756bb1", "#843c39", "#de9ed6", "#636363", "#8ca252", "#6baed6",
)



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

