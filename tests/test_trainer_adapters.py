"""rewardscope_client.trainers in each trainer's call shape, driven with the real client against the fake transport
of tests/test_client_unit.py (FakeService: the reward is the image's mean brightness, a prompt containing "fail"
fails with no_countable_object; an image with NaN pixels fails locally with invalid_pixels).

The trainers are not installed here; the calls below are written from reading their source (cited in
rewardscope_client/trainers.py): TRL AlignPropTrainer.compute_rewards / calculate_loss, verl-omni
VisualRewardManager.run_single, DanceGRPO sample_reference_model, ddpo-pytorch's getattr factory and flow_grpo's
multi_score."""

from __future__ import annotations

import asyncio
import base64
import inspect
import io
import math
import threading
import types
from concurrent import futures

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from rewardscope_client import RewardClient, trainers
from rewardscope_client.failures import ItemsFailed
from rewardscope_client.trainers import (
    SampleFailed,
    ScoreCoalescer,
    alignprop_reward_fn,
    dancegrpo_reward,
    ddpo_pytorch_reward,
    flow_grpo_score,
    verl_compute_score,
)
from test_client_unit import URL, FakeService, decode_pixels, fake_client


def score_requests(service: FakeService) -> list[int]:
    """The number of items in each POST /score the service received."""
    return [
        len(body["items"])
        for request, body in zip(service.requests, service.bodies, strict=True)
        if request.url.path == "/score"
    ]


def chw(level: int) -> torch.Tensor:
    """verl-omni's pixel response: a uint8 tensor [3, H, W]; its fake reward is level / 255."""
    return torch.full((3, 8, 8), level, dtype=torch.uint8)


def nan_image() -> np.ndarray:
    image = np.full((8, 8, 3), 0.5, dtype=np.float32)
    image[0, 0, 0] = np.nan
    return image


# -- AlignProp: a differentiable reward through POST /grad --------------------------------------------------------
def npy_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode()


class GradService(FakeService):
    """FakeService that also answers /grad: reward = mean pixel value, so d reward / d pixel = 1 / (3 H W)."""

    def answer(self, request: httpx.Request, body):
        if request.url.path != "/grad":
            return super().answer(request, body)
        answers = []
        for entry in body["items"]:
            if "fail" in entry["prompt"]:
                answers.append(
                    {
                        "rewards": {"matching": None},
                        "total": None,
                        "error": "prompt has no countable object",
                        "error_code": "no_countable_object",
                        "grad": None,
                        "grad_scale": None,
                    }
                )
                continue
            pixels = decode_pixels(entry).astype(np.float32)
            value = float(pixels.mean())
            answers.append(
                {
                    "rewards": {"matching": value},
                    "total": value,
                    "error": None,
                    "error_code": None,
                    "grad": npy_b64(np.ones(pixels.shape, dtype=np.float16)),
                    "grad_scale": 1.0 / pixels.size,
                }
            )
        return httpx.Response(200, json=answers)


def bf16_images(levels: list[float], device: str = "cpu") -> torch.Tensor:
    stacked = torch.stack([torch.full((3, 8, 8), level) for level in levels])
    return stacked.to(device, torch.bfloat16).requires_grad_(True)


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
def test_alignprop_returns_a_float32_differentiable_reward_and_a_metadata_dict(device):
    images = bf16_images([0.25, 0.5, 0.75], device)
    with fake_client(GradService()) as client:
        reward_fn = alignprop_reward_fn(client)
        reward, metadata = reward_fn(images, ("a dog", "a cat", "a bird"), ({}, {}, {}))  # compute_rewards' unpacking
    assert isinstance(metadata, dict) and metadata["valid"].tolist() == [True, True, True]
    assert reward.shape == (3,) and reward.dtype == torch.float32 and reward.requires_grad
    assert reward.device == images.device
    np.testing.assert_allclose(reward.detach().cpu().numpy(), [0.25, 0.5, 0.75], rtol=1e-3)
    loss = 10.0 - reward.mean()  # TRL AlignPropTrainer.calculate_loss
    loss.backward()
    assert images.grad is not None and images.grad.dtype == torch.bfloat16 and images.grad.device == images.device
    assert torch.isfinite(images.grad).all()
    expected = -1.0 / 3 / (3 * 8 * 8)  # d(10 - mean r) / d pixel
    np.testing.assert_allclose(images.grad.float().cpu().numpy(), expected, rtol=1e-2)


