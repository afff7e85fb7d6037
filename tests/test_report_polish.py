"""Report polish (issue 19, item 11): distinct axis labels, axes within the run, a legend readable without a CJK
font in distinguishable colours, worst queries from every query, total wall time, per-category metrics."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from _run_fixtures import fabricate_run_dir
from PIL import Image

from deepmetric.training.config import load_config
from deepmetric.training.report import (
    PALETTE,
    Series,
    first_relevant_rank,
    item_categories,
    render_report,
    svg_line_chart,
    tick_labels,
)
from deepmetric.training.run_artifacts import EvalEmbeddings, load_run

LEFT = 64  # the line chart's left margin: y tick labels end at LEFT - 6


def _y_labels(svg: str) -> list[str]:
    return re.findall(rf'<text x="{LEFT - 6}" y="[-\d.]+" text-anchor="end" class="tick">([^<]*)</text>', svg)


def _x_labels(svg: str) -> list[str]:
    return re.findall(r'<text x="[-\d.]+" y="[-\d.]+" text-anchor="middle" class="tick">([^<]*)</text>', svg)


def _section(text: str, section_id: str) -> str:
    start = text.index(f'<section id="{section_id}">')
    return text[start:text.index("</section>", start)]


def test_a_slowly_decaying_learning_rate_gets_distinct_tick_labels():
    steps = list(range(10, 1001, 10))
    lr = [1e-3 * (1 - 0.01 * s / 1000) for s in steps]  # 1.0e-3 → 0.99e-3: all "1.0e-03" at one digit
    labels = _y_labels(svg_line_chart([Series("lr", steps, lr, "#000")], title="lr", x_label="step", y_label="lr"))
    assert len(labels) >= 3 and len(set(labels)) == len(labels), labels
    for label in labels:  # and each label is the tick's value, not a rounding of it
        assert 0.98e-3 <= float(label) <= 1.01e-3


def test_a_constant_learning_rate_gets_one_tick_label():
    svg = svg_line_chart([Series("lr", [10, 20, 30], [1e-3] * 3, "#000")], title="lr", x_label="step",
                         y_label="lr")
    assert _y_labels(svg) == ["1e-03"]
    assert tick_labels([0.1, 0.2, 0.3]) == ["0.1", "0.2", "0.3"]
    assert tick_labels([0, 2.5, 5, 7.5]) == ["0", "2.5", "5.0", "7.5"]


def test_a_single_validation_point_does_not_stretch_the_axis_past_the_run(tmp_path):
    run = fabricate_run_dir(tmp_path / "run", steps=100)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # one validation evaluation, at the end (train.eval_every = 0)
    records = [r for r in records if r["split"] != "validation" or r["step"] == 100]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    curves = _section(render_report(load_run(run)), "training-curves")
    charts = re.findall(r"<svg.*?</svg>", curves)
    assert len(charts) == 3  # loss, validation metrics, learning rate
    for chart in charts:
        ticks = [float(t) for t in _x_labels(chart)]
        assert ticks[0] == 0 and ticks[-1] == 100, ticks  # exactly the run's steps [0, 100]
    validation = charts[1]
    plot_right = 560 - 16
    circles = [float(x) for x in re.findall(r'<circle cx="([\d.]+)"', validation)]
    assert circles and all(abs(x - plot_right) < 0.2 for x in circles)  # step 100 sits on the right edge


def _lab(colour: str) -> np.ndarray:
    rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)]) / 255
    rgb = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ rgb
    f = np.cbrt(np.maximum(xyz / np.array([0.95047, 1.0, 1.08883]), 0.008856 ** 3))
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def test_the_palette_has_twenty_clearly_different_colours():
    assert len(PALETTE) >= 20
    worst = min(float(np.linalg.norm(_lab(a) - _lab(b))) for a, b in itertools.combinations(PALETTE[:20], 2))
    assert worst >= 20, f"two palette colours are only ΔE76 {worst:.1f} apart"


def _kanji_run(path: Path, max_classes: int = 24) -> Path:
    """A run directory whose saved test embeddings match the KanjiGlyphs test split row by row."""
    from deepmetric.data.kanji import KanjiGlyphs

    run = fabricate_run_dir(path)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["max_classes"] = max_classes
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    ds = KanjiGlyphs(split="test", transform=None, max_classes=max_classes,
                     validation_fraction=load_config(run / "config.yaml").data.validation_fraction)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(int(ds.labels.max()) + 1, 16))
    emb = (centres[ds.labels] + 0.9 * rng.normal(size=(len(ds), 16))).astype(np.float32)
    np.save(run / "test_embeddings.npy", emb)
    np.save(run / "test_labels.npy", ds.labels)
    return run


def _visible_text(html_text: str) -> str:
    """Text the page draws (tags and attribute values such as tooltips removed)."""
    body = re.sub(r"<style>.*?</style>", "", html_text, flags=re.DOTALL)
    body = re.sub(r"<title>.*?</title>", "", body, flags=re.DOTALL)
    return re.sub(r"<[^>]+>", " ", body)


def test_kanji_classes_are_shown_by_their_glyph_images_in_distinct_colours(tmp_path):
    run = _kanji_run(tmp_path / "run")
    text = render_report(load_run(run))
    emb_map = _section(text, "embedding-map")
    entries = re.findall(r'<g class="legend-entry">(.*?)</g>', emb_map)
    assert len(entries) == 20
    colours = [re.search(r'fill="(#[0-9a-f]{6})"', e).group(1) for e in entries]
    assert len(set(colours)) == 20, "a colour is reused for two classes"
    images = [re.search(r'href="data:image/png;base64,([^"]+)"', e) for e in entries]
    assert all(images), "every kanji class shows its glyph image"
    import base64
    import io

    with Image.open(io.BytesIO(base64.b64decode(images[0].group(1)))) as glyph:
        assert glyph.size == (32, 32) and len(glyph.getcolors(1024)) > 1  # a drawn glyph, not a blank box
    # no CJK character is drawn as text anywhere on the page (a viewer without a CJK font shows tofu boxes);
    # they stay in the tooltips
    drawn = _visible_text(text)
    assert not re.search(r"[\u2e80-\u9fff]", drawn), re.findall(r".{20}[\u2e80-\u9fff].{5}", drawn)[:3]
    assert re.search(r"<title>class \d+ [\u2e80-\u9fff]</title>", emb_map)
    assert "Noto Sans CJK JP" in text  # text in CJK (folder names) uses a CJK font where the viewer has one


def test_worst_queries_are_the_worst_of_all_queries(tmp_path):
    n_classes, per_class = 600, 10  # 6,000 queries: more than the 5,000 the report used to sample
    run = fabricate_run_dir(tmp_path / "run", n_classes=n_classes, per_class=per_class)
    emb = np.load(run / "test_embeddings.npy")
    labels = np.load(run / "test_labels.npy")
    old_sample = set(np.random.default_rng(0).permutation(len(labels))[:5000].tolist())
    outlier = next(i for i in range(len(labels)) if i not in old_sample)
    same = labels == labels[outlier]
    emb[outlier] = -emb[same & (np.arange(len(labels)) != outlier)].mean(axis=0)  # far from its own class
    np.save(run / "test_embeddings.npy", emb / np.linalg.norm(emb, axis=1, keepdims=True))
    retrieval = _section(render_report(load_run(run)), "retrieval")
    worst = retrieval[retrieval.index("Worst queries"):]
    assert "among all 6,000 test queries" in worst
    shown = [int(i) for i in re.findall(r'<figure class="tile query" title="#(\d+)', worst)]
    ranks = first_relevant_rank(EvalEmbeddings(np.load(run / "test_embeddings.npy"), labels), np.arange(len(labels)))
    assert shown[0] == outlier == int(np.argmax(ranks))
    assert sorted(ranks[shown].tolist(), reverse=True) == sorted(ranks.tolist(), reverse=True)[:len(shown)]


def test_wall_time_is_the_total_of_every_segment(tmp_path):
    run = fabricate_run_dir(tmp_path / "run")
    results = json.loads((run / "results.json").read_text())
    results["seconds"] = 3725.4  # the trainer sums the segments of a resumed run into this key
    (run / "results.json").write_text(json.dumps(results))
    metrics = _section(render_report(load_run(run)), "metrics")
    assert "<th>wall time, all segments</th><td>1 h 02 min 05 s (3,725 s)</td>" in metrics


def _sop_folder(root: Path) -> Path:
    """A tiny Stanford Online Products layout: 3 super-classes × 4 products × 3 images in test, 2 in train."""
    sop = root / "Stanford_Online_Products"
    supers = ["bicycle_final", "chair_final", "lamp_final"]
    rng = np.random.default_rng(0)
    for split, first_class, per_product in (("train", 1, 2), ("test", 13, 3)):
        lines = ["image_id class_id super_class_id path"]
        for s, name in enumerate(supers):
            (sop / name).mkdir(parents=True, exist_ok=True)
            for p in range(4):
                class_id = first_class + 4 * s + p
                for i in range(per_product):
                    rel = f"{name}/{class_id}_{i}.png"
                    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(sop / rel)
                    lines.append(f"{len(lines)} {class_id} {s + 1} {rel}")
        (sop / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    return sop


def test_per_category_metrics_of_a_dataset_with_categories(tmp_path):
    from deepmetric.data.bundle import build_data

    sop = _sop_folder(tmp_path / "data")
    run = fabricate_run_dir(tmp_path / "run")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"].update(dataset="sop", root=str(sop), train_transform="reality_check_train",
                          eval_transform="reality_check_eval", m_per_class=2, batch_size=4)
    config["model"]["backbone"] = "kanji_cnn"
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    test = build_data(load_config(run / "config.yaml").data).test
    categories, names = item_categories(test)
    assert names == ["bicycle_final", "chair_final", "lamp_final"] and categories.tolist() == [0] * 12 + [1] * 12 + [2] * 12
    rng = np.random.default_rng(1)
    labels = np.asarray(test.labels)
    noise = np.where(categories == 0, 0.1, 3.0)[:, None]  # bicycles retrieve well, the others poorly
    emb = (rng.normal(size=(labels.max() + 1, 8))[labels] + noise * rng.normal(size=(len(labels), 8)))
    np.save(run / "test_embeddings.npy", emb.astype(np.float32))
    np.save(run / "test_labels.npy", labels)
    metrics = _section(render_report(load_run(run)), "metrics")
    assert "Per-category test metrics" in metrics
    ranks = first_relevant_rank(EvalEmbeddings(emb.astype(np.float32), labels), np.arange(len(labels)))
    for c, name in enumerate(names):
        row = re.search(rf"<tr><th>{name}</th><td>12</td><td>([\d.]+)</td>", metrics)
        assert row, name
        assert float(row.group(1)) == pytest.approx(100 * np.mean(ranks[categories == c] == 0), abs=0.006)
    assert re.search(r"<tr><th>all queries</th><td>36</td>", metrics)


def test_a_dataset_without_categories_gets_no_category_table(tmp_path):
    run = fabricate_run_dir(tmp_path / "run")
    assert "Per-category" not in render_report(load_run(run))
