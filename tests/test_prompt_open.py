"""Open-vocabulary prompt parsing: every countable noun phrase becomes an object (for detectors that take text
queries), the vocabulary's own objects stay exactly those of the closed parse, and uncountable nouns stay unknown."""

from __future__ import annotations

import pytest
from rewardscope.models.prompt import (
    COCO_CLASSES,
    ObjectSpec,
    ParsedPrompt,
    Relation,
    from_geneval_metadata,
    parse_prompt,
    to_geneval_metadata,
)
from test_prompt import COLORED, COUNTING, GENEVAL_SAMPLES, HAND_WRITTEN_TABLES, SINGLE_OBJECT


def summarize(parsed: ParsedPrompt) -> list[tuple]:
    """(class, count, colour, (relation, target) or None, attributes) per object."""
    return [
        obj(
            spec.class_name,
            spec.count,
            spec.color,
            spec.relation and (spec.relation.relation, spec.relation.target),
            spec.attributes,
        )
        for spec in parsed.objects
    ]


def obj(
    class_name: str,
    count: int = 1,
    color: str | None = None,
    rel: tuple[str, int] | None = None,
    attributes: tuple[str, ...] = (),
) -> tuple:
    """An expected row of summarize()."""
    return (class_name, count, color, rel, attributes)


def open_parse(prompt: str, vocabulary=COCO_CLASSES) -> ParsedPrompt:
    return parse_prompt(prompt, vocabulary, open_vocabulary=True)


# --- The example -----------------------------------------------------------------------------------


def test_counts_nouns_outside_the_vocabulary_only_with_an_open_vocabulary():
    closed = parse_prompt("three peaches and a candle")
    assert summarize(closed) == []
    assert closed.unknown == ("peach", "candle")

    opened = open_parse("three peaches and a candle")
    assert summarize(opened) == [obj("peach", 3), obj("candle")]
    assert opened.unknown == ()


# --- Hand-written prompts: (prompt, objects, unknown) ------------------------------------------------------

COUNTS = [
    ("4 lanterns", [obj("lantern", 4)], ()),
    ("12 eggs", [obj("egg", 12)], ()),
    ("twelve owls", [obj("owl", 12)], ()),
    ("eleven candles and twelve lanterns", [obj("candle", 11), obj("lantern", 12)], ()),
    ("a dozen eggs", [obj("egg", 12)], ()),
    ("half a dozen lemons", [obj("lemon", 6)], ()),
    ("an owl", [obj("owl")], ()),
    ("one turtle and one candle", [obj("turtle"), obj("candle")], ()),
    ("several butterflies", [obj("butterfly", 3)], ()),
    ("a few strawberries", [obj("strawberry", 3)], ()),
    ("some tomatoes", [obj("tomato", 2)], ()),
    ("candles", [obj("candle", 2)], ()),
    ("the lantern", [obj("lantern")], ()),
    ("the lanterns", [obj("lantern", 2)], ()),
    ("the two lanterns", [obj("lantern", 2)], ()),
    ("a pair of candles", [obj("candle", 2)], ()),
    ("three fish", [obj("fish", 3)], ()),
    ("four shrimp and two deer", [obj("shrimp", 4), obj("deer", 2)], ()),
]

IRREGULAR_PLURALS = [
    ("two geese", [obj("goose", 2)], ()),
    ("three wolves", [obj("wolf", 3)], ()),
    ("four oxen", [obj("ox", 4)], ()),
    ("two cacti", [obj("cactus", 2)], ()),
    ("three loaves", [obj("loaf", 3)], ()),
    ("two calves", [obj("calf", 2)], ()),
    ("five children", [obj("person", 5)], ()),  # a vocabulary synonym, as in the closed parse
    ("a pair of sunglasses", [obj("sunglasses")], ()),  # one pair is one object, like "a pair of skis"
]

ATTRIBUTES = [
    ("two fluffy white rabbits", [obj("rabbit", 2, "white", attributes=("fluffy",))], ()),
    ("three wooden chairs", [obj("chair", 3, attributes=("wooden",))], ()),
    ("a big fluffy brown dog", [obj("dog", color="brown", attributes=("big", "fluffy"))], ()),
    ("a street lamp", [obj("lamp", attributes=("street",))], ()),
    ("an old stone castle", [obj("castle", attributes=("old", "stone"))], ()),
    ("an orange lamp", [obj("lamp", color="orange")], ()),
    ("a grey wolf", [obj("wolf", color="gray")], ()),
    ("a red and white lighthouse", [obj("lighthouse", color="white")], ()),
    ("a cat wearing a tiny hat", [obj("cat"), obj("hat", attributes=("tiny",))], ()),
    ("a photo of a computer keyboard", [obj("keyboard", attributes=("computer",))], ()),
]

