"""Differentiable rewards: the torch twin of the detector, gradients checked against finite differences, POST
/grad against in-process autograd, and gradient ascent through RemoteReward raising a real matching score."""

from __future__ import annotations

import base64
import copy
import io
import json

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from rewardscope.models.clip import ClipBackbone
from rewardscope.models.detection.detector import letterbox_batch
from rewardscope.models.detection.torch_detector import TorchDetector, letterbox_tensor
from rewardscope.models.gradients import (
    ClipGradient,
    NotDifferentiableError,
    SoftMatchingGradient,
    gradient_reward,
    reward_gradients,
)
from serving import running_server
from tiny_clip import make_aesthetic_head, shared_tiny_clip

from rewardscope import Scorer


def pixels_of(image: Image.Image, size: tuple[int, int] | None = None, dtype=torch.float32) -> torch.Tensor:
    """PIL image -> [1, 3, H, W] in [0, 1]."""
    image = image.resize(size, Image.BILINEAR) if size else image
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].to(dtype) / 255


def directional_check(function, pixels: torch.Tensor, seed: int = 0, directions: int = 3, eps: float = 1e-6):
    """(finite-difference, autograd) directional derivatives of a scalar function along random directions."""
    leaf = pixels.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(function(leaf), leaf)
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(directions):
        direction = torch.randn(pixels.shape, generator=generator, dtype=pixels.dtype)
        with torch.no_grad():
            difference = (function(pixels + eps * direction) - function(pixels - eps * direction)) / (2 * eps)
        pairs.append((float(difference), float((grad * direction).sum())))
    return pairs


@pytest.fixture(scope="module")
def torch_detector() -> TorchDetector:
    return TorchDetector.embedded()


@pytest.fixture(scope="module")
def detector64(torch_detector) -> TorchDetector:
    """The same network in float64, so finite differences are not swamped by float32 rounding."""
    network = copy.deepcopy(torch_detector.network).double()
    return TorchDetector(network, torch_detector.class_names, torch_detector.input_size, "f64", "test")


# -- The torch twin of the detector ---------------------------------------------------------------------------
def test_the_torch_twin_is_the_onnx_detector(torch_detector, detector, bus, zidane):
    assert torch_detector.class_names == detector.class_names
    assert torch_detector.version == detector.version and torch_detector.input_size == detector.input_size
    torch_candidates, onnx_candidates = torch_detector([bus, zidane]), detector([bus, zidane])
    assert torch_candidates.shape == onnx_candidates.shape
    torch.testing.assert_close(torch_candidates, onnx_candidates, atol=2e-3, rtol=1e-3)


def test_the_differentiable_letterbox_follows_the_pil_letterbox(bus):
    tensor_batch, tensor_geometry = letterbox_tensor(pixels_of(bus), 416, 416)
    pil_batch, pil_geometry = letterbox_batch([bus], 416, 416)
    np.testing.assert_allclose(tensor_geometry.scale, pil_geometry.scale)
    np.testing.assert_array_equal(tensor_geometry.padding, pil_geometry.padding)
    difference = (tensor_batch - torch.from_numpy(pil_batch)).abs()
    assert float(difference.mean()) < 2e-3 and float(difference.max()) < 2e-2


def test_detect_on_pixels_finds_what_the_pil_path_finds(torch_detector, bus):
    from_pixels = torch_detector.detect(pixels_of(bus))
    from_pil = torch_detector([bus])
    scores_pixels, scores_pil = from_pixels[..., 4:].max(-1).values, from_pil[..., 4:].max(-1).values
    assert float((scores_pixels - scores_pil).abs().max()) < 0.05
    assert int((scores_pixels > 0.25).sum()) == int((scores_pil > 0.25).sum())


def test_an_ultralytics_yaml_model_with_safetensors_weights_runs_behind_the_same_interface(tmp_path, bus):
    from safetensors.torch import save_file
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    network = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(weights))
    names = ["person", "bus", "car"]
    loaded = TorchDetector.from_ultralytics("yolov8n.yaml", weights, names=names, imgsz=160)
    assert loaded.class_names == tuple(names) and loaded.version.startswith("tiny@")
    candidates = loaded([bus])
    assert candidates.shape[0] == 1 and candidates.shape[-1] == 4 + 3
    reference = network.eval()(torch.from_numpy(letterbox_batch([bus], 160, 160)[0]))[0]
    torch.testing.assert_close(candidates[0, :, 4:], reference[0, 4:].T, atol=1e-5, rtol=1e-5)
    pixels = pixels_of(bus, (120, 160)).requires_grad_(True)
    loaded.detect(pixels)[..., 4:].sum().backward()
    assert pixels.grad is not None and float(pixels.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="does not fit yolov8n.yaml with 2 classes"):
        TorchDetector.from_ultralytics("yolov8n.yaml", weights, names=names[:2], imgsz=160)


