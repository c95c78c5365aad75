"""Detection matching rewards: the seed matching score (arXiv 2412.00122), GenEval's strict check and
T2I-CompBench's numeracy score, all computed from one batched detector pass and one box_match call."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rewardscope.kernels import ops as kernel_ops

from ..prompt import (
    COCO_CLASSES,
    GENEVAL_COLORS,
    ObjectSpec,
    ParsedPrompt,
    from_geneval_metadata,
    geneval_name,
    parse_prompt,
    to_geneval_metadata,
)
from ..registry import RewardDeclaration, declaration, matching_variants, register_reward
from ..types import RewardOutput, Sample, Unscorable, score_planned
from .detector import EMBEDDED, Detector, DetectorConfig, OnnxDetector

MAX_LAYOUT_TARGETS = 64
# GenEval: an offset counts as a relation only beyond this fraction of the two boxes' summed extent.
GENEVAL_POSITION_THRESHOLD = 0.1
# The IoU a detector's own post-processing suppresses at, when it does not say (YOLO family: Darknet's 0.45).
DEFAULT_DETECTOR_NMS_IOU = 0.45
DENOMINATORS = ("known_objects", "all_nouns")
# Text queries one item may send an open-vocabulary detector (its prompt's distinct nouns): bounds the per-item
# class columns a request can make the detector and box_match compute.
MAX_OPEN_QUERIES = 32


def f1_score(
    category: torch.Tensor, quantity: torch.Tensor, mask: torch.Tensor, unseen: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """C, Q = sums over the masked slots of [B, K] confidences, divided by the number of objects (plus `unseen` [B],
    nouns that count in the denominator with 0, as the seed code's do); score = 2CQ / (C + Q), 0 when both are 0."""
    weights = mask.to(category.dtype)
    objects = weights.sum(-1)
    if unseen is not None:
        objects = objects + unseen.to(category.dtype)
    objects = objects.clamp(min=1)
    category_mean = (category * weights).sum(-1) / objects
    quantity_mean = (quantity.to(category.dtype) * weights).sum(-1) / objects
    total = category_mean + quantity_mean
    score = torch.where(total > 0, 2 * category_mean * quantity_mean / total.clamp(min=1e-12), torch.zeros_like(total))
    return score, category_mean, quantity_mean


def seed_score(
    counts: torch.Tensor,
    confidence_mean: torch.Tensor,
    requested: torch.Tensor,
    mask: torch.Tensor,
    unseen: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The seed matching score for [B, K] slots (mask marks real prompt objects).

    q_i = min(d_i, n_i) / max(d_i, n_i) (0 when d_i = 0); c_i = mean detection score (0 when none);
    C, Q = means over objects (unseen [B]: nouns the detector cannot see, counted with 0); score = 2CQ / (C + Q),
    0 when both are 0. Returns score [B], C [B], Q [B], quantity confidence per slot [B, K].
    """
    detected, wanted = counts.to(confidence_mean.dtype), requested.to(confidence_mean.dtype)
    quantity = torch.minimum(detected, wanted) / torch.maximum(detected, wanted).clamp(min=1)
    score, category_mean, quantity_mean = f1_score(confidence_mean, quantity, mask, unseen)
    return score, category_mean, quantity_mean, quantity * mask


def numeracy_score(counts: torch.Tensor, requested: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """T2I-CompBench numeracy: mean over objects of 0.5 * [present] + 0.5 * [exact count]. [B, K] -> [B]."""
    weights = mask.to(torch.float64)
    per_object = 0.5 * (counts > 0).double() + 0.5 * (counts == requested).double()
    return (per_object * weights).sum(-1) / weights.sum(-1).clamp(min=1)


def relative_position(box_a: np.ndarray, box_b: np.ndarray) -> set[str]:
    """GenEval's relations of box A to box B ([4] x0y0x1y1): offsets of centres beyond a margin."""
    boxes = np.stack([box_a, box_b]).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=1)
    dim_a, dim_b = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - GENEVAL_POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def geneval_check(
    parsed: ParsedPrompt,
    detections: dict[str, list[np.ndarray]],
    colors: Mapping[int, list[str]] | None = None,
) -> tuple[bool, list[str]]:
    """GenEval's strict verdict: every include present with count >= n (colours, then positions, checked on the
    top-n boxes of each group), every exclude with count < its count. detections: class -> boxes by score;
    colors: object index -> the classified colour of each of its top-n boxes (needed for objects with a colour)."""
    reasons: list[str] = []
    matched_groups: list[list[np.ndarray] | None] = []
    for index, spec in enumerate(parsed.objects):
        name = geneval_name(spec.class_name)  # reasons name classes as GenEval does ("tv remote")
        found = detections.get(spec.class_name, [])[: spec.count]
        matched = len(found) >= spec.count
        if not matched:
            reasons.append(f"expected {name}>={spec.count}, found {len(found)}")
        elif spec.color is not None:
            if colors is None or index not in colors:
                raise ValueError(f"object {index} ({spec.color} {spec.class_name}) needs classified colours")
            predicted = colors[index]
            if predicted.count(spec.color) < spec.count:
                matched = False
                # GenEval's wording (evaluate_images.py lines 186-190): the asked colour's count, then all found.
                found_colors = ", ".join(f"{predicted.count(c)} {c}" for c in GENEVAL_COLORS if c in predicted)
                reasons.append(
                    f"expected {spec.color} {name}>={spec.count}, found {predicted.count(spec.color)} {spec.color}; "
                    f"and {found_colors}"
                )
        if matched and spec.relation is not None and spec.relation.relation != "next to":
            targets = matched_groups[spec.relation.target] if spec.relation.target < len(matched_groups) else None
            if targets is None:
                matched = False
                reasons.append(f"no target for {name} to be {spec.relation.relation}")
            else:
                failed = next(
                    (
                        relations
                        for box in found
                        for target in targets
                        if spec.relation.relation not in (relations := relative_position(box, target))
                    ),
                    None,
                )
                if failed is not None:  # GenEval's wording (lines 203-206), the relations that do hold named
                    matched = False
                    reasons.append(
                        f"expected {name} {spec.relation.relation} target, found {' and '.join(sorted(failed))} target"
                    )
        matched_groups.append(found if matched else None)
    for spec in parsed.exclude:
        if len(detections.get(spec.class_name, [])) >= spec.count:
            found_all = len(detections[spec.class_name])
            reasons.append(f"expected {geneval_name(spec.class_name)}<{spec.count}, found {found_all}")
    return not reasons, reasons


def load_detector(
    detector: str | os.PathLike[str] | Detector | None,
    config: DetectorConfig,
    quantized: bool = False,
    options: Mapping[str, Any] | None = None,
) -> Detector:
    """A reward's `detector` option -> a Detector: None or "embedded" (the embedded YOLOv3-tiny), an ONNX path,
    a transformers model (a directory, or a hub id in the local HF cache): zero-shot families (OWL-ViT, OWLv2,
    Grounding DINO) as an open-vocabulary ZeroShotDetector, closed-vocabulary ones as an HFDetector; or a Detector
    object, used as it is. ONNX sessions are shared per (model, runtime config) per process.
    quantized: run the ONNX model's int8 twin (static quantization, built once and cached; a CPU speed option).
    options: keyword arguments of a zero-shot detector (ZeroShotDetector: query_template, text_cache_size,
    onnx_image_encoder); refused for the other backends."""
    if detector is not None and not isinstance(detector, (str, os.PathLike)):
        if not isinstance(detector, Detector):
            raise TypeError(f"detector must be a path, 'embedded' or a Detector, got {type(detector).__name__}")
        if options:
            raise ValueError("detector_options apply to a zero-shot model named by path, not to a Detector object")
        return detector
    name = str(detector) if detector is not None else None
    refused = ValueError(f"detector_options ({', '.join(sorted(options or {}))}) apply to zero-shot detectors only")
    if name in (None, "", EMBEDDED):
        if options:
            raise refused
        return _onnx_detector(None, config, quantized)
    from .hf_detector import is_transformers_detector, load_hf_detector
    from .zero_shot import is_zero_shot_detector, load_zero_shot_detector

    if is_zero_shot_detector(name):  # OWL-ViT, OWLv2, Grounding DINO: text queries, an open vocabulary
        return load_zero_shot_detector(name, config, quantized, **dict(options or {}))
    if options:
        raise refused
    if is_transformers_detector(name):  # a transformers model directory, or a hub id in the local HF cache
        return load_hf_detector(name, config, quantized)
    return _onnx_detector(name, config, quantized)


@functools.lru_cache(maxsize=8)
def _onnx_detector(path: str | None, config: DetectorConfig, quantized: bool) -> OnnxDetector:
    from .export import embedded_detector_path

    source = Path(path) if path else embedded_detector_path()
    if quantized:
        from .quantize import quantized_path

        source = quantized_path(source)
    return OnnxDetector(source, config)


@dataclass
class _Plan:
    """A sample's prompt turned into detector slots: objects first, then GenEval excludes."""

    parsed: ParsedPrompt
    class_ids: list[int]
    requested: list[int]
    targets: list[tuple[int, list[float]]] | None = None  # layout variant: (class index, box x0 y0 x1 y1)
    conf: float = 0.0  # the detection confidence this item is judged at (GenEval: 0.9 for counting prompts)
    # The item's class names, indexed by class_ids and by the detector's score columns: the detector's vocabulary,
    # or for an open-vocabulary detector the item's own queries (its distinct nouns, in prompt order).
    names: tuple[str, ...] = ()


class MatchingReward:
    """Detection matching score. Higher is better; all variants lie in [0, 1]."""

    name = "matching"

    def __init__(
        self,
        variant: str = "seed",
        detector: str | None = None,
        conf_threshold: float = 0.25,
        iou_threshold: float | None = 0.45,
        max_detections: int = 100,
        counting_conf_threshold: float | None = None,
        max_per_class: int | None = None,
        multi_label: bool = False,
        containment_threshold: float = 1.0,
        denominator: str = "known_objects",
        batch_size: int = 8,
        providers: tuple[str, ...] | None = None,
        intra_op_threads: int = 0,
        allow_spinning: bool = False,
        kernels_backend: str | None = None,
        layout_iou: float = 0.5,
        quantized: bool = False,
        color_model: str | None = None,
        color_processor: str | None = None,
        color_device: str | None = None,
        color_segmenter: str | None = None,
        color_mask_conf_threshold: float = 0.25,
        detector_options: Mapping[str, Any] | None = None,
    ) -> None:
        variants = matching_variants()
        if variant not in variants:
            raise ValueError(f"unknown matching variant {variant!r}; choose from {', '.join(variants)}")
        if not 0 <= conf_threshold < 1 or (iou_threshold is not None and not 0 < iou_threshold <= 1):
            raise ValueError("conf_threshold must be in [0, 1) and iou_threshold in (0, 1] (or None)")
        if counting_conf_threshold is not None and not 0 <= counting_conf_threshold < 1:
            raise ValueError("counting_conf_threshold must be in [0, 1)")
        if not 0 < containment_threshold <= 1 or (max_per_class is not None and max_per_class < 1):
            raise ValueError("containment_threshold must be in (0, 1] and max_per_class at least 1")
        if denominator not in DENOMINATORS:
            raise ValueError(f"denominator must be one of {', '.join(DENOMINATORS)}, got {denominator!r}")
        self.variant = variant
        self.kernels_backend, self.layout_iou = kernels_backend, layout_iou
        self.conf_threshold = conf_threshold
        self.counting_conf_threshold = counting_conf_threshold
        self.max_per_class, self.multi_label = max_per_class, bool(multi_label)
        self.containment_threshold, self.denominator = containment_threshold, denominator
        self.max_detections, self.batch_size = max_detections, max(1, batch_size)
        config = DetectorConfig(
            providers=tuple(providers) if providers else None,
            intra_op_threads=intra_op_threads,
            allow_spinning=allow_spinning,
            batch_size=batch_size,
        )
        self.detector = load_detector(detector, config, quantized, detector_options)
        # None: only the suppression the detector's own post-processing needs (YOLO: 0.45; set-prediction
        # detectors such as DETR or YOLOS: none, 1.0), as evaluators that add no NMS of their own see it.
        self.iou_threshold = (
            iou_threshold if iou_threshold is not None else getattr(self.detector, "nms_iou", DEFAULT_DETECTOR_NMS_IOU)
        )
        self.vocabulary = self.detector.class_names  # () for an open vocabulary
        self.class_index = {name: index for index, name in enumerate(self.vocabulary)}
        # An open-vocabulary detector (ZeroShotDetector) is asked for each item's nouns as text queries. The parser
        # still reads COCO's names (multi-word names, synonyms) as it does for the default detector, so a COCO
        # object parses the same either way; every other countable noun becomes an object too.
        self.open_vocabulary = bool(getattr(self.detector, "open_vocabulary", False))
        self.parse_vocabulary = COCO_CLASSES if self.open_vocabulary else self.vocabulary
        self.version = self.detector.version
        # GenEval's colour attributes: CLIP zero-shot colour of each box crop (models/clip.py), when configured.
        self.color_classifier = None
        if color_model:
            from ..clip import ColorClassifier, load_clip

            self.color_classifier = ColorClassifier(load_clip(color_model, color_processor, color_device))
            self.version = f"{self.version}+colors:{self.color_classifier.backbone.version}"
        # GenEval's colour check on the masks of a separate segmenter (a FastSAM-style ultralytics -seg export,
        # models/regions.py), for detectors that give no masks of their own.
        self.color_segmenter = None
        if color_segmenter:
            if self.color_classifier is None:
                raise ValueError("color_segmenter gives masks for the colour check: it needs color_model too")
            from ..regions import FastSamSegmenter

            self.color_segmenter = FastSamSegmenter(
                color_segmenter, conf_threshold=color_mask_conf_threshold, kernels_backend=kernels_backend
            )
            self.version = f"{self.version}+color_masks:{self.color_segmenter.version}"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "variant": self.variant,
            "version": self.version,
            "detector": self.detector.describe(),
            # "open": each item's nouns are the detector's text queries; else the detector's fixed class list
            "vocabulary": "open" if self.open_vocabulary else list(self.vocabulary),
            "color_model": self.color_classifier.backbone.describe() if self.color_classifier else None,
            "color_segmenter": self.color_segmenter.describe() if self.color_segmenter else None,
            "params": {
                "conf_threshold": self.conf_threshold,
                "iou_threshold": self.iou_threshold,
                "max_detections": self.max_detections,
                "counting_conf_threshold": self.counting_conf_threshold,
                "max_per_class": self.max_per_class,
                "multi_label": self.multi_label,
                "containment_threshold": self.containment_threshold,
                "denominator": self.denominator,
            },
            # The ONNX detector runs in fp32 (int8 Conv when quantized); post-processing follows its output dtype.
            "precision": "int8" if self.detector.version.endswith("+int8") else "fp32",
            # the declaration of the registration this variant is (the Scorer adds the rest of it)
            "scale": declaration(matching_variants()[self.variant]).scale,
        }

    def gradient_form(self, name: str, torch_detector: dict[str, Any] | None = None) -> Any:
        """The soft, differentiable form on this reward's detector's torch twin (models/gradients.py)."""
        from ..gradients import matching_gradient

        return matching_gradient(name, self, torch_detector)

    def _layout_plan(self, sample: Sample) -> _Plan:
        layout = (sample.metadata or {}).get("layout")
        if not isinstance(layout, list) or not layout:
            raise Unscorable(
                "no_layout", "the layout variant needs metadata {'layout': [{'class': ..., 'box': [x0, y0, x1, y1]}]}"
            )
        if len(layout) > MAX_LAYOUT_TARGETS:
            raise ValueError(f"layout has {len(layout)} targets; the limit is {MAX_LAYOUT_TARGETS}")
        targets: list[tuple[int, list[float]]] = []
        for entry in layout:
            if not isinstance(entry, dict) or set(entry) != {"class", "box"}:
                raise ValueError("each layout target is {'class': name, 'box': [x0, y0, x1, y1]}")
            name, box = entry["class"], entry["box"]
            resolved = self._parse(f"a {name}").objects if isinstance(name, str) else ()
            if len(resolved) != 1:
                raise Unscorable("unknown_class", f"layout class {name!r} is not one the detector knows")
            if (
                not isinstance(box, list)
                or len(box) != 4
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
                or not (box[2] > box[0] and box[3] > box[1])
            ):
                raise ValueError(f"layout box {box!r} must be 4 finite numbers x0 < x1, y0 < y1 (image pixels)")
            targets.append((resolved[0].class_name, [float(v) for v in box]))
        counts: dict[str, int] = {}
        for class_name, _ in targets:
            counts[class_name] = counts.get(class_name, 0) + 1
        objects = tuple(ObjectSpec(c, n) for c, n in counts.items())
        names = self._names(objects)
        index = {name: position for position, name in enumerate(names)}
        parsed = ParsedPrompt(sample.prompt, objects, ())
        located = [(index[class_name], box) for class_name, box in targets]
        return _Plan(
            parsed, [index[c] for c in counts], list(counts.values()), located, self.conf_threshold, names=names
        )

    def _parse(self, prompt: str) -> ParsedPrompt:
        return parse_prompt(prompt, self.parse_vocabulary, open_vocabulary=self.open_vocabulary)

    def _names(self, slots: Any) -> tuple[str, ...]:
        """The class names an item's class ids index: the detector's vocabulary, or with an open vocabulary the
        item's distinct slot classes in order (its text queries)."""
        if not self.open_vocabulary:
            return self.vocabulary
        names = tuple(dict.fromkeys(spec.class_name for spec in slots))
        if len(names) > MAX_OPEN_QUERIES:
            raise Unscorable(
                "too_many_queries", f"the item names {len(names)} distinct objects; the limit is {MAX_OPEN_QUERIES}"
            )
        return names

    def _plan(self, sample: Sample) -> _Plan:
        if self.variant == "layout":
            return self._layout_plan(sample)
        metadata = sample.metadata or {}
        if "include" in metadata:
            parsed = from_geneval_metadata(metadata, self.parse_vocabulary, open_vocabulary=self.open_vocabulary)
            if self.variant == "geneval" and parsed.unknown:
                # GenEval judges every include: one the detector cannot see makes the verdict unknowable.
                raise Unscorable(
                    "unknown_class",
                    f"GenEval class(es) {', '.join(parsed.unknown)} are not in the detector's vocabulary: "
                    "the image cannot be judged",
                )
        else:
            parsed = self._parse(sample.prompt)
            if self.variant == "geneval":
                # GenEval's form: relation targets first, counting prompts exclude n + 1.
                geneval_form = to_geneval_metadata(parsed, self.parse_vocabulary)
                parsed = from_geneval_metadata(
                    geneval_form, self.parse_vocabulary, open_vocabulary=self.open_vocabulary
                )
        if not parsed.objects:
            if self.open_vocabulary:
                uncountable = f" (uncountable nouns: {', '.join(parsed.unknown)})" if parsed.unknown else ""
                raise Unscorable("no_countable_object", f"prompt names no countable object{uncountable}")
            unknown = f" (nouns it cannot see: {', '.join(parsed.unknown)})" if parsed.unknown else ""
            raise Unscorable("no_countable_object", f"prompt names no object the detector knows{unknown}")
        colors = [spec.color for spec in parsed.objects if spec.color] if self.variant == "geneval" else []
        if colors and self.color_classifier is None:
            raise Unscorable(
                "colour_unavailable", "colour attributes need a CLIP colour classifier; none is configured"
            )
        if colors and set(colors) - set(self.color_classifier.colors):  # type: ignore[union-attr]
            raise Unscorable(
                "colour_unavailable",
                f"GenEval classifies only {', '.join(self.color_classifier.colors)}; "  # type: ignore[union-attr]
                f"the prompt asks for {', '.join(sorted(set(colors)))}",
            )
        slots = list(parsed.objects) + (list(parsed.exclude) if self.variant == "geneval" else [])
        names = self._names(slots)
        index = self.class_index if not self.open_vocabulary else {name: i for i, name in enumerate(names)}
        ids, wanted = [index[s.class_name] for s in slots], [s.count for s in slots]
        counting = metadata.get("tag") == "counting" and self.counting_conf_threshold is not None
        conf = self.counting_conf_threshold if counting else self.conf_threshold
        return _Plan(parsed, ids, wanted, conf=conf, names=names)

    def score(self, samples: list[Sample]) -> list[RewardOutput]:
        return score_planned(samples, self._plan, self._score_batch, self.batch_size, lambda: {"variant": self.variant})

    def _score_batch(self, samples: list[Sample], plans: list[_Plan]) -> list[RewardOutput]:
        """One detector pass for the chunk; then one box_match per confidence threshold the items are judged at."""
        images = [sample.image for sample in samples]
        # GenEval's colour check reads each object's mask where the detector gives masks (ultralytics -seg exports).
        colored = self.color_classifier is not None and any(
            spec.color for plan in plans for spec in plan.parsed.objects
        )
        # A configured segmenter's masks take precedence over the detector's own (one pass per chunk).
        segmented = self.color_segmenter(images) if colored and self.color_segmenter is not None else None
        wants_masks = colored and segmented is None and getattr(self.detector, "has_masks", False)
        detections = self.detector.detect(images) if wants_masks else None  # type: ignore[attr-defined]
        num_classes = None  # open vocabulary: [B] score columns of each image's own queries (the rest is padding)
        if self.open_vocabulary:
            candidates, num_classes = self.detector.detect_queries(images, [plan.names for plan in plans])  # type: ignore[attr-defined]
        else:
            candidates = detections.candidates if detections is not None else self.detector(images)
        outputs: list[RewardOutput | None] = [None] * len(plans)
        thresholds = list(dict.fromkeys(plan.conf for plan in plans))
        for conf in thresholds:
            rows = [row for row, plan in enumerate(plans) if plan.conf == conf]
            chosen = candidates if len(thresholds) == 1 else candidates[rows]  # one threshold: no copy
            columns = num_classes if num_classes is None or len(thresholds) == 1 else num_classes[rows]
            masks: _MaskSource | _SegmenterMasks | None = None
            if detections is not None:
                masks = _MaskSource(self.detector, detections, rows)
            elif segmented is not None:
                masks = _SegmenterMasks([segmented[r] for r in rows], [images[r].size for r in rows])
            group = self._score_group(
                [samples[r] for r in rows], [plans[r] for r in rows], chosen, conf, masks, columns
            )
            for row, output in zip(rows, group, strict=True):
                outputs[row] = output
        return outputs  # type: ignore[return-value]  # every row belongs to one group

    def _score_group(
        self,
        samples: list[Sample],
        plans: list[_Plan],
        candidates: torch.Tensor,
        conf: float,
        masks: _MaskSource | _SegmenterMasks | None = None,
        num_classes: torch.Tensor | None = None,
    ) -> list[RewardOutput]:
        sources = None  # multi-label rows -> the detector's candidate each came from
        if self.multi_label:
            candidates, sources = multi_label_candidates(candidates, conf)
        width = max(len(plan.class_ids) for plan in plans)
        class_ids = torch.full((len(plans), width), -1, dtype=torch.int64)
        requested = torch.zeros((len(plans), width), dtype=torch.int64)
        for row, plan in enumerate(plans):
            class_ids[row, : len(plan.class_ids)] = torch.tensor(plan.class_ids)
            requested[row, : len(plan.requested)] = torch.tensor(plan.requested)
        match = kernel_ops.box_match(
            candidates,
            class_ids,
            requested,
            conf,
            self.iou_threshold,
            self.max_detections,
            containment_threshold=self.containment_threshold,
            num_classes=num_classes,
            backend=self.kernels_backend,
        )
        object_mask = torch.zeros_like(class_ids, dtype=torch.bool)
        for row, plan in enumerate(plans):
            object_mask[row, : len(plan.parsed.objects)] = True
        unseen = None
        if self.denominator == "all_nouns":  # the seed code's denominators: every distinct noun of the prompt
            unseen = torch.tensor([len(set(plan.parsed.unknown)) for plan in plans])
        if self.variant == "soft":
            quantity = match.p_exact * object_mask
            values, category, quantity_mean = f1_score(match.confidence_mean, quantity, object_mask, unseen)
        else:
            values, category, quantity_mean, quantity = seed_score(
                match.counts, match.confidence_mean, requested, object_mask, unseen
            )
        if self.variant == "numeracy":
            values = numeracy_score(match.counts, requested, object_mask)
        layout = self._layout(match, plans) if self.variant == "layout" else None
        all_details = [
            self._details(row, plan, match, category, quantity_mean, quantity, conf) for row, plan in enumerate(plans)
        ]
        if masks is not None:
            masks.kept = match.keep_indices if sources is None else _source_of(match.keep_indices, sources)
        colors = self._colors(samples, plans, match, masks) if self.variant == "geneval" else {}
        outputs = []
        for row, plan in enumerate(plans):
            details = all_details[row]
            if self.variant == "geneval":
                # GenEval judges the boxes as the details report them, grouped as the colour check groups them.
                kept = _kept_by_class(match, row, plan.names, self.max_per_class)
                boxes = [np.asarray(detection["box"]) for detection in details["detections"]]
                by_class = {name: [boxes[p] for p in positions] for name, positions in kept.items()}
                passed, details["reasons"] = geneval_check(plan.parsed, by_class, colors.get(row))
                for index, predicted in colors.get(row, {}).items():
                    details["objects"][index]["predicted_colors"] = predicted
                if any(spec.color for spec in plan.parsed.objects):
                    details["colour_region"] = (
                        "box crop (the detector gives no masks)" if masks is None else masks.description
                    )
                value = float(passed)
            elif layout is not None:
                targets = [
                    {
                        "class": plan.names[class_id],
                        "box": box,
                        "best_iou": float(layout.best_iou[row, index]),
                        "matched": bool(layout.matched[row, index]),
                    }
                    for index, (class_id, box) in enumerate(plan.targets or [])
                ]
                value = float(np.mean([t["best_iou"] for t in targets]))
                details["targets"] = targets
                details["recall"] = float(np.mean([t["matched"] for t in targets]))
                details["thresholds"]["layout_iou"] = self.layout_iou
            else:
                value = float(values[row])
            details["score"] = value
            outputs.append(RewardOutput(value, details))
        return outputs

    def _colors(
        self,
        samples: list[Sample],
        plans: list[_Plan],
        match: kernel_ops.BoxMatch,
        masks: _MaskSource | _SegmenterMasks | None,
    ) -> dict[int, dict[int, list[str]]]:
        """row -> object index -> CLIP colour of each of the object's top-n boxes (GenEval checks colours only
        where the count is met), classified in one batch for the whole chunk. With masks, each object is its mask
        pasted over grey #999 and cropped to its box, as GenEval does; otherwise the box crop."""
        if self.color_classifier is None:
            return {}
        from ..clip import crop_box

        crops, owners = [], []
        for row, (sample, plan) in enumerate(zip(samples, plans, strict=True)):
            by_class = _kept_by_class(match, row, plan.names, self.max_per_class)
            for index, spec in enumerate(plan.parsed.objects):
                found = by_class.get(spec.class_name, [])[: spec.count]
                if not (spec.color and len(found) >= spec.count):
                    continue
                name = geneval_name(spec.class_name)  # GenEval's name in its colour prompts ("tv remote")
                boxes = match.keep_boxes[row, found]
                if masks is not None:
                    from ..clip import masked_crop

                    pairs = zip(masks.of(row, found, boxes), boxes, strict=True)
                    crops += [(masked_crop(sample.image, mask, box.tolist()), name) for mask, box in pairs]
                else:
                    crops += [(crop_box(sample.image, box.tolist()), name) for box in boxes]
                owners += [(row, index)] * len(found)
        colors: dict[int, dict[int, list[str]]] = {}
        for (row, index), color in zip(owners, self.color_classifier(crops, self.batch_size), strict=True):
            colors.setdefault(row, {}).setdefault(index, []).append(color)
        return colors

    def _layout(self, match: kernel_ops.BoxMatch, plans: list[_Plan]) -> kernel_ops.LayoutMatch:
        width = max(len(plan.targets or []) for plan in plans)
        target_boxes = torch.zeros((len(plans), width, 4), dtype=match.keep_boxes.dtype)
        target_classes = torch.full((len(plans), width), -1, dtype=torch.int64)
        for row, plan in enumerate(plans):
            for index, (class_id, box) in enumerate(plan.targets or []):
                target_boxes[row, index] = torch.tensor(box)
                target_classes[row, index] = class_id
        return kernel_ops.layout_match(
            match.keep_boxes,
            match.keep_scores,
            match.keep_classes,
            target_boxes,
            target_classes,
            self.layout_iou,
            backend=self.kernels_backend,
        )

    def _details(self, row, plan, match, category, quantity_mean, quantity, conf) -> dict[str, Any]:
        kept = int(match.num_kept[row])
        boxes = match.keep_boxes[row, :kept].tolist()
        scores = match.keep_scores[row, :kept].tolist()
        classes = [plan.names[c] for c in match.keep_classes[row, :kept].tolist()]
        objects = [
            {
                "class": spec.class_name,
                "requested": spec.count,
                "detected": int(match.counts[row, slot]),
                "category_confidence": float(match.confidence_mean[row, slot]),
                "quantity_confidence": float(quantity[row, slot]),
                "p_exact": float(match.p_exact[row, slot]),
                "p_at_least": float(match.p_at_least[row, slot]),
                **({"color": spec.color} if spec.color else {}),
                **({"relation": [spec.relation.relation, spec.relation.target]} if spec.relation else {}),
            }
            for slot, spec in enumerate(plan.parsed.objects)
        ]
        detections = [
            {"class": name, "score": round(score, 4), "box": [round(v, 1) for v in box]}
            for name, score, box in zip(classes, scores, boxes, strict=True)
        ]
        queries = None
        if self.open_vocabulary:  # one query per distinct noun: its text and what it found
            queries = [
                {
                    "class": name,
                    "query": self.detector.query_text(name),  # type: ignore[attr-defined]
                    "detections": [
                        {key: value for key, value in found.items() if key != "class"}
                        for found in detections
                        if found["class"] == name
                    ],
                }
                for name in plan.names
            ]
        return {
            "variant": self.variant,
            "category_confidence": float(category[row]),
            "quantity_confidence": float(quantity_mean[row]),
            "objects": objects,
            "unknown": list(plan.parsed.unknown),
            "detections": detections,
            **({"queries": queries} if queries is not None else {}),
            "thresholds": {
                "confidence": conf,
                "iou": self.iou_threshold,
                "containment": self.containment_threshold,
                "multi_label": self.multi_label,
            },
            **({"unseen_in_denominator": len(set(plan.parsed.unknown))} if self.denominator == "all_nouns" else {}),
            "detector": {"model": self.detector.describe()["model"], "version": self.version},
        }


