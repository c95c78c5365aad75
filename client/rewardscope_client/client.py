"""RewardClient (threads over a pooled httpx.Client) and AsyncRewardClient (httpx.AsyncClient).

The client logic exists once, sans I/O: every operation is a generator (`_ClientBase`) that yields what it needs
done (send a request, sleep, compute, run a plan's chunks) and gets the outcome back. RewardClient drives those
generators with blocking calls and threads, AsyncRewardClient with awaits and tasks; neither holds any logic of
its own. Request bodies and retry decisions come from protocol.py; which replica each request goes to is decided
here, in the core (`_Replicas`), and travels in the `_Send` effect as its URL."""

from __future__ import annotations

import asyncio
import functools
import itertools
import threading
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

import httpx

if TYPE_CHECKING:  # Python 3.11 has it in typing
    from typing_extensions import Unpack

from ._version import __version__
from .images import ENCODINGS, Encoding
from .protocol import (
    LOCAL_FAILURE,
    RETRYABLE_ERRORS,
    RetryBudget,
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
# A replica whose last attempt failed retryably is passed over as the first choice of new requests this long.
REPLICA_COOLDOWN = 10.0
JOB_SUBMIT, JOB_STATUS, JOB_GET = "/jobs/score/submit", "/jobs/score/status", "/jobs/score/get"
JOB_CANCEL, JOB_DELETE = "/jobs/score/cancel", "/jobs/score"

Images = Any  # a sequence of images or a batched array/tensor: see images.split_images
Metadata = Sequence[Mapping[str, Any] | None] | None
Prompts = str | Sequence[str]
Rewards = str | RewardSpec | None  # reward names, or {name: weight}; None: the service's default set
Profile = str | None  # a profile name; None: the service's default


class ScoreOptions(TypedDict, total=False):
    """The keyword options of score(), score_async() and submit()."""

    rewards: Rewards
    profile: Profile


def score_fields(options: Mapping[str, Any]) -> dict[str, Any]:
    """ScoreOptions -> the request fields of each item; an unknown option is a TypeError, as for any keyword."""
    unknown = sorted(set(options) - set(ScoreOptions.__annotations__))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)}: the options are rewards and profile")
    return {"rewards": rewards_spec(options.get("rewards")), "profile": options.get("profile")}


@dataclass
class _Plan:
    """One logical call: the entries of each chunk are built (encoded) only when that chunk is sent."""

    path: str
    key: str
    chunks: list[range]
    build: Callable[[range], list[dict[str, Any]]]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Send:
    """One HTTP attempt to `url` (a replica's base URL + the path, chosen by the core); the driver answers with the
    httpx.Response, or the httpx.HTTPError it raised."""

    method: str
    url: str
    json: Any = None
    params: dict[str, Any] | None = None
    timeout: float | None = None


@dataclass(frozen=True)
class _Sleep:
    """Wait: a retry's backoff (the client's `_sleep`, which tests replace) or a job poll (`poll=True`)."""

    seconds: float
    poll: bool = False


@dataclass(frozen=True)
class _Compute:
    """CPU work (encoding images): inline for the sync client, on a worker thread for the async one."""

    function: Callable[..., Any]
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class _Execute:
    """Every chunk of a plan, concurrently; the driver answers with the results in input order."""

    plan: _Plan


Steps = Generator[Any, Any, Any]


def _json(response: httpx.Response, path: str) -> Any:
    try:
        return response.json()
    except ValueError:
        raise RewardServiceError(f"answer is not JSON: {response.text[:200]!r}", response.status_code, path) from None


def _gave_up(outcome: httpx.Response | BaseException, path: str, budget: RetryBudget, retried: str | None) -> Exception:
    """The RewardServiceError of a request that failed for good; `retried`: how its retries ended, when they did."""
    if isinstance(outcome, httpx.Response):
        message, status = error_message(outcome), outcome.status_code
    else:
        message, status = f"{type(outcome).__name__}: {outcome}", None
    return RewardServiceError(f"{message} ({retried})" if retried else message, status, path, budget.attempts)


