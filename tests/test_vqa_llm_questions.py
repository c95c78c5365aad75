"""LLM-written VQA questions (vqa questions="llm"): the line format's parser and validator on given strings, then the
real generation path with causal LMs saved with save_pretrained and loaded through the reward: a random-init one
(gibberish, so every item falls back to template questions) and one trained here to write the format."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from rewardscope.models.hf import yes_probability
from rewardscope.models.questions import (
    MAX_QUESTION_WORDS,
    QUESTION_PROMPTS,
    DroppedLine,
    WrittenQuestion,
    parse_questions,
    select_questions,
    validate,
)
from rewardscope.models.types import Sample
from rewardscope.models.vqa import VqaReward
from tiny_models import save_model, save_tiny_blip, save_tiny_causal_lm, vocabulary, word_tokenizer


# -- the line format, on given strings ------------------------------------------------------------------------
def test_lines_in_the_format_are_read_whatever_their_spacing_and_case():
    text = (
        "Q: Are there two apples? | A: yes | type: counting\n"
        "q : is the dog red ? | a : YES | type : Color\n"  # how a word-level tokenizer decodes
        "Q: Is there a dog? | A: yes\n"  # no type: "other"
        "Q: Are there peaches? | A: no | type: food\n"
        "not a question line\n"
    )
    assert parse_questions(text) == [
        ("Are there two apples?", "yes", "counting"),
        ("Is the dog red?", "yes", "color"),
        ("Is there a dog?", "yes", "other"),
        ("Are there peaches?", "no", "food"),
    ]


@pytest.mark.parametrize(
    "ending",
    ["\n\nDescription: a cat\nQ: Is there a cat? | A: yes | type: animal", "\nDescription: a cat\nQ: Is there a cat?"],
    ids=["blank line", "next description"],
)
def test_reading_stops_where_the_example_ends(ending):
    assert parse_questions("Q: Is there a dog? | A: yes | type: animal" + ending) == [
        ("Is there a dog?", "yes", "animal")
    ]


VALIDATE_CASES = [
    ("Is there a dog?", "a dog on a bench", None),
    ("Are there two dogs?", "two dogs", None),
    ("Is the dog brown?", "a brown dog", None),
    ("Is there a person?", "a man on a bench", None),  # the parser's classes: a man is a person
    ("Is the puppy asleep?", "two dogs", None),  # and a puppy a dog
    ("Are there peaches?", "a bowl with no peaches", None),  # what the prompt says is absent is its content too
    ("Is this on a beach?", "a woman riding a horse on a beach", None),
    ("Does the woman hold an umbrella?", "a woman with an umbrella", None),
    ("Is there a dog", "a dog", "not_a_question"),
    ("What colour is the dog?", "a brown dog", "not_yes_no"),
    ("Dog?", "a dog", "not_yes_no"),
    ("Is dog?", "a dog", "too_short"),
    ("Is there a dog " + "and a dog " * MAX_QUESTION_WORDS + "?", "a dog", "too_long"),
    ("Is there a zebra?", "a dog on a bench", "off_topic"),
    ("Is there anything in this picture?", "a dog", "off_topic"),
    ("Is it on the left?", "a dog to the left of a cat", "off_topic"),  # positions alone say nothing of what
]


@pytest.mark.parametrize(("question", "prompt", "reason"), VALIDATE_CASES, ids=[case[0] for case in VALIDATE_CASES])
def test_a_question_is_kept_when_it_is_a_yes_no_question_about_the_prompt(question, prompt, reason):
    assert validate(question, prompt) == reason


def test_selection_keeps_valid_distinct_questions_and_says_why_it_dropped_the_others():
    text = (
        "Q: Are there dogs? | A: yes | type: animal\n"
        "Q: What colour are the dogs? | A: yes | type: color\n"
        "Q: Is there a zebra? | A: yes | type: animal\n"
        "Q: are there dogs ? | A: yes | type: animal\n"
        "Q: Are there cats? | A: no | type: animal\n"
        "Q: Are the dogs on the bench? | A: maybe | type: spatial\n"
        "Q: Is the bench wooden? | A: yes | type: texture\n"
        "dogs dogs dogs\n"
        "Q: Is there a bench? | A: yes | type: object"
    )
    kept, dropped = select_questions(text, "two dogs on a wooden bench, no cats", max_questions=3)
    assert kept == [
        WrittenQuestion("Are there dogs?", "yes", "animal"),
        WrittenQuestion("Are there cats?", "no", "animal"),
        WrittenQuestion("Is the bench wooden?", "yes", "other"),  # an unknown type labels nothing
    ]
    assert [(line.line, line.reason) for line in dropped] == [
        ("Q: What colour are the dogs? | A: yes | type: color", "not_yes_no"),
        ("Q: Is there a zebra? | A: yes | type: animal", "off_topic"),
        ("Q: are there dogs ? | A: yes | type: animal", "duplicate"),
        ("Q: Are the dogs on the bench? | A: maybe | type: spatial", "answer_not_yes_no"),
        ("dogs dogs dogs", "malformed"),
        ("Q: Is there a bench? | A: yes | type: object", "over_limit"),
    ]
    assert all(isinstance(line, DroppedLine) for line in dropped)


def test_the_v1_prompt_shows_the_format_and_ends_on_the_first_question():
    prompt = QUESTION_PROMPTS["v1"].format(prompt="a red car")
    assert prompt.endswith("Description: a red car\nQ:")
    examples = prompt.split("\n\n")[1:-1]
    assert len(examples) == 3
    expected_answers = set()
    for example in examples:
        description, *lines = example.splitlines()
        kept, dropped = select_questions("\n".join(lines), description.removeprefix("Description: "), 8)
        assert dropped == [] and len(kept) == len(lines)  # every worked example passes our own validation
        expected_answers |= {question.expected for question in kept}
    assert expected_answers == {"yes", "no"}


# -- the reward's options ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"questions": "gpt"}, "questions must be one of template, llm"),
        ({"questions": "llm"}, "questions='llm' needs question_model"),
        ({"question_model": "some/model"}, "question_model is used only with questions='llm'"),
    ],
)
def test_question_options_are_checked_before_any_model_loads(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        VqaReward(model="rewardscope-tests/never-loaded", **options)


# -- real models ------------------------------------------------------------------------------------------------
PROMPTS = ("two people and a bus", "a man with a red tie")


def causal_lm_config(tokenizer, hidden: int, layers: int, positions: int = 512):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=positions,
        n_embd=hidden,
        n_layer=layers,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.3,
    )


@pytest.fixture(scope="module")
def vqa_model(tmp_path_factory):
    return str(save_tiny_blip(tmp_path_factory.mktemp("vqa") / "tiny-blip-vqa", "vqa", seed=1))


@pytest.fixture(scope="module")
def random_lm(tmp_path_factory):
    """tiny_models' random GPT-2 over its word tokenizer, with room for the v1 prompt (512 positions, not 128)."""
    from transformers import GPT2LMHeadModel

    tokenizer = word_tokenizer()
    directory = tmp_path_factory.mktemp("lm") / "tiny-gpt2-512"
    return str(save_model(directory, GPT2LMHeadModel, causal_lm_config(tokenizer, 32, 2), tokenizer, seed=2))


