"""Metrics on hand-computed cases (PROTOCOL.md: ties against the model, NaN never helps)."""

import math

import numpy as np
import pytest

from shared.errors import DataError
from shared.eval.metrics import hit_rate_at_k, ndcg_at_k, rank_of_target, ranks_from_scores


def test_rank_counts_strictly_greater_and_ties():
    assert rank_of_target(0.5, [0.9, 0.5, 0.1, 0.4]) == 2  # 0.9 above, 0.5 tie counts


def test_all_equal_scores_give_zero_hit_rate():
    # 99 negatives with the same score as the target: rank 99 -> miss.
    rank = rank_of_target(1.0, np.ones(99))
    assert rank == 99
    assert hit_rate_at_k([rank], 10) == 0.0
    assert ndcg_at_k([rank], 10) == 0.0


def test_non_finite_target_is_a_miss_and_nan_candidates_count_above():
    assert math.isinf(rank_of_target(float("nan"), [0.0]))
    assert math.isinf(rank_of_target(float("inf"), [0.0]))
    assert rank_of_target(0.5, [float("nan"), 0.1]) == 1


def test_hr_and_ndcg_textbook_values():
    ranks = [0, 1, 9, 10, float("inf")]
    assert hit_rate_at_k(ranks, 10) == pytest.approx(3 / 5)
    expected = (1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(11)) / 5
    assert ndcg_at_k(ranks, 10) == pytest.approx(expected)
    assert hit_rate_at_k([], 10) == 0.0
    assert ndcg_at_k([], 10) == 0.0


def test_ranks_from_scores_matches_scalar_version_and_respects_mask():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(6, 12)).astype(float)  # many ties
    scores[2, 3] = np.nan
    targets = np.array([0, 1, 2, 3, 4, 5])
    mask = rng.random((6, 12)) < 0.7
    mask[np.arange(6), targets] = False
    t = scores[np.arange(6), targets]
    batched = ranks_from_scores(t, scores, mask)
    for i in range(6):
        assert batched[i] == rank_of_target(t[i], scores[i, mask[i]])


def test_ranks_from_scores_rejects_shape_mismatch():
    with pytest.raises(DataError, match="shape mismatch"):
        ranks_from_scores([0.1], np.zeros((2, 3)), np.ones((2, 3), bool))


def test_k_must_be_positive():
    with pytest.raises(DataError):
        hit_rate_at_k([0], 0)