def test_alignprop_maps_the_repositorys_minus_one_to_one_pixels():
    images = (bf16_images([0.25, 0.75]).detach() * 2 - 1).requires_grad_(True)
    with fake_client(GradService()) as client:
        reward, _ = alignprop_reward_fn(client, pixel_range=(-1.0, 1.0))(images, ["a", "b"])
    np.testing.assert_allclose(reward.detach().numpy(), [0.25, 0.75], rtol=1e-3)
    reward.sum().backward()
    np.testing.assert_allclose(images.grad.float().numpy(), 0.5 / (3 * 8 * 8), rtol=1e-2)  # the chain rule's 1/2


def test_alignprop_failed_item_raises_by_default():
    with fake_client(GradService()) as client, pytest.raises(ItemsFailed) as raised:
        alignprop_reward_fn(client)(bf16_images([0.25, 0.5, 0.75]), ["a dog", "fail: a unicorn", "a bird"])
    assert raised.value.indices == [1] and "no_countable_object" in str(raised.value)


def test_alignprop_impute_is_finite_marked_and_carries_no_gradient():
    images = bf16_images([0.25, 0.5, 0.75])
    with fake_client(GradService()) as client:
        reward, metadata = alignprop_reward_fn(client, on_failure="impute")(images, ["a", "fail", "b"], None)
    assert torch.isfinite(reward).all() and float(reward.detach()[1]) == pytest.approx(
        0.5, rel=1e-3
    )  # (0.25 + 0.75) / 2
    assert metadata["imputed"].tolist() == [False, True, False] and metadata["errors"][1]
    (10.0 - reward.mean()).backward()
    assert torch.isfinite(images.grad).all()
    assert float(images.grad[1].abs().max()) == 0.0 and float(images.grad[0].abs().min()) > 0


def test_alignprop_nan_only_under_the_nan_policy():
    images = bf16_images([0.25, 0.5])
    with fake_client(GradService()) as client:
        reward, metadata = alignprop_reward_fn(client, on_failure="nan")(images, ["a", "fail"])
    assert torch.isnan(reward[1]) and float(reward.detach()[0]) == pytest.approx(0.25, rel=1e-3)
    assert not metadata["valid"][1] and not metadata["imputed"].any()


# -- verl / verl-omni: an async per-sample compute_score, coalesced ---------------------------------------------------
async def run_single_concurrently(compute_score, samples):
    """verl-omni's reward loop: one awaited compute_score per sample, all in flight at once."""
    return await asyncio.gather(
        *(
            compute_score(
                data_source="t2i",
                solution_image=image,
                ground_truth=prompt,
                extra_info={"num_turns": None},
                reward_router_address=None,  # the extra kwargs VisualRewardManager passes with a reward router
                model_name=None,
            )
            for image, prompt in samples
        ),
        return_exceptions=True,
    )


def test_verl_compute_score_is_a_coroutine_function_and_coalesces_concurrent_calls():
    service = FakeService()
    levels = [10 * (i + 1) for i in range(8)]
    with fake_client(service) as client:
        compute_score = verl_compute_score(client, max_wait_s=0.2)  # generous: a loaded CI machine
        assert inspect.iscoroutinefunction(compute_score)  # what VisualRewardManager checks before awaiting
        results = asyncio.run(run_single_concurrently(compute_score, [(chw(v), f"prompt {v}") for v in levels]))
    assert score_requests(service) == [8]  # one batched /score for the eight calls
    for result, level in zip(results, levels, strict=True):
        assert set(result) == {"score", "error", "error_code", "imputed", "valid"}
        assert result["score"] == pytest.approx(level / 255) and result["valid"] and not result["imputed"]
    assert [entry["prompt"] for entry in service.bodies[0]["items"]] == [f"prompt {v}" for v in levels]


def test_verl_batches_are_capped_at_max_batch():
    service = FakeService()
    with fake_client(service) as client:
        compute_score = verl_compute_score(client, max_batch=3, max_wait_s=0.2)
        results = asyncio.run(run_single_concurrently(compute_score, [(chw(i), f"p{i}") for i in range(8)]))
    assert sorted(score_requests(service)) == [2, 3, 3]
    assert [r["score"] for r in results] == pytest.approx([i / 255 for i in range(8)])


