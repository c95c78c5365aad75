"""What the HTTP endpoints do, as plain Python: transport decoding, Scorer selection per (rewards, profile),
per-item results with error codes, ranking, the /rewards description and metrics. No BentoML in here."""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from PIL import Image
from rewardscope.models.combine import combine, likelihood_weights, preference_pair, rank_candidates
from rewardscope.models.detection.detector import single_threaded
from rewardscope.models.images import (
    ImageError,
    ImageLimits,
    decode_base64,
    decode_npy,
    decoded_bytes_of_base64,
    load_image,
)
from rewardscope.models.profiles import describe_profiles, get_profile
from rewardscope.models.registry import is_registered, list_rewards
from rewardscope.models.scorer import Scorer
from rewardscope.models.types import ScoreResult

from . import metrics
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
from .settings import ServiceSettings

log = logging.getLogger(__name__)

ScorerKey = tuple[tuple[str, ...], str, str | None]
GroupKey = tuple[tuple[tuple[str, float], ...], str, str | None]  # (weights, profile, matching variant)
Outcome = tuple[ScoreResult, str, dict[str, str]]  # result, profile, model versions


@dataclass
class Prepared:
    """One request item decoded and checked, waiting for the model thread: its Scorer group and image, or the
    outcome it already failed with."""

    endpoint: str
    item: ScoreItem
    key: GroupKey | None
    image: Any
    failed: Outcome | None = None


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
        default = self.scorer(self.default_weights, settings.profile)  # load the models now, not on the first request
        threads = settings.decode_threads or min(4, os.cpu_count() or 1)
        self._decoders = ThreadPoolExecutor(threads, thread_name_prefix="rewardscope-decode")
        # The requested rewards' letterbox resize runs on the decode threads too (a lone request's images are then
        # resized side by side while the model thread waits). Variant scorers share these detectors.
        self._letterbox_hooks = default.letterbox_hooks

    # -- Scorers -----------------------------------------------------------------------------------------
    def resolve_weights(self, rewards: RewardSpec | None) -> dict[str, float]:
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

    def resolve_profile(self, profile: str | None) -> str:
        """The label ("geneval@1") of the profile asked for (aliases resolved), or of the default one."""
        try:
            return get_profile(profile or self.settings.profile).label
        except ValueError as exc:
            raise RequestItemError("unknown_profile", str(exc)) from None

    def scorer(self, weights: dict[str, float], profile: str, variant: str | None = None) -> Scorer:
        """A Scorer for these weights. Cached per (reward names, profile, variant), not per weights: weights come
        from requests, and a cache keyed by them would grow with every distinct value a client sends. Other
        weights get a shallow copy that shares the cached Scorer's loaded rewards; only the total differs."""
        profile = get_profile(profile).label  # "train" and "train@1" are one Scorer
        key: ScorerKey = (tuple(sorted(weights)), profile, variant)
        with self._lock:
            if key not in self._scorers:
                started = time.perf_counter()
                config = self.settings.reward_config(list(weights), pin_models=True)
                if variant is not None:
                    config["matching"] = {**config.get("matching", {}), "variant": variant}
                self._scorers[key] = Scorer(
                    dict(weights),
                    config=config,
                    image_limits=self.limits,
                    observer=metrics.observe_reward,
                    profile=profile,
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

    def warm_single_threaded(self) -> None:
        """Score one small image inside models.single_threaded(), so the one-thread sessions that overlapping
        batches use exist before the first request needs one (making one takes a noticeable fraction of a second).
        No item is counted in the metrics."""
        with single_threaded():
            self.scorer(self.default_weights, self.settings.profile).score([Image.new("RGB", (64, 64))], ["a cat"])

    # -- Items -------------------------------------------------------------------------------------------
    def _image(self, item: ImageInput, rewards: Sequence[str]) -> Any:
        """Transport decoding (base64, .npy), then the one image decoder (models/images.py load_image) ahead of the
        model thread. An image that fails to decode fails its item here (ImageError), decoded once, not again by
        the Scorer."""
        if item.image is not None:
            source = decode_base64(item.image, self.limits)
        else:
            source = decode_npy(decode_base64(item.array or "", self.limits), self.limits)
        image = load_image(source, self.limits)
        for prepare in self._letterbox_hooks(rewards):
            prepare(image)
        return image

    def decoded_sizes(self, items: Sequence[ImageInput]) -> list[int]:
        """Each item's decoded RGB bytes, from its image header (0 where the transport or header is unreadable: such
        an item fails in prepare without decoding). What the decoded-pixel budget counts, before decoding."""
        return [
            decoded_bytes_of_base64(item.image, npy=False)
            if item.image is not None
            else decoded_bytes_of_base64(item.array or "", npy=True)
            for item in items
        ]

    def _prepare_one(self, item: ScoreItem, variant: str | None, endpoint: str) -> Prepared:
        profile = item.profile or self.settings.profile
        weights = self.default_weights if variant is None else {"matching": 1.0}
        try:
            profile = self.resolve_profile(item.profile)
            if variant is None:
                weights = self.resolve_weights(item.rewards)
            image = self._image(item, list(weights))
        except (RequestItemError, ImageError) as exc:
            failed = ScoreResult(rewards={name: None for name in weights})
            failed.add_error(str(exc), exc.code)
            return Prepared(endpoint, item, None, None, (failed, profile, {}))
        return Prepared(endpoint, item, (tuple(sorted(weights.items())), profile, variant), image)

    def prepare(
        self, items: Sequence[ScoreItem], variants: Sequence[str | None] | None = None, endpoint: str = "score"
    ) -> list[Prepared]:
        """Transport and image decoding of a request's items, on the decode threads (PIL and the letterbox resize
        release the GIL, so they run beside each other and beside the model thread). Never raises for one item."""
        variants = variants if variants is not None else [None] * len(items)
        if len(items) == 1:
            return [self._prepare_one(items[0], variants[0], endpoint)]
        return list(self._decoders.map(self._prepare_one, items, variants, [endpoint] * len(items)))

    def run(self, prepared: Sequence[Prepared]) -> list[Outcome]:
        """Score prepared items (of any endpoints) grouped by (rewards, profile, variant); per item: result,
        profile, versions. This is what the model thread runs."""
        by_endpoint = Counter(entry.endpoint for entry in prepared)
        for endpoint, count in by_endpoint.items():
            metrics.BATCH_SIZE.labels(endpoint=endpoint).observe(count)
        out: list[Outcome | None] = [entry.failed for entry in prepared]
        groups: dict[GroupKey, list[int]] = {}
        for index, entry in enumerate(prepared):
            if entry.key is not None:
                groups.setdefault(entry.key, []).append(index)
        for (weights, profile, variant), members in groups.items():
            scorer = self.scorer(dict(weights), profile, variant)
            results = scorer.score(
                [prepared[index].image for index in members],
                [prepared[index].item.prompt for index in members],
                [prepared[index].item.metadata for index in members],
            )
            versions = scorer.versions()
            for index, result in zip(members, results, strict=True):
                out[index] = (result, profile, versions)
        for endpoint, count in by_endpoint.items():
            metrics.ITEMS.labels(endpoint=endpoint).inc(count)
        for result, _, _ in out:  # type: ignore[misc]
            if result.error_code:
                metrics.ERRORS.labels(code=result.error_code).inc()
            for name, value in result.rewards.items():
                if value is not None:
                    metrics.REWARD_VALUE.labels(reward=name).observe(value)
        return out  # type: ignore[return-value]

    @staticmethod
    def score_answers(outcomes: Sequence[Outcome]) -> list[ItemResult]:
        return [
            ItemResult(**result.to_dict(), profile=profile, versions=versions) for result, profile, versions in outcomes
        ]

    @staticmethod
    def match_answers(items: Sequence[MatchItem], outcomes: Sequence[Outcome]) -> list[MatchResult]:
        return [
            MatchResult(
                score=result.rewards.get("matching"),
                variant=item.variant,
                details=result.details.get("matching", {}),
                error=result.error,
                error_code=result.error_code,
                profile=profile,
                versions=versions,
            )
            for item, (result, profile, versions) in zip(items, outcomes, strict=True)
        ]

    def score(self, items: Sequence[ScoreItem]) -> list[ItemResult]:
        """/score in one call (decode, then score on the calling thread); the service batches across requests."""
        return self.score_answers(self.run(self.prepare(items)))

    def match(self, items: Sequence[MatchItem]) -> list[MatchResult]:
        variants = [item.variant for item in items]
        return self.match_answers(items, self.run(self.prepare(items, variants, "match")))

    def rank(
        self,
        groups: Sequence[RankGroup],
        rewards: RewardSpec | None,
        profile: str | None,
        options: RankOptions | None = None,
    ) -> list[RankResult]:
        """Score every candidate, combine the rewards per group (default: the weighted total), order them and
        pick chosen/rejected; with options.margin set, a pair closer than the margin (or a tie) is not chosen."""
        return self.rank_answers(groups, self.score(self.rank_items(groups, rewards, profile)), rewards, options)

    @staticmethod
    def rank_items(groups: Sequence[RankGroup], rewards: RewardSpec | None, profile: str | None) -> list[ScoreItem]:
        """Every candidate of every group as a /score item."""
        return [
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

    def rank_answers(
        self,
        groups: Sequence[RankGroup],
        scored: Sequence[ItemResult],
        rewards: RewardSpec | None,
        options: RankOptions | None = None,
    ) -> list[RankResult]:
        options = options or RankOptions()
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
            weights = self.resolve_weights(rewards)
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
            "profiles": describe_profiles(),
            "default_profile": get_profile(self.settings.profile).label,
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
