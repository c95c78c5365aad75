"""What the HTTP endpoints do, as plain Python: transport decoding, Scorer selection per (rewards, profile),
per-item results with error codes, ranking, the /rewards description and metrics. No BentoML in here."""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from models import Scorer, list_rewards
from models.combine import combine, likelihood_weights, preference_pair, rank_candidates
from models.registry import is_registered
from models.types import ScoreResult

from . import metrics
from .images import ImageError, ImageLimits, decode_base64, decode_npy
from .schemas import (
    ImageInput,
    ItemResult,
    MatchItem,
    MatchResult,
    RankGroup,
    RankOptions,
    RankResult,
    RewardSpec,
    ScoreItem,
)
from .settings import PROFILES, ServiceSettings

log = logging.getLogger(__name__)

ScorerKey = tuple[tuple[str, ...], str, str | None]


class RequestItemError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class RewardEngine:
    """Loads the configured rewards once and serves every endpoint from Scorers that share those models."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.limits = ImageLimits(max_pixels=settings.max_pixels)
        self._scorers: dict[ScorerKey, Scorer] = {}
        self._lock = threading.Lock()
        for name in settings.rewards:
            if not is_registered(name):
                raise ValueError(f"configured reward {name!r} is not registered; available: {list_rewards()}")
        self.default_weights = {name: 1.0 for name in settings.rewards}
        self.scorer(self.default_weights, settings.profile)  # load the models now, not on the first request

    # -- Scorers -----------------------------------------------------------------------------------------
    def _weights(self, rewards: RewardSpec | None) -> dict[str, float]:
        if rewards is None:
            return dict(self.default_weights)
        weights = dict(rewards) if isinstance(rewards, Mapping) else {name: 1.0 for name in rewards}
        if not weights:
            raise RequestItemError("unknown_reward", "rewards is empty")
        unknown = sorted(set(weights) - set(self.settings.rewards))
        if unknown:
            raise RequestItemError(
                "unknown_reward", f"reward(s) {', '.join(unknown)} not served here; served: {self.settings.rewards}"
            )
        return weights

    def _profile(self, profile: str | None) -> str:
        profile = profile or self.settings.profile
        if profile not in PROFILES:
            raise RequestItemError("unknown_profile", f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
        return profile

    def scorer(self, weights: dict[str, float], profile: str, variant: str | None = None) -> Scorer:
        """A Scorer for these weights. Cached per (reward names, profile, variant), not per weights: weights come
        from requests, and a cache keyed by them would grow with every distinct value a client sends. Other
        weights get a shallow copy that shares the cached Scorer's loaded rewards; only the total differs."""
        key: ScorerKey = (tuple(sorted(weights)), profile, variant)
        with self._lock:
            if key not in self._scorers:
                started = time.perf_counter()
                config = self.settings.reward_config(list(weights), profile)
                if variant is not None:
                    config["matching"] = {**config.get("matching", {}), "variant": variant}
                self._scorers[key] = Scorer(
                    dict(weights), config=config, image_limits=self.limits, observer=metrics.observe_reward
                )
                seconds = time.perf_counter() - started
                metrics.MODEL_LOAD.labels(rewards=",".join(sorted(weights))).set(seconds)
                log.info("loaded scorer %s (profile %s) in %.2fs", dict(weights), profile, seconds)
            cached = self._scorers[key]
        if cached.weights == weights:
            return cached
        weighted = copy.copy(cached)
        weighted.weights = dict(weights)
        return weighted

    # -- Items -------------------------------------------------------------------------------------------
    def _image(self, item: ImageInput) -> Any:
        """Transport decoding only (base64, .npy); the Scorer's one image decoder does the rest."""
        if item.image is not None:
            return decode_base64(item.image, self.limits)
        return decode_npy(decode_base64(item.array or "", self.limits), self.limits)

    def _run(
        self, endpoint: str, items: Sequence[ScoreItem], variants: Sequence[str | None]
    ) -> list[tuple[ScoreResult, str, dict[str, str]]]:
        """Score items grouped by (rewards, profile, variant); per item: result, profile, versions."""
        metrics.BATCH_SIZE.labels(endpoint=endpoint).observe(len(items))
        out: list[tuple[ScoreResult, str, dict[str, str]] | None] = [None] * len(items)
        groups: dict[tuple[tuple[tuple[str, float], ...], str, str | None], list[tuple[int, Any]]] = {}
        for index, (item, variant) in enumerate(zip(items, variants, strict=True)):
            profile = item.profile or self.settings.profile
            weights = self.default_weights if variant is None else {"matching": 1.0}
            try:
                profile = self._profile(item.profile)
                if variant is None:
                    weights = self._weights(item.rewards)
                image = self._image(item)
            except (RequestItemError, ImageError) as exc:
                failed = ScoreResult(rewards={name: None for name in weights})
                failed.add_error(str(exc), exc.code)
                out[index] = (failed, profile, {})
                continue
            group = (tuple(sorted(weights.items())), profile, variant)
            groups.setdefault(group, []).append((index, image))
        for (weights, profile, variant), members in groups.items():
            scorer = self.scorer(dict(weights), profile, variant)
            results = scorer.score(
                [image for _, image in members],
                [items[index].prompt for index, _ in members],
                [items[index].metadata for index, _ in members],
            )
            versions = scorer.versions()
            for (index, _), result in zip(members, results, strict=True):
                out[index] = (result, profile, versions)
        metrics.ITEMS.labels(endpoint=endpoint).inc(len(items))
        for result, _, _ in out:  # type: ignore[misc]
            if result.error_code:
                metrics.ERRORS.labels(code=result.error_code).inc()
            for name, value in result.rewards.items():
                if value is not None:
                    metrics.REWARD_VALUE.labels(reward=name).observe(value)
        return out  # type: ignore[return-value]

    def score(self, items: Sequence[ScoreItem]) -> list[ItemResult]:
        return [
            ItemResult(**result.to_dict(), profile=profile, versions=versions)
            for result, profile, versions in self._run("score", items, [None] * len(items))
        ]

    def match(self, items: Sequence[MatchItem]) -> list[MatchResult]:
        answers = []
        for item, (result, profile, versions) in zip(
            items, self._run("match", items, [item.variant for item in items]), strict=True
        ):
            answers.append(
                MatchResult(
                    score=result.rewards.get("matching"),
                    variant=item.variant,
                    details=result.details.get("matching", {}),
                    error=result.error,
                    error_code=result.error_code,
                    profile=profile,
                    versions=versions,
                )
            )
        return answers

    def rank(
        self,
        groups: Sequence[RankGroup],
        rewards: RewardSpec | None,
        profile: str | None,
        options: RankOptions | None = None,
    ) -> list[RankResult]:
        """Score every candidate, combine the rewards per group (default: the weighted total), order them and
        pick chosen/rejected; with options.margin set, a pair closer than the margin (or a tie) is not chosen."""
        options = options or RankOptions()
        flat = [
            ScoreItem(
                image=candidate.image,
                array=candidate.array,
                prompt=group.prompt,
                metadata=group.metadata,
                rewards=rewards,
                profile=profile,
            )
            for group in groups
            for candidate in group.candidates
        ]
        scored = self.score(flat)
        answers, start = [], 0
        for group in groups:
            members = scored[start : start + len(group.candidates)]
            start += len(group.candidates)
            scores = self._combined(members, rewards, options)
            order, chosen, rejected = rank_candidates(scores)
            if options.margin is not None:
                pair = preference_pair(scores, options.margin)
                chosen, rejected = (pair.chosen, pair.rejected) if pair else (None, None)
            weights = None
            if options.likelihood_weights is not None:
                weights = likelihood_weights(scores, options.likelihood_weights, options.temperature)
            answers.append(
                RankResult(
                    scores=scores,
                    order=order,
                    chosen=chosen,
                    rejected=rejected,
                    candidates=members,
                    weights=weights,
                    normalization=options.normalization,
                    aggregation=options.aggregation,
                )
            )
        return answers

    def _combined(
        self, members: Sequence[ItemResult], rewards: RewardSpec | None, options: RankOptions
    ) -> list[float | None]:
        totals = [member.total for member in members]
        if options.normalization == "none" and options.aggregation == "weighted_sum":
            return totals  # the Scorer's weighted total, exactly
        try:
            weights = self._weights(rewards)
        except RequestItemError:
            return [None] * len(members)  # every candidate already carries the error
        values = {name: [member.rewards.get(name) for member in members] for name in weights}
        return combine(values, weights, options.normalization, options.aggregation)

    # -- Description ---------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        scorer = self.scorer(self.default_weights, self.settings.profile)
        return {
            "rewards": scorer.describe(),
            "default_rewards": list(self.default_weights),
            "profiles": PROFILES,
            "default_profile": self.settings.profile,
            "limits": {
                "max_items": self.settings.max_items,
                "max_request_bytes": self.settings.max_request_bytes,
                "max_pixels": self.limits.max_pixels,
                "formats": list(self.limits.formats),
            },
            "batching": {
                "max_batch_size": self.settings.max_batch_size,
                "max_latency_ms": self.settings.max_latency_ms,
            },
        }
