"""Parse text-to-image prompts into the objects, counts, colours and spatial relations a detector can check,
and convert those parses to and from GenEval's include/exclude metadata."""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Parsing conventions (a heuristic parser: no POS tagger, no downloaded model):
# - A quantity without a number ("some", "many", "lots of", a bare plural such as "dogs", "the dogs") asks
#   for UNSPECIFIED_PLURAL_COUNT = 2, the smallest count that makes the plural true; "several" and "a few"
#   ask for FEW_COUNT = 3.
# - Counts are capped at MAX_COUNT: beyond it a detector's per-class limit makes the request meaningless,
#   and an uncapped "1000000 dogs" would let one prompt size the matching tensors.
# - The same class named twice ("a dog and a dog") stays two ObjectSpecs: each mention may carry its own
#   colour or relation, so merging would lose information; consumers that want totals sum the counts.
#   The one exception is "the X" after an X with the same count and no clashing colour, which refers back
#   to it ("a bear above a clock and a dog below the clock" has one clock).
# - Objects keep prompt order, so a relation's target usually comes after its object; to_geneval_metadata
#   reorders targets first, as GenEval's evaluator needs.
# - "a pair of" / "a couple of" ask for 2, except for classes whose single object is itself a pair
#   ("a pair of skis", "a pair of scissors" is one detection).
# - "no X", "zero X" and "without X" become exclude constraints with count 1 (X must be absent).
# - parse_prompt never adds GenEval's counting exclude (n + 1 for "n Xs"); to_geneval_metadata adds it.
#
# Open vocabulary (parse_prompt(..., open_vocabulary=True), for detectors that take text queries):
# - The vocabulary still names what it knows ("a table" is "dining table", "a teddy bear" is one object), so
#   the objects of vocabulary classes are the closed parse's; the one exception is a relation cycle through
#   an open-vocabulary object, which drops the relation that would close it.
# - A noun phrase without a vocabulary word becomes an object named by its last noun, singular ("three
#   peaches": peach x 3), counted, negated, related and referred back to ("the lamp") by the rules above.
#   Compounds are not joined: "a street lamp" is a lamp with the attribute "street".
# - Every object and exclude carries the phrase's other words before its head noun, colour aside, as
#   attributes ("two fluffy white rabbits": rabbit x 2, white, ("fluffy",)); a closed parse leaves them
#   empty, so its specs compare as before. Attributes take no part in "the X" back-references.
# - Stay in `unknown`: uncountable nouns (masses, materials, places, weather, media: "in the snow", "a
#   field", "a sculpture") and a bare singular without a quantifier ("a cup of coffee", "made of wood",
#   "Paris"), which English uses for masses and names. A bare plural ("candles") still counts 2.

# The word lists are data (models/prompt_words.json); this module holds the rules that use them.
_WORDS: dict[str, Any] = json.loads((Path(__file__).with_name("prompt_words.json")).read_text(encoding="utf-8"))

# The 80 COCO classes in class-index order, as ultralytics names them (ultralytics/cfg/datasets/coco.yaml).
COCO_CLASSES: tuple[str, ...] = tuple(_WORDS["coco_classes"])

COLORS: tuple[str, ...] = tuple(_WORDS["colors"])

RELATIONS: tuple[str, ...] = tuple(_WORDS["relations"])

MAX_PROMPT_CHARS = 2000
MAX_COUNT = 100
UNSPECIFIED_PLURAL_COUNT = 2
FEW_COUNT = 3
# Bounds what a single HTTP request's metadata can make the matcher allocate.
MAX_METADATA_ENTRIES = 64
MAX_CLASS_NAME_CHARS = 100

# GenEval's evaluator knows only these four; "next to" has no geometric test there.
GENEVAL_POSITIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
# GenEval's colours, in its order (evaluation/evaluate_images.py line 76): ours without "gray".
GENEVAL_COLORS: tuple[str, ...] = COLORS[:10]
# GenEval's object_names.txt names three COCO classes its own way (lines 65-67 of djghosh13/geneval
# evaluation/object_names.txt; the other 77 lines are COCO's names in COCO's order). Its metadata uses these names.
GENEVAL_CLASS_NAMES: dict[str, str] = {
    "mouse": "computer mouse",
    "remote": "tv remote",
    "keyboard": "computer keyboard",
}
_FROM_GENEVAL_NAME = {geneval: coco for coco, geneval in GENEVAL_CLASS_NAMES.items()}


def geneval_name(class_name: str) -> str:
    """The name GenEval gives a COCO class (the class name itself for the 77 it keeps)."""
    return GENEVAL_CLASS_NAMES.get(class_name, class_name)


@dataclass(frozen=True)
class Relation:
    """Where an object sits relative to another object of the same ParsedPrompt."""

    relation: str  # one of RELATIONS
    target: int  # index into ParsedPrompt.objects

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"unknown relation {self.relation!r}; expected one of {', '.join(RELATIONS)}")
        if self.target < 0:
            raise ValueError(f"relation target must be a non-negative object index, got {self.target}")