MIXED_VOCABULARIES = [
    ("a dog and two candles on a table", [obj("dog"), obj("candle", 2), obj("dining table")], ()),
    ("a teddy bear and a lantern", [obj("teddy bear"), obj("lantern")], ()),
    ("one television, three camels and four chickens", [obj("tv"), obj("camel", 3), obj("chicken", 4)], ()),
    ("three pears and two bananas", [obj("pear", 3), obj("banana", 2)], ()),
    ("three paintings and one knife", [obj("painting", 3), obj("knife")], ()),
    ("four apples were picked from the tree", [obj("apple", 4), obj("tree")], ()),
    ("a painting of two swans", [obj("swan", 2)], ()),
]

RELATIONS = [
    ("a cat to the left of a lamp", [obj("cat", rel=("left of", 1)), obj("lamp")], ()),
    ("a lamp above a dog", [obj("lamp", rel=("above", 1)), obj("dog")], ()),
    ("three helicopters buzzed over two pillows", [obj("helicopter", 3, rel=("above", 1)), obj("pillow", 2)], ()),
    ("one kite flew alongside three strawberries", [obj("kite", rel=("next to", 1)), obj("strawberry", 3)], ()),
    (
        "a cat next to a lamp and a dog below the lamp",
        [obj("cat", rel=("next to", 1)), obj("lamp"), obj("dog", rel=("below", 1))],
        (),
    ),
    ("an owl under the night sky", [obj("owl")], ("sky",)),  # an uncountable target takes no relation
]

UNCOUNTABLE = [
    ("a fox in the snow", [obj("fox")], ("snow",)),
    ("seven frogs leaped into the water", [obj("frog", 7)], ("water",)),
    ("a horse in a field of flowers", [obj("horse"), obj("flower", 2)], ("field",)),
    ("four ships and four horses sailed into the sunset", [obj("boat", 4), obj("horse", 4)], ("sunset",)),
    ("a sculpture of a horse", [obj("horse")], ("sculpture",)),
    ("the sky", [], ("sky",)),
    ("no snow", [], ("snow",)),
    # A bare singular without a quantifier reads as a mass or a name.
    ("a cup of coffee", [obj("cup")], ("coffee",)),
    ("a castle made of stone", [obj("castle")], ("stone",)),
    ("a cat in Paris", [obj("cat")], ("paris",)),
    ("a woman wearing sunglasses", [obj("person")], ("sunglasses",)),
    ("a chef cooking pasta in a kitchen", [obj("chef")], ("pasta", "kitchen")),
    ("a photo", [], ()),
]

OPEN_TABLES = [
    ("counts", COUNTS),
    ("irregular-plurals", IRREGULAR_PLURALS),
    ("attributes", ATTRIBUTES),
    ("mixed-vocabularies", MIXED_VOCABULARIES),
    ("relations", RELATIONS),
    ("uncountable", UNCOUNTABLE),
]


@pytest.mark.parametrize(
    ("prompt", "objects", "unknown"),
    [pytest.param(*row, id=f"{name}-{index}") for name, rows in OPEN_TABLES for index, row in enumerate(rows)],
)
def test_parses_open_vocabulary_prompts(prompt, objects, unknown):
    parsed = open_parse(prompt)
    assert summarize(parsed) == objects
    assert parsed.unknown == unknown
    assert parsed.exclude == ()
    assert parsed.prompt == prompt


@pytest.mark.parametrize(
    ("prompt", "objects", "exclude"),
    [
        ("a bowl with no peaches", [obj("bowl")], [ObjectSpec("peach", 1)]),
        ("a unicorn and no dragons", [obj("unicorn")], [ObjectSpec("dragon", 1)]),
        ("zero lanterns", [], [ObjectSpec("lantern", 1)]),
        ("a table without candles", [obj("dining table")], [ObjectSpec("candle", 1)]),
        ("a room with no wooden chairs", [], [ObjectSpec("chair", 1, attributes=("wooden",))]),
        ("no red lanterns", [], [ObjectSpec("lantern", 1, "red")]),
    ],
)
def test_turns_negated_nouns_outside_the_vocabulary_into_excludes(prompt, objects, exclude):
    parsed = open_parse(prompt)
    assert summarize(parsed) == objects
    assert list(parsed.exclude) == exclude


