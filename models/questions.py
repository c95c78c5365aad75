"""LLM-written VQA questions (TIFA's question generation): a causal language model continues a versioned few-shot
prompt with yes/no questions and their expected answers; the lines are parsed, validated and cached per prompt."""

from __future__ import annotations

import copy
import functools
import logging
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .hf import PRECISION, choose_device, choose_dtype, load_pretrained, resolve_model
from .prompt import parse_prompt

log = logging.getLogger(__name__)

# TIFA's element types as AGFSync's question prompt lists them.
QUESTION_TYPES = (
    "object", "human", "animal", "food", "activity", "attribute", "counting", "color", "material", "spatial",
    "location", "shape", "other",
)  # fmt: skip
EXPECTED_ANSWERS = ("yes", "no")

# Few-shot prompts for a base (not chat) causal LM, by version: a reward's version names the one it used, so a
# changed prompt is a new version, never an edit. Each ends with "Q:", so the model's continuation starts with
# the first question; an example ends with a blank line, where generation stops. Line format:
#   Q: <yes/no question> | A: <yes|no> | type: <one of QUESTION_TYPES>
QUESTION_PROMPTS: dict[str, str] = {
    "v1": """\
Write yes/no questions that check whether an image matches its description. Ask only about what the description \
states: its objects, people and animals, their number, colours, materials, shapes, actions and positions; never \
about anything it does not mention. The expected answer is yes, or no for something the description says is \
absent. One question per line, as: Q: question | A: yes or no | type: object, human, animal, food, activity, \
attribute, counting, color, material, spatial, location, shape or other.

Description: two red apples on a wooden table
Q: Are there apples? | A: yes | type: food
Q: Are there two apples? | A: yes | type: counting
Q: Are the apples red? | A: yes | type: color
Q: Is there a table? | A: yes | type: object
Q: Is the table wooden? | A: yes | type: material
Q: Are the apples on the table? | A: yes | type: spatial

Description: a woman riding a horse on a beach
Q: Is there a woman? | A: yes | type: human
Q: Is there a horse? | A: yes | type: animal
Q: Is the woman riding the horse? | A: yes | type: activity
Q: Is this on a beach? | A: yes | type: location

Description: a bowl with no peaches
Q: Is there a bowl? | A: yes | type: object
Q: Are there peaches? | A: no | type: object

Description: {prompt}
Q:""",
}
DEFAULT_PROMPT_VERSION = "v1"

# A yes/no question starts with one of these.
AUXILIARIES = frozenset(
    "is are was were am does do did can could will would should shall may might must has have had".split()
)
MIN_QUESTION_WORDS = 3
MAX_QUESTION_WORDS = 24
MAX_QUESTION_CHARS = 200
# Words that say nothing about the prompt's content, so a question sharing only these with the prompt is off
# topic: function words, numbers, positions and words about the image itself.
STOPWORDS = AUXILIARIES | frozenset(
    """
    a an the this that these those there here it its they them their he she his her him we you i me my your our
    some any each every all both no not none nothing other another same such only also very more most than as
    of on in at to from by with without for about into onto over under above below near next beside behind
    between among across along around against through left right top bottom front back side middle center
    centre inside outside up down off out away together
    what which who whom whose where when why how and or but nor if so then being been be
    image picture photo photograph scene view shown show shows showing visible depicted appear appears present
    zero one two three four five six seven eight nine ten eleven twelve first second third many few several
    """.split()
)

# The line format; lenient about spacing and case (a word-level tokenizer decodes "q : is there a dog ?"), and the
# type is optional.
_LINE = re.compile(
    r"^\s*q\s*:\s*(?P<question>[^|]+?)\s*\|\s*a\s*:\s*(?P<answer>[^|]*?)\s*(?:\|\s*type\s*:\s*(?P<type>[^|]*?)\s*)?$",
    re.IGNORECASE,
)
_END_OF_EXAMPLE = re.compile(r"\n\s*\n|\n\s*description\s*:", re.IGNORECASE)
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([?.,!;:])")
_WORD = re.compile(r"[^\W\d_]+")


