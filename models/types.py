"""Data passed between the Scorer and the rewards.
A reward gets a batch of Samples and returns one RewardOutput per sample, in the same order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from PIL import Image


@dataclass
class Sample:
    """One (image, prompt) pair, already decoded to an RGB PIL image by the entry point."""

    image: Image.Image
    prompt: str
    metadata: dict[str, Any] | None = None


@dataclass
class RewardOutput:
    """One reward's verdict on one sample: a value, or an error and no value (never a stand-in 0)."""

    value: float | None
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    code: str | None = None  # machine-readable reason when error is set

    def __post_init__(self) -> None:
        if self.value is None and self.error is None:
            raise ValueError("a RewardOutput without a value must say why (error)")


@dataclass
class ScoreResult:
    """What the Scorer returns per item.

    rewards: reward name -> value, None where that reward failed for this item.
    total: weighted sum of the rewards, None unless every requested reward has a value.
    details: reward name -> breakdown (models and versions included).
    error: None when every reward scored; otherwise the per-reward (or decoding) messages.
    error_code: machine-readable code of the first error (e.g. "unsupported_format", "no_countable_object").
    """

    rewards: dict[str, float | None]
    total: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    error_code: str | None = None

    def add_error(self, message: str, code: str) -> None:
        self.error = message if self.error is None else f"{self.error}; {message}"
        self.error_code = self.error_code or code

    def to_dict(self) -> dict[str, Any]:
        return {
            "rewards": self.rewards,
            "total": self.total,
            "details": self.details,
            "error": self.error,
            "error_code": self.error_code,
        }


class Unscorable(ValueError):
    """An item a reward cannot judge (its prompt names nothing to judge, ...): a per-item error with a code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


_Plan = TypeVar("_Plan")


def score_planned(
    samples: list[Sample],
    plan: Callable[[Sample], _Plan],
    score_chunk: Callable[[list[Sample], list[_Plan]], Sequence[RewardOutput]],
    batch_size: int,
    failure_details: Callable[[], dict[str, Any]],
) -> list[RewardOutput]:
    """The batched loop most rewards share: plan each sample (what to ask, which slots), then score the planned
    ones in chunks of batch_size. A sample whose plan raises fails alone, with failure_details() as its details:
    Unscorable keeps its code, ValueError / TypeError (bad metadata from the caller) become "bad_metadata"."""
    outputs: list[RewardOutput | None] = [None] * len(samples)
    plans: dict[int, _Plan] = {}
    for index, sample in enumerate(samples):
        try:
            plans[index] = plan(sample)
        except Unscorable as exc:
            outputs[index] = RewardOutput(None, failure_details(), str(exc), exc.code)
        except (ValueError, TypeError) as exc:
            outputs[index] = RewardOutput(None, failure_details(), str(exc), "bad_metadata")
    ready = sorted(plans)
    for start in range(0, len(ready), batch_size):
        chunk = ready[start : start + batch_size]
        scored = score_chunk([samples[i] for i in chunk], [plans[i] for i in chunk])
        for index, output in zip(chunk, scored, strict=True):
            outputs[index] = output
    return outputs  # type: ignore[return-value]  # every slot is filled: planned and scored, or failed
