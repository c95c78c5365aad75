"""vlm_judge: the rating read-out on given logits (hand-computed), and the reward on real photos with tiny random-init
models of four families (Qwen2-VL, Qwen2.5-VL, Idefics3 / SmolVLM, LLaVA) saved to directories and loaded through
the real loader."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from rewardscope.models.hf import ModelNotFoundError
from rewardscope.models.profiles import Profile
from rewardscope.models.registry import declaration
from rewardscope.models.types import Sample
from rewardscope.models.vlm_judge import (
    ASPECTS,
    DEFAULT_VLM_JUDGE_MODEL,
    PROMPTS,
    bounded_image,
    expected_rating,
    normalised_rating,
    scale_mass,
)
from tiny_vlm import FAMILIES, save_tiny_llava

from rewardscope import Scorer, create_reward

INF = math.inf
# The space a number follows as a token of its own after "Assistant:" (SmolLM2's byte-level "Ġ") and "ASSISTANT:"
# (Llama's sentencepiece "▁"); Qwen's generation prompt ends in a newline, after which the digit comes at once.
ANSWER_LEADS = {"qwen2_vl": "", "qwen2_5_vl": "", "idefics3": " ", "llava": " "}
PROMPT = "a bus on a street"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-vlm")
    return {
        family: str(save(root / f"tiny-{family}", seed=index)) for index, (family, save) in enumerate(FAMILIES.items())
    }


@pytest.fixture(scope="module")
def cat() -> Image.Image:
    return Image.fromarray(skimage.data.chelsea()).convert("RGB")


@pytest.fixture(scope="module")
def thin() -> Image.Image:
    """A 20 x 200 gradient: Qwen gives it another token count and Idefics3 another tile count than the photos."""
    column = np.linspace(0, 255, 200, dtype=np.uint8)[:, None, None]
    return Image.fromarray(np.broadcast_to(column, (200, 20, 3)).copy())


def judge(models, family: str, **options) -> Scorer:
    return Scorer(["vlm_judge"], config={"vlm_judge": {"model": models[family], **options}})


# --- the read-out, on given logits ------------------------------------------------------------------------------


READOUT_CASES = [
    # name, logits [N, V], scale token ids [K], scale values [K], expected ratings [N], probabilities [N, K]
    # equal logits: p = 1/5 each; E = (1 + 2 + 3 + 4 + 5) / 5 = 3
    ("uniform", [[0.0] * 5], [0, 1, 2, 3, 4], [1, 2, 3, 4, 5], [3.0], [[0.2] * 5]),
    # logits ln 1, ln 3: p = 1/4, 3/4; E = 1/4 * 1 + 3/4 * 2 = 1.75
    ("two levels", [[0.0, math.log(3)]], [0, 1], [1, 2], [1.75], [[0.25, 0.75]]),
    # exp(logit) 1, 2, 1 over 1, 2, 3: p = 1/4, 1/2, 1/4; E = 1/4 + 1 + 3/4 = 2
    ("symmetric", [[0.0, math.log(2), 0.0]], [0, 1, 2], [1, 2, 3], [2.0], [[0.25, 0.5, 0.25]]),
    # a tie at the top (2, 2) above 0: p = e^2 / (2 e^2 + 1) each, 1 / (2 e^2 + 1) for the 0
    (
        "tie",
        [[2.0, 2.0, 0.0]],
        [0, 1, 2],
        [1, 2, 3],
        [(1 * math.e**2 + 2 * math.e**2 + 3) / (2 * math.e**2 + 1)],
        [[math.e**2 / (2 * math.e**2 + 1)] * 2 + [1 / (2 * math.e**2 + 1)]],
    ),
    # -inf gets probability 0: the other two split evenly; E = (2 + 3) / 2
    ("-inf", [[-INF, 0.0, 0.0]], [0, 1, 2], [1, 2, 3], [2.5], [[0.0, 0.5, 0.5]]),
    # huge logits do not overflow (softmax subtracts the maximum): 1000, 1000 -> 1/2 each
    ("huge", [[1000.0, 1000.0]], [0, 1], [1, 5], [3.0], [[0.5, 0.5]]),
    # ids in any order: token 3 is rating 1 (exp 1), token 0 is rating 2 (exp 3): p = 1/4, 3/4; E = 1.75
    ("ids out of order", [[math.log(3), 9.0, 9.0, 0.0]], [3, 0], [1, 2], [1.75], [[0.25, 0.75]]),
    # rows are independent: row 0 all on rating 5 (the others -inf), row 1 all on rating 1
    ("rows", [[-INF, -INF, 0.0], [0.0, -INF, -INF]], [0, 1, 2], [1, 3, 5], [5.0, 1.0], [[0, 0, 1], [1, 0, 0]]),
]


@pytest.mark.parametrize(
    ("logits", "ids", "values", "expected", "probabilities"),
    [case[1:] for case in READOUT_CASES],
    ids=[case[0] for case in READOUT_CASES],
)
def test_expected_rating_matches_hand_computed_values(logits, ids, values, expected, probabilities):
    rating, probs = expected_rating(torch.tensor(logits), ids, values)
    assert rating.dtype == probs.dtype == torch.float64
    torch.testing.assert_close(rating, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(probs, torch.tensor(probabilities, dtype=torch.float64))


def test_rating_probabilities_ignore_the_rest_of_the_vocabulary_and_scale_mass_reports_it():
    # exp(logits) = 1, 1, 2, 4 over tokens 0-3; the scale is tokens 1 (rating 1) and 2 (rating 5).
    # Over the scale tokens only: p = 1/3, 2/3, E = 1/3 + 10/3 = 11/3, whatever token 3 holds.
    logits = torch.log(torch.tensor([[1.0, 1.0, 2.0, 4.0]]))
    rating, probs = expected_rating(logits, [1, 2], [1, 5])
    torch.testing.assert_close(rating, torch.tensor([11 / 3], dtype=torch.float64))
    torch.testing.assert_close(probs, torch.tensor([[1 / 3, 2 / 3]], dtype=torch.float64))
    # In the full softmax the scale tokens hold (1 + 2) / (1 + 1 + 2 + 4) = 3/8.
    torch.testing.assert_close(scale_mass(logits, [1, 2]), torch.tensor([3 / 8], dtype=torch.float64))
    # Raising a token outside the scale moves the mass, never the rating.
    logits[0, 3] = 50.0
    torch.testing.assert_close(expected_rating(logits, [1, 2], [1, 5])[0], rating)
    assert scale_mass(logits, [1, 2]).item() < 1e-20


@pytest.mark.parametrize("row", [[-INF, -INF, 3.0], [math.nan, 0.0, 3.0]], ids=["all -inf", "nan"])
def test_a_row_without_finite_rating_logits_has_no_rating(row):
    rating, _ = expected_rating(torch.tensor([row]), [0, 1], [1, 5])
    assert torch.isnan(rating).all()


@pytest.mark.parametrize(
    ("expected", "low", "high", "score"),
    [([1.0, 3.0, 5.0], 1, 5, [0.0, 0.5, 1.0]), ([0.0, 2.25, 9.0], 0, 9, [0.0, 0.25, 1.0]), ([1.75], 1, 2, [0.75])],
)
def test_normalised_rating_maps_the_scale_onto_the_unit_interval(expected, low, high, score):
    result = normalised_rating(torch.tensor(expected, dtype=torch.float64), low, high)
    torch.testing.assert_close(result, torch.tensor(score, dtype=torch.float64))


@pytest.mark.parametrize(
    ("size", "max_pixels", "expected"),
    [((640, 480), None, (640, 480)), ((640, 480), 640 * 480, (640, 480)), ((640, 480), 160 * 120, (160, 120))],
)
def test_max_image_pixels_scales_the_image_down_keeping_its_aspect_ratio(size, max_pixels, expected):
    assert bounded_image(Image.new("RGB", size), max_pixels).size == expected


# --- declaration and options ------------------------------------------------------------------------------------


def test_the_reward_declares_its_range_read_out_profile_keys_and_model():
    declared = declaration("vlm_judge")
    assert declared.range == (0.0, 1.0) and declared.direction == "higher is better"
    assert "softmax over the rating tokens" in declared.scale and "expected rating" in declared.scale
    assert declared.profile_keys == ("aspects", "prompt_version")
    assert dict(declared.model_options) == {"model": DEFAULT_VLM_JUDGE_MODEL}


def test_a_profile_gives_its_aspects_and_its_vlm_judge_section():
    profile = Profile("p", 1, "", "", {"aspects": ["style"], "conf_threshold": 0.3, "vlm_judge": {"scale": [0, 9]}})
    assert profile.for_reward("vlm_judge") == {"aspects": ["style"], "scale": [0, 9]}


def test_every_prompt_version_states_every_aspect_on_the_scale():
    for version, prompts in PROMPTS.items():
        assert set(prompts) == set(ASPECTS), version
        for aspect, text in prompts.items():
            rendered = text.format(low=1, high=5, prompt="a red bus")
            assert "from 1" in rendered and "to 5" in rendered and "single number" in rendered, aspect
        assert "a red bus" in prompts["faithfulness"].format(low=1, high=5, prompt="a red bus")


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"aspects": ["style", "colour"]}, "aspects must be"),
        ({"aspects": []}, "aspects must be"),
        ({"weights": {"faithfulness": 1.0}, "aspects": ["style"]}, "not scored"),
        ({"weights": {"style": -1.0}}, "weights must be"),
        ({"weights": {aspect: 0.0 for aspect in ASPECTS}}, "weights must be"),
        ({"scale": [5, 1]}, "scale must be"),
        ({"scale": [1.0, 5.0]}, "scale must be"),
        ({"prompt_version": "v0"}, "prompt_version must be"),
        ({"max_image_pixels": 0}, "max_image_pixels"),
        ({"dtype": "float8"}, "dtype must be"),
    ],
)
def test_bad_options_fail_when_the_reward_is_built(models, option, message):
    with pytest.raises(ValueError, match=message):
        create_reward("vlm_judge", model=models["llava"], **option)


@pytest.mark.parametrize("family", ["idefics3", "llava"])
def test_a_rating_of_two_tokens_fails_at_load(models, family):
    # "10" is "1" + "0" in digit-splitting tokenizers: its probability cannot be read from one next token.
    with pytest.raises(ValueError, match=r"rating 10 is 2 tokens"):
        create_reward("vlm_judge", model=models[family], scale=[1, 10])


def test_a_tokenizer_without_digit_tokens_fails_at_load(tmp_path):
    directory = save_tiny_llava(tmp_path / "no-digits", digits=False)
    with pytest.raises(ValueError, match="unknown to"):
        create_reward("vlm_judge", model=str(directory))


def test_a_model_saved_without_its_chat_template_fails_at_load(models, tmp_path):
    directory = tmp_path / "no-template"
    shutil.copytree(models["llava"], directory)
    (directory / "chat_template.jinja").unlink()
    with pytest.raises(ModelNotFoundError, match="chat template"):
        create_reward("vlm_judge", model=str(directory))


def test_a_hub_id_outside_the_local_cache_fails_at_load_offline():
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        create_reward("vlm_judge", model="example-org/no-such-vlm")


# --- the reward on photos, per family ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_rates_photos_in_the_unit_interval_with_per_aspect_details(models, family, bus, zidane, cat):
    scorer = judge(models, family)
    results = scorer.score([bus, zidane, cat], [PROMPT, "two men", "a cat"])
    for result in results:
        assert result.error is None and 0.0 <= result.rewards["vlm_judge"] <= 1.0
        details = result.details["vlm_judge"]
        assert details["prompt_version"] == "v1" and details["rating_scale"] == [1, 5]
        assert details["version"] == scorer.rewards["vlm_judge"].version
        assert list(details["aspects"]) == list(ASPECTS)
        for entry in details["aspects"].values():
            assert list(entry["probabilities"]) == ["1", "2", "3", "4", "5"]
            assert sum(entry["probabilities"].values()) == pytest.approx(1.0)
            assert entry["expected_rating"] == pytest.approx(1 + 4 * entry["score"])
            assert 0.0 < entry["scale_mass"] < 1.0
        assert result.rewards["vlm_judge"] == pytest.approx(
            sum(entry["score"] for entry in details["aspects"].values()) / len(ASPECTS)
        )
    # Random weights, but not a constant: the images and aspects are told apart.
    assert len({result.rewards["vlm_judge"] for result in results}) == 3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_rating_is_the_read_out_of_the_models_own_next_token_logits(models, family, bus):
    """Run the saved model through its processor here, by hand, and read the rating from its logits."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    reward = create_reward("vlm_judge", model=models[family])
    assert reward.scale_tokens.answer_lead == ANSWER_LEADS[family]
    processor = AutoProcessor.from_pretrained(models[family])
    model = AutoModelForImageTextToText.from_pretrained(models[family]).eval()
    digit_ids = processor.tokenizer.convert_tokens_to_ids(["1", "2", "3", "4", "5"])
    assert list(reward.scale_tokens.token_ids) == digit_ids
    details = reward.score([Sample(bus, PROMPT)])[0].details["aspects"]
    for aspect in ASPECTS:
        text = PROMPTS["v1"][aspect].format(low=1, high=5, prompt=PROMPT)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        chat = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=[[bus]], text=[chat + ANSWER_LEADS[family]], return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1].double()
        probabilities = torch.softmax(logits[digit_ids], dim=0)
        rating = float((probabilities * torch.arange(1, 6, dtype=torch.float64)).sum())
        mass = float(torch.softmax(logits, dim=0)[digit_ids].sum())
        assert details[aspect]["expected_rating"] == pytest.approx(rating, abs=1e-5)
        assert details[aspect]["score"] == pytest.approx((rating - 1) / 4, abs=1e-5)
        assert list(details[aspect]["probabilities"].values()) == pytest.approx(probabilities.tolist(), abs=1e-5)
        assert details[aspect]["scale_mass"] == pytest.approx(mass, rel=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_batched_scores_equal_single_item_scores_and_repeat_exactly(models, family, bus, zidane, cat, thin):
    # batch_size 3: 4 images x 4 aspects run as 16 left-padded rows in 6 forwards that mix images and aspects.
    scorer = judge(models, family, batch_size=3)
    images, prompts = [bus, thin, zidane, cat], [PROMPT, "a gray wall", "two men", "a cat"]
    batched = scorer.score(images, prompts)
    for image, prompt, together in zip(images, prompts, batched, strict=True):
        alone = scorer.score([image], [prompt])[0]
        assert alone.rewards["vlm_judge"] == pytest.approx(together.rewards["vlm_judge"], abs=1e-5)
        for aspect, entry in alone.details["vlm_judge"]["aspects"].items():
            assert entry["expected_rating"] == pytest.approx(
                together.details["vlm_judge"]["aspects"][aspect]["expected_rating"], abs=1e-5
            )
    again = scorer.score(images, prompts)
    assert [result.rewards for result in again] == [result.rewards for result in batched]


def test_chosen_aspects_and_weights_give_the_weighted_mean_of_their_scores(models, bus):
    weights = {"aesthetics": 3.0, "faithfulness": 1.0}
    result = judge(models, "idefics3", aspects=["aesthetics", "faithfulness"], weights=weights).score([bus], [PROMPT])[
        0
    ]
    aspects = result.details["vlm_judge"]["aspects"]
    assert list(aspects) == ["aesthetics", "faithfulness"]
    expected = (3.0 * aspects["aesthetics"]["score"] + 1.0 * aspects["faithfulness"]["score"]) / 4.0
    assert result.rewards["vlm_judge"] == pytest.approx(expected)
    # The aspect scores do not depend on which other aspects are asked.
    full = judge(models, "idefics3").score([bus], [PROMPT])[0].details["vlm_judge"]["aspects"]
    assert aspects["aesthetics"]["score"] == pytest.approx(full["aesthetics"]["score"], abs=1e-5)


def test_a_wider_scale_reads_more_digits(models, bus):
    result = judge(models, "qwen2_vl", scale=[0, 9]).score([bus], [PROMPT])[0]
    entry = result.details["vlm_judge"]["aspects"]["style"]
    assert list(entry["probabilities"]) == [str(value) for value in range(10)]
    assert entry["score"] == pytest.approx(entry["expected_rating"] / 9)


def test_an_empty_prompt_fails_alone_only_when_faithfulness_is_judged(models, bus, cat):
    results = judge(models, "llava").score([bus, cat], ["  ", "a cat"])
    assert results[0].rewards["vlm_judge"] is None and results[0].error_code == "empty_prompt"
    assert results[1].error is None and results[1].rewards["vlm_judge"] is not None
    without = judge(models, "llava", aspects=["style", "aesthetics"]).score([bus], ["  "])[0]
    assert without.error is None and 0.0 <= without.rewards["vlm_judge"] <= 1.0


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])
def test_a_prompt_beyond_the_models_context_fails_alone(models, family, bus, cat):
    # The tiny models read 512 positions; 450 words cannot fit beside the image and the instructions.
    long_prompt = " ".join(["dog"] * 450)
    scorer = judge(models, family)
    results = scorer.score([bus, cat], [long_prompt, "a cat"])
    assert results[0].rewards["vlm_judge"] is None and results[0].error_code == "prompt_too_long"
    assert "512" in results[0].error
    alone = scorer.score([cat], ["a cat"])[0]
    assert results[1].rewards["vlm_judge"] == pytest.approx(alone.rewards["vlm_judge"], abs=1e-5)