@dataclass(frozen=True)
class ObjectSpec:
    """One requested object group: a vocabulary class (with an open vocabulary, any head noun), how many, and
    optionally a colour, a relation and the phrase's other modifier words ("wooden" in "three wooden chairs")."""

    class_name: str
    count: int
    color: str | None = None
    relation: Relation | None = None
    attributes: tuple[str, ...] = ()  # filled by open-vocabulary parses only; in prompt order

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"count for {self.class_name!r} must be >= 1, got {self.count}")
        if not isinstance(self.attributes, tuple):
            # A bare string would pass for a tuple of one-letter attributes.
            raise TypeError(f"attributes must be a tuple of words, got {type(self.attributes).__name__}")


@dataclass(frozen=True)
class ParsedPrompt:
    """What a prompt asks a detector to find (objects), to miss (exclude), and what it cannot check."""

    prompt: str
    objects: tuple[ObjectSpec, ...]
    # Nouns that became neither an object nor an exclude, singular, first mention order: outside the vocabulary
    # (closed parse) or uncountable (open parse).
    unknown: tuple[str, ...]
    exclude: tuple[ObjectSpec, ...] = ()  # satisfied when fewer than `count` of the class are detected


# ---------------------------------------------------------------------------------------------------------
# Lexicon: multi-word phrases (vocabulary names, synonyms, relations, quantities) matched longest first.


@functools.cache
def _inflect() -> Any:
    # Imported on first use: importing inflect takes about a second, which every CLI start would pay.
    import inflect

    return inflect.engine()


_VOCAB, _COLOR, _RELATION, _QUANTITY, _BOUNDARY, _VERBISH, _WORD = (
    "vocab", "color", "relation", "quantity", "boundary", "verbish", "word",
)  # fmt: skip

# Quantity modes: how a quantifier turns into a count once the head noun is known. "the" counts like the
# other determiners but may also point back at an object already mentioned.
_EXACT, _BY_NUMBER, _DEFINITE, _PAIR, _NONE = "exact", "by_number", "definite", "pair", "none"

# Boundary kinds: a conjunction lets a colour-only phrase lend its quantity to the next ("two black and
# white cats"); a negation marks the next phrase as something that must be absent.
_CONJUNCTION, _NEGATION, _STOP = "conjunction", "negation", "stop"


@dataclass(frozen=True, slots=True)
class _Lexeme:
    kind: str
    value: str = ""
    count: int = 0
    plural: bool = False
    color: str | None = None  # a vocabulary word that is also a colour word ("orange")


_COLOR_WORDS: dict[str, str] = {color: color for color in COLORS} | {"grey": "gray"}


def _relation_phrases() -> dict[str, str]:
    phrases: dict[str, str] = {}
    for side in ("left", "right"):
        for prefix in ("", "to the ", "on the ", "at the ", "to ", "on ", "towards the "):
            for suffix in (" of", " side of", " hand side of"):
                phrases[f"{prefix}{side}{suffix}"] = f"{side} of"
    for phrase in ("above", "over", "on top of", "on the top of", "atop"):
        phrases[phrase] = "above"
    for phrase in ("below", "under", "underneath", "beneath", "underneath of"):
        phrases[phrase] = "below"
    for phrase in (
        "next to", "right next to", "beside", "near", "near to", "close to", "alongside", "adjacent to",
        "by the side of",
    ):  # fmt: skip
        phrases[phrase] = "next to"
    return phrases


_UNITS = (
    "", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
)  # fmt: skip
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def _number_words(n: int) -> str:
    """1..100 as words, hyphens as spaces ("twenty one"), the way the tokenizer sees them."""
    if n == 100:
        return "one hundred"
    if n < 20:
        return _UNITS[n]
    return f"{_TENS[n // 10]} {_UNITS[n % 10]}".strip()


