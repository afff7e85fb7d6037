"""The report's retrieval section: sample and worst queries with their top neighbours, all read from one
:class:`~deepmetric.evaluation.RetrievalResults` computed by the library's exact search."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deepmetric.evaluation import RetrievalResults, retrieve
from deepmetric.training.report.sections import section
from deepmetric.training.run_artifacts import EvalEmbeddings, RunArtifacts

ClassNames = Mapping[int, str]  # printable class name by label

NEIGHBOURS = 8
SAMPLE_QUERIES = 8
WORST_QUERIES = 8
THUMB = 72  # thumbnail edge in pixels
# per-query values kept for the per-category table (recall@K comes from the exact first-relevant ranks)
REPORT_LIST_METRICS = ("precision@1", "r_precision", "map@r")


def retrieval_results(emb: EvalEmbeddings, queries: np.ndarray | None = None, k: int = NEIGHBOURS,
                      chunk_size: int | None = None, distance: str = "cosine",
                      list_metrics: Sequence[str] = ()) -> RetrievalResults:
    """Top-``k`` lists of the given query rows (default: every query; own item excluded in self-retrieval,
    stable ties) with exact first-relevant ranks over the whole gallery."""
    n_candidates = len(emb.query) - 1 if emb.gallery is None else len(emb.gallery)
    rows = None if queries is None else np.asarray(queries, dtype=np.int64)
    return retrieve(emb.query, emb.query_labels, emb.gallery, emb.gallery_labels, k=min(k, n_candidates),
                    queries=rows, rank_depth=n_candidates, list_metrics=tuple(list_metrics),
                    chunk_size=chunk_size, distance=distance)


def report_results(run: RunArtifacts) -> RetrievalResults | None:
    """One exact search of *every* test query (the retrieval grids, the worst-query list and the per-category
    table all read it), with the run's distance; None without saved embeddings."""
    if run.embeddings is None:
        return None
    return retrieval_results(run.embeddings, distance=run.config.evaluation.distance,
                             list_metrics=REPORT_LIST_METRICS)


@dataclass
class Neighbours:
    queries: np.ndarray  # query indices
    index: np.ndarray  # (q, k) gallery indices, best first
    score: np.ndarray  # (q, k) cosine similarities


def neighbours_of(results: RetrievalResults) -> Neighbours:
    return Neighbours(results.query_ids.cpu().numpy(), results.neighbour_index.cpu().numpy(),
                      results.neighbour_score.cpu().numpy())


def top_neighbours(emb: EvalEmbeddings, queries: np.ndarray, k: int = NEIGHBOURS) -> Neighbours:
    """Cosine top-``k`` gallery items of the given queries, own item excluded in self-retrieval; stable ties."""
    return neighbours_of(retrieval_results(emb, queries, k))


def first_relevant_rank(emb: EvalEmbeddings, queries: np.ndarray, chunk: int = 512) -> np.ndarray:
    """0-based rank of the first same-class gallery item per query; queries with no relevant item get −1."""
    res = retrieval_results(emb, queries, k=1, chunk_size=chunk)
    ranks = res.first_relevant_rank.cpu().numpy()
    return np.where(res.n_relevant.cpu().numpy() > 0, ranks, -1)


def sample_queries(emb: EvalEmbeddings, n_sample: int = SAMPLE_QUERIES, seed: int = 0) -> np.ndarray:
    """Queries spread over distinct classes (the first of each class in a seeded permutation), deterministic."""
    perm = np.random.default_rng(seed).permutation(len(emb.query))
    seen: set[int] = set()
    sample: list[int] = []
    for i in perm:
        label = int(emb.query_labels[i])
        if label not in seen:
            seen.add(label)
            sample.append(int(i))
        if len(sample) == n_sample:
            break
    return np.asarray(sample, dtype=np.int64)


def worst_rows(results: RetrievalResults, n_worst: int = WORST_QUERIES) -> np.ndarray:
    """Result rows with the largest first-relevant rank (stable: earlier rows first among equal ranks); queries
    without any relevant gallery item are not retrieval failures and are skipped."""
    ranks = results.first_relevant_rank.cpu().numpy()
    valid = np.flatnonzero(results.n_relevant.cpu().numpy() > 0)
    return valid[np.argsort(-ranks[valid], kind="stable")[:n_worst]]


def choose_queries(emb: EvalEmbeddings, n_sample: int = SAMPLE_QUERIES, n_worst: int = WORST_QUERIES,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample queries, worst queries among all queries, their first-relevant ranks) — see :func:`sample_queries`,
    :func:`worst_rows`."""
    res = retrieval_results(emb, k=1)
    rows = worst_rows(res, n_worst)
    return sample_queries(emb, n_sample, seed), res.query_ids.cpu().numpy()[rows], \
        res.first_relevant_rank.cpu().numpy()[rows]


# ------------------------------------------------------------------------------------------- images --------
class ImageSource:
    """Thumbnails (base64 PNG) of the items of one evaluation split, by dataset index.

    The dataset is rebuilt from the run's config: KanjiGlyphs exposes its uint8 ``images`` array; file-based
    datasets expose ``paths`` (read with PIL); anything else is rendered from the eval-transform tensor.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def png(self, index: int, size: int = THUMB) -> str:
        """The item as a base64 PNG about ``size`` pixels on its longer edge."""
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
        if max(img.size) > size:
            img.thumbnail((size, size), Image.BILINEAR)  # photos: smooth reduction
        elif max(img.size) < size:
            # tiny glyphs: integer nearest-neighbour upscaling keeps strokes crisp
            scale = max(1, size // max(img.size))
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
          class_names: ClassNames | None) -> str:
    name = class_name(label, class_names)
    title = html.escape(f"#{index} · class {name}")
    img = '<div class="noimg">?</div>'
    if source is not None:
        try:
            img = f'<img alt="{title}" src="data:image/png;base64,{source.png(index)}">'
        except Exception as exc:  # noqa: BLE001  (one unreadable file should not lose the page)
            img = f'<div class="noimg" title="{html.escape(str(exc))}">!</div>'
    return (f'<figure class="tile {css}" title="{title}">{img}<figcaption>{html.escape(caption)}</figcaption>'
            "</figure>")


