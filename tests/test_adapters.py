"""Trainer adapters under failure: each trainer's reward call site and its advantage / loss code, driven with the
real client against a fake transport (tests/test_client_unit.py's FakeService: the reward is the image's mean
brightness, a prompt containing "fail" fails with no_countable_object).

The trainers' code is not installed here (TRL removed DDPOTrainer in v0.24); the stand-ins below are written from
reading TRL's trl/trainer/ddpo_trainer.py (DDPOTrainer.compute_rewards: the async branch maps the reward function
over the batches and calls .result() on both returned values; DDPOTrainer.step: advantages
(r - mean) / (std + 1e-8) over the gathered rewards; calculate_loss: torch.clamp of the advantages; loss: the PPO
clipped objective), not copied from it."""

from __future__ import annotations

import logging
from concurrent import futures

import numpy as np
import pytest
import torch
from rewardscope_client.adapters import ddpo_reward_fn, flow_grpo_reward_fn
from rewardscope_client.failures import ItemsFailed, impute, nan_aware_advantages
from test_client_unit import FakeService, fake_client

PROMPTS = ("a dog", "a cat", "fail: a unicorn", "a bird")


def images(levels: list[float]) -> torch.Tensor:
    return torch.stack([torch.full((3, 8, 8), level) for level in levels])


def ddpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """DDPOTrainer.step without per-prompt tracking: (r - mean) / (std + 1e-8) over the batch (numpy std)."""
    values = rewards.cpu().numpy()
    return torch.as_tensor((values - values.mean()) / (values.std() + 1e-8))


def ddpo_loss(advantages: torch.Tensor, ratio: torch.Tensor, clip_adv: float = 5.0, clip_range: float = 1e-4):
    """DDPOTrainer.calculate_loss + loss: clamp the advantages, then the PPO clipped objective."""
    advantages = torch.clamp(advantages, -clip_adv, clip_adv)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.mean(torch.maximum(unclipped, clipped))


def test_by_default_a_failed_item_raises_naming_it_and_why():
    with fake_client(FakeService()) as client, pytest.raises(ItemsFailed) as raised:
        ddpo_reward_fn(client)(images([0.2, 0.4, 0.6, 0.8]), PROMPTS, [{}] * 4)
    assert raised.value.indices == [2]
    assert "item 2: no_countable_object: prompt has no countable object" in str(raised.value)
    assert "on_failure='impute'" in str(raised.value)


def test_impute_keeps_every_advantage_and_the_loss_finite_and_the_failed_advantage_near_zero():
    with fake_client(FakeService()) as client:
        rewards, metadata = ddpo_reward_fn(client, on_failure="impute")(images([0.2, 0.4, 0.6, 0.8]), PROMPTS, [{}] * 4)
    assert rewards.dtype == torch.float32 and rewards.shape == (4,)
    # No valid item shares the failed item's prompt: it gets the mean of all valid ones, (0.2 + 0.4 + 0.8) / 3
    # at the fake's 8-bit brightness (51, 102, 204 / 255).
    assert float(rewards[2]) == pytest.approx((51 + 102 + 204) / 255 / 3, abs=1e-6)
    assert metadata["imputed"].tolist() == [False, False, True, False] and metadata["errors"][2]
    advantages = ddpo_advantages(rewards)
    loss = ddpo_loss(advantages, torch.full((4,), 1.0))
    assert torch.isfinite(advantages).all() and torch.isfinite(loss)
    assert abs(float(advantages[2])) < 0.1


def test_impute_prefers_the_items_of_the_same_prompt():
    prompts = ["two dogs", "two dogs fail", "a cat"]
    values = np.array([0.5, np.nan, 0.9])
    # "two dogs fail" is its own prompt string here: the mean of all valid items, (0.5 + 0.9) / 2.
    assert impute(values, ~np.isfinite(values), prompts)[1] == pytest.approx(0.7)
    same = ["two dogs", "two dogs", "a cat", "two dogs"]
    values = np.array([0.5, np.nan, 0.9, 0.3])
    assert impute(values, ~np.isfinite(values), same)[1] == pytest.approx(0.4)  # (0.5 + 0.3) / 2


def test_nan_policy_with_the_nan_aware_helper_masks_the_failed_sample():
    with fake_client(FakeService()) as client:
        rewards, metadata = ddpo_reward_fn(client, on_failure="nan")(images([0.2, 0.4, 0.6, 0.8]), PROMPTS, [{}] * 4)
    assert torch.isnan(rewards[2]) and not metadata["valid"][2]
    assert torch.isnan(ddpo_advantages(rewards)).all()  # what the trainer's own normalisation would do with it
    advantages = nan_aware_advantages(rewards)
    valid = rewards[[0, 1, 3]].double().numpy()
    expected = (valid - valid.mean()) / (valid.std() + 1e-8)
    assert isinstance(advantages, torch.Tensor) and advantages.dtype == torch.float32
    np.testing.assert_allclose(advantages[[0, 1, 3]].numpy(), expected, rtol=1e-5)
    assert float(advantages[2]) == 0.0 and torch.isfinite(ddpo_loss(advantages, torch.ones(4)))


