"""VLM-judge reward (AGFSync's VLM feedback): an image-text-to-text model rates each image on stated, versioned
aspect prompts; each rating is the expected value over the scale's digit tokens in the model's next-token logits.

Deterministic and batched: nothing is sampled or parsed from generated text. Any transformers image-text-to-text
model with a chat template loads (Qwen2-VL / Qwen2.5-VL, Idefics3 / SmolVLM, LLaVA), from a directory or the
local Hugging Face cache."""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .hf import PRECISION, ModelNotFoundError, ModelSource, choose_device, choose_dtype, load_pretrained, resolve_model
from .registry import RewardDeclaration, register_reward
from .types import RewardOutput, Sample, Unscorable, score_planned

DEFAULT_VLM_JUDGE_MODEL = "HuggingFaceTB/SmolVLM-256M-Instruct"
ASPECTS = ("style", "coherence", "aesthetics", "faithfulness")
# 1-5, not 1-10: every rating must be one token, and "10" is two ("1", "0") in the digit-splitting tokenizers of
# all three families (Qwen2, SmolLM2, Llama); 0-9 is the widest single-digit scale (`scale` option). The expected
# rating is continuous however coarse the scale.
DEFAULT_SCALE = (1, 5)
DEFAULT_PROMPT_VERSION = "v1"
# The aspect prompts, by version: a released version never changes (results name it); new wording is a new version.
# {low} and {high} are the scale's ends, {prompt} the generation prompt (whitespace collapsed). Style, coherence and
# aesthetics are the aspects AGFSync's VLM rates (arXiv:2403.13352, abstract); the paper publishes no wording and its
# code (Anjingkun/AGFSync @ 7007619) has no rating prompt (build_dataset.py sums CLIP, aesthetic and VQA scores), so
# the definitions below are ours, and so is the faithfulness aspect.
PROMPTS: Mapping[str, Mapping[str, str]] = {
    "v1": {
        "style": (
            "Rate the style of this image: does it keep one consistent, deliberate visual style (medium, color "
            "palette, rendering) throughout, without clashing or muddled styles? Answer with a single number from "
            "{low} (poor) to {high} (excellent)."
        ),
        "coherence": (
            "Rate the coherence of this image: do its objects, people and scene fit together plausibly, with "
            "correct shapes, anatomy, perspective and lighting, and no distorted, merged or broken parts? Answer "
            "with a single number from {low} (poor) to {high} (excellent)."
        ),
        "aesthetics": (
            "Rate the aesthetic quality of this image: its composition, lighting, color, sharpness and overall "
            "visual appeal. Answer with a single number from {low} (poor) to {high} (excellent)."
        ),
        "faithfulness": (
            'This image was generated from the prompt "{prompt}". Rate how faithfully the image shows what the '
            "prompt describes: every object, count, color, attribute and relation it names. Answer with a single "
            "number from {low} (not at all) to {high} (completely)."
        ),
    },
}
READOUT = (
    "expected rating E = sum_k p_k v_k over the scale values v_k, p = softmax over the scale tokens' next-token "
    "logits only; aspect score = (E - low) / (high - low); reward = weighted mean of the aspect scores"
)


def expected_rating(
    logits: torch.Tensor, scale_token_ids: Sequence[int] | torch.Tensor, scale_values: Sequence[float] | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits [N, V], the scale's token ids [K] and values [K] -> (expected rating [N], probabilities
    [N, K]), in float64. The probabilities are a softmax over the K scale tokens' logits only: the rest of the
    vocabulary is left out, so they sum to 1 whatever mass the model puts elsewhere (scale_mass reports that).
    A row whose K logits are all -inf (or NaN) has no rating: NaN, never a made-up number."""
    ids = torch.as_tensor(scale_token_ids, dtype=torch.long, device=logits.device)
    values = torch.as_tensor(scale_values, dtype=torch.float64, device=logits.device)
    probabilities = torch.softmax(logits.double()[:, ids], dim=-1)
    return probabilities @ values, probabilities


def scale_mass(logits: torch.Tensor, scale_token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Logits [N, V] -> [N] float64: the probability the full next-token softmax gives the scale tokens together.
    A sanity signal (low: the model wants to answer something else), not part of the score."""
    ids = torch.as_tensor(scale_token_ids, dtype=torch.long, device=logits.device)
    logits = logits.double()
    return torch.exp(torch.logsumexp(logits[:, ids], dim=-1) - torch.logsumexp(logits, dim=-1))


