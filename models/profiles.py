"""Profiles: named sets of thresholds and rules that every entry point applies the same way (HTTP `profile`,
`rewardscope score --profile`, `Scorer(..., profile=...)`). A reward takes from a profile only the keys its
declaration names (RewardDeclaration.profile_keys); explicit per-reward config wins over the profile."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .registry import declaration


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    settings: Mapping[str, Any] = field(default_factory=dict)


PROFILES: Mapping[str, Profile] = MappingProxyType(
    {
        "train": Profile(
            "train",
            "the seed paper's detection thresholds: confidence 0.25, class-aware NMS at IoU 0.45",
            MappingProxyType({"conf_threshold": 0.25, "iou_threshold": 0.45}),
        ),
        "benchmark": Profile(
            "benchmark",
            "GenEval's detection confidence 0.3 (djghosh13/geneval evaluation/evaluate_images.py), NMS at IoU 0.45",
            MappingProxyType({"conf_threshold": 0.3, "iou_threshold": 0.45}),
        ),
    }
)
DEFAULT_PROFILE = "train"


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose from {', '.join(PROFILES)}") from None


def profile_config(profile: str, rewards: Iterable[str]) -> dict[str, dict[str, Any]]:
    """reward name -> the profile's settings for the keys that reward declares (rewards declaring none: {})."""
    settings = get_profile(profile).settings
    return {name: {key: settings[key] for key in declaration(name).profile_keys if key in settings} for name in rewards}


def describe_profiles() -> dict[str, dict[str, Any]]:
    """name -> its settings (what /rewards reports)."""
    return {name: dict(profile.settings) for name, profile in PROFILES.items()}
