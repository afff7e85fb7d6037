"""Report sections built from the run's logs, results and config: training curves, metrics, configuration."""

from __future__ import annotations

import html
import json
from typing import Any

from deepmetric.training.report.charts import PALETTE, Series, svg_line_chart
from deepmetric.training.run_artifacts import RunArtifacts


def section(section_id: str, title: str, body: str) -> str:
    return f'<section id="{section_id}"><h2>{html.escape(title)}</h2>{body}</section>'


def run_length(run: RunArtifacts) -> int:
    """The run's length in steps: the steps trained (results.json), else the furthest logged step, else the
    configured iterations (a run that has not finished)."""
    steps = run.results.get("steps")
    if isinstance(steps, int) and steps > 0:
        return steps
    logged = [int(r["step"]) for r in run.records if isinstance(r.get("step"), (int, float))]
    return max([*logged, int(run.config.train.iterations or 0)]) or 1


def curves_section(run: RunArtifacts) -> str:
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
    steps = (0.0, float(run_length(run)))  # every chart spans the run, never past its end
    charts = [
        svg_line_chart(loss_series, title="Training loss", x_label="step", y_label="loss", x_range=steps),
        svg_line_chart(metric_series, title=f"{selection_split.capitalize()} metrics (selection: {key})",
                       x_label="step", y_label="value", marker_x=selected,
                       marker_label=f"selected step {selected}" if selected is not None else "", x_range=steps),
    ]
    lr = [r for r in train if "lr" in r]
    if lr:
        charts.append(svg_line_chart([Series("lr", [r["step"] for r in lr], [r["lr"] for r in lr], PALETTE[4])],
                                     title="Learning rate (first parameter group)", x_label="step", y_label="lr",
                                     x_range=steps))
    note = ""
    if not sel:
        note = (f'<p class="note">No {selection_split} evaluations during training '
                f'(train.eval_every = {run.config.train.eval_every}); selection used the final step only.</p>')
    return section("training-curves", "Training curves", '<div class="charts">' + "".join(charts) + "</div>" + note)


def pct(v: Any) -> str:
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


def duration(seconds: Any) -> str:
    """``3725.4`` → ``1 h 02 min 05 s (3,725 s)``; "–" when unknown."""
    if not isinstance(seconds, (int, float)):
        return "–"
    hours, rest = divmod(round(float(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min {secs:02d} s ({float(seconds):,.0f} s)"
    return f"{minutes} min {secs:02d} s" if minutes else f"{float(seconds):.1f} s"


def metrics_section(run: RunArtifacts, extra: str = "") -> str:
    """Before/after test metrics, the protocol and the run's facts; ``extra`` (HTML) is appended."""
    res = run.results
    before = res.get("before", {}).get("test", {})
    after = res.get("after", {}).get("test", {})
    numeric = {k for d in (before, after) for k, v in d.items() if isinstance(v, (int, float))}
    rows = []
    for k in _metric_order(numeric):
        b, a = before.get(k), after.get(k)
        # counts (n_queries, n_queries_without_relevant) are shown as integers, not percentages
        percent = not k.startswith(("n_", "num_")) and not k.endswith("_count")
        delta = ""
        if percent and isinstance(a, (int, float)) and isinstance(b, (int, float)):
            d = 100 * (a - b)
            delta = f'<span class="{"up" if d >= 0 else "down"}">{d:+.2f}</span>'
        fmt = pct if percent else (lambda v: "–" if v is None else f"{int(v):,}")
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
        ("selection metric", f"{sel_key} = {pct(selection.get('metric'))} %" if selection.get("metric") is not None
         else sel_key),
        ("steps trained", res.get("steps", "–")),
        # results.json "seconds" sums every segment of a resumed run (the trainer carries it in the checkpoint)
        ("wall time, all segments", duration(res.get("seconds"))),
    ]
    emb = run.embeddings
    if emb is not None:
        mode = ("self-retrieval (query = gallery, own item excluded)" if emb.self_retrieval
                else f"query → gallery ({len(emb.query)} queries, {len(emb.gallery)} gallery items)")
        facts.append(("evaluation", mode))
    fact_html = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    return section("metrics", "Metrics",
                    banner + '<div class="two-col">' + table + f'<table class="facts">{fact_html}</table></div>'
                    + extra)


def config_section(run: RunArtifacts) -> str:
    reported = run.config.reported
    rep = ""
    if reported:
        rep = ('<h3>Reported in the paper</h3><pre class="reported">'
               + html.escape(json.dumps(reported, indent=2, sort_keys=False)) + "</pre>")
    cfg = run.config
    summary = (f"dataset <code>{html.escape(cfg.data.dataset)}</code> · loss <code>{html.escape(cfg.loss.name)}</code>"
               + (f" + miner <code>{html.escape(cfg.loss.miner)}</code>" if cfg.loss.miner else "")
               + (f" + synthesis <code>{html.escape(cfg.synthesis.name)}</code>" if cfg.synthesis.name else "")
               + (" + cross-batch memory" if cfg.memory.name else "")
               + f" · backbone <code>{html.escape(cfg.model.backbone)}</code> ({cfg.model.embedding_size}-d, "
               f"{html.escape(cfg.model.pooling)} pooling, BN {html.escape(cfg.model.bn_policy)})")
    return section("config", "Configuration",
                    f"<p>{summary}</p>" + rep + '<h3>Resolved config.yaml</h3><pre class="config">'
                    + html.escape(run.config_text) + "</pre>")