# -- Gradients against finite differences ----------------------------------------------------------------------
@pytest.mark.parametrize("prompt", ["four people", "a bus and two people"])
def test_soft_matching_gradient_matches_finite_differences(detector64, bus, prompt):
    reward = SoftMatchingGradient(detector64)
    pixels = pixels_of(bus, (96, 128), torch.float64)
    value = reward(pixels, [prompt]).values
    assert 0 < float(value) < 1
    for finite, analytic in directional_check(lambda p: reward(p, [prompt]).values.sum(), pixels):
        # Leaky-ReLU and max-pool kinks crossed by the perturbation cost about 1 % here; a wrong term costs more.
        assert analytic == pytest.approx(finite, rel=0.05, abs=1e-3)


@pytest.fixture(scope="module")
def tiny_clip_dir():
    return shared_tiny_clip()


@pytest.mark.parametrize("name", ["clip", "aesthetic"])
def test_clip_gradients_match_finite_differences(tiny_clip_dir, tmp_path, zidane, name):
    config = {"model": str(tiny_clip_dir)}
    if name == "aesthetic":
        config["head"] = str(make_aesthetic_head(tmp_path / "head.safetensors", 768))
    reward = Scorer([name], config={name: config}).rewards[name]
    backbone = ClipBackbone(str(tiny_clip_dir), None, "cpu", torch.float64)
    if name == "aesthetic":
        reward.head.double()
    differentiable = ClipGradient(name, backbone, reward)
    pixels = pixels_of(zidane, (48, 40), torch.float64)
    prompt = ["two men in suits"]
    for finite, analytic in directional_check(lambda p: differentiable(p, prompt).values.sum(), pixels, eps=1e-6):
        assert analytic == pytest.approx(finite, rel=1e-4, abs=1e-7)


def test_the_differentiable_clip_score_is_the_scored_clip_score(tiny_clip_dir, bus):
    reward = Scorer(["clip"], config={"clip": {"model": str(tiny_clip_dir)}}).rewards["clip"]
    differentiable = gradient_reward("clip", reward)
    pixels = pixels_of(bus)
    scored = reward.score([_sample(bus, "a bus")])[0].value
    # Scoring resizes with PIL's bicubic on uint8, the gradient path with torch's on floats: close, not equal.
    assert float(differentiable(pixels, ["a bus"]).values[0]) == pytest.approx(scored, abs=0.02)


def _sample(image: Image.Image, prompt: str):
    from rewardscope.models.types import Sample

    return Sample(image=image, prompt=prompt)


def test_gradients_of_failed_items_are_zero_and_the_rest_are_kept(torch_detector, bus):
    reward = SoftMatchingGradient(torch_detector)
    pixels = torch.cat([pixels_of(bus, (96, 128))] * 3)
    prompts = ["four people", "an abstract painting", "a bus"]
    result = reward_gradients({"matching": reward}, {"matching": 1.0}, pixels, prompts)
    assert result.errors == {1: ("no_countable_object", "matching: prompt names no object the detector knows")}
    assert torch.isnan(result.total[1]) and torch.isnan(result.rewards["matching"][1])
    assert float(result.grad[1].abs().max()) == 0
    alone = reward_gradients({"matching": reward}, {"matching": 1.0}, pixels[2:], prompts[2:])
    torch.testing.assert_close(result.total[2:], alone.total, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(result.grad[2:], alone.grad, atol=1e-5, rtol=1e-3)


def test_a_served_ultralytics_detector_needs_its_torch_twin_configured(yolov8n_onnx, tmp_path, bus):
    from rewardscope.models.detection.matching import MatchingReward
    from rewardscope.models.prompt import COCO_CLASSES
    from safetensors.torch import save_file
    from ultralytics.nn.tasks import DetectionModel

    reward = MatchingReward(detector=str(yolov8n_onnx))
    with pytest.raises(NotDifferentiableError, match="no torch twin configured"):
        gradient_reward("matching", reward)
    weights = tmp_path / "yolov8n-twin.safetensors"
    network = DetectionModel("yolov8n.yaml", nc=len(COCO_CLASSES), verbose=False)
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(weights))
    twin = {"config": "yolov8n.yaml", "weights": str(weights), "names": list(COCO_CLASSES), "imgsz": 320}
    differentiable = gradient_reward("matching", reward, twin)
    assert differentiable.detector.version.startswith("yolov8n-twin@")
    pixels = pixels_of(bus, (96, 128)).requires_grad_(True)
    differentiable(pixels, ["two people"]).values.sum().backward()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all()
    with pytest.raises(NotDifferentiableError, match="classes differ"):
        gradient_reward("matching", reward, {**twin, "names": [f"c{i}" for i in range(len(COCO_CLASSES))]})


