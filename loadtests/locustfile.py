"""Locust users that load the service the way its users do: an RL training loop posting /score batches of 16-64
generated images (uint8 .npy and JPEG), an evaluator posting one image to /match, and a DPO ranker posting
groups of 8 candidates to /rank. Every answer is checked item by item: a per-item error on these good photos
is a failure. Run through loadtests/run.py (it starts the service and summarises the CSVs).

Environment: REWARDSCOPE_TOKEN (bearer token, if the service wants one), REWARDSCOPE_LOADTEST_THINK_SCALE
(multiplies every user's wait between requests; 0 = closed loop), REWARDSCOPE_LOADTEST_IMAGES (where to write
per request name the images scored and the requests answered, read by the runner; default: beside the CSVs)."""

from __future__ import annotations

import json
import os
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import gevent
import locust.stats
from locust import HttpUser, between, events, task
from locust.env import Environment
from rewardscope_client.client import DEFAULT_MAX_REQUEST_BYTES
from rewardscope_client.images import encode_image
from rewardscope_client.protocol import item_entry, split_by_bytes

# locust puts this file's folder on sys.path, not the repository root that holds the loadtests package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loadtests import PROMPTS, generator_like_photos  # noqa: E402

REQUEST_TIMEOUT_S = 300
RANK_GROUP_SIZE = 8
THINK_SCALE = float(os.environ.get("REWARDSCOPE_LOADTEST_THINK_SCALE", "1"))


class Corpus:
    """Request pieces encoded once per process, the way rewardscope_client encodes them: per photo, a /score
    item for each transport (uint8 .npy, JPEG) and a /rank candidate (JPEG)."""

    def __init__(self) -> None:
        pixels = generator_like_photos()
        self.names = list(pixels)
        self.items = {
            encoding: {name: item_entry(pixels[name], PROMPTS[name], None, encoding) for name in self.names}
            for encoding in ("npy", "jpeg")
        }
        self.candidates = {name: encode_image(pixels[name], "jpeg") for name in self.names}

    def score_items(self, count: int, encoding: str) -> list[dict[str, Any]]:
        return [self.items[encoding][random.choice(self.names)] for _ in range(count)]


_CORPUS: Corpus | None = None


def corpus() -> Corpus:
    global _CORPUS
    if _CORPUS is None:
        _CORPUS = Corpus()
    return _CORPUS


# -- Images scored per request name, for images/s in the runner's summary ---------------------------------------
IMAGES: Counter[str] = Counter()  # request name -> images in answers that passed every check
REQUESTS: Counter[str] = Counter()  # request name -> requests answered (passed or failed), to match the CSVs
_ENVIRONMENT: list[Environment] = []


@events.init.add_listener
def _remember_environment(environment: Environment, **_: Any) -> None:
    _ENVIRONMENT.append(environment)


@events.request.add_listener
def _count_images(name: str, exception: BaseException | None, context: dict[str, Any], **_: Any) -> None:
    REQUESTS[name] += 1
    if exception is None:
        IMAGES[name] += int(context.get("images", 0))


@events.quit.add_listener
def _write_images(**_: Any) -> None:
    target = os.environ.get("REWARDSCOPE_LOADTEST_IMAGES")
    options = _ENVIRONMENT[0].parsed_options if _ENVIRONMENT else None
    if target is None and options is not None and options.csv_prefix:
        target = f"{options.csv_prefix}_images.json"
    if target:
        # Locust's CSV writer rewrites the CSVs every CSV_STATS_INTERVAL_SEC and not at exit: the users have
        # stopped by now, so one more interval makes the CSVs final, and these counts match them.
        gevent.sleep(1.5 * locust.stats.CSV_STATS_INTERVAL_SEC)
        Path(target).write_text(json.dumps({"images": IMAGES, "requests": REQUESTS}, indent=1))


# -- Answer checks: a 200 whose items carry errors is still a failure ---------------------------------------------
def _item_problem(result: Any, value_key: str) -> str | None:
    if not isinstance(result, dict):
        return f"item is {type(result).__name__}, not an object"
    if result.get("error") is not None:
        return f"item error {result.get('error_code')}: {result['error']}"
    value = result.get(value_key)
    if value_key == "rewards":
        value = (value or {}).get("matching")
    if not isinstance(value, (int, float)) or not result.get("versions"):
        return f"item has no {value_key} value or no versions: {str(result)[:200]}"
    return None


