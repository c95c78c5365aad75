"""HFDetector: a transformers object-detection model (YOLOS, the seed paper's detector family; DETR; RT-DETR)
behind the Detector protocol, decoded to candidates [B, N, 4 + C] with one row per query.

Loading is offline only: a model directory, or a hub id already in the local Hugging Face cache, resolved through
models/hf.py (weights from safetensors only). The model runs in fp32 in eval mode, on the CPU unless asked.

Conventions follow each model's own image processor (`post_process_object_detection`):

- boxes: the models predict normalised (cx, cy, w, h); they become x0, y0, x1, y1 in each image's own pixels
  (transformers' center_to_corners_format, scaled by the image's width and height), then clamped to the image
  (the processor does not clamp; the matching reward wants boxes inside the image, as OnnxDetector gives them).
- scores: softmax heads (DETR, YOLOS: the last logit is "no object") give the softmax probabilities without the
  no-object column, so a row sums to at most 1; sigmoid/focal heads (RT-DETR and the other SIGMOID_HEADS, or any
  config with `use_focal_loss` true) give the sigmoid of each logit.
- one row per query and no NMS: these are set-prediction detectors (`nms_iou = 1.0`; the matching reward adds
  NMS only where its own `iou_threshold` asks for it).
- batching: each image is preprocessed alone and images whose processed tensors share a shape run together, in
  chunks of `batch_size`. The processor would otherwise pad a mixed batch to its largest image, and YOLOS has no
  pixel mask, so an image's detections would depend on the other images of its batch.

Class names come from `config.id2label` in index order, lower-cased. COCO DETR/YOLOS checkpoints keep "N/A"
placeholders for the unused COCO ids (91 ids, 80 classes); those columns are named "∅", "∅∅", "∅∅∅", ... (one
more "∅" per placeholder, so every name stays unique). The prompt parser reads names as words of letters and
digits (models/prompt.py), and "∅" is neither: a placeholder name has no words, so no prompt can ever match it
(a name such as "unused-12" would be matched by the prompt "unused 12"). `placeholder_columns` lists them.

Not done (future work): a differentiable torch twin (torch_twin is None). ONNX: a YOLOS model exports with
torch.onnx (torch.export-based) at one fixed input shape, and onnxruntime's raw outputs decoded by `decode` equal
the torch candidates (tests/test_hf_detector.py); serving such an export is not wired in (OnnxDetector runs YOLO
letterbox models, and the export would need the processor's resize in front and a dynamic input shape).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..hf import ModelSource, load_pretrained, resolve_model
from .detector import DetectorConfig

log = logging.getLogger(__name__)

# Model types whose class head is per-class sigmoid (focal loss) with no "no object" logit.
SIGMOID_HEADS = frozenset({"rt_detr", "rt_detr_v2", "d_fine", "deformable_detr", "conditional_detr", "dab_detr"})
PLACEHOLDER_LABELS = frozenset({"", "n/a"})  # COCO DETR/YOLOS configs: "N/A"
PLACEHOLDER_MARK = "∅"  # not a letter or digit: a name made of it alone has no words the prompt parser can match
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def class_names_from_labels(id2label: Mapping[Any, str], num_classes: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """config.id2label -> (class name per score column, lower-cased; the placeholder columns). Missing ids and
    placeholders ("N/A") are named PLACEHOLDER_MARK repeated once per placeholder so far (unique, unmatchable)."""
    labels = {int(key): str(value) for key, value in id2label.items()}
    names: list[str] = []
    placeholders: list[int] = []
    for index in range(num_classes):
        label = labels.get(index, "").strip().lower()
        if label in PLACEHOLDER_LABELS:
            placeholders.append(index)
            label = PLACEHOLDER_MARK * len(placeholders)
        names.append(label)
    return tuple(names), tuple(placeholders)


def processor_size(image_processor: Any) -> dict[str, int]:
    """The image processor's `size` as a plain dict of its set fields: a dict, or transformers' SizeDict (a dataclass
    whose fields are None where unset)."""
    size = getattr(image_processor, "size", None) or {}
    fields = dict(size) if isinstance(size, Mapping) else dict(vars(size))
    return {key: int(value) for key, value in fields.items() if value is not None}


def stated_input_size(image_processor: Any) -> Any:
    """The processor's target size as it states it: [height, width] for fixed-size models (RT-DETR, OWL), else its
    size dict (DETR/YOLOS/Grounding DINO: {"shortest_edge": ..., "longest_edge": ...}); None when it has none."""
    fields = processor_size(image_processor)
    if set(fields) == {"height", "width"}:
        return [fields["height"], fields["width"]]
    return fields or None


def is_transformers_detector(spec: str | os.PathLike[str]) -> bool:
    """Whether a `detector` option names a transformers model: a directory holding config.json, or a hub id whose
    config.json is in the local Hugging Face cache (never the network). ONNX files and anything else: False."""
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        return (path / "config.json").is_file()
    if path.exists() or text.endswith(".onnx"):
        return False
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return isinstance(try_to_load_from_cache(text, "config.json"), str)


def load_hf_detector(
    spec: str | os.PathLike[str], config: DetectorConfig | None = None, quantized: bool = False
) -> HFDetector:
    """The shared HFDetector for a `detector` option and runtime config (one load per process): batch_size from
    the config; on CUDA only when the config's providers name a GPU provider first and a GPU is present.
    quantized: refused (int8 is an ONNX option; these models run in fp32)."""
    if quantized:
        raise ValueError(f"quantized is an ONNX detector option; {os.fspath(spec)} is a transformers model (fp32)")
    config = config or DetectorConfig()
    gpu = bool(config.providers) and config.providers[0] in GPU_PROVIDERS and torch.cuda.is_available()
    return _shared_detector(os.fspath(spec), max(1, config.batch_size), "cuda" if gpu else "cpu")


@functools.lru_cache(maxsize=8)
def _shared_detector(spec: str, batch_size: int, device: str) -> HFDetector:
    return HFDetector(spec, batch_size=batch_size, device=device)


class HFDetector:
    """A transformers object-detection model as a Detector: __call__(RGB PIL images) -> candidates [B, N, 4 + C]
    (N = the model's queries; x0, y0, x1, y1 in image pixels, clamped; then C per-class scores). See the module
    docstring for the conventions.

    spec: a model directory or a hub id in the local cache; name: the label in `version` (default: the hub id or
    directory name). version: "{model_type}:{name}@{12 hex digits of config + weights}".
    """

    # Set prediction: one box per query, trained not to duplicate; NMS is the profile's choice, never needed.
    nms_iou = 1.0

    def __init__(
        self, spec: str | os.PathLike[str], batch_size: int = 8, device: str = "cpu", name: str | None = None
    ) -> None:
        from transformers import AutoImageProcessor, AutoModelForObjectDetection

        self.source: ModelSource = resolve_model(spec, name)
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))
        self.model = load_pretrained(AutoModelForObjectDetection, self.source, self.device, dtype=torch.float32)
        self.model = self.model.float().eval()
        self.processor = load_pretrained(AutoImageProcessor, self.source)
        config = self.model.config
        self.model_type = str(config.model_type)
        self.sigmoid = bool(getattr(config, "use_focal_loss", False)) or self.model_type in SIGMOID_HEADS
        self.num_classes = int(config.num_labels)
        self.class_names, self.placeholder_columns = class_names_from_labels(config.id2label, self.num_classes)
        self.num_queries = int(getattr(config, "num_queries", 0) or getattr(config, "num_detection_tokens", 0))
        self.version = f"{self.model_type}:{self.source.version}"
        self._takes_mask = "pixel_mask" in inspect.signature(self.model.forward).parameters
        self._lock = threading.Lock()  # one forward at a time: the model's CPU threads are shared anyway
        log.info("detector %s (%s) runs on %s", self.source.name, self.model_type, self.device)

    def prepare(self, image: Image.Image) -> None:
        """Nothing to do ahead: the image processor resizes inside __call__."""

    def torch_twin(self) -> Any:
        """None: the model is torch, but the gradient path (models/gradients.py) needs a TorchDetector-style twin
        that takes pixels through a differentiable letterbox and decodes YOLO-style outputs. Making this family
        differentiable through our soft matching (preprocessing in torch, set-prediction decoding) is future
        work."""
        return None

    def input_size(self) -> Any:
        """The processor's target size as it states it (stated_input_size)."""
        return stated_input_size(self.processor)

    def describe(self) -> dict[str, object]:
        return {
            "model": self.source.name,
            "version": self.version,
            "model_type": self.model_type,
            "device": str(self.device),
            "precision": "fp32",
            "input_size": self.input_size(),
            "num_classes": self.num_classes,
            "num_queries": self.num_queries,
            "placeholder_columns": list(self.placeholder_columns),
            "scores": "sigmoid" if self.sigmoid else "softmax without the no-object column",
            "nms": "none (set prediction)",
        }

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        width = self.num_classes + (0 if self.sigmoid else 1)
        if logits.shape[-1] != width:
            raise ValueError(
                f"{self.source.name}: logits have {logits.shape[-1]} columns; expected {width} "
                f"({self.num_classes} classes{'' if self.sigmoid else ' + no object'})"
            )
        if self.sigmoid:
            return logits.sigmoid()
        return logits.softmax(-1)[..., :-1]

    def decode(self, logits: torch.Tensor, pred_boxes: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """Raw outputs (logits [B, N, C or C + 1], normalised cx cy w h [B, N, 4]) and image sizes [B, 2] (w, h)
        -> candidates [B, N, 4 + C]: x0 y0 x1 y1 in image pixels, clamped to the image, then class scores."""
        from transformers.image_transforms import center_to_corners_format

        limits = sizes.to(pred_boxes.dtype)[:, None, :]  # [B, 1, 2]
        scale = limits.repeat(1, 1, 2)  # [B, 1, 4] (w, h, w, h)
        boxes = (center_to_corners_format(pred_boxes) * scale).clamp(min=0).minimum(scale)
        return torch.cat([boxes, self._scores(logits).to(boxes.dtype)], -1)

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB PIL images -> candidates [B, N, 4 + C] (float32, on the CPU)."""
        if not images:
            return torch.zeros((0, self.num_queries, 4 + self.num_classes))
        encoded = [self.processor(images=[image], return_tensors="pt") for image in images]
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, encoding in enumerate(encoded):
            groups.setdefault(tuple(encoding["pixel_values"].shape), []).append(index)
        sizes = torch.tensor([image.size for image in images], dtype=torch.float32)  # [B, 2] (w, h)
        rows: list[torch.Tensor | None] = [None] * len(images)
        with self._lock:
            for members in groups.values():
                for start in range(0, len(members), self.batch_size):
                    chunk = members[start : start + self.batch_size]
                    inputs = {"pixel_values": torch.cat([encoded[i]["pixel_values"] for i in chunk])}
                    if self._takes_mask and "pixel_mask" in encoded[chunk[0]]:
                        inputs["pixel_mask"] = torch.cat([encoded[i]["pixel_mask"] for i in chunk])
                    outputs = self.model(**{key: value.to(self.device) for key, value in inputs.items()})
                    decoded = self.decode(
                        outputs.logits.float(), outputs.pred_boxes.float(), sizes[chunk].to(self.device)
                    )
                    for row, index in enumerate(chunk):
                        rows[index] = decoded[row].cpu()
        return torch.stack(rows)  # type: ignore[arg-type]  # every image belongs to one chunk
