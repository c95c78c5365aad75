"""The HTTP contract without I/O, shared by the sync and async clients: request bodies, chunking,
retry decisions and error messages. Nothing here sends a request."""

from __future__ import annotations

import base64
import email.utils
import io
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from .images import Encoding, InvalidImage, encode_image, is_torch_tensor, split_images
from .results import RewardServiceError

RewardSpec = Sequence[str] | Mapping[str, float]

# 503 (overloaded) and 429 (rate limited) are the service's "come back later"; 502/504 are the same
# answer from a proxy in front of it. Every other status is final.
RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
# Transport failures worth a second try: refused/reset connections, timeouts, a connection dropped mid-answer.
RETRYABLE_ERRORS: tuple[type[Exception], ...] = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)

# BentoML task states, plus the spellings other task runners use.
JOB_DONE = frozenset({"completed", "success"})
JOB_FAILED = frozenset({"failed", "failure"})
JOB_CANCELED = frozenset({"canceled", "cancelled"})

MAX_RANK_GROUPS = 64  # the service's limit of groups per /rank request


@dataclass
class RetryPolicy:
    """How long to keep sending a request that failed retryably, and how long to wait between attempts.

    A retryable outcome (a RETRYABLE_STATUS answer or a RETRYABLE_ERRORS transport failure) is sent again
    until `retry_for` seconds are spent (None: no time limit) and, when `max_retries` is given, at most that
    many times (0: never). Time spent is the wall-clock time since the call's first attempt or the backoff
    already slept, whichever is larger; no wait reaches past the deadline (the last one is cut short).

    Delay before backoff k (0-based): Retry-After (capped at max_retry_after), else
    min(backoff * 2**k, max_backoff); plus up to 10% (of backoff, or of the delay) random jitter so that
    clients refused together do not return together.
    """

    retry_for: float | None = 300.0
    max_retries: int | None = None
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_retry_after: float = 60.0
    rng: random.Random = field(default_factory=random.Random, repr=False)
    clock: Any = field(default=time.monotonic, repr=False)  # () -> seconds; tests pass a fake one

    def __post_init__(self) -> None:
        negative_time = self.retry_for is not None and self.retry_for < 0
        if negative_time or (self.max_retries is not None and self.max_retries < 0):
            raise ValueError("retry_for and max_retries must be >= 0 (or None: no limit)")

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        waited = parse_retry_after(retry_after)
        if waited is not None:
            waited = min(waited, self.max_retry_after)
            return waited + self.rng.uniform(0.0, 0.1 * self.backoff)
        base = min(self.backoff * (2.0**attempt), self.max_backoff)
        return base + self.rng.uniform(0.0, 0.1 * base)

    @staticmethod
    def retryable(response: httpx.Response | None) -> bool:
        """Whether a failed attempt may succeed when sent again; response None: it failed in transport."""
        return response is None or response.status_code in RETRYABLE_STATUS

    def allows(self, attempts: int, spent: float) -> bool:
        """Whether another attempt may follow `attempts` of them, `spent` seconds into the call."""
        if self.max_retries is not None and attempts > self.max_retries:
            return False
        return self.retry_for is None or spent < self.retry_for

    def next_delay(
        self, attempts: int, response: httpx.Response | None, spent: float = 0.0, backoffs: int | None = None
    ) -> float | None:
        """Seconds to wait before sending again after `attempts` tries, `spent` seconds into the call, or None
        when the outcome is final or the budget is spent. response None: the attempt failed in transport
        (connection error, timeout). backoffs: the waits so far (default attempts - 1) set the exponent."""
        if not self.retryable(response) or not self.allows(attempts, spent):
            return None
        retry_after = None if response is None else response.headers.get("retry-after")
        delay = self.delay(attempts - 1 if backoffs is None else backoffs, retry_after)
        return delay if self.retry_for is None else min(delay, self.retry_for - spent)

    def start(self) -> RetryBudget:
        """The retry state of one call, whose first attempt is about to go out."""
        return RetryBudget(self, self.clock())


