"""VQA reward (AGFSync's VQA score, questions as in TIFA): yes/no questions derived from the prompt's parsed
objects or written by a language model, answered by a vision-language model; the reward is the mean probability of
each question's expected answer ("yes" for template questions)."""

from __future__ import annotations

import functools
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .hf import (
    NORMALISATIONS,
    PRECISION,
    ModelSource,
    choose_device,
    choose_dtype,
    load_pretrained,
    model_class,
    resolve_model,
    single_token_id,
    yes_probability,
)
from .prompt import COCO_CLASSES, ObjectSpec, ParsedPrompt, from_geneval_metadata, parse_prompt
from .questions import DEFAULT_PROMPT_VERSION, LlmQuestionWriter, WrittenQuestions, load_question_writer
from .registry import RewardDeclaration, register_reward
from .types import RewardOutput, Sample, Unscorable, score_planned

DEFAULT_VQA_MODEL = "Salesforce/blip-vqa-base"
# Generative (BLIP-2 style) answerers read the next token after this text.
GENERATIVE_TEMPLATE = "Question: {question} Answer:"
RELATION_PHRASES = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
    "next to": "next to",
}
# Classes whose single object is a pair: "a pair of skis", not "a skis".
PAIR_NOUNS = {"skis": "pair of skis", "scissors": "pair of scissors"}
MAX_GIVEN_QUESTIONS = 64
MAX_QUESTION_CHARS = 500
QUESTION_KINDS = ("existence", "count", "color", "relation", "prompt", "given", "written")
QUESTION_SOURCES = ("template", "llm")


@dataclass(frozen=True)
class Question:
    """One yes/no question: its text, what it checks (QUESTION_KINDS), the class it asks about, the answer the
    prompt implies ("no" only for LLM-written questions about what the prompt says is absent) and, for written
    questions, the language model's TIFA element type (models/questions.py QUESTION_TYPES)."""

    text: str
    kind: str
    subject: str | None = None
    expected: str = "yes"
    element: str | None = None


@dataclass(frozen=True)
class _Plan:
    """What one sample is asked, and where the questions came from (details added with questions="llm")."""

    questions: list[Question]
    source: dict[str, Any]


@functools.cache
def _inflect() -> Any:
    import inflect

    return inflect.engine()


def _noun(class_name: str, plural: bool) -> str:
    if class_name in PAIR_NOUNS:
        phrase = PAIR_NOUNS[class_name]
        return phrase.replace("pair", "pairs", 1) if plural else phrase
    return _inflect().plural_noun(class_name) if plural else class_name


def _indefinite(phrase: str) -> str:
    return _inflect().a(phrase)


def _definite(class_name: str, count: int) -> tuple[str, str]:
    """("the dog", "Is") or ("the dogs", "Are")."""
    return f"the {_noun(class_name, count > 1)}", "Are" if count > 1 else "Is"


def _object_questions(objects: Sequence[ObjectSpec]) -> list[Question]:
    # The parser keeps each mention apart ("a man and a woman" is two person specs); existence and count
    # questions ask about the class total, colour and relation questions about each mention.
    totals: Counter[str] = Counter()
    mentions: Counter[str] = Counter()
    for spec in objects:
        totals[spec.class_name] += spec.count
        mentions[spec.class_name] += 1
    questions: list[Question] = []
    for class_name, total in totals.items():
        questions.append(Question(f"Is there {_indefinite(_noun(class_name, False))}?", "existence", class_name))
        if total > 1:
            words = _inflect().number_to_words(total)
            questions.append(Question(f"Are there {words} {_noun(class_name, True)}?", "count", class_name))
    for spec in objects:
        if spec.color:
            if mentions[spec.class_name] == 1:
                subject, verb = _definite(spec.class_name, spec.count)
                text = f"{verb} {subject} {spec.color}?"
            elif spec.count > 1:
                text = f"Are there {spec.color} {_noun(spec.class_name, True)}?"
            else:
                text = f"Is there {_indefinite(f'{spec.color} {spec.class_name}')}?"
            questions.append(Question(text, "color", spec.class_name))
        if spec.relation is not None and spec.relation.target < len(objects):
            target = objects[spec.relation.target]
            subject, verb = _definite(spec.class_name, spec.count)
            target_phrase, _ = _definite(target.class_name, target.count)
            phrase = RELATION_PHRASES[spec.relation.relation]
            questions.append(Question(f"{verb} {subject} {phrase} {target_phrase}?", "relation", spec.class_name))
    return questions


