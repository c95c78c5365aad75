"""Preference rewards on tiny random-init CLIP models loaded through the real loaders, scored on real photos.
Every value is checked against the formula computed independently with transformers, never against a constant."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import rewardscope.models.clip as clip_runtime
import torch
from PIL import Image
from rewardscope.models.clip import GENEVAL_COLORS, load_clip
from rewardscope.models.detection.matching import geneval_check
from rewardscope.models.hf import ModelNotFoundError
from rewardscope.models.preference import MissingExtraError, load_weights
from rewardscope.models.prompt import ObjectSpec, ParsedPrompt
from tiny_clip import make_aesthetic_head, make_tiny_clip, shared_tiny_clip
from transformers import AutoProcessor, CLIPModel

from rewardscope import Scorer, create_reward, list_rewards

PROMPTS = ["a bus on a street", "two men in suits", "an astronaut", "a cup of coffee"]


@pytest.fixture(scope="module")
def clip_dir():
    return shared_tiny_clip()


@pytest.fixture(scope="module")
def photos(bus, zidane):
    import skimage.data

    return [bus, zidane, Image.fromarray(skimage.data.astronaut()), Image.fromarray(skimage.data.coffee())]


@pytest.fixture(scope="module")
def reference(clip_dir):
    """The same checkpoint loaded straight through transformers: the independent side of every comparison."""
    return CLIPModel.from_pretrained(clip_dir).eval(), AutoProcessor.from_pretrained(clip_dir)


def reference_embeddings(reference, images, texts):
    model, processor = reference
    with torch.no_grad():
        image = model.get_image_features(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
        tokens = processor(text=texts, return_tensors="pt", padding=True)
        text = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    image = getattr(image, "pooler_output", image)
    text = getattr(text, "pooler_output", text)
    return image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def heads(clip_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("aesthetic")
    return make_aesthetic_head(root / "head.safetensors", 768), make_aesthetic_head(root / "head.pth", 768)


def test_preference_rewards_are_registered():
    assert {"clip", "aesthetic", "pickscore", "hpsv2", "imagereward", "feedback"} <= set(list_rewards())


def test_clip_is_2_5_times_the_clamped_cosine(clip_dir, photos, reference):
    results = Scorer(["clip"], config={"clip": {"model": str(clip_dir)}}).score(photos, PROMPTS)
    image, text = reference_embeddings(reference, photos, PROMPTS)
    cosines = (image * text).sum(-1).tolist()
    for result, cosine in zip(results, cosines, strict=True):
        assert result.error is None
        assert result.details["clip"]["cosine"] == pytest.approx(cosine, abs=1e-5)
        assert result.rewards["clip"] == pytest.approx(2.5 * max(cosine, 0.0), abs=1e-5)
        assert 0.0 <= result.rewards["clip"] <= 2.5


def test_pickscore_is_logit_scale_times_cosine(clip_dir, photos, reference):
    config = {"pickscore": {"model": str(clip_dir), "processor": str(clip_dir)}}
    results = Scorer(["pickscore"], config=config).score(photos, PROMPTS)
    image, text = reference_embeddings(reference, photos, PROMPTS)
    scale = reference[0].logit_scale.exp().item()
    for result, cosine in zip(results, (image * text).sum(-1).tolist(), strict=True):
        assert result.rewards["pickscore"] == pytest.approx(scale * cosine, abs=1e-4)


def test_aesthetic_is_the_laion_mlp_on_the_normalised_image_embedding(clip_dir, photos, reference, heads):
    safetensors_head, pth_head = heads
    scorer = Scorer(["aesthetic"], config={"aesthetic": {"model": str(clip_dir), "head": str(safetensors_head)}})
    values = [result.rewards["aesthetic"] for result in scorer.score(photos, PROMPTS)]
    laion = torch.nn.Sequential(
        torch.nn.Linear(768, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    ).eval()
    laion.load_state_dict({key.removeprefix("layers."): value for key, value in load_weights(pth_head).items()})
    image, _ = reference_embeddings(reference, photos, PROMPTS)
    with torch.no_grad():
        expected = laion(image).squeeze(-1).tolist()
    assert values == pytest.approx(expected, abs=1e-5)
    # The same weights as a torch file, loaded with weights_only=True, give the same ratings.
    from_pth = Scorer(["aesthetic"], config={"aesthetic": {"model": str(clip_dir), "head": str(pth_head)}})
    assert [r.rewards["aesthetic"] for r in from_pth.score(photos, PROMPTS)] == pytest.approx(values, abs=1e-6)
    assert from_pth.versions()["aesthetic"] != scorer.versions()["aesthetic"]  # the head file is in the version


_UNPICKLED = []


def _record_unpickling() -> None:
    _UNPICKLED.append(True)


class _Payload:
    def __reduce__(self):
        return (_record_unpickling, ())


def test_a_pth_holding_pickled_objects_is_refused_without_running_them(clip_dir, tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"layers.0.weight": torch.zeros(1024, 768), "payload": _Payload()}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        create_reward("aesthetic", model=str(clip_dir), head=str(path))
    assert _UNPICKLED == []


def test_aesthetic_needs_its_head(clip_dir):
    with pytest.raises(ValueError, match="needs `head`"):
        create_reward("aesthetic", model=str(clip_dir))


def test_rewards_on_one_backbone_load_it_once_and_embed_each_image_once(clip_dir, photos, heads):
    config = {
        "clip": {"model": str(clip_dir)},
        "pickscore": {"model": str(clip_dir), "processor": str(clip_dir)},
        "aesthetic": {"model": str(clip_dir), "head": str(heads[0])},
    }
    scorer = Scorer(["clip", "pickscore", "aesthetic"], config=config)
    backbones = {id(reward.backbone) for reward in scorer.rewards.values()}
    assert len(backbones) == 1
    backbone = load_clip(str(clip_dir))
    before = backbone.image_forwards
    results = scorer.score(photos, PROMPTS)
    assert backbone.image_forwards - before == len(photos)  # three rewards, one forward per image
    scorer.score(photos, PROMPTS)  # a new call embeds again: the cache lives for the call's samples
    assert backbone.image_forwards - before == 2 * len(photos)
    assert all(result.error is None for result in results)


def test_describe_states_range_direction_scale_and_precision(clip_dir, heads):
    config = {
        "clip": {"model": str(clip_dir)},
        "pickscore": {"model": str(clip_dir), "processor": str(clip_dir)},
        "aesthetic": {"model": str(clip_dir), "head": str(heads[0])},
    }
    described = Scorer(["clip", "pickscore", "aesthetic"], config=config).describe()
    assert described["clip"]["range"] == [0.0, 2.5]
    scale = described["pickscore"]["params"]["logit_scale"]
    assert described["pickscore"]["range"] == [-scale, scale]
    for entry in described.values():
        assert entry["direction"] == "higher is better"
        assert entry["precision"] == "float32"  # CPU; fp16 is the CUDA default
        assert entry["scale"] and entry["version"].startswith(clip_dir.name)


@pytest.mark.parametrize(
    "model, message",
    [("/no/such/clip", "does not exist"), ("nobody/not-a-cached-model", "local Hugging Face cache")],
    ids=["missing-dir", "uncached-hub-id"],
)
def test_a_missing_model_fails_at_construction(model, message):
    with pytest.raises(ModelNotFoundError, match=message):
        create_reward("clip", model=model)


@pytest.mark.parametrize(
    "reward, module, extra", [("hpsv2", "hpsv2", "hpsv2"), ("imagereward", "ImageReward", "imagereward")]
)
def test_optional_package_rewards_name_the_extra_to_install(monkeypatch, reward, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed, whatever this environment has
    with pytest.raises(MissingExtraError, match=rf"pip install 'rewardscope\[{extra}\]'"):
        create_reward(reward)


def test_backbone_cache_keys_on_model_processor_device_and_dtype(clip_dir, tmp_path):
    other = make_tiny_clip(tmp_path / "other", seed=1)
    assert load_clip(str(clip_dir)) is load_clip(str(clip_dir), processor=str(clip_dir), device="cpu")
    assert load_clip(str(other)) is not load_clip(str(clip_dir))
    assert load_clip(str(clip_dir), dtype="bfloat16") is not load_clip(str(clip_dir))
    assert len({key[0] for key in clip_runtime._BACKBONES}) >= 2


# ---------------------------------------------------------------------------------------------------------
# GenEval colour attributes


def _box(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([x0, y0, x1, y1], dtype=float)


@pytest.mark.parametrize(
    "objects, colors, passed",
    [
        ((ObjectSpec("car", 1, "red"),), {0: ["red"]}, True),
        ((ObjectSpec("car", 1, "red"),), {0: ["blue"]}, False),
        ((ObjectSpec("car", 2, "red"),), {0: ["red", "red"]}, True),
        ((ObjectSpec("car", 2, "red"),), {0: ["red", "green"]}, False),
        ((ObjectSpec("car", 3, "red"),), {}, False),  # count not met: colours are not even looked at
    ],
    ids=["one-red", "one-blue", "two-red", "one-of-two-green", "count-short"],
)
def test_geneval_colour_rule_needs_every_top_n_box_in_the_colour(objects, colors, passed):
    detections = {"car": [_box(0, 0, 10, 10), _box(20, 0, 30, 10)]}
    verdict, reasons = geneval_check(ParsedPrompt("", objects, ()), detections, colors)
    assert verdict is passed
    assert bool(reasons) is (not passed)


def test_geneval_colour_without_a_colour_model_stays_unavailable(bus):
    result = Scorer(["geneval"]).score([bus], ["a photo of a red bus"])[0]
    assert result.rewards["geneval"] is None
    assert result.error_code == "colour_unavailable"


def test_geneval_colour_with_clip_classifies_each_top_box_crop(bus, clip_dir, reference):
    scorer = Scorer(["geneval"], config={"geneval": {"color_model": str(clip_dir)}})
    result, gray = scorer.score([bus, bus], ["a photo of a blue bus", "a photo of a gray bus"])
    assert gray.error_code == "colour_unavailable"  # not one of GenEval's ten colours
    assert result.error is None and result.rewards["geneval"] in (0.0, 1.0)
    bus_object = result.details["geneval"]["objects"][0]
    predicted = bus_object["predicted_colors"]
    boxes = [d["box"] for d in result.details["geneval"]["detections"] if d["class"] == "bus"][: len(predicted)]
    assert len(predicted) == bus_object["requested"] == 1
    # Independent zero-shot: GenEval's three templates averaged per colour, argmax over the box crop.
    model, processor = reference
    templates = ["a photo of a {} bus", "a photo of a {}-colored bus", "a photo of a {} object"]
    texts = [t.format(color) for color in GENEVAL_COLORS for t in templates]
    crop = bus.crop(tuple(int(v) if i < 2 else int(round(v)) for i, v in enumerate(boxes[0])))
    image, text = reference_embeddings(reference, [crop], texts)
    per_color = torch.nn.functional.normalize(text.view(len(GENEVAL_COLORS), 3, -1).mean(1), dim=-1)
    assert predicted == [GENEVAL_COLORS[int((per_color @ image[0]).argmax())]]
    assert result.rewards["geneval"] == float(predicted == ["blue"])
    assert "+colors:" in scorer.versions()["geneval"]
