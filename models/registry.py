"""Reward registry: each reward class registers under a name; create_reward builds it from config.
Modelled on timm's registry: listing what exists and building one by name are one call each."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

from .types import RewardOutput, Sample


class Reward(Protocol):
    name: str
    version: str

    def score(self, samples: list[Sample]) -> list[RewardOutput]: ...

    def describe(self) -> dict[str, Any]: ...


_REGISTRY: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Class/factory decorator: make `name` buildable through create_reward."""

    def decorate(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorate


# Modules whose import registers built-in rewards (their @register_reward decorators run on import).
BUILTIN_REWARD_MODULES = (
    "rewardscope.models.detection.matching",
    "rewardscope.models.preference",
    "rewardscope.models.feedback",
    "rewardscope.models.caption",
    "rewardscope.models.vqa",
    "rewardscope.models.plausibility",
)


def _load_builtin_rewards() -> None:
    for module in BUILTIN_REWARD_MODULES:
        importlib.import_module(module)


def split_reward_name(name: str) -> tuple[str, str | None]:
    """ "feedback:/runs/head" -> ("feedback", "/runs/head"): a registered name plus one positional argument
    (a model directory); a plain registered name -> (name, None)."""
    base, separator, argument = name.partition(":")
    return (base, argument) if separator and argument else (name, None)


def list_rewards() -> list[str]:
    """Registered names; a parameterised reward is used as "name:argument" (e.g. "feedback:/runs/head")."""
    _load_builtin_rewards()
    return sorted(_REGISTRY)


def is_registered(name: str) -> bool:
    """Whether create_reward can build `name`, plain or parameterised."""
    _load_builtin_rewards()
    return name in _REGISTRY or split_reward_name(name)[0] in _REGISTRY


def create_reward(name: str, **config: Any) -> Reward:
    """Build the reward registered as `name` with its config (defaults run offline). "name:argument" passes
    the argument as the factory's first positional parameter: create_reward("feedback:/runs/head")."""
    _load_builtin_rewards()
    base, argument = (name, None) if name in _REGISTRY else split_reward_name(name)
    try:
        factory = _REGISTRY[base]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None
    return factory(**config) if argument is None else factory(argument, **config)