class _Replicas:
    """The service's URLs (replicas) and what the client has learnt of them. Requests start round-robin, passing
    over a replica whose last attempt failed less than REPLICA_COOLDOWN seconds ago; `jobs` maps each background
    job's id to the replica that accepted it."""

    def __init__(self, urls: str | Sequence[str]) -> None:
        self.urls = [url.rstrip("/") for url in ([urls] if isinstance(urls, str) else urls)]
        if not self.urls or not all(isinstance(url, str) and url for url in self.urls):
            raise ValueError(f"base_url must be a URL or a non-empty list of URLs; got {urls!r}")
        self.jobs: dict[str, int] = {}
        self._turn = itertools.count()  # next() is atomic: chunk threads share it safely
        self._failed_at: dict[int, float] = {}

    def first(self) -> int:
        start, now = next(self._turn) % len(self.urls), time.monotonic()
        for step in range(len(self.urls)):
            index = (start + step) % len(self.urls)
            if now - self._failed_at.get(index, -REPLICA_COOLDOWN) >= REPLICA_COOLDOWN:
                return index
        return start  # every replica failed lately: plain round-robin

    def after(self, index: int) -> int:
        return (index + 1) % len(self.urls)

    def answered(self, index: int, ok: bool) -> None:
        if ok:
            self._failed_at.pop(index, None)
        else:
            self._failed_at[index] = time.monotonic()

    def where(self, index: int) -> str:
        """' on URL' where there are several replicas (for error messages)."""
        return f" on {self.urls[index]}" if len(self.urls) > 1 else ""


def _job_failure(task_id: str, failure: RewardServiceError | httpx.Response) -> RewardServiceError:
    if isinstance(failure, RewardServiceError):
        return RewardServiceError(f"task {task_id} failed: {failure.message}", failure.status_code, JOB_GET)
    return RewardServiceError(f"task {task_id} failed: {failure.text[:500]}", failure.status_code, JOB_GET)