@dataclass(frozen=True)
class WrittenQuestion:
    """One kept question: its text, the answer the prompt implies ("yes" | "no") and its TIFA element type."""

    text: str
    expected: str
    element: str


@dataclass(frozen=True)
class DroppedLine:
    """A generated line that was not kept, and why (a reason code: see select_questions)."""

    line: str
    reason: str


@dataclass(frozen=True)
class WrittenQuestions:
    """What the writer made of one prompt. failure says why there is no question (the caller falls back):
    "prompt_too_long", "no_valid_question" or "generation_failed: <error>"; None when questions were kept."""

    prompt: str
    questions: tuple[WrittenQuestion, ...]
    dropped: tuple[DroppedLine, ...] = ()
    failure: str | None = None
    text: str = ""  # the model's raw continuation, for inspection

    def dropped_reasons(self) -> dict[str, int]:
        return dict(Counter(line.reason for line in self.dropped))


def _tidy(question: str) -> str:
    """One line, no space before punctuation, first letter capitalised: "is there a dog ?" -> "Is there a dog?"."""
    text = _SPACE_BEFORE_PUNCTUATION.sub(r"\1", " ".join(question.split()))
    return text[:1].upper() + text[1:]


def _parse_line(line: str) -> tuple[str, str, str] | None:
    match = _LINE.match(line)
    if match is None:
        return None
    question = _tidy(match["question"])
    answer = match["answer"].strip().casefold().rstrip(".")
    element = " ".join((match["type"] or "other").split()).casefold().rstrip(".")
    return (question, answer, element) if question else None


def _question_lines(text: str) -> list[str]:
    """The non-blank lines of a continuation, up to the end of its example (a blank line or a new description)."""
    end = _END_OF_EXAMPLE.search(text.lstrip("\n"))
    body = text.lstrip("\n")[: end.start() if end else None]
    return [line for line in body.splitlines() if line.strip()]


def parse_questions(text: str) -> list[tuple[str, str, str]]:
    """(question, expected answer, type) of every line in the format (see QUESTION_PROMPTS), in order, up to the end
    of the example; lower-cased answer and type (type "other" when absent). Lines in another format are skipped.
    `text` is the whole answer, starting with the first "Q:" (the prompt's last line)."""
    return [parsed for line in _question_lines(text) if (parsed := _parse_line(line)) is not None]


@functools.lru_cache(maxsize=4096)
def content_words(text: str) -> frozenset[str]:
    """What a text is about: its words outside STOPWORDS (lower case), plus the singular nouns and class names of
    its open-vocabulary parse ("two puppies" -> {"puppies", "dog"}; "no peaches" -> {"peaches", "peach"})."""
    words = {word for word in _WORD.findall(text.casefold()) if word not in STOPWORDS and len(word) > 1}
    parsed = parse_prompt(text, open_vocabulary=True)
    nouns = {spec.class_name for spec in (*parsed.objects, *parsed.exclude)} | set(parsed.unknown)
    return frozenset(words | nouns)


def validate(question: str, prompt: str) -> str | None:
    """None when `question` is a well-formed yes/no question about `prompt`'s content, else the reason code:
    "not_a_question" (no final "?"), "not_yes_no" (does not start with an auxiliary: is, are, does, can, ...),
    "too_short" (under MIN_QUESTION_WORDS words), "too_long" (over MAX_QUESTION_WORDS words or MAX_QUESTION_CHARS
    characters), "off_topic" (no content word in common with the prompt, see content_words)."""
    words = question.split()
    if not question.endswith("?"):
        return "not_a_question"
    if not words or words[0].casefold() not in AUXILIARIES:
        return "not_yes_no"
    if len(words) < MIN_QUESTION_WORDS:
        return "too_short"
    if len(words) > MAX_QUESTION_WORDS or len(question) > MAX_QUESTION_CHARS:
        return "too_long"
    if not content_words(question) & content_words(prompt):
        return "off_topic"
    return None


