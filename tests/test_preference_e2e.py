"""End-to-end: `rewardscope serve` with the preference rewards and a trained feedback head configured through
REWARDSCOPE_REWARDS / REWARDSCOPE_CONFIG (tiny CLIP directories); HTTP scores equal the in-process Scorer's."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from rewardscope.models.combine import combine
from rewardscope.models.feedback import TrainConfig, train_feedback_reward
from serving import running_server
from tiny_clip import make_aesthetic_head, make_labelled_set, shared_tiny_clip

from rewardscope import Scorer

pytestmark = pytest.mark.slow
PROMPTS = ["a bus on a street", "two men in suits"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("preference-e2e")
    clip_dir = str(shared_tiny_clip())
    head = make_aesthetic_head(root / "aesthetic.safetensors", 768)
    make_labelled_set(root / "labels", images=40, seed=11)
    feedback = root / "feedback"
    train_feedback_reward(root / "labels" / "labels.jsonl", feedback, TrainConfig(clip_model=clip_dir), False)
    rewards = ["clip", "aesthetic", "pickscore", f"feedback:{feedback}"]
    config = {
        "clip": {"model": clip_dir},
        "aesthetic": {"model": clip_dir, "head": str(head)},
        "pickscore": {"model": clip_dir, "processor": clip_dir},
    }
    env = {"REWARDSCOPE_REWARDS": ",".join(rewards), "REWARDSCOPE_CONFIG": json.dumps(config)}
    with running_server(env) as base_url, httpx.Client(base_url=base_url, timeout=120) as client:
        yield client, rewards, config


def test_rewards_lists_every_configured_preference_reward(served):
    client, rewards, _ = served
    described = client.get("/rewards").json()
    assert described["default_rewards"] == rewards
    for name in rewards:
        entry = described["rewards"][name]
        assert entry["direction"] == "higher is better" and entry["precision"] == "float32" and entry["scale"]
    assert described["rewards"]["clip"]["range"] == [0.0, 2.5]
    assert described["rewards"][rewards[-1]]["range"] == [0.0, 1.0]


def test_scores_over_http_equal_the_in_process_scorer(served, bus_path, zidane):
    client, rewards, config = served
    buffer = io.BytesIO()
    zidane.save(buffer, format="PNG")
    images = [bus_path.read_bytes(), buffer.getvalue()]
    items = [{"image": base64.b64encode(data).decode(), "prompt": p} for data, p in zip(images, PROMPTS, strict=True)]
    response = client.post("/score", json={"items": items})
    assert response.status_code == 200
    local = Scorer(rewards, config=config).score(images, PROMPTS)
    for remote, mine in zip(response.json(), local, strict=True):
        assert remote["error"] is None
        for name in rewards:
            assert remote["rewards"][name] == pytest.approx(mine.rewards[name], abs=1e-5)
        assert remote["versions"] == {name: mine.details[name]["version"] for name in rewards}


def test_rank_over_http_with_rank_aggregation(served, bus_path, zidane):
    client, _, _ = served
    buffer = io.BytesIO()
    zidane.save(buffer, format="PNG")
    candidates = [{"image": base64.b64encode(d).decode()} for d in (bus_path.read_bytes(), buffer.getvalue())]
    body = {
        "groups": [{"prompt": "a bus", "candidates": candidates}],
        "rewards": {"clip": 1.0, "pickscore": 1.0},
        "options": {"aggregation": "rank_sum", "likelihood_weights": "softmax"},
    }
    response = client.post("/rank", json=body)
    assert response.status_code == 200, response.text
    (answer,) = response.json()
    values = {name: [c["rewards"][name] for c in answer["candidates"]] for name in ("clip", "pickscore")}
    assert answer["aggregation"] == "rank_sum"
    assert answer["scores"] == pytest.approx(combine(values, aggregation="rank_sum"))
    assert answer["order"][0] == answer["chosen"] and sum(answer["weights"]) == pytest.approx(1.0)
