"""Data passed between the Scorer and the rewards.
A reward gets a batch of Samples and returns one RewardOutput per sample, in the same order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