def normalised_rating(expected: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Expected ratings [N] on the scale low..high -> [N] in [0, 1]: (E - low) / (high - low)."""
    return (expected - low) / (high - low)


@dataclass(frozen=True)
class ScaleTokens:
    """How a rating is read: the text appended after the chat template's generation prompt (`answer_lead`, e.g. the
    space SmolVLM writes before a number), and the one token id of each scale value that follows it."""

    answer_lead: str
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]


class VlmJudge:
    """An image-text-to-text model and its processor, asked one question per (image, text): next-token logits at
    the end of the chat prompt. Left padding, so the last position of every row is its own last token. One
    forward at a time per model (endpoints run in threads, and a fast tokenizer is not re-entrant)."""

    def __init__(self, source: ModelSource, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.source, self.device, self.dtype = source, device, dtype
        self.processor = load_pretrained(AutoProcessor, source)
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        if self.tokenizer is None or getattr(self.processor, "chat_template", None) is None:
            raise ModelNotFoundError(
                f"{source.name} at {source.path} has no processor with a tokenizer and a chat template; vlm_judge "
                "needs an image-text-to-text model saved with its processor (chat_template.jinja included)"
            )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model = load_pretrained(AutoModelForImageTextToText, source, device, dtype=dtype)
        config = self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.context_length: int | None = getattr(text_config, "max_position_embeddings", None)
        self._inference = threading.Lock()

    def chat_prompt(self, text: str) -> str:
        """The chat template around one user message (the image, then `text`), generation prompt added."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _token_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def scale_tokens(self, values: Sequence[int], probe: str) -> ScaleTokens:
        """Each value's one token as it follows the generation prompt. The answer is written as the model would:
        right after a generation prompt that ends in whitespace, else after a space; tokens all answers share
        beyond the prompt (a bare space token) join the prompt as its answer lead. A value that is not then
        exactly one token of its own fails loudly (ValueError): its probability could not be read."""
        with self._inference:  # the tokenizer may be serving another reward on this judge
            return self._scale_tokens(values, probe)

    def _scale_tokens(self, values: Sequence[int], probe: str) -> ScaleTokens:
        prompt = self.chat_prompt(probe)
        separator = "" if prompt[-1:].isspace() else " "
        prompt_ids = self._token_ids(prompt)
        answers = [self._token_ids(prompt + separator + str(value)) for value in values]
        shared = 0
        while all(len(ids) > shared + 1 for ids in answers) and len({ids[shared] for ids in answers}) == 1:
            shared += 1
        lead_ids = answers[0][:shared]
        if lead_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError(
                f"the scale values merge with the end of {self.source.name}'s generation prompt "
                f"({prompt[-20:]!r}) when tokenized; choose a model whose chat template ends before the answer"
            )
        # The lead's text: the separator itself, or what the tokenizer decodes it to (sentencepiece decodes a lone
        # "▁" to ""); whichever tokenizes back to exactly the lead's tokens.
        lead_tokens = lead_ids[len(prompt_ids) :]
        candidates = dict.fromkeys([""] if not lead_tokens else [separator, self.tokenizer.decode(lead_tokens)])
        answer_lead = next(
            (text for text in candidates if not text.strip() and self._token_ids(prompt + text) == lead_ids), None
        )
        if answer_lead is None:
            raise ValueError(
                f"the ratings {list(values)} do not follow {self.source.name}'s generation prompt as one token each "
                f"after a shared space ({self.tokenizer.convert_ids_to_tokens(lead_tokens)} is shared): each rating "
                "must be one token of its own (use a scale within 0-9)"
            )
        token_ids = []
        for value, ids in zip(values, answers, strict=True):
            own = ids[shared:]
            if len(own) != 1:
                tokens = self.tokenizer.convert_ids_to_tokens(own)
                raise ValueError(
                    f"rating {value} is {len(own)} tokens ({tokens}) for {self.source.name}'s tokenizer; each "
                    "rating must be one token (use a scale within 0-9)"
                )
            if own[0] == self.tokenizer.unk_token_id:
                raise ValueError(f"rating {value} is unknown to {self.source.name}'s tokenizer (its unk token)")
            token_ids.append(own[0])
        if len(set(token_ids)) != len(token_ids):
            raise ValueError(f"the ratings {list(values)} do not map to distinct tokens: {token_ids}")
        return ScaleTokens(answer_lead, tuple(token_ids), tuple(self.tokenizer.convert_ids_to_tokens(token_ids)))

    def input_length(
        self, image: Image.Image, text: str, answer_lead: str, processor_options: Mapping[str, Any] | None = None
    ) -> int:
        """Tokens the model reads for `text` about `image`: the chat prompt with the image's tokens expanded as the
        processor expands them (tiles, rows, markers), counted by running the processor on that one item."""
        with self._inference:
            inputs = self.processor(
                images=[[image]], text=[self.chat_prompt(text) + answer_lead], **(processor_options or {})
            )
        return len(inputs["input_ids"][0])

    def next_token_logits(
        self,
        images: Sequence[Image.Image],
        image_index: Sequence[int],
        texts: Sequence[str],
        answer_lead: str,
        batch_size: int,
        processor_options: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """images [I]; image_index [Q] (the image each text asks about); texts [Q] -> next-token logits [Q, V]
        (float32, CPU) after each text's chat prompt and answer lead, in chunks of batch_size rows."""
        with self._inference, torch.inference_mode():
            rows = []
            for start in range(0, len(texts), batch_size):
                chunk = range(start, min(start + batch_size, len(texts)))
                inputs = self.processor(
                    images=[[images[image_index[row]]] for row in chunk],
                    text=[self.chat_prompt(texts[row]) + answer_lead for row in chunk],
                    padding=True,
                    padding_side="left",
                    return_tensors="pt",
                    **(processor_options or {}),
                ).to(self.device)
                for key, value in inputs.items():
                    if key.startswith("pixel_values") and value.is_floating_point():
                        inputs[key] = value.to(self.dtype)
                logits = self.model(**inputs, use_cache=False, logits_to_keep=1).logits  # [n, 1, V]
                rows.append(logits[:, -1].float().cpu())
            return torch.cat(rows)


@functools.lru_cache(maxsize=4)
def load_judge(spec: str, device: str, dtype: str) -> VlmJudge:
    """One judge per (model, device, dtype), shared by the rewards of a process like the detector."""
    torch_device = choose_device(device)
    return VlmJudge(resolve_model(spec), torch_device, choose_dtype(dtype, torch_device))


def bounded_image(image: Image.Image, max_pixels: int | None) -> Image.Image:
    """The image scaled down (aspect ratio kept) to at most max_pixels pixels; unchanged when within."""
    width, height = image.size
    if max_pixels is None or width * height <= max_pixels:
        return image
    factor = math.sqrt(max_pixels / (width * height))
    size = (max(1, math.floor(width * factor)), max(1, math.floor(height * factor)))
    return image.resize(size, Image.Resampling.BICUBIC)


@dataclass(frozen=True)
class _Plan:
    image: Image.Image
    texts: tuple[str, ...]  # one per aspect, in the reward's aspect order


class VlmJudgeReward:
    """Weighted mean over the chosen aspects of a VLM's normalised expected rating, in [0, 1]; higher is better.

    Per image and aspect, the model reads the aspect's prompt (PROMPTS[prompt_version]) after the image in its chat
    template; the rating is read from the next-token logits (expected_rating), never sampled."""

    name = "vlm_judge"

    def __init__(
        self,
        model: str = DEFAULT_VLM_JUDGE_MODEL,
        aspects: Sequence[str] = ASPECTS,
        weights: Mapping[str, float] | None = None,
        scale: Sequence[int] = DEFAULT_SCALE,
        prompt_version: str = DEFAULT_PROMPT_VERSION,
        batch_size: int = 16,
        device: str | None = None,
        dtype: str = "auto",
        max_image_pixels: int | None = None,
        processor_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.aspects = _check_aspects(aspects)
        self.weights = _check_weights(weights, self.aspects)
        self.scale = _check_scale(scale)
        if prompt_version not in PROMPTS:
            raise ValueError(f"prompt_version must be one of {', '.join(PROMPTS)}, got {prompt_version!r}")
        if max_image_pixels is not None and max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be a positive number of pixels or None, got {max_image_pixels}")
        if processor_options is not None and not (
            isinstance(processor_options, Mapping) and all(isinstance(key, str) for key in processor_options)
        ):
            raise ValueError("processor_options must be a mapping of the processor's keyword arguments")
        self.prompt_version, self.prompts = prompt_version, PROMPTS[prompt_version]
        self.batch_size, self.max_image_pixels = max(1, batch_size), max_image_pixels
        self.processor_options = dict(processor_options or {})
        self.judge = load_judge(str(model), str(choose_device(device)), dtype)
        self.scale_values = tuple(range(self.scale[0], self.scale[1] + 1))
        self.scale_tokens = self.judge.scale_tokens(self.scale_values, self.question(self.aspects[0], "a photo"))
        low, high = self.scale
        self.version = f"{self.judge.source.version}+prompts:{prompt_version}+scale:{low}-{high}"

    def question(self, aspect: str, prompt: str) -> str:
        low, high = self.scale
        return self.prompts[aspect].format(low=low, high=high, prompt=" ".join(prompt.split()))

    def describe(self) -> dict[str, Any]:
        low, high = self.scale
        return {
            "name": self.name,
            "version": self.version,
            "models": {"judge": self.judge.source.describe()},
            "params": {
                "aspects": list(self.aspects),
                "weights": dict(self.weights),
                "rating_scale": [low, high],
                "prompt_version": self.prompt_version,
                "prompts": {aspect: self.prompts[aspect] for aspect in self.aspects},
                "answer_lead": self.scale_tokens.answer_lead,
                "scale_tokens": list(self.scale_tokens.tokens),
                "batch_size": self.batch_size,
                "max_image_pixels": self.max_image_pixels,
                "processor_options": dict(self.processor_options),
                "device": str(self.judge.device),
            },
            "precision": PRECISION[self.judge.dtype],
            "scale": f"ratings {low}-{high}; {READOUT}",
        }

    def _failure_details(self) -> dict[str, Any]:
        return {"model": self.version, "prompt_version": self.prompt_version}

    def plan(self, sample: Sample) -> _Plan:
        """The image (bounded to max_image_pixels) and one question per aspect. Unscorable: an empty prompt when
        faithfulness is asked ("empty_prompt"), a question longer than the model's context ("prompt_too_long")."""
        if "faithfulness" in self.aspects and not sample.prompt.strip():
            raise Unscorable("empty_prompt", "the prompt is empty: there is nothing to be faithful to")
        image = bounded_image(sample.image, self.max_image_pixels)
        texts = tuple(self.question(aspect, sample.prompt) for aspect in self.aspects)
        limit = self.judge.context_length
        if limit is not None:
            longest = max(texts, key=len)
            try:
                length = self.judge.input_length(image, longest, self.scale_tokens.answer_lead, self.processor_options)
            except ValueError as exc:  # the processor refuses the image (e.g. Qwen2-VL: aspect ratio over 200)
                raise Unscorable("unprocessable_image", f"the judge's processor refuses this image: {exc}") from exc
            if length > limit:
                raise Unscorable(
                    "prompt_too_long",
                    f"the judge's input would be {length} tokens (image and prompt); {self.judge.source.name} "
                    f"reads at most {limit}",
                )
        return _Plan(image, texts)

    def score(self, samples: list[Sample]) -> list[RewardOutput]:
        return score_planned(samples, self.plan, self._score_chunk, self.batch_size, self._failure_details)

    def _score_chunk(self, samples: list[Sample], plans: list[_Plan]) -> list[RewardOutput]:
        image_index = [row for row, plan in enumerate(plans) for _ in plan.texts]
        texts = [text for plan in plans for text in plan.texts]
        logits = self.judge.next_token_logits(
            [plan.image for plan in plans],
            image_index,
            texts,
            self.scale_tokens.answer_lead,
            self.batch_size,
            self.processor_options,
        )
        token_ids = self.scale_tokens.token_ids
        expected, probabilities = expected_rating(logits, token_ids, self.scale_values)
        scores = normalised_rating(expected, *self.scale).tolist()
        masses = scale_mass(logits, token_ids).tolist()
        expected_list, probability_rows = expected.tolist(), probabilities.tolist()
        outputs, offset = [], 0
        for _ in plans:
            per_aspect: dict[str, Any] = {}
            for aspect in self.aspects:
                per_aspect[aspect] = {
                    "expected_rating": expected_list[offset],
                    "score": scores[offset],
                    "probabilities": dict(zip(map(str, self.scale_values), probability_rows[offset], strict=True)),
                    "scale_mass": masses[offset],
                    "weight": self.weights[aspect],
                }
                offset += 1
            details = {
                "aspects": per_aspect,
                "prompt_version": self.prompt_version,
                "rating_scale": list(self.scale),
                "model": self.version,
            }
            unreadable = [aspect for aspect, entry in per_aspect.items() if not math.isfinite(entry["score"])]
            if unreadable:
                message = f"the judge's logits over the rating tokens are not finite for {', '.join(unreadable)}"
                outputs.append(RewardOutput(None, details, message, "unreadable_rating"))
                continue
            total = sum(self.weights.values())
            value = sum(self.weights[aspect] * per_aspect[aspect]["score"] for aspect in self.aspects) / total
            outputs.append(RewardOutput(value, details))
        return outputs


def _check_aspects(aspects: Sequence[str]) -> tuple[str, ...]:
    if isinstance(aspects, str):
        aspects = [aspects]
    chosen = tuple(dict.fromkeys(aspects))
    unknown = [aspect for aspect in chosen if aspect not in ASPECTS]
    if not chosen or unknown:
        raise ValueError(f"aspects must be a non-empty subset of {', '.join(ASPECTS)}; got {list(aspects)}")
    return chosen


def _check_weights(weights: Mapping[str, float] | None, aspects: tuple[str, ...]) -> dict[str, float]:
    """Aspect -> weight: the given ones, 1.0 for the rest; each finite and >= 0, and not all 0."""
    weights = dict(weights or {})
    extra = [aspect for aspect in weights if aspect not in aspects]
    if extra:
        raise ValueError(f"weights name aspects that are not scored: {', '.join(map(str, extra))}")
    chosen = {aspect: float(weights.get(aspect, 1.0)) for aspect in aspects}
    if not all(math.isfinite(weight) and weight >= 0 for weight in chosen.values()) or not any(chosen.values()):
        raise ValueError(f"weights must be finite, >= 0 and not all 0; got {chosen}")
    return chosen


def _check_scale(scale: Sequence[int]) -> tuple[int, int]:
    if (
        isinstance(scale, str)
        or len(scale) != 2
        or not all(isinstance(end, int) and not isinstance(end, bool) for end in scale)
        or not scale[0] < scale[1]
    ):
        raise ValueError(f"scale must be two integers (low, high) with low < high, e.g. (1, 5); got {scale!r}")
    return int(scale[0]), int(scale[1])


@register_reward(
    RewardDeclaration(
        "vlm_judge",
        "an image-text-to-text model's expected rating of the image for style, coherence, aesthetics and prompt "
        "faithfulness (AGFSync's VLM feedback), read from its next-token probabilities",
        (0.0, 1.0),
        f"weighted mean over the aspects of (E - low) / (high - low), E = sum_k p_k v_k the expected rating, p = "
        f"softmax over the rating tokens' next-token logits only (default ratings {DEFAULT_SCALE[0]}-"
        f"{DEFAULT_SCALE[1]}, prompts {DEFAULT_PROMPT_VERSION})",
        profile_keys=("aspects", "prompt_version"),
        model_options=(("model", DEFAULT_VLM_JUDGE_MODEL),),
    )
)
def vlm_judge(**config: Any) -> VlmJudgeReward:
    """VLM judge; config: model, aspects, weights, scale, prompt_version, batch_size, device, dtype,
    max_image_pixels, processor_options."""
    return VlmJudgeReward(**config)
