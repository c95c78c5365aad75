"""ZeroShotDetector: open-vocabulary detection with transformers' zero-shot detectors (OWL-ViT, OWLv2, Grounding DINO,
MM Grounding DINO): each image's text queries (a prompt's nouns) -> candidates [B, N, 4 + Q], one score per query.

Loading is offline only, as HFDetector's (models/detection/hf_detector.py): a model directory, or a hub id already in
the local Hugging Face cache, resolved through models/hf.py (weights from safetensors only); fp32, eval mode, CPU
unless asked. The model is frozen (no parameter gradients); detect_pixels differentiates with respect to the pixels.

Conventions (sources are files and functions of transformers 5.25):

- candidates [B, N, 4 + Q]: x0, y0, x1, y1 in each image's own pixels, clamped to the image (transformers does not
  clamp), then one score column per query of that image, in the order given; Q is the batch's largest query count
  and an image's columns past its own count are 0. num_queries [B] says how many columns each image has.
- OWL-ViT / OWLv2 (N = one box per image patch, (input size / patch size)^2): score = sigmoid of the class head's
  logit per (patch box, query), as post_process_object_detection in owlvit/image_processing_owlvit.py and
  owlv2/image_processing_owlv2.py computes it (sigmoid of the logits; the processors keep only each box's best
  query, we keep all). The class head (OwlViTClassPredictionHead.forward, modeling_owlvit.py) is split in two: the
  image side (dense0 -> unit length, logit_shift, elu(logit_scale) + 1) and the text side (the projected text
  embedding, unit length as OwlViTModel.forward returns it), combined as (cos + shift) * scale. OWLv2's objectness
  head is not applied: the processor's scores do not use it either. Boxes: pred_boxes are normalised cx cy w h ->
  corners (center_to_corners_format) times the image's width and height for OWL-ViT (its processor resizes to a
  square, aspect not kept); OWLv2's processor pads each image at the bottom and right to a square before resizing,
  so its boxes are relative to that square and scale by max(width, height) (_scale_boxes in
  image_processing_owlv2.py). Raw per-patch boxes overlap: `nms_iou` is 0.3, the default nms_threshold of the OWL
  processors' own NMS (post_process_image_guided_detection in image_processing_owlvit.py / _owlv2.py).
- A box that lies wholly outside the image clamps to zero area and scores 0 for every query (inside_only): on
  OWLv2 the patches of the padding its processor adds below or right of the image predict such boxes, and they
  are no detection of anything in the image (transformers' post-processing keeps them, unclamped).
- Grounding DINO (N = the model's num_queries): the model fuses text and image, so each image runs with its own
  text: the queries lower-cased and joined as the processor does ("a peach. a candle.", _merge_candidate_labels_text
  in grounding_dino/processing_grounding_dino.py). The processor's post_process_grounded_object_detection scores a
  box by the max of sigmoid(logits) over all token positions and names it by the tokens above text_threshold
  (get_phrases_from_posmap); the score of a box for one query is here that max taken over the query's own token
  positions only (found from the fast tokenizer's character offsets; not [CLS], [SEP] or the "." separators).
  Boxes: normalised cx cy w h of the image -> corners times width and height. Set prediction, no NMS in its
  post-processing: `nms_iou` 1.0. Tokens past the model's max_text_len (256) are cut by the model, so a query
  there scores 0. An image with no queries is not run (its candidates are all 0).

Caching and batching:

- OWL: a bounded LRU of query text -> unit projected text embedding [D] (`text_cache_size` entries); per call the
  query strings not cached run through the text tower once, together. The image side runs in chunks of
  `batch_size` (one fixed input size, so any images batch together) through torch, or through an ONNX export of
  the image side (export_image_encoder; `onnx_image_encoder=`), and the same torch code combines its outputs with
  each image's own queries (padded to Q and masked).
- Grounding DINO: a bounded LRU of query set -> tokenization and token positions. The text encoder cannot be
  cached separately: its features are fused with the image's in the encoder (the bi-directional image-text
  attention layers) and read by every decoder layer. (Only BERT's own output, before fusion, is image-independent,
  and GroundingDinoModel.forward takes token ids, not precomputed text features.) Images run alone through the
  image processor (its padding of a mixed batch would change an image's features) and batch in chunks of
  `batch_size` when they share a query set and a processed shape.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..hf import ModelSource, load_pretrained, resolve_model
from .detector import DetectorConfig
from .hf_detector import GPU_PROVIDERS, processor_size, stated_input_size

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """What differs between the zero-shot detector families: see the module docstring for each value's source."""

    name: str
    query_template: str  # the default: how a noun becomes the model's query text
    nms_iou: float
    cached: str  # what the text cache holds
    scores: str