@pytest.mark.parametrize(
    ("vocabulary", "prompt", "objects", "unknown"),
    [
        (("dog", "cat"), "a man walking a puppy", [obj("man"), obj("dog")], ()),
        (
            ("dog", "traffic_light"),
            "a dog next to a traffic light",
            [obj("dog", rel=("next to", 1)), obj("traffic_light")],
            (),
        ),
        (("dog", "Red Panda"), "two red pandas and a koala", [obj("Red Panda", 2), obj("koala")], ()),
        (("dog",), "a teddy bear on the grass", [obj("bear", attributes=("teddy",))], ("grass",)),
    ],
)
def test_open_parses_keep_the_names_of_a_custom_vocabulary(vocabulary, prompt, objects, unknown):
    parsed = open_parse(prompt, vocabulary)
    assert summarize(parsed) == objects
    assert parsed.unknown == unknown


# --- The open parse extends the closed one -----------------------------------------------------------------

# Shapes of T2I-CompBench's numeracy prompts and GenEval's, sentences, and prompts with nothing to count.
PROPERTY_PROMPTS = [
    "three peaches and a candle",
    "two boys",
    "five drums",
    "one vase",
    "three swans",
    "four cameras and three horses",
    "one pear and three knives",
    "three plates and three computers",
    "two plates and three mice",
    "four chickens and four horses",
    "three couches, two keys, two women, four rabbits and one bowl",
    "one bread, four fish, one computer, two bags and one bicycle",
    "two tables and three lamps illuminated the room",
    "three helicopters buzzed over two pillows",
    "four chairs and one giraffe provided seating at the zoo",
    "two balloons floated with four mice",
    "six people gathered for a picnic",
    "eight cats lounged in the sun",
    "a photo of a peach and a laptop",
    "a photo of three candles",
    "a photo of a purple lantern",
    "a photo of a lamp left of a dog",
    "a photo of a dog above a lamp",
    "a photo of a red candle and a blue cup",
    "a cat to the left of a lamp",
    "a lamp to the right of a cat, the cat above the dog",
    "a bear above a lantern and a dog below the lantern",
    "a dog left of a cat, the cat above a bird",
    "a bowl with no peaches",
    "two dogs and no cats",
    "a unicorn and no dragons next to three apples",
    "two fluffy white rabbits next to a brown dog",
    "a big fluffy brown dog on a red couch next to a table",
    "a man riding a horse in a field of sunflowers",
    "a glass of wine next to a plant in a pot",
    "a teddy bear holding a heart",
    "a woman holding an umbrella in the rain",
    "an orange cat sitting on a red couch beside a lamp",
    "a pair of skis, a pair of shoes and a pair of sunglasses",
    "the giraffe is taller than the elephant and the tree",
    "a fox in the snow under the moon",
    "a beautiful sunset over the ocean, 4k, highly detailed",
    "",
    "!!!",
]


def vocabulary_view(parsed: ParsedPrompt, vocabulary: tuple[str, ...]) -> tuple[list[tuple], set[tuple]]:
    """Objects of vocabulary classes as (class, count, colour, relation) with relation targets re-indexed among
    them (a relation to another object is dropped), and the excludes of vocabulary classes."""
    kept = [index for index, spec in enumerate(parsed.objects) if spec.class_name in vocabulary]
    new_index = {old: new for new, old in enumerate(kept)}
    objects = []
    for index in kept:
        spec = parsed.objects[index]
        relation = spec.relation
        target = (relation.relation, new_index[relation.target]) if relation and relation.target in new_index else None
        objects.append((spec.class_name, spec.count, spec.color, target))
    exclude = {(spec.class_name, spec.count, spec.color) for spec in parsed.exclude if spec.class_name in vocabulary}
    return objects, exclude


def assert_open_parse_extends_closed(prompt: str, vocabulary: tuple[str, ...] = COCO_CLASSES) -> None:
    closed, opened = parse_prompt(prompt, vocabulary), open_parse(prompt, vocabulary)
    assert all(spec.attributes == () for spec in (*closed.objects, *closed.exclude)), prompt
    assert vocabulary_view(opened, vocabulary) == vocabulary_view(closed, vocabulary), prompt
    counted = {spec.class_name for spec in (*opened.objects, *opened.exclude)}
    assert set(closed.unknown) <= counted | set(opened.unknown), prompt
    assert set(opened.unknown) <= set(closed.unknown), prompt


@pytest.mark.parametrize("prompt", PROPERTY_PROMPTS)
def test_open_parse_keeps_the_closed_objects_and_covers_its_unknown_nouns(prompt):
    assert_open_parse_extends_closed(prompt)


