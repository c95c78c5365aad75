"""Caption, VQA and plausibility rewards on real photos with tiny random-init models saved to directories
and loaded like real ones, plus the real MiniLM text encoder. Random weights give real outputs of real code,
so these tests pin structure and consistency: values recomputed independently, determinism, error paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from rewardscope.models.caption import load_text_embedder
from rewardscope.models.hf import ModelNotFoundError, choose_dtype, resolve_model, weights_hash
from rewardscope.models.types import Sample
from rewardscope.models.vqa import GenerativeQuestionAnswerer, generate_questions
from tiny_models import save_all, save_tiny_blip, save_tiny_blip2

from rewardscope import Scorer, create_reward, list_rewards


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return {name: str(path) for name, path in save_all(tmp_path_factory.mktemp("tiny-models")).items()}


@pytest.fixture(scope="module")
def config(tiny):
    return {
        "caption": {"captioner": tiny["captioner"], "max_new_tokens": 12},
        "vqa": {"model": tiny["vqa"]},
        "plausibility": {"language_model": tiny["language_model"]},
    }


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    return str(save_tiny_blip2(tmp_path_factory.mktemp("tiny-blip2") / "tiny-blip2"))


@pytest.fixture(scope="module")
def scorer(config):
    return Scorer(["caption", "vqa", "plausibility"], config=config)


@pytest.fixture(scope="module")
def embedder():
    return load_text_embedder(None, "cpu", "float32", 4096)


@pytest.fixture(scope="module")
def cat():
    import skimage.data

    return Image.fromarray(skimage.data.chelsea()).convert("RGB")


def cosine(embedder, a: str, b: str) -> float:
    first, second = embedder.embed([a]), embedder.embed([b])
    return float(first[0] @ second[0])


# -- loading --------------------------------------------------------------------------------------------------
def test_the_three_rewards_are_registered():
    assert {"caption", "vqa", "plausibility"} <= set(list_rewards())


def test_a_model_directory_is_versioned_by_its_name_and_weights(tiny, tmp_path):
    source = resolve_model(tiny["vqa"])
    assert source.version == f"tiny-blip-vqa@{weights_hash(tiny['vqa'])}"
    assert resolve_model(tiny["vqa"]).version == source.version
    other = save_tiny_blip(tmp_path / "tiny-blip-vqa", "vqa", seed=7)  # same name, other weights
    assert resolve_model(other).version.startswith("tiny-blip-vqa@")
    assert resolve_model(other).version != source.version


@pytest.mark.parametrize(
    ("reward", "key"),
    [("caption", "captioner"), ("caption", "text_encoder"), ("vqa", "model"), ("plausibility", "language_model")],
)
def test_a_missing_model_directory_fails_when_the_scorer_is_built(reward, key, tmp_path, config):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelNotFoundError, match="no-such-model.*does not exist"):
        Scorer([reward], config={reward: {**config[reward], key: missing}})


def test_a_hub_id_outside_the_local_cache_fails_at_start_up_offline():
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        create_reward("vqa", model="rewardscope-tests/no-such-model")


def test_a_directory_without_config_or_a_file_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        create_reward("vqa", model=str(tmp_path))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_model(weights)


@pytest.mark.parametrize(
    ("device", "dtype", "expected"),
    [("cpu", "auto", torch.float32), ("cuda", "auto", torch.float16), ("cpu", "bfloat16", torch.bfloat16)],
)
def test_half_precision_is_the_default_on_cuda_only(device, dtype, expected):
    assert choose_dtype(dtype, torch.device(device)) == expected


def test_an_unknown_dtype_is_refused_at_start_up(tiny):
    with pytest.raises(ValueError, match="dtype must be"):
        create_reward("vqa", model=tiny["vqa"], dtype="float8")


# -- caption --------------------------------------------------------------------------------------------------
def test_minilm_puts_a_paraphrase_closer_than_an_unrelated_sentence(embedder):
    anchor = "a dog running on grass"
    paraphrase = cosine(embedder, anchor, "a puppy playing on the lawn")
    unrelated = cosine(embedder, anchor, "a red sports car on a highway")
    assert paraphrase > unrelated + 0.2
    assert cosine(embedder, anchor, anchor) == pytest.approx(1.0, abs=1e-5)


def test_embeddings_are_unit_vectors_and_the_prompt_cache_is_bounded(tiny):
    small = load_text_embedder(None, "cpu", "float32", 2)
    texts = ["a cat", "two dogs", "a bus", "a cat"]
    cached = small.embed(texts, cache=True)
    assert cached.shape == (4, 384)
    assert torch.allclose(cached.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert len(small._cache) == 2
    assert torch.allclose(cached, small.embed(texts), atol=1e-5)


def test_caption_reward_is_the_cosine_of_its_caption_and_the_prompt(scorer, embedder, bus, zidane, cat):
    prompts = ["four people and a bus", "two men with ties", "a cat on a sofa"]
    results = scorer.score([bus, zidane, cat], prompts)
    for result, prompt in zip(results, prompts, strict=True):
        details = result.details["caption"]
        assert isinstance(details["caption"], str) and details["caption"]
        assert result.rewards["caption"] == details["similarity"]
        assert -1.0 <= details["similarity"] <= 1.0
        assert details["similarity"] == pytest.approx(cosine(embedder, details["caption"], prompt), abs=1e-5)
        assert details["version"].startswith("tiny-blip-caption@")
        assert details["models"]["text_encoder"].startswith("sentence-transformers/all-MiniLM-L6-v2@")


def test_rewards_are_deterministic_and_batch_independent(scorer, bus, zidane, cat):
    images, prompts = [bus, zidane, cat], ["a bus", "two people and a tie", "a cat in a kitchen"]
    first, again = scorer.score(images, prompts), scorer.score(images, prompts)
    alone = [scorer.score([image], [prompt])[0] for image, prompt in zip(images, prompts, strict=True)]
    for a, b, c in zip(first, again, alone, strict=True):
        assert a.rewards == b.rewards and a.details == b.details
        assert a.details["caption"]["caption"] == c.details["caption"]["caption"]
        for name in ("caption", "vqa", "plausibility"):
            assert a.rewards[name] == pytest.approx(c.rewards[name], abs=1e-5)


def test_an_empty_prompt_fails_alone_without_a_value(scorer, bus):
    results = scorer.score([bus, bus], ["", "a bus"])
    assert results[0].rewards == {"caption": None, "vqa": None, "plausibility": None}
    assert results[0].error_code == "empty_prompt" and results[0].total is None
    assert all(value is not None for value in results[1].rewards.values())


# -- vqa ------------------------------------------------------------------------------------------------------
def test_vqa_value_is_the_mean_yes_probability_of_its_questions(scorer, bus, zidane):
    prompts = ["four people and a bus", "two red ties to the left of a dog"]
    for result, prompt in zip(scorer.score([bus, zidane], prompts), prompts, strict=True):
        asked = result.details["vqa"]["questions"]
        assert [entry["question"] for entry in asked] == [q.text for q in generate_questions(prompt)]
        assert all(0.0 <= entry["p_yes"] <= 1.0 for entry in asked)
        assert result.rewards["vqa"] == pytest.approx(np.mean([entry["p_yes"] for entry in asked]), abs=1e-12)
        assert len({entry["p_yes"] for entry in asked}) > 1  # questions are answered one by one
        assert result.details["vqa"]["normalisation"] == "yes_no"


def test_a_prompt_without_objects_is_scored_on_the_whole_prompt_question(scorer, cat):
    (result,) = scorer.score([cat], ["an oil painting of a sunset"])
    asked = result.details["vqa"]["questions"]
    assert [(q["question"], q["kind"]) for q in asked] == [
        ("Does this image show an oil painting of a sunset?", "prompt")
    ]
    assert result.rewards["vqa"] == asked[0]["p_yes"]


def test_full_vocabulary_yes_mass_never_exceeds_the_yes_no_normalised_one(tiny, scorer, zidane):
    vocab = Scorer(["vqa"], config={"vqa": {"model": tiny["vqa"], "normalisation": "vocab"}})
    prompt = "two people and a tie"
    over_vocab = vocab.score([zidane], [prompt])[0].details["vqa"]["questions"]
    over_two = scorer.score([zidane], [prompt])[0].details["vqa"]["questions"]
    for wide, narrow in zip(over_vocab, over_two, strict=True):
        assert 0.0 < wide["p_yes"] <= narrow["p_yes"]


def test_given_questions_replace_the_generated_ones_and_bad_ones_fail_alone(scorer, bus):
    given = {"questions": ["Is this a street?", "Is it night?"]}
    good, bad = scorer.score([bus, bus], ["a bus", "a bus"], [given, {"questions": "Is it?"}])
    assert [q["question"] for q in good.details["vqa"]["questions"]] == given["questions"]
    assert bad.rewards["vqa"] is None and bad.error_code == "bad_metadata"
    assert bad.rewards["caption"] is not None


def test_geneval_metadata_replaces_the_parsed_prompt(scorer):
    reward = scorer.rewards["vqa"]
    sample = Sample(Image.new("RGB", (8, 8)), "a picture", {"include": [{"class": "dog", "count": 2}]})
    assert [q.text for q in reward.questions(sample)] == [
        "Is there a dog?",
        "Are there two dogs?",
        "Does this image show a picture?",
    ]


# -- image-text-to-text models (BLIP-2): the generic captioning and answering paths ----------------------------
def test_blip2_answers_yes_no_questions_from_its_next_token(blip2, bus, zidane):
    vqa = Scorer(["vqa"], config={"vqa": {"model": blip2}})
    assert isinstance(vqa.rewards["vqa"].answerer, GenerativeQuestionAnswerer)
    prompts = ["four people and a bus", "two men with ties"]
    together = vqa.score([bus, zidane], prompts)
    alone = [vqa.score([image], [prompt])[0] for image, prompt in zip([bus, zidane], prompts, strict=True)]
    for result, single in zip(together, alone, strict=True):
        asked = result.details["vqa"]["questions"]
        assert all(0.0 <= entry["p_yes"] <= 1.0 for entry in asked)
        assert result.rewards["vqa"] == pytest.approx(np.mean([entry["p_yes"] for entry in asked]), abs=1e-12)
        assert result.rewards["vqa"] == pytest.approx(single.rewards["vqa"], abs=1e-5)  # right padding is inert


@pytest.mark.parametrize("prefix", [None, "a picture of"])
def test_blip2_captions_either_score_or_say_they_are_empty(blip2, embedder, bus, prefix):
    captioner = Scorer(["caption"], config={"caption": {"captioner": blip2, "max_new_tokens": 8, "prefix": prefix}})
    (result,) = captioner.score([bus], ["a bus on a street"])
    caption = result.details["caption"]["caption"]
    if caption:
        assert not caption.startswith("a picture of")  # neither the prompt tokens nor the prefix are echoed
        assert result.rewards["caption"] == pytest.approx(cosine(embedder, caption, "a bus on a street"), abs=1e-5)
    else:
        assert result.rewards["caption"] is None and result.error_code == "empty_caption"


# -- plausibility ---------------------------------------------------------------------------------------------
def test_labels_the_prompt_names_are_plausible_without_asking(scorer, bus):
    (result,) = scorer.score([bus], ["four people and a bus"])
    labels = result.details["plausibility"]["labels"]
    assert {entry["label"] for entry in labels} == {"person", "bus"}
    assert all(entry["likelihood"] == 1.0 and entry["source"] == "prompt" for entry in labels)
    assert result.rewards["plausibility"] == pytest.approx(1.0)


def test_plausibility_is_the_area_weighted_mean_over_the_detected_labels(scorer, bus):
    matching = Scorer(["matching"])
    (result,) = scorer.score([bus], ["a cat in a kitchen"])
    (detected,) = matching.score([bus], ["a cat in a kitchen"])
    labels = result.details["plausibility"]["labels"]
    assert {entry["label"] for entry in labels} == {d["class"] for d in detected.details["matching"]["detections"]}
    assert all(entry["source"] == "model" and 0.0 <= entry["likelihood"] <= 1.0 for entry in labels)
    assert sum(entry["weight"] for entry in labels) == pytest.approx(1.0)
    expected = sum(e["area"] * e["likelihood"] for e in labels) / sum(e["area"] for e in labels)
    assert result.rewards["plausibility"] == pytest.approx(expected, abs=1e-12)


def test_a_label_likelihood_is_the_language_models_yes_against_no(scorer, tiny, bus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reward = scorer.rewards["plausibility"]
    (result,) = scorer.score([bus], ["a cat in a kitchen"])
    entry = result.details["plausibility"]["labels"][0]
    tokenizer = AutoTokenizer.from_pretrained(tiny["language_model"])
    model = AutoModelForCausalLM.from_pretrained(tiny["language_model"]).eval()
    question = f"Question: Would a {entry['label']} appear in a picture of: a cat in a kitchen? Answer:"
    assert reward.question(entry["label"], "a cat in a kitchen") == question
    with torch.no_grad():
        logits = model(**tokenizer(question, return_tensors="pt")).logits[0, -1].double()
    yes, no = tokenizer.convert_tokens_to_ids(["yes", "no"])
    assert entry["likelihood"] == pytest.approx(float(torch.softmax(logits[[yes, no]], dim=0)[0]), abs=1e-5)


def test_an_image_with_no_detected_region_has_no_plausibility(scorer, bus):
    blank = Image.new("RGB", (320, 240), (128, 128, 128))
    empty, scored = scorer.score([blank, bus], ["a cat", "a cat"])
    assert empty.rewards["plausibility"] is None
    assert empty.details["plausibility"]["labels"] == []
    assert "plausibility: no region" in empty.error and empty.total is None
    assert empty.rewards["vqa"] is not None  # the other rewards still score the image
    assert scored.rewards["plausibility"] is not None


# -- description ----------------------------------------------------------------------------------------------
def test_describe_names_models_versions_params_range_and_direction(scorer):
    described = scorer.describe()
    for name, low, high in (("caption", -1.0, 1.0), ("vqa", 0.0, 1.0), ("plausibility", 0.0, 1.0)):
        entry = described[name]
        assert entry["name"] == name and entry["version"] == scorer.rewards[name].version
        assert entry["range"] == [low, high] and entry["direction"] == "higher is better"
        assert entry["models"] and entry["params"] and entry["scale"] and entry["precision"]
    assert described["vqa"]["models"]["answerer"]["model"] == "tiny-blip-vqa"
    assert described["plausibility"]["version"].endswith(scorer.rewards["plausibility"].detector.version)
