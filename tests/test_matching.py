"""Matching score formulas against hand-computed values, and the reward on real photos with real weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rewardscope.models.detection.matching import geneval_check, numeracy_score, relative_position, seed_score
from rewardscope.models.prompt import ObjectSpec, ParsedPrompt, Relation


def slots(*objects):
    """(requested, detected, mean confidence) per object -> [1, K] tensors plus a padded slot."""
    requested = torch.tensor([[o[0] for o in objects] + [7]])
    counts = torch.tensor([[o[1] for o in objects] + [9]])
    confidence = torch.tensor([[o[2] for o in objects] + [0.99]], dtype=torch.float64)
    mask = torch.tensor([[True] * len(objects) + [False]])
    return counts, confidence, requested, mask


@pytest.mark.parametrize(
    "objects, score, category, quantity",
    [
        ([(2, 2, 0.8)], 2 * 0.8 * 1.0 / 1.8, 0.8, 1.0),  # exact count
        ([(3, 0, 0.0)], 0.0, 0.0, 0.0),  # nothing detected: 0 by definition, not a failure
        ([(1, 4, 0.6)], 2 * 0.6 * 0.25 / 0.85, 0.6, 0.25),  # over-count: q = 1/4
        ([(4, 2, 0.5)], 2 * 0.5 * 0.5 / 1.0, 0.5, 0.5),  # under-count: q = 2/4
        ([(2, 1, 0.9), (3, 0, 0.0)], 2 * 0.45 * 0.25 / 0.7, 0.45, 0.25),  # one object missing
        (
            [(1, 1, 0.3), (2, 2, 0.7), (5, 1, 0.5)],
            2 * 0.5 * (1 + 1 + 0.2) / 3 / (0.5 + 2.2 / 3),
            0.5,
            2.2 / 3,
        ),
    ],
    ids=["exact", "zero-detections", "over-count", "under-count", "one-missing", "three-objects"],
)
def test_seed_score_equals_hand_computation(objects, score, category, quantity):
    result, category_mean, quantity_mean, _ = seed_score(*slots(*objects))
    assert float(result[0]) == pytest.approx(score)
    assert float(category_mean[0]) == pytest.approx(category)
    assert float(quantity_mean[0]) == pytest.approx(quantity)


@pytest.mark.parametrize(
    "objects, expected",
    [
        ([(2, 2, 0.8)], 1.0),
        ([(3, 0, 0.0)], 0.0),
        ([(1, 4, 0.6)], 0.5),  # present but over-counted
        ([(2, 1, 0.9), (3, 0, 0.0)], 0.25),
        ([(3, 3, 0.9), (4, 2, 0.5)], 0.75),
    ],
    ids=["exact", "zero-detections", "over-count", "one-missing", "one-exact-one-short"],
)
def test_numeracy_score_equals_hand_computation(objects, expected):
    counts, _, requested, mask = slots(*objects)
    assert float(numeracy_score(counts, requested, mask)[0]) == pytest.approx(expected)


def box(x0, y0, x1, y1):
    return np.array([x0, y0, x1, y1], dtype=float)


@pytest.mark.parametrize(
    "a, b, expected",
    [
        (box(0, 0, 10, 10), box(100, 0, 110, 10), {"left of"}),
        (box(100, 0, 110, 10), box(0, 0, 10, 10), {"right of"}),
        (box(0, 0, 10, 10), box(0, 100, 10, 110), {"above"}),
        (box(0, 100, 10, 110), box(0, 0, 10, 10), {"below"}),
        (box(0, 0, 10, 10), box(1, 1, 11, 11), set()),  # within the margin: no relation
        (box(0, 0, 10, 10), box(100, 100, 110, 110), {"left of", "above"}),  # diagonal: both components
    ],
)
def test_relative_position_follows_geneval(a, b, expected):
    assert relative_position(a, b) == expected


DOG, TEDDY, CLOCK = "dog", "teddy bear", "clock"


@pytest.mark.parametrize(
    "parsed, detections, passed",
    [
        (ParsedPrompt("two dogs", (ObjectSpec(DOG, 2),), ()), {DOG: [box(0, 0, 1, 1)] * 2}, True),
        (ParsedPrompt("two dogs", (ObjectSpec(DOG, 2),), ()), {DOG: [box(0, 0, 1, 1)]}, False),
        (ParsedPrompt("a dog", (ObjectSpec(DOG, 1),), ()), {}, False),
        # Counting prompts exclude n + 1: three clocks fail "two clocks".
        (
            ParsedPrompt("two clocks", (ObjectSpec(CLOCK, 2),), (), (ObjectSpec(CLOCK, 3),)),
            {CLOCK: [box(0, 0, 1, 1)] * 3},
            False,
        ),
        (
            ParsedPrompt("two clocks", (ObjectSpec(CLOCK, 2),), (), (ObjectSpec(CLOCK, 3),)),
            {CLOCK: [box(0, 0, 1, 1)] * 2},
            True,
        ),
        (
            ParsedPrompt(
                "dog right of teddy",
                (ObjectSpec(TEDDY, 1), ObjectSpec(DOG, 1, None, Relation("right of", 0))),
                (),
            ),
            {TEDDY: [box(0, 0, 10, 10)], DOG: [box(100, 0, 110, 10)]},
            True,
        ),
        (
            ParsedPrompt(
                "dog right of teddy",
                (ObjectSpec(TEDDY, 1), ObjectSpec(DOG, 1, None, Relation("right of", 0))),
                (),
            ),
            {TEDDY: [box(100, 0, 110, 10)], DOG: [box(0, 0, 10, 10)]},
            False,
        ),
        (
            ParsedPrompt(
                "dog right of teddy",
                (ObjectSpec(TEDDY, 1), ObjectSpec(DOG, 1, None, Relation("right of", 0))),
                (),
            ),
            {DOG: [box(0, 0, 10, 10)]},
            False,
        ),
    ],
    ids=[
        "count-met",
        "count-short",
        "absent",
        "exclude-hit",
        "exclude-clear",
        "position-ok",
        "position-wrong",
        "no-target",
    ],
)
def test_geneval_check_is_strict(parsed, detections, passed):
    verdict, reasons = geneval_check(parsed, detections)
    assert verdict is passed
    assert bool(reasons) is (not passed)