def prompt_question(prompt: str) -> Question | None:
    """ "Does this image show {prompt}?"; None when the prompt has no words."""
    text = " ".join(prompt.split()).rstrip(".!?;:, ")
    return Question(f"Does this image show {text}?", "prompt") if text else None


def generate_questions(
    prompt: str,
    parsed: ParsedPrompt | None = None,
    vocabulary: Sequence[str] = COCO_CLASSES,
    unknown_nouns: bool = False,
) -> list[Question]:
    """Yes/no questions for a prompt, no language model: existence per class ("Is there a dog?"), count when
    more than one ("Are there three dogs?"), colour ("Is the dog red?"), relation ("Is the dog to the left of
    the cat?"), existence of nouns outside the vocabulary when unknown_nouns, and the whole prompt ("Does this
    image show {prompt}?", always, so a prompt with no parseable object still gets one). Duplicates dropped."""
    parsed = parsed if parsed is not None else parse_prompt(prompt, vocabulary)
    questions = _object_questions(parsed.objects)
    if unknown_nouns:
        questions += [Question(f"Is there {_indefinite(noun)}?", "existence", noun) for noun in parsed.unknown]
    whole = prompt_question(prompt)
    if whole is not None:
        questions.append(whole)
    return list({question.text: question for question in questions}.values())


class _Answerer:
    """Shared by the answerers: token ids of the answers and one forward at a time per model (endpoints run
    in threads, and a fast tokenizer is not re-entrant)."""

    source: ModelSource
    device: torch.device
    dtype: torch.dtype
    yes_id: int
    no_id: int
    readout: str  # where P(yes) is read, for describe()

    def __init__(self) -> None:
        self._inference = threading.Lock()

    def logits(
        self, images: list[Image.Image], image_index: list[int], questions: list[str], batch_size: int
    ) -> torch.Tensor:
        """images [I]; image_index [Q] (which image each question asks about); questions [Q] -> logits [Q, V]
        of the first answer token."""
        with self._inference, torch.inference_mode():
            return self._logits(images, image_index, questions, batch_size)

    def _logits(
        self, images: list[Image.Image], image_index: list[int], questions: list[str], batch_size: int
    ) -> torch.Tensor:
        raise NotImplementedError


class BlipQuestionAnswerer(_Answerer):
    """BlipForQuestionAnswering: P(yes) from the answer decoder's first-token logits after its start token.
    The image is encoded once per image; questions of all images run through the text encoder in batches."""

    readout = "first token of the BLIP answer decoder"

    def __init__(self, source: ModelSource, device: torch.device, dtype: torch.dtype, model: Any) -> None:
        from transformers import AutoProcessor

        super().__init__()
        self.source, self.device, self.dtype = source, device, dtype
        self.processor = load_pretrained(AutoProcessor, source)
        self.tokenizer = self.processor.tokenizer
        self.model = load_pretrained(model, source, device, dtype=dtype)
        self.yes_id, self.no_id = single_token_id(self.tokenizer, " yes"), single_token_id(self.tokenizer, " no")

    def _logits(
        self, images: list[Image.Image], image_index: list[int], questions: list[str], batch_size: int
    ) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        image_embeds = self.model.vision_model(pixel_values=pixels).last_hidden_state  # [I, P, D]
        # Questions are batched only with questions of the same token length, so nothing is padded: BLIP's
        # text cross-attention in transformers 5.x drops encoder_attention_mask (BlipTextSelfAttention reads
        # an argument BlipTextAttention never passes), so the answer decoder would attend to padding.
        token_ids = self.tokenizer(questions)["input_ids"]
        by_length: dict[int, list[int]] = {}
        for position, ids in enumerate(token_ids):
            by_length.setdefault(len(ids), []).append(position)
        logits: list[torch.Tensor | None] = [None] * len(questions)
        for positions in by_length.values():
            for start in range(0, len(positions), batch_size):
                chunk = positions[start : start + batch_size]
                input_ids = torch.tensor([token_ids[p] for p in chunk], device=self.device)
                embeds = image_embeds[torch.tensor([image_index[p] for p in chunk], device=self.device)]
                question_embeds = self.model.text_encoder(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    encoder_hidden_states=embeds,
                    encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long, device=self.device),
                ).last_hidden_state
                start_ids = torch.full((len(chunk), 1), self.model.decoder_start_token_id, device=self.device)
                decoded = self.model.text_decoder(input_ids=start_ids, encoder_hidden_states=question_embeds)
                for position, row in zip(chunk, decoded.logits[:, 0].float().cpu(), strict=True):
                    logits[position] = row
        return torch.stack(logits)  # type: ignore[arg-type]


