"""Prompt parsing: GenEval and T2I-CompBench prompt styles, synonyms, unknown nouns, custom vocabularies,
and conversion to and from GenEval metadata."""

from __future__ import annotations

import pytest
from rewardscope.models import prompt as prompt_module
from rewardscope.models.prompt import (
    COCO_CLASSES,
    COLORS,
    MAX_COUNT,
    MAX_PROMPT_CHARS,
    RELATIONS,
    ObjectSpec,
    ParsedPrompt,
    Relation,
    from_geneval_metadata,
    parse_prompt,
    to_geneval_metadata,
)

GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
GENEVAL_NUMBERS = ("zero", "one", "two", "three", "four")


def summarize(parsed: ParsedPrompt) -> list[tuple]:
    """(class, count, colour, (relation, target) or None) per object."""
    return [
        obj(
            spec.class_name,
            spec.count,
            spec.color,
            spec.relation and (spec.relation.relation, spec.relation.target),
        )
        for spec in parsed.objects
    ]


def obj(class_name: str, count: int = 1, color: str | None = None, rel: tuple[str, int] | None = None) -> tuple:
    """An expected row of summarize()."""
    return (class_name, count, color, rel)


def geneval_article(name: str) -> str:
    # The article rule of GenEval's prompt generator, so these prompts match its spelling exactly.
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def geneval_plural(name: str) -> str:
    # GenEval's naive plural ("benchs", "skises") is what its counting prompts say.
    return f"{name}es" if name.endswith("s") else f"{name}s"


# --- GenEval's generated prompt styles, over the whole COCO vocabulary ------------------------------------

SINGLE_OBJECT = [(f"a photo of {geneval_article(name)}", [obj(name)]) for name in COCO_CLASSES]

COUNTING = [
    (f"a photo of {GENEVAL_NUMBERS[2 + i % 3]} {geneval_plural(name)}", [obj(name, 2 + i % 3)])
    for i, name in enumerate(COCO_CLASSES)
]

COLORED = [
    (
        f"a photo of {geneval_article(GENEVAL_COLORS[i % 10])} {name}",
        [obj(name, color=GENEVAL_COLORS[i % 10])],
    )
    for i, name in enumerate(COCO_CLASSES)
]


@pytest.mark.parametrize(("prompt", "objects"), SINGLE_OBJECT + COUNTING + COLORED)
def test_reads_every_coco_class_in_geneval_phrasing(prompt, objects):
    parsed = parse_prompt(prompt)
    assert summarize(parsed) == objects
    assert parsed.unknown == ()
    assert parsed.exclude == ()


# --- Hand-written prompts: (prompt, objects, unknown) ------------------------------------------------------

TWO_OBJECTS = [
    ("a photo of a knife and a stop sign", [obj("knife"), obj("stop sign")], ()),
    ("a photo of a bench and a sports ball", [obj("bench"), obj("sports ball")], ()),
    ("a photo of a toaster and an oven", [obj("toaster"), obj("oven")], ()),
    ("a photo of a hair drier and a cell phone", [obj("hair drier"), obj("cell phone")], ()),
    ("a photo of a wine glass and a bear", [obj("wine glass"), obj("bear")], ()),
    ("a photo of a parking meter and a fire hydrant", [obj("parking meter"), obj("fire hydrant")], ()),
    ("a photo of a tennis racket and a baseball bat", [obj("tennis racket"), obj("baseball bat")], ()),
    ("a photo of a potted plant and a dining table", [obj("potted plant"), obj("dining table")], ()),
    ("a photo of a traffic light and a hot dog", [obj("traffic light"), obj("hot dog")], ()),
    ("a photo of a baseball glove and a teddy bear", [obj("baseball glove"), obj("teddy bear")], ()),
    ("a photo of an orange and a banana", [obj("orange"), obj("banana")], ()),
    ("a cat on a bed", [obj("cat"), obj("bed")], ()),
    ("a cup in a sink", [obj("cup"), obj("sink")], ()),
    ("a man riding a horse", [obj("person"), obj("horse")], ()),
    ("a woman holding an umbrella", [obj("person"), obj("umbrella")], ()),
    ("a cat, a dog, and a bird", [obj("cat"), obj("dog"), obj("bird")], ()),
]