@dataclass
class RetryBudget:
    """One call's retries under a RetryPolicy: attempts made, waits taken, time since its first attempt."""

    policy: RetryPolicy
    started: float
    attempts: int = 0
    backoffs: int = 0
    slept: float = 0.0

    @property
    def spent(self) -> float:
        """Seconds spent: wall-clock since the first attempt, or the waits taken if more (a recorded sleep)."""
        return max(self.policy.clock() - self.started, self.slept)

    def failed(self, response: httpx.Response | None, backoff: bool = True) -> float | None:
        """Count a failed attempt; the seconds to wait before the next one, or None: give up (the outcome is
        final, or the budget spent). backoff False: the next attempt goes elsewhere (another replica) at once,
        so the answer is 0.0 and the backoff ladder does not advance."""
        self.attempts += 1
        if not backoff:
            allowed = self.policy.retryable(response) and self.policy.allows(self.attempts, self.spent)
            return 0.0 if allowed else None
        delay = self.policy.next_delay(self.attempts, response, self.spent, self.backoffs)
        if delay is not None:
            self.backoffs += 1
            self.slept += delay
        return delay

    def summary(self) -> str:
        """How the retries ended, for the error raised when they run out."""
        policy = self.policy
        if policy.retry_for is None or (policy.max_retries is not None and self.attempts > policy.max_retries):
            limit = f"max_retries={policy.max_retries}"
        else:
            limit = f"retry_for={policy.retry_for:g} s"
        plural = "s" if self.attempts != 1 else ""
        return f"gave up after {self.attempts} attempt{plural} in {self.spent:.1f} s: {limit}"


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: a number of seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def error_message(response: httpx.Response) -> str:
    """The server's error message: {"error": ...} (with pydantic's "detail" list summarised), or the text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    if isinstance(body, list) and len(body) == 1:  # BentoML wraps some error bodies in a one-element list
        body = body[0]
    if isinstance(body, Mapping):
        message = str(body.get("error") or body.get("detail") or body)
        detail = body.get("detail")
        if body.get("error") and isinstance(detail, list) and detail:
            problems = [
                f"{'.'.join(str(part) for part in entry.get('loc', ()))}: {entry.get('msg', '')}"
                for entry in detail[:5]
                if isinstance(entry, Mapping)
            ]
            message = f"{message} ({'; '.join(problems)})" if problems else message
        return message
    return str(body)[:500]


def rewards_spec(rewards: str | RewardSpec | None) -> list[str] | dict[str, float] | None:
    """Reward names (a name, a list of names) or {name: weight} -> the JSON the service expects."""
    if rewards is None:
        return None
    if isinstance(rewards, str):
        return [rewards]
    if isinstance(rewards, Mapping):
        return {str(name): float(weight) for name, weight in rewards.items()}
    return [str(name) for name in rewards]


def prepare(
    images: Any, prompts: str | Sequence[str], metadata: Sequence[Mapping[str, Any] | None] | None, copy: bool = False
) -> tuple[list[Any], list[str], list[Mapping[str, Any] | None]]:
    """Check that images, prompts and metadata line up; one entry per image (batched arrays expanded)."""
    sources = split_images(images, copy=copy)
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    for prompt in prompt_list:
        if not isinstance(prompt, str):
            raise TypeError(f"prompts must be strings; got {type(prompt).__name__}")
    metadata_list = [None] * len(sources) if metadata is None else list(metadata)
    if len(prompt_list) != len(sources) or len(metadata_list) != len(sources):
        raise ValueError(
            f"got {len(sources)} images, {len(prompt_list)} prompts"
            + ("" if metadata is None else f" and {len(metadata_list)} metadata entries")
            + ": they must match one to one"
        )
    return sources, prompt_list, metadata_list


def item_entry(
    source: Any,
    prompt: str,
    metadata: Mapping[str, Any] | None,
    encoding: Encoding,
    **fields: Any,
) -> dict[str, Any]:
    """One ScoreItem / MatchItem body; fields left None are omitted so the server's defaults apply. An
    InvalidImage gives a local failure instead (`local_failure`): it is answered here, never sent."""
    if isinstance(source, InvalidImage):
        return {LOCAL_FAILURE: local_failure(source)}
    entry: dict[str, Any] = {**encode_image(source, encoding), "prompt": prompt}
    if metadata:  # {} (a trainer's "no metadata") means the same as none: parse the prompt
        entry["metadata"] = dict(metadata)
    entry.update({name: value for name, value in fields.items() if value is not None})
    return entry


LOCAL_FAILURE = "local_failure"  # the key of an entry answered by the client itself


def local_failure(image: InvalidImage) -> dict[str, Any]:
    """The ItemResult of an item that failed before sending: no rewards, the reason, no model versions."""
    return {
        "rewards": {},
        "total": None,
        "score": None,  # /match's field
        "details": {},
        "error": f"image: {image.reason}",
        "error_code": image.code,
        "profile": None,
        "versions": {},
    }


GRAD_DTYPES = ("float16", "float32")


def float_images(images: Any) -> list[np.ndarray]:
    """/grad images -> float [3, H, W] arrays: a batched [B, 3, H, W] array/tensor or a sequence of [3, H, W]."""
    if is_torch_tensor(images):
        images = images.detach().float().cpu().numpy()
    batch = [images[index] for index in range(images.shape[0])] if hasattr(images, "shape") else list(images)
    arrays = []
    for image in batch:
        array = image.detach().float().cpu().numpy() if is_torch_tensor(image) else np.asarray(image)
        if array.ndim != 3 or array.shape[0] != 3 or not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"/grad takes float images [3, H, W] in [0, 1]; got {array.dtype} {list(array.shape)}")
        arrays.append(array)
    return arrays


def grad_entry(array: np.ndarray, prompt: str, dtype: str, **fields: Any) -> dict[str, Any]:
    """One GradItem body: the pixels as a float16/float32 .npy (values clipped to [0, 1])."""
    if dtype not in GRAD_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(GRAD_DTYPES)}; got {dtype!r}")
    buffer = io.BytesIO()
    np.save(buffer, np.clip(array, 0.0, 1.0).astype(dtype), allow_pickle=False)
    entry: dict[str, Any] = {"array": base64.b64encode(buffer.getvalue()).decode("ascii"), "prompt": prompt}
    entry.update({name: value for name, value in fields.items() if value is not None})
    return entry


def chunk_ranges(count: int, chunk_size: int) -> list[range]:
    """[0, count) in consecutive slices of at most chunk_size."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    return [range(start, min(start + chunk_size, count)) for start in range(0, count, chunk_size)]


