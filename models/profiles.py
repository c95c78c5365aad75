"""Profiles: named, versioned sets of rules that every entry point applies the same way (HTTP `profile`,
`rewardscope score --profile`, `Scorer(..., profile=...)`).

A profile's settings are of two kinds:
- flat keys (`conf_threshold`, ...): a reward takes the ones its declaration names (RewardDeclaration.profile_keys);
- a section named after a reward (`"clip": {"model": ..., "prefix": ...}`): that reward takes all of it, models
  included.
Explicit per-reward config wins over the profile, except for a model the profile names (a key in the reward's
declared `model_options`): scoring with the profile's rules on another model would be a number nobody published, so
such a reward answers every item with an error naming the model the profile needs (models/scorer.py).

Each reference profile reproduces a public evaluation's code; docs/profiles.md states its rules, with the source
file and line of each, and the differences that remain (mostly the detector)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .registry import declaration, declarations


@dataclass(frozen=True)
class Profile:
    name: str
    version: int  # raised whenever a setting changes: results name "name@version"
    description: str
    source: str  # the public code it reproduces ("" for our own rules)
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    def for_reward(self, name: str) -> dict[str, Any]:
        """The settings reward `name` takes from this profile: its declared flat keys, then its own section."""
        declared = declaration(name)
        flat = {key: self.settings[key] for key in declared.profile_keys if key in self.settings}
        section = self.settings.get(name.partition(":")[0], {})
        return {**flat, **(section if isinstance(section, Mapping) else {})}


def _frozen(settings: dict[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType({k: MappingProxyType(v) if isinstance(v, dict) else v for k, v in settings.items()})


GENEVAL_SOURCE = "djghosh13/geneval evaluation/evaluate_images.py (commit 16f1681), lines 230-244 and 286-290"
PROFILES: Mapping[str, Profile] = MappingProxyType(
    {
        "train": Profile(
            "train",
            1,
            "rewardscope's training default (our choice, not a published rule): detection confidence 0.25, "
            "class-aware NMS at IoU 0.45",
            "",
            _frozen({"conf_threshold": 0.25, "iou_threshold": 0.45}),
        ),
        "geneval": Profile(
            "geneval",
            1,
            "GenEval's evaluator: confidence 0.3, 0.9 for prompts tagged 'counting', at most 16 detections per "
            "class, no NMS beyond the detector's own, a box counts for every class whose score passes",
            GENEVAL_SOURCE,
            _frozen(
                {
                    "conf_threshold": 0.3,
                    "counting_conf_threshold": 0.9,
                    "max_per_class": 16,
                    "iou_threshold": None,  # None: the detector's own NMS only (docs/profiles.md)
                    "multi_label": True,
                }
            ),
        ),
        "t2i-compbench": Profile(
            "t2i-compbench",
            1,
            "T2I-CompBench's numeracy evaluation: confidence 0.1 (the threshold its UniDet head applies), per-class "
            "NMS at IoU 0.5, same-label duplicates merged when IoU > 0.9 or one box lies more than 0.9 inside "
            "the other",
            "Karine-Huang/T2I-CompBench UniDet_eval/numeracy_eval.py (commit 01835fe) lines 48-66, 120-130, 162-185; "
            "experts/obj_detection/unidet/modeling/roi_heads/unified_roi_heads.py lines 105-112",
            _frozen(
                {
                    "conf_threshold": 0.1,
                    "iou_threshold": 0.5,
                    "containment_threshold": 0.9,
                    "multi_label": True,
                }
            ),
        ),
        "seed-reference": Profile(
            "seed-reference",
            1,
            "the seed paper's code (CQScore): confidence 0.9, no NMS beyond the detector's own, and the "
            "denominators run over every noun of the prompt, the ones the detector cannot see included",
            "kingniu0329/Bridging-Visions CQScore/F1Score.py (commit af364e8) lines 54-112",
            _frozen({"conf_threshold": 0.9, "iou_threshold": None, "denominator": "all_nouns"}),
        ),
        "clipscore": Profile(
            "clipscore",
            1,
            "CLIPScore's code for `clip`: ViT-B/32, captions prefixed 'A photo depicts ', w = 2.5",
            "jmhessel/clipscore clipscore.py (commit d200b56) lines 67-75, 135, 159, 229",
            _frozen({"clip": {"model": "openai/clip-vit-base-patch32", "prefix": "A photo depicts ", "weight": 2.5}}),
        ),
    }
)
# Retired names -> the profile they now are.
ALIASES: Mapping[str, str] = MappingProxyType({"benchmark": "geneval"})
DEFAULT_PROFILE = "train"
PROFILE_NAMES = (*PROFILES, *ALIASES)


def get_profile(name: str) -> Profile:
    """The profile of that name (or alias), or of that label ("geneval@1": the version must be the current one);
    ValueError naming the choices otherwise."""
    base, _, version = name.partition("@")
    try:
        profile = PROFILES[ALIASES.get(base, base)]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose from {', '.join(PROFILE_NAMES)}") from None
    if version and version != str(profile.version):
        raise ValueError(f"profile {profile.name} is at version {profile.version} here, not {version}")
    return profile


def profile_config(profile: str, rewards: Iterable[str]) -> dict[str, dict[str, Any]]:
    """reward name -> the profile's settings for that reward (rewards it sets nothing for: {})."""
    chosen = get_profile(profile)
    return {name: chosen.for_reward(name) for name in rewards}


def describe_profiles() -> dict[str, dict[str, Any]]:
    """name -> its version, description, source, settings, and what it sets for each registered reward (what
    /rewards reports)."""
    described: dict[str, dict[str, Any]] = {}
    for name, profile in PROFILES.items():
        per_reward = {reward: profile.for_reward(reward) for reward in sorted(declarations())}
        described[name] = {
            "version": profile.version,
            "description": profile.description,
            "source": profile.source,
            "settings": {k: dict(v) if isinstance(v, Mapping) else v for k, v in profile.settings.items()},
            "rewards": {reward: settings for reward, settings in per_reward.items() if settings},
        }
    for alias, target in ALIASES.items():
        described[alias] = {"alias_of": target}
    return described