def select_questions(text: str, prompt: str, max_questions: int) -> tuple[list[WrittenQuestion], list[DroppedLine]]:
    """The questions kept from a continuation, in order, and the lines dropped with their reason: "malformed"
    (not in the line format), "answer_not_yes_no", validate()'s reasons, "duplicate" (same text up to case and
    spacing as a kept one) and "over_limit" (after max_questions were kept). A type outside QUESTION_TYPES is kept
    as "other": it labels the question, it does not change its score."""
    kept: list[WrittenQuestion] = []
    dropped: list[DroppedLine] = []
    seen: set[str] = set()
    for line in _question_lines(text):
        parsed = _parse_line(line)
        if parsed is None:
            dropped.append(DroppedLine(line.strip(), "malformed"))
            continue
        question, answer, element = parsed
        key = " ".join(question.casefold().split())
        reason = "answer_not_yes_no" if answer not in EXPECTED_ANSWERS else validate(question, prompt)
        if reason is None and key in seen:
            reason = "duplicate"
        if reason is None and len(kept) >= max_questions:
            reason = "over_limit"
        if reason is not None:
            dropped.append(DroppedLine(line.strip(), reason))
            continue
        seen.add(key)
        kept.append(WrittenQuestion(question, answer, element if element in QUESTION_TYPES else "other"))
    return kept, dropped


