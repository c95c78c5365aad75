"""rewardscope_client against a fake service played by httpx.MockTransport: chunking and order, retries,
errors, NaN for failed items, image transport, async parity, jobs and the trainer adapters. No server runs."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

CLIENT_ROOT = Path(__file__).resolve().parents[1] / "client"
if str(CLIENT_ROOT) not in sys.path:  # the client is its own distribution; test it from the source tree
    sys.path.insert(0, str(CLIENT_ROOT))

from rewardscope_client import (  # noqa: E402
    AsyncRewardClient,
    RetryPolicy,
    RewardClient,
    RewardServiceError,
    ScoreBatch,
    encode_image,
    split_images,
)
from rewardscope_client.adapters import ddpo_reward_fn, flow_grpo_reward_fn  # noqa: E402

URL = "http://rewardscope.test"


# -- The fake service ----------------------------------------------------------------------------------------
NPY_LOCK = threading.Lock()


def decode_pixels(entry: dict[str, Any]) -> np.ndarray:
    """What the real service does with an ImageInput: base64 .npy (never unpickled) or an encoded file."""
    if "array" in entry:
        with NPY_LOCK:  # np.load parses headers with ast, not thread-safe in CPython 3.11 (python/cpython#106905)
            return np.load(io.BytesIO(base64.b64decode(entry["array"])), allow_pickle=False)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(entry["image"]))).convert("RGB"))


def brightness(entry: dict[str, Any]) -> float:
    return float(decode_pixels(entry).mean()) / 255.0


def item_result(entry: dict[str, Any]) -> dict[str, Any]:
    """ItemResult of the fake reward `matching` = mean brightness; a prompt containing "fail" fails."""
    weights = entry.get("rewards") or {"matching": 1.0}
    weights = weights if isinstance(weights, dict) else {name: 1.0 for name in weights}
    profile = entry.get("profile") or "train"
    versions = {name: "fake-1" for name in weights}
    if "fail" in entry["prompt"]:
        return {
            "rewards": {name: None for name in weights},
            "total": None,
            "details": {},
            "error": "prompt has no countable object",
            "error_code": "no_countable_object",
            "profile": profile,
            "versions": versions,
        }
    value = brightness(entry)
    return {
        "rewards": {name: value for name in weights},
        "total": sum(weight * value for weight in weights.values()),
        "details": {name: {"prompt": entry["prompt"], "metadata": entry.get("metadata")} for name in weights},
        "error": None,
        "error_code": None,
        "profile": profile,
        "versions": versions,
    }


Step = Callable[[httpx.Request], httpx.Response]


class FakeService:
    """Plays the rewardscope HTTP API. `script`: answers (or exceptions) served first, one per request."""

    def __init__(self, script: list[Any] | None = None, delay: Callable[[dict], float] | None = None) -> None:
        self.script = list(script or [])
        self.delay = delay
        self.requests: list[httpx.Request] = []
        self.bodies: list[Any] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.job_polls = 0
        self.job_statuses = ["in_progress", "in_progress", "completed"]
        self.job_items: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        with self.lock:
            self.requests.append(request)
            self.bodies.append(body)
            step = self.script.pop(0) if self.script else None
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if isinstance(step, Exception):
                raise step
            if isinstance(step, httpx.Response):
                return step
            if self.delay is not None and body:
                time.sleep(self.delay(body))
            return self.answer(request, body)
        finally:
            with self.lock:
                self.in_flight -= 1

    def answer(self, request: httpx.Request, body: Any) -> httpx.Response:
        path = request.url.path
        if path == "/score":
            return httpx.Response(200, json=[item_result(entry) for entry in body["items"]])
        if path == "/match":
            answers = []
            for entry in body["items"]:
                result = item_result(entry)
                answers.append({"score": result["total"], "variant": entry.get("variant", "seed"), **result})
            return httpx.Response(200, json=answers)
        if path == "/rank":
            answers = []
            for group in body["groups"]:
                candidates = [
                    item_result({"prompt": group["prompt"], **candidate, "rewards": body.get("rewards")})
                    for candidate in group["candidates"]
                ]
                scores = [candidate["total"] for candidate in candidates]
                order = sorted(range(len(scores)), key=lambda index: -scores[index])
                answers.append(
                    {"scores": scores, "order": order, "chosen": order[0], "rejected": order[-1], "candidates": []}
                )
            return httpx.Response(200, json=answers)
        if path == "/rewards":
            return httpx.Response(200, json={"rewards": {"matching": {}}, "default_rewards": ["matching"]})
        if path == "/readyz":
            return httpx.Response(200, text="\n")
        if path == "/jobs/score/submit":
            self.job_items = body["items"]
            return httpx.Response(200, json={"task_id": "task-1", "status": "in_progress"})
        if path == "/jobs/score/status":
            status = self.job_statuses[min(self.job_polls, len(self.job_statuses) - 1)]
            self.job_polls += 1
            return httpx.Response(200, json={"task_id": request.url.params["task_id"], "status": status})
        if path == "/jobs/score/get":
            return httpx.Response(200, json=[item_result(entry) for entry in self.job_items])
        return httpx.Response(404, json={"error": f"no route {path}"})


def fake_client(service: FakeService, **options: Any) -> RewardClient:
    options.setdefault("backoff", 0.001)
    return RewardClient(URL, transport=httpx.MockTransport(service), **options)


def fake_async_client(service: FakeService, **options: Any) -> AsyncRewardClient:
    options.setdefault("backoff", 0.001)
    return AsyncRewardClient(URL, transport=httpx.MockTransport(service), **options)


def uniform_images(values: list[int], size: int = 8) -> list[np.ndarray]:
    """One flat uint8 HWC image per value: its fake reward is value / 255."""
    return [np.full((size, size, 3), value, dtype=np.uint8) for value in values]


def error_response(status: int, message: str, **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"error": message}, headers=headers)


# -- Chunking and order ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "count, chunk_size, expected_sizes",
    [(70, 32, [32, 32, 6]), (32, 32, [32]), (5, 1, [1, 1, 1, 1, 1]), (1, 32, [1])],
)
def test_batches_are_chunked_and_results_come_back_in_input_order(count, chunk_size, expected_sizes):
    # The first chunk answers last, so order must come from reassembly, not from arrival.
    service = FakeService(delay=lambda body: 0.05 if body["items"][0]["prompt"] == "p0" else 0.0)
    values = [index % 256 for index in range(count)]
    with fake_client(service, chunk_size=chunk_size) as client:
        batch = client.score(uniform_images(values), [f"p{index}" for index in range(count)])
    assert sorted(len(body["items"]) for body in service.bodies) == sorted(expected_sizes)
    np.testing.assert_allclose(batch.total, np.array(values) / 255.0)
    assert [entry["details"]["matching"]["prompt"] for entry in batch.items] == [f"p{i}" for i in range(count)]
    assert len(batch) == count


def test_chunks_are_sent_concurrently_up_to_max_concurrency():
    service = FakeService(delay=lambda body: 0.05)
    with fake_client(service, chunk_size=2, max_concurrency=3) as client:
        client.score(uniform_images(list(range(12))), ["p"] * 12)
    assert len(service.requests) == 6
    assert service.max_in_flight == 3


def test_empty_batch_sends_nothing():
    service = FakeService()
    with fake_client(service) as client:
        batch = client.score([], [])
    assert len(batch) == 0 and batch.total.shape == (0,) and service.requests == []


@pytest.mark.parametrize(
    "images, prompts, match",
    [
        (uniform_images([1, 2]), ["only one"], "2 images, 1 prompts"),
        (np.zeros((8, 8, 3), np.uint8), ["p"], "single array or tensor must be a batch"),
    ],
)
def test_mismatched_inputs_raise_before_any_request(images, prompts, match):
    service = FakeService()
    with fake_client(service) as client, pytest.raises(ValueError, match=match):
        client.score(images, prompts)
    assert service.requests == []


# -- Retries -----------------------------------------------------------------------------------------------
def _request_for_errors() -> httpx.Request:
    return httpx.Request("POST", f"{URL}/score")


@pytest.mark.parametrize(
    "first_answer",
    [
        error_response(503, "overloaded", **{"Retry-After": "0"}),
        error_response(429, "slow down"),
        error_response(502, "bad gateway"),
        httpx.ConnectError("connection refused", request=_request_for_errors()),
        httpx.ReadTimeout("timed out", request=_request_for_errors()),
        httpx.RemoteProtocolError("server disconnected", request=_request_for_errors()),
    ],
    ids=["503-retry-after", "429", "502", "connect-error", "read-timeout", "remote-protocol-error"],
)
def test_transient_failures_are_retried_whole_then_succeed(first_answer):
    service = FakeService(script=[first_answer])
    with fake_client(service) as client:
        batch = client.score(uniform_images([51, 102]), ["a", "b"])
    assert len(service.requests) == 2
    assert service.bodies[0] == service.bodies[1]  # the same request again, not a part of it
    np.testing.assert_allclose(batch.total, [0.2, 0.4])


@pytest.mark.parametrize(
    "status, message",
    [
        (400, "1 validation error for ScoreItem"),
        (401, "missing or wrong bearer token"),
        (413, "request body exceeds 64 bytes"),
        (422, "unprocessable"),
        (500, "unexpected error"),
        (404, "no task"),
    ],
)
def test_final_errors_raise_at_once_with_the_server_message(status, message):
    service = FakeService(script=[error_response(status, message)])
    with fake_client(service) as client, pytest.raises(RewardServiceError) as raised:
        client.score(uniform_images([1]), ["a"])
    assert len(service.requests) == 1
    assert raised.value.status_code == status
    assert raised.value.message == message
    assert message in str(raised.value) and raised.value.attempts == 1


def test_validation_details_are_summarised_in_the_message():
    body = {"error": "1 validation error", "detail": [{"loc": ["items", 0, "prompt"], "msg": "too long"}]}
    service = FakeService(script=[httpx.Response(400, json=body)])
    with fake_client(service) as client, pytest.raises(RewardServiceError, match=r"items\.0\.prompt: too long"):
        client.score(uniform_images([1]), ["a"])


@pytest.mark.parametrize(
    "answer, status",
    [
        (lambda: error_response(503, "overloaded", **{"Retry-After": "0"}), 503),
        (lambda: httpx.ConnectError("connection refused", request=_request_for_errors()), None),
    ],
    ids=["always-503", "always-connect-error"],
)
def test_exhausted_retries_raise_reward_service_error(answer, status):
    service = FakeService(script=[answer() for _ in range(10)])
    with fake_client(service, max_retries=3) as client, pytest.raises(RewardServiceError) as raised:
        client.score(uniform_images([1]), ["a"])
    assert len(service.requests) == 4
    assert raised.value.attempts == 4
    assert raised.value.status_code == status
    assert "after 4 attempts" in str(raised.value)


def test_retry_after_is_honoured_and_backoff_doubles_without_it():
    service = FakeService(
        script=[
            error_response(503, "busy", **{"Retry-After": "2"}),
            error_response(503, "busy"),
            error_response(429, "x"),
        ]
    )
    delays: list[float] = []
    with fake_client(service, backoff=0.5) as client:
        client._sleep = delays.append
        client.score(uniform_images([1]), ["a"])
    assert len(delays) == 3
    assert 2.0 <= delays[0] <= 2.05  # Retry-After, plus at most 10% of backoff as jitter
    assert 1.0 <= delays[1] <= 1.1  # attempt 2: backoff * 2
    assert 2.0 <= delays[2] <= 2.2  # attempt 3: backoff * 4


@pytest.mark.parametrize(
    "attempt, retry_after, low, high",
    [
        (0, None, 0.5, 0.55),
        (3, None, 4.0, 4.4),
        (10, None, 30.0, 33.0),
        (0, "7", 7.0, 7.05),
        (0, "1000", 60.0, 60.05),
        (0, "soon", 0.5, 0.55),
    ],
)
def test_retry_delay_schedule(attempt, retry_after, low, high):
    delay = RetryPolicy(backoff=0.5).delay(attempt, retry_after)
    assert low <= delay <= high


def test_413_splits_the_chunk_until_it_fits():
    class SmallBodies(FakeService):
        def answer(self, request, body):
            if len(body["items"]) > 3:
                return error_response(413, "request body too large")
            return super().answer(request, body)

    service = SmallBodies()
    with fake_client(service, chunk_size=10) as client:
        batch = client.score(uniform_images(list(range(10))), ["p"] * 10)
    np.testing.assert_allclose(batch.total, np.arange(10) / 255.0)
    sizes = [len(body["items"]) for body in service.bodies]
    assert sizes[0] == 10 and sum(size for size in sizes if size <= 3) == 10  # 10 -> 5 + 5 -> 2 + 3 + 2 + 3


def test_chunks_stay_under_max_request_bytes():
    service = FakeService()
    images = uniform_images(list(range(6)), size=32)  # ~4 KB of base64 .npy each
    with fake_client(service, chunk_size=6, max_request_bytes=9000) as client:
        batch = client.score(images, ["p"] * 6)
    assert [len(body["items"]) for body in service.bodies] == [2, 2, 2]
    assert all(len(request.content) <= 9000 for request in service.requests)
    np.testing.assert_allclose(batch.total, np.arange(6) / 255.0)


# -- Results -----------------------------------------------------------------------------------------------
def test_failed_items_are_nan_with_their_errors_never_zero():
    service = FakeService()
    with fake_client(service) as client:
        batch = client.score(uniform_images([0, 255, 0]), ["dark", "fail please", "dark"])
    assert batch.total[0] == 0.0 and batch.total[2] == 0.0  # a real 0 stays 0 ...
    assert np.isnan(batch.total[1]) and np.isnan(batch.rewards["matching"][1])  # ... a failure is NaN
    assert batch.valid.tolist() == [True, False, True]
    assert batch.errors == [None, "prompt has no countable object", None]
    assert batch.error_codes == [None, "no_countable_object", None]
    assert batch.rewards["matching"].dtype == np.float64 and batch.versions == {"matching": "fake-1"}


def test_rewards_profile_and_metadata_travel_with_each_item():
    service = FakeService()
    metadata = [{"include": [{"class": "dog", "count": 2}]}, {}]
    with fake_client(service) as client:
        batch = client.score(
            uniform_images([51, 51]), ["a", "b"], metadata, rewards={"matching": 2.0}, profile="benchmark"
        )
    first, second = service.bodies[0]["items"]
    assert first["metadata"] == metadata[0] and "metadata" not in second  # {} means none
    assert first["rewards"] == {"matching": 2.0} and first["profile"] == "benchmark"
    np.testing.assert_allclose(batch.total, [0.4, 0.4])


def test_scorebatch_from_items_unions_reward_names():
    batch = ScoreBatch.from_items(
        [
            {"rewards": {"a": 1.0}, "total": 1.0, "details": {}, "versions": {"a": "1"}},
            {"rewards": {"a": None, "b": 0.5}, "total": None, "details": {}, "error": "x", "versions": {"b": "2"}},
        ]
    )
    assert list(batch.rewards) == ["a", "b"]
    np.testing.assert_array_equal(np.isnan(batch.rewards["b"]), [True, False])
    assert batch.versions == {"a": "1", "b": "2"}


# -- Image transport ---------------------------------------------------------------------------------------
GRADIENT = np.arange(8 * 10 * 3, dtype=np.uint8).reshape(8, 10, 3)


def decoded(entry: dict[str, str]) -> np.ndarray:
    if "array" in entry:
        with NPY_LOCK:  # np.load parses headers with ast, not thread-safe in CPython 3.11 (python/cpython#106905)
            return np.load(io.BytesIO(base64.b64decode(entry["array"])), allow_pickle=False)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(entry["image"]))))


@pytest.mark.parametrize(
    "image, encoding, key, expected",
    [
        (GRADIENT, "npy", "array", GRADIENT),
        (GRADIENT, "png", "image", GRADIENT),
        (GRADIENT.transpose(2, 0, 1), "npy", "array", GRADIENT),  # [3, H, W] -> HWC
        (GRADIENT[:, :, 0], "npy", "array", GRADIENT[:, :, 0]),  # grayscale HW stays HW
        (GRADIENT[:, :, :1], "npy", "array", GRADIENT[:, :, 0]),  # one channel -> HW
        (GRADIENT.astype(np.float32) / 255.0, "npy", "array", GRADIENT),  # float [0, 1] -> uint8
        (Image.fromarray(GRADIENT), "npy", "image", GRADIENT),  # PIL travels as PNG
        (torch.from_numpy(GRADIENT).permute(2, 0, 1).float() / 255, "npy", "array", GRADIENT),
        (torch.from_numpy(GRADIENT), "png", "image", GRADIENT),
    ],
    ids=["uint8-npy", "uint8-png", "chw-npy", "hw-npy", "hw1-npy", "float-npy", "pil-png", "torch-chw", "torch-png"],
)
def test_images_round_trip_pixel_exact(image, encoding, key, expected):
    entry = encode_image(image, encoding)
    assert list(entry) == [key]
    np.testing.assert_array_equal(decoded(entry), expected)


def test_npy_transport_is_plain_uint8_hwc():
    raw = base64.b64decode(encode_image(GRADIENT.astype(np.float64) / 255.0)["array"])
    array = np.load(io.BytesIO(raw), allow_pickle=False)
    assert array.dtype == np.uint8 and array.shape == (8, 10, 3) and array.flags.c_contiguous


@pytest.mark.parametrize("to_tensor", [np.asarray, torch.as_tensor], ids=["numpy", "torch"])
def test_float_pixels_round_to_nearest_and_clip_within_slack(to_tensor):
    values = np.array([[[0.0, 0.49 / 255, 0.51 / 255], [1.0, -0.01, 1.01]]] * 8, dtype=np.float32)  # [8, 2, 3]
    pixels = decoded(encode_image(to_tensor(values)))
    np.testing.assert_array_equal(pixels[0], [[0, 0, 1], [255, 0, 255]])


def test_jpeg_transport_is_close():
    smooth = np.repeat(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], 64, axis=0).repeat(3, axis=2)
    pixels = decoded(encode_image(smooth, "jpeg"))
    assert pixels.shape == smooth.shape and np.abs(pixels.astype(int) - smooth).mean() < 3


def test_paths_and_bytes_travel_unchanged(tmp_path):
    data = io.BytesIO()
    Image.fromarray(GRADIENT).save(data, format="PNG")
    path = tmp_path / "image.png"
    path.write_bytes(data.getvalue())
    for source in (path, str(path), data.getvalue()):
        assert base64.b64decode(encode_image(source)["image"]) == data.getvalue()


def test_batched_torch_float_tensor_expands_to_uint8_hwc_images():
    generator = torch.Generator().manual_seed(0)
    batch = torch.rand(4, 3, 6, 5, generator=generator)
    images = split_images(batch)
    expected = (batch * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert len(images) == 4
    for image, want in zip(images, expected, strict=True):
        assert image.dtype == np.uint8 and image.shape == (6, 5, 3)
        np.testing.assert_array_equal(image, want)


@pytest.mark.parametrize(
    "images, count",
    [
        (np.zeros((3, 6, 5, 3), np.uint8), 3),  # [B, H, W, 3]
        ([torch.zeros(2, 3, 6, 5), Image.new("RGB", (8, 8))], 3),  # batched tensor inside a list expands
    ],
)
def test_batches_expand_inside_lists_and_at_top_level(images, count):
    assert len(split_images(images)) == count


@pytest.mark.parametrize(
    "image, match",
    [
        (np.full((4, 4, 3), 2.0, np.float32), r"\[0, 1\]"),  # [0, 255] floats
        (np.full((4, 4, 3), -1.0, np.float32), r"\(x \+ 1\) / 2"),  # [-1, 1] floats
        (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
        (torch.full((3, 4, 4), 3.0), r"\[0, 1\]"),
        (np.zeros((5, 5, 7), np.uint8), "C in 1, 3, 4"),
    ],
)
def test_out_of_range_or_misshapen_pixels_are_refused(image, match):
    with pytest.raises(ValueError, match=match):
        encode_image(image)


# -- Headers, other endpoints ----------------------------------------------------------------------------
@pytest.mark.parametrize("token, header", [("s3cret", "Bearer s3cret"), (None, None)])
def test_bearer_token_is_sent_when_configured(token, header):
    service = FakeService()
    with fake_client(service, token=token) as client:
        client.score(uniform_images([1]), ["a"])
        client.rewards()
    assert [request.headers.get("authorization") for request in service.requests] == [header, header]


def test_match_sends_the_variant_and_leaves_its_validation_to_the_service():
    # The service's /match schema is the one list of variants (tests/test_architecture.py); the client keeps no
    # copy to drift from it, and an unknown variant comes back as the service's 400 (tests/test_client_e2e.py).
    service = FakeService()
    with fake_client(service) as client:
        answers = client.match(uniform_images([51]), ["a"], variant="geneval")
        client.match(uniform_images([51]), ["a"], variant="fuzzy")
    assert [body["items"][0]["variant"] for body in service.bodies] == ["geneval", "fuzzy"]
    assert answers[0]["variant"] == "geneval" and answers[0]["score"] == pytest.approx(0.2)


def test_rank_chunks_by_groups_and_keeps_group_order():
    service = FakeService()
    groups = [(f"prompt {index}", uniform_images([10, 200, 100])) for index in range(5)]
    with fake_client(service, chunk_size=6) as client:
        answers = client.rank(groups, rewards=["matching"], profile="train")
    assert [len(body["groups"]) for body in service.bodies] == [2, 2, 1]
    assert service.bodies[0]["rewards"] == ["matching"] and service.bodies[0]["profile"] == "train"
    assert len(answers) == 5 and all(answer["chosen"] == 1 and answer["rejected"] == 0 for answer in answers)


@pytest.mark.parametrize(
    "answer, ready",
    [
        (httpx.Response(200, text="\n"), True),
        (httpx.Response(503, text="not ready"), False),
        (httpx.ConnectError("refused", request=httpx.Request("GET", f"{URL}/readyz")), False),
    ],
)
def test_ready_reflects_readyz_without_retrying(answer, ready):
    service = FakeService(script=[answer])
    with fake_client(service) as client:
        assert client.ready() is ready
    assert len(service.requests) == 1


def test_rewards_returns_the_description():
    with fake_client(FakeService()) as client:
        assert client.rewards()["default_rewards"] == ["matching"]


# -- Jobs ------------------------------------------------------------------------------------------------
def test_job_submit_poll_and_result():
    service = FakeService()
    with fake_client(service) as client:
        task_id = client.submit(uniform_images([51, 102, 153]), ["a", "b", "c"])
        assert client.status(task_id) == "in_progress"
        batch = client.result(task_id, poll=0.001)
    assert task_id == "task-1" and service.job_polls == 3
    np.testing.assert_allclose(batch.total, [0.2, 0.4, 0.6])
    assert len(service.bodies[0]["items"]) == 3  # one request, not chunked


def test_job_result_without_waiting_raises_timeout_while_running():
    with fake_client(FakeService()) as client, pytest.raises(TimeoutError, match="in_progress"):
        client.result("task-1", wait=False)


@pytest.mark.parametrize("status", ["failed", "failure"])
def test_failed_job_raises_with_the_stored_error(status):
    service = FakeService()
    service.job_statuses = [status]
    service.script = [None, error_response(400, "1 validation error for ScoreItem")]
    with fake_client(service) as client, pytest.raises(RewardServiceError, match="task-1 failed: 1 validation"):
        client.result("task-1")


# -- Futures and async -------------------------------------------------------------------------------------
@pytest.mark.parametrize("wrap", [np.asarray, torch.from_numpy], ids=["numpy", "torch-shared-memory"])
def test_score_async_returns_a_future_that_owns_its_pixels(wrap):
    # One worker, busy with a slow first call: the second call's images are encoded only after the caller
    # has overwritten its buffer, so the result shows whether the pixels were copied at submission.
    service = FakeService(delay=lambda body: 0.1 if body["items"][0]["prompt"] == "slow" else 0.0)
    images = np.full((3, 8, 8, 3), 51, dtype=np.uint8)
    with fake_client(service, max_concurrency=1) as client:
        first = client.score_async(uniform_images([0]), ["slow"])
        future = client.score_async(wrap(images), ["a", "b", "c"])
        images[:] = 255  # the trainer reuses its buffer for the next batch at once
        assert isinstance(future, Future) and not future.done()
        batch = future.result(timeout=5)
        first.result(timeout=5)
    np.testing.assert_allclose(batch.total, [0.2, 0.2, 0.2])


def test_async_client_matches_the_sync_client():
    values, prompts = [0, 51, 255, 102, 7], ["a", "fail", "c", "d", "e"]
    with fake_client(FakeService(), chunk_size=2) as client:
        sync_batch = client.score(uniform_images(values), prompts)

    async def run() -> tuple[ScoreBatch, int, list[dict], str]:
        service = FakeService(script=[error_response(503, "busy", **{"Retry-After": "0"})])
        async with fake_async_client(service, chunk_size=2, max_concurrency=2, token="t") as client:
            batch = await client.score(uniform_images(values), prompts)
            task = client.score_async(uniform_images(values), prompts)
            assert isinstance(task, asyncio.Task)
            await task
            matched = await client.match(uniform_images([51]), ["a"], variant="numeracy")
            task_id = await client.submit(uniform_images([51]), ["a"])
            await client.result(task_id, poll=0.001)
        return batch, len(service.requests), matched, service.requests[0].headers["authorization"]

    batch, requests, matched, authorization = asyncio.run(run())
    np.testing.assert_array_equal(batch.total, sync_batch.total)  # NaN where sync has NaN
    assert batch.errors == sync_batch.errors
    assert requests == 1 + 3 + 3 + 1 + 1 + 3 + 1  # 503 retry, 3 chunks twice, match, submit, 3 polls, get
    assert matched[0]["variant"] == "numeracy" and authorization == "Bearer t"


def test_async_chunks_are_gathered_concurrently_up_to_max_concurrency():
    service = FakeService()
    in_flight, peak = 0, 0

    async def slow_handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        return service(request)

    async def run() -> ScoreBatch:
        transport = httpx.MockTransport(slow_handler)
        async with AsyncRewardClient(URL, transport=transport, chunk_size=1, max_concurrency=3) as client:
            return await client.score(uniform_images(list(range(8))), ["p"] * 8)

    batch = asyncio.run(run())
    assert peak == 3 and len(service.requests) == 8
    np.testing.assert_allclose(batch.total, np.arange(8) / 255.0)


def test_async_retry_waits_the_servers_retry_after():
    delays: list[float] = []

    async def record(seconds: float) -> None:
        delays.append(seconds)

    async def run() -> ScoreBatch:
        service = FakeService(script=[error_response(503, "busy", **{"Retry-After": "3"})])
        async with fake_async_client(service) as client:
            client._sleep = record
            return await client.score(uniform_images([51]), ["a"])

    batch = asyncio.run(run())
    assert len(delays) == 1 and 3.0 <= delays[0] <= 3.01
    np.testing.assert_allclose(batch.total, [0.2])


def test_async_client_raises_on_final_errors():
    async def run() -> None:
        service = FakeService(script=[error_response(422, "bad body")])
        async with fake_async_client(service) as client:
            await client.score(uniform_images([1]), ["a"])

    with pytest.raises(RewardServiceError, match="bad body"):
        asyncio.run(run())


# -- Trainer adapters -------------------------------------------------------------------------------------
def test_ddpo_reward_fn_returns_a_tensor_for_tensor_images():
    images = torch.full((4, 3, 8, 8), 0.2)
    prompts = ("a", "b", "fail", "d")
    with fake_client(FakeService()) as client:
        rewards, metadata = ddpo_reward_fn(client, on_failure="nan")(images, prompts, ({}, {}, {}, {}))
    assert isinstance(rewards, torch.Tensor) and rewards.dtype == torch.float32 and rewards.shape == (4,)
    assert rewards.device == images.device
    expected = torch.tensor([51 / 255, 51 / 255, float("nan"), 51 / 255])
    torch.testing.assert_close(rewards, expected, equal_nan=True)
    assert metadata["errors"][2] == "prompt has no countable object"
    assert metadata["valid"].tolist() == [True, True, False, True] and metadata["versions"] == {"matching": "fake-1"}


def test_ddpo_reward_fn_returns_numpy_for_numpy_images_and_can_select_a_reward():
    with fake_client(FakeService()) as client:
        reward_fn = ddpo_reward_fn(client, rewards={"matching": 3.0}, select="matching")
        rewards, _ = reward_fn(np.full((2, 8, 8, 3), 51, np.uint8), ["a", "b"], None)
        future = reward_fn.submit(np.full((2, 8, 8, 3), 102, np.uint8), ["a", "b"], None)
        later, _ = future.result(timeout=5)
    assert isinstance(rewards, np.ndarray) and rewards.dtype == np.float64
    np.testing.assert_allclose(rewards, [0.2, 0.2])  # the reward itself, not the 3x weighted total
    np.testing.assert_allclose(later, [0.4, 0.4])


def test_flow_grpo_reward_fn_returns_scores_per_reward_and_avg():
    images = torch.full((3, 3, 8, 8), 0.4)
    metadata = [{"include": [{"class": "dog", "count": 1}]}, {}, {}]
    with fake_client(FakeService()) as client:
        reward_fn = flow_grpo_reward_fn(client, rewards={"matching": 0.5}, on_failure="nan")
        scores, info = reward_fn(images, ["a", "b", "fail"], metadata, only_strict=True)
        future = reward_fn.submit(images, ["a", "b", "c"], metadata, only_strict=False)
        assert isinstance(future, Future)
        async_scores, _ = future.result(timeout=5)
    assert set(scores) == {"matching", "avg"}
    np.testing.assert_allclose(scores["avg"], [0.2, 0.2, np.nan])
    np.testing.assert_allclose(scores["matching"], [0.4, 0.4, np.nan])
    assert info["error_codes"] == [None, None, "no_countable_object"]
    assert info["details"][0]["matching"]["metadata"] == metadata[0]
    np.testing.assert_allclose(async_scores["avg"], [0.2, 0.2, 0.2])


# -- Packaging ---------------------------------------------------------------------------------------------
def test_importing_the_client_does_not_import_torch():
    code = "import sys, rewardscope_client, rewardscope_client.adapters; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(CLIENT_ROOT)},
    )
    assert result.stdout.strip() == "False"


# -- Retries bounded by time, and replicas (issue #19) -------------------------------------------------------
def _connect_error(url: str = URL) -> httpx.ConnectError:
    return httpx.ConnectError("connection refused", request=httpx.Request("POST", f"{url}/score"))


def test_retries_go_on_past_six_attempts_within_retry_for():
    # The old bound (max_retries=5: 6 attempts, about 16 s of backoff) would have raised here.
    service = FakeService(script=[error_response(503, "restarting")] * 10 + [_connect_error()] * 3)
    delays: list[float] = []
    with fake_client(service, backoff=0.5) as client:
        client._sleep = delays.append
        batch = client.score(uniform_images([51]), ["a"])
    assert len(service.requests) == 14 and len(delays) == 13
    assert max(delays) <= 33.0 and sum(delays) < 300.0  # capped at max_backoff (+10% jitter), inside retry_for
    np.testing.assert_allclose(batch.total, [0.2])


@pytest.mark.parametrize(
    "options, budget",
    [({}, 300.0), ({"retry_for": 20.0}, 20.0), ({"retry_for": 20.0, "max_retries": 100}, 20.0)],
    ids=["default-300s", "retry_for-20s", "time-bound-first"],
)
def test_retries_stop_when_retry_for_is_spent_with_a_clear_message(options, budget):
    service = FakeService(script=[_connect_error()] * 200)
    delays: list[float] = []
    with fake_client(service, backoff=0.5, **options) as client, pytest.raises(RewardServiceError) as raised:
        client._sleep = delays.append
        client.score(uniform_images([1]), ["a"])
    assert sum(delays) == pytest.approx(budget)  # the last wait is cut short at the deadline, never past it
    assert max(delays) <= 33.0
    assert raised.value.attempts == len(service.requests) == len(delays) + 1 > 6
    assert raised.value.status_code is None
    message = str(raised.value)
    assert f"after {raised.value.attempts} attempts" in message and "ConnectError" in message
    assert f"in {budget:.1f} s: retry_for={budget:g} s" in message


def test_retry_for_counts_wall_clock_time_too():
    now = [100.0]
    policy = RetryPolicy(retry_for=10.0, backoff=0.5, clock=lambda: now[0])
    budget = policy.start()
    assert 0.5 <= budget.failed(None) <= 0.55  # first failure: the first step of the ladder
    now[0] += 9.8  # a slow attempt (a long timeout) used most of the budget
    assert budget.failed(None) == pytest.approx(0.2)  # the wait stops at the deadline
    now[0] += 0.3
    assert budget.failed(None) is None
    assert "3 attempts in 10.1 s: retry_for=10 s" in budget.summary()


@pytest.mark.parametrize(
    "answer",
    [lambda: error_response(503, "busy", **{"Retry-After": "0"}), _connect_error],
    ids=["503", "connect-error"],
)
def test_max_retries_zero_still_means_one_attempt(answer):
    service = FakeService(script=[answer() for _ in range(3)])
    delays: list[float] = []
    with fake_client(service, max_retries=0) as client, pytest.raises(RewardServiceError) as raised:
        client._sleep = delays.append
        client.score(uniform_images([1]), ["a"])
    assert len(service.requests) == 1 and delays == [] and raised.value.attempts == 1
    assert "gave up after 1 attempt in" in str(raised.value) and "max_retries=0" in str(raised.value)


def test_retry_after_is_honoured_within_the_budget_and_cut_at_its_deadline():
    service = FakeService(script=[error_response(503, "draining", **{"Retry-After": "5"})] * 3)
    delays: list[float] = []
    with fake_client(service, backoff=0.5, retry_for=8.0) as client, pytest.raises(RewardServiceError) as raised:
        client._sleep = delays.append
        client.score(uniform_images([1]), ["a"])
    assert len(delays) == 2 and 5.0 <= delays[0] <= 5.05  # Retry-After, plus at most 10% of backoff
    assert delays[1] == pytest.approx(8.0 - delays[0])  # the second Retry-After would end past retry_for
    assert raised.value.status_code == 503 and raised.value.attempts == 3 and "retry_for=8 s" in str(raised.value)


def test_retry_policy_rejects_negative_budgets():
    with pytest.raises(ValueError, match="retry_for and max_retries"):
        RetryPolicy(retry_for=-1.0)
    with pytest.raises(ValueError, match="retry_for and max_retries"):
        RewardClient(URL, max_retries=-1)


URL_A, URL_B = "http://replica-a.test", "http://replica-b.test"


class Replicas:
    """Two fake services, one per host: the client's httpx transport routes each request by its URL."""

    def __init__(self, a: FakeService | None = None, b: FakeService | None = None) -> None:
        self.services = {"replica-a.test": a or FakeService(), "replica-b.test": b or FakeService()}
        self.a, self.b = self.services["replica-a.test"], self.services["replica-b.test"]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        return self.services[request.url.host](request)


