"""Evaluation: one exact blocked k-NN search (``retrieve``) into a ``RetrievalResults`` object, the metrics read
from it, re-ranking, verification thresholds, clustering metrics and the ``evaluate()`` entry point.

``evaluate(query, query_labels, gallery=None, gallery_labels=None, ...)`` returns Recall@K, Precision@1,
R-Precision, MAP@R (and on request full MAP, NMI, clustering F1) without ever materialising an N×N matrix.
"""

from deepmetric.evaluation.clustering import clustering_metrics, kmeans_assign, pair_f1
from deepmetric.evaluation.engine import ALL_METRICS, BACKENDS, evaluate
from deepmetric.evaluation.knn import count_ranked_before, stable_topk
from deepmetric.evaluation.results import RetrievalResults
from deepmetric.evaluation.retrieval import default_chunk_size, retrieve

__all__ = [
    "ALL_METRICS",
    "BACKENDS",
    "RetrievalResults",
    "clustering_metrics",
    "count_ranked_before",
    "default_chunk_size",
    "evaluate",
    "kmeans_assign",
    "pair_f1",
    "retrieve",
    "stable_topk",
]