def _quantity_phrases() -> dict[str, tuple[str, int]]:
    # "the"/possessives: count follows the noun's number ("the dog" = 1, "the dogs" = 2).
    determiners = ("this", "these", "those", "his", "her", "their", "its", "my", "your", "our", "each")
    phrases: dict[str, tuple[str, int]] = dict.fromkeys((*determiners, "every"), (_BY_NUMBER, 0))
    phrases["the"] = (_DEFINITE, 0)
    for n in range(1, MAX_COUNT + 1):
        phrases[_number_words(n)] = (_EXACT, n)
    phrases |= {
        "a": (_EXACT, 1), "an": (_EXACT, 1), "another": (_EXACT, 1), "a single": (_EXACT, 1),
        "a hundred": (_EXACT, 100), "both": (_EXACT, 2),
        "a dozen": (_EXACT, 12), "dozen": (_EXACT, 12), "half a dozen": (_EXACT, 6),
        "several": (_EXACT, FEW_COUNT), "a few": (_EXACT, FEW_COUNT), "few": (_EXACT, FEW_COUNT),
        "a pair of": (_PAIR, 2), "pair of": (_PAIR, 2), "a couple of": (_PAIR, 2), "couple of": (_PAIR, 2),
        "no": (_NONE, 0), "zero": (_NONE, 0),
    }  # fmt: skip
    for phrase in (
        "some", "many", "multiple", "numerous", "various", "lots of", "a lot of", "plenty of", "dozens of",
        "a group of", "a bunch of", "a herd of", "a flock of", "a pack of", "a crowd of", "a number of",
        "a pile of", "a stack of", "a row of", "a set of", "a collection of", "group of", "groups of",
    ):  # fmt: skip
        phrases[phrase] = (_EXACT, UNSPECIFIED_PLURAL_COUNT)
    return phrases


_MULTIWORD_BOUNDARIES: dict[str, str] = {
    phrase: kind for kind, phrases in _WORDS["multiword_boundaries"].items() for phrase in phrases
}

_BOUNDARY_WORDS: dict[str, str] = {word: kind for kind, words in _WORDS["boundary_words"].items() for word in words}

# Verbs end a noun phrase ("a dog sits on a mat"), except straight after a determiner, where the same words
# are nouns ("a watch", "a drink").
_VERBS = frozenset(_WORDS["verbs"])

# "-ing" words that are nouns, so they do not end a phrase.
_ING_NOUNS = frozenset(_WORDS["ing_nouns"])

# Words that can end a phrase without being a noun the detector failed to see: picture media ("a photo of"),
# positions, common adjectives, adverbs and pronouns.
_NON_NOUN_WORDS = frozenset(_WORDS["non_noun_words"])

# Synonyms onto a vocabulary name. Each group is matched against the vocabulary: when the canonical name is
# absent but another member is present (a VOC-style "tvmonitor" or "sofa"), the group maps onto that one.
_SYNONYMS: dict[str, tuple[str, ...]] = {name: tuple(words) for name, words in _WORDS["synonyms"].items()}

# Classes whose one detection is a pair, so "a pair of" asks for one of them.
_PAIR_CLASSES = frozenset(_WORDS["pair_classes"])

# Nouns an open-vocabulary parse still reports as unknown: masses, materials, places, weather, media and
# styles, which no detector counts ("a fox in the snow" asks for one fox, not one snow).
_UNCOUNTABLE_NOUNS = frozenset(_WORDS["uncountable_nouns"])

_SINGULAR_OVERRIDES: dict[str, str] = _WORDS["singular_overrides"]
# inflect strips the "s" of these singulars ("bus" -> "bu"), so they are never singularised.
_ALREADY_SINGULAR = frozenset(_WORDS["already_singular"])
_ALREADY_SINGULAR_SUFFIXES = ("ss", "us", "is", "ics")

_WORD_PATTERN = re.compile(r"'s\b|[^\W_]+|[,.;:!?()\[\]{}/|&+]")
_INNER_APOSTROPHE = re.compile(r"(?<=[^\W_])'(?!s\b)(?=[^\W_])")
_SENTENCE_PUNCTUATION = frozenset(".;:!?()[]{}/|")


def _split_words(text: str) -> list[str]:
    """Lower-cased words and boundary punctuation; "&"/"+" read as "and", other punctuation as ","."""
    text = unicodedata.normalize("NFKC", text).casefold().replace("\u2019", "'")
    # "don't" -> "dont"; a possessive "'s" stays a token of its own, which ends the possessor's phrase.
    text = _INNER_APOSTROPHE.sub("", text)
    words = []
    for word in _WORD_PATTERN.findall(text):
        if word in ("&", "+"):
            word = "and"
        elif word in _SENTENCE_PUNCTUATION:
            word = ","
        words.append(word)
    return words


@functools.lru_cache(maxsize=4096)
def _singular(word: str) -> str:
    if word in _SINGULAR_OVERRIDES:
        return _SINGULAR_OVERRIDES[word]
    if word in _ALREADY_SINGULAR or word.endswith(_ALREADY_SINGULAR_SUFFIXES) or len(word) < 3 or not word.isascii():
        return word
    singular = _inflect().singular_noun(word)
    return singular if isinstance(singular, str) and singular else word


def _looks_like_noun(word: str) -> bool:
    if len(word) < 2 or not word.isalpha() or word in _NON_NOUN_WORDS or word in _COLOR_WORDS:
        return False
    if len(word) > 5 and word.endswith("ly") and not word.endswith(("fly", "mily")):
        return False  # adverbs ("highly"), but not "butterfly" or "family"
    if len(word) > 4 and word.endswith("ed") and not word.endswith("eed"):
        return False  # participles ("detailed"), but not "sled" or "seed"
    return not (len(word) > 4 and word.endswith(("ous", "ful")))