def replica_client(replicas: Replicas, **options: Any) -> RewardClient:
    options.setdefault("backoff", 0.001)
    return RewardClient([URL_A, URL_B], transport=httpx.MockTransport(replicas), **options)


@pytest.mark.parametrize(
    "failure",
    [lambda: error_response(503, "draining", **{"Retry-After": "5"}), lambda: _connect_error(URL_A)],
    ids=["503", "connect-error"],
)
def test_a_failed_replica_costs_one_attempt_and_no_backoff(failure):
    replicas = Replicas(a=FakeService(script=[failure()]))
    delays: list[float] = []
    with replica_client(replicas) as client:
        client._sleep = delays.append
        batch = client.score(uniform_images([51]), ["a"])
    assert delays == []  # straight to the next replica, no wait
    assert len(replicas.a.requests) == 1 and len(replicas.b.requests) == 1
    assert replicas.a.bodies[0] == replicas.b.bodies[0]
    np.testing.assert_allclose(batch.total, [0.2])


def test_the_client_backs_off_only_when_every_replica_failed_in_a_row():
    replicas = Replicas(
        a=FakeService(script=[_connect_error(URL_A)]), b=FakeService(script=[error_response(503, "busy")])
    )
    delays: list[float] = []
    with replica_client(replicas, backoff=0.5) as client:
        client._sleep = delays.append
        batch = client.score(uniform_images([51]), ["a"])
    assert len(delays) == 1 and 0.5 <= delays[0] <= 0.55  # one round failed: the first step of the ladder
    assert [request.url.host for request in replicas.a.requests + replicas.b.requests] == [
        "replica-a.test",
        "replica-a.test",  # after the wait: round-robin on from B, the replica that failed last
        "replica-b.test",
    ]
    np.testing.assert_allclose(batch.total, [0.2])


