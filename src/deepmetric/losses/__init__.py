"""Dense B×R metric-learning losses sharing one signature (see :mod:`deepmetric.losses.base`)."""

from __future__ import annotations

from deepmetric.losses.base import MetricLoss, Mined, MinedPairs, MinedTriplets, PairLoss, Pairs
from deepmetric.losses.binomial import BinomialDevianceLoss
from deepmetric.losses.classification import ArcFaceLoss, NormalizedSoftmaxLoss, SoftTripleLoss
from deepmetric.losses.contrastive import ContrastiveLoss
from deepmetric.losses.lifted import LiftedStructureLoss
from deepmetric.losses.margin import MarginLoss
from deepmetric.losses.multi_similarity import MultiSimilarityLoss, WeightLoss
from deepmetric.losses.nca import NCALoss
from deepmetric.losses.npair import NPairLoss
from deepmetric.losses.proxy import ProxyAnchorLoss, ProxyLoss, ProxyNCALoss
from deepmetric.losses.recall_surrogate import RecallSurrogateLoss
from deepmetric.losses.smooth_ap import SmoothAPLoss
from deepmetric.losses.smooth_rank import SmoothRankLoss
from deepmetric.losses.triplet import TripletMarginLoss

LOSSES: dict[str, type[MetricLoss]] = {
    "multi_similarity": MultiSimilarityLoss,
    "contrastive": ContrastiveLoss,
    "triplet_margin": TripletMarginLoss,
    "lifted_structure": LiftedStructureLoss,
    "binomial_deviance": BinomialDevianceLoss,
    "margin": MarginLoss,
    "nca": NCALoss,
    "weight": WeightLoss,
    "proxy_nca": ProxyNCALoss,
    "proxy_anchor": ProxyAnchorLoss,
    "npair": NPairLoss,
    "normalized_softmax": NormalizedSoftmaxLoss,
    "arcface": ArcFaceLoss,
    "soft_triple": SoftTripleLoss,
    "smooth_ap": SmoothAPLoss,
    "recall_surrogate": RecallSurrogateLoss,
}

__all__ = [
    "LOSSES", "ArcFaceLoss", "BinomialDevianceLoss", "ContrastiveLoss", "LiftedStructureLoss", "MarginLoss",
    "MetricLoss", "Mined", "MinedPairs", "MinedTriplets", "MultiSimilarityLoss", "NCALoss", "NPairLoss",
    "NormalizedSoftmaxLoss", "PairLoss", "Pairs", "ProxyAnchorLoss", "ProxyLoss", "ProxyNCALoss", "RecallSurrogateLoss",
    "SmoothAPLoss", "SmoothRankLoss", "SoftTripleLoss", "TripletMarginLoss", "WeightLoss",
]
