"""Plain-Python oracles shared by the kernel and matching tests."""

from __future__ import annotations

import itertools


def brute_force_pmf(probabilities: list[float]) -> list[float]:
    """Distribution of the number of successes of independent Bernoulli trials, by enumerating outcomes."""
    pmf = [0.0] * (len(probabilities) + 1)
    for outcome in itertools.product([0, 1], repeat=len(probabilities)):
        weight = 1.0
        for hit, p in zip(outcome, probabilities, strict=True):
            weight *= p if hit else 1 - p
        pmf[sum(outcome)] += weight
    return pmf
