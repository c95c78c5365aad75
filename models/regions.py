"""Image regions as class-agnostic instance masks (a FastSAM-style segmenter over any ultralytics seg ONNX export)
and the labellers that name them: CLIP zero-shot over candidate labels, or the detector's best-IoU detection."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image
from rewardscope.kernels import ops as kernel_ops
from rewardscope.kernels.reference import pairwise_iou

from .clip import ClipBackbone, masked_crop
from .detection.detector import DetectorConfig, OnnxDetector
from .prompt import COCO_CLASSES, parse_prompt

# FastSAM's predictor is ultralytics' segmentation predictor with prompt handling on top (ultralytics
# models/fastsam/predict.py: FastSAMPredictor(SegmentationPredictor)); its NMS reads the predict defaults of
# cfg/default.yaml (`iou: 0.7`; `conf` unset, which engine/predictor.py turns into 0.25).
FASTSAM_CONF_THRESHOLD = 0.25
FASTSAM_IOU_THRESHOLD = 0.7
DEFAULT_MAX_MASKS = 32
# A mask takes a detection's label when their boxes overlap at least this much (IoU).
LABEL_MATCH_IOU = 0.5
CLIP_LABEL_TEMPLATE = "a photo of a {}"


class Region(NamedTuple):
    """One class-agnostic instance of an image.

    mask: [H, W] bool at the image's size; box: (x0, y0, x1, y1) in image pixels (the mask lies inside it);
    score: its candidate's best class score; candidate: that candidate's index in the segmenter's raw output."""

    mask: np.ndarray
    box: tuple[float, float, float, float]
    score: float
    candidate: int


class RegionLabel(NamedTuple):
    """A region's name and how sure its labeller is: CLIP's softmax probability of the argmax label, or the
    matched detection's score."""

    label: str
    confidence: float


@runtime_checkable
class Segmenter(Protocol):
    """RGB images -> per image its regions (class-agnostic instance masks), best score first."""

    version: str

    def __call__(self, images: list[Image.Image]) -> list[list[Region]]: ...

    def describe(self) -> dict[str, Any]: ...


@runtime_checkable
class RegionLabeller(Protocol):
    """Names regions. prompt_labels: the labels a prompt names itself (in first-mention order; the labeller's
    candidates or queries for that prompt). __call__: per image, one RegionLabel per region, or None for a region
    it cannot name (left out of the regions judged)."""

    version: str

    def prompt_labels(self, prompt: str) -> tuple[str, ...]: ...

    def __call__(
        self, images: list[Image.Image], prompt_labels: Sequence[Sequence[str]], regions: Sequence[Sequence[Region]]
    ) -> list[list[RegionLabel | None]]: ...

    def describe(self) -> dict[str, Any]: ...


@functools.lru_cache(maxsize=4)
def segmentation_network(path: str, config: DetectorConfig) -> OnnxDetector:
    """The ONNX session of a segmentation export, one per (model, runtime config) per process."""
    network = OnnxDetector(Path(path), config)
    if not network.has_masks:
        raise ValueError(f"{path} is not an ultralytics segmentation export (no mask prototypes output)")
    return network


def kept_detections(
    candidates: torch.Tensor,
    conf_threshold: float,
    iou_threshold: float,
    max_detections: int,
    kernels_backend: str | None = None,
    num_classes: torch.Tensor | None = None,
) -> kernel_ops.BoxMatch:
    """box_match with no prompt slots: the detections its confidence filter and class-aware NMS keep (keep_boxes,
    keep_classes, keep_scores, num_kept), for code that labels regions rather than counting prompt objects."""
    no_slots = torch.full((candidates.shape[0], 1), -1, dtype=torch.int64)
    return kernel_ops.box_match(
        candidates,
        no_slots,
        torch.zeros_like(no_slots),
        conf_threshold,
        iou_threshold,
        max_detections,
        num_classes=num_classes,
        backend=kernels_backend,
    )