COUNTS = [
    ("a photo of four donuts", [obj("donut", 4)], ()),
    ("a photo of two clocks", [obj("clock", 2)], ()),
    ("a photo of two buses", [obj("bus", 2)], ()),
    ("a photo of three knives", [obj("knife", 3)], ()),
    ("a photo of four mice", [obj("mouse", 4)], ()),
    ("a photo of two wine glasses", [obj("wine glass", 2)], ()),
    ("a photo of three teddy bears", [obj("teddy bear", 3)], ()),
    ("a photo of four benches", [obj("bench", 4)], ()),
    ("a photo of two people", [obj("person", 2)], ()),
    ("a photo of two sheep", [obj("sheep", 2)], ()),
    ("a photo of three skis", [obj("skis", 3)], ()),
    ("a photo of scissors", [obj("scissors")], ()),
    ("three books and four cakes", [obj("book", 3), obj("cake", 4)], ()),
    ("two cats, one dog and five birds", [obj("cat", 2), obj("dog"), obj("bird", 5)], ()),
    ("one cat and two dogs", [obj("cat"), obj("dog", 2)], ()),
    ("six bottles and a vase", [obj("bottle", 6), obj("vase")], ()),
    ("seven apples on a plate", [obj("apple", 7)], ("plate",)),
    ("eight cows grazing", [obj("cow", 8)], ()),
    ("nine birds flying over a boat", [obj("bird", 9, rel=("above", 1)), obj("boat")], ()),
    ("ten cups", [obj("cup", 10)], ()),
    ("eleven donuts and twelve spoons", [obj("donut", 11), obj("spoon", 12)], ()),
    ("twenty one dogs", [obj("dog", 21)], ()),
    ("forty-two kites", [obj("kite", 42)], ()),
    ("there are 3 dogs and 2 cats", [obj("dog", 3), obj("cat", 2)], ()),
    ("100 dogs", [obj("dog", 100)], ()),
    ("101 dogs", [obj("dog", MAX_COUNT)], ()),
    ("99999999999999999999999 cats", [obj("cat", MAX_COUNT)], ()),
    ("four chairs around a table", [obj("chair", 4), obj("dining table")], ()),
    ("three black and white cats", [obj("cat", 3, color="white")], ()),
]

QUANTIFIERS = [
    ("a pair of skis", [obj("skis")], ()),
    ("a pair of scissors", [obj("scissors")], ()),
    ("a pair of dogs", [obj("dog", 2)], ()),
    ("a couple of people", [obj("person", 2)], ()),
    ("a dozen donuts", [obj("donut", 12)], ()),
    ("half a dozen bananas", [obj("banana", 6)], ()),
    ("several birds", [obj("bird", 3)], ()),
    ("a few apples", [obj("apple", 3)], ()),
    ("some cups", [obj("cup", 2)], ()),
    ("many kites", [obj("kite", 2)], ()),
    ("lots of umbrellas", [obj("umbrella", 2)], ()),
    ("a group of people", [obj("person", 2)], ()),
    ("a herd of elephants", [obj("elephant", 2)], ()),
    ("a flock of sheep", [obj("sheep", 2)], ()),
    ("the dog", [obj("dog")], ()),
    ("the dogs", [obj("dog", 2)], ()),
    ("dogs", [obj("dog", 2)], ()),
    ("dog", [obj("dog")], ()),
    ("the two cats", [obj("cat", 2)], ()),
    ("both horses", [obj("horse", 2)], ()),
    ("another cat", [obj("cat")], ()),
    ("a single chair", [obj("chair")], ()),
    ("dogs playing in a park", [obj("dog", 2)], ("park",)),
    ("a dog and a dog", [obj("dog"), obj("dog")], ()),
    ("a sheep and two sheep", [obj("sheep"), obj("sheep", 2)], ()),
]

COLOURS = [
    ("a photo of a purple tv", [obj("tv", color="purple")], ()),
    ("a photo of a yellow bench", [obj("bench", color="yellow")], ()),
    ("a photo of a brown orange", [obj("orange", color="brown")], ()),
    ("a photo of an orange orange", [obj("orange", color="orange")], ()),
    ("a photo of an orange sports ball", [obj("sports ball", color="orange")], ()),
    ("a photo of a grey cat", [obj("cat", color="gray")], ()),
    ("a photo of a gray cat", [obj("cat", color="gray")], ()),
    ("a big fluffy brown dog", [obj("dog", color="brown")], ()),
    ("five red apples", [obj("apple", 5, color="red")], ()),
    ("an orange cat sitting on a red couch", [obj("cat", color="orange"), obj("couch", color="red")], ()),
    (
        "a photo of a white teddy bear and a green dog",
        [obj("teddy bear", color="white"), obj("dog", color="green")],
        (),
    ),
    ("a photo of a red car and a blue bench", [obj("car", color="red"), obj("bench", color="blue")], ()),
    (
        "a photo of a pink hot dog and a brown parking meter",
        [obj("hot dog", color="pink"), obj("parking meter", color="brown")],
        (),
    ),
    (
        "a photo of an orange potted plant and a black fire hydrant",
        [obj("potted plant", color="orange"), obj("fire hydrant", color="black")],
        (),
    ),
    ("a red car, a blue car", [obj("car", color="red"), obj("car", color="blue")], ()),
    ("a cat that is black", [obj("cat")], ()),
]