class _ClientBase:
    """Configuration and request planning shared by both clients."""

    _http_class: Callable[..., Any]  # httpx.Client or httpx.AsyncClient
    _backoff_sleep: Callable[[float], Any]  # time.sleep or asyncio.sleep

    def __init__(
        self,
        base_url: str | Sequence[str] = DEFAULT_URL,
        token: str | None = None,
        timeout: float = 120.0,
        max_retries: int | None = None,
        backoff: float = 0.5,
        chunk_size: int = 32,
        max_concurrency: int = 4,
        encoding: Encoding = "npy",
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
        retry_for: float | None = 300.0,
    ) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}; got {encoding!r}")
        if chunk_size < 1 or max_concurrency < 1:
            raise ValueError("chunk_size and max_concurrency must be >= 1")
        self._replicas = _Replicas(base_url)
        self.base_urls = list(self._replicas.urls)
        self.base_url = self.base_urls[0]
        self.timeout = timeout
        self.chunk_size = chunk_size
        self.max_concurrency = max_concurrency
        self.encoding: Encoding = encoding
        self.max_request_bytes = max_request_bytes
        self.retry = RetryPolicy(retry_for=retry_for, max_retries=max_retries, backoff=backoff)
        self._headers = {"user-agent": f"rewardscope-client/{__version__}"}
        if token:
            self._headers["authorization"] = f"Bearer {token}"
        self._http = self._http_class(**self._http_options(transport))
        self._sleep: Callable[[float], Any] = type(self)._backoff_sleep  # tests replace it to record backoffs

    def score_async(
        self, images: Images, prompts: Prompts, metadata: Metadata = None, **options: Unpack[ScoreOptions]
    ) -> Any:
        """score() in the background: returns at once with a concurrent.futures.Future (RewardClient) or an
        asyncio.Task (AsyncRewardClient), so sampling can overlap scoring. Pixels are copied before returning:
        the caller may reuse its buffers immediately."""
        plan = self._score_plan("/score", images, prompts, metadata, copy=True, **score_fields(options))
        return self._in_background(plan)

    def _in_background(self, plan: _Plan) -> Any:
        raise NotImplementedError

    def _http_options(self, transport: Any) -> dict[str, Any]:
        # Chunk workers and score_async callers can each hold a connection at once.
        limits = httpx.Limits(
            max_connections=2 * self.max_concurrency, max_keepalive_connections=2 * self.max_concurrency
        )
        options: dict[str, Any] = {  # no base_url: each _Send carries its replica's full URL
            "headers": self._headers,
            "timeout": httpx.Timeout(self.timeout),
            "limits": limits,
        }
        if transport is not None:
            options["transport"] = transport
        return options

    # -- Plans: what to send, chunk by chunk ---------------------------------------------------------------
    def _score_plan(
        self, path: str, images: Images, prompts: Prompts, metadata: Metadata, copy: bool = False, **fields: Any
    ) -> _Plan:
        sources, prompt_list, metadata_list = prepare(images, prompts, metadata, copy=copy)

        def build(chunk: range) -> list[dict[str, Any]]:
            return [
                item_entry(sources[index], prompt_list[index], metadata_list[index], self.encoding, **fields)
                for index in chunk
            ]

        return _Plan(path, "items", chunk_ranges(len(sources), self.chunk_size), build)

    def _match_plan(
        self, images: Images, prompts: Prompts, variant: str, metadata: Metadata, profile: Profile
    ) -> _Plan:
        return self._score_plan("/match", images, prompts, metadata, variant=variant, profile=profile)

    def _rank_plan(self, groups: Sequence[Any], rewards: Rewards, profile: Profile) -> _Plan:
        prepared = prepare_groups(groups)

        def build(chunk: range) -> list[dict[str, Any]]:
            return [rank_group_entry(*prepared[index], self.encoding) for index in chunk]

        chunks = group_chunks([len(candidates) for _, candidates, _ in prepared], self.chunk_size)
        extra = {"rewards": rewards_spec(rewards), "profile": profile}
        return _Plan(
            "/rank", "groups", chunks, build, {name: value for name, value in extra.items() if value is not None}
        )

    def _grad_plan(
        self, images: Images, prompts: Prompts, rewards: Rewards, profile: Profile, dtype: str
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

    def _job_items(self, images: Images, prompts: Prompts, metadata: Metadata, **fields: Any) -> list:
        plan = self._score_plan(JOB_SUBMIT, images, prompts, metadata, **fields)
        return [entry for chunk in plan.chunks for entry in plan.build(chunk)]

    # -- The client logic: each operation a generator of effects ----------------------------------------------
    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        retry: bool = True,
        replica: int | None = None,
    ) -> Steps:
        """Send until a final answer: success returns the response, a final error raises RewardServiceError."""
        return (yield from self._exchange(method, path, json, params, retry, replica))[1]

    def _exchange(
        self, method: str, path: str, json: Any, params: dict[str, Any] | None, retry: bool, replica: int | None
    ) -> Steps:
        """_request's work; returns (the replica that answered, its response). replica None: any replica, and a
        retryable failure sends the next attempt to the next replica at once (the client waits only once every
        replica has failed in a row); an index: that replica alone (a background job's). Retries stop when
        self.retry's budget (retry_for, max_retries) is spent; retry=False: one attempt."""
        replicas, budget = self._replicas, self.retry.start()
        index = replicas.first() if replica is None else replica
        failed_in_a_row = 0
        while True:
            outcome = yield _Send(method, replicas.urls[index] + path, json, params)
            response = outcome if isinstance(outcome, httpx.Response) else None
            if response is None and not isinstance(outcome, RETRYABLE_ERRORS):
                raise outcome
            if response is not None and response.is_success:
                replicas.answered(index, ok=True)
                return index, response
            retryable = RetryPolicy.retryable(response)
            if retryable:
                replicas.answered(index, ok=False)
            failed_in_a_row += 1
            failover = replica is None and failed_in_a_row < len(replicas.urls)
            delay = budget.failed(response, backoff=not failover)
            if delay is None or not retry:
                retried = f"{budget.summary()}{replicas.where(index)}" if retryable and retry else None
                raise _gave_up(outcome, path, budget, retried) from (outcome if response is None else None)
            if not failover:
                failed_in_a_row = 0
                yield _Sleep(delay)
            if replica is None:
                index = replicas.after(index)

    def _post_part(self, path: str, key: str, part: list[dict[str, Any]], extra: dict[str, Any]) -> Steps:
        try:
            response = yield from self._request("POST", path, json={key: part, **extra})
        except RewardServiceError as exc:
            if exc.status_code != 413 or len(part) < 2:
                raise
            middle = len(part) // 2  # too large for the server: halve until it fits (or one entry is left)
            first = yield from self._post_part(path, key, part[:middle], extra)
            return first + (yield from self._post_part(path, key, part[middle:], extra))
        return expect_list(_json(response, path), len(part), path)

    def _send_chunk(self, plan: _Plan, chunk: range) -> Steps:
        entries = yield _Compute(plan.build, (chunk,))
        # Items that failed a local check (protocol.local_failure) are answered here and never sent.
        to_send = [entry for entry in entries if LOCAL_FAILURE not in entry]
        answered: list[Any] = []
        for part in split_by_bytes(to_send, self.max_request_bytes) if to_send else []:
            answered.extend((yield from self._post_part(plan.path, plan.key, part, plan.extra)))
        remote = iter(answered)
        return [entry[LOCAL_FAILURE] if LOCAL_FAILURE in entry else next(remote) for entry in entries]

    def _get_json(self, method: str, path: str, params: dict[str, Any] | None = None) -> Steps:
        return _json((yield from self._request(method, path, params=params)), path)

    def _job_request(self, method: str, path: str, task_id: str, retry: bool = True) -> Steps:
        """A request about a background job, sent to the replica that accepted it (the first URL for an id this
        client did not submit): only that replica knows the job."""
        replica = self._replicas.jobs.get(task_id, 0)
        return (yield from self._request(method, path, params={"task_id": task_id}, retry=retry, replica=replica))

    def _job_json(self, method: str, path: str, task_id: str) -> Steps:
        return _json((yield from self._job_request(method, path, task_id)), path)

    # -- Operations (the public methods of both clients) ----------------------------------------------------
    def _score(
        self, images: Images, prompts: Prompts, metadata: Metadata = None, **options: Unpack[ScoreOptions]
    ) -> Steps:
        """Score N (image, prompt) pairs: POST /score in chunks. Failed items are NaN (see ScoreBatch).

        images: a list of PIL images / arrays / tensors / paths / bytes, or a batched array or tensor
        [B, 3, H, W] or [B, H, W, 3] (float in [0, 1] or uint8). prompts: N strings. metadata: N dicts or None
        (GenEval-style {"include": [...], "exclude": [...]}). rewards: names or {name: weight}; None: the
        service's default set. profile: a profile name ("train", "geneval", ...: GET /rewards lists them); None: the
        service's default.
        """
        plan = self._score_plan("/score", images, prompts, metadata, **score_fields(options))
        return ScoreBatch.from_items((yield _Execute(plan)))

    def _grad(
        self, images: Images, prompts: Prompts, rewards: Rewards = None, profile: Profile = None, dtype: str = "float16"
    ) -> Steps:
        """Reward values and d(weighted total)/d(pixels): POST /grad. images: float [B, 3, H, W] in [0, 1]
        (array or tensor) or a list of [3, H, W]; sent as `dtype` .npy. For autograd use RemoteReward."""
        plan, shapes = self._grad_plan(images, prompts, rewards, profile, dtype)
        return GradBatch.from_grad_items((yield _Execute(plan)), shapes)

    def _match(
        self,
        images: Images,
        prompts: Prompts,
        variant: str = "seed",
        metadata: Metadata = None,
        profile: Profile = None,
    ) -> Steps:
        """Detection matching score with its breakdown: POST /match (the service's schema names the variants).
        Per item: {"score", "variant", "details", "error", "error_code", "profile", "versions"}; score None where
        the item failed."""
        return (yield _Execute(self._match_plan(images, prompts, variant, metadata, profile)))

    def _rank(self, groups: Sequence[Any], rewards: Rewards = None, profile: Profile = None) -> Steps:
        """Rank candidates per prompt: POST /rank. groups: (prompt, images) or (prompt, images, metadata).
        Per group: {"scores", "order" (best first), "chosen", "rejected" (the DPO pair), "candidates"}."""
        return (yield _Execute(self._rank_plan(groups, rewards, profile)))

    def _rewards(self) -> Steps:
        """GET /rewards: the rewards served, defaults, profiles and limits."""
        return (yield from self._get_json("GET", "/rewards"))

    def _ready(self, timeout: float = 5.0) -> Steps:
        """GET /readyz once per replica, without retries: True when one answers 200 (failover makes it usable)."""
        for url in self._replicas.urls:
            outcome = yield _Send("GET", url + "/readyz", timeout=timeout)
            if isinstance(outcome, httpx.Response) and outcome.status_code == 200:
                return True
        return False

    def _submit(
        self, images: Images, prompts: Prompts, metadata: Metadata = None, **options: Unpack[ScoreOptions]
    ) -> Steps:
        """Queue a background scoring job (one request, not chunked): POST /jobs/score/submit; returns its id.
        The job stays with the replica that accepted it: its status, result, cancel and delete go there."""
        items = yield _Compute(functools.partial(self._job_items, **score_fields(options)), (images, prompts, metadata))
        replica, response = yield from self._exchange("POST", JOB_SUBMIT, {"items": items}, None, True, None)
        task_id = str(_json(response, JOB_SUBMIT)["task_id"])
        self._replicas.jobs[task_id] = replica
        return task_id

    def _status(self, task_id: str) -> Steps:
        """The job's status as the server names it (pending, in_progress, success, failure, cancelled)."""
        return str((yield from self._job_json("GET", JOB_STATUS, task_id))["status"])

    def _cancel(self, task_id: str) -> Steps:
        """Cancel a queued or running job; returns its status afterwards."""
        return str((yield from self._job_json("PUT", JOB_CANCEL, task_id))["status"])

    def _delete(self, task_id: str) -> Steps:
        """Forget a job and its stored input or result (a running one stops)."""
        yield from self._job_request("DELETE", JOB_DELETE, task_id)
        self._replicas.jobs.pop(task_id, None)

    def _result(self, task_id: str, wait: bool = True, poll: float = 0.5, timeout: float | None = None) -> Steps:
        """The job's ScoreBatch. wait: poll every `poll` s until it finishes (TimeoutError after `timeout` s);
        wait=False checks once. A failed or canceled job raises RewardServiceError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = yield from self._status(task_id)
            state = job_state(status)
            if state != "running":
                break
            if not wait or (deadline is not None and time.monotonic() >= deadline):
                raise TimeoutError(f"task {task_id} is still {status}")
            yield _Sleep(poll, poll=True)
        if state == "canceled":
            raise RewardServiceError(f"task {task_id} was canceled", None, JOB_STATUS)
        if state == "failed":
            try:
                response = yield from self._job_request("GET", JOB_GET, task_id, retry=False)
            except RewardServiceError as exc:
                raise _job_failure(task_id, exc) from None
            raise _job_failure(task_id, response)
        answer = yield from self._job_json("GET", JOB_GET, task_id)
        return ScoreBatch.from_items(expect_list(answer, None, JOB_GET))


OPERATIONS = ("score", "grad", "match", "rank", "rewards", "ready", "submit", "status", "cancel", "delete", "result")


def _bind(client_class: type, driver: Callable[[Callable[..., Steps]], Callable[..., Any]]) -> type:
    """Give a client class each operation of _ClientBase as a public method run by its driver."""
    for name in OPERATIONS:
        method = driver(getattr(_ClientBase, f"_{name}"))
        method.__name__, method.__qualname__ = name, f"{client_class.__name__}.{name}"
        setattr(client_class, name, method)
    return client_class


def _blocking(operation: Callable[..., Steps]) -> Callable[..., Any]:
    @functools.wraps(operation)
    def method(self: RewardClient, *args: Any, **kwargs: Any) -> Any:
        return self._drive(operation(self, *args, **kwargs))

    return method


def _awaitable(operation: Callable[..., Steps]) -> Callable[..., Any]:
    @functools.wraps(operation)
    async def method(self: AsyncRewardClient, *args: Any, **kwargs: Any) -> Any:
        return await self._drive(operation(self, *args, **kwargs))

    return method


def _advance(steps: Steps, outcome: Any) -> tuple[bool, Any]:
    """One step of an operation: (False, the next effect) or (True, its result)."""
    try:
        return False, steps.send(outcome)
    except StopIteration as done:
        return True, done.value


def _send_options(effect: _Send) -> dict[str, Any]:
    options: dict[str, Any] = {"json": effect.json, "params": effect.params}
    if effect.timeout is not None:
        options["timeout"] = effect.timeout
    return options


class RewardClient(_ClientBase):
    """Synchronous client of the rewardscope service.

    Large batches are split into chunks of `chunk_size` items, sent concurrently by up to `max_concurrency`
    threads over one pooled connection set, and reassembled in input order. Requests answered 503/429
    (or 502/504), or lost to connection errors and timeouts, are resent whole for up to `retry_for` seconds
    (default 300: a service restart or a brief outage costs a pause, not the run; None: no time limit) and, when
    `max_retries` is given, at most that many times (0: never), with exponential backoff (`backoff` seconds,
    doubling up to 30 s, with jitter; the server's Retry-After wins). Other 4xx/5xx answers raise
    RewardServiceError at once with the server's message. A chunk answered 413 is split in two and sent again;
    chunks are also kept under `max_request_bytes` before sending.

    `base_url` may be a list of URLs (replicas of the service). /score, /match, /rank, /grad and /rewards
    requests start on the replicas in turn; a retryable failure sends the next attempt to the next replica at
    once, and the client backs off only when every replica has failed in a row. A background job (`submit`)
    stays with the replica that accepted it: its status, result, cancel and delete go there.

    `encoding` is the transport for arrays and tensors: "npy" (default, lossless), "png" or "jpeg".
    Per-item failures never raise: their rewards are NaN, with the message in `ScoreBatch.errors`.
    `transport` is handed to httpx (tests pass an httpx.MockTransport).
    """

    _http_class = httpx.Client
    _backoff_sleep = staticmethod(time.sleep)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._pools_lock = threading.Lock()

    def _drive(self, steps: Steps) -> Any:
        """Run an operation to its end with blocking calls."""
        finished, value = _advance(steps, None)
        while not finished:
            finished, value = _advance(steps, self._perform(value))
        return value

    def _perform(self, effect: Any) -> Any:
        if isinstance(effect, _Send):
            try:
                return self._http.request(effect.method, effect.url, **_send_options(effect))
            except httpx.HTTPError as exc:
                return exc
        if isinstance(effect, _Sleep):
            return (time.sleep if effect.poll else self._sleep)(effect.seconds)
        if isinstance(effect, _Compute):
            return effect.function(*effect.args)
        return self._execute(effect.plan)

    def _pool(self, name: str) -> ThreadPoolExecutor:
        with self._pools_lock:
            if name not in self._pools:
                self._pools[name] = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix=f"rewardscope-{name}")
            return self._pools[name]

    def _execute(self, plan: _Plan) -> list[Any]:
        """Send every chunk (on threads when there are several) and return the results in input order."""
        if len(plan.chunks) <= 1:
            return [result for chunk in plan.chunks for result in self._drive(self._send_chunk(plan, chunk))]
        futures = [self._pool("chunks").submit(self._drive, self._send_chunk(plan, chunk)) for chunk in plan.chunks]
        try:
            return [result for future in futures for result in future.result()]
        except BaseException:
            for future in futures:
                future.cancel()
            raise

    def _in_background(self, plan: _Plan) -> Future[ScoreBatch]:
        return self._pool("calls").submit(lambda: ScoreBatch.from_items(self._execute(plan)))

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
    are those of RewardClient (the same operations, driven with awaits). Use within one event loop; close with
    `await client.close()` or `async with`.
    """

    _http_class = httpx.AsyncClient
    _backoff_sleep = staticmethod(asyncio.sleep)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._semaphore = asyncio.Semaphore(self.max_concurrency)

    async def _drive(self, steps: Steps) -> Any:
        """Run an operation to its end with awaits."""
        finished, value = _advance(steps, None)
        while not finished:
            finished, value = _advance(steps, await self._perform(value))
        return value

    async def _perform(self, effect: Any) -> Any:
        if isinstance(effect, _Send):
            try:
                return await self._http.request(effect.method, effect.url, **_send_options(effect))
            except httpx.HTTPError as exc:
                return exc
        if isinstance(effect, _Sleep):
            return await (asyncio.sleep if effect.poll else self._sleep)(effect.seconds)
        if isinstance(effect, _Compute):
            return await asyncio.to_thread(effect.function, *effect.args)
        return await self._execute(effect.plan)

    async def _send_chunk_limited(self, plan: _Plan, chunk: range) -> list[Any]:
        async with self._semaphore:
            return await self._drive(self._send_chunk(plan, chunk))

    async def _execute(self, plan: _Plan) -> list[Any]:
        tasks = [asyncio.ensure_future(self._send_chunk_limited(plan, chunk)) for chunk in plan.chunks]
        try:
            answers = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        return [result for answer in answers for result in answer]

    def _in_background(self, plan: _Plan) -> asyncio.Task[ScoreBatch]:
        async def run() -> ScoreBatch:
            return ScoreBatch.from_items(await self._execute(plan))

        return asyncio.ensure_future(run())

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


_bind(RewardClient, _blocking)
_bind(AsyncRewardClient, _awaitable)
