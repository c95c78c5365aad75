"""OnnxDetector: one onnxruntime session per detector model, batched letterbox preprocessing, and raw
output decoded to candidates [B, N, 4 + C] (x0, y0, x1, y1 in original-image pixels, then class scores); for
ultralytics segmentation exports also the mask coefficients and prototypes, and instance masks from them."""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)

LETTERBOX_FILL = 114  # grey border, as ultralytics pads
PREPARED_LIMIT = 256  # images resized ahead by prepare() and not yet scored


@dataclass(frozen=True)
class DetectorConfig:
    """Runtime options. Thread counts of 0 let onnxruntime choose."""

    providers: tuple[str, ...] | None = None  # None: CUDA/TensorRT when available, else CPU
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    batch_size: int = 8  # images per session.run for dynamic-batch models
    graph_optimization: str = "all"  # "disable" | "basic" | "extended" | "all"
    # onnxruntime's idle intra-op threads busy-wait for the next job by default. Here the same cores decode
    # images, parse requests and write results: spinning burns the time those need (benchmarks/RESULTS.md).
    allow_spinning: bool = False


@dataclass(frozen=True)
class Letterbox:
    """Per-image geometry of a letterboxed batch: scale [B] and padding [B, 2] (x, y) in input pixels."""

    scale: np.ndarray
    padding: np.ndarray


@dataclass(frozen=True)
class Detections:
    """One detector pass over a batch of B images.

    candidates: [B, N, 4 + C] as OnnxDetector.__call__ returns them. coefficients: [B, N, M] mask coefficients of
    each candidate, and protos: [B, M, h, w] mask prototypes (h, w = input / 4), for segmentation models; None
    otherwise. geometry: the letterbox used; image_sizes: [B, 2] (w, h) of the original images."""

    candidates: torch.Tensor
    coefficients: torch.Tensor | None
    protos: torch.Tensor | None
    geometry: Letterbox
    image_sizes: np.ndarray


# Float pixels of one upsampling chunk in instance_masks (ultralytics' process_mask_native budget): bounds memory
# on large images with many masks.
MASK_PIXEL_BUDGET = 16_000_000

