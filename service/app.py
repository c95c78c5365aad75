"""RewardService: the BentoML service. Loads the models once in __init__, one method per endpoint;
the work itself lives in service/engine.py. Configure with REWARDSCOPE_* environment variables."""

from __future__ import annotations

import asyncio
import base64
import functools
import gc
import json
import logging
import signal
import threading
import time
from collections.abc import Sequence
from typing import Annotated, Any

import bentoml
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from rewardscope.models.detection.detector import single_threaded
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import memory, metrics
from .batching import Batcher, Overloaded
from .engine import Outcome, RewardEngine
from .golden import check
from .gradients import GradientEngine, GradItem, GradResult
from .guard import GuardMiddleware
from .jobs import JOB_ID, PENDING, SUCCESS, JobLimits, JobRefused, JobRunner, JobStore
from .schemas import ItemResult, MatchItem, MatchResult, RankGroup, RankOptions, RankResult, RewardSpec, ScoreItem
from .settings import ServiceSettings

log = logging.getLogger("rewardscope.service")
SETTINGS = ServiceSettings.from_env()

Items = Annotated[list[ScoreItem], Field(max_length=SETTINGS.max_items)]
JobItems = Annotated[list[ScoreItem], Field(max_length=SETTINGS.max_items * 16)]
JOB_ITEMS = TypeAdapter(list[ScoreItem])


