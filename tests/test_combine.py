"""Reward combination: normalisation, weighted sums, rank aggregation, likelihood weights and DPO pair choice.
Failed items (None) never count as a low score: they are left out of statistics and ranks and stay None."""

from __future__ import annotations

import math

import pytest
from rewardscope.models.combine import (
    average_ranks,
    combine,
    likelihood_weights,
    normalize,
    preference_pair,
    rank_candidates,
)


@pytest.mark.parametrize(
    "values, ranks",
    [
        ([3.0, 1.0, 2.0], [3.0, 1.0, 2.0]),
        ([1.0, 1.0, 2.0], [1.5, 1.5, 3.0]),
        ([5.0, 5.0, 5.0], [2.0, 2.0, 2.0]),
        ([], []),
    ],
    ids=["distinct", "tie-low", "all-tied", "empty"],
)
def test_average_ranks_share_ties(values, ranks):
    assert average_ranks(values) == ranks


@pytest.mark.parametrize(
    "values, method, expected",
    [
        ([1.0, None, 3.0], "none", [1.0, None, 3.0]),
        ([1.0, None, 3.0], "zscore", [-1.0, None, 1.0]),
        ([2.0, 2.0, None], "zscore", [0.0, 0.0, None]),
        ([10.0, None, 30.0, 20.0], "rank", [0.0, None, 1.0, 0.5]),
        ([4.0, None], "rank", [0.5, None]),
        ([None, None], "zscore", [None, None]),
    ],
    ids=["none", "zscore-skips-none", "zscore-constant", "rank-skips-none", "rank-single", "all-failed"],
)
def test_normalize_uses_scored_items_only(values, method, expected):
    assert normalize(values, method) == pytest.approx(expected)


@pytest.mark.parametrize(
    "rewards, weights, normalization, aggregation, expected",
    [
        # weighted sum of raw values (the Scorer's total)
        ({"a": [1.0, 2.0], "b": [0.5, 0.0]}, {"a": 1.0, "b": 2.0}, "none", "weighted_sum", [2.0, 2.0]),
        # z-scores put rewards on one scale before the sum
        ({"a": [1.0, 3.0], "b": [100.0, 0.0]}, None, "zscore", "weighted_sum", [0.0, 0.0]),
        ({"a": [1.0, 3.0], "b": [100.0, 0.0]}, {"a": 2.0, "b": 1.0}, "zscore", "weighted_sum", [-1.0, 1.0]),
        # rank normalisation: [0, 1] per reward
        ({"a": [1.0, 2.0, 3.0], "b": [3.0, 2.0, 1.0]}, None, "rank", "weighted_sum", [1.0, 1.0, 1.0]),
        # FineRewards: sum of ranks (1 = worst); ties share
        ({"a": [0.1, 0.9, 0.5], "b": [7.0, 9.0, 8.0]}, None, "none", "rank_sum", [2.0, 6.0, 4.0]),
        ({"a": [0.1, 0.1, 0.5], "b": [1.0, 2.0, 3.0]}, {"a": 1.0, "b": 0.5}, "none", "rank_sum", [2.0, 2.5, 4.5]),
        # an item missing a reward is None and left out of every statistic: the others rank among themselves
        ({"a": [1.0, None, 3.0], "b": [2.0, 5.0, 2.0]}, None, "none", "rank_sum", [2.5, None, 3.5]),
        ({"a": [1.0, None, 3.0], "b": [0.0, 100.0, 2.0]}, None, "zscore", "weighted_sum", [-2.0, None, 2.0]),
        ({"a": [None, None]}, None, "zscore", "weighted_sum", [None, None]),
    ],
    ids=[
        "weighted-raw",
        "zscore-cancels",
        "zscore-weighted",
        "rank-normalised",
        "rank-sum",
        "rank-sum-weighted-ties",
        "rank-sum-skips-failed",
        "zscore-skips-failed",
        "all-failed",
    ],
)
def test_combine_table(rewards, weights, normalization, aggregation, expected):
    assert combine(rewards, weights, normalization, aggregation) == pytest.approx(expected)


def test_a_failed_item_does_not_move_the_others():
    with_failure = combine({"a": [1.0, 9.0, 3.0], "b": [1.0, None, 2.0]}, None, "zscore")
    without = combine({"a": [1.0, 3.0], "b": [1.0, 2.0]}, None, "zscore")
    assert [with_failure[0], with_failure[2]] == pytest.approx(without)
    assert with_failure[1] is None


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: combine({"a": [1.0]}, {"b": 1.0}), "must match"),
        (lambda: combine({"a": [1.0], "b": [1.0, 2.0]}), "different lengths"),
        (lambda: combine({"a": [1.0]}, None, "minmax"), "unknown normalization"),
        (lambda: combine({"a": [1.0]}, None, "none", "borda"), "unknown aggregation"),
        (lambda: likelihood_weights([1.0], "softmax", 0.0), "temperature"),
    ],
    ids=["weights-mismatch", "lengths", "normalization", "aggregation", "temperature"],
)
def test_bad_combination_arguments_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    "scores, method, temperature, expected",
    [
        ([0.0, None, math.log(3.0)], "softmax", 1.0, [0.25, None, 0.75]),
        ([1.0, 1.0], "softmax", 0.1, [0.5, 0.5]),
        ([0.0, 1.0], "softmax", 0.5, [1 / (1 + math.e**2), math.e**2 / (1 + math.e**2)]),
        ([2.0, None, 4.0, 3.0], "minmax", 1.0, [0.0, None, 1.0, 0.5]),
        ([7.0, 7.0], "minmax", 1.0, [1.0, 1.0]),
        ([None], "softmax", 1.0, [None]),
    ],
    ids=["softmax", "softmax-equal", "softmax-temperature", "minmax", "minmax-equal", "none-scored"],
)
def test_likelihood_weights(scores, method, temperature, expected):
    assert likelihood_weights(scores, method, temperature) == pytest.approx(expected)


def test_rank_candidates_keeps_the_existing_contract():
    assert rank_candidates([0.2, None, 0.9, 0.2]) == ([2, 0, 3], 2, 3)
    assert rank_candidates([None, 0.5]) == ([1], None, None)


@pytest.mark.parametrize(
    "scores, margin, pair",
    [
        ([0.1, 0.9, 0.5], 0.0, (1, 0, 0.8)),
        ([0.9, 0.9, 0.1, 0.1], 0.0, (0, 3, 0.8)),  # ties: the lower index is better-placed, so chosen 0, rejected 3
        ([0.5, 0.52], 0.05, None),  # a near-tie is dropped
        ([0.5, 0.6], 0.05, (1, 0, 0.1)),
        ([0.4, 0.4, 0.4], 0.0, None),  # all tied: nothing to prefer
        ([None, 0.3], 0.0, None),
        ([0.3, None, 0.1], 0.0, (0, 2, 0.2)),
    ],
    ids=["best-worst", "ties-by-index", "near-tie", "above-margin", "all-tied", "one-scored", "skips-failed"],
)
def test_preference_pair(scores, margin, pair):
    found = preference_pair(scores, margin)
    if pair is None:
        assert found is None
    else:
        assert (found.chosen, found.rejected) == pair[:2]
        assert found.margin == pytest.approx(pair[2])
