"""A persisted search index: gallery embeddings, their labels/paths, an optional faiss index and metadata.

Directory layout (``FORMAT`` = "deepmetric-index/1"):

* ``meta.json``      format, kind, distance ("cosine"), n_items, dim, SHA-256 of every data file, the model that
                     embedded the gallery (``model``: e.g. weights SHA-256, embedding size), the measured recall of
                     an approximate index against exact search, and an optional calibrated match threshold;
* ``embeddings.npy`` (n, d) float32 as the model produced them; ``labels.npy`` (n,) int64 and ``paths.txt``
                     (one per row) when known;
* ``faiss.index``    for kind "ivf" (IndexIVFFlat) or "hnsw" (IndexHNSWFlat) over the L2-normalised rows;
* ``neighbours_index.npy`` / ``neighbours_score.npy`` (n, k) int64 / float32: every gallery item's exact top-k
                     other gallery items and their cosine similarities (``meta["neighbours"]["k"]``), built once
                     so that DBA and k-reciprocal re-ranking at search time need no gallery-against-gallery search.

Kind "exact" needs no faiss: it searches the stored embeddings with :func:`.retrieve` (the library's exact,
stable-tie search, the same one evaluation uses). The approximate kinds need the optional ``faiss`` extra; their
``recall@k`` in the metadata is mean |ANN top-k ∩ exact top-k| / k over up to ``recall_sample`` gallery rows used
as queries. ``load`` refuses a directory whose files are missing, whose checksums or shapes disagree with the
metadata, whose stored neighbour lists do not belong to its embeddings (checked on a sample of rows), or (when
the caller says which model it holds) that was built by another model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepmetric.atomic_files import write_text_atomic
from deepmetric.evaluation.faiss_backend import build_faiss_index, import_faiss, overlap_at_k
from deepmetric.evaluation.results import RetrievalResults
from deepmetric.evaluation.retrieval import retrieve

FORMAT = "deepmetric-index/1"
INDEX_KINDS = ("exact", "ivf", "hnsw")
_BACKEND = {"ivf": "faiss-ivf", "hnsw": "faiss-hnsw"}


class IndexFormatError(ValueError):
    """An index directory is incomplete, corrupt or does not belong to the model at hand; the message says why."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class SearchIndex:
    embeddings: np.ndarray
    labels: np.ndarray | None = None
    paths: list[str] | None = None
    kind: str = "exact"
    meta: dict[str, Any] = field(default_factory=dict)
    faiss_index: Any | None = None
    neighbour_index: np.ndarray | None = None
    neighbour_score: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def threshold(self) -> float | None:
        """The calibrated "same item" similarity threshold (match iff score ≥ threshold), if one was stored."""
        info = self.meta.get("threshold")
        return None if not info else float(info["threshold"])

    @property
    def gallery_neighbours(self) -> RetrievalResults | None:
        """The stored top-k lists of every gallery item among the others (self-retrieval), if built."""
        if self.neighbour_index is None or self.neighbour_score is None:
            return None
        n = self.embeddings.shape[0]
        zeros = torch.zeros(n, dtype=torch.int64)
        return RetrievalResults(
            query_ids=torch.arange(n), neighbour_index=torch.from_numpy(self.neighbour_index),
            neighbour_score=torch.from_numpy(self.neighbour_score), query_labels=None, gallery_labels=None,
            n_relevant=zeros, first_relevant_rank=zeros, rank_depth=0, n_gallery=n, self_retrieval=True,
            distance="cosine",
        )

    @classmethod
    def build(cls, embeddings: Any, labels: Any | None = None, paths: list[str] | None = None, *,
              kind: str = "exact", params: dict[str, Any] | None = None, model: dict[str, Any] | None = None,
              recall_k: int = 10, recall_sample: int = 1000, info: dict[str, Any] | None = None,
              neighbour_k: int = 0) -> SearchIndex:
        """Index ``embeddings`` (n, d); ``params`` go to faiss (``nlist``, ``nprobe``, ``hnsw_m``, ``ef_search``).
        ``recall_sample = 0`` skips the recall measurement of an approximate index; ``neighbour_k > 0`` stores
        every item's exact top-``neighbour_k`` gallery neighbours (for re-ranking at search time)."""
        if kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {kind!r}")
        emb = np.ascontiguousarray(np.asarray(embeddings), dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] == 0 or not np.isfinite(emb).all():
            raise ValueError(f"embeddings must be a finite, non-empty (n, d) matrix, got shape {emb.shape}")
        n = emb.shape[0]
        lab = None if labels is None else np.asarray(labels, dtype=np.int64)
        if lab is not None and lab.shape != (n,):
            raise ValueError(f"labels must have one entry per embedding ({n}), got shape {lab.shape}")
        if paths is not None and len(paths) != n:
            raise ValueError(f"paths must have one entry per embedding ({n}), got {len(paths)}")
        meta: dict[str, Any] = {"format": FORMAT, "kind": kind, "distance": "cosine", "n_items": n,
                                "dim": int(emb.shape[1]), "model": model or {}, "params": params or {}}
        meta.update(info or {})
        index = cls(emb, lab, paths, kind, meta)
        if neighbour_k < 0:
            raise ValueError(f"neighbour_k must be ≥ 0, got {neighbour_k}")
        if neighbour_k > 0 and n > 1:
            lists = retrieve(emb, k=min(neighbour_k, n - 1))
            index.neighbour_index = lists.neighbour_index.numpy()
            index.neighbour_score = lists.neighbour_score.numpy().astype(np.float32)
            meta["neighbours"] = {"k": int(lists.k), "order": "(-cosine, gallery index), own row excluded"}
        if kind != "exact":
            faiss = import_faiss()
            index.faiss_index = build_faiss_index(faiss, _unit(emb), "cosine", _BACKEND[kind], params or {})
            if kind == "ivf":
                meta["params"] = {**meta["params"], "nlist": int(index.faiss_index.nlist),
                                  "nprobe": int(index.faiss_index.nprobe)}
        if kind != "exact" and recall_sample > 0:
            k = min(recall_k, n)
            rows = np.unique(np.linspace(0, n - 1, min(recall_sample, n)).round().astype(np.int64))
            exact = retrieve(emb[rows], gallery=emb, k=k).neighbour_index
            approx = index.search(emb[rows], k).neighbour_index
            meta["recall"] = {f"recall@{k}": overlap_at_k(exact, approx), "sample_queries": int(rows.shape[0]),
                              "queries": "gallery rows (evenly spaced)"}
        return index

    def search(self, queries: Any, k: int) -> RetrievalResults:
        """Top-``k`` gallery rows per query (cosine); approximate kinds pad short lists with −1."""
        q = np.ascontiguousarray(np.asarray(queries), dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (n, {self.dim}) to match the index, got shape {q.shape}")
        k = min(int(k), self.embeddings.shape[0])
        if self.kind == "exact":
            return retrieve(q, gallery=self.embeddings, k=k)
        scores, idx = self.faiss_index.search(_unit(q), k)
        n = q.shape[0]
        return RetrievalResults(
            query_ids=torch.arange(n), neighbour_index=torch.from_numpy(idx).to(torch.int64),
            neighbour_score=torch.from_numpy(scores), query_labels=None, gallery_labels=None,
            n_relevant=torch.zeros(n, dtype=torch.int64), first_relevant_rank=torch.zeros(n, dtype=torch.int64),
            rank_depth=0, n_gallery=self.embeddings.shape[0], self_retrieval=False, distance="cosine",
        )

    def save(self, directory: str | Path) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "embeddings.npy", self.embeddings)
        files = ["embeddings.npy"]
        if self.labels is not None:
            np.save(out / "labels.npy", self.labels)
            files.append("labels.npy")
        if self.paths is not None:
            (out / "paths.txt").write_text("".join(f"{p}\n" for p in self.paths))
            files.append("paths.txt")
        if self.neighbour_index is not None and self.neighbour_score is not None:
            np.save(out / "neighbours_index.npy", self.neighbour_index)
            np.save(out / "neighbours_score.npy", self.neighbour_score)
            files += ["neighbours_index.npy", "neighbours_score.npy"]
        if self.faiss_index is not None:
            import_faiss().write_index(self.faiss_index, str(out / "faiss.index"))
            files.append("faiss.index")
        self.meta["files"] = {name: _sha256(out / name) for name in files}
        write_text_atomic(json.dumps(self.meta, indent=2) + "\n", out / "meta.json")  # last: a half-written index has none
        return out

    @classmethod
    def load(cls, directory: str | Path, *, model: dict[str, Any] | None = None) -> SearchIndex:
        """Read and verify an index; ``model`` (same keys as at build time) must match the stored one."""
        d = Path(directory)
        meta_path = d / "meta.json"
        if not meta_path.is_file():
            raise IndexFormatError(f"{d} is not a search index: meta.json is missing")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise IndexFormatError(f"{meta_path} is corrupt: {exc}") from exc
        if meta.get("format") != FORMAT:
            raise IndexFormatError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        for name, digest in meta.get("files", {}).items():
            if not (d / name).is_file():
                raise IndexFormatError(f"{d / name} is missing (listed in meta.json)")
            if _sha256(d / name) != digest:
                raise IndexFormatError(f"{d / name} is corrupt or was changed: its SHA-256 differs from meta.json")
        if "embeddings.npy" not in meta.get("files", {}):
            raise IndexFormatError(f"{meta_path} lists no embeddings.npy")
        emb = np.load(d / "embeddings.npy", allow_pickle=False)
        if emb.shape != (meta["n_items"], meta["dim"]):
            raise IndexFormatError(f"{d / 'embeddings.npy'} has shape {emb.shape}, meta.json says "
                                   f"({meta['n_items']}, {meta['dim']})")
        if model is not None:
            _check_model(meta.get("model", {}), model, d)
        labels = np.load(d / "labels.npy") if "labels.npy" in meta["files"] else None
        paths = (d / "paths.txt").read_text().splitlines() if "paths.txt" in meta["files"] else None
        index = cls(emb, labels, paths, meta["kind"], meta)
        if "neighbours" in meta:
            index.neighbour_index, index.neighbour_score = _load_neighbours(d, emb, int(meta["neighbours"]["k"]))
        if meta["kind"] != "exact":
            index.faiss_index = import_faiss().read_index(str(d / "faiss.index"))
            if (index.faiss_index.ntotal, index.faiss_index.d) != (meta["n_items"], meta["dim"]):
                raise IndexFormatError(f"{d / 'faiss.index'} holds {index.faiss_index.ntotal} × {index.faiss_index.d} "
                                       f"vectors, meta.json says {meta['n_items']} × {meta['dim']}")
            params = meta.get("params", {})
            if meta["kind"] == "ivf" and "nprobe" in params:
                index.faiss_index.nprobe = int(params["nprobe"])
            if meta["kind"] == "hnsw":
                index.faiss_index.hnsw.efSearch = int(params.get("ef_search", 128))
        return index