def _plural_keys(key: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Plural spellings: inflect's, plus GenEval's naive one ("benchs", "skises"), which its prompts use."""
    # "glass of wine" inflects its first word; "teddy bear" its last.
    index = next((i - 1 for i, word in enumerate(key) if i > 0 and word in ("of", "in")), len(key) - 1)
    word = key[index]
    spellings = {_inflect().plural_noun(word) or word, word + ("es" if word.endswith("s") else "s")}
    return [(*key[:index], spelling, *key[index + 1 :]) for spelling in sorted(spellings) if spelling != word]


@dataclass(frozen=True)
class _Lexicon:
    entries: dict[tuple[str, ...], _Lexeme]
    longest: int
    class_names: frozenset[str]


def _base_entries() -> dict[tuple[str, ...], _Lexeme]:
    entries: dict[tuple[str, ...], _Lexeme] = {}
    for word, color in _COLOR_WORDS.items():
        entries[(word,)] = _Lexeme(_COLOR, color)
    for phrase, boundary in _MULTIWORD_BOUNDARIES.items():
        entries[tuple(phrase.split())] = _Lexeme(_BOUNDARY, boundary)
    for phrase, (mode, count) in _quantity_phrases().items():
        entries[tuple(phrase.split())] = _Lexeme(_QUANTITY, mode, count)
    for phrase, relation in _relation_phrases().items():
        entries[tuple(phrase.split())] = _Lexeme(_RELATION, relation)
    return entries


_BASE_ENTRIES = _base_entries()


@functools.lru_cache(maxsize=32)
def _lexicon(vocabulary: tuple[str, ...]) -> _Lexicon:
    names: dict[tuple[str, ...], str] = {}
    for name in vocabulary:
        if not isinstance(name, str):
            raise TypeError(f"vocabulary names must be strings, got {type(name).__name__}")
        key = tuple(word for word in _split_words(name) if word != ",")
        if key and key not in names:
            names[key] = name

    forms: dict[tuple[str, ...], _Lexeme] = {}

    def add(key: tuple[str, ...], class_name: str, plural: bool) -> None:
        # First writer wins, and vocabulary names are written first: a name the detector has beats a synonym.
        if key not in forms:
            color = _COLOR_WORDS.get(key[0]) if len(key) == 1 and not plural else None
            forms[key] = _Lexeme(_VOCAB, class_name, plural=plural, color=color)

    for key, name in names.items():
        add(key, name, plural=False)
    for key, name in names.items():
        for plural_key in _plural_keys(key):
            add(plural_key, name, plural=True)
    for canonical, synonyms in _SYNONYMS.items():
        member_keys = [tuple(member.split()) for member in (canonical, *synonyms)]
        present = [names[key] for key in member_keys if key in names]
        if not present:
            continue
        target = names.get(member_keys[0], present[0])
        for key in member_keys:
            if key not in names:
                add(key, target, plural=False)
                for plural_key in _plural_keys(key):
                    add(plural_key, target, plural=True)

    entries = {**_BASE_ENTRIES, **forms}
    return _Lexicon(entries, max(len(key) for key in entries), frozenset(names.values()))


def _vocabulary_key(vocabulary: Sequence[str] | Mapping[Any, str]) -> tuple[str, ...]:
    if vocabulary is COCO_CLASSES:
        return COCO_CLASSES
    if isinstance(vocabulary, str):
        raise TypeError("vocabulary must be a sequence of class names, not a single string")
    # Ultralytics models expose names as {index: name}; accept that shape directly.
    if isinstance(vocabulary, Mapping):
        return tuple(vocabulary[key] for key in sorted(vocabulary))
    return tuple(vocabulary)


# ---------------------------------------------------------------------------------------------------------
# Parser


@dataclass(frozen=True, slots=True)
class _Token:
    lexeme: _Lexeme
    words: tuple[str, ...]


def _tokenize(text: str, lexicon: _Lexicon) -> list[_Token]:
    words = _split_words(text)
    tokens: list[_Token] = []
    position = 0
    while position < len(words):
        for length in range(min(lexicon.longest, len(words) - position), 0, -1):
            key = tuple(words[position : position + length])
            lexeme = lexicon.entries.get(key)
            if lexeme is not None:
                tokens.append(_Token(lexeme, key))
                position += length
                break
        else:
            word = words[position]
            tokens.append(_Token(_classify_word(word), (word,)))
            position += 1
    return tokens


def _classify_word(word: str) -> _Lexeme:
    if word.isdigit():
        # Long digit strings are capped before int() so huge numbers cost nothing.
        count = min(int(word), MAX_COUNT) if len(word) <= 6 else MAX_COUNT
        return _Lexeme(_QUANTITY, _EXACT, count) if count > 0 else _Lexeme(_QUANTITY, _NONE, 0)
    if word in _BOUNDARY_WORDS:
        return _Lexeme(_BOUNDARY, _BOUNDARY_WORDS[word])
    if word in _VERBS or (len(word) > 5 and word.endswith("ing") and word not in _ING_NOUNS):
        return _Lexeme(_VERBISH, word)
    return _Lexeme(_WORD, word)


@dataclass
class _Phrase:
    mode: str | None = None
    count: int = 0
    negated: bool = False
    tokens: list[_Token] = field(default_factory=list)


@dataclass
class _DraftObject:
    class_name: str
    count: int
    color: str | None
    relation: Relation | None = None
    attributes: tuple[str, ...] = ()

    def spec(self) -> ObjectSpec:
        return ObjectSpec(self.class_name, self.count, self.color, self.relation, self.attributes)


class _PromptParser:
    def __init__(self, lexicon: _Lexicon, open_vocabulary: bool = False) -> None:
        self.lexicon = lexicon
        self.open_vocabulary = open_vocabulary
        self.objects: list[_DraftObject] = []
        self.exclude: list[ObjectSpec] = []
        self.unknown: list[str] = []
        self.phrase = _Phrase()
        self.last_object: int | None = None  # the noun phrase a following relation is about
        self.pending_relation: tuple[str, int | None] | None = None

    def parse(self, text: str) -> None:
        for token in _tokenize(text, self.lexicon):
            lexeme = token.lexeme
            if lexeme.kind == _QUANTITY:
                self._quantity(lexeme)
            elif lexeme.kind == _RELATION:
                self._close()
                self.pending_relation = (lexeme.value, self.last_object)
            elif lexeme.kind == _BOUNDARY:
                self._boundary(lexeme.value)
            elif lexeme.kind == _VERBISH:
                if self.phrase.mode is not None and not self.phrase.tokens:
                    # Straight after a determiner a verb form is a noun ("a watch", "a drink").
                    self.phrase.tokens.append(_Token(_Lexeme(_WORD, lexeme.value), token.words))
                else:
                    self._close()
            elif self._past_verb_after_noun(token):
                # "two drums added rhythm": an -ed word after the phrase's noun is a verb, not a modifier (those
                # come before the noun), so the noun phrase ends at the noun.
                self._close()
            else:
                self.phrase.tokens.append(token)
        self._close()

    def _past_verb_after_noun(self, token: _Token) -> bool:
        word = token.lexeme.value
        return (
            token.lexeme.kind == _WORD
            and len(word) > 4
            and word.endswith("ed")
            and not word.endswith(("eed", "bed", "sled", "shed", "hundred"))
            and any(
                earlier.lexeme.kind == _VOCAB
                or (earlier.lexeme.kind == _WORD and _looks_like_noun(earlier.lexeme.value))
                for earlier in self.phrase.tokens
            )
        )

    def _quantity(self, lexeme: _Lexeme) -> None:
        if self.phrase.tokens:
            self._close()
        phrase = self.phrase
        # "the two dogs": a number after a determiner refines it; "the" after a number does not.
        if lexeme.value not in (_BY_NUMBER, _DEFINITE) or phrase.mode is None:
            phrase.mode, phrase.count = lexeme.value, lexeme.count

    def _boundary(self, kind: str) -> None:
        closed = self._close()
        if kind == _NEGATION:
            self.phrase.negated = True
        elif kind == _CONJUNCTION and closed is not None and self._modifiers_only(closed):
            # "three black and white cats": the quantity belongs to the phrase after "and".
            self.phrase = _Phrase(closed.mode, closed.count, closed.negated)

    @staticmethod
    def _modifiers_only(phrase: _Phrase) -> bool:
        return (
            phrase.mode is not None
            and bool(phrase.tokens)
            and all(
                token.lexeme.kind == _COLOR or (token.lexeme.kind == _WORD and not _looks_like_noun(token.lexeme.value))
                for token in phrase.tokens
            )
        )

    def _close(self) -> _Phrase | None:
        phrase, self.phrase = self.phrase, _Phrase()
        if not phrase.tokens:
            return None
        head = self._head(phrase.tokens)
        if head is None:
            noun_index = self._last_noun(phrase.tokens)
            if noun_index is None:
                return phrase
            noun = phrase.tokens[noun_index].lexeme.value
            singular = _singular(noun)
            if not (self.open_vocabulary and self._countable(phrase, noun, singular)):
                if singular not in self.unknown:
                    self.unknown.append(singular)
                self._noun_phrase_done(None)
                return phrase
            # Named and counted like a vocabulary word: plural when singularising changed it.
            head, head_lexeme = noun_index, _Lexeme(_VOCAB, singular, plural=singular != noun)
        else:
            head_lexeme = phrase.tokens[head].lexeme
        color_index = self._color_before(phrase.tokens, head)
        color = None
        if color_index is not None:
            color_lexeme = phrase.tokens[color_index].lexeme
            color = color_lexeme.value if color_lexeme.kind == _COLOR else color_lexeme.color
        attributes = self._attributes(phrase.tokens, head, color_index) if self.open_vocabulary else ()
        count = self._count(phrase, head_lexeme)
        earlier = self._mentioned(head_lexeme.value, count, color) if phrase.mode == _DEFINITE else None
        if phrase.negated or phrase.mode == _NONE:
            spec = ObjectSpec(head_lexeme.value, 1, color, attributes=attributes)
            if spec not in self.exclude:
                self.exclude.append(spec)
            self._noun_phrase_done(None)
        elif earlier is not None:
            # "a bear above a clock and a dog below the clock": one clock, the target of both relations.
            self._noun_phrase_done(earlier)
        else:
            self.objects.append(_DraftObject(head_lexeme.value, count, color, attributes=attributes))
            self._noun_phrase_done(len(self.objects) - 1)
        return phrase

    @staticmethod
    def _countable(phrase: _Phrase, noun: str, singular: str) -> bool:
        """Whether an open-vocabulary head names things to count (see the conventions at the top)."""
        if singular in _UNCOUNTABLE_NOUNS or noun in _UNCOUNTABLE_NOUNS:
            return False
        # Without a quantifier only a plural counts: a bare singular is a mass or a name ("coffee", "Paris").
        return phrase.mode is not None or singular != noun

    def _mentioned(self, class_name: str, count: int, color: str | None) -> int | None:
        """The latest object of this class and count whose colour does not contradict `color`."""
        # An object is never the target of its own relation ("a dog next to the dog" names two dogs).
        source = self.pending_relation[1] if self.pending_relation is not None else None
        for index in range(len(self.objects) - 1, -1, -1):
            earlier = self.objects[index]
            if (
                index != source
                and earlier.class_name == class_name
                and earlier.count == count
                and (color is None or earlier.color in (None, color))
            ):
                return index
        return None

    def _noun_phrase_done(self, object_index: int | None) -> None:
        if self.pending_relation is not None:
            relation, source = self.pending_relation
            if source is not None and object_index is not None and not self._depends_on(object_index, source):
                self.objects[source].relation = Relation(relation, object_index)
            self.pending_relation = None
        self.last_object = object_index

    def _depends_on(self, start: int, other: int) -> bool:
        """Whether `start` is `other` or placed relative to it, directly or through a chain of relations."""
        # Relating `other` to such an object would make a cycle ("a dog left of a cat, the cat right of the
        # dog"), which no targets-first order can express; the reverse relation is already implied.
        node: int | None = start
        for _ in range(len(self.objects) + 1):
            if node is None:
                return False
            if node == other:
                return True
            relation = self.objects[node].relation
            node = relation.target if relation is not None else None
        return True

    @staticmethod
    def _head(tokens: list[_Token]) -> int | None:
        """The longest vocabulary match; on ties the last one, as English heads come last ("a dog bed")."""
        best: int | None = None
        for index, token in enumerate(tokens):
            lexeme = token.lexeme
            if lexeme.kind != _VOCAB:
                continue
            if lexeme.color is not None and index < len(tokens) - 1:
                continue  # "an orange cat": a colour word before more words is an adjective
            if best is None or len(token.words) >= len(tokens[best].words):
                best = index
        return best

    @staticmethod
    def _last_noun(tokens: list[_Token]) -> int | None:
        """The head of a phrase without a vocabulary word: its last word that looks like a noun."""
        for index in range(len(tokens) - 1, -1, -1):
            lexeme = tokens[index].lexeme
            if lexeme.kind == _WORD and _looks_like_noun(lexeme.value):
                return index
        return None

    @staticmethod
    def _color_before(tokens: list[_Token], head: int) -> int | None:
        """The index of the colour word nearest before the head, if any."""
        for index in range(head - 1, -1, -1):
            lexeme = tokens[index].lexeme
            if lexeme.kind == _COLOR or (lexeme.kind == _VOCAB and lexeme.color is not None):
                return index
        return None

    @staticmethod
    def _attributes(tokens: list[_Token], head: int, color_index: int | None) -> tuple[str, ...]:
        return tuple(" ".join(token.words) for index, token in enumerate(tokens[:head]) if index != color_index)

    @staticmethod
    def _count(phrase: _Phrase, head: _Lexeme) -> int:
        if phrase.mode == _EXACT:
            return phrase.count
        if phrase.mode == _PAIR:
            return 1 if head.value in _PAIR_CLASSES else phrase.count
        return UNSPECIFIED_PLURAL_COUNT if head.plural else 1


def parse_prompt(prompt: str, vocabulary: Sequence[str] = COCO_CLASSES, open_vocabulary: bool = False) -> ParsedPrompt:
    """Objects (class, count, colour, relation) a detector with `vocabulary` can check, plus unseen nouns.

    With open_vocabulary=True (a detector that takes text queries) a countable noun outside the vocabulary
    becomes an object too, named by its singular head noun, and every object carries its attributes."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    parser = _PromptParser(_lexicon(_vocabulary_key(vocabulary)), open_vocabulary)
    parser.parse(prompt[:MAX_PROMPT_CHARS])
    objects = tuple(draft.spec() for draft in parser.objects)
    return ParsedPrompt(prompt, objects, tuple(parser.unknown), tuple(parser.exclude))


# ---------------------------------------------------------------------------------------------------------
# GenEval metadata


def _targets_first(objects: Sequence[ObjectSpec]) -> list[int]:
    """Object indices reordered so each GenEval position target precedes the object placed relative to it."""

    def target(index: int) -> int | None:
        relation = objects[index].relation
        if relation is None or relation.relation not in GENEVAL_POSITIONS:
            return None
        if relation.target >= len(objects):
            raise ValueError(f"object {index} is positioned relative to missing object {relation.target}")
        return relation.target

    order: list[int] = []
    placed: set[int] = set()
    for start in range(len(objects)):
        # Each object has at most one target, so its dependencies form a chain; walk it iteratively so a
        # long chain cannot exhaust the recursion limit.
        chain: list[int] = []
        node: int | None = start
        while node is not None and node not in placed:
            if node in chain:
                raise ValueError("object relations form a cycle; GenEval positions need an acyclic order")
            chain.append(node)
            node = target(node)
        for node in reversed(chain):
            placed.add(node)
            order.append(node)
    return order


def to_geneval_metadata(prompt: str | ParsedPrompt, vocabulary: Sequence[str] = COCO_CLASSES) -> dict:
    """GenEval {"include": [...], "exclude": [...]} for a prompt, classes named as GenEval names them ("tv remote");
    "exclude" only when there is one."""
    parsed = prompt if isinstance(prompt, ParsedPrompt) else parse_prompt(prompt, vocabulary)
    order = _targets_first(parsed.objects)
    new_index = {old: new for new, old in enumerate(order)}
    include: list[dict[str, Any]] = []
    for old in order:
        spec = parsed.objects[old]
        entry: dict[str, Any] = {"class": geneval_name(spec.class_name), "count": spec.count}
        if spec.color is not None:
            entry["color"] = spec.color
        if spec.relation is not None and spec.relation.relation in GENEVAL_POSITIONS:
            entry["position"] = [spec.relation.relation, new_index[spec.relation.target]]
        include.append(entry)

    excluded: dict[str, int] = {}
    for spec in parsed.exclude:
        # GenEval excludes are per class; a colour-specific absence ("no red cars") cannot be expressed.
        if spec.color is None:
            excluded[spec.class_name] = min(spec.count, excluded.get(spec.class_name, spec.count))
    mentions: dict[str, list[ObjectSpec]] = {}
    for spec in parsed.objects:
        mentions.setdefault(spec.class_name, []).append(spec)
    for class_name, specs in mentions.items():
        # GenEval's counting check: "n Xs" also fails with n + 1 or more. Only for a single mention, since
        # "a red dog and a blue dog" is not a counting prompt.
        if len(specs) == 1 and specs[0].count > 1:
            limit = specs[0].count + 1
            excluded[class_name] = min(limit, excluded.get(class_name, limit))

    metadata: dict[str, Any] = {"include": include}
    if excluded:
        metadata["exclude"] = [{"class": geneval_name(name), "count": count} for name, count in excluded.items()]
    return metadata


_INCLUDE_KEYS = frozenset(("class", "count", "color", "position"))
_EXCLUDE_KEYS = frozenset(("class", "count"))


def _metadata_class(entry: Mapping, where: str) -> str:
    name = entry.get("class")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}: 'class' must be a non-empty string")
    if len(name) > MAX_CLASS_NAME_CHARS:
        raise ValueError(f"{where}: 'class' is longer than {MAX_CLASS_NAME_CHARS} characters")
    return name


