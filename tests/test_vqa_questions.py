"""VQA question generation: yes/no questions from the prompt parser's objects (existence, count, colour,
relation) plus the whole-prompt question, without any language model."""

from __future__ import annotations

import pytest
from rewardscope.models.prompt import parse_prompt
from rewardscope.models.vqa import Question, generate_questions, prompt_question

CASES = [
    # counting
    (
        "three dogs",
        ["Is there a dog?", "Are there three dogs?", "Does this image show three dogs?"],
    ),
    (
        "a photo of four people",
        ["Is there a person?", "Are there four people?", "Does this image show a photo of four people?"],
    ),
    (
        "2 mice and an apple.",
        ["Is there a mouse?", "Are there two mice?", "Is there an apple?", "Does this image show 2 mice and an apple?"],
    ),
    (
        "a man and a woman",  # two person mentions: one existence question, one count question over both
        ["Is there a person?", "Are there two people?", "Does this image show a man and a woman?"],
    ),
    (
        "three scissors",  # a class whose one object is a pair
        ["Is there a pair of scissors?", "Are there three pairs of scissors?", "Does this image show three scissors?"],
    ),
    # colour
    (
        "a red dog",
        ["Is there a dog?", "Is the dog red?", "Does this image show a red dog?"],
    ),
    (
        "two blue cups",
        ["Is there a cup?", "Are there two cups?", "Are the cups blue?", "Does this image show two blue cups?"],
    ),
    (
        "an orange umbrella",
        ["Is there an umbrella?", "Is the umbrella orange?", "Does this image show an orange umbrella?"],
    ),
    (
        "a red apple and a green apple",  # one class mentioned twice: colour asked per mention, not "the apple"
        [
            "Is there an apple?",
            "Are there two apples?",
            "Is there a red apple?",
            "Is there a green apple?",
            "Does this image show a red apple and a green apple?",
        ],
    ),
    # two objects
    (
        "a cat and a dog",
        ["Is there a cat?", "Is there a dog?", "Does this image show a cat and a dog?"],
    ),
    (
        "a puppy on a sofa",  # synonyms resolve to the vocabulary class
        ["Is there a dog?", "Is there a couch?", "Does this image show a puppy on a sofa?"],
    ),
    # position
    (
        "a dog to the left of a cat",
        ["Is there a dog?", "Is there a cat?", "Is the dog to the left of the cat?",
         "Does this image show a dog to the left of a cat?"],
    ),
    (
        "a bear above a clock",
        ["Is there a bear?", "Is there a clock?", "Is the bear above the clock?",
         "Does this image show a bear above a clock?"],
    ),
    (
        "a bus below a kite",
        ["Is there a bus?", "Is there a kite?", "Is the bus below the kite?",
         "Does this image show a bus below a kite?"],
    ),
    (
        "two people next to a bus",
        ["Is there a person?", "Are there two people?", "Is there a bus?", "Are the people next to the bus?",
         "Does this image show two people next to a bus?"],
    ),
    (
        "a red car to the right of two zebras",
        ["Is there a car?", "Is there a zebra?", "Are there two zebras?", "Is the car red?",
         "Is the car to the right of the zebras?", "Does this image show a red car to the right of two zebras?"],
    ),
    # nothing the parser can count: the whole-prompt question alone
    ("an oil painting of a sunset", ["Does this image show an oil painting of a sunset?"]),
    ("  a   misty   morning!  ", ["Does this image show a misty morning?"]),
]  # fmt: skip


@pytest.mark.parametrize(("prompt", "expected"), CASES, ids=[case[0].strip() for case in CASES])
def test_questions_follow_the_parsed_objects(prompt, expected):
    assert [question.text for question in generate_questions(prompt)] == expected


def test_each_question_says_what_it_checks():
    questions = generate_questions("two red cups to the left of a dog")
    kinds = [(question.kind, question.subject) for question in questions]
    assert kinds == [
        ("existence", "cup"),
        ("count", "cup"),
        ("existence", "dog"),
        ("color", "cup"),
        ("relation", "cup"),
        ("prompt", None),
    ]
    assert all(isinstance(question, Question) for question in questions)


def test_a_prompt_without_words_gets_no_question():
    assert prompt_question(" ...") is None
    assert generate_questions("") == []


def test_unknown_nouns_are_asked_about_only_when_enabled():
    assert [q.text for q in generate_questions("a castle")] == ["Does this image show a castle?"]
    asked = generate_questions("a castle", unknown_nouns=True)
    assert [(q.text, q.kind, q.subject) for q in asked] == [
        ("Is there a castle?", "existence", "castle"),
        ("Does this image show a castle?", "prompt", None),
    ]


def test_a_given_parse_replaces_the_prompt_parser():
    parsed = parse_prompt("three cats")
    assert [q.text for q in generate_questions("a picture", parsed)] == [
        "Is there a cat?",
        "Are there three cats?",
        "Does this image show a picture?",
    ]
