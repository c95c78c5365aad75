"""The adapters through TRL's own code (trl 0.23, the last release with DDPOTrainer and AlignPropTrainer; the test
extra `trainers` installs it): DDPOTrainer.compute_rewards (sync and async branches), TRL's PerPromptStatTracker
and DDPOTrainer.loss, AlignPropTrainer.compute_rewards and calculate_loss, with the real client against the
session's real service. TRL's methods run unbound on a stand-in `self` that holds only what they read (the reward
function, the executor, the accelerator's device): building a trainer needs a Stable Diffusion pipeline."""

from __future__ import annotations

import types
from concurrent import futures

import numpy as np
import pytest
import torch
from rewardscope_client import RewardClient
from rewardscope_client.adapters import ddpo_reward_fn
from rewardscope_client.failures import ItemsFailed
from rewardscope_client.trainers import alignprop_reward_fn
from serving import TOKEN
from test_adapters_e2e import PROMPTS, photos  # noqa: F401  (the fixture)

trl = pytest.importorskip("trl", minversion="0.20")
from trl.trainer.alignprop_trainer import AlignPropTrainer  # noqa: E402
from trl.trainer.ddpo_trainer import DDPOTrainer  # noqa: E402
from trl.trainer.utils import PerPromptStatTracker  # noqa: E402


@pytest.fixture(scope="module")
def client(token_server):
    with RewardClient(token_server, token=TOKEN) as client:
        yield client


def trainer(reward_fn, is_async: bool = False) -> types.SimpleNamespace:
    accelerator = types.SimpleNamespace(device=torch.device("cpu"))
    executor = futures.ThreadPoolExecutor(max_workers=2) if is_async else None
    return types.SimpleNamespace(reward_fn=reward_fn, accelerator=accelerator, executor=executor)


def pairs(photos):  # noqa: F811
    return [[photos[:2], PROMPTS[:2], ({}, {})], [photos[2:], PROMPTS[2:], ({}, {})]]


def test_trl_ddpo_default_raises_from_compute_rewards(client, photos):  # noqa: F811
    with pytest.raises(ItemsFailed, match="no_countable_object"):
        DDPOTrainer.compute_rewards(trainer(ddpo_reward_fn(client)), pairs(photos))


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async_reward_computation"])
def test_trl_ddpo_impute_keeps_advantages_and_loss_finite(client, photos, is_async):  # noqa: F811
    reward_fn = ddpo_reward_fn(client, on_failure="impute", as_futures=is_async)
    rewards, metadata = DDPOTrainer.compute_rewards(trainer(reward_fn, is_async), pairs(photos), is_async=is_async)
    rewards = torch.cat(rewards).cpu().numpy()  # DDPOTrainer.step
    assert rewards.shape == (4,) and np.isfinite(rewards).all() and metadata[1]["imputed"].tolist() == [True, False]
    advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-8)  # DDPOTrainer.step, no per-prompt tracking
    assert np.isfinite(advantages).all() and abs(advantages[2]) < 0.1
    tracked = PerPromptStatTracker(buffer_size=16, min_count=16).update(np.array(PROMPTS), rewards)
    assert np.isfinite(tracked).all() and abs(tracked[2]) < 0.1
    clamped = torch.clamp(torch.as_tensor(advantages), -5, 5)  # DDPOTrainer.calculate_loss
    loss = DDPOTrainer.loss(None, clamped, 1e-4, torch.full((4,), 1.01, dtype=torch.float64))
    assert torch.isfinite(loss)


def test_trl_alignprop_reward_back_propagates(client, photos):  # noqa: F811
    images = photos[:2, :, :96, :96].clone().requires_grad_(True)
    samples = {"images": images, "prompts": ("a bus", "two people"), "prompt_metadata": ({}, {})}
    reward_fn = alignprop_reward_fn(client, rewards={"matching": 1.0})
    rewards = AlignPropTrainer.compute_rewards(types.SimpleNamespace(reward_fn=reward_fn), samples)
    loss = AlignPropTrainer.calculate_loss(None, rewards)
    loss.backward()
    assert rewards.dtype == torch.float32 and torch.isfinite(loss)
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
