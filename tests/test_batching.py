"""service.batching: the work-conserving Batcher behind /score, /match and /rank, and its decode-ahead budget.
The model function here blocks on events the test sets, so which requests share a batch is decided by the test,
not by timing."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Sequence

import pytest
from rewardscope.service.batching import Batcher, Budget, Overloaded


class Model:
    """Records every batch; each call blocks until the test releases it (one event per call)."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.release: list[threading.Event] = [threading.Event() for _ in range(16)]
        self.started = threading.Event()
        self.fail_on = fail_on

    def __call__(self, items: list[str]) -> list[str]:
        call = len(self.batches)
        self.batches.append(list(items))
        self.started.set()
        assert self.release[call].wait(10), "the test never released this batch"
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"cannot score {self.fail_on}")
        return [item.upper() for item in items]

    def release_all(self) -> None:
        for event in self.release:
            event.set()


def model_and_batcher(fail_on: str | None = None, **options) -> tuple[Model, Batcher]:
    """A blocking Model and a Batcher (built with `options`) in front of it."""
    model = Model(fail_on)
    return model, Batcher(model, **options)


def prepared(raw: Sequence[str]) -> list[str]:
    return [f"{item}!" for item in raw]


async def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.005)


async def occupy(batcher: Batcher, model: Model) -> asyncio.Task:
    """Submit a one-item request and wait until the model runs it, so that the requests after it queue."""
    first = asyncio.create_task(batcher.submit(["a"], prepared))
    await until(lambda: len(model.batches) == 1)
    return first


async def queue_in_order(batcher: Batcher, requests: Sequence[Sequence[str]]) -> list[asyncio.Task]:
    """Submit each request once the one before it is queued (decoding runs on threads: this fixes the order)."""
    tasks = []
    for raw in requests:
        expected = batcher.queued_items + len(raw)
        tasks.append(asyncio.create_task(batcher.submit(raw, prepared)))
        await until(lambda expected=expected: batcher.queued_items == expected)
    return tasks


def test_a_lone_request_runs_at_once_and_requests_queued_meanwhile_share_the_next_batch():
    model, batcher = model_and_batcher(max_batch_size=8, max_latency_s=60)

    async def scenario():
        first = asyncio.create_task(batcher.submit(["a"], prepared))
        await until(lambda: len(model.batches) == 1)  # nothing else queued, and it did not wait for company
        later = await queue_in_order(batcher, [[name, name * 2] for name in "bcd"])
        model.release[0].set()
        model.release[1].set()
        return await first, [await task for task in later]

    first, later = asyncio.run(scenario())
    assert model.batches == [["a!"], ["b!", "bb!", "c!", "cc!", "d!", "dd!"]]
    assert first == ["A!"]
    assert later == [["B!", "BB!"], ["C!", "CC!"], ["D!", "DD!"]]  # each request gets its own answers, in order
    batcher.shutdown()


def test_batches_are_capped_in_items_and_an_oversized_request_runs_alone():
    model, batcher = model_and_batcher(max_batch_size=4, max_latency_s=60)

    async def scenario():
        first = await occupy(batcher, model)
        sizes = [2, 2, 1, 6, 1]
        tasks = await queue_in_order(batcher, [[f"r{n}i{k}" for k in range(size)] for n, size in enumerate(sizes)])
        model.release_all()
        await first
        return [len(answer) for answer in [await task for task in tasks]]

    assert asyncio.run(scenario()) == [2, 2, 1, 6, 1]
    assert [len(batch) for batch in model.batches] == [1, 4, 1, 6, 1]  # 2+2 | 1 (6 does not fit) | 6 alone | 1
    batcher.shutdown()


def test_a_failing_batch_is_retried_request_by_request_so_only_the_bad_request_fails():
    model, batcher = model_and_batcher(fail_on="bad!", max_batch_size=8, max_latency_s=60)

    async def scenario():
        first = await occupy(batcher, model)
        tasks = await queue_in_order(batcher, [["x", "y"], ["bad"], ["z"]])
        model.release_all()
        await first
        return await asyncio.gather(*tasks, return_exceptions=True)

    good, bad, last = asyncio.run(scenario())
    assert good == ["X!", "Y!"] and last == ["Z!"]
    assert isinstance(bad, ValueError) and "bad!" in str(bad)
    assert model.batches[1:] == [["x!", "y!", "bad!", "z!"], ["x!", "y!"], ["bad!"], ["z!"]]
    batcher.shutdown()


