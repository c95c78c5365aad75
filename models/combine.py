"""Combining rewards: per-batch normalisation, weighted sums and rank aggregation, reward-weighted-likelihood
weights, and picking best/worst candidates of one prompt as DPO pairs.
Failed items (None) are left out of every statistic and ranking and get None, never counted as a low score."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

NORMALIZATIONS = ("none", "zscore", "rank")
AGGREGATIONS = ("weighted_sum", "rank_sum")
LIKELIHOOD_WEIGHTINGS = ("softmax", "minmax")


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ascending ranks (1 = smallest); tied values share the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda index: values[index])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def normalize(values: Sequence[float | None], method: str = "none") -> list[float | None]:
    """Normalise one reward over a batch; statistics use the scored items only and None stays None.

    none: unchanged. zscore: (v - mean) / std (population std; all equal -> 0). rank: average rank scaled to
    [0, 1] (0 worst, 1 best, ties share; a single scored item -> 0.5).
    """
    if method not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {method!r}; choose from {', '.join(NORMALIZATIONS)}")
    scored = [index for index, value in enumerate(values) if value is not None]
    present = [float(values[index]) for index in scored]  # type: ignore[arg-type]
    out: list[float | None] = [None] * len(values)
    if method == "none":
        transformed = present
    elif method == "zscore":
        mean = math.fsum(present) / len(present) if present else 0.0
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in present) / len(present)) if present else 0.0
        transformed = [(v - mean) / std if std > 0 else 0.0 for v in present]
    else:
        ranks = average_ranks(present)
        transformed = [(r - 1) / (len(present) - 1) if len(present) > 1 else 0.5 for r in ranks]
    for index, value in zip(scored, transformed, strict=True):
        out[index] = value
    return out


def combine(
    rewards: Mapping[str, Sequence[float | None]],
    weights: Mapping[str, float] | None = None,
    normalization: str = "none",
    aggregation: str = "weighted_sum",
) -> list[float | None]:
    """Per-item combined reward for one batch (e.g. the N candidates of a prompt).

    rewards: name -> [N] values (None where that reward failed); weights: name -> weight (default 1 each).
    weighted_sum: sum of weight * normalised value (AGFSync). rank_sum: sum of weight * average rank within the
    batch, 1 = worst (FineRewards); ranks ignore `normalization`, which cannot change them.
    An item missing any reward gets None and is left out of every reward's statistics and ranks, so the
    combined values of the others do not depend on it. Higher is better, as for every reward served here.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose from {', '.join(AGGREGATIONS)}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; choose from {', '.join(NORMALIZATIONS)}")
    names = list(rewards)
    weights = {name: 1.0 for name in names} if weights is None else dict(weights)
    if set(weights) != set(names):
        raise ValueError(f"weights name {sorted(weights)}, rewards name {sorted(names)}: they must match")
    lengths = {len(values) for values in rewards.values()}
    if len(lengths) > 1:
        raise ValueError(f"rewards have different lengths {sorted(lengths)}")
    size = lengths.pop() if lengths else 0
    complete = [i for i in range(size) if all(rewards[name][i] is not None for name in names)]
    combined: list[float | None] = [None] * size
    if not complete or not names:
        return combined
    totals = [0.0] * len(complete)
    for name in names:
        values = [float(rewards[name][i]) for i in complete]  # type: ignore[arg-type]
        if aggregation == "rank_sum":
            per_item = average_ranks(values)
        else:
            per_item = normalize(values, normalization)  # type: ignore[assignment]
        for position, value in enumerate(per_item):
            totals[position] += weights[name] * value  # type: ignore[operator]
    for index, total in zip(complete, totals, strict=True):
        combined[index] = total
    return combined


def likelihood_weights(
    scores: Sequence[float | None], method: str = "softmax", temperature: float = 1.0
) -> list[float | None]:
    """Per-sample weights for reward-weighted likelihood training (Lee et al. 2023), None where unscored.

    softmax: exp(s / T) / sum over scored items (weights sum to 1; small T sharpens towards the best).
    minmax: (s - min) / (max - min) in [0, 1]; all equal -> 1 each.
    """
    if method not in LIKELIHOOD_WEIGHTINGS:
        raise ValueError(f"unknown weighting {method!r}; choose from {', '.join(LIKELIHOOD_WEIGHTINGS)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scored = [index for index, score in enumerate(scores) if score is not None]
    out: list[float | None] = [None] * len(scores)
    if not scored:
        return out
    values = [float(scores[index]) for index in scored]  # type: ignore[arg-type]
    if method == "softmax":
        top = max(values)
        exps = [math.exp((v - top) / temperature) for v in values]
        total = math.fsum(exps)
        weights = [e / total for e in exps]
    else:
        low, high = min(values), max(values)
        weights = [(v - low) / (high - low) if high > low else 1.0 for v in values]
    for index, weight in zip(scored, weights, strict=True):
        out[index] = weight
    return out


def rank_candidates(scores: Sequence[float | None]) -> tuple[list[int], int | None, int | None]:
    """Scores of N candidates -> (order best first, chosen, rejected).

    Ties keep the lower index first, so the order is deterministic; None scores are not ranked.
    chosen/rejected are None unless at least two candidates scored.
    """
    scored = [index for index, score in enumerate(scores) if score is not None]
    order = sorted(scored, key=lambda index: (-scores[index], index))  # type: ignore[operator]
    if len(order) < 2:
        return order, None, None
    return order, order[0], order[-1]


@dataclass(frozen=True)
class PreferencePair:
    """A DPO pair among N candidates: indices of the best and worst, and the score gap between them."""

    chosen: int
    rejected: int
    margin: float


def preference_pair(scores: Sequence[float | None], margin: float = 0.0) -> PreferencePair | None:
    """Best vs worst candidate (AGFSync's pair), or None when fewer than two scored, the gap is below `margin`
    (a near-tie that would teach nothing), or all scored candidates tie. Ties rank the lower index first."""
    _, chosen, rejected = rank_candidates(scores)
    if chosen is None or rejected is None:
        return None
    gap = float(scores[chosen]) - float(scores[rejected])  # type: ignore[arg-type]
    if gap <= 0 or gap < margin:
        return None
    return PreferencePair(chosen, rejected, gap)
