"""The client and the README's examples against a real served RewardService (no token, small in-flight limit,
so overload and the client's retries are exercised too)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from serving import ROOT, running_server

from rewardscope import Scorer

pytest.importorskip("rewardscope_client")
from rewardscope_client import RewardClient, RewardServiceError  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    with running_server({"REWARDSCOPE_MAX_CONCURRENCY": "2"}) as base_url:
        yield base_url


def items_scored(base_url: str) -> float:
    metrics = httpx.get(base_url + "/metrics").text
    return sum(float(line.split(" ")[1]) for line in metrics.splitlines() if line.startswith("rewardscope_items_total"))


def test_client_scores_equal_the_in_process_scorer(server, bus, zidane):
    images = [bus, np.asarray(zidane), bus]
    prompts = ["four people and a bus", "two people", "a unicorn"]
    with RewardClient(server) as client:
        batch = client.score(images, prompts)
    local = Scorer(["matching"]).score(images, prompts)
    assert batch.rewards["matching"][:2] == pytest.approx([r.rewards["matching"] for r in local[:2]], abs=1e-6)
    assert np.isnan(batch.total[2]) and batch.error_codes[2] == "no_countable_object"
    assert batch.versions["matching"].startswith("yolov3-tiny-darknet@")


def test_an_async_job_through_the_client_matches_score(server, bus, zidane):
    images, prompts = [bus, zidane, bus], ["a bus", "two people", "a cat"]
    with RewardClient(server) as client:
        task = client.submit(images, prompts)
        from_job = client.result(task, timeout=120)
        direct = client.score(images, prompts)
    assert np.array_equal(from_job.total, direct.total)


def test_overload_answers_503_with_retry_after_and_recovers(server, bus_path):
    body = {"items": [{"image": __import__("base64").b64encode(bus_path.read_bytes()).decode(), "prompt": "a bus"}] * 4}

    def raw(_):
        response = httpx.post(server + "/score", json=body, timeout=120)
        return response.status_code, response.headers.get("retry-after")

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(raw, range(24)))
    assert {status for status, _ in answers} <= {200, 503}  # every request got an answer
    shed = [retry for status, retry in answers if status == 503]
    assert shed and all(retry == "1" for retry in shed)
    assert httpx.post(server + "/score", json=body, timeout=120).status_code == 200  # serves normally after


def test_client_retries_turn_503s_into_successes_without_duplicate_work(server, bus):
    before = items_scored(server)

    def train_step(seed):
        with RewardClient(server, max_retries=50, backoff=0.05, chunk_size=2) as client:
            return client.score([bus] * 4, ["a bus"] * 4)

    with ThreadPoolExecutor(8) as pool:
        batches = list(pool.map(train_step, range(8)))
    assert all(np.isfinite(batch.total).all() for batch in batches)
    assert items_scored(server) - before == 8 * 4  # shed requests never reached a model


def readme_examples() -> dict[str, tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    found = re.findall(r"<!-- example: (\w+) -->\n```(\w+)\n(.*?)```", text, flags=re.S)
    return {name: (language, code) for name, language, code in found}


def test_readme_has_the_tested_examples():
    assert set(readme_examples()) >= {"curl", "client", "adapters"}


@pytest.mark.parametrize("name", ["curl", "client", "adapters"])
def test_readme_examples_run_against_the_service(server, bus_path, tmp_path, name):
    language, code = readme_examples()[name]
    code = code.replace("http://127.0.0.1:3000", server)
    shutil.copy(bus_path, tmp_path / "bus.jpg")
    command = ["bash", "-c", code] if language == "bash" else [sys.executable, "-c", code]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    if name == "curl":
        (item,) = json.loads(result.stdout)
        assert item["rewards"]["matching"] > 0.5 and item["error"] is None
    if name == "client":
        assert "nan" not in result.stdout.lower().split("]")[0] and "yolov3-tiny-darknet@" in result.stdout


def test_an_unknown_match_variant_is_refused_by_the_service_schema(server, bus):
    # The client keeps no list of variants: the service's /match schema (the registered matching rewards) decides.
    with RewardClient(server, max_retries=0) as client, pytest.raises(RewardServiceError) as refused:
        client.match([bus], ["a bus"], variant="fuzzy")
    assert refused.value.status_code == 400
