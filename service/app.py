"""RewardService: the BentoML service. Loads the models once in __init__, one method per endpoint;
the work itself lives in service/engine.py. Configure with REWARDSCOPE_* environment variables."""

from __future__ import annotations

import base64
import functools
import gc
import json
import logging
from collections.abc import Sequence
from typing import Annotated

import bentoml
from bentoml.exceptions import ServiceUnavailable
from pydantic import Field, ValidationError
from rewardscope.models.detection.detector import single_threaded
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from . import metrics
from .batching import Batcher, Overloaded
from .engine import Outcome, RewardEngine
from .golden import check
from .gradients import GradientEngine, GradItem, GradResult
from .guard import GuardMiddleware
from .schemas import ItemResult, MatchItem, MatchResult, RankGroup, RankOptions, RankResult, RewardSpec, ScoreItem
from .settings import ServiceSettings

log = logging.getLogger("rewardscope.service")
SETTINGS = ServiceSettings.from_env()

Items = Annotated[list[ScoreItem], Field(max_length=SETTINGS.max_items)]
MatchItems = Annotated[list[MatchItem], Field(max_length=SETTINGS.max_items)]
GradItems = Annotated[list[GradItem], Field(max_length=SETTINGS.max_items)]
# /grad (torch, forward + backward) uses BentoML's adaptive batching; /score, /match and /rank share one
# work-conserving Batcher (service/batching.py) and its model thread.
GRAD_BATCHING = {
    "batchable": True,
    "max_batch_size": max(2, SETTINGS.max_batch_size),  # BentoML refuses 1
    "max_latency_ms": SETTINGS.max_latency_ms,
}


@bentoml.service(
    name="rewardscope",
    workers=SETTINGS.workers,
    # Admission control is GuardMiddleware's (503 + Retry-After); BentoML's own limit would answer 429 bare.
    traffic={"timeout": SETTINGS.timeout_s},
)
class RewardService:
    def __init__(self) -> None:
        self.engine = RewardEngine(SETTINGS)
        self.batcher: Batcher[ScoreItem, object, Outcome] = Batcher(
            self.engine.run,
            max_batch_size=SETTINGS.max_batch_size,
            max_latency_s=SETTINGS.max_latency_ms / 1000,
            max_ahead_items=SETTINGS.max_ahead_items,
            lanes=SETTINGS.model_lanes,
            narrow=single_threaded,
            observe=metrics.observe_batch,
        )
        if SETTINGS.model_lanes > 1:
            self.engine.warm_single_threaded()
        self.gradients = GradientEngine(self.engine)
        self.golden = None
        if SETTINGS.golden_check:
            self.golden = check(
                self.engine.scorer(self.engine.default_weights, SETTINGS.profile), SETTINGS.profile, SETTINGS.golden
            )
            (log.info if self.golden.ok else log.error)("%s", self.golden.summary())
        metrics.GOLDEN_OK.set(1 if self.golden is None or self.golden.ok else 0)
        _INFO.engine = self.engine
        _INFO.service = self
        metrics.watch_gc()
        if SETTINGS.gc_freeze:
            # Everything loaded so far (models, libraries: ~400k tracked objects) lives as long as the process.
            # Frozen out of the collector's sight, full collections (the GIL held throughout: every request in
            # flight waits) stop rescanning it (benchmarks/RESULTS.md).
            gc.freeze()

    async def scored(
        self,
        items: Sequence[ScoreItem],
        endpoint: str,
        variants: Sequence[str | None] | None = None,
        wait: bool = False,
    ) -> list[Outcome]:
        """Decode on worker threads, then score in the shared model thread's next batch. Past the latency budget:
        503, unless `wait` (background jobs queue instead)."""
        prepare = functools.partial(self.engine.prepare, variants=variants, endpoint=endpoint)
        try:
            return await self.batcher.submit(items, prepare, wait)
        except Overloaded as exc:
            raise ServiceUnavailable(str(exc)) from None

    @bentoml.api(route="/score")
    async def score(self, items: Items) -> list[ItemResult]:
        """Score (image, prompt) items with the requested rewards; per item: rewards, total, details, error."""
        return self.engine.score_answers(await self.scored(items, "score"))

    @bentoml.api(route="/match")
    async def match(self, items: MatchItems) -> list[MatchResult]:
        """Detection matching score with its breakdown and boxes; variant seed, geneval or numeracy."""
        outcomes = await self.scored(items, "match", [item.variant for item in items])
        return self.engine.match_answers(items, outcomes)

    @bentoml.api(route="/grad", **GRAD_BATCHING)
    def grad(self, items: GradItems) -> list[GradResult]:
        """Reward values and d(weighted total)/d(image) for float images [3, H, W] in [0, 1] (float16/32 .npy);
        the gradient comes back as float16 .npy scaled to max |g| = 1, with grad_scale to undo it."""
        return self.gradients.grad(items)

    @bentoml.api(route="/rank")
    async def rank(
        self,
        groups: Annotated[list[RankGroup], Field(max_length=64)],
        rewards: RewardSpec | None = None,
        profile: str | None = None,
        options: RankOptions | None = None,
    ) -> list[RankResult]:
        """Rank N candidates per prompt by total reward (or `options`: normalisation, rank aggregation, margin,
        likelihood weights); chosen/rejected are the DPO pair (best/worst)."""
        outcomes = await self.scored(self.engine.rank_items(groups, rewards, profile), "rank")
        return self.engine.rank_answers(groups, self.engine.score_answers(outcomes), rewards, options)

    @bentoml.task(route="/jobs/score")
    async def score_job(
        self, items: Annotated[list[ScoreItem], Field(max_length=SETTINGS.max_items * 16)]
    ) -> list[ItemResult]:
        """Asynchronous /score for large submissions: submit, poll status, fetch the result later."""
        return self.engine.score_answers(await self.scored(items, "score", wait=True))

    def __is_ready__(self) -> bool:
        return self.golden is None or self.golden.ok

    def __metrics__(self, content: str) -> str:
        # Under `bentoml serve` (prometheus multiprocess mode) BentoML's collector already reads our series.
        return content if "rewardscope_" in content else content + metrics.render()


