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


# --------------------------------------------------------------------- paired comparison


def test_paired_difference_hand_computed_cases():
    from shared.eval.compare import paired_difference

    same = paired_difference([0, 5, 30, np.inf], [0, 5, 30, np.inf])
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)
    assert not same.a_better and not same.b_better
    # A hits all four users, B none: every resample gives +1.
    all_a = paired_difference([0, 1, 2, 3], [10, 11, np.inf, 50])
    assert (all_a.mean, all_a.low, all_a.high) == (1.0, 1.0, 1.0)
    assert all_a.a_better and all_a.users == 4
    # One user flips (rank 20 -> 0) out of four: +0.25, and no resample can go below zero.
    one = paired_difference([0, 0, 20, 20], [0, 20, 20, 20])
    assert one.mean == pytest.approx(0.25)
    assert 0.0 <= one.low <= one.mean <= one.high <= 1.0
    # k decides what a hit is: at k = 1 only rank 0 counts.
    assert paired_difference([1, 1], [0, 0], k=1).mean == -1.0
    assert paired_difference([1, 1], [0, 0], k=1).b_better


def test_compare_pairs_in_every_case_group_that_ranked_both():
    from shared.eval.compare import compare_pairs
    from shared.eval.protocol import CaseRanks

    def ranks(*values: float) -> CaseRanks:
        return CaseRanks(np.array(values), np.array(values) * 10)

    groups = {
        "federated": {"a": ranks(0, 0, 50, 50), "b": ranks(0, 50, 50, 50), "c": ranks(0, 0, 0, 0)},
        "fewshot k=1": {"a": ranks(0, 50), "c": ranks(50, 50)},  # no b here
        "fewshot k=300": {"a": ranks(), "b": ranks(), "c": ranks()},  # no user reaches K
    }
    out = compare_pairs(groups, [("a", "b"), ("a", "c"), ("b", "missing")])
    assert set(out) == {"federated", "fewshot k=1"}
    assert set(out["federated"]) == {"a - b", "a - c"}
    assert set(out["fewshot k=1"]) == {"a - c"}
    # sampled ranks 0,0,50,50 vs 0,50,50,50: one more hit in four; full ranks are x10, so
    # a's second case (rank 0) is still a hit and b's (500) a miss
    assert out["federated"]["a - b"]["sampled_hr@10"]["mean"] == pytest.approx(0.25)
    assert out["federated"]["a - b"]["full_hr@10"]["mean"] == pytest.approx(0.25)
    assert out["federated"]["a - c"]["sampled_hr@10"]["mean"] == pytest.approx(-0.5)
    assert out["fewshot k=1"]["a - c"]["full_hr@10"]["users"] == 2
    assert compare_pairs(groups, [("x", "y")]) == {}


def test_paired_difference_interval_width_matches_the_normal_approximation():
    from shared.eval.compare import paired_difference

    # Differences of +1 / -1 in equal shares: sd 1, so the 95% half-width is about 1.96 / sqrt(n).
    n = 4000
    a = np.where(np.arange(n) % 2 == 0, 0.0, 50.0)
    b = np.where(np.arange(n) % 2 == 0, 50.0, 0.0)
    d = paired_difference(a, b, n_resamples=2000, seed=1)
    assert d.mean == 0.0
    half = (d.high - d.low) / 2
    assert half == pytest.approx(1.96 / math.sqrt(n), rel=0.15)
    assert not d.a_better and not d.b_better
    # Seeded: the same call gives the same interval.
    assert paired_difference(a, b, n_resamples=2000, seed=1) == d