def test_verl_default_raises_for_the_failed_sample_alone():
    service = FakeService()
    samples = [(chw(51), "a dog"), (chw(102), "fail: a unicorn"), (chw(153), "a cat")]
    with fake_client(service) as client:
        results = asyncio.run(run_single_concurrently(verl_compute_score(client, max_wait_s=0.2), samples))
    assert isinstance(results[1], SampleFailed) and isinstance(results[1], ItemsFailed)
    assert "fail: a unicorn" in str(results[1]) and "no_countable_object" in str(results[1])
    assert "on_failure='impute'" in str(results[1])
    assert results[0]["score"] == pytest.approx(51 / 255) and results[2]["score"] == pytest.approx(153 / 255)
    assert score_requests(service) == [3]


def test_verl_impute_prefers_valid_samples_with_the_same_prompt_and_marks_them():
    samples = [
        (chw(51), "two dogs"),
        (chw(102), "two dogs"),
        (nan_image(), "two dogs"),  # fails locally (NaN pixels): imputed from its prompt's valid samples
        (chw(204), "a cat"),
        (chw(0), "fail: a unicorn"),  # its prompt has no valid sample: the mean of all valid samples
    ]
    with fake_client(FakeService()) as client:
        compute_score = verl_compute_score(client, on_failure="impute", max_wait_s=0.2)
        results = asyncio.run(run_single_concurrently(compute_score, samples))
    assert all(math.isfinite(r["score"]) for r in results)
    assert results[2]["score"] == pytest.approx((51 + 102) / 2 / 255)
    assert results[4]["score"] == pytest.approx((51 + 102 + 204) / 3 / 255)
    assert [r["imputed"] for r in results] == [False, False, True, False, True]
    assert results[2]["error_code"] == "invalid_pixels" and results[4]["error_code"] == "no_countable_object"
    assert compute_score.coalescer.stats["imputed"] == 2


def test_verl_impute_with_nothing_to_impute_from_raises():
    with fake_client(FakeService()) as client:
        results = asyncio.run(
            run_single_concurrently(verl_compute_score(client, on_failure="impute"), [(chw(1), "fail")])
        )
    assert isinstance(results[0], SampleFailed) and "nothing to impute from" in str(results[0])


def test_verl_nan_leaves_nan_only_under_that_policy():
    samples = [(chw(51), "a dog"), (chw(102), "fail")]
    with fake_client(FakeService()) as client:
        results = asyncio.run(run_single_concurrently(verl_compute_score(client, on_failure="nan"), samples))
    assert math.isnan(results[1]["score"]) and not results[1]["valid"] and not results[1]["imputed"]
    assert results[0]["score"] == pytest.approx(51 / 255)


def test_verl_reads_the_prompt_from_extra_info_when_ground_truth_is_not_one():
    service = FakeService()
    with fake_client(service) as client:
        compute_score = verl_compute_score(client)
        result = asyncio.run(compute_score("t2i", chw(51), None, {"prompt": "a dog", "metadata": {"include": []}}))
    assert result["score"] == pytest.approx(51 / 255)
    assert service.bodies[0]["items"][0]["prompt"] == "a dog"


def test_a_whole_request_failure_reaches_every_caller():
    service = FakeService(script=[httpx.Response(400, json={"error": "bad request"})])
    with fake_client(service) as client:
        results = asyncio.run(run_single_concurrently(verl_compute_score(client), [(chw(1), "a"), (chw(2), "b")]))
    assert all("bad request" in str(result) for result in results)


def test_the_coalescer_refuses_a_batch_per_call_and_an_async_client():
    with fake_client(FakeService()) as client, pytest.raises(ValueError, match="one image"):
        ScoreCoalescer(client).submit(torch.zeros(2, 3, 8, 8), "two images")
    from rewardscope_client import AsyncRewardClient

    with pytest.raises(TypeError, match="RewardClient"):
        ScoreCoalescer(AsyncRewardClient(URL))


# -- DanceGRPO: one PIL image at a time -> float32 tensor [1] ---------------------------------------------------------
def pil(level: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (level, level, level))


def test_dancegrpo_returns_a_float32_tensor_of_shape_one():
    with fake_client(FakeService()) as client:
        reward_fn = dancegrpo_reward(client, device="cpu")
        reward = reward_fn(pil(51), "a dog")  # all_rewards.append(reward_fn(decoded_image[0], batch_caption[0]))
    assert reward.shape == (1,) and reward.dtype == torch.float32 and reward.device.type == "cpu"
    assert float(reward[0]) == pytest.approx(51 / 255)