class FastSamSegmenter:
    """Class-agnostic instance masks from an ultralytics segmentation export read through OnnxDetector: FastSAM
    (a YOLOv8-seg with the one class "object") or any `-seg` model, its classes ignored.

    A candidate's score is its best class score; candidates above conf_threshold go through one class-agnostic
    NMS at iou_threshold (box_match with the class columns collapsed to their max); the first max_masks kept
    give masks (OnnxDetector.instance_masks: at image resolution, inside the kept box). A kept box whose mask has
    no pixel is no region. Masks are held in memory at image size: [max_masks, H, W] bool per image."""

    def __init__(
        self,
        path: str | Path,
        conf_threshold: float = FASTSAM_CONF_THRESHOLD,
        iou_threshold: float = FASTSAM_IOU_THRESHOLD,
        max_masks: int = DEFAULT_MAX_MASKS,
        config: DetectorConfig | None = None,
        kernels_backend: str | None = None,
    ) -> None:
        if not 0 <= conf_threshold < 1 or not 0 < iou_threshold <= 1 or max_masks < 1:
            raise ValueError("mask conf_threshold must be in [0, 1), iou_threshold in (0, 1] and max_masks >= 1")
        self.conf_threshold, self.iou_threshold, self.max_masks = conf_threshold, iou_threshold, max_masks
        self.kernels_backend = kernels_backend
        self.network = segmentation_network(str(path), config or DetectorConfig())
        self.version = self.network.version

    def describe(self) -> dict[str, Any]:
        return {
            **self.network.describe(),
            "class_agnostic": True,
            "conf_threshold": self.conf_threshold,
            "iou_threshold": self.iou_threshold,
            "max_masks": self.max_masks,
        }

    def __call__(self, images: list[Image.Image]) -> list[list[Region]]:
        """One network pass over the images -> per image its regions, best score first."""
        if not images:
            return []
        detections = self.network.detect(images)
        candidates = detections.candidates
        agnostic = torch.cat([candidates[..., :4], candidates[..., 4:].amax(-1, keepdim=True)], -1)  # [B, N, 5]
        match = kept_detections(agnostic, self.conf_threshold, self.iou_threshold, self.max_masks, self.kernels_backend)
        regions = []
        for row in range(len(images)):
            kept = int(match.num_kept[row])
            indices, boxes = match.keep_indices[row, :kept].cpu(), match.keep_boxes[row, :kept].cpu()
            masks = self.network.instance_masks(detections, row, indices, boxes).numpy()
            scores = match.keep_scores[row, :kept].tolist()
            image_regions = []
            for mask, (x0, y0, x1, y1), score, index in zip(
                masks, boxes.tolist(), scores, indices.tolist(), strict=True
            ):
                if mask.any():
                    image_regions.append(Region(mask, (x0, y0, x1, y1), score, index))
            regions.append(image_regions)
        return regions