OWL = Family(
    name="owl",
    query_template="a photo of a {}",  # the OWL-ViT paper's and transformers' examples' prompt form
    nms_iou=0.3,
    cached="text embeddings",
    scores="sigmoid of the class-head logit per (patch box, query)",
)
GROUNDING_DINO = Family(
    name="grounding-dino",
    query_template="{}",  # its prompts are phrases joined by ". "
    nms_iou=1.0,
    cached="tokenization only",
    scores="max over the query's tokens of sigmoid(logits) per (box, query)",
)
FAMILIES: dict[str, Family] = {
    "owlvit": OWL,
    "owlv2": OWL,
    "grounding-dino": GROUNDING_DINO,
    "mm-grounding-dino": GROUNDING_DINO,
}
ZERO_SHOT_TYPES = frozenset(FAMILIES)
ONNX_OUTPUTS = ("pred_boxes", "image_class_embeds", "logit_shift", "logit_scale")
NOT_CACHEABLE = (
    "the text encoder's features are fused with the image's in the encoder (bi-directional image-text attention) "
    "and read by every decoder layer, so they cannot be computed once per query set; the model's forward takes "
    "token ids, not precomputed BERT features"
)


def _config_model_type(spec: str | os.PathLike[str]) -> str | None:
    """model_type from the config.json of a directory, or of a hub id in the local HF cache (never the network)."""
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        config = path / "config.json"
    elif path.exists() or text.endswith(".onnx"):
        return None
    else:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(text)
        except HFValidationError:
            return None
        cached = try_to_load_from_cache(text, "config.json")
        if not isinstance(cached, str):
            return None
        config = Path(cached)
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return model_type if isinstance(model_type, str) else None


def is_zero_shot_detector(spec: str | os.PathLike[str]) -> bool:
    """Whether a `detector` option names a zero-shot detector: a directory, or a hub id in the local Hugging Face
    cache, whose config.json model_type is one of ZERO_SHOT_TYPES. ONNX files and anything else: False."""
    return _config_model_type(spec) in ZERO_SHOT_TYPES


def load_zero_shot_detector(
    spec: str | os.PathLike[str], config: DetectorConfig | None = None, quantized: bool = False, **options: Any
) -> ZeroShotDetector:
    """The shared ZeroShotDetector for a `detector` option, runtime config and options (ZeroShotDetector's keyword
    arguments: name, query_template, text_cache_size, onnx_image_encoder), one load per process: batch_size from the
    config; on CUDA only when the config's providers name a GPU provider first and a GPU is present.
    quantized: refused (int8 is an ONNX detector option; these models run in fp32)."""
    if quantized:
        raise ValueError(f"quantized is an ONNX detector option; {os.fspath(spec)} is a zero-shot model (fp32)")
    config = config or DetectorConfig()
    gpu = bool(config.providers) and config.providers[0] in GPU_PROVIDERS and torch.cuda.is_available()
    frozen = tuple(sorted((key, os.fspath(v) if isinstance(v, Path) else v) for key, v in options.items()))
    return _shared_detector(os.fspath(spec), max(1, config.batch_size), "cuda" if gpu else "cpu", frozen)


@functools.lru_cache(maxsize=8)
def _shared_detector(
    spec: str, batch_size: int, device: str, options: tuple[tuple[str, Hashable], ...]
) -> ZeroShotDetector:
    return ZeroShotDetector(spec, batch_size=batch_size, device=device, **dict(options))


