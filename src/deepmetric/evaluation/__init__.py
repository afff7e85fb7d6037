"""Evaluation: exact blocked k-NN retrieval metrics, clustering metrics and the ``evaluate()`` entry point.

``evaluate(query, query_labels, gallery=None, gallery_labels=None, ...)`` returns Recall@K, Precision@1,
R-Precision, MAP@R (and on request full MAP, NMI, clustering F1) without ever materialising an N×N matrix.
"""

from deepmetric.evaluation.clustering import clustering_metrics, kmeans_assign, pair_f1
from deepmetric.evaluation.engine import ALL_METRICS, BACKENDS, default_chunk_size, evaluate
from deepmetric.evaluation.knn import count_ranked_before, stable_topk

__all__ = [
    "ALL_METRICS",
    "BACKENDS",
    "clustering_metrics",
    "count_ranked_before",
    "default_chunk_size",
    "evaluate",
    "kmeans_assign",
    "pair_f1",
    "stable_topk",
]