RELATION_PROMPTS = [
    ("a photo of a bear above a clock", [obj("bear", rel=("above", 1)), obj("clock")], ()),
    ("a photo of a dog right of a teddy bear", [obj("dog", rel=("right of", 1)), obj("teddy bear")], ()),
    ("a photo of a cup left of an umbrella", [obj("cup", rel=("left of", 1)), obj("umbrella")], ()),
    ("a photo of a giraffe below a kite", [obj("giraffe", rel=("below", 1)), obj("kite")], ()),
    ("a cat to the left of a dog", [obj("cat", rel=("left of", 1)), obj("dog")], ()),
    ("a cat on the left of a dog", [obj("cat", rel=("left of", 1)), obj("dog")], ()),
    ("a cat on the left side of a dog", [obj("cat", rel=("left of", 1)), obj("dog")], ()),
    ("a car to the right of a truck", [obj("car", rel=("right of", 1)), obj("truck")], ()),
    ("a car on the right side of a truck", [obj("car", rel=("right of", 1)), obj("truck")], ()),
    ("a kite on top of a car", [obj("kite", rel=("above", 1)), obj("car")], ()),
    ("a bird over a boat", [obj("bird", rel=("above", 1)), obj("boat")], ()),
    ("a ball under a chair", [obj("sports ball", rel=("below", 1)), obj("chair")], ()),
    ("a dog underneath a table", [obj("dog", rel=("below", 1)), obj("dining table")], ()),
    ("a book beneath a clock", [obj("book", rel=("below", 1)), obj("clock")], ()),
    ("a bench next to a fire hydrant", [obj("bench", rel=("next to", 1)), obj("fire hydrant")], ()),
    ("a horse beside a cow", [obj("horse", rel=("next to", 1)), obj("cow")], ()),
    ("a vase near a clock", [obj("vase", rel=("next to", 1)), obj("clock")], ()),
    ("a chair close to a bed", [obj("chair", rel=("next to", 1)), obj("bed")], ()),
    ("two dogs above a cat", [obj("dog", 2, rel=("above", 1)), obj("cat")], ()),
    ("a book beneath a lamp", [obj("book")], ("lamp",)),
    ("a dragon next to a dog", [obj("dog")], ("dragon",)),
    ("a cat in front of a dog", [obj("cat"), obj("dog")], ()),
    ("a dog behind a car", [obj("dog"), obj("car")], ()),
    (
        "a bear above a clock and a dog below the clock",
        [obj("bear", rel=("above", 1)), obj("clock"), obj("dog", rel=("below", 1))],
        (),
    ),
    (
        "a dog left of a cat, the cat above a bird",
        [obj("dog", rel=("left of", 1)), obj("cat", rel=("above", 2)), obj("bird")],
        (),
    ),
    ("a dog left of a cat, the cat right of the dog", [obj("dog", rel=("left of", 1)), obj("cat")], ()),
    ("a dog next to the dog", [obj("dog", rel=("next to", 1)), obj("dog")], ()),
]