def _load_neighbours(d: Path, emb: np.ndarray, k: int, sample: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The stored neighbour lists, verified against the embeddings: shapes, index range, no own row, and on
    ``sample`` evenly spaced rows the stored scores equal the cosines recomputed from the embeddings and are in
    (−score, index) order."""
    where = d / "neighbours_index.npy"
    idx = np.load(where, allow_pickle=False)
    score = np.load(d / "neighbours_score.npy", allow_pickle=False)
    n = emb.shape[0]
    if idx.shape != (n, k) or score.shape != (n, k):
        raise IndexFormatError(f"{where} and neighbours_score.npy have shapes {idx.shape} and {score.shape}, "
                               f"meta.json says ({n}, {k})")
    if idx.min(initial=0) < 0 or idx.max(initial=0) >= n or (idx == np.arange(n)[:, None]).any():
        raise IndexFormatError(f"{where} holds indices outside [0, {n}) or an item's own row")
    rows = np.unique(np.linspace(0, n - 1, min(sample, n)).round().astype(np.int64))
    unit = _unit(emb)
    recomputed = np.einsum("rd,rkd->rk", unit[rows], unit[idx[rows]])
    ordered = np.all((score[rows, :-1] > score[rows, 1:])
                     | ((score[rows, :-1] == score[rows, 1:]) & (idx[rows, :-1] < idx[rows, 1:])))
    if not np.allclose(recomputed, score[rows], rtol=0, atol=1e-4) or not ordered:
        raise IndexFormatError(f"{where}: the stored neighbour lists do not belong to embeddings.npy (scores "
                               "differ from the recomputed cosines or are out of order); rebuild the index")
    return idx, score


def _check_model(stored: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    diffs = [f"{key}: index {stored.get(key)!r} ≠ current {value!r}" for key, value in current.items()
             if key in stored and stored[key] != value]
    if diffs:
        raise IndexFormatError(f"{where} was built with another model (" + "; ".join(diffs) + "); rebuild it with "
                               "`deepmetric index` for this model")


__all__ = ["FORMAT", "INDEX_KINDS", "IndexFormatError", "SearchIndex"]
