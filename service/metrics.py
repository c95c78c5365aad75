"""Prometheus series of rewardscope, kept in their own registry and appended to BentoML's /metrics output.
Latency per reward, items, errors by code, reward values, batch sizes and model load time."""

from __future__ import annotations

import collections
import gc
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

# Bucket bounds: seconds (latency), reward values, items per batch.
SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
VALUES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 2.5, 10.0)
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _histogram(name: str, documentation: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> Histogram:
    return Histogram(f"rewardscope_{name}", documentation, labels, registry=REGISTRY, buckets=buckets)


REWARD_LATENCY = _histogram("reward_latency_seconds", "Time one reward spends on one batch", ("reward",), SECONDS[1:])
ITEMS = Counter("rewardscope_items_total", "Items scored, by endpoint", ["endpoint"], registry=REGISTRY)
ERRORS = Counter("rewardscope_errors_total", "Per-item errors, by code", ["code"], registry=REGISTRY)
REWARD_VALUE = _histogram(
    "reward_value", "Distribution of reward values (failed items are not observed)", ("reward",), VALUES
)
BATCH_SIZE = _histogram("batch_size", "Items per batched call after adaptive batching", ("endpoint",), SIZES)
QUEUE_WAIT = _histogram(
    "queue_wait_seconds", "Seconds the oldest request of a batch waited, decoded, for the model thread", (), SECONDS
)
GC_PAUSE = _histogram(
    "gc_pause_seconds",
    "Python garbage-collector pauses (the GIL is held: every request in flight waits), by generation",
    ("generation",),
    SECONDS[:9],
)
MODEL_LOAD = Gauge(
    "rewardscope_model_load_seconds", "Seconds to load a Scorer's models", ["rewards"], registry=REGISTRY
)
REFUSALS = Counter(
    "rewardscope_refusals_total",
    "Requests refused before scoring, by reason (inflight, latency_budget, receiving, stalled, too_large, ...)",
    ["reason"],
    registry=REGISTRY,
)
DECODED_BYTES = Gauge(
    "rewardscope_decoded_bytes_in_flight",
    "Decoded image bytes (from headers) held by accepted requests: decoding, queued or being scored",
    registry=REGISTRY,
)
JOBS_QUEUED = Gauge("rewardscope_jobs_queued", "Background jobs pending or running", registry=REGISTRY)
JOBS_STORED_BYTES = Gauge(
    "rewardscope_jobs_stored_bytes",
    "Bytes the job store holds: inputs of queued jobs, results of finished ones",
    registry=REGISTRY,
)
DRAINING = Gauge(
    "rewardscope_draining", "1 once SIGTERM was received: refusing new work, finishing the rest", registry=REGISTRY
)
GOLDEN_OK = Gauge("rewardscope_golden_check_ok", "1 when the start-up golden check passed", registry=REGISTRY)


def observe_reward(name: str, seconds: float, items: int) -> None:
    REWARD_LATENCY.labels(reward=name).observe(seconds)


def observe_batch(items: int, waited_s: float, seconds: float) -> None:
    QUEUE_WAIT.observe(waited_s)
    flush_gc()


_gc_started: list[float] = []
_gc_pauses: collections.deque[tuple[str, float]] = collections.deque(maxlen=10_000)


def _time_gc(phase: str, info: dict) -> None:
    # Runs inside whatever allocation triggered the collection, possibly while a metric's lock is held: only
    # lock-free appends here; flush_gc() moves the pauses into the histogram from ordinary code.
    if phase == "start":
        _gc_started.append(time.perf_counter())
    elif _gc_started:
        _gc_pauses.append((str(info["generation"]), time.perf_counter() - _gc_started.pop()))


def watch_gc() -> None:
    """Time every garbage collection into rewardscope_gc_pause_seconds (idempotent)."""
    if _time_gc not in gc.callbacks:
        gc.callbacks.append(_time_gc)


def flush_gc() -> None:
    while _gc_pauses:
        generation, seconds = _gc_pauses.popleft()
        GC_PAUSE.labels(generation=generation).observe(seconds)


def render() -> str:
    flush_gc()
    return generate_latest(REGISTRY).decode("utf-8")
