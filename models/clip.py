"""Shared CLIP runtime: one load per (model, processor, device, dtype) per process, batched L2-normalised
embeddings, and a per-sample cache so rewards on the same backbone embed each image once per Scorer call."""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from .hf import require_safetensors, resolve_model
from .prompt import GENEVAL_COLORS
from .types import Sample

log = logging.getLogger(__name__)

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
# Embeddings kept per backbone for samples still alive; a Scorer batch is far smaller than this.
EMBEDDING_CACHE_SIZE = 4096
DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """fp16 on CUDA, fp32 elsewhere unless asked (CPU kernels for half precision are slow or missing)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.startswith("cuda") else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(DTYPES)}") from None


def projected_features(output: Any) -> torch.Tensor:
    """The projected features of a get_image_features / get_text_features call, [B, D]."""
    # transformers 4.x returns the projected tensor, 5.x an output object carrying it as pooler_output.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipBackbone:
    """A transformers CLIPModel with its processor, in eval mode on one device and dtype.

    image_embeddings / text_embeddings return float32 [B, D] rows of unit L2 norm.
    image_forwards counts images run through the vision tower (cache hits excluded).
    """

    def __init__(self, model: str, processor: str | None, device: str, dtype: torch.dtype) -> None:
        from transformers import AutoProcessor, CLIPModel

        self.model_id, self.processor_id = str(model), str(processor) if processor else None
        source = resolve_model(model)
        directory = source.path
        processor_dir = resolve_model(processor).path if processor else directory
        self.directory, self.device, self.dtype = directory, device, dtype
        require_safetensors(source)  # weights from safetensors only: never a pickled pytorch_model.bin
        model = CLIPModel.from_pretrained(directory, local_files_only=True, use_safetensors=True)
        self.model = model.to(device=device, dtype=dtype).eval()
        self.processor = AutoProcessor.from_pretrained(processor_dir, local_files_only=True)
        self.version = source.version
        self.max_text_tokens = int(self.model.config.text_config.max_position_embeddings)
        self.embedding_dim = int(self.model.config.projection_dim)
        self.logit_scale = float(self.model.logit_scale.detach().exp())
        self.image_forwards = 0
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, tuple[weakref.ref[Sample], torch.Tensor]] = OrderedDict()

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "processor": self.processor_id or self.model_id,
            "version": self.version,
            "device": self.device,
            "precision": str(self.dtype).removeprefix("torch."),
        }

    @torch.inference_mode()
    def _embed_images(self, images: Sequence[Image.Image], batch_size: int) -> torch.Tensor:
        rows = []
        for start in range(0, len(images), batch_size):
            chunk = list(images[start : start + batch_size])
            pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"]
            features = projected_features(
                self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
            )
            rows.append(torch.nn.functional.normalize(features.float(), dim=-1))
            self.image_forwards += len(chunk)
        return torch.cat(rows) if rows else torch.zeros((0, self.embedding_dim), device=self.device)

    def image_embeddings(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """[B, D] unit embeddings of the images (no caching: crops and one-off images)."""
        with self._lock:
            return self._embed_images(images, max(1, batch_size))

    def sample_embeddings(self, samples: Sequence[Sample], batch_size: int = 32) -> torch.Tensor:
        """[B, D] unit embeddings of the samples' images. A sample embedded before (by another reward on this
        backbone in the same Scorer call: the Scorer passes the same Sample objects to each) is not re-run."""
        with self._lock:
            rows: list[torch.Tensor | None] = []
            for sample in samples:
                entry = self._cache.get(id(sample))
                rows.append(entry[1] if entry is not None and entry[0]() is sample else None)
            missing = [index for index, row in enumerate(rows) if row is None]
            if missing:
                fresh = self._embed_images([samples[i].image for i in missing], max(1, batch_size))
                for index, row in zip(missing, fresh, strict=True):
                    rows[index] = row
                    self._cache[id(samples[index])] = (weakref.ref(samples[index]), row)
                while len(self._cache) > EMBEDDING_CACHE_SIZE:
                    self._cache.popitem(last=False)
            if not rows:
                return torch.zeros((0, self.embedding_dim), device=self.device)
            return torch.stack(rows)  # type: ignore[arg-type]

    @torch.inference_mode()
    def text_embeddings(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """[T, D] unit embeddings; texts longer than the model's context are truncated (CLIP's 77 tokens)."""
        rows = []
        with self._lock:
            for start in range(0, len(texts), max(1, batch_size)):
                tokens = self.processor(
                    text=list(texts[start : start + batch_size]),
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=self.max_text_tokens,
                )
                features = projected_features(
                    self.model.get_text_features(
                        input_ids=tokens["input_ids"].to(self.device),
                        attention_mask=tokens["attention_mask"].to(self.device),
                    )
                )
                rows.append(torch.nn.functional.normalize(features.float(), dim=-1))
        return torch.cat(rows) if rows else torch.zeros((0, self.embedding_dim), device=self.device)


_BACKBONES: dict[tuple[str, str, str, torch.dtype], ClipBackbone] = {}
_BACKBONES_LOCK = threading.Lock()


def load_clip(
    model: str = DEFAULT_CLIP,
    processor: str | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
) -> ClipBackbone:
    """The shared backbone for (model, processor, device, dtype): loaded on first request, then reused by every
    reward that names the same one (a hub id and its cached snapshot directory count as the same model)."""
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    directory = str(resolve_model(model).path)
    key = (directory, str(resolve_model(processor).path) if processor else directory, device, torch_dtype)
    with _BACKBONES_LOCK:
        if key not in _BACKBONES:
            log.info("loading CLIP %s (processor %s) on %s as %s", model, processor or model, device, torch_dtype)
            _BACKBONES[key] = ClipBackbone(model, processor, device, torch_dtype)
        return _BACKBONES[key]


# GenEval's prompt templates (evaluation/evaluate_images.py lines 114-116); its colours: prompt.GENEVAL_COLORS.
COLOR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {color} {object}",
    "a photo of a {color}-colored {object}",
    "a photo of a {color} object",
)


class ColorClassifier:
    """CLIP zero-shot colour of object crops, as GenEval does it: per class, one text embedding per colour
    (mean of the templates' unit embeddings, renormalised); a crop's colour is the argmax of cosine."""

    def __init__(self, backbone: ClipBackbone, colors: Sequence[str] = GENEVAL_COLORS) -> None:
        self.backbone, self.colors = backbone, tuple(colors)
        self._classifiers: dict[str, torch.Tensor] = {}

    def _classifier(self, class_name: str) -> torch.Tensor:
        """[colors, D] unit text embeddings for `class_name`."""
        if class_name not in self._classifiers:
            texts = [t.format(color=c, object=class_name) for c in self.colors for t in COLOR_TEMPLATES]
            embeddings = self.backbone.text_embeddings(texts).view(len(self.colors), len(COLOR_TEMPLATES), -1)
            self._classifiers[class_name] = torch.nn.functional.normalize(embeddings.mean(1), dim=-1)
        return self._classifiers[class_name]

    def __call__(self, crops: Sequence[tuple[Image.Image, str]], batch_size: int = 32) -> list[str]:
        """(crop, class name) pairs -> the argmax colour of each crop."""
        if not crops:
            return []
        embeddings = self.backbone.image_embeddings([crop for crop, _ in crops], batch_size)
        colors = []
        for embedding, (_, class_name) in zip(embeddings, crops, strict=True):
            colors.append(self.colors[int((self._classifier(class_name) @ embedding).argmax())])
        return colors


def crop_box(image: Image.Image, box: Sequence[float]) -> Image.Image:
    """The [x0, y0, x1, y1] pixel box of `image`, clamped to it and at least one pixel wide and high."""
    width, height = image.size
    x0 = min(max(int(box[0]), 0), width - 1)
    y0 = min(max(int(box[1]), 0), height - 1)
    x1 = min(max(int(round(box[2])), x0 + 1), width)
    y1 = min(max(int(round(box[3])), y0 + 1), height)
    return image.crop((x0, y0, x1, y1))


def masked_crop(image: Image.Image, mask: Any, box: Sequence[float], background: str = "#999") -> Image.Image:
    """GenEval's crop of a segmented object (evaluation/evaluate_images.py, ImageCrops): the image composited over
    a plain `background` (#999 grey) through `mask` (the object's pixels: [H, W] bool tensor or array, or a PIL
    mask of the image's size), then cropped to the [x0, y0, x1, y1] box as crop_box clamps it."""
    if not isinstance(mask, Image.Image):
        pixels = torch.as_tensor(mask).detach().cpu()
        if tuple(pixels.shape) != (image.height, image.width):
            raise ValueError(f"mask of shape {tuple(pixels.shape)} for an image of {image.width}x{image.height}")
        mask = Image.fromarray((pixels > 0).to(torch.uint8).mul(255).numpy())  # mode L
    blank = Image.new(image.mode, image.size, background)
    return crop_box(Image.composite(image, blank, mask), box)