class _Info:
    """Bridge from the plain GET routes below to the running service instance (set in its __init__)."""

    engine: RewardEngine | None = None
    service: RewardService | None = None


_INFO = _Info()


async def rewards_view(_: Request) -> JSONResponse:
    if _INFO.engine is None:
        return JSONResponse({"error": "service is starting"}, status_code=503)
    return JSONResponse(_INFO.engine.describe())


async def golden_view(_: Request) -> JSONResponse:
    golden = _INFO.service.golden if _INFO.service else None
    if golden is None:
        return JSONResponse({"checked": False})
    return JSONResponse(
        {"ok": golden.ok, "checked": golden.checked, "differences": golden.differences, "skipped": golden.skipped},
        status_code=200 if golden.ok else 503,
    )


async def score_upload_view(request: Request) -> JSONResponse:
    """Multipart /score: files in `images` (one part each), `prompts` a JSON list of strings, optional
    `rewards` (JSON list or object) and `profile`. Parsed here, not by BentoML's multipart serde, because
    that one downloads any string given for a file field: a URL fetch driven by request data."""
    service = _INFO.service
    if service is None:
        return JSONResponse({"error": "service is starting"}, status_code=503)
    async with request.form(max_files=SETTINGS.max_items, max_fields=16) as form:
        files = form.getlist("images")
        if not files or not all(isinstance(part, UploadFile) for part in files):
            return JSONResponse({"error": "send the images as file parts named 'images'"}, status_code=422)
        try:
            prompts = json.loads(str(form.get("prompts", "")))
            rewards = json.loads(str(form["rewards"])) if "rewards" in form else None
            items = [
                ScoreItem(
                    image=base64.b64encode(await part.read()).decode(),
                    prompt=prompt,
                    rewards=rewards,
                    profile=form.get("profile") or None,
                )
                for part, prompt in zip(files, prompts, strict=True)
            ]
        except (ValueError, TypeError) as exc:  # bad JSON, prompt count mismatch, schema violations
            return JSONResponse({"error": f"bad multipart request: {exc}"}, status_code=422)
    try:
        outcomes = await service.scored(items, "score")
    except ServiceUnavailable as exc:
        return JSONResponse({"error": str(exc)}, status_code=503)
    return JSONResponse([result.model_dump() for result in service.engine.score_answers(outcomes)])


RewardService.mount_asgi_app(
    Starlette(
        routes=[
            Route("/rewards", rewards_view, methods=["GET"]),
            Route("/golden", golden_view, methods=["GET"]),
            Route("/score/upload", score_upload_view, methods=["POST"]),
        ]
    ),
    path="/",
)


def _validate_job(body: bytes) -> str | None:
    """/jobs/score/submit: BentoML accepts any body there and validates it only when the job runs, so a bad
    submission surfaced as a failed job at /get. Checked against the job's own input schema up front instead."""
    try:
        RewardService.apis["score_job"].input_spec.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        return f"invalid job ({exc.error_count()} error(s)); first at {where}: {first['msg']}"
    return None


def _overloaded() -> str | None:
    return _INFO.service.batcher.over_budget() if _INFO.service is not None else None


RewardService.add_asgi_middleware(
    GuardMiddleware,
    overloaded=_overloaded,
    shed_paths=frozenset({"/score", "/match", "/rank", "/score/upload"}),
    validators={"/jobs/score/submit": _validate_job},
    token=SETTINGS.token,
    max_request_bytes=SETTINGS.max_request_bytes,
    retry_after_s=SETTINGS.retry_after_s,
    max_inflight=SETTINGS.max_concurrency,
)