def best_iou_matches(
    boxes: torch.Tensor, targets: torch.Tensor, min_iou: float = LABEL_MATCH_IOU
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of boxes [A, 4] the target of targets [T, 4] with the highest IoU (the first on ties) and that IoU:
    index [A] int64 (-1 where the best IoU is below min_iou, or there is no target) and IoU [A] float64."""
    if len(boxes) == 0 or len(targets) == 0:
        return torch.full((len(boxes),), -1, dtype=torch.int64), torch.zeros(len(boxes), dtype=torch.float64)
    iou = pairwise_iou(boxes, targets)  # [A, T]
    index = iou.argmax(1)
    best = iou.gather(1, index[:, None])[:, 0]
    return torch.where(best >= min_iou, index, -1), best


def masks_for_boxes(
    regions: Sequence[Region], boxes: torch.Tensor, size: tuple[int, int], min_iou: float = LABEL_MATCH_IOU
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks for the detection boxes [K, 4] (x0 y0 x1 y1, image pixels) of an image of size (width, height), from
    its regions: each box takes the mask of the region whose box has the highest IoU with it (at least min_iou),
    kept inside the detection box (columns x0 <= x < x1, rows y0 <= y < y1, as OnnxDetector.instance_masks cuts);
    a box no region matches gets the whole box. Returns masks [K, H, W] bool and matched [K] bool."""
    width, height = size
    boxes = torch.as_tensor(boxes).detach().to("cpu", torch.float64).reshape(-1, 4)
    region_boxes = torch.tensor([region.box for region in regions], dtype=torch.float64).reshape(-1, 4)
    matched, _ = best_iou_matches(boxes, region_boxes, min_iou)
    masks = torch.ones((len(boxes), height, width), dtype=torch.bool)
    for position, index in enumerate(matched.tolist()):
        if index >= 0:
            masks[position] = torch.from_numpy(regions[index].mask)
    x0, y0, x1, y1 = boxes[:, :, None].unbind(1)  # each [K, 1]
    columns = torch.arange(width, dtype=torch.float64)[None, None, :]
    rows = torch.arange(height, dtype=torch.float64)[None, :, None]
    masks &= (columns >= x0[:, None]) & (columns < x1[:, None])
    masks &= (rows >= y0[:, None]) & (rows < y1[:, None])
    return masks, matched >= 0


def union_area(masks: Sequence[np.ndarray]) -> int:
    """Pixels covered by at least one of the [H, W] bool masks (overlaps count once)."""
    if not masks:
        return 0
    union = masks[0].copy()
    for mask in masks[1:]:
        union |= mask
    return int(union.sum())


def prompt_objects(prompt: str) -> tuple[str, ...]:
    """The objects of the prompt's open-vocabulary parse, distinct, in first-mention order: COCO classes by their
    COCO names (synonyms and plurals resolved), other countable nouns by their singular head noun. What the
    matching reward queries an open-vocabulary detector with."""
    parsed = parse_prompt(prompt, COCO_CLASSES, open_vocabulary=True)
    return tuple(dict.fromkeys(spec.class_name for spec in parsed.objects))


def prompt_nouns(prompt: str) -> tuple[str, ...]:
    """The prompt's nouns, distinct, in first-mention order: its objects (prompt_objects), then the nouns the
    parser keeps apart as no countable object (scenes such as "kitchen")."""
    parsed = parse_prompt(prompt, COCO_CLASSES, open_vocabulary=True)
    return tuple(dict.fromkeys([spec.class_name for spec in parsed.objects] + list(parsed.unknown)))


class ClipRegionLabeller:
    """CLIP zero-shot names for regions: each region's masked crop (the mask pasted over grey #999, cropped to its
    box: clip.masked_crop) against "a photo of a {label}" for each candidate label; the label is the argmax, with
    its softmax probability (cosines times CLIP's logit scale). Candidates per image: labels_for_prompt(prompt)
    (default: the prompt's nouns), then general_labels (default: the 80 COCO classes)."""

    def __init__(
        self,
        backbone: ClipBackbone,
        labels_for_prompt: Callable[[str], Sequence[str]] = prompt_nouns,
        general_labels: Sequence[str] = COCO_CLASSES,
        template: str = CLIP_LABEL_TEMPLATE,
        batch_size: int = 64,
    ) -> None:
        self.backbone, self.labels_for_prompt, self.general_labels = backbone, labels_for_prompt, tuple(general_labels)
        self.template, self.batch_size = template, max(1, batch_size)
        self.version = f"clip:{backbone.version}"
        self._label_embeddings: dict[str, torch.Tensor] = {}  # label -> [D] unit text embedding
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {
            "labeller": "clip",
            "version": self.version,
            "clip": self.backbone.describe(),
            "template": self.template,
            "candidates": f"the prompt's nouns, then {len(self.general_labels)} general labels",
        }

    def prompt_labels(self, prompt: str) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.labels_for_prompt(prompt)))

    def candidates(self, prompt_labels: Sequence[str]) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*prompt_labels, *self.general_labels]))

    def text_embeddings(self, labels: Sequence[str]) -> torch.Tensor:
        """[L, D] unit text embeddings of the labels in the template; labels not seen before in one CLIP call."""
        with self._lock:
            missing = [label for label in dict.fromkeys(labels) if label not in self._label_embeddings]
            if missing:
                texts = [self.template.format(label) for label in missing]
                fresh = self.backbone.text_embeddings(texts, self.batch_size).cpu()
                self._label_embeddings.update(zip(missing, fresh, strict=True))
            if not labels:
                return torch.zeros((0, self.backbone.embedding_dim))
            return torch.stack([self._label_embeddings[label] for label in labels])

    def __call__(
        self, images: list[Image.Image], prompt_labels: Sequence[Sequence[str]], regions: Sequence[Sequence[Region]]
    ) -> list[list[RegionLabel | None]]:
        """All regions of all images in one CLIP image call; each image's regions scored against its candidates."""
        crops = [
            masked_crop(image, region.mask, region.box)
            for image, image_regions in zip(images, regions, strict=True)
            for region in image_regions
        ]
        if not crops:
            return [[] for _ in images]
        candidates = [self.candidates(labels) for labels in prompt_labels]
        known = list(dict.fromkeys(label for labels in candidates for label in labels))
        text = dict(zip(known, self.text_embeddings(known), strict=True))
        embeddings = self.backbone.image_embeddings(crops, self.batch_size).cpu()
        labelled: list[list[RegionLabel | None]] = []
        start = 0
        for labels, image_regions in zip(candidates, regions, strict=True):
            rows = embeddings[start : start + len(image_regions)]
            start += len(image_regions)
            logits = self.backbone.logit_scale * rows @ torch.stack([text[label] for label in labels]).T
            probabilities, best = logits.softmax(-1).max(-1)
            labelled.append(
                [RegionLabel(labels[i], p) for i, p in zip(best.tolist(), probabilities.tolist(), strict=True)]
            )
        return labelled