class JobAnswer(BaseModel):
    task_id: str
    status: str


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
        memory.return_large_buffers_to_the_os()
        self.engine = RewardEngine(SETTINGS)
        self.batcher: Batcher[ScoreItem, object, Outcome] = Batcher(
            self.engine.run,
            max_batch_size=SETTINGS.max_batch_size,
            max_latency_s=SETTINGS.max_latency_ms / 1000,
            max_ahead_items=SETTINGS.max_ahead_items,
            max_ahead_bytes=SETTINGS.max_ahead_bytes,
            max_request_bytes=SETTINGS.max_request_decoded_bytes,
            lanes=SETTINGS.model_lanes,
            narrow=single_threaded,
            observe=metrics.observe_batch,
            observe_decoded=metrics.DECODED_BYTES.set,
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
        self.draining = False
        metrics.DRAINING.set(0)
        metrics.DECODED_BYTES.set(0)
        self.jobs = JobStore(
            SETTINGS.jobs_path(),
            JobLimits(SETTINGS.max_queued_jobs, SETTINGS.max_job_store_bytes, SETTINGS.job_retention_s),
        )
        if self.jobs.interrupted:
            log.warning(
                "%d job(s) were running when the service last stopped uncleanly: marked failed", self.jobs.interrupted
            )
        self.job_runner = JobRunner(
            self.jobs,
            parse=JOB_ITEMS.validate_json,
            score=self._score_job_slice,
            encode=lambda answers: json.dumps(answers).encode(),
            # One batch at a time: a job holds at most one batch of the decode-ahead budgets, so an interactive
            # request never waits behind more than the batch a model lane is already running.
            slice_items=SETTINGS.max_batch_size,
            on_change=self._observe_jobs,
        )
        metrics.watch_gc()
        if SETTINGS.gc_freeze:
            # Everything loaded so far (models, libraries: ~400k tracked objects) lives as long as the process.
            # Frozen out of the collector's sight, full collections (the GIL held throughout: every request in
            # flight waits) stop rescanning it (benchmarks/RESULTS.md).
            gc.freeze()

    @bentoml.on_startup
    async def _start(self) -> None:
        """On the worker's event loop: the job runner, and the SIGTERM drain."""
        self.job_runner.start()
        self._observe_jobs()
        previous = signal.getsignal(signal.SIGTERM)
        loop = asyncio.get_running_loop()

        def on_sigterm(signum: int, frame: object) -> None:
            if self.draining:
                return  # the process manager's own SIGTERM during the drain: the drain deadline stands
            self.draining = True
            metrics.DRAINING.set(1)
            log.warning("SIGTERM: draining for at most %gs", SETTINGS.drain_s)
            loop.call_soon_threadsafe(lambda: loop.create_task(self._drain(previous, signum)))

        if threading.current_thread() is threading.main_thread():  # served (not in-process behind a test client)
            signal.signal(signal.SIGTERM, on_sigterm)

    async def _drain(self, previous: Any, signum: int) -> None:
        deadline = time.monotonic() + SETTINGS.drain_s
        await self.job_runner.stop()
        inflight = lambda: sum(guard.inflight for guard in _GUARDS)  # noqa: E731
        while time.monotonic() < deadline and (inflight() > 0 or self.batcher.items_ahead() > 0):
            await asyncio.sleep(0.05)
        left = inflight()
        (log.warning if left else log.info)("drained (%d request(s) still in flight); stopping", left)
        if callable(previous):
            previous(signum, None)  # uvicorn's own handler: stop serving and exit
        else:
            signal.raise_signal(signum)

    def _observe_jobs(self) -> None:
        queued, stored = self.jobs.counts()
        metrics.JOBS_QUEUED.set(queued)
        metrics.JOBS_STORED_BYTES.set(stored)

    async def _score_job_slice(self, items: Sequence[ScoreItem]) -> list[dict[str, Any]]:
        outcomes = await self.scored(items, "score", background=True)
        return [answer.model_dump(mode="json") for answer in self.engine.score_answers(outcomes)]

    async def scored(
        self,
        items: Sequence[ScoreItem],
        endpoint: str,
        variants: Sequence[str | None] | None = None,
        background: bool = False,
    ) -> list[Outcome]:
        """Decode on worker threads (within the decoded-pixel budgets), then score in a model thread's next batch.
        Raises Overloaded past the latency budget, unless `background` (jobs queue behind interactive work)."""
        prepare = functools.partial(self.engine.prepare, variants=variants, endpoint=endpoint)
        return await self.batcher.submit(items, prepare, self.engine.decoded_sizes, background)

    @bentoml.api(route="/score")
    async def score(self, items: Items) -> list[ItemResult]:
        """Score (image, prompt) items with the requested rewards; per item: rewards, total, details, error."""
        try:
            return self.engine.score_answers(await self.scored(items, "score"))
        except Overloaded as exc:
            return refusal(exc)

    @bentoml.api(route="/match")
    async def match(self, items: MatchItems) -> list[MatchResult]:
        """Detection matching score with its breakdown and boxes; variant seed, geneval or numeracy."""
        try:
            outcomes = await self.scored(items, "match", [item.variant for item in items])
        except Overloaded as exc:
            return refusal(exc)
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
        try:
            outcomes = await self.scored(self.engine.rank_items(groups, rewards, profile), "rank")
        except Overloaded as exc:
            return refusal(exc)
        return self.engine.rank_answers(groups, self.engine.score_answers(outcomes), rewards, options)

    @bentoml.api(route="/jobs/score/submit")
    async def submit_score_job(self, items: JobItems) -> JobAnswer:
        """Queue a background /score job (up to 16 x MAX_ITEMS items): answers its task_id at once; poll
        GET /jobs/score/status, fetch GET /jobs/score/get, PUT /jobs/score/cancel, DELETE /jobs/score."""
        payload = JOB_ITEMS.dump_json(list(items))
        try:
            job_id = await asyncio.to_thread(self.jobs.submit, payload, len(items))
        except JobRefused as exc:
            return refused(exc.status, exc.reason, str(exc), exc.retry_after_s)
        self._observe_jobs()
        self.job_runner.start()
        self.job_runner.wake()
        return JobAnswer(task_id=job_id, status=PENDING)

    def __is_ready__(self) -> bool:
        return not self.draining and (self.golden is None or self.golden.ok)

    def __metrics__(self, content: str) -> str:
        # Under `bentoml serve` (prometheus multiprocess mode) BentoML's collector already reads our series.
        return content if "rewardscope_" in content else content + metrics.render()


def refused(status: int, reason: str, message: str, retry_after_s: int | None = None) -> JSONResponse:
    """A refusal an endpoint answers itself, shaped as the guard's (`error`, `reason`, Retry-After): counted, logged
    in one line (BentoML would hide the reason of a raised 5xx and log a traceback)."""
    metrics.REFUSALS.labels(reason=reason).inc()
    log.warning("refused (%s): %s", reason, message)
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s else None
    return JSONResponse({"error": message, "reason": reason}, status_code=status, headers=headers)


def refusal(exc: Overloaded) -> JSONResponse:
    """The 503 of a request that met the latency budget after the guard let it in."""
    return refused(503, "latency_budget", str(exc), exc.retry_after_s)


# The guard the ASGI stack built in this worker (the service's drain counts the requests it holds).
_GUARDS: list[GuardMiddleware] = []


def _running() -> RewardService | None:
    """The service instance BentoML runs in this worker, or None while it starts or after it stopped."""
    try:
        return bentoml.get_current_service()
    except bentoml.exceptions.BentoMLException:
        return None


def _starting() -> JSONResponse:
    return JSONResponse({"error": "service is starting"}, status_code=503)


async def rewards_view(_: Request) -> JSONResponse:
    service = _running()
    return _starting() if service is None else JSONResponse(service.engine.describe())


async def golden_view(_: Request) -> JSONResponse:
    service = _running()
    golden = service.golden if service else None
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
    service = _running()
    if service is None:
        return _starting()
    async with request.form(max_files=SETTINGS.max_items, max_fields=16) as form:
        files = form.getlist("images")
        if not files or not all(isinstance(part, UploadFile) for part in files):
            return JSONResponse({"error": "send the images as file parts named 'images'"}, status_code=422)
        try:
            prompts = parse_json_field(str(form.get("prompts", "")))
            rewards = parse_json_field(str(form["rewards"])) if "rewards" in form else None
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
    except Overloaded as exc:
        return refusal(exc)
    return JSONResponse([result.model_dump() for result in service.engine.score_answers(outcomes)])


async def _on_job(request: Request, action: str) -> tuple[str | None, Any]:
    """(job id, what JobStore.<action>(id) answered), or (None, None) for a malformed or unknown id."""
    job_id, service = request.query_params.get("task_id", ""), _running()
    if service is None or not JOB_ID.fullmatch(job_id):
        return None, None
    return job_id, await asyncio.to_thread(getattr(service.jobs, action), job_id)


def _unknown_job() -> JSONResponse:
    return JSONResponse({"error": "no such job (unknown, deleted or expired)", "reason": "unknown_job"}, 404)


async def job_status_view(request: Request) -> JSONResponse:
    _, found = await _on_job(request, "status")
    return JSONResponse(found) if found else _unknown_job()


async def job_result_view(request: Request) -> Response:
    _, found = await _on_job(request, "result")
    if found is None:
        return _unknown_job()
    status, result, error = found
    if status == SUCCESS and result is not None:
        return Response(result, media_type="application/json")
    message = f"job is {status}" + (f": {error}" if error else "")
    return JSONResponse({"error": message, "status": status, "reason": f"job_{status}"}, status_code=409)


async def job_cancel_view(request: Request) -> JSONResponse:
    job_id, status = await _on_job(request, "cancel")
    if status is None:
        return _unknown_job()
    _running()._observe_jobs()  # type: ignore[union-attr]  # _on_job found the service
    return JSONResponse({"task_id": job_id, "status": status})


async def job_delete_view(request: Request) -> JSONResponse:
    job_id, deleted = await _on_job(request, "delete")
    if not deleted:
        return _unknown_job()
    _running()._observe_jobs()  # type: ignore[union-attr]  # _on_job found the service
    return JSONResponse({"task_id": job_id, "deleted": True})


RewardService.mount_asgi_app(
    Starlette(
        routes=[
            Route("/rewards", rewards_view, methods=["GET"]),
            Route("/golden", golden_view, methods=["GET"]),
            Route("/score/upload", score_upload_view, methods=["POST"]),
            Route("/jobs/score/status", job_status_view, methods=["GET"]),
            Route("/jobs/score/get", job_result_view, methods=["GET"]),
            Route("/jobs/score/cancel", job_cancel_view, methods=["PUT", "POST"]),
            Route("/jobs/score", job_delete_view, methods=["DELETE"]),
        ]
    ),
    path="/",
)


def _validate_job(body: bytes) -> str | None:
    """/jobs/score/submit: BentoML accepts any body there and validates it only when the job runs, so a bad
    submission surfaced as a failed job at /get. Checked against the job's own input schema up front instead."""
    try:
        RewardService.apis["submit_score_job"].input_spec.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        return f"invalid job ({exc.error_count()} error(s)); first at {where}: {first['msg']}"
    return None


def parse_json_field(text: str) -> object:
    """A form field's JSON. Deep nesting is refused as bad input (ValueError: 422), never a RecursionError (500)."""
    if len(text) > 1 << 20:
        raise ValueError("a JSON form field is limited to 1 MiB")
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _overloaded() -> tuple[str, int] | None:
    service = _running()
    refused = service.batcher.over_budget() if service is not None else None
    return None if refused is None else (str(refused), refused.retry_after_s)


def _draining() -> bool:
    service = _running()
    return service is not None and service.draining


RewardService.add_asgi_middleware(
    GuardMiddleware,
    draining=_draining,
    register=_GUARDS.append,
    overloaded=_overloaded,
    shed_paths=frozenset({"/score", "/match", "/rank", "/score/upload"}),
    validators={"/jobs/score/submit": _validate_job},
    token=SETTINGS.token,
    max_request_bytes=SETTINGS.max_request_bytes,
    retry_after_s=SETTINGS.retry_after_s,
    max_inflight=SETTINGS.max_concurrency,
    body_idle_timeout_s=SETTINGS.body_idle_timeout_s,
    max_receiving_bytes=SETTINGS.max_receiving_bytes,
    on_refusal=lambda reason: metrics.REFUSALS.labels(reason=reason).inc(),
)