def multi_label_candidates(candidates: torch.Tensor, conf: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, N, 4 + C] -> [B, M, 4 + C]: one row per (box, class) whose score passes `conf`, carrying that class's
    score alone, so one box counts for every class it passes (GenEval's per-class lists, T2I-CompBench's per-class
    detectron2 filter) instead of only for its best class. Also [B, M] int64: the candidate each row came from
    (-1 padding)."""
    boxes, scores = candidates[..., :4], candidates[..., 4:]
    passing = scores > conf
    width = int(passing.flatten(1).sum(-1).max()) if candidates.shape[0] else 0
    expanded = candidates.new_zeros(candidates.shape[0], width, candidates.shape[-1])
    sources = torch.full((candidates.shape[0], width), -1, dtype=torch.int64)
    for image in range(candidates.shape[0]):
        rows, classes = passing[image].nonzero(as_tuple=True)
        expanded[image, : len(rows), :4] = boxes[image, rows]
        expanded[image, torch.arange(len(rows)), 4 + classes] = scores[image, rows, classes]
        sources[image, : len(rows)] = rows
    return expanded, sources


def _source_of(keep_indices: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """Kept rows of the multi-label candidates -> the detector's candidate indices (-1 stays -1)."""
    if sources.shape[1] == 0:
        return keep_indices
    return torch.where(keep_indices >= 0, sources.gather(1, keep_indices.clamp(min=0)), keep_indices)