def test_giving_up_across_replicas_names_the_last_one():
    replicas = Replicas(
        a=FakeService(script=[_connect_error(URL_A)] * 50), b=FakeService(script=[_connect_error()] * 50)
    )
    delays: list[float] = []
    with replica_client(replicas, retry_for=10.0) as client, pytest.raises(RewardServiceError) as raised:
        client._sleep = delays.append
        client.score(uniform_images([1]), ["a"])
    assert sum(delays) == pytest.approx(10.0)
    assert len(replicas.a.requests) + len(replicas.b.requests) == raised.value.attempts
    assert raised.value.attempts == 2 * len(delays) + 1  # each round both replicas; past the deadline, one
    assert "retry_for=10 s on http://replica-" in str(raised.value)


def test_chunks_are_spread_over_the_replicas():
    replicas = Replicas()
    with replica_client(replicas, chunk_size=1) as client:
        batch = client.score(uniform_images([1, 2, 3, 4]), ["p"] * 4)
        assert client.base_urls == [URL_A, URL_B] and client.base_url == URL_A
    assert len(replicas.a.requests) == 2 and len(replicas.b.requests) == 2
    np.testing.assert_allclose(batch.total, np.arange(1, 5) / 255.0)


class JobService(FakeService):
    """FakeService with the job routes that answer cancel and delete."""

    def answer(self, request: httpx.Request, body: Any) -> httpx.Response:
        if request.url.path == "/jobs/score/cancel":
            return httpx.Response(200, json={"task_id": request.url.params["task_id"], "status": "cancelled"})
        if request.url.path == "/jobs/score" and request.method == "DELETE":
            return httpx.Response(200, json={})
        return super().answer(request, body)


