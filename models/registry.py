"""Reward registry: each reward registers under a name with its declaration; create_reward builds it from config.
Modelled on timm's registry and PretrainedCfg: listing what exists and building one by name are one call each, and
what a reward is (range, direction, scale, differentiable, which profile keys and whether it takes a detector) is
a dataclass, read by /rewards, the gradient path, profiles and the service instead of name lists.

Rewards are discovered, not listed: every module of the rewardscope.models package is imported on first use (a new
reward is one new file), and so is every `rewardscope.rewards` entry point of installed distributions (rewards
that live in other packages)."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .types import RewardOutput, Sample

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "rewardscope.rewards"


@dataclass(frozen=True)
class RewardDeclaration:
    """What a registered reward is, independent of the weights it loads (its instance's `version` names those).

    range: (low, high) of its values, None where unbounded. scale: what one unit means. profile_keys: the
    settings a profile supplies to it (models/profiles.py). uses_detector: it takes the `detector` option (a
    path, or None for the embedded detector). variant: the /match variant it is (matching family). argument:
    what "name:argument" passes, for parameterised rewards (e.g. "feedback:/runs/head"). model_options: (option,
    default) pairs of the options that choose its weights."""

    name: str
    summary: str
    range: tuple[float | None, float | None]
    scale: str
    direction: str = "higher is better"
    differentiable: bool = False
    profile_keys: tuple[str, ...] = ()
    uses_detector: bool = False
    variant: str | None = None
    argument: str | None = None
    # Options that choose weights, with their defaults: a profile that names one of these is about that model only.
    model_options: tuple[tuple[str, Any], ...] = ()

    def describe(self) -> dict[str, Any]:
        return {
            "summary": self.summary,
            "range": list(self.range),
            "direction": self.direction,
            "scale": self.scale,
            "differentiable": self.differentiable,
            "profile_keys": list(self.profile_keys),
            "uses_detector": self.uses_detector,
            "model_options": dict(self.model_options),
        }


class Reward(Protocol):
    name: str
    version: str

    def score(self, samples: list[Sample]) -> list[RewardOutput]: ...

    def describe(self) -> dict[str, Any]: ...


_REGISTRY: dict[str, tuple[Callable[..., Reward], RewardDeclaration]] = {}
# Re-entrant: a module imported during discovery may itself ask the registry (list_rewards, declaration).
_DISCOVERY_LOCK = threading.RLock()
_discovered = False
_DISCOVERING: list[bool] = []  # non-empty while this thread imports the reward modules


def register_reward(declaration: RewardDeclaration) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Class/factory decorator: make `declaration.name` buildable through create_reward."""

    def decorate(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if declaration.name in _REGISTRY:
            raise ValueError(f"reward {declaration.name!r} is registered twice")
        _REGISTRY[declaration.name] = (factory, declaration)
        return factory

    return decorate


def _package_modules(package: str) -> list[str]:
    """Dotted names of every module under `package`, subfolders included (they are namespace packages, which
    pkgutil does not walk), in a stable order."""
    names = []
    for root in importlib.import_module(package).__path__:
        for path in sorted(Path(root).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if not any(part.startswith(("_", ".")) for part in parts):
                names.append(".".join((package, *parts)))
    return sorted(set(names))


def _discover() -> None:
    """Import every module of rewardscope.models (their @register_reward decorators run on import) and every
    `rewardscope.rewards` entry point, once."""
    global _discovered
    if _discovered:
        return
    with _DISCOVERY_LOCK:
        if _discovered or _DISCOVERING:
            return
        _DISCOVERING.append(True)
        try:
            _import_rewards()
        finally:
            _DISCOVERING.clear()
        _discovered = True


def _import_rewards() -> None:
    for name in _package_modules(__package__):
        importlib.import_module(name)
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry_point.load()
        except Exception:  # one broken plugin must not take the built-in rewards down
            log.exception("reward entry point %s failed to load", entry_point.value)


def split_reward_name(name: str) -> tuple[str, str | None]:
    """ "feedback:/runs/head" -> ("feedback", "/runs/head"): a registered name plus one positional argument
    (a model directory); a plain registered name -> (name, None)."""
    base, separator, argument = name.partition(":")
    return (base, argument) if separator and argument else (name, None)


def list_rewards() -> list[str]:
    """Registered names; a parameterised reward is used as "name:argument" (e.g. "feedback:/runs/head")."""
    _discover()
    return sorted(_REGISTRY)


def is_registered(name: str) -> bool:
    """Whether create_reward can build `name`, plain or parameterised."""
    _discover()
    return name in _REGISTRY or split_reward_name(name)[0] in _REGISTRY


def declaration(name: str) -> RewardDeclaration:
    """The declaration of a registered reward, plain or parameterised ("feedback:/dir" -> feedback's)."""
    _discover()
    base = name if name in _REGISTRY else split_reward_name(name)[0]
    try:
        return _REGISTRY[base][1]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def declarations() -> dict[str, RewardDeclaration]:
    """Every registered reward's declaration, by name."""
    _discover()
    return {name: entry[1] for name, entry in sorted(_REGISTRY.items())}


def matching_variants() -> dict[str, str]:
    """/match variant -> the registered reward that scores it: the one list of variants (schema, CLI, engine)."""
    _discover()
    return {entry[1].variant: name for name, entry in _REGISTRY.items() if entry[1].variant is not None}


def create_reward(name: str, **config: Any) -> Reward:
    """Build the reward registered as `name` with its config (defaults run offline). "name:argument" passes
    the argument as the factory's first positional parameter: create_reward("feedback:/runs/head")."""
    _discover()
    base, argument = (name, None) if name in _REGISTRY else split_reward_name(name)
    try:
        factory = _REGISTRY[base][0]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None
    return factory(**config) if argument is None else factory(argument, **config)