class _EndOfQuestions:
    """Stops a row once its continuation has ended its example (a blank line or a new "Description:"), so a
    batch does not run to max_new_tokens on rows that are done. input_ids [B, T] -> done [B]."""

    def __init__(self, tokenizer: Any, prompt_length: int) -> None:
        self.tokenizer, self.prompt_length = tokenizer, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        done = [_END_OF_EXAMPLE.search(text.lstrip("\n")) is not None for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def split_prompt(template: str) -> tuple[str, str]:
    """A few-shot prompt -> (the part every prompt shares, the rest with "{prompt}"). The cut falls before the
    whitespace that precedes the line holding {prompt}, where a word-then-newline boundary tokenizes the same
    apart as together (GPT-2 and Qwen style pre-tokenizers split there anyway)."""
    head = template[: template.index("{prompt}")]
    cut = len(head[: head.rfind("\n") + 1].rstrip())
    return template[:cut], template[cut:]


class LlmQuestionWriter:
    """A causal LM that writes yes/no questions with expected answers for prompts: [N] prompts -> [N]
    WrittenQuestions. Greedy decoding, batched over the distinct uncached prompts; results are cached per prompt
    (bounded LRU: RL scores each prompt many times). One generation at a time per model: endpoints run in
    threads, and a fast tokenizer is not re-entrant.

    The few-shot prefix every prompt shares is run once and its key/value cache reused: a row is [prefix |
    padding | "Description: {prompt}" ...], the padding masked out and the positions counted from the attention
    mask, so each prompt costs its own few tokens plus the new ones, not the whole few-shot prompt again."""

    def __init__(
        self,
        model: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int = 16,
        max_new_tokens: int = 128,
        max_questions: int = 8,
        cache_size: int = 4096,
        prompt_version: str = DEFAULT_PROMPT_VERSION,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        if prompt_version not in QUESTION_PROMPTS:
            raise ValueError(f"prompt_version must be one of {', '.join(QUESTION_PROMPTS)}, got {prompt_version!r}")
        if max_new_tokens < 1 or max_questions < 1:
            raise ValueError("max_new_tokens and max_questions must be at least 1")
        self.source = resolve_model(model)
        self.device = choose_device(device)
        self.dtype = choose_dtype(dtype, self.device)
        self.batch_size, self.max_new_tokens, self.max_questions = max(1, batch_size), max_new_tokens, max_questions
        self.cache_size, self.prompt_version = cache_size, prompt_version
        self.prefix, self.suffix = split_prompt(QUESTION_PROMPTS[prompt_version])
        self.tokenizer = load_pretrained(AutoTokenizer, self.source)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model = load_pretrained(AutoModelForCausalLM, self.source, self.device, dtype=self.dtype)
        # A fresh config, not the checkpoint's generation_config.json: its sampling settings must not leak in.
        self.generation_config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id,
        )
        self.prefix_ids = self._prefix_ids()
        self.context = getattr(self.model.config, "max_position_embeddings", None)
        needed = len(self.prefix_ids) + len(self._suffix_ids("")) + max_new_tokens
        if self.context is not None and needed > self.context:
            raise ValueError(
                f"question model {self.source.name} reads at most {self.context} tokens; the {prompt_version} "
                f"question prompt takes {needed - max_new_tokens} and max_new_tokens {max_new_tokens}: lower "
                "max_new_tokens or use a model with a longer context"
            )
        self._prefix_cache: Any = None  # the prefix's key/value cache, computed on first use
        self._cache_key = "cache"  # generate()'s name for it: "cache" (transformers >= 5.2x) or "past_key_values"
        self._cache: OrderedDict[str, WrittenQuestions] = OrderedDict()
        self._lock = threading.Lock()
        self._inference = threading.Lock()
        self.hits = self.misses = self.generate_calls = self.generated_prompts = self.failures = 0

    def _prefix_ids(self) -> list[int]:
        """The shared prefix's token ids, after the special tokens the tokenizer puts first (a BOS), never with
        the ones it puts last (an EOS or SEP would end the text)."""
        bare = self.tokenizer(self.prefix, add_special_tokens=False)["input_ids"]
        marked = self.tokenizer(self.prefix)["input_ids"]
        for start in range(len(marked) - len(bare) + 1):
            if marked[start : start + len(bare)] == bare:
                return marked[:start] + bare
        return bare

    def _suffix_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(self.suffix.format(prompt=prompt), add_special_tokens=False)["input_ids"]

    @property
    def version(self) -> str:
        return f"{self.source.version}/{self.prompt_version}"

    def cache_stats(self) -> dict[str, Any]:
        """Lookups count distinct prompts per generate() call: a hit was cached, a miss was written."""
        with self._lock:
            lookups = self.hits + self.misses
            return {
                "size": self.cache_size,
                "entries": len(self._cache),
                "lookups": lookups,
                "hits": self.hits,
                "misses": self.misses,
                "hit_rate": self.hits / lookups if lookups else None,
                "generate_calls": self.generate_calls,
                "generated_prompts": self.generated_prompts,
                "failures": self.failures,
            }

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.source.describe(),
            "version": self.version,
            "prompt_version": self.prompt_version,
            "decoding": "greedy",
            "batch_size": self.batch_size,
            "max_new_tokens": self.max_new_tokens,
            "max_questions": self.max_questions,
            "prefix_tokens": len(self.prefix_ids),
            "device": str(self.device),
            "precision": PRECISION[self.dtype],
            "cache": self.cache_stats(),
        }

    def generate(self, prompts: Sequence[str]) -> list[WrittenQuestions]:
        """Questions for each prompt (whitespace-normalised; equal prompts share one result). A generation error
        is not cached: the prompts of that batch get failure "generation_failed: ..." and are retried next time."""
        keys = [" ".join(prompt.split()) for prompt in prompts]
        with self._lock:
            known = {key: self._cache[key] for key in dict.fromkeys(keys) if key in self._cache}
            for key in known:
                self._cache.move_to_end(key)
            missing = [key for key in dict.fromkeys(keys) if key not in known]
            self.hits += len(known)
            self.misses += len(missing)
        fresh, failed = self._write(missing) if missing else ({}, {})
        with self._lock:
            self.failures += sum(result.failure is not None for result in (*fresh.values(), *failed.values()))
            if self.cache_size > 0:
                self._cache.update(fresh)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        results = {**known, **fresh, **failed}
        return [results[key] for key in keys]

    def _write(self, prompts: list[str]) -> tuple[dict[str, WrittenQuestions], dict[str, WrittenQuestions]]:
        """Distinct prompts -> (results to cache, generation failures not to cache)."""
        suffixes = {prompt: self._suffix_ids(prompt) for prompt in prompts}
        fresh: dict[str, WrittenQuestions] = {}
        for prompt, ids in suffixes.items():
            if self.context is not None and len(self.prefix_ids) + len(ids) + self.max_new_tokens > self.context:
                fresh[prompt] = WrittenQuestions(prompt, (), failure="prompt_too_long")
        ordered = sorted((p for p in prompts if p not in fresh), key=lambda p: -len(suffixes[p]))  # less padding
        failed: dict[str, WrittenQuestions] = {}
        for start in range(0, len(ordered), self.batch_size):
            batch = ordered[start : start + self.batch_size]
            try:
                continuations = self._continue([suffixes[prompt] for prompt in batch])
            except Exception as exc:  # any model failure: these items fall back to template questions
                log.warning("question generation failed for %d prompts: %s", len(batch), exc, exc_info=True)
                reason = f"generation_failed: {type(exc).__name__}: {exc}"[:300]
                failed.update({prompt: WrittenQuestions(prompt, (), failure=reason) for prompt in batch})
                continue
            for prompt, continuation in zip(batch, continuations, strict=True):
                text = "Q:" + continuation  # the prompt's last line starts the first question
                kept, dropped = select_questions(text, prompt, self.max_questions)
                failure = None if kept else "no_valid_question"
                fresh[prompt] = WrittenQuestions(prompt, tuple(kept), tuple(dropped), failure, continuation)
        return fresh, failed

    def _continue(self, suffixes: list[list[int]]) -> list[str]:
        """Token ids of the prompts' own parts [n][...] -> greedy continuations [n] (special tokens removed), one
        model.generate call after the shared prefix."""
        from transformers import StoppingCriteriaList

        with self._inference, torch.inference_mode():
            prefix = torch.tensor([self.prefix_ids], device=self.device)
            if self._prefix_cache is None:
                output = self.model(input_ids=prefix, use_cache=True)
                self._cache_key = "cache" if "cache" in output else "past_key_values"
                self._prefix_cache = output[self._cache_key]
            width = max(len(ids) for ids in suffixes)
            rows = torch.tensor([[self.tokenizer.pad_token_id] * (width - len(ids)) + ids for ids in suffixes])
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in suffixes])
            input_ids = torch.cat([prefix.expand(len(suffixes), -1), rows.to(self.device)], dim=1)
            attention_mask = torch.cat([torch.ones_like(input_ids[:, : prefix.shape[1]]), mask.to(self.device)], 1)
            past = copy.deepcopy(self._prefix_cache)  # generate() extends the cache it is given
            past.batch_repeat_interleave(len(suffixes))
            with self._lock:
                self.generate_calls += 1
                self.generated_prompts += len(suffixes)
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=self.generation_config,
                stopping_criteria=StoppingCriteriaList([_EndOfQuestions(self.tokenizer, input_ids.shape[1])]),
                **{self._cache_key: past},
            )
            return self.tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)


@functools.lru_cache(maxsize=4)
def load_question_writer(
    model: str,
    device: str,
    dtype: str,
    batch_size: int,
    max_new_tokens: int,
    max_questions: int,
    cache_size: int,
    prompt_version: str,
) -> LlmQuestionWriter:
    """One writer (model and cache) per configuration per process, shared by the rewards that use it."""
    return LlmQuestionWriter(
        model, device, dtype, batch_size, max_new_tokens, max_questions, cache_size, prompt_version
    )