def _metadata_count(entry: Mapping, where: str, limit: int) -> int:
    count = entry.get("count", 1)
    # bool is an int subclass; true/false in JSON is a client bug, not a count.
    if isinstance(count, bool) or not isinstance(count, int):
        raise ValueError(f"{where}: 'count' must be an integer, got {type(count).__name__}")
    if not 1 <= count <= limit:
        raise ValueError(f"{where}: 'count' must be between 1 and {limit}, got {count}")
    return count


def _metadata_color(entry: Mapping, where: str) -> str | None:
    if "color" not in entry:
        return None
    color = entry["color"]
    if not isinstance(color, str) or color.strip().lower() not in _COLOR_WORDS:
        raise ValueError(f"{where}: 'color' must be one of {', '.join(COLORS)}, got {color!r}")
    return _COLOR_WORDS[color.strip().lower()]


def _metadata_position(entry: Mapping, where: str, index: int) -> tuple[str, int] | None:
    if "position" not in entry:
        return None
    position = entry["position"]
    if not isinstance(position, (list, tuple)) or len(position) != 2:
        raise ValueError(f"{where}: 'position' must be a [relation, target index] pair")
    relation, target = position
    if not isinstance(relation, str) or relation not in RELATIONS:
        raise ValueError(f"{where}: relation must be one of {', '.join(RELATIONS)}, not {relation!r}")
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < index:
        # GenEval evaluates includes in order, so a target has to be an earlier include.
        raise ValueError(f"{where}: position target must be the index of an earlier include, got {target!r}")
    return relation, target