class LRUCache:
    """A bounded, thread-safe least-recently-used map that counts its hits and misses. capacity 0: caches nothing."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, int(capacity))
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: Any) -> None:
        if not self.capacity:
            return
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def keys(self) -> list[Hashable]:
        """The cached keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries


@dataclass(frozen=True)
class QueryTokens:
    """Grounding DINO's text for one query set: input_ids, token_type_ids, attention_mask [1, L], and per query the
    token positions (< max_text_len) that spell it."""

    input_ids: torch.Tensor
    token_type_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: tuple[tuple[int, ...], ...]


class OwlImageSide(torch.nn.Module):
    """The image half of an OWL-ViT / OWLv2 detector: pixel_values [B, 3, S, S] -> pred_boxes [B, P, 4] (normalised
    cx cy w h), image class embeddings [B, P, D] (dense0, unit length as the class head makes them), logit_shift and
    logit_scale [B, P, 1] (elu + 1 applied). owl_scores combines them with text embeddings; this module is also what
    export_image_encoder writes as ONNX."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        feature_map = self.model.image_embedder(pixel_values=pixel_values)[0]  # [B, h, w, C]
        batch, height, width, channels = feature_map.shape
        features = feature_map.reshape(batch, height * width, channels)
        pred_boxes = self.model.box_predictor(features, feature_map)
        head = self.model.class_head
        class_embeds = head.dense0(features)
        class_embeds = class_embeds / (torch.linalg.norm(class_embeds, dim=-1, keepdim=True) + 1e-6)
        return pred_boxes, class_embeds, head.logit_shift(features), head.elu(head.logit_scale(features)) + 1


def owl_scores(
    class_embeds: torch.Tensor,
    logit_shift: torch.Tensor,
    logit_scale: torch.Tensor,
    text_embeds: torch.Tensor,
    query_mask: torch.Tensor,
) -> torch.Tensor:
    """OwlViTClassPredictionHead's logits, then sigmoid: image class embeddings [B, P, D] (unit), logit_shift and
    logit_scale [B, P, 1], text embeddings [B, Q, D] and query_mask [B, Q] (1 real, 0 padding) -> scores [B, P, Q],
    0 in padded columns."""
    text_embeds = text_embeds / (torch.linalg.norm(text_embeds, dim=-1, keepdim=True) + 1e-6)
    logits = (torch.einsum("bpd,bqd->bpq", class_embeds, text_embeds) + logit_shift) * logit_scale
    return logits.sigmoid() * query_mask[:, None, :].to(logits.dtype)


def inside_only(boxes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Scores [B, N, Q] with the rows of boxes [B, N, 4] (clamped to the image) that have no area set to 0: such a
    box lies wholly outside the image (OWLv2: on the padding its processor adds to make the image square), so it is
    no detection of anything in the image, whatever its score."""
    inside = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    return scores * inside[..., None].to(scores.dtype)


def image_boxes(pred_boxes: torch.Tensor, sizes: torch.Tensor, padded_square: bool = False) -> torch.Tensor:
    """Normalised cx cy w h [B, N, 4] and image sizes [B, 2] (w, h) -> x0 y0 x1 y1 [B, N, 4] in image pixels,
    clamped to the image. padded_square: the boxes are relative to the image padded at the bottom and right to a
    max(w, h) square (OWLv2's processor), so every coordinate scales by max(w, h)."""
    from transformers.image_transforms import center_to_corners_format

    limits = sizes.to(pred_boxes.dtype)[:, None, :].repeat(1, 1, 2)  # [B, 1, 4] (w, h, w, h)
    scale = limits.amax(-1, keepdim=True) if padded_square else limits
    return (center_to_corners_format(pred_boxes) * scale).clamp(min=0).minimum(limits)