SYNONYMS = [
    ("a man", [obj("person")], ()),
    ("a woman and a boy", [obj("person"), obj("person")], ()),
    ("a girl with a puppy", [obj("person"), obj("dog")], ()),
    ("children playing with a ball", [obj("person", 2), obj("sports ball")], ()),
    ("people walking on a street", [obj("person", 2)], ("street",)),
    ("several men and many women", [obj("person", 3), obj("person", 2)], ()),
    ("a baby and a kitten", [obj("person"), obj("cat")], ()),
    ("a lady, a guy and a kid", [obj("person")] * 3, ()),
    ("a tennis player holding a racket", [obj("person"), obj("tennis racket")], ()),
    ("puppies and kittens", [obj("dog", 2), obj("cat", 2)], ()),
    ("a motorbike near a bike", [obj("motorcycle", rel=("next to", 1)), obj("bicycle")], ()),
    ("a sofa", [obj("couch")], ()),
    ("an aeroplane, a jet and a plane", [obj("airplane")] * 3, ()),
    ("a television", [obj("tv")], ()),
    ("a tv set", [obj("tv")], ()),
    ("a tvmonitor", [obj("tv")], ()),
    ("a diningtable and a table", [obj("dining table")] * 2, ()),
    ("a pottedplant and a houseplant", [obj("potted plant")] * 2, ()),
    ("a plant in a pot", [obj("potted plant")], ()),
    ("a cellphone and a phone", [obj("cell phone")] * 2, ()),
    ("a mobile phone and a smartphone", [obj("cell phone")] * 2, ()),
    ("a hairdryer and a hair dryer", [obj("hair drier")] * 2, ()),
    ("a doughnut", [obj("donut")], ()),
    ("three doughnuts", [obj("donut", 3)], ()),
    ("a fridge", [obj("refrigerator")], ()),
    ("a glass of wine", [obj("wine glass")], ()),
    ("two glasses of wine", [obj("wine glass", 2)], ()),
    ("a mug", [obj("cup")], ()),
    ("an automobile and a ship", [obj("car"), obj("boat")], ()),
    ("a teddy", [obj("teddy bear")], ()),
    ("a computer mouse and a remote control", [obj("mouse"), obj("remote")], ()),
    ("a purse and a handbag", [obj("handbag")] * 2, ()),
    ("a hydrant", [obj("fire hydrant")], ()),
    ("a glass of wine next to a plant in a pot", [obj("wine glass", rel=("next to", 1)), obj("potted plant")], ()),
    ("a microwave oven", [obj("microwave")], ()),
]

UNKNOWN_NOUNS = [
    ("a unicorn", [], ("unicorn",)),
    ("a castle", [], ("castle",)),
    ("the grass", [], ("grass",)),
    ("a cactus", [], ("cactus",)),
    ("two cacti", [], ("cactus",)),
    ("three geese", [], ("goose",)),
    ("two unicorns and a dog", [obj("dog")], ("unicorn",)),
    ("a unicorn and a unicorn", [], ("unicorn",)),
    ("a cat wearing a hat", [obj("cat")], ("hat",)),
    ("a cup of coffee", [obj("cup")], ("coffee",)),
    ("a horse in a field of flowers", [obj("horse")], ("field", "flower")),
    ("a dog in the grass near a tree", [obj("dog")], ("grass", "tree")),
    ("an elephant under a tree", [obj("elephant")], ("tree",)),
    ("a hot dog on a plate", [obj("hot dog")], ("plate",)),
    ("a pair of skis and a pair of shoes", [obj("skis")], ("shoe",)),
    ("a watch on a table", [obj("dining table")], ("watch",)),
    ("a drink", [], ("drink",)),
    ("a teddy bear holding a heart", [obj("teddy bear")], ("heart",)),
    ("the giraffe is taller than the elephant", [obj("giraffe"), obj("elephant")], ()),
    ("a tall building", [], ("building",)),
]

NO_OBJECTS = [
    ("a beautiful sunset", [], ("sunset",)),
    ("abstract art", [], ("art",)),
    ("a snowy mountain landscape", [], ("landscape",)),
    ("the sky", [], ("sky",)),
    ("a photo", [], ()),
    ("an image of", [], ()),
    ("", [], ()),
    ("   ", [], ()),
    ("!!!", [], ()),
    ("highly detailed, 4k, trending", [], ()),
]

