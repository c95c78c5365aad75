"""Work-conserving dynamic batching: one model thread, and whatever requests queued while it was busy form its
next batch. It never holds a batch back to wait for more (BentoML's CorkDispatcher does, when its optimiser
expects more requests soon; on a CPU, where a larger batch buys the forward nothing, that wait is idle time).
Batches still form under load, so a GPU gets them; `max_batch_size` caps them in items.

Ahead of the model thread, each request is decoded (`prepare`, on other threads) while earlier batches run. What
decoded pixels may be held is bounded twice, before anything is decoded: in items (`max_ahead_items`) and in
decoded bytes (`max_ahead_bytes`, each item's cost read from its image header by `cost`). Requests beyond either
wait, first come first served, before decoding; a request larger than `max_ahead_items` items or
`max_request_bytes` decoded bytes is decoded and scored in slices, one slice held at a time.

Lanes: with `lanes` > 1, up to that many batches run at once on their own model threads. A batch that starts
while another runs, or with more queued behind it, runs inside `narrow()` (for the detector: one onnxruntime
thread instead of all cores), so two batches share the cores rather than each spreading over all of them and
waiting on the other; a lone batch keeps every core. On 2 cores this overlaps one batch's Python and decoding
work with the other's forward pass.

Admission: while the interactive work already accepted would, at the measured seconds per item, take longer than
`max_latency_s`, a new request is refused at once (Overloaded, answered 503 + Retry-After) instead of joining a
queue it cannot leave in time. A request's own size never refuses it: on an idle service any request within the
item limit is served. Background work (`background=True`: jobs) never counts against that budget, is never
refused, and runs only when no interactive request is queued. A batch that raises is retried request by request,
so one request's failure is not its neighbours'."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

S = TypeVar("S")
T = TypeVar("T")
R = TypeVar("R")


class Overloaded(RuntimeError):
    """The work ahead exceeds the latency budget: answer 503 with Retry-After (`retry_after_s`, when the queue
    ahead should have drained back within the budget)."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class _Job(Generic[T, R]):
    items: Sequence[T]
    future: asyncio.Future[list[R]]
    background: bool = False
    enqueued: float = field(default_factory=time.monotonic)