def test_dancegrpo_concurrent_calls_from_threads_are_coalesced():
    service = FakeService()
    levels = [20 * (i + 1) for i in range(8)]
    barrier = threading.Barrier(8)
    with fake_client(service) as client:
        reward_fn = dancegrpo_reward(client, max_wait_s=0.2)

        def call(level: int) -> torch.Tensor:
            barrier.wait()
            return reward_fn(pil(level), f"prompt {level}")

        with futures.ThreadPoolExecutor(8) as pool:
            rewards = list(pool.map(call, levels))
    assert sum(score_requests(service)) == 8 and len(score_requests(service)) <= 2
    np.testing.assert_allclose(torch.cat(rewards).numpy(), np.array(levels) / 255, rtol=1e-6)


def test_dancegrpo_submit_overlaps_and_resolves_in_order():
    service = FakeService()
    with fake_client(service) as client:
        reward_fn = dancegrpo_reward(client)
        pending = [reward_fn.submit(pil(level), "a dog") for level in (51, 102, 153)]
        rewards = torch.cat([future.result() for future in pending])
    np.testing.assert_allclose(rewards.numpy(), np.array([51, 102, 153]) / 255, rtol=1e-6)


def test_dancegrpo_failures_follow_the_policy():
    with fake_client(FakeService()) as client:
        with pytest.raises(SampleFailed, match="no_countable_object"):
            dancegrpo_reward(client)(pil(51), "fail: a unicorn")
        reward_fn = dancegrpo_reward(client, on_failure="impute", max_wait_s=0.2)
        pending = [reward_fn.coalescer.submit(pil(level), p) for level, p in ((51, "a"), (153, "b"), (0, "fail"))]
        details = [future.result() for future in pending]
        assert details[2]["imputed"] and details[2]["score"] == pytest.approx((51 + 153) / 2 / 255)
        assert reward_fn.coalescer.stats["imputed"] == 1
        nan_fn = dancegrpo_reward(client, on_failure="nan")
        assert torch.isnan(nan_fn(pil(1), "fail")).all() and not nan_fn.details(pil(1), "fail")["valid"]


# -- ddpo-pytorch: a zero-argument factory selected by name ----------------------------------------------------------
@pytest.fixture
def client_of(monkeypatch):
    """The factories build their RewardClient from the environment; route it to a FakeService."""
    service = GradService()

    def make(url, **options):
        return RewardClient(url, transport=httpx.MockTransport(service), backoff=0.001, **options)

    monkeypatch.setattr(trainers, "RewardClient", make)
    for name in (trainers.ENV_REWARDS, trainers.ENV_PROFILE, trainers.ENV_ON_FAILURE, trainers.ENV_SELECT):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(trainers.ENV_URL, URL)
    return service


def ddpo_pytorch_rewards_module() -> types.ModuleType:
    """ddpo_pytorch/rewards.py with the documented one-line addition."""
    module = types.ModuleType("ddpo_pytorch.rewards")
    module.rewardscope = trainers.ddpo_pytorch_reward
    return module


def images(levels: list[float]) -> torch.Tensor:
    return torch.stack([torch.full((3, 8, 8), level) for level in levels])


def test_ddpo_pytorch_factory_is_selected_by_name_and_configured_from_the_environment(client_of, monkeypatch):
    monkeypatch.setenv(trainers.ENV_REWARDS, '{"matching": 0.5}')
    monkeypatch.setenv(trainers.ENV_PROFILE, "train")
    config_reward_fn = "rewardscope"  # --config.reward_fn=rewardscope
    reward_fn = getattr(ddpo_pytorch_rewards_module(), config_reward_fn)()  # train.py: getattr(..., config.reward_fn)()
    with futures.ThreadPoolExecutor(1) as executor:  # train.py submits it to an executor
        rewards, metadata = executor.submit(reward_fn, images([0.2, 0.4]), ("a dog", "a cat"), ({}, {})).result()
    assert rewards.dtype == torch.float32 and rewards.shape == (2,) and isinstance(metadata, dict)
    np.testing.assert_allclose(rewards.numpy(), 0.5 * np.array([51, 102]) / 255, rtol=1e-6)
    (body,) = client_of.bodies
    assert body["items"][0]["rewards"] == {"matching": 0.5} and body["items"][0]["profile"] == "train"
    assert str(client_of.requests[0].url).startswith(URL)