def _kept_by_class(
    match: kernel_ops.BoxMatch, row: int, vocabulary: tuple[str, ...], max_per_class: int | None
) -> dict[str, list[int]]:
    """Positions of one image's kept detections grouped by class, best first, at most max_per_class each."""
    by_class: dict[str, list[int]] = {}
    for position, class_id in enumerate(match.keep_classes[row, : int(match.num_kept[row])].tolist()):
        kept = by_class.setdefault(vocabulary[class_id], [])
        if max_per_class is None or len(kept) < max_per_class:
            kept.append(position)
    return by_class


class _MaskSource:
    """Instance masks of one detector pass, for the kept detections of a group of its images."""

    description = "mask over grey #999, cropped to the box (GenEval's)"

    def __init__(self, detector: Any, detections: Any, rows: list[int]) -> None:
        self.detector, self.detections, self.rows = detector, detections, rows
        self.kept: torch.Tensor | None = None  # [rows, max_detections]: candidate index of each kept detection

    def of(self, row: int, positions: list[int], boxes: torch.Tensor) -> torch.Tensor:
        assert self.kept is not None
        indices = self.kept[row, positions].tolist()
        return self.detector.instance_masks(self.detections, self.rows[row], indices, boxes)


class _SegmenterMasks:
    """Masks from a separate segmenter's regions (models/regions.py) for a group's kept detections: each box takes
    its best-IoU region's mask (IoU >= 0.5), inside the box; a box no region matches takes the whole box."""

    description = (
        "segmenter mask (best IoU >= 0.5) over grey #999, cropped to the box; the whole box where none matches"
    )

    def __init__(self, regions: list[Any], sizes: list[tuple[int, int]]) -> None:
        self.regions, self.sizes = regions, sizes
        self.kept: torch.Tensor | None = None  # set by _score_group like _MaskSource's; not needed here

    def of(self, row: int, positions: list[int], boxes: torch.Tensor) -> torch.Tensor:
        from ..regions import masks_for_boxes

        return masks_for_boxes(self.regions[row], boxes, self.sizes[row])[0]


