"""Scorer: the one entry point the service, the CLI and the Python API call.
Decodes images once, runs each requested reward over the batch and combines them with weights."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .images import DEFAULT_LIMITS, ImageError, ImageLimits, load_image
from .profiles import get_profile
from .prompt import MAX_PROMPT_CHARS
from .registry import Reward, create_reward, declaration
from .types import RewardOutput, Sample, ScoreResult

log = logging.getLogger(__name__)


def _model_conflict(name: str, profile: Any, defaults: Mapping[str, Any], explicit: Mapping[str, Any]) -> str | None:
    """Why `name` cannot follow this profile: the profile names a model (a declared model option) and the explicit
    config chose another. None when there is no conflict."""
    for option, _ in declaration(name).model_options:
        if option in defaults and option in explicit and explicit[option] != defaults[option]:
            return (
                f"profile {profile.label} scores {name} with {option}={defaults[option]!r}, which is not loaded "
                f"here ({option}={explicit[option]!r}): load that model to use this profile"
            )
    return None


class UnavailableReward:
    """A reward the profile asks for on a model that is not loaded: every item gets the error, never a number."""

    def __init__(self, name: str, message: str) -> None:
        self.name, self.message, self.version = name, message, "unavailable"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "unavailable": self.message}

    def score(self, samples: list[Sample]) -> list[RewardOutput]:
        return [RewardOutput(None, {}, self.message, "profile_model_unavailable") for _ in samples]


class Scorer:
    """Score (image, prompt) pairs with a set of rewards.

    rewards: names (weight 1 each) or {name: weight}; config: {name: keyword arguments of that reward}.
    Models load once, here. score() never raises for one bad item: that item gets an error instead.
    observer(reward name, seconds, items) is called after each reward's batch (metrics hook).
    """

    def __init__(
        self,
        rewards: Sequence[str] | Mapping[str, float] = ("matching",),
        config: Mapping[str, Mapping[str, Any]] | None = None,
        image_limits: ImageLimits = DEFAULT_LIMITS,
        observer: Callable[[str, float, int], None] | None = None,
        profile: str | None = None,
    ) -> None:
        if isinstance(rewards, str):
            rewards = [rewards]
        self.weights = dict(rewards) if isinstance(rewards, Mapping) else {name: 1.0 for name in rewards}
        if not self.weights:
            raise ValueError("a Scorer needs at least one reward")
        config = config or {}
        # profile: its settings for each reward, under the reward's explicit config (models/profiles.py)
        chosen = get_profile(profile) if profile is not None else None
        self.profile = chosen.label if chosen is not None else None
        self.rewards: dict[str, Reward] = {}
        for name in self.weights:
            explicit = dict(config.get(name, {}))
            defaults = chosen.for_reward(name) if chosen is not None else {}
            missing = _model_conflict(name, chosen, defaults, explicit)
            if missing is not None:
                self.rewards[name] = UnavailableReward(name, missing)
            else:
                self.rewards[name] = create_reward(name, **{**defaults, **explicit})
        self.image_limits = image_limits
        self.observer = observer

    def describe(self) -> dict[str, Any]:
        """Per reward: its declaration, then what the loaded instance says of itself (models, params), its weight."""
        return {
            name: {**declaration(name).describe(), **reward.describe(), "weight": self.weights[name]}
            for name, reward in self.rewards.items()
        }

    def versions(self) -> dict[str, str]:
        return {name: reward.version for name, reward in self.rewards.items()}

    def letterbox_hooks(self, names: Iterable[str] | None = None) -> list[Callable[[Any], None]]:
        """The letterbox resize (each detector's prepare) of the rewards named (default: all), once per detector
        however many rewards share it: a pipeline runs them ahead on its decode workers so the batch skips it."""
        hooks: dict[int, Callable[[Any], None]] = {}
        for name in self.rewards if names is None else names:
            detector = getattr(self.rewards.get(name), "detector", None)
            if hasattr(detector, "prepare"):
                hooks.setdefault(id(detector), detector.prepare)
        return list(hooks.values())

    def _decode(self, image: Any, prompt: Any, metadata: Any) -> Sample:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise ValueError(f"metadata must be a mapping, got {type(metadata).__name__}")
        return Sample(load_image(image, self.image_limits), prompt, dict(metadata) if metadata else None)

    def _run_reward(self, name: str, reward: Reward, samples: list[Sample]) -> list[RewardOutput]:
        """Score a batch; if the batch as a whole fails, score item by item so one bad item fails alone."""
        try:
            return reward.score(samples)
        except Exception:
            log.exception("reward %s failed on a batch of %d; retrying item by item", name, len(samples))
        outputs = []
        for sample in samples:
            try:
                outputs.extend(reward.score([sample]))
            except Exception as exc:
                outputs.append(RewardOutput(None, {}, f"{type(exc).__name__}: {exc}", "reward_failed"))
        return outputs

    def score(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> list[ScoreResult]:
        """images: PIL images, uint8 HWC arrays, encoded bytes or file paths; one prompt (and metadata) each.
        Returns one ScoreResult per item, in order."""
        if len(images) != len(prompts) or (metadata is not None and len(metadata) != len(images)):
            raise ValueError(
                f"got {len(images)} images, {len(prompts)} prompts"
                + ("" if metadata is None else f" and {len(metadata)} metadata entries")
            )
        metadata = metadata if metadata is not None else [None] * len(images)
        results = [ScoreResult(rewards={name: None for name in self.weights}) for _ in images]
        samples: list[Sample] = []
        positions: list[int] = []
        for index, (image, prompt, meta) in enumerate(zip(images, prompts, metadata, strict=True)):
            try:
                samples.append(self._decode(image, prompt, meta))
                positions.append(index)
            except ImageError as exc:
                results[index].add_error(f"image ({exc.code}): {exc}", exc.code)
            except ValueError as exc:
                results[index].add_error(str(exc), "invalid_item")

        for name, reward in self.rewards.items():
            if not samples:
                break
            started = time.perf_counter()
            outputs = self._run_reward(name, reward, samples)
            if self.observer is not None:
                self.observer(name, time.perf_counter() - started, len(samples))
            for position, output in zip(positions, outputs, strict=True):
                result = results[position]
                result.rewards[name] = output.value
                result.details[name] = {**output.details, "version": reward.version}
                if output.error:
                    result.add_error(f"{name}: {output.error}", output.code or "reward_failed")
        for result in results:
            values = result.rewards.values()
            if all(value is not None for value in values):
                result.total = sum(self.weights[name] * value for name, value in result.rewards.items())
        return results