def test_a_request_is_refused_at_once_while_the_work_ahead_exceeds_the_latency_budget():
    model, batcher = model_and_batcher(max_batch_size=8, max_latency_s=1.0)
    batcher.item_seconds = 0.1  # as if measured: 10 items ahead fill the budget

    async def scenario():
        first = asyncio.create_task(batcher.submit(["a"] * 6, prepared))
        await until(lambda: len(model.batches) == 1)
        fits = asyncio.create_task(batcher.submit(["b"] * 5, prepared))  # 6 ahead: 0.6 s, within budget
        await until(lambda: batcher.queued_items == 5)
        with pytest.raises(Overloaded, match="latency budget") as refused:
            await batcher.submit(["c"], prepared)  # 11 items ahead: 1.1 s; refused without queueing
        assert refused.value.retry_after_s == 1  # the queue is back within the budget after ~0.1 s
        assert batcher.queued_items == 5
        model.release_all()
        return await first, await fits

    first, fits = asyncio.run(scenario())
    assert len(first) == 6 and len(fits) == 5
    assert [len(batch) for batch in model.batches] == [6, 5]
    assert batcher.item_seconds is not None and batcher.item_seconds < 0.1  # re-measured from the real batches
    batcher.shutdown()


def test_a_lone_request_is_served_whatever_its_own_size():
    # The budget governs queueing behind other work: 256 items at 0.1 s each (25.6 s) on an idle service are
    # served, and Retry-After never invites a retry that could not succeed.
    batcher = Batcher(lambda items: [item.upper() for item in items], max_batch_size=64, max_latency_s=1.0)
    batcher.item_seconds = 0.1
    raw = [f"i{k}" for k in range(256)]
    assert asyncio.run(batcher.submit(raw, prepared)) == [f"I{k}!" for k in range(256)]
    batcher.shutdown()


def test_a_request_whose_caller_went_away_never_reaches_the_model():
    model, batcher = model_and_batcher(max_batch_size=8, max_latency_s=60)

    async def scenario():
        first = await occupy(batcher, model)
        gone, kept = await queue_in_order(batcher, [["gone"], ["kept"]])
        gone.cancel()
        model.release_all()
        await first
        return await kept

    assert asyncio.run(scenario()) == ["KEPT!"]
    assert model.batches == [["a!"], ["kept!"]]
    assert batcher.ahead.held == 0 and batcher.ahead.waiting == 0  # the cancelled request gave its budget back
    batcher.shutdown()


def test_decoding_ahead_of_the_model_is_bounded_in_items_and_first_come_first_served():
    model, batcher = model_and_batcher(max_batch_size=64, max_latency_s=60, max_ahead_items=5)
    decoded: list[str] = []

    def prepare(raw: Sequence[str]) -> list[str]:
        decoded.extend(raw)
        return prepared(raw)

    async def scenario():
        first = asyncio.create_task(batcher.submit(["a", "a"], prepare))
        await until(lambda: len(model.batches) == 1)
        tasks = [asyncio.create_task(batcher.submit(raw, prepare)) for raw in (["b", "b"], ["c", "c"], ["d"])]
        await until(lambda: batcher.queued_items == 2)
        await asyncio.sleep(0.05)
        held = list(decoded)  # a (running) and b fit in 5 items; c waits, and d waits behind c though it would fit
        model.release_all()
        await first
        await asyncio.gather(*tasks)
        return held

    assert asyncio.run(scenario()) == ["a", "a", "b", "b"]
    assert sorted(decoded) == ["a", "a", "b", "b", "c", "c", "d"]
    assert batcher.ahead.held == 0
    batcher.shutdown()


def test_the_item_budget_grants_an_oversized_request_when_nothing_else_is_held():
    budget = Budget(4)

    async def scenario():
        await budget.acquire(3)
        big = asyncio.create_task(budget.acquire(10))
        await asyncio.sleep(0.01)
        assert not big.done() and budget.waiting == 10
        budget.release(3)
        await big
        return budget.held

    assert asyncio.run(scenario()) == 10


def test_with_two_lanes_a_lone_batch_keeps_every_core_and_overlapping_batches_run_narrow():
    state = threading.local()
    narrow_flags: dict[str, bool] = {}

    @contextlib.contextmanager
    def narrow():
        state.narrow = True
        try:
            yield
        finally:
            state.narrow = False

    model = Model()

    def run(items: list[str]) -> list[str]:
        narrow_flags[items[0]] = getattr(state, "narrow", False)
        return model(items)

    batcher = Batcher(run, max_batch_size=8, max_latency_s=60, lanes=2, narrow=narrow)

    async def scenario():
        alone = asyncio.create_task(batcher.submit(["alone"], prepared))
        await until(lambda: len(model.batches) == 1)
        beside = asyncio.create_task(batcher.submit(["beside"], prepared))
        await until(lambda: len(model.batches) == 2)  # the second lane took it while the first still runs
        assert batcher.busy == 2
        (queued,) = await queue_in_order(batcher, [["queued"]])  # both lanes busy: it waits
        await asyncio.sleep(0.05)
        assert len(model.batches) == 2
        model.release[0].set()  # "alone" ends; "queued" starts beside the still running "beside"
        await until(lambda: len(model.batches) == 3)
        model.release[1].set()
        model.release[2].set()
        await asyncio.gather(alone, beside, queued)
        model.release[3].set()
        return await batcher.submit(["later"], prepared)  # nothing else running or queued: every core again

    assert asyncio.run(scenario()) == ["LATER!"]
    assert [batch[0] for batch in model.batches] == ["alone!", "beside!", "queued!", "later!"]
    assert narrow_flags == {"alone!": False, "beside!": True, "queued!": True, "later!": False}
    batcher.shutdown()