def group_chunks(sizes: Sequence[int], chunk_size: int, max_groups: int = MAX_RANK_GROUPS) -> list[range]:
    """Consecutive groups per request, at most max_groups and about chunk_size candidates per request
    (a group larger than chunk_size travels alone: a group is never split)."""
    chunks: list[range] = []
    start, candidates = 0, 0
    for index, size in enumerate(sizes):
        if index > start and (candidates + size > chunk_size or index - start >= max_groups):
            chunks.append(range(start, index))
            start, candidates = index, 0
        candidates += size
    if start < len(sizes):
        chunks.append(range(start, len(sizes)))
    return chunks


def approx_bytes(value: Any) -> int:
    """Approximate JSON size of a body; the base64 strings dominate."""
    if isinstance(value, str):
        return len(value) + 2
    if isinstance(value, Mapping):
        return sum(len(str(key)) + 4 + approx_bytes(item) for key, item in value.items()) + 2
    if isinstance(value, (list, tuple)):
        return sum(approx_bytes(item) + 1 for item in value) + 2
    return 24


def split_by_bytes(entries: list[Any], budget: int) -> list[list[Any]]:
    """Consecutive runs of entries whose approximate JSON size stays within budget (one entry at least)."""
    parts: list[list[Any]] = []
    current: list[Any] = []
    used = 0
    for entry in entries:
        size = approx_bytes(entry)
        if current and used + size > budget:
            parts.append(current)
            current, used = [], 0
        current.append(entry)
        used += size
    if current:
        parts.append(current)
    return parts


def expect_list(body: Any, count: int | None, path: str) -> list[Any]:
    """The answer to `count` entries: a JSON list of `count` results (any number when None), in order."""
    if not isinstance(body, list) or (count is not None and len(body) != count):
        got = f"{len(body)} results" if isinstance(body, list) else type(body).__name__
        raise RewardServiceError(f"expected a list of {count} results, got {got}", path=path)
    return body


def rank_group_entry(
    prompt: str, candidates: Any, metadata: Mapping[str, Any] | None, encoding: Encoding
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "prompt": prompt,
        "candidates": [encode_image(candidate, encoding) for candidate in candidates],
    }
    if metadata:
        entry["metadata"] = dict(metadata)
    return entry


def prepare_groups(groups: Sequence[Any], copy: bool = False) -> list[tuple[str, list[Any], Mapping[str, Any] | None]]:
    """rank() groups -> (prompt, candidate images, metadata). A group is (prompt, images),
    (prompt, images, metadata) or {"prompt": ..., "images": ..., "metadata": ...}."""
    prepared = []
    for group in groups:
        if isinstance(group, Mapping):
            prompt, images, metadata = group["prompt"], group["images"], group.get("metadata")
        elif isinstance(group, (tuple, list)) and len(group) in (2, 3):
            prompt, images, metadata = group[0], group[1], group[2] if len(group) == 3 else None
        else:
            raise TypeError("a rank group is (prompt, images), (prompt, images, metadata) or a dict")
        if not isinstance(prompt, str):
            raise TypeError(f"a rank group's prompt must be a string; got {type(prompt).__name__}")
        candidates = split_images(images, copy=copy)
        if not candidates:
            raise ValueError(f"rank group {prompt!r} has no candidate images")
        prepared.append((prompt, candidates, metadata))
    return prepared


def job_state(status: str) -> str:
    """A task status -> "done", "failed", "canceled" or "running"."""
    if status in JOB_DONE:
        return "done"
    if status in JOB_FAILED:
        return "failed"
    if status in JOB_CANCELED:
        return "canceled"
    return "running"