class DetectorRegionLabeller:
    """Names regions after a detector's detections: a region takes the label of the kept detection whose box has
    the highest IoU with the region's box, at least match_iou; a region with none stays unlabelled (None).

    Closed-vocabulary detectors (a Detector: __call__ -> candidates [B, N, 4 + C], class_names) are read at the
    reward's conf / iou thresholds through box_match. Open-vocabulary detectors (attribute `open_vocabulary =
    True` and `detect_queries(images, queries) -> (candidates [B, N, 4 + Q], num_queries [B])`, queries one list
    per image) are queried with the prompt's objects (prompt_objects) followed by `general_labels` (default the 80
    COCO names), so a region can be named by something the prompt does not ask for, which is what the language
    model then judges; their labels are those queries."""

    def __init__(
        self,
        detector: Any,
        conf_threshold: float = 0.25,
        iou_threshold: float = 0.45,
        max_detections: int = 100,
        match_iou: float = LABEL_MATCH_IOU,
        kernels_backend: str | None = None,
        general_labels: Sequence[str] = COCO_CLASSES,
    ) -> None:
        self.detector, self.match_iou, self.kernels_backend = detector, match_iou, kernels_backend
        self.general_labels = tuple(general_labels)
        self.conf_threshold, self.iou_threshold, self.max_detections = conf_threshold, iou_threshold, max_detections
        self.open_vocabulary = bool(getattr(detector, "open_vocabulary", False))
        self.version = f"detector:{detector.version}"

    def describe(self) -> dict[str, Any]:
        return {
            "labeller": "detector",
            "version": self.version,
            "detector": self.detector.describe(),
            "open_vocabulary": self.open_vocabulary,
            **({"general_labels": len(self.general_labels)} if self.open_vocabulary else {}),
            "match_iou": self.match_iou,
            "unlabelled": f"a mask whose box meets no kept detection at IoU >= {self.match_iou} is left out",
        }

    def prompt_labels(self, prompt: str) -> tuple[str, ...]:
        """Open vocabulary: the prompt's objects (the detector's queries, as the matching reward asks them). Closed:
        the detector classes it names."""
        if self.open_vocabulary:
            return prompt_objects(prompt)
        return tuple(dict.fromkeys(spec.class_name for spec in parse_prompt(prompt, self.detector.class_names).objects))

    def detections(
        self, images: list[Image.Image], prompt_labels: Sequence[Sequence[str]]
    ) -> list[tuple[torch.Tensor, list[str], list[float]]]:
        """One detector pass -> per image its kept detections: boxes [D, 4], label names [D], scores [D]."""
        batch = len(images)
        if self.open_vocabulary:
            queries = [list(dict.fromkeys([*labels, *self.general_labels])) for labels in prompt_labels]
            if not any(queries):
                return [(torch.zeros((0, 4)), [], []) for _ in images]
            candidates, num_queries = self.detector.detect_queries(images, queries)
            names = queries
            extra = {"num_classes": torch.as_tensor(num_queries, dtype=torch.int64).cpu()}
        else:
            candidates, names, extra = self.detector(images), [list(self.detector.class_names)] * batch, {}
        match = kept_detections(
            candidates.detach().cpu(),
            self.conf_threshold,
            self.iou_threshold,
            self.max_detections,
            self.kernels_backend,
            **extra,
        )
        kept = []
        for row in range(batch):
            count = int(match.num_kept[row])
            classes = match.keep_classes[row, :count].tolist()
            labels = [names[row][class_id] for class_id in classes]
            kept.append((match.keep_boxes[row, :count], labels, match.keep_scores[row, :count].tolist()))
        return kept

    def __call__(
        self, images: list[Image.Image], prompt_labels: Sequence[Sequence[str]], regions: Sequence[Sequence[Region]]
    ) -> list[list[RegionLabel | None]]:
        labelled: list[list[RegionLabel | None]] = []
        for (boxes, labels, scores), image_regions in zip(self.detections(images, prompt_labels), regions, strict=True):
            region_boxes = torch.tensor([region.box for region in image_regions], dtype=torch.float64).reshape(-1, 4)
            matched, _ = best_iou_matches(region_boxes, boxes, self.match_iou)
            labelled.append([RegionLabel(labels[i], scores[i]) if i >= 0 else None for i in matched.tolist()])
        return labelled
