"""Miners returning dense :class:`~deepmetric.losses.base.MinedPairs` / ``MinedTriplets`` usable by any pair or
triplet loss through ``loss(..., mined=miner(...))``."""

from __future__ import annotations

from deepmetric.losses.base import Mined, MinedPairs, MinedTriplets
from deepmetric.miners.base import Miner
from deepmetric.miners.miners import (
    BatchHardMiner,
    DistanceWeightedMiner,
    MultiSimilarityMiner,
    SemiHardMiner,
    distance_weighted_probabilities,
)

MINERS: dict[str, type[Miner]] = {
    "semi_hard": SemiHardMiner,
    "batch_hard": BatchHardMiner,
    "distance_weighted": DistanceWeightedMiner,
    "multi_similarity": MultiSimilarityMiner,
}

__all__ = [
    "MINERS", "BatchHardMiner", "DistanceWeightedMiner", "Mined", "MinedPairs", "MinedTriplets", "Miner",
    "MultiSimilarityMiner", "SemiHardMiner", "distance_weighted_probabilities",
]