@pytest.mark.parametrize(
    "table",
    [
        ("geneval-styles", [prompt for prompt, _ in SINGLE_OBJECT + COUNTING + COLORED]),
        ("geneval-samples", [sample["prompt"] for sample in GENEVAL_SAMPLES]),
        *((name, [row[0] for row in rows]) for name, rows, _ in HAND_WRITTEN_TABLES),
        ("open-tables", [row[0] for _, rows in OPEN_TABLES for row in rows]),
    ],
    ids=lambda table: table[0],
)
def test_open_parse_extends_the_closed_parse_of_every_table(table):
    for prompt in table[1]:
        assert_open_parse_extends_closed(prompt)


def test_a_relation_cycle_through_an_open_object_is_the_one_difference():
    # Closed: the lamp is unseen, so "the cat left of the dog" is the only relation. Open: dog -> lamp -> cat
    # already places the dog relative to the cat, and relating the cat to the dog would close a cycle.
    prompt = "a dog left of a lamp, the lamp left of the cat, the cat left of the dog"
    assert vocabulary_view(parse_prompt(prompt), COCO_CLASSES)[0] == [
        ("dog", 1, None, None),
        ("cat", 1, None, ("left of", 0)),
    ]
    assert summarize(open_parse(prompt)) == [
        obj("dog", rel=("left of", 1)),
        obj("lamp", rel=("left of", 2)),
        obj("cat"),
    ]


# --- Specs and GenEval metadata ----------------------------------------------------------------------------


def test_closed_parses_leave_attributes_empty_so_specs_compare_as_before():
    assert parse_prompt("three wooden chairs").objects == (ObjectSpec("chair", 3),)
    assert open_parse("three wooden chairs").objects == (ObjectSpec("chair", 3, attributes=("wooden",)),)


@pytest.mark.parametrize(
    ("spec", "same"),
    [
        (ObjectSpec("dog", 2, "red", None), ObjectSpec("dog", 2, "red", None, ())),
        (ObjectSpec("dog", 1, None, Relation("above", 1)), ObjectSpec("dog", 1, relation=Relation("above", 1))),
    ],
)
def test_attributes_default_to_empty_for_positional_specs(spec, same):
    assert spec == same
    assert spec.attributes == ()


def test_specs_reject_a_string_as_attributes():
    with pytest.raises(TypeError, match="tuple of words"):
        ObjectSpec("chair", 3, attributes="wooden")


def test_open_parses_write_geneval_metadata_named_by_their_nouns():
    assert to_geneval_metadata(open_parse("three peaches and a candle")) == {
        "include": [{"class": "peach", "count": 3}, {"class": "candle", "count": 1}],
        "exclude": [{"class": "peach", "count": 4}],
    }


@pytest.mark.parametrize(
    ("open_vocabulary", "objects", "unknown", "exclude"),
    [
        (False, [obj("dog", 2)], ("unicorn", "dragon"), []),
        (True, [obj("unicorn"), obj("dog", 2, rel=("left of", 0))], (), [ObjectSpec("dragon", 1)]),
    ],
)
def test_reads_geneval_metadata_with_classes_outside_the_vocabulary(open_vocabulary, objects, unknown, exclude):
    metadata = {
        "include": [{"class": "unicorn", "count": 1}, {"class": "dog", "count": 2, "position": ["left of", 0]}],
        "exclude": [{"class": "dragons", "count": 1}],
    }
    parsed = from_geneval_metadata(metadata, open_vocabulary=open_vocabulary)
    assert summarize(parsed) == objects
    assert parsed.unknown == unknown
    assert list(parsed.exclude) == exclude


@pytest.mark.parametrize(
    ("prompt", "objects", "closed_unknown"),
    [
        # T2I-CompBench numeracy prompts whose verb is an -ed word the verb list does not hold
        ("two drums added rhythm to the music", [("drum", 2)], ("drum", "rhythm", "music")),
        ("two drums played music", [("drum", 2)], ("drum", "music")),
        ("a dog tied to a post", [("dog", 1), ("post", 1)], ("post",)),
        # -ed words before the noun stay modifiers; -bed compounds stay nouns
        ("a painted red car", [("car", 1)], ()),
        ("a flatbed truck", [("truck", 1)], ()),
    ],
)
def test_an_ed_word_after_the_noun_ends_the_noun_phrase(prompt, objects, closed_unknown):
    parsed = parse_prompt(prompt, open_vocabulary=True)
    assert [(spec.class_name, spec.count) for spec in parsed.objects] == objects
    assert parse_prompt(prompt).unknown == closed_unknown