def test_a_job_stays_with_the_replica_that_accepted_it():
    replicas = Replicas(a=JobService(script=[error_response(503, "draining")]), b=JobService())
    delays: list[float] = []
    with replica_client(replicas) as client:
        client._sleep = delays.append
        task_id = client.submit(uniform_images([51, 102]), ["a", "b"])  # A refuses: B takes the job
        replicas.b.script = [error_response(503, "busy")]  # B busy at the first poll: wait for B, never ask A
        batch = client.result(task_id, poll=0.001)
        client.cancel(task_id)
        client.delete(task_id)
    assert [request.url.path for request in replicas.a.requests] == ["/jobs/score/submit"]
    assert [request.url.path for request in replicas.b.requests] == [
        "/jobs/score/submit",
        *["/jobs/score/status"] * 4,  # the 503, then in_progress, in_progress, completed
        "/jobs/score/get",
        "/jobs/score/cancel",
        "/jobs/score",
    ]
    assert len(delays) == 1  # the poll answered 503 waited (B alone holds the job) instead of failing over
    np.testing.assert_allclose(batch.total, [0.2, 0.4])


def test_ready_is_true_when_any_replica_is_ready():
    replicas = Replicas(a=FakeService(script=[_connect_error(URL_A)]))
    with replica_client(replicas) as client:
        assert client.ready() is True
    assert len(replicas.a.requests) == 1 and len(replicas.b.requests) == 1


def test_async_client_fails_over_like_the_sync_client():
    replicas = Replicas(a=FakeService(script=[_connect_error(URL_A)]))
    delays: list[float] = []

    async def record(seconds: float) -> None:
        delays.append(seconds)

    async def run() -> tuple[ScoreBatch, ScoreBatch]:
        transport = httpx.MockTransport(replicas)
        async with AsyncRewardClient([URL_A, URL_B], transport=transport, backoff=0.001) as client:
            client._sleep = record
            task_id = await client.submit(uniform_images([102]), ["b"])  # A is down: B takes the job
            from_job = await client.result(task_id, poll=0.001)
            return await client.score(uniform_images([51]), ["a"]), from_job

    scored, from_job = asyncio.run(run())
    assert delays == []
    np.testing.assert_allclose(scored.total, [0.2])
    np.testing.assert_allclose(from_job.total, [0.4])
    assert [request.url.path for request in replicas.a.requests] == ["/jobs/score/submit"]
    assert [request.url.path for request in replicas.b.requests] == [
        "/jobs/score/submit",
        *["/jobs/score/status"] * 3,
        "/jobs/score/get",
        "/score",
    ]
