"""``deepmetric report``: a self-contained HTML page with the expected sections, rendered by headless Chromium."""

import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from _run_fixtures import fabricate_run_dir

from deepmetric.training.report import (
    SECTION_IDS,
    Series,
    choose_queries,
    first_relevant_rank,
    nice_ticks,
    pca_2d,
    svg_line_chart,
    write_report,
)
from deepmetric.training.run_artifacts import EvalEmbeddings


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.external: list[str] = []
        self.images = 0
        self.svgs = 0
        self.tags: dict[str, int] = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag == "section" and "id" in a:
            self.ids.append(a["id"])
        if tag == "svg":
            self.svgs += 1
        if tag == "img":
            self.images += 1
        for key in ("src", "href"):
            value = a.get(key) or ""
            if value and not value.startswith(("data:", "#")):
                self.external.append(f"{tag} {key}={value}")
        if tag == "link":
            self.external.append(f"link {a}")


def parse(path: Path) -> tuple[_Page, str]:
    text = path.read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    return page, text


def test_report_has_sections_and_no_external_assets(tmp_path):
    run = fabricate_run_dir(tmp_path / "run")
    path = write_report(run)
    assert path == run / "report.html"
    page, text = parse(path)
    assert page.ids == list(SECTION_IDS)
    assert page.external == [], page.external
    assert page.tags.get("polyline", 0) >= 3  # loss, validation metrics, lr
    assert "selected on validation" in text and "LEGACY" not in text
    assert "55.00" in text and "+34.00" in text  # after-training recall@1 and its delta
    assert "Sample queries" in text and "Worst queries" in text
    assert text.count('class="tile query"') == 16  # 8 sample + 8 worst rows
    assert "PCA of the L2-normalised test embeddings" in text
    assert "none (fabricated run)" in text  # the reported block of the config


def test_legacy_query_gallery_report_warns_loudly(tmp_path):
    run = fabricate_run_dir(tmp_path / "run", protocol="legacy", query_gallery=True)
    page, text = parse(write_report(run, tmp_path / "out" / "r.html"))
    assert page.ids == list(SECTION_IDS)
    assert "LEGACY PROTOCOL — MODEL SELECTED ON THE TEST SPLIT" in text
    assert "query → gallery (36 queries, 36 gallery items)" in text
    assert "Test metrics (selection: map@r)" in text  # legacy selection curve is drawn from the test records


def test_report_without_embeddings_or_metrics_still_renders(tmp_path):
    run = fabricate_run_dir(tmp_path / "run")
    for name in ("test_embeddings.npy", "test_labels.npy", "metrics.jsonl", "results.json"):
        (run / name).unlink()
    page, text = parse(write_report(run))
    assert page.ids == list(SECTION_IDS)
    assert "No saved test embeddings" in text and "no data logged" in text


def test_missing_run_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        write_report(tmp_path)
    run = fabricate_run_dir(tmp_path / "run")
    (run / "test_labels.npy").unlink()
    with pytest.raises(FileNotFoundError, match="test_labels.npy"):
        write_report(run)


def test_first_relevant_rank_matches_brute_force():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(30, 5)).astype(np.float32)
    labels = rng.integers(0, 4, size=30)
    labels[29] = 9  # a query with no relevant item
    e = EvalEmbeddings(emb, labels)
    ranks = first_relevant_rank(e, np.arange(30), chunk=7)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    for q in range(30):
        sims = unit @ unit[q]
        order = [i for i in np.argsort(-sims, kind="stable") if i != q]
        rel = [labels[i] == labels[q] for i in order]
        assert ranks[q] == (rel.index(True) if any(rel) else -1)
    sample, worst, worst_ranks = choose_queries(e, n_sample=4, n_worst=3)
    assert len(set(labels[sample])) == 4  # distinct classes
    assert 29 not in worst and list(worst_ranks) == sorted(ranks[ranks >= 0])[::-1][:3]


def test_nice_ticks_and_charts():
    assert nice_ticks(0, 100) == [0, 20, 40, 60, 80, 100]
    ticks = nice_ticks(0.13, 0.57)
    assert ticks[0] <= 0.13 and ticks[-1] >= 0.57 and len(ticks) <= 8
    assert nice_ticks(5, 5) == [5]  # a flat series gets one tick (the chart pads the axis around it)
    svg = svg_line_chart([Series("loss", [1, 2, 3], [3.0, float("nan"), 1.0], "#000")], title="t", x_label="x",
                         y_label="y", marker_x=2, marker_label="sel")
    assert svg.startswith("<svg") and "<polyline" in svg and "sel" in svg
    assert "no data" in svg_line_chart([], title="t", x_label="x", y_label="y")


def test_pca_recovers_the_dominant_direction():
    rng = np.random.default_rng(0)
    x = np.outer(rng.normal(size=200), [3.0, 0.0, 0.0]) + 0.01 * rng.normal(size=(200, 3))
    proj, ratio = pca_2d(x)
    assert proj.shape == (200, 2) and ratio[0] > 0.99
    assert abs(np.corrcoef(proj[:, 0], x[:, 0])[0, 1]) > 0.999


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_headless_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); the HTML structure is checked above")
    run = fabricate_run_dir(tmp_path / "run")
    report = write_report(run)
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}", f"--screenshot={shot}", "--window-size=1280,2400",
           report.resolve().as_uri()]
    subprocess.run(cmd, check=False, capture_output=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert shot.is_file() and shot.stat().st_size > 10_000, "chromium produced no screenshot"
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size == (1280, 2400)
        # a blank page would be one colour; the report has a dark header, charts and coloured borders
        colours = img.convert("RGB").resize((64, 120)).getcolors(maxcolors=64 * 120)
        assert colours is not None and len(colours) > 20


def test_report_of_a_real_tiny_run(tmp_path):
    pytest.importorskip("deepmetric.data.kanji", reason="KanjiGlyphs (data/kanji.py) is not available yet")
    from deepmetric.cli import main

    run = tmp_path / "run"
    rc = main(["train", "--output", str(run), "--set", "train.iterations=5", "--set", "train.progress=false",
               "--set", "data.max_classes=24", "--set", "train.threads=1"])
    assert rc == 0
    page, text = parse(write_report(run))
    assert page.ids == list(SECTION_IDS)
    assert page.images >= 16 * 9, "retrieval grids should show the glyph images"
    assert "Images unavailable" not in text