def test_as_futures_passes_trls_async_branch():
    pairs = [[images([0.2, 0.4]), ("a dog", "a cat"), ({}, {})], [images([0.6, 0.8]), ("a bird", "a fish"), ({}, {})]]
    with fake_client(FakeService()) as client:
        reward_fn = ddpo_reward_fn(client, as_futures=True)
        executor = futures.ThreadPoolExecutor(max_workers=2)
        mapped = executor.map(lambda x: reward_fn(*x), pairs)  # DDPOTrainer.compute_rewards, is_async=True
        rewards = [(torch.as_tensor(reward.result()), metadata.result()) for reward, metadata in mapped]
        executor.shutdown()
    values, metadata = zip(*rewards, strict=True)
    np.testing.assert_allclose(torch.cat(values).numpy(), np.array([51, 102, 153, 204]) / 255, rtol=1e-6)
    assert metadata[0]["valid"].tolist() == [True, True]


def test_a_prompt_that_can_never_be_scored_is_reported_once(caplog):
    with fake_client(FakeService()) as client, caplog.at_level(logging.WARNING, logger="rewardscope_client"):
        reward_fn = ddpo_reward_fn(client, on_failure="impute")
        for _ in range(3):
            reward_fn(images([0.2, 0.4, 0.6, 0.8]), PROMPTS, [{}] * 4)
    reported = [r.getMessage() for r in caplog.records if "can never be scored" in r.getMessage()]
    assert reported == ["prompt 'fail: a unicorn' can never be scored by this service: prompt has no countable object"]


def test_impute_refuses_a_call_in_which_nothing_scored():
    with fake_client(FakeService()) as client, pytest.raises(ItemsFailed):
        ddpo_reward_fn(client, on_failure="impute")(images([0.2, 0.4]), ["fail 1", "fail 2"], [{}] * 2)


def test_flow_grpo_impute_fills_every_score_and_avg():
    with fake_client(FakeService()) as client:
        reward_fn = flow_grpo_reward_fn(client, rewards={"matching": 0.5}, on_failure="impute")
        scores, info = reward_fn(images([0.2, 0.4, 0.6]), ["a", "b", "fail"], [{}, {}, {}])
    assert np.isfinite(scores["avg"]).all() and np.isfinite(scores["matching"]).all()
    assert scores["matching"][2] == pytest.approx((51 + 102) / 255 / 2) and info["imputed"].tolist() == [0, 0, 1]


def test_a_nan_image_fails_alone_and_the_rest_of_its_batch_is_scored():
    # An fp16 VAE overflow: one NaN pixel in image 1. It is not sent; its item fails with invalid_pixels.
    batch = images([0.2, 0.4, 0.6, 0.8])
    batch[1, 0, 3, 3] = float("nan")
    batch[3, 2, 0, 0] = float("inf")
    service = FakeService()
    with fake_client(service) as client:
        rewards, metadata = ddpo_reward_fn(client, on_failure="nan")(batch, ("a", "b", "c", "d"), [{}] * 4)
        with pytest.raises(ItemsFailed, match="item 1: invalid_pixels"):
            ddpo_reward_fn(client)(batch, ("a", "b", "c", "d"), [{}] * 4)
    assert metadata["error_codes"] == [None, "invalid_pixels", None, "invalid_pixels"]
    np.testing.assert_allclose(rewards.numpy(), [51 / 255, np.nan, 153 / 255, np.nan], rtol=1e-6)
    assert len(service.bodies[0]["items"]) == 2  # only the two good images travelled


def test_a_batch_of_only_nan_images_sends_nothing():
    service = FakeService()
    with fake_client(service) as client:
        batch = client.score([np.full((4, 4, 3), np.nan, np.float32)], ["a"])
    assert batch.error_codes == ["invalid_pixels"] and service.bodies == []


def test_impute_fills_a_call_in_which_nothing_scored_from_the_earlier_calls():
    with fake_client(FakeService()) as client:
        reward_fn = ddpo_reward_fn(client, on_failure="impute")
        first, _ = reward_fn(images([0.2, 0.6]), ("a dog", "a cat"), [{}] * 2)
        rewards, metadata = reward_fn(images([0.4, 0.4]), ("fail 1", "fail 2"), [{}] * 2)
    assert torch.isfinite(rewards).all() and metadata["imputed"].tolist() == [True, True]
    assert float(rewards[0]) == pytest.approx(float(first.mean()), abs=1e-6)
