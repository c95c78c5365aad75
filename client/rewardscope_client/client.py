"""RewardClient (threads over a pooled httpx.Client) and AsyncRewardClient (httpx.AsyncClient): the same
methods, chunked and retried the same way; request bodies and retry decisions come from protocol.py."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from ._version import __version__
from .images import ENCODINGS, Encoding
from .protocol import (
    MATCH_VARIANTS,
    RETRYABLE_ERRORS,
    RetryPolicy,
    RewardSpec,
    chunk_ranges,
    error_message,
    expect_list,
    float_images,
    grad_entry,
    group_chunks,
    item_entry,
    job_state,
    prepare,
    prepare_groups,
    rank_group_entry,
    rewards_spec,
    split_by_bytes,
)
from .results import GradBatch, RewardServiceError, ScoreBatch

DEFAULT_URL = "http://127.0.0.1:3000"
# Below the service's default 64 MiB request limit, with room for JSON overhead.
DEFAULT_MAX_REQUEST_BYTES = 48 * 1024 * 1024
JOB_SUBMIT, JOB_STATUS, JOB_GET = "/jobs/score/submit", "/jobs/score/status", "/jobs/score/get"
JOB_CANCEL, JOB_DELETE = "/jobs/score/cancel", "/jobs/score"

Images = Any  # a sequence of images or a batched array/tensor: see images.split_images
Metadata = Sequence[Mapping[str, Any] | None] | None


@dataclass
class _Plan:
    """One logical call: the entries of each chunk are built (encoded) only when that chunk is sent."""

    path: str
    key: str
    chunks: list[range]
    build: Callable[[range], list[dict[str, Any]]]
    extra: dict[str, Any] = field(default_factory=dict)


def _json(response: httpx.Response, path: str) -> Any:
    try:
        return response.json()
    except ValueError:
        raise RewardServiceError(f"answer is not JSON: {response.text[:200]!r}", response.status_code, path) from None


def _job_failure(task_id: str, failure: RewardServiceError | httpx.Response) -> RewardServiceError:
    if isinstance(failure, RewardServiceError):
        return RewardServiceError(f"task {task_id} failed: {failure.message}", failure.status_code, JOB_GET)
    return RewardServiceError(f"task {task_id} failed: {failure.text[:500]}", failure.status_code, JOB_GET)


class _ClientBase:
    """Configuration and request planning shared by both clients."""

    def __init__(
        self,
        base_url: str,
        token: str | None,
        timeout: float,
        max_retries: int,
        backoff: float,
        chunk_size: int,
        max_concurrency: int,
        encoding: Encoding,
        max_request_bytes: int,
    ) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}; got {encoding!r}")
        if chunk_size < 1 or max_concurrency < 1 or max_retries < 0:
            raise ValueError("chunk_size and max_concurrency must be >= 1 and max_retries >= 0")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.chunk_size = chunk_size
        self.max_concurrency = max_concurrency
        self.encoding: Encoding = encoding
        self.max_request_bytes = max_request_bytes
        self.retry = RetryPolicy(max_retries=max_retries, backoff=backoff)
        self._headers = {"user-agent": f"rewardscope-client/{__version__}"}
        if token:
            self._headers["authorization"] = f"Bearer {token}"

    def _http_options(self, transport: Any) -> dict[str, Any]:
        # Chunk workers and score_async callers can each hold a connection at once.
        limits = httpx.Limits(
            max_connections=2 * self.max_concurrency, max_keepalive_connections=2 * self.max_concurrency
        )
        options: dict[str, Any] = {
            "base_url": self.base_url,
            "headers": self._headers,
            "timeout": httpx.Timeout(self.timeout),
            "limits": limits,
        }
        if transport is not None:
            options["transport"] = transport
        return options

    # -- Plans: what to send, chunk by chunk ---------------------------------------------------------------
    def _score_plan(
        self,
        path: str,
        images: Images,
        prompts: str | Sequence[str],
        metadata: Metadata,
        copy: bool = False,
        **fields: Any,
    ) -> _Plan:
        sources, prompt_list, metadata_list = prepare(images, prompts, metadata, copy=copy)

        def build(chunk: range) -> list[dict[str, Any]]:
            return [
                item_entry(sources[index], prompt_list[index], metadata_list[index], self.encoding, **fields)
                for index in chunk
            ]

        return _Plan(path, "items", chunk_ranges(len(sources), self.chunk_size), build)

    def _match_plan(
        self, images: Images, prompts: str | Sequence[str], variant: str, metadata: Metadata, profile: str | None
    ) -> _Plan:
        if variant not in MATCH_VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(MATCH_VARIANTS)}; got {variant!r}")
        return self._score_plan("/match", images, prompts, metadata, variant=variant, profile=profile)

    def _rank_plan(self, groups: Sequence[Any], rewards: str | RewardSpec | None, profile: str | None) -> _Plan:
        prepared = prepare_groups(groups)

        def build(chunk: range) -> list[dict[str, Any]]:
            return [rank_group_entry(*prepared[index], self.encoding) for index in chunk]

        chunks = group_chunks([len(candidates) for _, candidates, _ in prepared], self.chunk_size)
        extra = {"rewards": rewards_spec(rewards), "profile": profile}
        return _Plan(
            "/rank", "groups", chunks, build, {name: value for name, value in extra.items() if value is not None}
        )

    def _grad_plan(
        self,
        images: Images,
        prompts: str | Sequence[str],
        rewards: str | RewardSpec | None,
        profile: str | None,
        dtype: str,
    ) -> tuple[_Plan, list[tuple[int, ...]]]:
        arrays = float_images(images)
        prompt_list = [prompts] * len(arrays) if isinstance(prompts, str) else list(prompts)
        if len(prompt_list) != len(arrays):
            raise ValueError(f"got {len(arrays)} images and {len(prompt_list)} prompts: they must match one to one")
        spec = rewards_spec(rewards)

        def build(chunk: range) -> list[dict[str, Any]]:
            return [grad_entry(arrays[i], prompt_list[i], dtype, rewards=spec, profile=profile) for i in chunk]

        plan = _Plan("/grad", "items", chunk_ranges(len(arrays), self.chunk_size), build)
        return plan, [array.shape for array in arrays]

    def _job_items(self, images: Images, prompts: str | Sequence[str], metadata: Metadata, **fields: Any) -> list:
        plan = self._score_plan(JOB_SUBMIT, images, prompts, metadata, **fields)
        return [entry for chunk in plan.chunks for entry in plan.build(chunk)]


class RewardClient(_ClientBase):
    """Synchronous client of the rewardscope service.

    Large batches are split into chunks of `chunk_size` items, sent concurrently by up to `max_concurrency`
    threads over one pooled connection set, and reassembled in input order. Requests answered 503/429
    (or 502/504), or lost to connection errors and timeouts, are resent whole up to `max_retries` times with
    exponential backoff (`backoff` seconds, doubling, with jitter; the server's Retry-After wins). Other
    4xx/5xx answers raise RewardServiceError at once with the server's message. A chunk answered 413 is
    split in two and sent again; chunks are also kept under `max_request_bytes` before sending.

    `encoding` is the transport for arrays and tensors: "npy" (default, lossless), "png" or "jpeg".
    Per-item failures never raise: their rewards are NaN, with the message in `ScoreBatch.errors`.
    `transport` is handed to httpx (tests pass an httpx.MockTransport).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        token: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        chunk_size: int = 32,
        max_concurrency: int = 4,
        encoding: Encoding = "npy",
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url, token, timeout, max_retries, backoff, chunk_size, max_concurrency, encoding, max_request_bytes
        )
        self._http = httpx.Client(**self._http_options(transport))
        self._sleep: Callable[[float], Any] = time.sleep
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._pools_lock = threading.Lock()

    # -- Transport -----------------------------------------------------------------------------------------
    def _request(
        self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None, retry: bool = True
    ) -> httpx.Response:
        """Send until a final answer: success returns, a final error raises RewardServiceError."""
        attempts = 0
        while True:
            attempts += 1
            try:
                response = self._http.request(method, path, json=json, params=params)
            except RETRYABLE_ERRORS as exc:
                delay = self.retry.next_delay(attempts, None) if retry else None
                if delay is None:
                    raise RewardServiceError(f"{type(exc).__name__}: {exc}", None, path, attempts) from exc
            else:
                if response.is_success:
                    return response
                delay = self.retry.next_delay(attempts, response) if retry else None
                if delay is None:
                    raise RewardServiceError(error_message(response), response.status_code, path, attempts)
            self._sleep(delay)

    def _post_part(self, path: str, key: str, part: list[dict[str, Any]], extra: dict[str, Any]) -> list[Any]:
        try:
            response = self._request("POST", path, json={key: part, **extra})
        except RewardServiceError as exc:
            if exc.status_code != 413 or len(part) < 2:
                raise
            middle = len(part) // 2  # too large for the server: halve until it fits (or one entry is left)
            return self._post_part(path, key, part[:middle], extra) + self._post_part(path, key, part[middle:], extra)
        return expect_list(_json(response, path), len(part), path)

    def _send_chunk(self, plan: _Plan, chunk: range) -> list[Any]:
        results: list[Any] = []
        for part in split_by_bytes(plan.build(chunk), self.max_request_bytes):
            results.extend(self._post_part(plan.path, plan.key, part, plan.extra))
        return results

    def _pool(self, name: str) -> ThreadPoolExecutor:
        with self._pools_lock:
            if name not in self._pools:
                self._pools[name] = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix=f"rewardscope-{name}")
            return self._pools[name]

    def _execute(self, plan: _Plan) -> list[Any]:
        """Send every chunk (concurrently when there are several) and return the results in input order."""
        if len(plan.chunks) <= 1:
            return [result for chunk in plan.chunks for result in self._send_chunk(plan, chunk)]
        futures = [self._pool("chunks").submit(self._send_chunk, plan, chunk) for chunk in plan.chunks]
        try:
            return [result for future in futures for result in future.result()]
        except BaseException:
            for future in futures:
                future.cancel()
            raise

    # -- Endpoints -----------------------------------------------------------------------------------------
    def score(
        self,
        images: Images,
        prompts: str | Sequence[str],
        metadata: Metadata = None,
        rewards: str | RewardSpec | None = None,
        profile: str | None = None,
    ) -> ScoreBatch:
        """Score N (image, prompt) pairs: POST /score in chunks. Failed items are NaN (see ScoreBatch).

        images: a list of PIL images / arrays / tensors / paths / bytes, or a batched array or tensor
        [B, 3, H, W] or [B, H, W, 3] (float in [0, 1] or uint8). prompts: N strings. metadata: N dicts or None
        (GenEval-style {"include": [...], "exclude": [...]}). rewards: names or {name: weight}; None: the
        service's default set. profile: "train" or "benchmark"; None: the service's default.
        """
        plan = self._score_plan("/score", images, prompts, metadata, rewards=rewards_spec(rewards), profile=profile)
        return ScoreBatch.from_items(self._execute(plan))

    def score_async(
        self,
        images: Images,
        prompts: str | Sequence[str],
        metadata: Metadata = None,
        rewards: str | RewardSpec | None = None,
        profile: str | None = None,
    ) -> Future[ScoreBatch]:
        """score() in the background: returns at once with a Future, so sampling can overlap scoring.
        Pixels are copied before returning: the caller may reuse its buffers immediately."""
        plan = self._score_plan(
            "/score", images, prompts, metadata, copy=True, rewards=rewards_spec(rewards), profile=profile
        )
        return self._pool("calls").submit(lambda: ScoreBatch.from_items(self._execute(plan)))

    def grad(
        self,
        images: Images,
        prompts: str | Sequence[str],
        rewards: str | RewardSpec | None = None,
        profile: str | None = None,
        dtype: str = "float16",
    ) -> GradBatch:
        """Reward values and d(weighted total)/d(pixels): POST /grad. images: float [B, 3, H, W] in [0, 1]
        (array or tensor) or a list of [3, H, W]; sent as `dtype` .npy. For autograd use RemoteReward."""
        plan, shapes = self._grad_plan(images, prompts, rewards, profile, dtype)
        return GradBatch.from_grad_items(self._execute(plan), shapes)

    def match(
        self,
        images: Images,
        prompts: str | Sequence[str],
        variant: str = "seed",
        metadata: Metadata = None,
        profile: str | None = None,
    ) -> list[dict[str, Any]]:
        """Detection matching score with its breakdown: POST /match. Per item: {"score", "variant",
        "details", "error", "error_code", "profile", "versions"}; score None where the item failed."""
        return self._execute(self._match_plan(images, prompts, variant, metadata, profile))

    def rank(
        self, groups: Sequence[Any], rewards: str | RewardSpec | None = None, profile: str | None = None
    ) -> list[dict[str, Any]]:
        """Rank candidates per prompt: POST /rank. groups: (prompt, images) or (prompt, images, metadata).
        Per group: {"scores", "order" (best first), "chosen", "rejected" (the DPO pair), "candidates"}."""
        return self._execute(self._rank_plan(groups, rewards, profile))

    def rewards(self) -> dict[str, Any]:
        """GET /rewards: the rewards served, defaults, profiles and limits."""
        return _json(self._request("GET", "/rewards"), "/rewards")

    def ready(self, timeout: float = 5.0) -> bool:
        """GET /readyz once, without retries: True when the service answers 200."""
        try:
            return self._http.get("/readyz", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def submit(
        self,
        images: Images,
        prompts: str | Sequence[str],
        metadata: Metadata = None,
        rewards: str | RewardSpec | None = None,
        profile: str | None = None,
    ) -> str:
        """Queue a scoring job (one request, not chunked): POST /jobs/score/submit; returns the task id."""
        items = self._job_items(images, prompts, metadata, rewards=rewards_spec(rewards), profile=profile)
        answer = _json(self._request("POST", JOB_SUBMIT, json={"items": items}), JOB_SUBMIT)
        return str(answer["task_id"])

    def status(self, task_id: str) -> str:
        """The job's status as the server names it (pending, in_progress, success, failure, cancelled)."""
        return str(_json(self._request("GET", JOB_STATUS, params={"task_id": task_id}), JOB_STATUS)["status"])

    def cancel(self, task_id: str) -> str:
        """Cancel a queued or running job; returns its status afterwards."""
        return str(_json(self._request("PUT", JOB_CANCEL, params={"task_id": task_id}), JOB_CANCEL)["status"])

    def delete(self, task_id: str) -> None:
        """Forget a job and its stored input or result (a running one stops)."""
        self._request("DELETE", JOB_DELETE, params={"task_id": task_id})

    def result(self, task_id: str, wait: bool = True, poll: float = 0.5, timeout: float | None = None) -> ScoreBatch:
        """The job's ScoreBatch. wait: poll every `poll` s until it finishes (TimeoutError after `timeout` s);
        wait=False checks once. A failed or canceled job raises RewardServiceError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status(task_id)
            state = job_state(status)
            if state != "running":
                break
            if not wait or (deadline is not None and time.monotonic() >= deadline):
                raise TimeoutError(f"task {task_id} is still {status}")
            time.sleep(poll)
        params = {"task_id": task_id}
        if state == "canceled":
            raise RewardServiceError(f"task {task_id} was canceled", None, JOB_STATUS)
        if state == "failed":
            try:
                response = self._request("GET", JOB_GET, params=params, retry=False)
            except RewardServiceError as exc:
                raise _job_failure(task_id, exc) from None
            raise _job_failure(task_id, response)
        answer = _json(self._request("GET", JOB_GET, params=params), JOB_GET)
        return ScoreBatch.from_items(expect_list(answer, None, JOB_GET))

    # -- Lifetime ------------------------------------------------------------------------------------------
    def close(self) -> None:
        with self._pools_lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
        self._http.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncRewardClient(_ClientBase):
    """The RewardClient's methods as coroutines over httpx.AsyncClient.

    Chunks are gathered concurrently, at most `max_concurrency` in flight per client (an asyncio.Semaphore);
    images are encoded in worker threads so the event loop stays free. Retries, chunking, errors and results
    are those of RewardClient. Use within one event loop; close with `await client.close()` or `async with`.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        token: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        chunk_size: int = 32,
        max_concurrency: int = 4,
        encoding: Encoding = "npy",
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url, token, timeout, max_retries, backoff, chunk_size, max_concurrency, encoding, max_request_bytes
        )
        self._http = httpx.AsyncClient(**self._http_options(transport))
        self._sleep: Callable[[float], Any] = asyncio.sleep
        self._semaphore = asyncio.Semaphore(max_concurrency)

    # -- Transport -----------------------------------------------------------------------------------------
    async def _request(
        self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None, retry: bool = True
    ) -> httpx.Response:
        attempts = 0
        while True:
            attempts += 1
            try:
                response = await self._http.request(method, path, json=json, params=params)
            except RETRYABLE_ERRORS as exc:
                delay = self.retry.next_delay(attempts, None) if retry else None
                if delay is None:
                    raise RewardServiceError(f"{type(exc).__name__}: {exc}", None, path, attempts) from exc
            else:
                if response.is_success:
                    return response
                delay = self.retry.next_delay(attempts, response) if retry else None
                if delay is None:
                    raise RewardServiceError(error_message(response), response.status_code, path, attempts)
            await self._sleep(delay)

    async def _post_part(self, path: str, key: str, part: list[dict[str, Any]], extra: dict[str, Any]) -> list[Any]:
        try:
            response = await self._request("POST", path, json={key: part, **extra})
        except RewardServiceError as exc:
            if exc.status_code != 413 or len(part) < 2:
                raise
            middle = len(part) // 2
            first = await self._post_part(path, key, part[:middle], extra)
            return first + await self._post_part(path, key, part[middle:], extra)
        return expect_list(_json(response, path), len(part), path)

    async def _send_chunk(self, plan: _Plan, chunk: range) -> list[Any]:
        async with self._semaphore:
            entries = await asyncio.to_thread(plan.build, chunk)
            results: list[Any] = []
            for part in split_by_bytes(entries, self.max_request_bytes):
                results.extend(await self._post_part(plan.path, plan.key, part, plan.extra))
            return results

    async def _execute(self, plan: _Plan) -> list[Any]:
        tasks = [asyncio.ensure_future(self._send_chunk(plan, chunk)) for chunk in plan.chunks]
        try:
            answers = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        return [result for answer in answers for result in answer]

    # -- Endpoints -----------------------------------------------------------------------------------------
    async def score(
        self,
        images: Images,
        prompts: str | Sequence[str],
        metadata: Metadata = None,
        rewards: str | RewardSpec | None = None,
        profile: str | None = None,
    ) -> ScoreBatch:
        """See RewardClient.score."""
        plan = self._score_plan("/score", images, prompts, metadata, rewards=rewards_spec(rewards), profile=profile)
        return ScoreBatch.from_items(await self._execute(plan))

    def score_async(
        self,
        images: Images,
        prompts: str | Sequence[str],
        metadata: Metadata = None,
        rewards: str | RewardSpec | None = None,
        profile: str | None = None,
    ) -> asyncio.Task[ScoreBatch]:
        """score() scheduled as a Task on the running loop; pixels are copied before returning."""
        plan = self._score_plan(
            "/score", images, prompts, metadata, copy=True, rewards=rewards_spec(rewards), profile=profile
        )

        async def run() -> ScoreBatch:
            return ScoreBatch.from_items(await self._execute(plan))

        return asyncio.ensure_future(run())

    async def grad(
        self,
        images: Images,
        prompts: str | Sequence[str],
        rewards: str | RewardSpec | None = None,
        profile: str | None = None,
        dtype: str = "float16",
    ) -> GradBatch:
        """See RewardClient.grad."""
        plan, shapes = self._grad_plan(images, prompts, rewards, profile, dtype)
        return GradBatch.from_grad_items(await self._execute(plan), shapes)

    async def match(
        self,
        images: Images,
        prompts: str | Sequence[str],
        variant: str = "seed",
        metadata: Metadata = None,
        profile: str | None = None,
    ) -> list[dict[str, Any]]:
        """See RewardClient.match."""
        return await self._execute(self._match_plan(images, prompts, variant, metadata, profile))

    async def rank(
        self, groups: Sequence[Any], rewards: str | RewardSpec | None = None, profile: str | None = None
    ) -> list[dict[str, Any]]:
        """See RewardClient.rank."""
        return await self._execute(self._rank_plan(groups, rewards, profile))

    async def rewards(self) -> dict[str, Any]:
        return _json(await self._request("GET", "/rewards"), "/rewards")

    async def ready(self, timeout: float = 5.0) -> bool:
        try:
            return (await self._http.get("/readyz", timeout=timeout)).status_code == 200
        except httpx.HTTPError:
            return False

    async def submit(
        self,
        images: Images,
        prompts: str | Sequence[str],
        metadata: Metadata = None,
        rewards: str | RewardSpec | None = None,
        profile: str | None = None,
    ) -> str:
        items = await asyncio.to_thread(
            self._job_items, images, prompts, metadata, rewards=rewards_spec(rewards), profile=profile
        )
        answer = _json(await self._request("POST", JOB_SUBMIT, json={"items": items}), JOB_SUBMIT)
        return str(answer["task_id"])

    async def status(self, task_id: str) -> str:
        answer = _json(await self._request("GET", JOB_STATUS, params={"task_id": task_id}), JOB_STATUS)
        return str(answer["status"])

    async def cancel(self, task_id: str) -> str:
        answer = _json(await self._request("PUT", JOB_CANCEL, params={"task_id": task_id}), JOB_CANCEL)
        return str(answer["status"])

    async def delete(self, task_id: str) -> None:
        await self._request("DELETE", JOB_DELETE, params={"task_id": task_id})

    async def result(
        self, task_id: str, wait: bool = True, poll: float = 0.5, timeout: float | None = None
    ) -> ScoreBatch:
        """See RewardClient.result."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = await self.status(task_id)
            state = job_state(status)
            if state != "running":
                break
            if not wait or (deadline is not None and time.monotonic() >= deadline):
                raise TimeoutError(f"task {task_id} is still {status}")
            await asyncio.sleep(poll)
        params = {"task_id": task_id}
        if state == "canceled":
            raise RewardServiceError(f"task {task_id} was canceled", None, JOB_STATUS)
        if state == "failed":
            try:
                response = await self._request("GET", JOB_GET, params=params, retry=False)
            except RewardServiceError as exc:
                raise _job_failure(task_id, exc) from None
            raise _job_failure(task_id, response)
        answer = _json(await self._request("GET", JOB_GET, params=params), JOB_GET)
        return ScoreBatch.from_items(expect_list(answer, None, JOB_GET))

    # -- Lifetime ------------------------------------------------------------------------------------------
    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
