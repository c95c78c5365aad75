"""Combining rewards: ranking candidates of one prompt and picking best/worst as DPO pairs.
Failed candidates (None) are left out of a ranking, never counted as a low score."""

from __future__ import annotations

from collections.abc import Sequence


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