def counted(monkeypatch, writer) -> list[int]:
    """Wraps the writer's real model.generate to count its calls (batch sizes); its output is untouched."""
    calls: list[int] = []
    real = writer.model.generate

    def generate(*args, **kwargs):
        calls.append(len(kwargs["input_ids"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(writer.model, "generate", generate)
    return calls


def test_a_question_model_whose_context_cannot_hold_the_prompt_is_refused_at_start_up(vqa_model, tmp_path):
    short = save_tiny_causal_lm(tmp_path / "tiny-gpt2")  # 128 positions; the v1 prompt alone takes more
    with pytest.raises(ValueError, match="reads at most 128 tokens; the v1 question prompt takes"):
        VqaReward(model=vqa_model, questions="llm", question_model=str(short))


def test_gibberish_falls_back_to_the_template_questions_and_is_cached(vqa_model, random_lm, bus, zidane, monkeypatch):
    template = VqaReward(model=vqa_model)
    llm = VqaReward(
        model=vqa_model, questions="llm", question_model=random_lm, question_max_new_tokens=48, question_cache_size=16
    )
    calls = counted(monkeypatch, llm.writer)
    before = llm.writer.cache_stats()
    images = [bus, zidane, bus]
    prompts = [*PROMPTS, PROMPTS[0]]  # a repeated prompt is written once
    expected = template.score([Sample(image, prompt) for image, prompt in zip(images, prompts, strict=True)])
    first = llm.score([Sample(image, prompt) for image, prompt in zip(images, prompts, strict=True)])
    assert calls == [2]  # one batch of the two distinct prompts, through the real model
    for result, reference in zip(first, expected, strict=True):
        assert result.value == reference.value  # exactly the template reward
        details = result.details
        assert details["question_source"] == "template" and details["fallback"] == "no_valid_question"
        assert details["dropped"] == sum(details["dropped_reasons"].values())
        assert [q["question"] for q in details["questions"]] == [q["question"] for q in reference.details["questions"]]
        assert all(q["expected"] == "yes" and q["p_expected"] == q["p_yes"] for q in details["questions"])
    second = llm.score([Sample(zidane, PROMPTS[0]), Sample(bus, " a man  with a red tie ")])
    assert calls == [2]  # no generation: both prompts were cached (whitespace aside)
    stats = llm.writer.cache_stats()
    assert stats["misses"] - before["misses"] == 2 and stats["hits"] - before["hits"] == 2
    assert stats["generate_calls"] - before["generate_calls"] == 1
    assert second[0].details["fallback"] == "no_valid_question"


def test_a_prompt_too_long_for_the_context_falls_back_without_generating(vqa_model, random_lm, bus, monkeypatch):
    llm = VqaReward(model=vqa_model, questions="llm", question_model=random_lm, question_max_new_tokens=160)
    calls = counted(monkeypatch, llm.writer)
    long_prompt = "a dog next to a cat " * 6  # 36 tokens: v1 prompt (327) + them + 160 new tokens > 512 positions
    result = llm.score([Sample(bus, long_prompt)])[0]
    assert calls == [] and result.details["fallback"] == "prompt_too_long"
    assert result.value == VqaReward(model=vqa_model).score([Sample(bus, long_prompt)])[0].value


def test_a_generation_error_falls_back_for_that_batch_and_is_retried_later(vqa_model, random_lm, bus, monkeypatch):
    llm = VqaReward(
        model=vqa_model, questions="llm", question_model=random_lm, question_max_new_tokens=48, question_cache_size=8
    )
    prompt = "a cat on a red bed"

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")  # a fault injected into the call, not a made-up generation

    with monkeypatch.context() as patch:
        patch.setattr(llm.writer.model, "generate", out_of_memory)
        failed = llm.score([Sample(bus, prompt)])[0]
    assert failed.details["question_source"] == "template"
    assert failed.details["fallback"] == "generation_failed: RuntimeError: CUDA out of memory"
    calls = counted(monkeypatch, llm.writer)
    retried = llm.score([Sample(bus, prompt)])[0]
    assert calls == [1] and retried.details["fallback"] == "no_valid_question"  # the failure was not cached


def test_metadata_questions_win_over_written_ones(vqa_model, random_lm, bus, monkeypatch):
    llm = VqaReward(model=vqa_model, questions="llm", question_model=random_lm, question_max_new_tokens=48)
    calls = counted(monkeypatch, llm.writer)
    given = {"questions": ["Is there a bus?", "Is it raining?"]}
    result = llm.score([Sample(bus, "a bus in the rain", given)])[0]
    assert calls == []
    assert result.details["question_source"] == "given"
    assert [q["question"] for q in result.details["questions"]] == given["questions"]


def test_template_questions_keep_their_details_and_version(vqa_model, random_lm, bus):
    template = VqaReward(model=vqa_model)
    result = template.score([Sample(bus, PROMPTS[0])])[0]
    assert set(result.details) == {"questions", "normalisation", "model"}
    assert all(set(entry) == {"question", "kind", "subject", "p_yes"} for entry in result.details["questions"])
    assert template.version == template.answerer.source.version
    llm = VqaReward(model=vqa_model, questions="llm", question_model=random_lm, question_max_new_tokens=48)
    assert llm.version == f"{template.version}+questions:{llm.writer.source.version}/v1"
    described = llm.describe()
    assert described["models"]["question_model"]["model"] == "tiny-gpt2-512"
    writer = described["params"]["question_writer"]
    assert writer["prompt_version"] == "v1" and writer["decoding"] == "greedy"
    assert set(writer["cache"]) >= {"hits", "misses", "lookups", "hit_rate", "generate_calls"}
    assert "P(no) = 1 - P(yes)" in described["scale"]


# -- a causal LM trained here to write the format -------------------------------------------------------------
# Two prompts and what the model is taught to write after the v1 prompt's final "Q:". Each teaches one drop: an
# off-topic question (a zebra) and a duplicate.
TAUGHT = {
    "two dogs on a bench, no cats": (
        " Are there dogs? | A: yes | type: animal\n"
        "Q: Are there two dogs? | A: yes | type: counting\n"
        "Q: Is there a bench? | A: yes | type: object\n"
        "Q: Are the dogs on the bench? | A: yes | type: spatial\n"
        "Q: Are there cats? | A: no | type: animal\n"
        "Q: Is there a zebra? | A: yes | type: animal\n\n"
    ),
    "a red car": (
        " Is there a car? | A: yes | type: object\n"
        "Q: Is the car red? | A: yes | type: color\n"
        "Q: Is the car red? | A: yes | type: color\n\n"
    ),
}
TRAIN_STEPS, TRAIN_LOSS = 400, 0.01


def line_tokenizer():
    """Word-level, like tiny_models.word_tokenizer, over the words of the v1 prompt and the taught lines too, with
    the newline as a token of its own (the format is one question per line)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = r"\n|\w+|[^\w\s]"
    text = (QUESTION_PROMPTS["v1"] + " ".join(TAUGHT) + " ".join(TAUGHT.values())).lower()
    words = list(dict.fromkeys([*vocabulary(), "</s>", *sorted(set(re.findall(pieces, text)))]))
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(pieces), behavior="removed", invert=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>", bos_token="</s>"
    )


@pytest.fixture(scope="module")
def trained_lm(tmp_path_factory):
    """A 1-layer GPT-2 (hidden 32) trained on the two taught continuations of the v1 prompt until its mean token
    loss is under TRAIN_LOSS (about 150 AdamW steps, seconds on a CPU), saved with save_pretrained."""
    from transformers import GPT2LMHeadModel

    tokenizer = line_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(causal_lm_config(tokenizer, 32, 1)).train()
    rows = [
        (tokenizer(QUESTION_PROMPTS["v1"].format(prompt=prompt))["input_ids"], tokenizer(taught)["input_ids"])
        for prompt, taught in TAUGHT.items()
    ]
    width = max(len(prompt) + len(taught) for prompt, taught in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels, attention_mask = torch.full_like(input_ids, -100), torch.zeros_like(input_ids)
    for row, (prompt, taught) in enumerate(rows):
        end = len(prompt) + len(taught)
        input_ids[row, :end] = torch.tensor(prompt + taught)
        labels[row, len(prompt) : end] = torch.tensor(taught)  # the loss is on the continuation only
        attention_mask[row, :end] = 1
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(TRAIN_STEPS):
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if loss.item() < TRAIN_LOSS:
            break
    assert loss.item() < TRAIN_LOSS, f"the tiny LM did not learn the format: loss {loss.item():.3f}"
    directory = tmp_path_factory.mktemp("trained") / "tiny-gpt2-questions"
    directory.mkdir()
    model.eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_written_questions_are_asked_with_their_expected_answers(vqa_model, trained_lm, bus, zidane, monkeypatch):
    llm = VqaReward(model=vqa_model, questions="llm", question_model=trained_lm)
    calls = counted(monkeypatch, llm.writer)
    samples = [Sample(bus, prompt) for prompt in TAUGHT] + [Sample(zidane, prompt) for prompt in TAUGHT]
    results = llm.score(samples)
    assert calls == [2]  # the two distinct prompts, one batch (their lengths differ: padding is masked)
    expected = {
        "two dogs on a bench, no cats": [
            ("Are there dogs?", "yes", "animal"),
            ("Are there two dogs?", "yes", "counting"),
            ("Is there a bench?", "yes", "object"),
            ("Are the dogs on the bench?", "yes", "spatial"),
            ("Are there cats?", "no", "animal"),
        ],
        "a red car": [("Is there a car?", "yes", "object"), ("Is the car red?", "yes", "color")],
    }
    dropped = {"two dogs on a bench, no cats": {"off_topic": 1}, "a red car": {"duplicate": 1}}
    for sample, result in zip(samples, results, strict=True):
        details = result.details
        assert details["question_source"] == "llm" and "fallback" not in details
        assert details["question_model"] == llm.writer.source.version and details["prompt_version"] == "v1"
        assert details["dropped"] == 1 and details["dropped_reasons"] == dropped[sample.prompt]
        asked = details["questions"]
        assert [(q["question"], q["expected"], q["element"]) for q in asked] == expected[sample.prompt]
        assert all(q["kind"] == "written" for q in asked)
        # P(expected) recomputed from the answerer's logits for the same questions on the same image.
        answerer = llm.answerer
        texts = [q["question"] for q in asked]
        logits = answerer.logits([sample.image], [0] * len(texts), texts, 64)
        p_yes = yes_probability(logits, answerer.yes_id, answerer.no_id).numpy()
        p_expected = np.where([q["expected"] == "yes" for q in asked], p_yes, 1 - p_yes)
        assert [q["p_expected"] for q in asked] == pytest.approx(p_expected.tolist(), abs=1e-6)
        assert result.value == pytest.approx(float(p_expected.mean()), abs=1e-6)
        assert result.value == pytest.approx(np.mean([q["p_expected"] for q in asked]), abs=1e-12)


def test_a_batch_of_prompts_of_different_lengths_writes_what_each_prompt_alone_does(trained_lm):
    from rewardscope.models.questions import LlmQuestionWriter

    batched = LlmQuestionWriter(trained_lm, "cpu", "float32", batch_size=2, cache_size=0).generate(list(TAUGHT))
    alone = LlmQuestionWriter(trained_lm, "cpu", "float32", batch_size=1, cache_size=0)
    for prompt, result in zip(TAUGHT, batched, strict=True):
        assert alone.generate([prompt])[0].questions == result.questions


def test_over_the_full_vocabulary_an_expected_no_is_read_at_the_no_token(vqa_model, trained_lm, bus):
    llm = VqaReward(model=vqa_model, questions="llm", question_model=trained_lm, normalisation="vocab")
    result = llm.score([Sample(bus, "two dogs on a bench, no cats")])[0]
    asked = result.details["questions"]
    answerer = llm.answerer
    logits = answerer.logits([bus], [0] * len(asked), [q["question"] for q in asked], 64)
    p_no = yes_probability(logits, answerer.no_id, answerer.yes_id, "vocab").tolist()
    for entry, no in zip(asked, p_no, strict=True):
        if entry["expected"] == "no":
            assert entry["p_expected"] == pytest.approx(no, abs=1e-9)
            assert entry["p_expected"] + entry["p_yes"] < 1  # the rest of the vocabulary holds mass too
        else:
            assert entry["p_expected"] == entry["p_yes"]
    assert [q["expected"] for q in asked].count("no") == 1


@pytest.mark.parametrize("which", ["random_lm", "trained_lm"])
def test_the_shared_prefix_cache_writes_what_the_whole_prompt_does(which, request):
    """The writer runs the few-shot prefix once and reuses its key/value cache; the reference runs each whole
    prompt through model.generate alone, no cache, no padding."""
    from rewardscope.models.questions import LlmQuestionWriter

    writer = LlmQuestionWriter(request.getfixturevalue(which), "cpu", "float32", 4, 40, 8, cache_size=0)
    prompts = [*TAUGHT, "a cat on a red bed", "three people next to a large bus"]
    for prompt, result in zip(prompts, writer.generate(prompts), strict=True):
        whole = writer.tokenizer(QUESTION_PROMPTS["v1"].format(prompt=prompt), return_tensors="pt")
        with torch.inference_mode():
            output = writer.model.generate(
                input_ids=whole["input_ids"],
                attention_mask=whole["attention_mask"],
                generation_config=writer.generation_config,
            )
        reference = writer.tokenizer.decode(output[0, whole["input_ids"].shape[1] :], skip_special_tokens=True)
        assert result.text and reference.startswith(result.text)  # the writer stops at the example's end