SURFACE_FORMS = [
    ("A PHOTO OF A DOG!!!", [obj("dog")], ()),
    ("a photo of a dog.", [obj("dog")], ()),
    ("An Image Of A Cat", [obj("cat")], ()),
    ("a picture of a hair dryer and a smartphone", [obj("hair drier"), obj("cell phone")], ()),
    ("a painting of a vase", [obj("vase")], ()),
    ("a 3d render of a cat", [obj("cat")], ()),
    ("a photo of a cat, 4k, highly detailed", [obj("cat")], ()),
    ("a black and white photo of a dog", [obj("dog")], ()),
    ("a dog,a cat", [obj("dog"), obj("cat")], ()),
    ("a dog & a cat", [obj("dog"), obj("cat")], ()),
    ("a teddy-bear", [obj("teddy bear")], ()),
    ("a hot-dog", [obj("hot dog")], ()),
    ("  a   dog\tand\na cat  ", [obj("dog"), obj("cat")], ()),
    ("Café with a DOG", [obj("dog")], ("café",)),
    ("ａ ｄｏｇ", [obj("dog")], ()),
    ("a dog 🐶 and a cat 🐱", [obj("dog"), obj("cat")], ()),
    ("a dog’s toy", [obj("dog")], ("toy",)),
    ("a man's tie", [obj("person"), obj("tie")], ()),
    ("a cat that doesn't sleep", [obj("cat")], ()),
    ("a dog that isn't a cat", [obj("dog")], ()),
]


# The hand-written tables, each parsed with the default vocabulary and checked against its rows:
# (id prefix, rows, whether the parse must also keep the prompt exactly as given).
HAND_WRITTEN_TABLES = [
    # Reads objects and their counts.
    ("two-objects", TWO_OBJECTS, False),
    ("counts", COUNTS, False),
    ("quantifiers", QUANTIFIERS, False),
    # Attaches colour adjectives to their noun.
    ("colours", COLOURS, False),
    # Links spatial relations to the following object.
    ("relations", RELATION_PROMPTS, False),
    # Maps synonyms onto vocabulary names.
    ("synonyms", SYNONYMS, False),
    # Reports nouns the detector cannot see, and keeps the prompt as given.
    ("unknown-nouns", UNKNOWN_NOUNS, True),
    ("no-objects", NO_OBJECTS, True),
    # Ignores case, punctuation and filler.
    ("surface-forms", SURFACE_FORMS, False),
]


@pytest.mark.parametrize(
    ("prompt", "objects", "unknown", "keeps_prompt"),
    [
        pytest.param(*row, keeps_prompt, id=f"{name}-{index}")
        for name, rows, keeps_prompt in HAND_WRITTEN_TABLES
        for index, row in enumerate(rows)
    ],
)
def test_parses_hand_written_prompts(prompt, objects, unknown, keeps_prompt):
    parsed = parse_prompt(prompt)
    assert summarize(parsed) == objects
    assert parsed.unknown == unknown
    if keeps_prompt:
        assert parsed.prompt == prompt


@pytest.mark.parametrize(
    ("prompt", "objects", "exclude"),
    [
        ("no cats", [], [("cat", 1)]),
        ("zero dogs", [], [("dog", 1)]),
        ("0 dogs", [], [("dog", 1)]),
        ("a room with no people", [], [("person", 1)]),
        ("a cat without a dog", [obj("cat")], [("dog", 1)]),
        ("a dog, not a cat", [obj("dog")], [("cat", 1)]),
        ("a dog that isn't a cat", [obj("dog")], [("cat", 1)]),
        ("a unicorn and no dragons", [], []),
        ("two dogs and no cats and no cats", [obj("dog", 2)], [("cat", 1)]),
        ("a photo of two clocks", [obj("clock", 2)], []),
    ],
)
def test_turns_negated_objects_into_excludes(prompt, objects, exclude):
    parsed = parse_prompt(prompt)
    assert summarize(parsed) == objects
    assert [(spec.class_name, spec.count) for spec in parsed.exclude] == exclude


VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
SMALL_VOCABULARY = ("dog", "cat", "traffic_light", "Red Panda")


@pytest.mark.parametrize(
    ("vocabulary", "prompt", "objects", "unknown"),
    [
        (
            SMALL_VOCABULARY,
            "a dog next to a traffic light",
            [obj("dog", rel=("next to", 1)), obj("traffic_light")],
            (),
        ),
        (SMALL_VOCABULARY, "two red pandas", [obj("Red Panda", 2)], ()),
        (SMALL_VOCABULARY, "a red panda and a black cat", [obj("Red Panda"), obj("cat", color="black")], ()),
        (SMALL_VOCABULARY, "a person and a cat", [obj("cat")], ("person",)),
        (SMALL_VOCABULARY, "a man walking a puppy", [obj("dog")], ("man",)),
        (SMALL_VOCABULARY, "a teddy bear", [], ("bear",)),
        (VOC_CLASSES, "an airplane above a couch", [obj("aeroplane", rel=("above", 1)), obj("sofa")], ()),
        (VOC_CLASSES, "a tv and a dining table", [obj("tvmonitor"), obj("diningtable")], ()),
        (VOC_CLASSES, "a potted plant and two motorcycles", [obj("pottedplant"), obj("motorbike", 2)], ()),
        (VOC_CLASSES, "a sofa next to a television", [obj("sofa", rel=("next to", 1)), obj("tvmonitor")], ()),
        (VOC_CLASSES, "a teddy bear and a dog", [obj("dog")], ("bear",)),
        ({0: "person", 1: "dog"}, "a man and a dog", [obj("person"), obj("dog")], ()),
        (["dog", "orange"], "an orange dog and an orange", [obj("dog", color="orange"), obj("orange")], ()),
    ],
)
def test_matches_only_names_in_the_given_vocabulary(vocabulary, prompt, objects, unknown):
    parsed = parse_prompt(prompt, vocabulary)
    assert summarize(parsed) == objects
    assert parsed.unknown == unknown


