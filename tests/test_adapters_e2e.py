"""The trainer adapters with the real client against a real `rewardscope serve` (the session's shared server):
rewards arrive in the shape and dtype the trainer expects, one failed item raises by default, "impute" keeps every
advantage and the loss finite with the failed sample's advantage near 0, and TRL's async branch resolves the
futures. The trainer code is the stand-in of tests/test_adapters.py (written from TRL's trl/trainer/ddpo_trainer.py:
DDPOTrainer.compute_rewards, step, calculate_loss and loss)."""

from __future__ import annotations

from concurrent import futures

import numpy as np
import pytest
import torch
from PIL import Image
from rewardscope_client import RewardClient
from rewardscope_client.adapters import ddpo_reward_fn, flow_grpo_reward_fn
from rewardscope_client.failures import ItemsFailed
from serving import TOKEN
from test_adapters import ddpo_advantages, ddpo_loss

# "a rocket launch" names nothing the embedded detector knows: the service answers no_countable_object for it.
PROMPTS = ("a bus", "two people", "a rocket launch", "a person")


@pytest.fixture(scope="module")
def client(token_server):
    with RewardClient(token_server, token=TOKEN) as client:
        yield client


@pytest.fixture(scope="module")
def photos(bus, zidane) -> torch.Tensor:
    """[4, 3, 320, 320] in [0, 1], as a diffusion pipeline hands its samples to the reward function."""
    tiles = [photo.resize((320, 320), Image.BILINEAR) for photo in (bus, zidane, bus, zidane)]
    return torch.stack([torch.from_numpy(np.array(tile)).permute(2, 0, 1).float() / 255 for tile in tiles])


def test_ddpo_default_raises_naming_the_failed_item(client, photos):
    with pytest.raises(ItemsFailed, match="item 2: no_countable_object"):
        ddpo_reward_fn(client)(photos, PROMPTS, [{}] * 4)


def test_ddpo_impute_keeps_the_step_finite(client, photos):
    rewards, metadata = ddpo_reward_fn(client, on_failure="impute")(photos, PROMPTS, [{}] * 4)
    assert rewards.dtype == torch.float32 and rewards.shape == (4,) and torch.isfinite(rewards).all()
    assert metadata["imputed"].tolist() == [False, False, True, False]
    advantages = ddpo_advantages(rewards)
    assert torch.isfinite(advantages).all() and abs(float(advantages[2])) < 0.1
    assert torch.isfinite(ddpo_loss(advantages, torch.full((4,), 1.02)))


def test_ddpo_as_futures_through_trls_async_branch(client, photos):
    reward_fn = ddpo_reward_fn(client, on_failure="impute", as_futures=True)
    pairs = [[photos[:2], PROMPTS[:2], ({}, {})], [photos[2:], PROMPTS[2:], ({}, {})]]
    with futures.ThreadPoolExecutor(max_workers=2) as executor:
        mapped = executor.map(lambda x: reward_fn(*x), pairs)  # DDPOTrainer.compute_rewards, is_async=True
        rewards = [(torch.as_tensor(reward.result()), metadata.result()) for reward, metadata in mapped]
    values = torch.cat([reward for reward, _ in rewards])
    assert values.shape == (4,) and torch.isfinite(values).all()
    assert rewards[1][1]["imputed"].tolist() == [True, False]


def test_flow_grpo_impute_gives_finite_scores_and_avg(client, photos):
    reward_fn = flow_grpo_reward_fn(client, on_failure="impute")
    scores, info = reward_fn(photos, list(PROMPTS), [{}] * 4, only_strict=True)
    assert set(scores) == {"matching", "avg"} and all(np.isfinite(v).all() for v in scores.values())
    assert info["imputed"].tolist() == [False, False, True, False] and info["error_codes"][2] == "no_countable_object"