_NARROW = threading.local()


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Inside this block, on this thread, CPU detectors run their forward pass on one onnxruntime thread (a second
    session, made on first use) instead of all cores: for a server that runs two batches side by side on a small
    CPU, so each keeps one core busy instead of both contending for every core. GPU sessions are unaffected."""
    previous = getattr(_NARROW, "active", False)
    _NARROW.active = True
    try:
        yield
    finally:
        _NARROW.active = previous


_OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _default_providers() -> list[str]:
    # onnxruntime-gpu lists CUDA/TensorRT even on machines without a GPU, then fails noisily loading them.
    if not torch.cuda.is_available():
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    preferred = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    return [provider for provider in preferred if provider in available] or ["CPUExecutionProvider"]


def _read_metadata(session: ort.InferenceSession, path: Path) -> dict[str, str]:
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    sidecar = path.with_suffix(".json")
    if "names" not in metadata and sidecar.exists():
        metadata.update(json.loads(sidecar.read_text()))
    return metadata


def letterbox_size(size: tuple[int, int], height: int, width: int) -> tuple[int, int]:
    """(w, h) of an image once letterboxed into height x width: aspect kept, at least 1 px a side."""
    scale = min(width / size[0], height / size[1])
    return max(int(round(size[0] * scale)), 1), max(int(round(size[1] * scale)), 1)


def letterbox_batch(
    images: list[Image.Image], height: int, width: int, resized: Sequence[np.ndarray | None] | None = None
) -> tuple[np.ndarray, Letterbox]:
    """RGB images of any sizes -> float32 [B, 3, height, width] in [0, 1], aspect kept, centred on grey.
    Resizing is per image (sizes differ); placement, layout change and scaling are one array op each.
    resized: per image, its pixels already resized to the letterbox size (OnnxDetector.prepare), or None."""
    sizes = np.array([image.size for image in images], dtype=np.float64)  # [B, 2] (w, h)
    scale = np.minimum(width / sizes[:, 0], height / sizes[:, 1])
    new_sizes = np.maximum(np.round(sizes * scale[:, None]).astype(np.int64), 1)
    padding = np.stack([(width - new_sizes[:, 0]) // 2, (height - new_sizes[:, 1]) // 2], 1)
    canvas = np.full((len(images), height, width, 3), LETTERBOX_FILL, dtype=np.uint8)
    for index, image in enumerate(images):
        new_w, new_h = new_sizes[index]
        pad_x, pad_y = padding[index]
        pixels = resized[index] if resized is not None else None
        if pixels is None or pixels.shape[:2] != (new_h, new_w):
            pixels = np.asarray(_resize(image, int(new_w), int(new_h)))
        canvas[index, pad_y : pad_y + new_h, pad_x : pad_x + new_w] = pixels
    batch = canvas.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(1 / 255)
    return np.ascontiguousarray(batch), Letterbox(scale=scale, padding=padding.astype(np.float64))


def decode_candidates(raw: torch.Tensor, geometry: Letterbox, image_sizes: np.ndarray) -> torch.Tensor:
    """Raw [B, 4 + C, N] (cx, cy, w, h in input pixels, then scores) -> candidates [B, N, 4 + C] with boxes
    x0 y0 x1 y1 in original pixels, clipped to the image. Torch ops only: the gradient path keeps its graph."""
    output = raw.transpose(1, 2)
    center, half = output[..., 0:2], output[..., 2:4] / 2
    padding = torch.as_tensor(geometry.padding, dtype=output.dtype, device=output.device)[:, None, :]
    scale = torch.as_tensor(geometry.scale, dtype=output.dtype, device=output.device)[:, None, None]
    limits = torch.as_tensor(image_sizes, dtype=output.dtype, device=output.device)[:, None, :]  # [B, 1, 2] (w, h)
    top_left = ((center - half - padding) / scale).clamp(min=0).minimum(limits)
    bottom_right = ((center + half - padding) / scale).clamp(min=0).minimum(limits)
    return torch.cat([top_left, bottom_right, output[..., 4:]], -1)


def _resize(image: Image.Image, new_w: int, new_h: int) -> Image.Image:
    return image if image.size == (new_w, new_h) else image.resize((new_w, new_h), Image.BILINEAR)


EMBEDDED = "embedded"  # the registered name of the embedded YOLOv3-tiny, as a reward's `detector` option


@runtime_checkable
class Detector(Protocol):
    """What a reward needs of a detector; implemented by OnnxDetector (fp32 and int8) and TorchDetector.

    __call__: RGB PIL images -> candidates [B, N, 4 + C] float (x0, y0, x1, y1 in image pixels, then per-class
    scores). prepare: letterbox one image ahead of the batch (a no-op where the detector does it itself).
    torch_twin: the differentiable torch network with the same weights and classes, or None. Optionally
    `nms_iou`: the IoU its own post-processing needs NMS at (YOLO 0.45; 1.0 for set-prediction detectors such as
    DETR), used where a profile adds no NMS of its own (iou_threshold None); 0.45 when absent."""

    class_names: tuple[str, ...]
    version: str

    def __call__(self, images: list[Image.Image]) -> torch.Tensor: ...

    def prepare(self, image: Image.Image) -> None: ...

    def describe(self) -> dict[str, object]: ...

    def torch_twin(self) -> Any: ...


class OnnxDetector:
    """A YOLO-family detector exported to ONNX with raw outputs [B, 4 + C, N] (cx, cy, w, h, scores).

    Ultralytics segmentation exports (`-seg`) are recognised by their outputs: output0 [B, 4 + C + M, N] (then M
    mask coefficients per candidate) and output1 prototypes [B, M, h, w]. For them `has_masks` is True, candidates
    stay [B, N, 4 + C], and detect() / instance_masks() give the masks.

    Class names, input size and version are read from the model's metadata (ultralytics keys
    `names`, `imgsz`, plus our `model_version`), never passed in by callers.
    """

    # Raw YOLO anchors need NMS: the IoU its own post-processing suppresses at (Darknet's and our default, 0.45).
    nms_iou = 0.45

    def __init__(self, path: str | Path, config: DetectorConfig | None = None) -> None:
        self.path = Path(path)
        self.config = config or DetectorConfig()
        self._requested_providers = list(self.config.providers) if self.config.providers else _default_providers()
        self.session = self._session(self.config.intra_op_threads)
        self.providers = self.session.get_providers()
        # The one-thread twin for single_threaded() blocks; only worth having where the forward runs on CPU threads.
        self._narrow_session: ort.InferenceSession | None = None
        self._narrow_lock = threading.Lock()
        self._narrows = self.providers[0] == "CPUExecutionProvider" and self.config.intra_op_threads != 1
        log.info("detector %s runs on %s", self.path.name, ", ".join(self.providers))

        metadata = _read_metadata(self.session, self.path)
        if "names" not in metadata:
            raise ValueError(f"{self.path}: no class names in the model metadata (key 'names')")
        names = ast.literal_eval(metadata["names"])  # model metadata, not request data; literals only
        self.class_names: tuple[str, ...] = tuple(names[i] for i in sorted(names))
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        fixed_batch = model_input.shape[0]
        self.fixed_batch: int | None = fixed_batch if isinstance(fixed_batch, int) else None
        if "imgsz" in metadata:
            size = ast.literal_eval(metadata["imgsz"])
            self.input_size = (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (size, size)
        else:
            self.input_size = (int(model_input.shape[2]), int(model_input.shape[3]))
        self.version = metadata.get("model_version") or f"{self.path.stem}@unversioned"
        self.metadata = metadata
        self.mask_dim = self._mask_dim()  # M mask coefficients per candidate; 0 for detection models
        self.has_masks = self.mask_dim > 0
        # Letterbox resizes done ahead of time by prepare(): id(image) -> (weak ref to the image, pixels). PIL
        # images are unhashable; the weak ref tells a live image from a new one that reuses a dead one's id.
        self._resized: OrderedDict[int, tuple[weakref.ref[Image.Image], np.ndarray]] = OrderedDict()
        self._resized_lock = threading.Lock()

    def _session(self, intra_op_threads: int) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = self.config.inter_op_threads
        options.graph_optimization_level = _OPTIMIZATION_LEVELS[self.config.graph_optimization]
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.config.allow_spinning else "0")
        return ort.InferenceSession(str(self.path), sess_options=options, providers=self._requested_providers)

    def _mask_dim(self) -> int:
        """M where the session's outputs are an ultralytics segmentation head's (output0 [B, 4 + C + M, N], output1
        prototypes [B, M, h, w]), else 0."""
        outputs = self.session.get_outputs()
        if len(outputs) != 2 or len(outputs[1].shape) != 4 or not isinstance(outputs[1].shape[1], int):
            return 0
        mask_dim = outputs[1].shape[1]
        rows = outputs[0].shape[1] if len(outputs[0].shape) == 3 else None
        if isinstance(rows, int) and rows != 4 + self.num_classes + mask_dim:
            raise ValueError(
                f"{self.path}: output0 has {rows} rows but 4 boxes + {self.num_classes} classes + {mask_dim} mask "
                "coefficients were expected from its prototypes output"
            )
        return mask_dim

    def _current_session(self) -> ort.InferenceSession:
        if not (self._narrows and getattr(_NARROW, "active", False)):
            return self.session
        with self._narrow_lock:
            if self._narrow_session is None:
                self._narrow_session = self._session(1)
            return self._narrow_session

    def prepare(self, image: Image.Image) -> None:
        """Resize an RGB image to its letterbox size now, on the caller's thread (a pipeline's decode workers),
        so the batch that later holds it skips that step: the one preprocessing cost that scales with pixels."""
        height, width = self.input_size
        pixels = np.asarray(_resize(image, *letterbox_size(image.size, height, width)))
        with self._resized_lock:
            self._resized[id(image)] = (weakref.ref(image), pixels)
            while len(self._resized) > PREPARED_LIMIT:  # prepared but never scored: forget the oldest
                self._resized.popitem(last=False)

    def _take_prepared(self, images: list[Image.Image]) -> list[np.ndarray | None]:
        with self._resized_lock:
            entries = [self._resized.pop(id(image), None) for image in images]
        pairs = zip(entries, images, strict=True)
        return [entry[1] if entry and entry[0]() is image else None for entry, image in pairs]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def torch_twin(self) -> Any:
        """The torch network this ONNX model was exported from, when we have it: the embedded YOLOv3-tiny (its int8
        twin included); None for other models (their twin is configured: TorchDetector.from_ultralytics)."""
        from .torch_detector import TorchDetector

        twin = TorchDetector.embedded()
        return twin if twin.version == self.version.removesuffix("+int8") else None

    def describe(self) -> dict[str, object]:
        return {
            "model": self.path.name,
            "version": self.version,
            "providers": self.providers,
            "input_size": list(self.input_size),
            "num_classes": self.num_classes,
            "masks": self.has_masks,
        }

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        """Run the session over a preprocessed batch, chunked to the model's fixed batch or configured size: every
        output of the model, each [B, ...] (one for detection models; two for segmentation models)."""
        step = self.fixed_batch or max(1, self.config.batch_size)
        session = self._current_session()
        chunks = []
        for start in range(0, batch.shape[0], step):
            chunk = batch[start : start + step]
            real = chunk.shape[0]
            if self.fixed_batch and real < self.fixed_batch:
                filler = np.zeros((self.fixed_batch - real, *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = np.concatenate([chunk, filler])
            chunks.append([output[:real] for output in session.run(None, {self.input_name: chunk})])
        return [np.concatenate(parts) for parts in zip(*chunks, strict=True)]

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Preprocessed [B, 3, H, W] float32 -> raw model output [B, 4 + C, N] ([B, 4 + C + M, N] for
        segmentation models: then the mask coefficients)."""
        return self._run(batch)[0]

    def decode(self, raw: np.ndarray, geometry: Letterbox, image_sizes: np.ndarray) -> torch.Tensor:
        """Raw [B, 4 + C, N] -> candidates [B, N, 4 + C], boxes x0y0x1y1 in original pixels, clipped."""
        return decode_candidates(torch.from_numpy(np.ascontiguousarray(raw)), geometry, image_sizes).contiguous()

    def detect(self, images: list[Image.Image]) -> Detections:
        """RGB PIL images -> Detections: candidates [B, N, 4 + C] (see decode) and, for segmentation models, the
        mask coefficients [B, N, M] and prototypes [B, M, h, w] that instance_masks() turns into masks."""
        height, width = self.input_size
        batch, geometry = letterbox_batch(images, height, width, self._take_prepared(images))
        sizes = np.array([image.size for image in images], dtype=np.float64)
        outputs = self._run(batch)
        if not self.has_masks:
            return Detections(self.decode(outputs[0], geometry, sizes), None, None, geometry, sizes)
        split = 4 + self.num_classes
        candidates = self.decode(outputs[0][:, :split], geometry, sizes)
        coefficients = torch.from_numpy(outputs[0][:, split:]).transpose(1, 2)  # [B, N, M], a view
        return Detections(candidates, coefficients, torch.from_numpy(outputs[1]), geometry, sizes)

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB PIL images -> candidates [B, N, 4 + C] (see decode)."""
        return self.detect(images).candidates

    def instance_masks(
        self,
        detections: Detections,
        image_index: int,
        candidate_indices: Sequence[int] | torch.Tensor,
        boxes: Sequence[Sequence[float]] | torch.Tensor,
    ) -> torch.Tensor:
        """Binary masks [K, H, W] (bool, the original image's pixels) of K candidates of image `image_index`.

        boxes: [K, 4] x0 y0 x1 y1 in original pixels (the candidates' boxes, or the kept boxes after NMS). The rule
        of ultralytics' ops.process_mask_native (retina_masks=True) with the letterbox handled as ops.scale_masks:
        logits = coefficients @ protos.view(M, -1) viewed [K, h, w]; bilinear upsampling to the letterboxed input
        size; the letterbox padding cropped away and the content resized (bilinear) to the original image; pixels
        outside each box zeroed (ops.crop_mask: columns x0 <= x < x1, rows y0 <= y < y1); kept where
        sigmoid(logit) > 0.5, i.e. logit > 0. As in ultralytics 8.4 the logits are interpolated, not the sigmoid
        (older releases applied the sigmoid first, which moves border pixels slightly). Unlike
        process_mask_native, which upsamples the prototypes by 4, 2 or 1 depending on the padding (a speed-up),
        this always goes through the full input size, as process_mask(upsample=True) does."""
        if detections.coefficients is None or detections.protos is None:
            raise ValueError(f"{self.path.name} is not a segmentation model: its detections carry no masks")
        indices = torch.as_tensor(candidate_indices, dtype=torch.long).cpu().reshape(-1)
        boxes = torch.as_tensor(boxes).detach().to("cpu", torch.float32).reshape(-1, 4)
        if len(boxes) != len(indices):
            raise ValueError(f"{len(indices)} candidate indices but {len(boxes)} boxes")
        image_w, image_h = (int(v) for v in detections.image_sizes[image_index])
        masks = torch.zeros((len(indices), image_h, image_w), dtype=torch.bool)
        if len(indices) == 0:
            return masks
        protos = detections.protos[image_index].float()
        mask_dim, proto_h, proto_w = protos.shape
        coefficients = detections.coefficients[image_index, indices].float()  # [K, M]
        logits = (coefficients @ protos.reshape(mask_dim, -1)).view(1, -1, proto_h, proto_w)
        # The letterbox content in input pixels, exactly as letterbox_batch placed it (and as scale_masks derives).
        height, width = self.input_size
        scale = float(detections.geometry.scale[image_index])
        pad_x, pad_y = (int(v) for v in detections.geometry.padding[image_index])
        new_w, new_h = max(int(np.round(image_w * scale)), 1), max(int(np.round(image_h * scale)), 1)
        step = max(1, MASK_PIXEL_BUDGET // (image_h * image_w + height * width))
        for start in range(0, len(indices), step):
            chunk = F.interpolate(logits[:, start : start + step], (height, width), mode="bilinear")
            chunk = chunk[..., pad_y : pad_y + new_h, pad_x : pad_x + new_w]
            chunk = F.interpolate(chunk, (image_h, image_w), mode="bilinear")
            torch.gt(chunk[0], 0, out=masks[start : start + step])
        x0, y0, x1, y1 = boxes[:, :, None].unbind(1)  # each [K, 1]
        columns = torch.arange(image_w, dtype=torch.float32)[None, None, :]
        rows = torch.arange(image_h, dtype=torch.float32)[None, :, None]
        masks &= (columns >= x0[:, None]) & (columns < x1[:, None])
        masks &= (rows >= y0[:, None]) & (rows < y1[:, None])
        return masks