def test_builds_the_lookup_tables_once_per_vocabulary():
    parse_prompt("a dog", ["dog", "cow", "hen"])
    before = prompt_module._lexicon.cache_info()
    parse_prompt("a cow", ["dog", "cow", "hen"])
    after = prompt_module._lexicon.cache_info()
    assert (after.hits, after.misses) == (before.hits + 1, before.misses)


def test_caps_very_long_prompts():
    prompt = "a dog and " * 1000 + "a cat"
    parsed = parse_prompt(prompt)
    assert len(prompt) > MAX_PROMPT_CHARS
    assert summarize(parsed) == [obj("dog")] * (MAX_PROMPT_CHARS // len("a dog and "))
    assert parsed.prompt == prompt


@pytest.mark.parametrize("prompt", [None, 3, b"a dog", ["a dog"]])
def test_rejects_prompts_that_are_not_strings(prompt):
    with pytest.raises(TypeError):
        parse_prompt(prompt)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ObjectSpec("dog", 0), "count"),
        (lambda: Relation("behind", 0), "unknown relation"),
        (lambda: Relation("above", -1), "non-negative"),
    ],
)
def test_specs_reject_impossible_values(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_public_constants_follow_geneval():
    assert len(COCO_CLASSES) == 80 and len(set(COCO_CLASSES)) == 80
    assert COCO_CLASSES[:3] == ("person", "bicycle", "car") and COCO_CLASSES[-1] == "toothbrush"
    assert COLORS[:10] == GENEVAL_COLORS and COLORS[10:] == ("gray",)
    assert RELATIONS == ("left of", "right of", "above", "below", "next to")


# --- GenEval metadata -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "metadata"),
    [
        (
            "a photo of a dog right of a teddy bear",
            {
                "include": [
                    {"class": "teddy bear", "count": 1},
                    {"class": "dog", "count": 1, "position": ["right of", 0]},
                ]
            },
        ),
        (
            "a photo of a bear above a clock",
            {
                "include": [
                    {"class": "clock", "count": 1},
                    {"class": "bear", "count": 1, "position": ["above", 0]},
                ]
            },
        ),
        (
            "a photo of two clocks",
            {"include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}]},
        ),
        (
            "a photo of four donuts",
            {"include": [{"class": "donut", "count": 4}], "exclude": [{"class": "donut", "count": 5}]},
        ),
        ("a photo of a yellow bench", {"include": [{"class": "bench", "count": 1, "color": "yellow"}]}),
        (
            "a photo of a red car and a blue bench",
            {
                "include": [
                    {"class": "car", "count": 1, "color": "red"},
                    {"class": "bench", "count": 1, "color": "blue"},
                ]
            },
        ),
        (
            "a photo of a knife and a stop sign",
            {"include": [{"class": "knife", "count": 1}, {"class": "stop sign", "count": 1}]},
        ),
        (
            "a photo of a cat next to a dog",
            {"include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]},
        ),
        (
            "a red dog and a blue dog",
            {
                "include": [
                    {"class": "dog", "count": 1, "color": "red"},
                    {"class": "dog", "count": 1, "color": "blue"},
                ]
            },
        ),
        (
            "a bear above a clock and a dog below the clock",
            {
                "include": [
                    {"class": "clock", "count": 1},
                    {"class": "bear", "count": 1, "position": ["above", 0]},
                    {"class": "dog", "count": 1, "position": ["below", 0]},
                ]
            },
        ),
        (
            "a dog left of a cat, the cat above a bird",
            {
                "include": [
                    {"class": "bird", "count": 1},
                    {"class": "cat", "count": 1, "position": ["above", 0]},
                    {"class": "dog", "count": 1, "position": ["left of", 1]},
                ]
            },
        ),
        (
            "two dogs and no cats",
            {
                "include": [{"class": "dog", "count": 2}],
                "exclude": [{"class": "cat", "count": 1}, {"class": "dog", "count": 3}],
            },
        ),
        ("a unicorn", {"include": []}),
    ],
)
def test_writes_geneval_metadata(prompt, metadata):
    assert to_geneval_metadata(prompt) == metadata
    assert to_geneval_metadata(parse_prompt(prompt)) == metadata


# Samples shaped exactly like GenEval's evaluation_metadata.jsonl lines (tag and prompt included).
GENEVAL_SAMPLES = [
    {"tag": "single_object", "include": [{"class": "giraffe", "count": 1}], "prompt": "a photo of a giraffe"},
    {
        "tag": "two_object",
        "include": [{"class": "knife", "count": 1}, {"class": "stop sign", "count": 1}],
        "prompt": "a photo of a knife and a stop sign",
    },
    {
        "tag": "counting",
        "include": [{"class": "scissors", "count": 3}],
        "exclude": [{"class": "scissors", "count": 4}],
        "prompt": "a photo of three scissorses",
    },
    {
        "tag": "colors",
        "include": [{"class": "tv", "count": 1, "color": "purple"}],
        "prompt": "a photo of a purple tv",
    },
    {
        "tag": "position",
        "include": [{"class": "clock", "count": 1}, {"class": "bear", "count": 1, "position": ["above", 0]}],
        "prompt": "a photo of a bear above a clock",
    },
    {
        "tag": "color_attr",
        "include": [
            {"class": "teddy bear", "count": 1, "color": "white"},
            {"class": "dog", "count": 1, "color": "green"},
        ],
        "prompt": "a photo of a white teddy bear and a green dog",
    },
]


@pytest.mark.parametrize("sample", GENEVAL_SAMPLES, ids=[sample["tag"] for sample in GENEVAL_SAMPLES])
def test_geneval_samples_survive_both_directions(sample):
    expected = {key: sample[key] for key in ("include", "exclude") if key in sample}
    parsed = from_geneval_metadata(sample)
    assert parsed.prompt == sample["prompt"]
    assert to_geneval_metadata(parsed) == expected
    assert to_geneval_metadata(sample["prompt"]) == expected


@pytest.mark.parametrize(
    "prompt",
    [
        "a photo of a dog right of a teddy bear",
        "a photo of a white teddy bear and a green dog",
        "two cats, one dog and five birds",
        "a bear above a clock and a dog below the clock",
        "a dog left of a cat, the cat above a bird",
        "a glass of wine next to a plant in a pot",
        "two dogs and no cats",
        "a unicorn next to 3 red apples",
        "100 dogs",
    ],
)
def test_metadata_round_trips_through_parsed_prompts(prompt):
    metadata = to_geneval_metadata(prompt)
    parsed = from_geneval_metadata(metadata)
    assert to_geneval_metadata(parsed) == metadata

    # Only the order (targets first) and the relation indices may differ from the parse of the prompt.
    def groups(p: ParsedPrompt) -> list[tuple]:
        return sorted((spec.class_name, spec.count, spec.color) for spec in p.objects)

    assert groups(parsed) == groups(parse_prompt(prompt))


@pytest.mark.parametrize(
    ("metadata", "objects", "unknown", "exclude"),
    [
        (
            {
                "include": [
                    {"class": "unicorn", "count": 1},
                    {"class": "dog", "count": 2, "position": ["left of", 0]},
                ]
            },
            [obj("dog", 2)],
            ("unicorn",),
            [],
        ),
        (
            {"include": [{"class": "unicorn"}, {"class": "cat"}, {"class": "dog", "position": ["above", 1]}]},
            [obj("cat"), obj("dog", rel=("above", 0))],
            ("unicorn",),
            [],
        ),
        ({"include": [{"class": "Dogs", "color": "Grey"}]}, [obj("dog", color="gray")], (), []),
        ({"include": [{"class": "sofa"}]}, [obj("couch")], (), []),
        (
            {"include": [{"class": "cat"}, {"class": "dog", "position": ["next to", 0]}]},
            [obj("cat"), obj("dog", rel=("next to", 0))],
            (),
            [],
        ),
        (
            {"include": [], "exclude": [{"class": "dragons", "count": 1}, {"class": "clock", "count": 3}]},
            [],
            ("dragon",),
            [("clock", 3)],
        ),
        (
            {"include": [{"class": "dog", "count": 100}], "exclude": [{"class": "dog", "count": 101}]},
            [obj("dog", 100)],
            (),
            [("dog", 101)],
        ),
    ],
)
def test_reads_geneval_metadata(metadata, objects, unknown, exclude):
    parsed = from_geneval_metadata(metadata)
    assert summarize(parsed) == objects
    assert parsed.unknown == unknown
    assert [(spec.class_name, spec.count) for spec in parsed.exclude] == exclude
    assert parsed.prompt == ""


def test_reads_geneval_metadata_against_a_custom_vocabulary():
    parsed = from_geneval_metadata(
        {"include": [{"class": "couch"}, {"class": "tv", "position": ["above", 0]}]}, VOC_CLASSES
    )
    assert summarize(parsed) == [obj("sofa"), obj("tvmonitor", rel=("above", 0))]


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (None, "must be an object"),
        ([], "must be an object"),
        ("{'include': []}", "must be an object"),
        ({}, "needs an 'include' list"),
        ({"exclude": []}, "needs an 'include' list"),
        ({"include": "dog"}, "'include' must be a list"),
        ({"include": [], "exclude": {"class": "dog"}}, "'exclude' must be a list"),
        ({"include": [1]}, r"include\[0\] must be an object"),
        ({"include": [{"class": ""}]}, "non-empty string"),
        ({"include": [{"class": 5}]}, "non-empty string"),
        ({"include": [{"count": 1}]}, "non-empty string"),
        ({"include": [{"class": "x" * 101}]}, "longer than"),
        ({"include": [{"class": "!!!"}]}, "contains no word"),
        ({"include": [{"class": "dog", "count": 0}]}, "between 1 and 100"),
        ({"include": [{"class": "dog", "count": -3}]}, "between 1 and 100"),
        ({"include": [{"class": "dog", "count": 101}]}, "between 1 and 100"),
        ({"include": [{"class": "dog", "count": True}]}, "must be an integer"),
        ({"include": [{"class": "dog", "count": 1.0}]}, "must be an integer"),
        ({"include": [{"class": "dog", "count": "2"}]}, "must be an integer"),
        ({"include": [{"class": "dog", "color": "mauve"}]}, "'color' must be one of"),
        ({"include": [{"class": "dog", "color": 3}]}, "'color' must be one of"),
        ({"include": [{"class": "dog", "position": ["left of", 0]}]}, "earlier include"),
        ({"include": [{"class": "dog"}, {"class": "cat", "position": ["left of", 1]}]}, "earlier include"),
        ({"include": [{"class": "dog"}, {"class": "cat", "position": ["left of", True]}]}, "earlier include"),
        ({"include": [{"class": "dog"}, {"class": "cat", "position": ["left of", "0"]}]}, "earlier include"),
        (
            {"include": [{"class": "dog"}, {"class": "cat", "position": ["behind", 0]}]},
            "relation must be one of",
        ),
        (
            {"include": [{"class": "dog"}, {"class": "cat", "position": ["left of"]}]},
            r"\[relation, target index\]",
        ),
        (
            {"include": [{"class": "dog"}, {"class": "cat", "position": "left of 0"}]},
            r"\[relation, target index\]",
        ),
        ({"include": [{"class": "dog", "tag": "x"}]}, "unsupported keys: tag"),
        ({"include": [], "exclude": [{"class": "dog", "color": "red"}]}, "unsupported keys: color"),
        ({"include": [], "exclude": [{"class": "dog", "count": 102}]}, "between 1 and 101"),
        ({"include": [{"class": "dog"}] * 65}, "more than 64"),
        ({"include": [], "prompt": 3}, "'prompt' must be a string"),
    ],
)
def test_rejects_malformed_geneval_metadata(metadata, message):
    with pytest.raises(ValueError, match=message):
        from_geneval_metadata(metadata)


def test_refuses_to_order_cyclic_relations():
    parsed = ParsedPrompt(
        "",
        (
            ObjectSpec("dog", 1, relation=Relation("left of", 1)),
            ObjectSpec("cat", 1, relation=Relation("right of", 0)),
        ),
        (),
    )
    with pytest.raises(ValueError, match="cycle"):
        to_geneval_metadata(parsed)