def test_a_request_larger_than_the_decode_ahead_budget_is_decoded_and_scored_in_slices():
    slices: list[int] = []

    def prepare(raw: Sequence[str]) -> list[str]:
        slices.append(len(raw))
        return prepared(raw)

    batcher = Batcher(
        lambda items: [item.upper() for item in items], max_batch_size=64, max_latency_s=60, max_ahead_items=4
    )
    raw = [f"i{k}" for k in range(10)]
    assert asyncio.run(batcher.submit(raw, prepare)) == [f"I{k}!" for k in range(10)]
    assert slices == [4, 4, 2]
    batcher.shutdown()


def test_a_background_job_waits_past_the_latency_budget_instead_of_being_refused():
    model, batcher = model_and_batcher(max_batch_size=8, max_latency_s=1.0)
    batcher.item_seconds = 1.5  # as if measured: the one item running fills the budget

    async def scenario():
        first = await occupy(batcher, model)
        with pytest.raises(Overloaded):
            await batcher.submit(["x", "y"], prepared)
        job = asyncio.create_task(batcher.submit(["x", "y"], prepared, background=True))
        await until(lambda: batcher.queued_items == 2)
        model.release_all()
        return await first, await job

    assert asyncio.run(scenario()) == (["A!"], ["X!", "Y!"])
    batcher.shutdown()


def test_background_work_runs_only_when_no_interactive_request_is_queued_and_never_counts_against_the_budget():
    model, batcher = model_and_batcher(max_batch_size=8, max_latency_s=1.0)
    batcher.item_seconds = 0.1

    async def scenario():
        first = await occupy(batcher, model)
        job = asyncio.create_task(batcher.submit(["j"] * 30, prepared, background=True))
        await until(lambda: batcher.queued_items == 30)
        assert batcher.items_ahead() == 1 and batcher.over_budget() is None  # 30 queued job items: not counted
        (interactive,) = await queue_in_order(batcher, [["i"]])
        model.release_all()
        return await first, await interactive, await job

    first, interactive, job = asyncio.run(scenario())
    assert interactive == ["I!"] and job == ["J!"] * 30
    assert model.batches[1] == ["i!"]  # queued after the job, scored before it
    batcher.shutdown()


def test_decoded_bytes_slice_a_request_and_bound_what_all_requests_hold():
    slices: list[list[str]] = []
    held: list[int] = []

    def prepare(raw: Sequence[str]) -> list[str]:
        slices.append(list(raw))
        held.append(batcher.ahead_bytes.held)
        return prepared(raw)

    sizes = {"big": 120, "small": 10, "huge": 1000}
    batcher = Batcher(
        lambda items: [item.upper() for item in items],
        max_batch_size=64,
        max_latency_s=60,
        max_ahead_bytes=400,
        max_request_bytes=250,
    )
    raw = ["big", "big", "small", "big", "huge", "small"]
    answers = asyncio.run(batcher.submit(raw, prepare, lambda items: [sizes[item] for item in items]))
    assert answers == [f"{item.upper()}!" for item in raw]
    # within 250 bytes per slice; an item over the budget alone is a slice of its own, granted with nothing held
    assert slices == [["big", "big", "small"], ["big"], ["huge"], ["small"]]
    assert held == [250, 120, 1000, 10]
    assert batcher.ahead_bytes.held == 0
    batcher.shutdown()


def test_requests_wait_first_come_first_served_for_decoded_bytes_held_by_others():
    model = Model()
    sizes = {"a": 300, "b": 300, "c": 50}
    batcher = Batcher(model, max_batch_size=8, max_latency_s=60, max_ahead_bytes=400)
    cost = lambda items: [sizes[item] for item in items]  # noqa: E731

    async def scenario():
        first = asyncio.create_task(batcher.submit(["a"], prepared, cost))
        await until(lambda: len(model.batches) == 1)
        second = asyncio.create_task(batcher.submit(["b"], prepared, cost))  # 300 + 300 > 400: waits
        await until(lambda: batcher.ahead_bytes.waiting == 300)
        third = asyncio.create_task(batcher.submit(["c"], prepared, cost))  # would fit, but waits behind b
        await until(lambda: batcher.ahead_bytes.waiting == 350)
        assert batcher.ahead_bytes.held == 300 and batcher.queued_items == 0
        model.release_all()
        return await first, await second, await third

    assert asyncio.run(scenario()) == (["A!"], ["B!"], ["C!"])
    assert batcher.ahead_bytes.held == 0
    batcher.shutdown()