def _rank_problem(group: Any, size: int) -> str | None:
    if not isinstance(group, dict) or len(group.get("scores") or []) != size:
        return f"group answer does not score {size} candidates: {str(group)[:200]}"
    if any(score is None for score in group["scores"]) or sorted(group.get("order", [])) != list(range(size)):
        return f"group has unscored candidates: {group['scores']}"
    if group.get("chosen") not in range(size) or group.get("rejected") not in range(size):
        return f"group has no chosen/rejected pair: {group.get('chosen')}, {group.get('rejected')}"
    for candidate in group.get("candidates", []):
        if (problem := _item_problem(candidate, "rewards")) is not None:
            return problem
    return None


def check_answer(response: Any, expected: int, problem_of) -> None:
    """Mark the locust response failed unless it is a 200 list of `expected` entries with no problem."""
    if response.status_code != 200:
        response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
        return
    try:
        body = response.json()
    except ValueError:
        response.failure(f"answer is not JSON: {response.text[:200]}")
        return
    if not isinstance(body, list) or len(body) != expected:
        response.failure(f"expected {expected} results, got {str(body)[:200]}")
        return
    for index, entry in enumerate(body):
        if (problem := problem_of(entry)) is not None:
            response.failure(f"result {index}: {problem}")
            return
    response.success()


class RewardUser(HttpUser):
    abstract = True

    def on_start(self) -> None:
        token = os.environ.get("REWARDSCOPE_TOKEN")
        if token:
            self.client.headers["authorization"] = f"Bearer {token}"
        corpus()  # encode before the first request, not inside its timing

    def post_json(self, path: str, name: str, body: dict[str, Any], images: int, expected: int, problem_of) -> None:
        with self.client.post(
            path,
            data=json.dumps(body),
            headers={"content-type": "application/json"},
            name=name,
            context={"images": images},
            catch_response=True,
            timeout=REQUEST_TIMEOUT_S,
        ) as response:
            check_answer(response, expected, problem_of)


class TrainingLoopUser(RewardUser):
    """An RL fine-tuning loop: sample a batch (the wait), then score it; uint8 arrays or JPEG like the client.
    Batches above the client's request-size budget are split the way rewardscope_client splits them."""

    weight = 1
    wait_time = between(0.5 * THINK_SCALE, 2.0 * THINK_SCALE)

    def _score(self, encoding: str) -> None:
        items = corpus().score_items(random.randint(16, 64), encoding)
        for part in split_by_bytes(items, DEFAULT_MAX_REQUEST_BYTES):
            self.post_json(
                "/score",
                f"/score [{encoding}]",
                {"items": part},
                len(part),
                len(part),
                lambda item: _item_problem(item, "rewards"),
            )

    @task
    def score_arrays(self) -> None:
        self._score("npy")

    @task
    def score_jpeg(self) -> None:
        self._score("jpeg")


class EvaluatorUser(RewardUser):
    """An evaluation harness: one generated image at a time through /match with the full breakdown."""

    weight = 2
    wait_time = between(0.1 * THINK_SCALE, 0.5 * THINK_SCALE)

    @task
    def match_one(self) -> None:
        item = dict(corpus().score_items(1, "jpeg")[0], variant="seed")
        self.post_json("/match", "/match", {"items": [item]}, 1, 1, lambda result: _item_problem(result, "score"))


class RankerUser(RewardUser):
    """DPO pair mining: 1-4 prompts with 8 sampled candidates each through /rank."""

    weight = 1
    wait_time = between(0.5 * THINK_SCALE, 2.0 * THINK_SCALE)

    @task
    def rank_groups(self) -> None:
        data = corpus()
        groups = []
        for _ in range(random.randint(1, 4)):
            name = random.choice(data.names)
            candidates = [data.candidates[random.choice(data.names)] for _ in range(RANK_GROUP_SIZE)]
            groups.append({"prompt": PROMPTS[name], "candidates": candidates})
        self.post_json(
            "/rank",
            "/rank",
            {"groups": groups},
            RANK_GROUP_SIZE * len(groups),
            len(groups),
            lambda group: _rank_problem(group, RANK_GROUP_SIZE),
        )