def test_rewards_without_a_differentiable_form_are_refused():
    with pytest.raises(NotDifferentiableError, match="no differentiable form"):
        gradient_reward("vqa", object())


# -- POST /grad and RemoteReward over a real server --------------------------------------------------------------
def npy_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def served(tiny_clip_dir, tmp_path_factory):
    """matching and CLIP (differentiable) and VQA (not: its answer is generated text) served together."""
    from tiny_models import save_tiny_blip

    vqa = save_tiny_blip(tmp_path_factory.mktemp("grad-vqa") / "tiny-blip-vqa", "vqa", seed=1)
    config = {"clip": {"model": str(tiny_clip_dir)}, "vqa": {"model": str(vqa)}}
    env = {"REWARDSCOPE_REWARDS": "matching,clip,vqa", "REWARDSCOPE_CONFIG": json.dumps(config)}
    with running_server(env) as base_url:
        yield base_url


@pytest.mark.slow
def test_grad_equals_in_process_autograd_within_fp16(served, tiny_clip_dir, bus, zidane):
    images = [pixels_of(bus, (96, 128))[0], pixels_of(zidane, (120, 68))[0]]
    prompts = ["four people and a bus", "two people"]
    weights = {"matching": 1.0, "clip": 0.5}
    items = [
        {"array": npy_b64(image.numpy()), "prompt": prompt, "rewards": weights}
        for image, prompt in zip(images, prompts, strict=True)
    ]
    response = httpx.post(f"{served}/grad", json={"items": items}, timeout=120)
    assert response.status_code == 200, response.text
    answers = response.json()

    scorer = Scorer(["matching", "clip"], config={"clip": {"model": str(tiny_clip_dir)}})
    local = {name: gradient_reward(name, reward) for name, reward in scorer.rewards.items()}
    for image, prompt, answer in zip(images, prompts, answers, strict=True):
        expected = reward_gradients(local, weights, image[None], [prompt])
        assert answer["error"] is None and set(answer["rewards"]) == {"matching", "clip"}
        assert answer["total"] == pytest.approx(float(expected.total[0]), abs=1e-4)
        for name in weights:
            assert answer["rewards"][name] == pytest.approx(float(expected.rewards[name][0]), abs=1e-4)
        grad = np.load(io.BytesIO(base64.b64decode(answer["grad"]))).astype(np.float32) * answer["grad_scale"]
        assert grad.shape == tuple(image.shape) and np.load(io.BytesIO(base64.b64decode(answer["grad"]))).dtype == "<f2"
        local_grad = expected.grad[0].numpy()
        # fp16 carries 11 significant bits of grad / max|grad|: errors within ~1e-3 of the largest entry.
        np.testing.assert_allclose(grad, local_grad, atol=2e-3 * float(np.abs(local_grad).max()), rtol=0)