class Budget:
    """At most `limit` units (items, or decoded bytes) held at once, granted first come first served; a request
    larger than the limit is granted when nothing else is held (the Batcher slices such requests first)."""

    def __init__(self, limit: int, on_change: Callable[[int], None] | None = None) -> None:
        self.limit = max(1, limit)
        self.held = 0
        self.on_change = on_change  # told the units held after each change (a metrics gauge)
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def waiting(self) -> int:
        return sum(count for count, future in self._waiters if not future.done())

    def _fits(self, count: int) -> bool:
        return self.held == 0 or self.held + count <= self.limit

    async def acquire(self, count: int) -> None:
        if not self._waiters and self._fits(count):
            self._hold(count)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((count, future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # granted just as the caller went away
                self.release(count)
            else:
                self._grant()  # those queued behind it may fit now
            raise

    @contextlib.asynccontextmanager
    async def holding(self, count: int) -> AsyncIterator[None]:
        """`count` units acquired for the body of the `async with`, released after it."""
        await self.acquire(count)
        try:
            yield
        finally:
            self.release(count)

    def _hold(self, count: int) -> None:
        self.held += count
        if self.on_change is not None:
            self.on_change(self.held)

    def release(self, count: int) -> None:
        self._hold(-count)
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            waiting, future = self._waiters[0]
            if future.done():  # cancelled while waiting
                self._waiters.popleft()
                continue
            if not self._fits(waiting):
                break
            self._waiters.popleft()
            self._hold(waiting)
            future.set_result(None)


class Batcher(Generic[S, T, R]):
    """`await batcher.submit(raw, prepare)` -> `run(prepare(raw))`'s answers for those items, computed in one
    batch with the requests queued beside them. `run` takes a flat list and returns one answer per item, in order;
    it runs on the batcher's model threads, at most `lanes` batches at once. It binds to the first event loop
    using it."""

    def __init__(
        self,
        run: Callable[[list[T]], list[R]],
        max_batch_size: int,
        max_latency_s: float,
        max_ahead_items: int = 256,
        max_ahead_bytes: int = 1 << 62,
        max_request_bytes: int | None = None,
        lanes: int = 1,
        narrow: Callable[[], contextlib.AbstractContextManager[object]] | None = None,
        name: str = "model",
        observe: Callable[[int, float, float], None] | None = None,
        observe_decoded: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or lanes < 1:
            raise ValueError(f"max_batch_size and lanes must be at least 1, got {max_batch_size} and {lanes}")
        self.run = run
        self.lanes = lanes
        self.narrow = narrow
        self.busy = 0  # lanes running a batch
        self._running: set[asyncio.Task[None]] = set()
        self.ahead = Budget(max_ahead_items)
        # Decoded bytes (from image headers) held ahead of the answers.
        self.ahead_bytes = Budget(max_ahead_bytes, observe_decoded)
        self.max_request_bytes = min(max_request_bytes or max_ahead_bytes, max_ahead_bytes)
        self.background_ahead = 0  # items of background requests among those the budgets hold or queue for
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_s
        self.observe = observe  # (items in the batch, seconds queued by its oldest request, seconds running)
        self._queue: collections.deque[_Job[T, R]] = collections.deque()
        self._background: collections.deque[_Job[T, R]] = collections.deque()  # taken only when _queue is empty
        self._executor = ThreadPoolExecutor(lanes, thread_name_prefix=f"rewardscope-{name}")
        self._wake: asyncio.Event | None = None
        self._consumer: asyncio.Task[None] | None = None
        self.queued_items = 0  # decoded, waiting for a model thread
        self.item_seconds: float | None = None  # moving average of model-thread seconds per item

    def items_ahead(self) -> int:
        """Interactive items accepted and not yet answered: waiting to decode, decoding, queued or running."""
        return self.ahead.held + self.ahead.waiting - self.background_ahead

    def expected_wait_s(self) -> float:
        """Seconds until the interactive work accepted is answered, at the measured rate (0 before any batch)."""
        return self.items_ahead() * (self.item_seconds or 0.0)

    def over_budget(self) -> Overloaded | None:
        """The refusal a new interactive request would get now (the work ahead of it exceeds the latency budget),
        or None. Cheap: the HTTP guard asks it before reading a request's body."""
        expected = self.expected_wait_s()
        if expected <= self.max_latency_s:
            return None
        return Overloaded(
            f"overloaded: {self.items_ahead()} items ahead would take about {expected:.1f}s,"
            f" over the {self.max_latency_s:g}s latency budget; retry later",
            retry_after_s=max(1, math.ceil(expected - self.max_latency_s)),
        )

    def _slices(self, costs: Sequence[int]) -> list[tuple[int, int]]:
        """[start, stop) runs of items, each within max_ahead_items items and max_request_bytes decoded bytes (a
        single item larger than that is a slice of its own)."""
        slices, start, held = [], 0, 0
        for index, cost in enumerate(costs):
            if index > start and (index - start >= self.ahead.limit or held + cost > self.max_request_bytes):
                slices.append((start, index))
                start, held = index, 0
            held += cost
        slices.append((start, len(costs)))
        return slices

    async def submit(
        self,
        raw: Sequence[S],
        prepare: Callable[[Sequence[S]], Sequence[T]],
        cost: Callable[[Sequence[S]], Sequence[int]] | None = None,
        background: bool = False,
    ) -> list[R]:
        """Decode `raw` with `prepare` (on a worker thread, once the decode-ahead budgets have room), then batch it.
        cost: each item's decoded bytes, read from its header (on a worker thread, before anything is decoded).
        background: never refused, and scored only when no interactive request is queued (jobs)."""
        if not raw:
            return []
        refusal = None if background else self.over_budget()
        if refusal is not None:
            raise refusal
        loop = asyncio.get_running_loop()
        costs = list(await loop.run_in_executor(None, cost, raw)) if cost is not None else [0] * len(raw)
        answers: list[R] = []
        for start, stop in self._slices(costs):
            answers.extend(await self._submit_slice(raw[start:stop], sum(costs[start:stop]), prepare, background))
        return answers

    async def _submit_slice(
        self, raw: Sequence[S], decoded_bytes: int, prepare: Callable[[Sequence[S]], Sequence[T]], background: bool
    ) -> list[R]:
        if background:
            self.background_ahead += len(raw)
        try:
            async with self.ahead.holding(len(raw)), self.ahead_bytes.holding(decoded_bytes):
                items = await asyncio.get_running_loop().run_in_executor(None, prepare, raw)
                return await self._batched(items, background)
        finally:
            if background:
                self.background_ahead -= len(raw)

    async def _batched(self, items: Sequence[T], background: bool = False) -> list[R]:
        loop = asyncio.get_running_loop()
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._consumer is None or self._consumer.done():
            self._consumer = loop.create_task(self._consume(), name="rewardscope-batcher")
        job: _Job[T, R] = _Job(items, loop.create_future(), background)
        (self._background if background else self._queue).append(job)
        self.queued_items += len(items)
        self._wake.set()
        try:
            return await job.future
        finally:
            if not job.future.done():  # the caller went away (client disconnected): drop the job if still queued
                job.future.cancel()

    def _take(self) -> list[_Job[T, R]]:
        """The oldest live requests whose items fit in one batch (always at least one request, whatever its size):
        interactive ones, else background ones."""
        jobs: list[_Job[T, R]] = []
        size = 0
        for queue in (self._queue, self._background):
            while queue:
                job = queue[0]
                if job.future.done():  # cancelled while queued
                    queue.popleft()
                    self.queued_items -= len(job.items)
                    continue
                if jobs and size + len(job.items) > self.max_batch_size:
                    return jobs
                queue.popleft()
                self.queued_items -= len(job.items)
                jobs.append(job)
                size += len(job.items)
            if jobs:
                return jobs
        return jobs

    async def _consume(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            jobs = self._take() if self.busy < self.lanes else []
            if not jobs:
                self._wake.clear()  # set again by the next request or the next lane to finish
                continue
            narrow = self.narrow is not None and self.lanes > 1 and (self.busy > 0 or self.queued_items > 0)
            self.busy += 1
            task = asyncio.get_running_loop().create_task(self._dispatch(jobs, narrow))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _dispatch(self, jobs: list[_Job[T, R]], narrow: bool) -> None:
        assert self._wake is not None
        size = sum(len(job.items) for job in jobs)
        started = time.monotonic()
        try:
            answers = await asyncio.get_running_loop().run_in_executor(self._executor, self._run_jobs, jobs, narrow)
        finally:
            self.busy -= 1
            self._wake.set()
        seconds = time.monotonic() - started
        # Seconds of throughput per item: narrow batches run side by side, one per lane.
        per_item = seconds / size / (self.lanes if narrow else 1)
        self.item_seconds = per_item if self.item_seconds is None else 0.8 * self.item_seconds + 0.2 * per_item
        if self.observe is not None:
            self.observe(size, started - jobs[0].enqueued, seconds)
        for job, answer in zip(jobs, answers, strict=True):
            if job.future.done():
                continue
            if isinstance(answer, BaseException):
                job.future.set_exception(answer)
            else:
                job.future.set_result(answer)

    def _run_jobs(self, jobs: list[_Job[T, R]], narrow: bool = False) -> list[list[R] | BaseException]:
        """On a model thread: the batch in one call; if that raises, each request alone."""
        flat = [item for job in jobs for item in job.items]
        try:
            with self.narrow() if narrow and self.narrow is not None else contextlib.nullcontext():
                answers = self.run(flat)
            if len(answers) != len(flat):
                raise RuntimeError(f"batch function returned {len(answers)} answers for {len(flat)} items")
        except Exception as exc:
            if len(jobs) == 1:
                log.exception("batch of %d items failed", len(flat))
                return [exc]
            log.exception("batch of %d requests failed; retrying request by request", len(jobs))
            return [self._run_jobs([job], narrow)[0] for job in jobs]
        out: list[list[R] | BaseException] = []
        start = 0
        for job in jobs:
            out.append(answers[start : start + len(job.items)])
            start += len(job.items)
        return out

    def shutdown(self) -> None:
        if self._consumer is not None:
            self._consumer.cancel()
        for task in list(self._running):
            task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