def _entry_list(metadata: Mapping, key: str, required: bool) -> list:
    if key not in metadata:
        if required:
            raise ValueError(f"metadata needs an {key!r} list")
        return []
    entries = metadata[key]
    if not isinstance(entries, (list, tuple)):
        raise ValueError(f"metadata {key!r} must be a list, got {type(entries).__name__}")
    return list(entries)


def _checked_entry(entry: Any, where: str, allowed: frozenset[str]) -> Mapping:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be an object, got {type(entry).__name__}")
    extra = sorted(str(name) for name in entry if name not in allowed)
    if extra:
        raise ValueError(f"{where} has unsupported keys: {', '.join(extra)}")
    return entry


def from_geneval_metadata(
    metadata: Mapping, vocabulary: Sequence[str] = COCO_CLASSES, open_vocabulary: bool = False
) -> ParsedPrompt:
    """The ParsedPrompt for GenEval metadata (include order kept); ValueError on malformed metadata.

    A class outside the vocabulary is reported unknown, or with open_vocabulary=True kept as an object (or
    exclude) named by that class, its last word singular ("dragons" is "dragon")."""
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata must be an object, got {type(metadata).__name__}")
    prompt = metadata.get("prompt", "")
    if not isinstance(prompt, str):
        raise ValueError(f"metadata 'prompt' must be a string, got {type(prompt).__name__}")
    include = _entry_list(metadata, "include", required=True)
    exclude = _entry_list(metadata, "exclude", required=False)
    # Checked before anything iterates the lists, so an oversized request costs nothing.
    if len(include) + len(exclude) > MAX_METADATA_ENTRIES:
        raise ValueError(f"metadata has more than {MAX_METADATA_ENTRIES} include/exclude entries")

    lexicon = _lexicon(_vocabulary_key(vocabulary))
    unknown: list[str] = []

    def resolve(name: str, where: str) -> str | None:
        if name in lexicon.class_names:
            return name
        if _FROM_GENEVAL_NAME.get(name) in lexicon.class_names:  # GenEval's own spelling ("tv remote")
            return _FROM_GENEVAL_NAME[name]
        key = tuple(word for word in _split_words(name) if word != ",")
        if not key:
            raise ValueError(f"{where}: 'class' {name!r} contains no word")
        lexeme = lexicon.entries.get(key)
        if lexeme is not None and lexeme.kind == _VOCAB:
            return lexeme.value
        noun = " ".join((*key[:-1], _singular(key[-1])))
        if open_vocabulary:
            return noun
        if noun not in unknown:
            unknown.append(noun)
        return None

    drafts: list[_DraftObject] = []
    object_index: list[int | None] = []  # include index -> object index (None: the detector cannot see it)
    for index, raw in enumerate(include):
        where = f"include[{index}]"
        entry = _checked_entry(raw, where, _INCLUDE_KEYS)
        name = _metadata_class(entry, where)
        count = _metadata_count(entry, where, MAX_COUNT)
        color = _metadata_color(entry, where)
        position = _metadata_position(entry, where, index)
        class_name = resolve(name, where)
        if class_name is None:
            object_index.append(None)
            continue
        relation = None
        if position is not None and object_index[position[1]] is not None:
            relation = Relation(position[0], object_index[position[1]])
        drafts.append(_DraftObject(class_name, count, color, relation))
        object_index.append(len(drafts) - 1)

    excluded: list[ObjectSpec] = []
    for index, raw in enumerate(exclude):
        where = f"exclude[{index}]"
        entry = _checked_entry(raw, where, _EXCLUDE_KEYS)
        name = _metadata_class(entry, where)
        # The counting exclude for MAX_COUNT objects is MAX_COUNT + 1.
        count = _metadata_count(entry, where, MAX_COUNT + 1)
        class_name = resolve(name, where)
        if class_name is not None:
            excluded.append(ObjectSpec(class_name, count))

    objects = tuple(draft.spec() for draft in drafts)
    return ParsedPrompt(prompt, objects, tuple(unknown), tuple(excluded))