def test_max_image_pixels_and_processor_options_reach_the_processor(models, bus):
    plain = judge(models, "idefics3").score([bus], [PROMPT])[0]
    bounded = judge(models, "idefics3", max_image_pixels=24 * 32).score([bus], [PROMPT])[0]
    unsplit = judge(models, "idefics3", processor_options={"do_image_splitting": False}).score([bus], [PROMPT])[0]
    values = {plain.rewards["vlm_judge"], bounded.rewards["vlm_judge"], unsplit.rewards["vlm_judge"]}
    assert None not in values and len(values) == 3


def test_describe_states_range_scale_prompts_and_version(models):
    scorer = judge(models, "idefics3")
    described = scorer.describe()["vlm_judge"]
    reward = scorer.rewards["vlm_judge"]
    assert described["range"] == [0.0, 1.0] and described["direction"] == "higher is better"
    assert "ratings 1-5" in described["scale"] and "softmax over the scale tokens" in described["scale"]
    assert described["version"] == reward.version == f"{reward.judge.source.version}+prompts:v1+scale:1-5"
    assert described["version"].startswith("tiny-idefics3@")
    params = described["params"]
    assert params["prompt_version"] == "v1" and params["rating_scale"] == [1, 5]
    assert params["prompts"] == dict(PROMPTS["v1"]) and params["answer_lead"] == " "
    assert described["models"]["judge"]["model"] == "tiny-idefics3" and described["precision"] == "fp32"


def test_the_service_settings_load_the_judge_from_the_environment(models, bus):
    from rewardscope.service.settings import ServiceSettings

    settings = ServiceSettings.from_env(
        {
            "REWARDSCOPE_REWARDS": "vlm_judge",
            "REWARDSCOPE_CONFIG": json.dumps({"vlm_judge": {"model": models["llava"], "aspects": ["style"]}}),
        }
    )
    config = settings.reward_config(settings.rewards, pin_models=True)
    assert config == {"vlm_judge": {"model": models["llava"], "aspects": ["style"]}}
    scorer = Scorer(settings.rewards, config=config, profile=settings.profile)
    result = scorer.score([bus], [PROMPT])[0]
    assert result.error is None and list(result.details["vlm_judge"]["aspects"]) == ["style"]
