"""Degenerate training inputs get a clear error instead of a silently meaningless run."""

from __future__ import annotations

import numpy as np
import pytest

from deepmetric.data.samplers import MPerClassBatchSampler


def test_m_larger_than_every_class_is_refused() -> None:
    labels = np.repeat(np.arange(6), 3)  # every class has 3 images
    with pytest.raises(ValueError, match=r"m=4 .*largest class has 3 images"):
        MPerClassBatchSampler(labels, batch_size=8, m=4)
    MPerClassBatchSampler(labels, batch_size=6, m=3)  # m equal to the class size is fine


def test_a_single_class_is_refused() -> None:
    with pytest.raises(ValueError, match="single class"):
        MPerClassBatchSampler(np.zeros(20, dtype=np.int64), batch_size=4, m=2, class_choice="with_replacement")