def test_ddpo_pytorch_factory_failure_policy_from_the_environment(client_of, monkeypatch):
    reward_fn = ddpo_pytorch_reward()
    with pytest.raises(ItemsFailed):
        reward_fn(images([0.2, 0.4]), ("a dog", "fail"), ({}, {}))
    monkeypatch.setenv(trainers.ENV_ON_FAILURE, "impute")
    rewards, metadata = ddpo_pytorch_reward()(images([0.2, 0.4, 0.6]), ("a", "fail", "b"), ({}, {}, {}))
    assert torch.isfinite(rewards).all() and metadata["imputed"].tolist() == [False, True, False]
    monkeypatch.setenv(trainers.ENV_ON_FAILURE, "nan")
    rewards, _ = ddpo_pytorch_reward()(images([0.2, 0.4]), ("a", "fail"), ({}, {}))
    assert torch.isnan(rewards[1]) and torch.isfinite(rewards[0])


def test_ddpo_pytorch_factory_names_the_missing_url(monkeypatch):
    monkeypatch.delenv(trainers.ENV_URL, raising=False)
    with pytest.raises(ValueError, match="REWARDSCOPE_URL"):
        ddpo_pytorch_reward()
    monkeypatch.setenv(trainers.ENV_URL, URL)
    monkeypatch.setenv(trainers.ENV_ON_FAILURE, "zero")
    with pytest.raises(ValueError, match="on_failure"):
        ddpo_pytorch_reward()


# -- flow_grpo: a multi_score entry ----------------------------------------------------------------------------------
def build_like_multi_score(function, device="cpu"):
    """flow_grpo/rewards.py multi_score: `fn(device) if 'device' in fn.__code__.co_varnames else fn()`."""
    return function(device) if "device" in function.__code__.co_varnames else function()


def test_flow_grpo_entry_returns_a_list_and_info(client_of):
    score_fn = build_like_multi_score(flow_grpo_score)
    scores, info = score_fn(images([0.2, 0.4]), ["a dog", "a cat"], [{}, {}])
    assert isinstance(scores, list) and all(isinstance(score, float) for score in scores)
    assert scores == pytest.approx([51 / 255, 102 / 255]) and isinstance(info, dict)
    weighted = [0.5 * score for score in scores]  # multi_score's weighting
    assert weighted == pytest.approx([0.5 * 51 / 255, 0.5 * 102 / 255])
    scores, _ = score_fn(images([0.2]), ["a dog"], {})  # rewards.py main() passes one dict for the call
    assert scores == pytest.approx([51 / 255])


def test_flow_grpo_entry_failure_policy(client_of):
    with pytest.raises(ItemsFailed):
        build_like_multi_score(flow_grpo_score)(images([0.2, 0.4]), ["a", "fail"], None)
    scores, info = flow_grpo_score("cpu", url=URL, on_failure="impute")(images([0.2, 0.4, 0.6]), ["a", "fail", "b"])
    assert all(math.isfinite(score) for score in scores) and info["imputed"].tolist() == [False, True, False]
    scores, _ = flow_grpo_score("cpu", on_failure="nan")(images([0.2, 0.4]), ["a", "fail"])
    assert math.isnan(scores[1]) and math.isfinite(scores[0])


def test_the_adapters_module_re_exports_them():
    from rewardscope_client import adapters

    assert adapters.verl_compute_score is verl_compute_score and adapters.alignprop_reward_fn is alignprop_reward_fn
    with pytest.raises(AttributeError):
        adapters.no_such_adapter  # noqa: B018


def test_dancegrpo_a_lone_failed_image_takes_the_recent_valid_mean_under_impute():
    # DanceGRPO scores one image at a time: a failed image has no neighbour in its request, so "impute" falls back
    # to the mean of the valid rewards scored before it (failures.FailurePolicy's history), not to an error.
    with fake_client(FakeService()) as client:
        reward_fn = dancegrpo_reward(client, on_failure="impute")
        first, second = reward_fn(pil(51), "a dog"), reward_fn(pil(153), "a cat")
        imputed = reward_fn(pil(102), "fail: a unicorn")
        details = reward_fn.details(pil(102), "fail: a unicorn")
    assert float(imputed[0]) == pytest.approx((float(first[0]) + float(second[0])) / 2)
    assert details["imputed"] and not details["valid"]