# The matching family: one builder (MatchingReward), one registration per variant. These declarations are the one
# list of variants: the /match schema, the CLI and the engine read it through registry.matching_variants().
_DETECTION = {
    "profile_keys": (
        "conf_threshold",
        "iou_threshold",
        "counting_conf_threshold",
        "max_per_class",
        "multi_label",
        "containment_threshold",
        "denominator",
    ),
    "uses_detector": True,
}
MATCHING_DECLARATIONS = (
    RewardDeclaration(
        "matching",
        "detection matching score of the seed paper: detected classes and counts against the prompt's",
        (0.0, 1.0),
        "F1 of mean detection confidence and count agreement min(d,n)/max(d,n)",
        differentiable=True,
        variant="seed",
        **_DETECTION,
    ),
    RewardDeclaration(
        "matching_soft",
        "matching score with a soft count: differentiable in the detection scores",
        (0.0, 1.0),
        "F1 of mean detection confidence and P(count = n) under the Poisson-binomial soft count",
        variant="soft",
        **_DETECTION,
    ),
    RewardDeclaration(
        "geneval",
        "GenEval's strict check: counts, excluded objects, relative positions and colours",
        (0.0, 1.0),
        "1 if every GenEval check passes, else 0",
        variant="geneval",
        **_DETECTION,
    ),
    RewardDeclaration(
        "numeracy",
        "T2I-CompBench's numeracy score",
        (0.0, 1.0),
        "mean over objects of 0.5*[present] + 0.5*[exact count]",
        variant="numeracy",
        **_DETECTION,
    ),
    RewardDeclaration(
        "layout",
        "agreement of detected boxes with target boxes given as metadata",
        (0.0, 1.0),
        "mean over target boxes of the best same-class IoU (greedy one-to-one)",
        variant="layout",
        **_DETECTION,
    ),
)


def _register_variant(declared: RewardDeclaration) -> None:
    def build(**config: Any) -> MatchingReward:
        config.setdefault("variant", declared.variant)
        return MatchingReward(**config)

    build.__doc__ = f"{declared.summary} (MatchingReward, variant {declared.variant!r})."
    register_reward(declared)(build)


for _declared in MATCHING_DECLARATIONS:
    _register_variant(_declared)