class GenerativeQuestionAnswerer(_Answerer):
    """Image-text-to-text models (BLIP-2 and the like): P(yes) from the next-token logits after
    GENERATIVE_TEMPLATE; decoder-only language models read the last real position (right padding),
    encoder-decoder ones the decoder's first step."""

    readout = f"next token after {GENERATIVE_TEMPLATE!r}"

    def __init__(self, source: ModelSource, device: torch.device, dtype: torch.dtype, model: Any) -> None:
        from transformers import AutoProcessor

        super().__init__()
        self.source, self.device, self.dtype = source, device, dtype
        self.processor = load_pretrained(AutoProcessor, source)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "right"
        self.model = load_pretrained(model, source, device, dtype=dtype)
        config = self.model.config
        self.decoder_only = getattr(config, "use_decoder_only_language_model", not config.is_encoder_decoder)
        self.yes_id, self.no_id = single_token_id(self.tokenizer, " yes"), single_token_id(self.tokenizer, " no")

    def _logits(
        self, images: list[Image.Image], image_index: list[int], questions: list[str], batch_size: int
    ) -> torch.Tensor:
        rows = []
        for start in range(0, len(questions), batch_size):
            texts = [GENERATIVE_TEMPLATE.format(question=q) for q in questions[start : start + batch_size]]
            chunk_images = [images[i] for i in image_index[start : start + batch_size]]
            inputs = self.processor(images=chunk_images, text=texts, padding=True, return_tensors="pt")
            inputs = {key: value.to(self.device) for key, value in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            if self.decoder_only:
                logits = self.model(**inputs).logits
                last = inputs["attention_mask"].sum(-1) - 1
                rows.append(logits[torch.arange(len(texts), device=self.device), last].float().cpu())
            else:
                text_config = getattr(self.model.config, "text_config", self.model.config)
                first = torch.full((len(texts), 1), text_config.decoder_start_token_id, device=self.device)
                rows.append(self.model(**inputs, decoder_input_ids=first).logits[:, 0].float().cpu())
        return torch.cat(rows)


@functools.lru_cache(maxsize=4)
def load_answerer(spec: str, device: str, dtype: str) -> BlipQuestionAnswerer | GenerativeQuestionAnswerer:
    """BLIP VQA checkpoints (architectures BlipForQuestionAnswering) use the decoder's first token; any other
    image-text-to-text model the generative template. Shared per process like the detector."""
    from transformers import AutoModelForImageTextToText, BlipForQuestionAnswering

    source = resolve_model(spec)
    torch_device = choose_device(device)
    torch_dtype = choose_dtype(dtype, torch_device)
    loader = model_class(source, {"blip": "BlipForQuestionAnswering"}, AutoModelForImageTextToText)
    if loader is BlipForQuestionAnswering:
        return BlipQuestionAnswerer(source, torch_device, torch_dtype, loader)
    return GenerativeQuestionAnswerer(source, torch_device, torch_dtype, loader)


class VqaReward:
    """Mean over the prompt's yes/no questions of P(expected answer), in [0, 1]; higher is better.

    questions="template": the prompt parser's questions (generate_questions), each expecting "yes", so the reward
    is the mean P(yes). questions="llm": `question_model`, a causal LM, writes the questions and their expected
    answers (models/questions.py, few-shot prompt `question_prompt`), cached per prompt. P(expected) is P(yes) for
    "yes" and P(no) for "no": 1 - P(yes) under the yes_no normalisation, the full-vocabulary softmax read at the
    "no" token under "vocab". A prompt the model writes no valid question for, or whose generation fails, is asked
    the template questions and its details say why ("question_source": "template", "fallback": reason). Metadata
    "questions" win over both (each expects "yes")."""

    name = "vqa"

    def __init__(
        self,
        model: str = DEFAULT_VQA_MODEL,
        normalisation: str = "yes_no",
        unknown_nouns: bool = False,
        batch_size: int = 64,
        image_batch_size: int = 16,
        device: str | None = None,
        dtype: str = "auto",
        questions: str = "template",
        question_model: str | None = None,
        question_prompt: str = DEFAULT_PROMPT_VERSION,
        question_batch_size: int = 16,
        question_max_new_tokens: int = 128,
        max_questions: int = 8,
        question_cache_size: int = 4096,
        question_device: str | None = None,
        question_dtype: str = "auto",
    ) -> None:
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {', '.join(NORMALISATIONS)}, got {normalisation!r}")
        if questions not in QUESTION_SOURCES:
            raise ValueError(f"questions must be one of {', '.join(QUESTION_SOURCES)}, got {questions!r}")
        if questions == "llm" and not question_model:
            raise ValueError(
                "questions='llm' needs question_model: a causal language model (hub id or local directory) that "
                "writes the questions"
            )
        if questions == "template" and question_model is not None:
            raise ValueError("question_model is used only with questions='llm'")
        self.normalisation, self.unknown_nouns = normalisation, unknown_nouns
        self.batch_size, self.image_batch_size = max(1, batch_size), max(1, image_batch_size)
        self.answerer = load_answerer(str(model), str(choose_device(device)), dtype)
        self.question_source = questions
        self.version = self.answerer.source.version
        self.writer: LlmQuestionWriter | None = None
        if questions == "llm":
            writer_device = str(choose_device(question_device if question_device is not None else device))
            self.writer = load_question_writer(
                str(question_model),
                writer_device,
                question_dtype,
                max(1, question_batch_size),
                question_max_new_tokens,
                max_questions,
                question_cache_size,
                question_prompt,
            )
            self.version = f"{self.version}+questions:{self.writer.version}"

    def describe(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "normalisation": self.normalisation,
            "answer_readout": self.answerer.readout,
            "unknown_nouns": self.unknown_nouns,
            "batch_size": self.batch_size,
            "image_batch_size": self.image_batch_size,
            "device": str(self.answerer.device),
            "questions": self.question_source,
        }
        models = {"answerer": self.answerer.source.describe()}
        precision: str | dict[str, str] = PRECISION[self.answerer.dtype]
        scale = f"mean over the prompt's yes/no questions of P(yes); {NORMALISATIONS[self.normalisation]}"
        if self.writer is not None:
            written = self.writer.describe()
            models["question_model"] = written.pop("model")
            params["question_writer"] = written
            precision = {"answerer": PRECISION[self.answerer.dtype], "question_model": written["precision"]}
            no = "P(no) = 1 - P(yes)" if self.normalisation == "yes_no" else "P(no), read at the 'no' token"
            scale = (
                "mean over the prompt's yes/no questions of P(expected answer): P(yes) where the answer is yes, "
                f"{no} where it is no; {NORMALISATIONS[self.normalisation]}; questions written by the question "
                "model, the template questions where it writes none"
            )
        return {
            "name": self.name,
            "version": self.version,
            "models": models,
            "params": params,
            "precision": precision,
            "scale": scale,
        }

    def questions(self, sample: Sample) -> list[Question]:
        """Metadata {"questions": [...]} (e.g. TIFA's) replaces the generated questions; GenEval metadata
        {"include": ...} replaces the parsed prompt of template questions; otherwise the prompt is parsed, or with
        questions="llm" the question model writes them (template questions where it writes none)."""
        return self._plan(sample).questions

    def _plan(self, sample: Sample, written: dict[str, WrittenQuestions] | None = None) -> _Plan:
        """The sample's questions; `written`: the question model's results for this batch's prompts."""
        metadata = sample.metadata or {}
        if "questions" in metadata:
            given = metadata["questions"]
            if (
                not isinstance(given, list)
                or not 0 < len(given) <= MAX_GIVEN_QUESTIONS
                or not all(isinstance(q, str) and 0 < len(q.strip()) <= MAX_QUESTION_CHARS for q in given)
            ):
                raise ValueError(
                    f"metadata 'questions' must be 1 to {MAX_GIVEN_QUESTIONS} non-empty strings of at most "
                    f"{MAX_QUESTION_CHARS} characters"
                )
            source = {"question_source": "given"} if self.writer is not None else {}
            return _Plan([Question(q.strip(), "given") for q in dict.fromkeys(given)], source)
        if not sample.prompt.strip():
            raise Unscorable("empty_prompt", "the prompt is empty: there is nothing to ask about")
        parsed = from_geneval_metadata(metadata) if "include" in metadata else None
        if self.writer is None:
            return _Plan(generate_questions(sample.prompt, parsed, unknown_nouns=self.unknown_nouns), {})
        result = (written or {}).get(sample.prompt) or self.writer.generate([sample.prompt])[0]
        source: dict[str, Any] = {
            "question_source": "llm",
            "question_model": self.writer.source.version,
            "prompt_version": self.writer.prompt_version,
            "dropped": len(result.dropped),
            "dropped_reasons": result.dropped_reasons(),
        }
        if result.failure is None:
            asked = [Question(q.text, "written", None, q.expected, q.element) for q in result.questions]
            return _Plan(asked, source)
        fallback = {**source, "question_source": "template", "fallback": result.failure}
        return _Plan(generate_questions(sample.prompt, parsed, unknown_nouns=self.unknown_nouns), fallback)

    def _write(self, samples: list[Sample]) -> dict[str, WrittenQuestions]:
        """One question-model pass over the batch's distinct prompts that need written questions (no metadata
        questions, a non-empty prompt): the writer batches and caches them."""
        prompts = [
            sample.prompt
            for sample in samples
            if isinstance(sample.prompt, str)
            and sample.prompt.strip()
            and (sample.metadata is None or (isinstance(sample.metadata, dict) and "questions" not in sample.metadata))
        ]
        prompts = list(dict.fromkeys(prompts))
        assert self.writer is not None
        return dict(zip(prompts, self.writer.generate(prompts), strict=True)) if prompts else {}

    def score(self, samples: list[Sample]) -> list[RewardOutput]:
        written = self._write(samples) if self.writer is not None else None
        return score_planned(
            samples,
            functools.partial(self._plan, written=written),
            self._answer,
            self.image_batch_size,
            lambda: {"model": self.version},
        )

    def _answer(self, samples: list[Sample], plans: list[_Plan]) -> list[RewardOutput]:
        image_index = [row for row, plan in enumerate(plans) for _ in plan.questions]
        texts = [question.text for plan in plans for question in plan.questions]
        logits = self.answerer.logits([sample.image for sample in samples], image_index, texts, self.batch_size)
        yes_id, no_id = self.answerer.yes_id, self.answerer.no_id
        p_yes_tensor = yes_probability(logits, yes_id, no_id, self.normalisation)
        p_yes = p_yes_tensor.tolist()
        p_no: list[float] = []
        if self.writer is not None:
            # Over the two answers P(no) is 1 - P(yes); over the whole vocabulary it is read at its own token.
            if self.normalisation == "yes_no":
                p_no = (1.0 - p_yes_tensor).tolist()
            else:
                p_no = yes_probability(logits, no_id, yes_id, self.normalisation).tolist()
        outputs, offset = [], 0
        for plan in plans:
            asked, span = plan.questions, slice(offset, offset + len(plan.questions))
            offset += len(asked)
            listed = [
                {"question": q.text, "kind": q.kind, "subject": q.subject, "p_yes": p}
                for q, p in zip(asked, p_yes[span], strict=True)
            ]
            details: dict[str, Any] = {"questions": listed, "normalisation": self.normalisation, "model": self.version}
            if self.writer is None:
                value = sum(entry["p_yes"] for entry in listed) / len(listed)
            else:
                for entry, question, no in zip(listed, asked, p_no[span], strict=True):
                    entry["expected"], entry["element"] = question.expected, question.element
                    entry["p_expected"] = entry["p_yes"] if question.expected == "yes" else no
                value = sum(entry["p_expected"] for entry in listed) / len(listed)
                details.update(plan.source)
            outputs.append(RewardOutput(value, details))
        return outputs


@register_reward(
    RewardDeclaration(
        "vqa",
        "a VQA model's P(yes) on yes/no questions about the prompt: its objects, counts, colours and relations "
        "(template questions), or questions a language model writes with their expected answers",
        (0.0, 1.0),
        "mean over the prompt's yes/no questions of P(expected answer): P(yes), or P(no) (1 - P(yes) normalised "
        "over yes/no) for a written question whose expected answer is no",
    )
)
def vqa(**config: Any) -> VqaReward:
    """VQA yes-probability; config: model, normalisation ("yes_no" | "vocab"), unknown_nouns, batch_size,
    image_batch_size, device, dtype, questions ("template" | "llm"), question_model (required for "llm"),
    question_prompt, question_batch_size, question_max_new_tokens, max_questions, question_cache_size,
    question_device, question_dtype."""
    return VqaReward(**config)
