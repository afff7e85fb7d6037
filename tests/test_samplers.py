from collections import Counter

import numpy as np
import pytest

from deepmetric.data.samplers import MPerClassBatchSampler, RandomBatchSampler


def _labels(n_classes=20, sizes=(3, 7, 12)):
    rng = np.random.default_rng(0)
    return np.concatenate([np.full(rng.choice(sizes), c) for c in range(n_classes)])


@pytest.mark.parametrize("class_choice", ["uniform_no_replacement", "proportional_to_remaining"])
@pytest.mark.parametrize("image_choice", ["no_replacement_pad", "with_replacement"])
def test_batches_have_b_over_m_classes_times_m(class_choice, image_choice):
    labels = _labels()
    s = MPerClassBatchSampler(labels, batch_size=16, m=4, class_choice=class_choice, image_choice=image_choice,
                              length=30, seed=1)
    batches = list(s)
    assert len(batches) == 30
    for b in batches:
        counts = Counter(labels[b].tolist())
        assert len(b) == 16 and len(counts) == 4 and set(counts.values()) == {4}


def test_no_replacement_uses_distinct_images_when_possible():
    labels = np.repeat(np.arange(10), 8)
    s = MPerClassBatchSampler(labels, batch_size=20, m=4, length=10, seed=0)
    for b in s:
        assert len(set(b)) == len(b)


def test_with_replacement_class_choice_and_permutation():
    labels = _labels()
    s = MPerClassBatchSampler(labels, batch_size=12, m=2, class_choice="with_replacement",
                              image_choice="with_replacement", length=5)
    assert all(len(b) == 12 for b in s)
    p = MPerClassBatchSampler(labels, batch_size=13, m=4, class_choice="permutation", length=5)
    for b in p:
        counts = Counter(labels[b].tolist())
        assert len(b) == 13 and max(counts.values()) <= 4


def test_deterministic_and_resumable():
    labels = _labels()
    a = list(MPerClassBatchSampler(labels, 16, 4, length=12, seed=3))
    b = list(MPerClassBatchSampler(labels, 16, 4, length=12, seed=3))
    c = list(MPerClassBatchSampler(labels, 16, 4, length=12, seed=4))
    assert a == b and a != c
    s = MPerClassBatchSampler(labels, 16, 4, length=12, seed=3)
    it = iter(s)
    first = [next(it) for _ in range(5)]
    state = s.state_dict()
    t = MPerClassBatchSampler(labels, 16, 4, length=12, seed=3)
    t.load_state_dict(state)
    assert first + list(t) == a


def test_next_epoch_is_a_function_of_seed_and_epoch():
    labels = _labels()
    s = MPerClassBatchSampler(labels, 16, 4, length=4, seed=3)
    e0, e1 = list(s), list(s)
    r = MPerClassBatchSampler(labels, 16, 4, length=4, seed=3)
    r.set_epoch(1)
    assert e0 != e1 and list(r) == e1


def test_bad_arguments():
    labels = _labels(n_classes=3)
    with pytest.raises(ValueError, match="multiple of m"):
        MPerClassBatchSampler(labels, batch_size=10, m=4)
    with pytest.raises(ValueError, match="distinct"):
        MPerClassBatchSampler(labels, batch_size=16, m=4)
    with pytest.raises(ValueError, match="class_choice"):
        MPerClassBatchSampler(labels, batch_size=8, m=4, class_choice="bogus")


def test_random_batch_sampler_resumes():
    s = RandomBatchSampler(50, 8, seed=2)
    full = list(s)
    assert len(full) == 6 and len({i for b in full for i in b}) == 48
    r = RandomBatchSampler(50, 8, seed=2)
    it = iter(r)
    head = [next(it), next(it)]
    q = RandomBatchSampler(50, 8, seed=2)
    q.load_state_dict(r.state_dict())
    assert head + list(q) == full