def header_bomb() -> str:
    """A .npy whose header declares a 3 x 100000 x 100000 float32 array (120 GB) followed by a few bytes."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "<f4", "fortran_order": False, "shape": (3, 100_000, 100_000)}
    )
    return base64.b64encode(buffer.getvalue() + b"\0" * 64).decode()


@pytest.mark.slow
def test_bad_grad_items_fail_alone(served, bus):
    good = pixels_of(bus, (96, 128))[0].numpy()
    nan = good.copy()
    nan[0, 0, 0] = np.nan
    cases = {
        "bad_array": {"array": npy_b64((good * 255).astype(np.uint8)), "prompt": "a bus"},
        "non_finite": {"array": npy_b64(nan), "prompt": "a bus"},
        "out_of_range": {"array": npy_b64(good * 2), "prompt": "a bus"},
        "too_many_pixels": {"array": npy_b64(np.zeros((3, 1100, 1000), np.float16)), "prompt": "a bus"},
        "header_bomb": {"array": header_bomb(), "prompt": "a bus"},
        "not_differentiable": {"array": npy_b64(good), "prompt": "a bus", "rewards": ["vqa"]},
        "unknown_reward": {"array": npy_b64(good), "prompt": "a bus", "rewards": ["nope"]},
    }
    clean = {"array": npy_b64(good.astype(np.float16)), "prompt": "a bus", "rewards": ["matching"]}
    items = [clean, *cases.values(), clean]
    response = httpx.post(f"{served}/grad", json={"items": items}, timeout=120)
    assert response.status_code == 200, response.text
    answers = response.json()
    codes = [a["error_code"] for a in answers[1:-1]]
    assert codes == [case if case != "header_bomb" else "too_many_pixels" for case in cases]
    assert all(a["total"] is None and a["grad"] is None and a["error"] for a in answers[1:-1])
    assert answers[0]["error"] is None and answers[0]["total"] == answers[-1]["total"] and answers[0]["total"] > 0


@pytest.mark.slow
def test_remote_reward_is_an_autograd_function(served, bus):
    from rewardscope_client import RewardClient
    from rewardscope_client.autograd import remote_reward

    pixels = torch.cat([pixels_of(bus, (96, 128)), pixels_of(bus, (96, 128)).flip(-1)]).requires_grad_(True)
    with RewardClient(served) as client:
        values = remote_reward(pixels, ["four people", "a bus"], client, rewards={"matching": 1.0})
        (-values.mean()).backward()
        batch = client.grad(pixels.detach(), ["four people", "a bus"], rewards={"matching": 1.0})
        assert values.shape == (2,) and values.requires_grad
        np.testing.assert_allclose(values.detach().numpy(), batch.total, rtol=1e-6)
        expected = -np.stack(batch.grads) / 2
        np.testing.assert_allclose(pixels.grad.numpy(), expected, atol=1e-7, rtol=1e-5)
        with pytest.raises(RuntimeError, match="1 of 1 items could not be scored: item 0: matching: prompt names"):
            remote_reward(pixels[:1], "an abstract painting", client, rewards={"matching": 1.0})


@pytest.mark.slow
def test_ten_remote_gradient_steps_raise_the_matching_score_of_a_failed_prompt(served, bus):
    """bus.jpg shows four people; "five people" fails the count. Ascent through the remote reward adds one:
    the differentiable score rises, and so does the service's own (non-differentiable) soft variant at 0.25."""
    from rewardscope_client import RewardClient
    from rewardscope_client.autograd import remote_reward

    prompt = "five people"
    pixels = pixels_of(bus, (270, 360))
    with RewardClient(served) as client:

        def soft_score(image: torch.Tensor) -> float:
            array = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            return client.match([array], [prompt], variant="soft")[0]["score"]

        before_soft = soft_score(pixels)
        history = []
        for _ in range(10):
            leaf = pixels.clone().requires_grad_(True)
            reward = remote_reward(leaf, prompt, client, rewards={"matching": 1.0})
            reward.sum().backward()
            history.append(float(reward.detach()))
            pixels = (pixels + leaf.grad.sign() / 255).clamp(0, 1)
        final = float(remote_reward(pixels, prompt, client, rewards={"matching": 1.0}))
        after_soft = soft_score(pixels)
    assert final > history[0] + 0.2, history
    assert after_soft > before_soft, (before_soft, after_soft)


class _BreaksOn:
    """The real differentiable matching reward, except that it raises on one prompt (a model failure)."""

    def __init__(self, reward, prompt: str) -> None:
        self.reward, self.prompt, self.version = reward, prompt, reward.version

    def __call__(self, pixels, prompts):
        if self.prompt in prompts:
            raise RuntimeError("the model broke")
        return self.reward(pixels, prompts)


def test_a_gradient_failure_fails_only_its_item(torch_detector, bus):
    from rewardscope.service.engine import RewardEngine
    from rewardscope.service.gradients import GradientEngine, GradItem
    from rewardscope.service.settings import ServiceSettings

    engine = GradientEngine(RewardEngine(ServiceSettings(golden_check=False)))
    engine._rewards[("matching", "train@1")] = _BreaksOn(SoftMatchingGradient(torch_detector), "explode")
    array = npy_b64(pixels_of(bus, (96, 128))[0].numpy())
    items = [GradItem(array=array, prompt=prompt) for prompt in ("four people", "explode", "a bus")]
    first, broken, last = engine.grad(items)
    assert broken.error_code == "grad_failed" and "the model broke" in broken.error and broken.total is None
    assert first.error is None and last.error is None and first.total > 0 and last.total > 0
    (alone,) = engine.grad(items[:1])
    assert first.total == pytest.approx(alone.total, abs=1e-6)