def test_a_users_several_cases_are_resampled_together():
    """Splits pooled hold each user up to once per split: resampled as independent cases,
    the interval was sqrt(cases per user) too narrow (about 1.5-fold for 4 splits)."""
    from shared.eval.compare import compare_ranks, paired_difference
    from shared.eval.protocol import CaseRanks

    # 200 users with 3 identical cases each, differences +1 / -1 by user
    users = np.repeat(np.arange(200), 3)
    a = np.where(users % 2 == 0, 0.0, 50.0)
    b = np.where(users % 2 == 0, 50.0, 0.0)
    by_case = paired_difference(a, b, seed=1)
    by_user = paired_difference(a, b, seed=1, users=users)
    assert (by_case.users, by_user.users, by_user.cases) == (600, 200, 600)
    assert by_user.mean == by_case.mean == 0.0
    assert (by_case.high - by_case.low) / 2 == pytest.approx(1.96 / math.sqrt(600), rel=0.15)
    assert (by_user.high - by_user.low) / 2 == pytest.approx(1.96 / math.sqrt(200), rel=0.15)
    # two users of unequal case counts: a resample's mean is over its cases, so drawing
    # user 0 (2 cases, both +1) and user 1 (1 case, 0) gives 2/3, never the mean 1/2
    two = paired_difference([0, 0, 50], [50, 50, 50], users=[7, 7, 9], n_resamples=500)
    assert two.mean == pytest.approx(2 / 3) and two.users == 2
    assert {two.low, two.high} <= {0.0, 2 / 3, 1.0}
    with pytest.raises(DataError, match="users must name each of the 3 cases"):
        paired_difference([0, 0, 50], [50, 50, 50], users=[7, 9])
    # CaseRanks carry them through pooling, and pairing needs the same users
    ranks = CaseRanks(a, a, users)
    assert np.array_equal(CaseRanks.concat([ranks, ranks]).users, np.tile(users, 2))  # type: ignore[arg-type]
    assert CaseRanks.concat([ranks, CaseRanks(a, a)]).users is None  # an older file's part
    assert compare_ranks(ranks, CaseRanks(b, b, users))["full_hr@10"].users == 200
    with pytest.raises(DataError, match="different users"):
        compare_ranks(ranks, CaseRanks(b, b, users[::-1].copy()))


def test_paired_difference_refuses_unpaired_or_empty_input():
    from shared.errors import ConfigError
    from shared.eval.compare import paired_difference

    with pytest.raises(DataError, match="same cases"):
        paired_difference([0, 1, 2], [0, 1])
    with pytest.raises(DataError, match="no paired cases"):
        paired_difference([], [])
    with pytest.raises(ConfigError, match="level"):
        paired_difference([0], [0], level=1.0)


def test_pooled_case_ranks_weigh_every_user_once():
    from shared.eval.compare import compare_ranks
    from shared.eval.protocol import CaseRanks, summarize_ranks

    # two worlds: A hits 2 of 2 / 1 of 3, B hits 0 of 2 / 2 of 3 (sampled); full ranks x10
    a = [
        CaseRanks(np.array([0.0, 5.0]), np.array([0.0, 50.0])),
        CaseRanks(np.array([3.0, 20, 30]), np.array([30.0, 200, 300])),
    ]
    b = [
        CaseRanks(np.array([10.0, 40.0]), np.array([100.0, 400.0])),
        CaseRanks(np.array([1.0, 2, 30]), np.array([10.0, 20, 300])),
    ]
    pooled_a, pooled_b = CaseRanks.concat(a), CaseRanks.concat(b)
    np.testing.assert_array_equal(pooled_a.sampled, [0, 5, 3, 20, 30])
    np.testing.assert_array_equal(pooled_a.full, [0, 50, 30, 200, 300])
    assert summarize_ranks(pooled_a)["sampled_hr@10"] == pytest.approx(3 / 5)
    assert summarize_ranks(pooled_a)["full_hr@10"] == pytest.approx(1 / 5)
    # the pooled difference is the user-weighted mean of the worlds' (+1 and -1 over 2 and 3
    # users), not the mean of the two worlds' differences (+1 - 1/3) / 2
    diff = compare_ranks(pooled_a, pooled_b)["sampled_hr@10"]
    assert diff.mean == pytest.approx((2 * 1.0 + 3 * (-1 / 3)) / 5)
    assert diff.users == 5
    with pytest.raises(DataError, match="no case ranks"):
        CaseRanks.concat([])


def test_relative_cost_without_a_draw_where_the_reference_hits_says_so():
    """B (the no-DP reference) hits 1 case of 10: a bootstrap draw of the 10 users misses it
    with probability 0.9**10 (about 0.35), and a draw where B hits nothing has no ratio. With
    one draw per call, about a third of the seeds leave no draw at all: that was an
    IndexError from numpy's quantile of an empty array; it is a DataError naming the fix."""
    from shared.eval.compare import relative_cost

    a = [0.0] + [20.0] * 9
    outcomes = {"interval": 0, "refused": 0}
    for seed in range(40):
        try:
            point, low, high = relative_cost(a, a, n_resamples=1, seed=seed) or (0, 0, 0)
        except DataError as err:
            assert "n_resamples" in str(err) and "1 of 10" in str(err)
            outcomes["refused"] += 1
        else:
            assert (point, low, high) == (0.0, 0.0, 0.0)  # A is B: no cost in any draw
            outcomes["interval"] += 1
    assert outcomes["refused"] > 0 and outcomes["interval"] > 0