class ZeroShotDetector:
    """An open-vocabulary transformers detector: detect_queries(RGB PIL images, each image's query names) ->
    (candidates [B, N, 4 + Q], num_queries [B]); detect_pixels the same from float pixels, differentiably. See the
    module docstring for the conventions, caching and batching.

    spec: a model directory or a hub id in the local cache; name: the label in `version` (default: the hub id or
    directory name). version: "{model_type}:{name}@{12 hex digits of config + weights}", "+onnx" when the image side
    runs in onnxruntime. query_template: how a name becomes the query text ("{}" marks the name); None: the family's
    ("a photo of a {}" for OWL, "{}" for Grounding DINO). text_cache_size: entries of the text cache (0: none).
    onnx_image_encoder: an ONNX file written by export_image_encoder from this model (OWL families only).
    """

    open_vocabulary = True
    class_names: tuple[str, ...] = ()  # no fixed vocabulary: the caller names the classes per image

    def __init__(
        self,
        spec: str | os.PathLike[str],
        batch_size: int = 8,
        device: str = "cpu",
        name: str | None = None,
        query_template: str | None = None,
        text_cache_size: int = 1024,
        onnx_image_encoder: str | os.PathLike[str] | None = None,
    ) -> None:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.source: ModelSource = resolve_model(spec, name)
        model_type = _config_model_type(self.source.path)
        if model_type not in FAMILIES:
            raise ValueError(
                f"{self.source.name}: model_type {model_type!r} is not a zero-shot detector "
                f"(one of {', '.join(sorted(ZERO_SHOT_TYPES))})"
            )
        self.model_type = model_type
        self.family = FAMILIES[model_type]
        self.nms_iou = self.family.nms_iou
        self.query_template = query_template if query_template is not None else self.family.query_template
        if "{}" not in self.query_template:
            raise ValueError(f"query_template must contain '{{}}' where the name goes, got {self.query_template!r}")
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))
        model = load_pretrained(AutoModelForZeroShotObjectDetection, self.source, self.device, dtype=torch.float32)
        self.model = model.float().eval().requires_grad_(False)
        self.processor = load_pretrained(AutoProcessor, self.source)
        self.image_processor = self.processor.image_processor
        self.tokenizer = self.processor.tokenizer
        self.text_cache = LRUCache(text_cache_size)
        self._lock = threading.Lock()  # one forward at a time: the model's CPU threads are shared anyway
        if self.is_owl:
            self.image_side = OwlImageSide(self.model).eval()
            self._text_model = getattr(self.model, self.model.base_model_prefix)  # OwlViTModel / Owlv2Model
            self._text_length = int(self.model.config.text_config.max_position_embeddings)
            self.num_boxes = int(self.model.num_patches_height * self.model.num_patches_width)
        else:
            self.num_boxes = int(self.model.config.num_queries)
            self._max_text_len = int(self.model.config.max_text_len)
        self.onnx_path = Path(onnx_image_encoder) if onnx_image_encoder is not None else None
        self._session = self._onnx_session(self.onnx_path) if self.onnx_path is not None else None
        self.version = f"{self.model_type}:{self.source.version}" + ("+onnx" if self._session is not None else "")
        log.info("zero-shot detector %s (%s) runs on %s", self.source.name, self.model_type, self.device)

    # --- description ----------------------------------------------------------------------------------------------

    @property
    def is_owl(self) -> bool:
        return self.family is OWL

    def input_size(self) -> Any:
        """OWL: [height, width], the fixed input; Grounding DINO: {"shortest_edge": ..., "longest_edge": ...}."""
        return stated_input_size(self.image_processor)

    def query_text(self, name: str) -> str:
        """The text the model is given for one query name: the template applied ("a photo of a peach"); for
        Grounding DINO also stripped and lower-cased as its processor does, and with "." and "?" (its phrase
        delimiters) made spaces, so a name stays one phrase."""
        text = self.query_template.replace("{}", name)
        if self.is_owl:
            return text
        return " ".join(text.replace(".", " ").replace("?", " ").split()).lower()

    def prepare(self, image: Image.Image) -> None:
        """Nothing to do ahead: the image processor resizes inside detect_queries."""

    def torch_twin(self) -> Any:
        """None: this detector is torch already, and its differentiable path is detect_pixels."""
        return None

    def describe(self) -> dict[str, object]:
        cache: dict[str, object] = {
            "holds": self.family.cached,
            "entries": len(self.text_cache),
            "capacity": self.text_cache.capacity,
            "hits": self.text_cache.hits,
            "misses": self.text_cache.misses,
        }
        if not self.is_owl:
            cache["not_cached"] = NOT_CACHEABLE
        return {
            "model": self.source.name,
            "version": self.version,
            "model_type": self.model_type,
            "family": self.family.name,
            "vocabulary": "open",
            "device": str(self.device),
            "precision": "fp32",
            "input_size": self.input_size(),
            "num_boxes": self.num_boxes,
            "query_template": self.query_template,
            "text_cache": cache,
            "image_runtime": "onnx" if self._session is not None else "torch",
            "scores": self.family.scores,
            "nms": f"IoU {self.nms_iou} (OWL processors' NMS default)" if self.is_owl else "none (set prediction)",
        }

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        raise TypeError(
            f"{self.source.name} is an open-vocabulary detector: it needs text queries for each image; call "
            "detect_queries(images, queries) (or detect_pixels for the differentiable path)"
        )

    # --- detection ------------------------------------------------------------------------------------------------

    def detect_queries(
        self, images: list[Image.Image], queries: Sequence[Sequence[str]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RGB PIL images and each image's query names -> candidates [B, N, 4 + Q] (float32, CPU) and num_queries [B]
        (int64): x0 y0 x1 y1 in the image's pixels, then one score per query in the given order, 0-padded to Q."""
        query_sets = self._query_sets(queries, len(images))
        sizes = torch.tensor([image.size for image in images], dtype=torch.float32).reshape(-1, 2)
        with self._lock, torch.inference_mode():
            if self.is_owl:
                chunks = []
                for start in range(0, len(images), self.batch_size):
                    chunk = images[start : start + self.batch_size]
                    pixels = self.image_processor(images=chunk, return_tensors="pt")["pixel_values"]
                    chunks.append((list(range(start, start + len(chunk))), pixels))
                candidates = self._owl_candidates(chunks, sizes, query_sets, use_onnx=self._session is not None)
            else:
                encoded = [self.image_processor(images=[image], return_tensors="pt") for image in images]
                entries = [(encoding["pixel_values"], encoding["pixel_mask"]) for encoding in encoded]
                candidates = self._grounding_candidates(entries, sizes, query_sets)
        return candidates.float().cpu(), self._counts(query_sets)

    def detect_pixels(
        self, pixels: torch.Tensor, queries: Sequence[Sequence[str]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images [B, 3, H, W] in [0, 1] (one size) and each image's query names -> (candidates [B, N, 4 + Q],
        num_queries [B]) as detect_queries gives them, in the autograd graph of `pixels`: the image processor's
        resize / pad / normalise are done in torch (preprocess_pixels). Always the torch image side."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be [B, 3, H, W], got {tuple(pixels.shape)}")
        query_sets = self._query_sets(queries, len(pixels))
        height, width = pixels.shape[-2:]
        sizes = torch.tensor([[width, height]] * len(pixels), dtype=torch.float32).reshape(-1, 2)
        with self._lock:
            pixel_values = self.preprocess_pixels(pixels.to(self.device, torch.float32))
            if self.is_owl:
                starts = range(0, len(pixels), self.batch_size)
                chunks = [
                    (list(range(start, start + len(chunk))), chunk)
                    for start, chunk in zip(starts, pixel_values.split(self.batch_size), strict=True)
                ]
                candidates = self._owl_candidates(chunks, sizes, query_sets, use_onnx=False)
            else:
                mask = torch.ones(pixel_values.shape[-2:], dtype=torch.long, device=self.device)[None]
                entries = [(pixel_values[index : index + 1], mask) for index in range(len(pixels))]
                candidates = self._grounding_candidates(entries, sizes, query_sets)
        return candidates.float().cpu(), self._counts(query_sets)

    def _query_sets(self, queries: Sequence[Sequence[str]], batch: int) -> list[tuple[str, ...]]:
        if isinstance(queries, str) or len(queries) != batch:
            raise ValueError(f"queries must be one sequence of names per image ({batch}), got {queries!r:.200}")
        sets = []
        for names in queries:
            if isinstance(names, str):
                raise ValueError(f"each image's queries must be a sequence of names, not the string {names!r}")
            sets.append(tuple(self.query_text(str(name)) for name in names))
        return sets

    @staticmethod
    def _counts(query_sets: list[tuple[str, ...]]) -> torch.Tensor:
        return torch.tensor([len(names) for names in query_sets], dtype=torch.int64)

    def preprocess_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """The image processor's preprocessing in differentiable torch ops: float pixels [B, 3, H, W] in [0, 1] ->
        pixel_values [B, 3, h, w] as the processor would give them for the same images decoded to uint8.
        OWL-ViT and Grounding DINO resize uint8 images (torchvision, antialiased) and round; here the resize is in
        float, clamped to [0, 1] as uint8 would be, so the values differ from the processor's by its rounding and
        fixed-point weights (< 1 grey level). OWLv2 rescales to float first, pads to a square, blurs and resizes as
        Owlv2ImageProcessor.resize does: the same float ops."""
        import torchvision.transforms.v2.functional as tvF
        from transformers.image_transforms import get_size_with_aspect_ratio
        from transformers.image_utils import pil_torch_interpolation_mapping

        processor = self.image_processor
        interpolation = pil_torch_interpolation_mapping[processor.resample]
        size = processor_size(processor)
        height, width = pixels.shape[-2:]
        if self.model_type == "owlv2":
            side = max(height, width)
            pixels = torch.nn.functional.pad(pixels, (0, side - width, 0, side - height), value=0.0)
            # Owlv2ImageProcessor.resize's anti-aliasing blur, computed as it does (float32 tensors, per axis)
            factors = torch.tensor([side, side]) / torch.tensor([size["height"], size["width"]])
            sigma = ((factors - 1) / 2).clamp(min=0)
            if not torch.any(sigma == 0):
                kernel = (2 * torch.ceil(3 * sigma).int() + 1).tolist()
                pixels = tvF.gaussian_blur(pixels, kernel, sigma=sigma.tolist())
            resized = tvF.resize(pixels, [size["height"], size["width"]], interpolation=interpolation, antialias=False)
        else:
            if self.is_owl:
                target = [size["height"], size["width"]]
            else:
                target = list(get_size_with_aspect_ratio((height, width), size["shortest_edge"], size["longest_edge"]))
            # torch's uint8 antialiased resize runs width then height and saturates to uint8 in between: the same
            # two passes and clamps here keep bicubic overshoot out as it does (one float pass differs by up to 4
            # grey levels near strong edges; these two by less than 1).
            resized = tvF.resize(pixels, [height, target[1]], interpolation=interpolation, antialias=True).clamp(0, 1)
            resized = tvF.resize(resized, target, interpolation=interpolation, antialias=True).clamp(0, 1)
        mean = torch.tensor(processor.image_mean, dtype=resized.dtype, device=resized.device)[None, :, None, None]
        std = torch.tensor(processor.image_std, dtype=resized.dtype, device=resized.device)[None, :, None, None]
        return (resized - mean) / std

    # --- OWL-ViT / OWLv2 ------------------------------------------------------------------------------------------

    def _text_embeddings(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Query texts -> unit projected text embeddings [D] (on the model's device): from the cache, and the
        missing texts through the text tower in one batch. Always outside inference mode, so that detect_pixels
        can use cached embeddings in its graph."""
        found: dict[str, torch.Tensor] = {}
        missing: list[str] = []
        for text in dict.fromkeys(texts):
            embedding = self.text_cache.get(text)
            if embedding is None:
                missing.append(text)
            else:
                found[text] = embedding
        if missing:
            with torch.inference_mode(False), torch.no_grad():
                tokens = self.tokenizer(
                    missing, padding="max_length", truncation=True, max_length=self._text_length, return_tensors="pt"
                )
                outputs = self._text_model.get_text_features(
                    input_ids=tokens["input_ids"].to(self.device),
                    attention_mask=tokens["attention_mask"].to(self.device),
                )
                projected = outputs.pooler_output
                # unit length, as OwlViTModel.forward hands them to the detection heads (text_embeds_norm)
                embeddings = projected / torch.linalg.norm(projected, ord=2, dim=-1, keepdim=True)
            for text, embedding in zip(missing, embeddings, strict=True):
                found[text] = embedding
                self.text_cache.put(text, embedding)
        return found

    def _owl_candidates(
        self,
        chunks: list[tuple[list[int], torch.Tensor]],
        sizes: torch.Tensor,
        query_sets: list[tuple[str, ...]],
        use_onnx: bool,
    ) -> torch.Tensor:
        width = max((len(names) for names in query_sets), default=0)
        if not query_sets:
            return torch.zeros((0, self.num_boxes, 4 + width))
        embeddings = self._text_embeddings([text for names in query_sets for text in names])
        rows: list[torch.Tensor] = []
        for indices, pixel_values in chunks:
            if use_onnx:
                pred_boxes, class_embeds, shift, scale = self._run_onnx(pixel_values)
            else:
                pred_boxes, class_embeds, shift, scale = self.image_side(pixel_values.to(self.device))
            dim = class_embeds.shape[-1]
            text = torch.zeros((len(indices), width, dim), device=class_embeds.device)
            mask = torch.zeros((len(indices), width), device=class_embeds.device)
            for row, index in enumerate(indices):
                names = query_sets[index]
                if names:
                    text[row, : len(names)] = torch.stack([embeddings[name] for name in names]).to(text.device)
                    mask[row, : len(names)] = 1
            scores = owl_scores(class_embeds, shift, scale, text, mask)
            boxes = image_boxes(pred_boxes, sizes[indices].to(pred_boxes.device), self.model_type == "owlv2")
            rows.append(torch.cat([boxes, inside_only(boxes, scores.to(boxes.dtype))], -1))
        return torch.cat(rows)

    # --- ONNX image side (OWL) ------------------------------------------------------------------------------------

    def export_image_encoder(self, path: str | os.PathLike[str]) -> Path:
        """Write the image side (OwlImageSide: pixel_values [B, 3, S, S] at the processor's fixed size, batch dynamic
        -> pred_boxes, unit image class embeddings, logit_shift, logit_scale) as ONNX with torch.onnx's
        torch.export-based exporter (opset 18), with this model's version as metadata (`model_version`), checked
        when the file is loaded back (onnx_image_encoder=). Grounding DINO: NotImplementedError."""
        if not self.is_owl:
            raise NotImplementedError(
                f"{self.model_type} has no image side to export alone: text and image are fused in its encoder "
                "(bi-directional image-text attention) and decoder (text cross-attention), so every image needs its "
                "text in the same forward pass"
            )
        from .export import write_metadata

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        height, width = self.input_size()
        example = torch.rand(2, 3, height, width, device=self.device)
        with self._lock:
            torch.onnx.export(
                OwlImageSide(self.model).eval(),
                (example,),
                str(path),
                dynamo=True,
                opset_version=18,
                input_names=["pixel_values"],
                output_names=list(ONNX_OUTPUTS),
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                external_data=False,
            )
        metadata = {
            "model_version": self.source.version,
            "model_type": self.model_type,
            "input_size": json.dumps([height, width]),
            "outputs": ",".join(ONNX_OUTPUTS),
        }
        write_metadata(path, metadata)
        return path

    def _onnx_session(self, path: Path) -> Any:
        import onnxruntime as ort

        if not self.is_owl:
            raise ValueError(f"onnx_image_encoder is for the OWL families; {self.model_type} fuses text and image")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as DetectorConfig's default
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device.type == "cuda" else None
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers or ["CPUExecutionProvider"])
        metadata = dict(session.get_modelmeta().custom_metadata_map)
        if metadata.get("model_version") != self.source.version:
            raise ValueError(
                f"{path} was exported from {metadata.get('model_version') or 'an unknown model'}, not from "
                f"{self.source.version}: export it from this model (export_image_encoder)"
            )
        outputs = tuple(output.name for output in session.get_outputs())
        if outputs != ONNX_OUTPUTS:
            raise ValueError(f"{path}: outputs {outputs}; expected {ONNX_OUTPUTS}")
        return session

    def _run_onnx(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = {"pixel_values": pixel_values.detach().cpu().numpy()}
        return tuple(torch.from_numpy(array).to(self.device) for array in self._session.run(None, feeds))

    # --- Grounding DINO -------------------------------------------------------------------------------------------

    def query_tokens(self, query_set: tuple[str, ...]) -> QueryTokens:
        """Grounding DINO: one query set (texts as query_text gives them), joined as the processor joins them
        ("a peach. a candle."), tokenized, with each query's token positions; from the text cache when there."""
        if self.is_owl:
            raise ValueError("query_tokens is for Grounding DINO; OWL models embed each query text on its own")
        cached = self.text_cache.get(query_set)
        if cached is not None:
            return cached
        text = ". ".join(query_set) + "."
        spans, start = [], 0
        for phrase in query_set:
            spans.append((start, start + len(phrase)))
            start += len(phrase) + 2
        with torch.inference_mode(False):
            encoding = self.tokenizer(
                text, return_token_type_ids=True, return_offsets_mapping=True, return_tensors="pt"
            )
        offsets = encoding["offset_mapping"][0].tolist()
        positions = tuple(
            tuple(
                position
                for position, (first, last) in enumerate(offsets)
                if last > first and first >= begin and last <= end and position < self._max_text_len
            )
            for begin, end in spans
        )
        tokens = QueryTokens(
            input_ids=encoding["input_ids"],
            token_type_ids=encoding["token_type_ids"],
            attention_mask=encoding["attention_mask"],
            positions=positions,
        )
        self.text_cache.put(query_set, tokens)
        return tokens

    def _grounding_candidates(
        self,
        entries: list[tuple[torch.Tensor, torch.Tensor]],
        sizes: torch.Tensor,
        query_sets: list[tuple[str, ...]],
    ) -> torch.Tensor:
        """entries: per image, pixel_values [1, 3, h, w] and pixel_mask [1, h, w] -> candidates [B, N, 4 + Q]."""
        width = max((len(names) for names in query_sets), default=0)
        rows: list[torch.Tensor] = [torch.zeros((self.num_boxes, 4 + width), device=self.device)] * len(entries)
        groups: dict[tuple[tuple[str, ...], tuple[int, ...]], list[int]] = {}
        for index, (pixel_values, _) in enumerate(entries):
            if query_sets[index]:  # no queries: nothing to ask, all zeros
                groups.setdefault((query_sets[index], tuple(pixel_values.shape)), []).append(index)
        for (query_set, _), members in groups.items():
            tokens = self.query_tokens(query_set)
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                text = {
                    key: getattr(tokens, key).to(self.device).expand(len(chunk), -1)
                    for key in ("input_ids", "token_type_ids", "attention_mask")
                }
                outputs = self.model(
                    pixel_values=torch.cat([entries[i][0] for i in chunk]).to(self.device),
                    pixel_mask=torch.cat([entries[i][1] for i in chunk]).to(self.device),
                    **text,
                )
                probabilities = outputs.logits.sigmoid()  # [b, N, max_text_len]
                columns = [
                    probabilities[..., list(positions)].amax(-1)
                    if positions
                    else probabilities.new_zeros(probabilities.shape[:2])
                    for positions in tokens.positions
                ]
                scores = torch.stack(columns, -1)
                scores = torch.nn.functional.pad(scores, (0, width - scores.shape[-1]))
                boxes = image_boxes(outputs.pred_boxes, sizes[chunk].to(outputs.pred_boxes.device))
                scores = inside_only(boxes, scores.to(boxes.dtype))
                for row, index in enumerate(chunk):
                    rows[index] = torch.cat([boxes[row], scores[row].to(boxes.dtype)], -1)
        if not rows:
            return torch.zeros((0, self.num_boxes, 4 + width))
        return torch.stack(rows)