def class_name(label: int, class_names: ClassNames | None) -> str:
    if class_names is not None and label in class_names:
        return f"{label} {class_names[label]}"
    return str(label)


def names_are_glyphs(class_names: ClassNames | None) -> bool:
    """True when every class name is one CJK character (KanjiGlyphs): the page then shows the glyph's image,
    not its text, since a viewer without a CJK font would draw an empty box ("tofu")."""
    return bool(class_names) and all(len(n) == 1 and ord(n) >= 0x2E80 for n in class_names.values())


def visible_name(label: int, class_names: ClassNames | None) -> str:
    """The class as drawn on the page: the label id alone for glyph names (their image is shown instead)."""
    return str(label) if names_are_glyphs(class_names) else class_name(label, class_names)


def _retrieval_rows(results: RetrievalResults, qsrc: ImageSource | None, gsrc: ImageSource | None,
                    extra: Sequence[str], class_names: ClassNames | None) -> str:
    nb = neighbours_of(results)
    g_labels = results.gallery_labels.cpu().numpy()
    q_labels = results.query_labels.cpu().numpy()
    rows = []
    for r, qi in enumerate(nb.queries):
        qlabel = int(q_labels[r])
        tiles = [_tile(qsrc, int(qi), qlabel, "query", f"query · {visible_name(qlabel, class_names)}",
                       class_names)]
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


def retrieval_section(run: RunArtifacts, qsrc: ImageSource | None, gsrc: ImageSource | None, note: str,
                      results: RetrievalResults | None = None) -> str:
    """Sample and worst queries from ``results``, the search of every query (:func:`report_results`)."""
    emb = run.embeddings
    if emb is None:
        return section("retrieval", "Retrieval examples",
                       '<p class="note">No saved test embeddings (test_embeddings.npy or query_/gallery_embeddings'
                       ".npy) in the run directory.</p>")
    results = results if results is not None else report_results(run)
    if results is None or results.n_queries != len(emb.query):
        raise ValueError("retrieval_section needs the search of every query (report_results)")
    class_names = class_names_of(qsrc)
    sample = sample_queries(emb, seed=run.config.train.seed)  # result row i is query i: every query was searched
    worst = worst_rows(results)
    worst_ranks = results.first_relevant_rank.cpu().numpy()[worst]
    n_without = int((results.n_relevant == 0).sum())
    mode = ("self-retrieval: each test item queries all other test items" if emb.self_retrieval
            else "query split searched against the gallery split")
    body = [(f'<p>Top-{NEIGHBOURS} neighbours by {html.escape(results.distance)} similarity ({mode}). Border: '
             '<span class="key hit">same class</span> <span class="key miss">different class</span>; caption = '
             'similarity · label.</p>')]
    if note:
        body.append(f'<p class="note">{html.escape(note)}</p>')
    body.append(f"<h3>Sample queries ({len(sample)} distinct classes)</h3>")
    body.append(_retrieval_rows(results.subset(sample), qsrc, gsrc, (), class_names))
    scope = f"all {results.n_queries:,} test queries" + (
        f" ({n_without:,} without any same-class gallery item left out)" if n_without else "")
    body.append(f"<h3>Worst queries (largest rank of the first correct neighbour, among {scope})</h3>")
    body.append(_retrieval_rows(results.subset(worst), qsrc, gsrc,
                                [f"first correct at rank {int(r) + 1}" for r in worst_ranks], class_names))
    return section("retrieval", "Retrieval examples", "".join(body))


def class_names_of(source: ImageSource | None) -> dict[int, str] | None:
    """Printable class names by label, when the dataset has them and they are short (glyphs, folder names).

    KanjiGlyphs lists the names of its split's classes beside their global ``class_ids`` (the labels); a
    folder dataset names every label, also through the :class:`LabelledSubset` of its test split."""
    if source is None:
        return None
    ds = source.dataset
    ids = getattr(ds, "class_ids", None)
    names = getattr(ds, "classes", None) or getattr(ds, "class_names", None)
    if names is None and getattr(ds, "dataset", None) is not None:  # a subset keeps its dataset's labels
        names = getattr(ds.dataset, "class_names", None) or getattr(ds.dataset, "classes", None)
    if not names:
        return None
    labels = [int(i) for i in ids] if ids is not None and len(ids) == len(names) else range(len(names))
    named = {label: str(n) for label, n in zip(labels, names)}
    return named if all(len(n) <= 24 for n in named.values()) else None
