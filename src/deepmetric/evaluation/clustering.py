"""Clustering metrics after k-means with one cluster per distinct label (methods.md §1.5).

* NMI = I(Y; C) / ((H(Y) + H(C)) / 2) — sklearn ``normalized_mutual_info_score`` with ``average_method``
  pinned to "arithmetic" (sklearn changed its default in 0.22).
* Pair-counting F1: A = Σ_classes C(n_y, 2), B = Σ_clusters C(n_c, 2), T = Σ_{y,c} C(n_{y∩c}, 2);
  precision = T / B, recall = T / A, F1 = 2PR / (P + R).

k-means: faiss ``Kmeans`` (20 iterations, seeded) when faiss is importable, else scikit-learn ``KMeans``
(n_init=1, seeded); the cluster of a point is its nearest centroid.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor


def kmeans_assign(x: np.ndarray, n_clusters: int, seed: int = 0, niter: int = 20) -> np.ndarray:
    """Cluster id (int64) of each row of ``x`` after seeded k-means with ``n_clusters`` centroids."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not 1 <= n_clusters <= x.shape[0]:
        raise ValueError(f"k-means needs 1 ≤ n_clusters ≤ n_points, got {n_clusters} for {x.shape[0]} points")
    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is not None:
        km = faiss.Kmeans(x.shape[1], n_clusters, niter=niter, seed=seed, verbose=False,
                          max_points_per_centroid=10**9, min_points_per_centroid=1)
        km.train(x)
        return km.index.search(x, 1)[1][:, 0].astype(np.int64)
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=n_clusters, n_init=1, max_iter=niter, random_state=seed)
    return km.fit_predict(x).astype(np.int64)


def _pairs(n: np.ndarray) -> float:
    n = n.astype(np.float64)
    return float((n * (n - 1) / 2).sum())


def pair_f1(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Pair-counting F1 of a clustering (formula in the module docstring); 0 when no pair is formed."""
    from sklearn.metrics.cluster import contingency_matrix

    table = contingency_matrix(labels, clusters, sparse=True)
    t = _pairs(table.data)
    a = _pairs(np.asarray(table.sum(axis=1)).ravel())
    b = _pairs(np.asarray(table.sum(axis=0)).ravel())
    if t == 0:
        return 0.0
    precision, recall = t / b, t / a
    return 2 * precision * recall / (precision + recall)


def clustering_metrics(embeddings: Tensor, labels: Tensor, seed: int = 0) -> dict[str, float]:
    """{"nmi", "f1"} of k-means (k = number of distinct labels) on ``embeddings`` against ``labels``."""
    from sklearn.metrics import normalized_mutual_info_score

    y = labels.cpu().numpy()
    n_clusters = int(np.unique(y).shape[0])
    c = kmeans_assign(embeddings.detach().float().cpu().numpy(), n_clusters, seed=seed)
    nmi = normalized_mutual_info_score(y, c, average_method="arithmetic")
    return {"nmi": float(nmi), "f1": pair_f1(y, c)}


__all__ = ["clustering_metrics", "kmeans_assign", "pair_f1"]
