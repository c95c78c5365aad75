"""End-to-end: `rewardscope serve` with matching, caption, vqa and plausibility (tiny model directories given
through REWARDSCOPE_CONFIG) lists the rewards at /rewards and returns their values from /score and /rank."""

from __future__ import annotations

import base64
import json

import httpx
import pytest
from serving import running_server
from tiny_models import save_all

from rewardscope import Scorer

pytestmark = pytest.mark.slow
REWARDS = ("matching", "caption", "vqa", "plausibility")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    tiny = save_all(tmp_path_factory.mktemp("tiny-models-e2e"))
    return {
        "caption": {"captioner": str(tiny["captioner"]), "max_new_tokens": 12},
        "vqa": {"model": str(tiny["vqa"])},
        "plausibility": {"language_model": str(tiny["language_model"])},
    }


@pytest.fixture(scope="module")
def http(config):
    env = {"REWARDSCOPE_REWARDS": ",".join(REWARDS), "REWARDSCOPE_CONFIG": json.dumps(config)}
    with running_server(env) as base_url, httpx.Client(base_url=base_url, timeout=120) as client:
        yield client


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_rewards_lists_the_alignment_rewards_with_their_models(http, config):
    described = http.get("/rewards").json()["rewards"]
    assert set(described) == set(REWARDS)
    assert described["caption"]["models"]["captioner"]["path"] == config["caption"]["captioner"]
    assert described["vqa"]["version"].startswith("tiny-blip-vqa@")
    assert described["plausibility"]["range"] == [0.0, 1.0] and described["caption"]["range"] == [-1.0, 1.0]


def test_score_returns_every_reward_as_the_in_process_scorer_does(http, config, bus_path):
    item = {"image": b64(bus_path.read_bytes()), "prompt": "a cat next to a bus"}
    (served,) = http.post("/score", json={"items": [item]}).json()
    (local,) = Scorer(REWARDS, config=config).score([bus_path.read_bytes()], [item["prompt"]])
    assert served["error"] is None and set(served["rewards"]) == set(REWARDS)
    for name in REWARDS:
        assert served["rewards"][name] == pytest.approx(local.rewards[name], abs=1e-5)
    assert served["total"] == pytest.approx(sum(served["rewards"].values()), abs=1e-6)
    assert served["details"]["caption"]["caption"] == local.details["caption"]["caption"]
    assert served["versions"]["vqa"].startswith("tiny-blip-vqa@")

    (subset,) = http.post("/score", json={"items": [{**item, "rewards": ["vqa"]}]}).json()
    assert list(subset["rewards"]) == ["vqa"] and subset["total"] == pytest.approx(served["rewards"]["vqa"])


def test_rank_orders_candidates_by_the_combined_rewards(http, bus_path, zidane):
    import io

    buffer = io.BytesIO()
    zidane.save(buffer, format="JPEG", quality=95)
    candidates = [{"image": b64(bus_path.read_bytes())}, {"image": b64(buffer.getvalue())}]
    group = {"prompt": "two people", "candidates": candidates}
    (ranked,) = http.post("/rank", json={"groups": [group], "rewards": ["caption", "vqa", "plausibility"]}).json()
    assert all(score is not None for score in ranked["scores"])
    for candidate, score in zip(ranked["candidates"], ranked["scores"], strict=True):
        assert set(candidate["rewards"]) == {"caption", "vqa", "plausibility"}
        assert score == pytest.approx(sum(candidate["rewards"].values()), abs=1e-6)
    best = max(range(2), key=lambda index: ranked["scores"][index])
    assert ranked["chosen"] == best and ranked["rejected"] == 1 - best
