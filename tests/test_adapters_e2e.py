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


# -- The other trainers, against the same real service ---------------------------------------------------------------
def per_prompt_advantages(rewards, prompts, global_std: bool) -> np.ndarray:
    """Stand-in of the per-prompt normalisation of flow_grpo's PerPromptStatTracker (flow_grpo/stat_tracking.py,
    update) and of GRPO-style per-group advantages (DanceGRPO's train_one_step, verl's GRPO estimator): each
    reward minus its prompt's mean, over the batch's std (global_std, flow_grpo's shipped setting) or its prompt's."""
    rewards, prompt_of = np.asarray(rewards, dtype=np.float64), np.asarray(prompts, dtype=object)
    advantages = np.empty_like(rewards)
    for prompt in set(prompts):
        group = prompt_of == prompt
        std = rewards.std() if global_std else rewards[group].std()
        advantages[group] = (rewards[group] - rewards[group].mean()) / (std + 1e-4)
    return advantages


GROUPED = ("a bus", "a bus", "a rocket launch", "a rocket launch", "two people", "two people")


def test_flow_grpo_entry_under_impute_keeps_its_advantages_finite(token_server, photos, monkeypatch):
    from rewardscope_client import trainers

    monkeypatch.setenv("REWARDSCOPE_TOKEN", TOKEN)
    scorer = trainers.flow_grpo_score("cpu", url=token_server, on_failure="impute")  # as multi_score builds it
    batch = torch.cat([photos, photos[:2]])
    scores, info = scorer(batch, list(GROUPED), [{}] * 6)
    assert isinstance(scores, list) and len(scores) == 6 and all(np.isfinite(scores))
    advantages = per_prompt_advantages(scores, GROUPED, global_std=True)
    assert np.isfinite(advantages).all() and np.abs(advantages[2:4]).max() < 0.1
    assert info["imputed"].tolist() == [False, False, True, True, False, False]


def test_ddpo_pytorch_factory_selected_by_name(token_server, photos, monkeypatch):
    import types

    from rewardscope_client import trainers

    rewards_module = types.SimpleNamespace(rewardscope=trainers.ddpo_pytorch_reward)  # ddpo_pytorch/rewards.py
    monkeypatch.setenv("REWARDSCOPE_URL", token_server)
    monkeypatch.setenv("REWARDSCOPE_TOKEN", TOKEN)
    monkeypatch.setenv("REWARDSCOPE_CLIENT_ON_FAILURE", "impute")
    reward_fn = rewards_module.rewardscope()  # scripts/train.py: getattr(rewards, config.reward_fn)()
    with futures.ThreadPoolExecutor(max_workers=1) as executor:
        rewards, metadata = executor.submit(reward_fn, photos, PROMPTS, [{}] * 4).result()
    assert rewards.dtype == torch.float32 and torch.isfinite(rewards).all() and metadata["imputed"][2]


def test_verl_compute_score_coalesces_and_imputes(client, photos):
    import asyncio

    from rewardscope_client import trainers

    compute_score = trainers.verl_compute_score(client, on_failure="impute", max_wait_s=0.2)
    pixels = (photos * 255).to(torch.uint8)  # verl-omni hands pixel responses over as uint8 tensors

    async def rollout():
        return await asyncio.gather(
            *(
                compute_score(data_source="t2i", solution_image=pixels[i % 4], ground_truth=prompt, extra_info={})
                for i, prompt in enumerate(GROUPED)
            )
        )

    results = asyncio.run(rollout())
    scores = [result["score"] for result in results]
    assert all(np.isfinite(scores)) and [result["imputed"] for result in results] == [0, 0, 1, 1, 0, 0]
    assert np.abs(per_prompt_advantages(scores, GROUPED, global_std=False)[2:4]).max() < 0.1


def test_dancegrpo_reward_gives_one_float32_value_per_image(client, bus):
    from rewardscope_client import trainers

    reward = trainers.dancegrpo_reward(client)
    value = reward(bus, "a bus")
    assert value.dtype == torch.float32 and value.shape == (1,) and 0 < float(value) <= 1
    with pytest.raises(ItemsFailed, match="no_countable_object"):
        reward(bus, "a rocket launch")  # a lone image: nothing to impute from, so the default raises


def test_alignprop_reward_has_a_gradient_and_a_tuple(client, photos):
    from rewardscope_client import trainers

    images = photos[:2, :, :96, :96].clone().to(torch.bfloat16).requires_grad_(True)
    reward_fn = trainers.alignprop_reward_fn(client, rewards={"matching": 1.0})
    reward, metadata = reward_fn(images, ("a bus", "two people"), ({}, {}))
    assert reward.dtype == torch.float32 and reward.shape == (2,) and isinstance(metadata, dict)
    (10.0 - reward.mean()).backward()  # AlignPropTrainer.calculate_loss
    assert images.grad is not None and torch.isfinite(images.grad.float()).all()
