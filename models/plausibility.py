"""Scene-plausibility reward (FineRewards' SAM reward): label the image's regions (the detector's kept boxes, or
segmenter masks named by CLIP or the detector), ask a causal language model how likely each label is in the
prompted scene, weight by region area."""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch

from .detection.detector import DetectorConfig
from .detection.matching import load_detector
from .hf import (
    PRECISION,
    ModelSource,
    choose_device,
    choose_dtype,
    load_pretrained,
    resolve_model,
    single_token_id,
    yes_probability,
)
from .prompt import parse_prompt
from .regions import (
    DEFAULT_MAX_MASKS,
    FASTSAM_CONF_THRESHOLD,
    FASTSAM_IOU_THRESHOLD,
    ClipRegionLabeller,
    DetectorRegionLabeller,
    FastSamSegmenter,
    RegionLabeller,
    kept_detections,
    union_area,
)
from .registry import RewardDeclaration, register_reward
from .types import RewardOutput, Sample, Unscorable, score_planned

DEFAULT_LANGUAGE_MODEL = "Qwen/Qwen2.5-0.5B"
# {a_label}: the label with its article ("an apple"); {label} and {prompt} are also available.
DEFAULT_TEMPLATE = "Question: Would {a_label} appear in a picture of: {prompt}? Answer:"
REGION_MODES = ("boxes", "masks")
REGION_LABELLERS = ("clip", "detector")


@functools.cache
def _inflect() -> Any:
    import inflect

    return inflect.engine()


class YesNoLanguageModel:
    """A causal language model read as a yes/no judge: text [N] -> P(" yes") [N], normalised over " yes" and
    " no" (a softmax over their two next-token log-probabilities). Answers are cached (bounded LRU): RL
    samples many images per prompt and the same labels recur."""

    def __init__(
        self, source: ModelSource, device: torch.device, dtype: torch.dtype, batch_size: int, cache_size: int
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.source, self.device, self.dtype = source, device, dtype
        self.batch_size, self.cache_size = max(1, batch_size), cache_size
        self.tokenizer = load_pretrained(AutoTokenizer, source)
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model = load_pretrained(AutoModelForCausalLM, source, device, dtype=dtype)
        self.yes_id, self.no_id = single_token_id(self.tokenizer, " yes"), single_token_id(self.tokenizer, " no")
        self._cache: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()
        # One forward at a time per model: endpoints run in threads, and a fast tokenizer is not re-entrant.
        self._inference = threading.Lock()

    def _judge(self, texts: list[str]) -> list[float]:
        with self._inference, torch.inference_mode():
            return self._judge_unlocked(texts)

    def _judge_unlocked(self, texts: list[str]) -> list[float]:
        answers: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(texts[start : start + self.batch_size], padding=True, return_tensors="pt")
            tokens = tokens.to(self.device)
            logits = self.model(**tokens).logits  # [n, T, V]
            # Right padding: a causal model's last real position never sees the padding after it.
            last = tokens["attention_mask"].sum(-1) - 1
            next_token = logits[torch.arange(len(last), device=self.device), last].float().cpu()
            answers += yes_probability(next_token, self.yes_id, self.no_id, "yes_no").tolist()
        return answers

    def __call__(self, texts: list[str]) -> list[float]:
        with self._lock:
            missing = list(dict.fromkeys(text for text in texts if text not in self._cache))
        fresh = dict(zip(missing, self._judge(missing), strict=True)) if missing else {}
        if self.cache_size <= 0:
            return [fresh[text] for text in texts]
        with self._lock:
            known = {text: self._cache[text] for text in texts if text in self._cache and text not in fresh}
            for text in known:
                self._cache.move_to_end(text)
            self._cache.update(fresh)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        known.update(fresh)
        return [known[text] for text in texts]


@functools.lru_cache(maxsize=4)
def load_language_model(spec: str, device: str, dtype: str, batch_size: int, cache_size: int) -> YesNoLanguageModel:
    torch_device = choose_device(device)
    source = resolve_model(spec)
    return YesNoLanguageModel(source, torch_device, choose_dtype(dtype, torch_device), batch_size, cache_size)


class PlausibilityReward:
    """Area-weighted mean over the image's region labels of P(label appears in the prompted scene), in [0, 1];
    higher is better. Labels the prompt names count as 1.0 without asking the model. An image with no region
    to judge: error code "no_regions", no value.

    regions="boxes": the detector's kept boxes; a label's area is the sum of its boxes' areas. regions="masks":
    the class-agnostic masks of `segmenter` (a FastSAM, or any ultralytics -seg, ONNX export), each named by CLIP
    zero-shot among the prompt's nouns and the COCO classes (region_labels="clip", needs `clip_model`) or by the
    detector's best-IoU detection (region_labels="detector"; a mask it cannot name is left out); a label's area is
    the union of its masks' pixels. With CLIP labels no detector is loaded and `detector` is unused."""

    name = "plausibility"

    def __init__(
        self,
        language_model: str = DEFAULT_LANGUAGE_MODEL,
        detector: str | None = None,
        template: str = DEFAULT_TEMPLATE,
        conf_threshold: float = 0.25,
        iou_threshold: float = 0.45,
        max_detections: int = 100,
        batch_size: int = 16,
        device: str | None = None,
        dtype: str = "auto",
        cache_size: int = 4096,
        kernels_backend: str | None = None,
        regions: str = "boxes",
        segmenter: str | None = None,
        region_labels: str = "clip",
        clip_model: str | None = None,
        mask_conf_threshold: float = FASTSAM_CONF_THRESHOLD,
        max_masks: int = DEFAULT_MAX_MASKS,
    ) -> None:
        if not 0 <= conf_threshold < 1 or not 0 < iou_threshold <= 1:
            raise ValueError("conf_threshold must be in [0, 1) and iou_threshold in (0, 1]")
        check_region_options(regions, segmenter, region_labels, clip_model, mask_conf_threshold, max_masks)
        try:
            template.format(label="dog", a_label="a dog", prompt="a dog")
        except (KeyError, IndexError) as exc:
            raise ValueError(f"template may use only {{label}}, {{a_label}} and {{prompt}}: {exc}") from None
        self.template, self.kernels_backend = template, kernels_backend
        self.conf_threshold, self.iou_threshold, self.max_detections = conf_threshold, iou_threshold, max_detections
        self.regions, self.region_labels = regions, region_labels
        self.batch_size = max(1, batch_size)
        # The default runtime config: the same ONNX session as the matching reward's, not a second one.
        uses_detector = regions == "boxes" or region_labels == "detector"
        self.detector = load_detector(detector, DetectorConfig()) if uses_detector else None
        if regions == "boxes" and getattr(self.detector, "open_vocabulary", False):
            raise ValueError(
                "regions='boxes' labels boxes with the detector's class list, and an open-vocabulary detector has "
                "none: use regions='masks' with region_labels='detector' (it is queried with the prompt's nouns "
                "and the COCO names)"
            )
        torch_device = choose_device(device)
        self.judge = load_language_model(str(language_model), str(torch_device), dtype, self.batch_size, cache_size)
        self.segmenter: FastSamSegmenter | None = None
        self.labeller: RegionLabeller | None = None
        if regions == "boxes":
            self.version = f"{self.judge.source.version}+{self.detector.version}"  # type: ignore[union-attr]
            return
        self.segmenter = FastSamSegmenter(
            str(segmenter), mask_conf_threshold, FASTSAM_IOU_THRESHOLD, max_masks, kernels_backend=kernels_backend
        )
        if region_labels == "clip":
            from .clip import load_clip

            backbone = load_clip(str(clip_model), None, str(torch_device), dtype)
            self.labeller = ClipRegionLabeller(backbone)
        else:
            self.labeller = DetectorRegionLabeller(
                self.detector, conf_threshold, iou_threshold, max_detections, kernels_backend=kernels_backend
            )
        self.version = f"{self.judge.source.version}+masks:{self.segmenter.version}+{self.labeller.version}"

    def describe(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "template": self.template,
            "conf_threshold": self.conf_threshold,
            "iou_threshold": self.iou_threshold,
            "max_detections": self.max_detections,
            "regions": self.regions,
            "batch_size": self.batch_size,
            "device": str(self.judge.device),
            "answer_cache_size": self.judge.cache_size,
        }
        models: dict[str, Any] = {"language_model": self.judge.source.describe()}
        precision = {"language_model": PRECISION[self.judge.dtype]}
        if self.segmenter is None or self.labeller is None:
            assert self.detector is not None
            models["detector"] = self.detector.describe()
            precision["detector"] = "fp32"
        else:
            params["region_labels"] = self.region_labels
            params["mask_conf_threshold"] = self.segmenter.conf_threshold
            params["mask_iou_threshold"] = self.segmenter.iou_threshold
            params["max_masks"] = self.segmenter.max_masks
            models["segmenter"] = self.segmenter.describe()
            models["region_labeller"] = self.labeller.describe()
            precision["segmenter"] = "fp32"
            if isinstance(self.labeller, ClipRegionLabeller):
                precision["clip"] = PRECISION.get(self.labeller.backbone.dtype, str(self.labeller.backbone.dtype))
            else:
                precision["detector"] = "fp32"
        return {"name": self.name, "version": self.version, "models": models, "params": params, "precision": precision}

    def _models(self) -> dict[str, str]:
        if self.segmenter is None or self.labeller is None:
            assert self.detector is not None
            return {"language_model": self.judge.source.version, "detector": self.detector.version}
        return {
            "language_model": self.judge.source.version,
            "segmenter": self.segmenter.version,
            "region_labeller": self.labeller.version,
        }

    def question(self, label: str, prompt: str) -> str:
        return self.template.format(label=label, a_label=_inflect().a(label), prompt=" ".join(prompt.split()))

    def _regions(self, samples: list[Sample]) -> list[dict[str, float]]:
        """Per image: label -> summed box area in pixels (overlapping boxes of one label count twice)."""
        assert self.detector is not None
        candidates = self.detector([sample.image for sample in samples])
        match = kept_detections(
            candidates, self.conf_threshold, self.iou_threshold, self.max_detections, self.kernels_backend
        )
        regions = []
        for row, sample in enumerate(samples):
            kept = int(match.num_kept[row])
            width, height = sample.image.size
            boxes = match.keep_boxes[row, :kept].double()
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
            areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).tolist()
            labels: dict[str, float] = {}
            for class_id, area in zip(match.keep_classes[row, :kept].tolist(), areas, strict=True):
                if area > 0:
                    name = self.detector.class_names[class_id]
                    labels[name] = labels.get(name, 0.0) + area
            regions.append(labels)
        return regions

    def _mask_regions(
        self, samples: list[Sample], named: list[Collection[str]]
    ) -> tuple[list[dict[str, float]], list[_MaskSummary]]:
        """One segmenter pass and one labeller call for the chunk. Per image: label -> pixels in the union of its
        masks (a pixel under two labels' masks counts for both), and what the masks were."""
        assert self.segmenter is not None and self.labeller is not None
        images = [sample.image for sample in samples]
        regions = self.segmenter(images)
        labels = self.labeller(images, [tuple(prompt_labels) for prompt_labels in named], regions)
        areas, summaries = [], []
        for image_regions, image_labels in zip(regions, labels, strict=True):
            masks: dict[str, list[Any]] = {}
            confidences: dict[str, list[float]] = {}
            for region, label in zip(image_regions, image_labels, strict=True):
                if label is not None:
                    masks.setdefault(label.label, []).append(region.mask)
                    confidences.setdefault(label.label, []).append(label.confidence)
            areas.append({label: union_area(label_masks) for label, label_masks in masks.items()})
            summaries.append(
                _MaskSummary(
                    segmented=len(image_regions),
                    unlabelled=sum(label is None for label in image_labels),
                    masks={label: len(label_masks) for label, label_masks in masks.items()},
                    confidence={label: sum(values) / len(values) for label, values in confidences.items()},
                )
            )
        return areas, summaries

    def score(self, samples: list[Sample]) -> list[RewardOutput]:
        return score_planned(samples, self._named_labels, self._score_chunk, self.batch_size, self._failure_details)

    def _failure_details(self) -> dict[str, Any]:
        return {"models": self._models()}

    def _named_labels(self, sample: Sample) -> Collection[str]:
        """The region labels the prompt names itself (they need no judging): detector classes for boxes; for
        masks, the labeller's prompt labels (CLIP: the prompt's nouns; the detector: the classes or queries)."""
        if not sample.prompt.strip():
            raise Unscorable("empty_prompt", "the prompt is empty: no scene to judge labels in")
        if self.labeller is not None:
            return self.labeller.prompt_labels(sample.prompt)
        assert self.detector is not None
        return {spec.class_name for spec in parse_prompt(sample.prompt, self.detector.class_names).objects}

    def _score_chunk(self, samples: list[Sample], named: list[Collection[str]]) -> list[RewardOutput]:
        summaries: list[_MaskSummary] | None = None
        if self.labeller is not None:
            regions, summaries = self._mask_regions(samples, named)
        else:
            regions = self._regions(samples)
        asked = [
            self.question(label, sample.prompt)
            for sample, labels, prompt_labels in zip(samples, regions, named, strict=True)
            for label in labels
            if label not in prompt_labels
        ]
        answers = dict(zip(asked, self.judge(asked), strict=True)) if asked else {}
        outputs = []
        for row, (sample, labels, prompt_labels) in enumerate(zip(samples, regions, named, strict=True)):
            summary = summaries[row] if summaries is not None else None
            details: dict[str, Any] = {"models": self._models()}
            if summary is not None:
                details["masks"] = {"segmented": summary.segmented, "unlabelled": summary.unlabelled}
            if not labels:
                details["labels"] = []
                if summary is None:
                    outputs.append(RewardOutput(None, details, "no region was detected to judge", "no_regions"))
                elif summary.segmented == 0:
                    outputs.append(RewardOutput(None, details, "no region was segmented to judge", "no_regions"))
                else:
                    message = f"none of the {summary.segmented} segmented regions could be labelled"
                    outputs.append(RewardOutput(None, details, message, "no_regions"))
                continue
            entries = []
            for label, area in labels.items():
                if label in prompt_labels:
                    entries.append({"label": label, "area": area, "likelihood": 1.0, "source": "prompt"})
                else:
                    likelihood = answers[self.question(label, sample.prompt)]
                    entries.append({"label": label, "area": area, "likelihood": likelihood, "source": "model"})
                if summary is not None:
                    entries[-1]["region"] = "mask"
                    entries[-1]["masks"] = summary.masks[label]
                    entries[-1]["label_confidence"] = summary.confidence[label]
            total_area = sum(entry["area"] for entry in entries)
            value = sum(entry["area"] * entry["likelihood"] for entry in entries) / total_area
            for entry in entries:
                entry["weight"] = entry["area"] / total_area
            details["labels"] = entries
            outputs.append(RewardOutput(value, details))
        return outputs


@dataclass(frozen=True)
class _MaskSummary:
    """One image's masks: how many were segmented and left unlabelled; per label its masks and mean label
    confidence (CLIP's probability, or the matched detection's score)."""

    segmented: int
    unlabelled: int
    masks: dict[str, int]
    confidence: dict[str, float]


def check_region_options(
    regions: str,
    segmenter: str | None,
    region_labels: str,
    clip_model: str | None,
    mask_conf_threshold: float,
    max_masks: int,
) -> None:
    """ValueError for a region option that is unknown, missing for its mode, or would be silently ignored."""
    if regions not in REGION_MODES:
        raise ValueError(f"regions must be one of {', '.join(REGION_MODES)}, got {regions!r}")
    if region_labels not in REGION_LABELLERS:
        raise ValueError(f"region_labels must be one of {', '.join(REGION_LABELLERS)}, got {region_labels!r}")
    if regions == "boxes":
        if segmenter is not None or clip_model is not None:
            raise ValueError("segmenter and clip_model apply to regions='masks' only")
        return
    if not segmenter:
        raise ValueError(
            "regions='masks' needs segmenter: the path of a FastSAM (or other ultralytics -seg) ONNX export"
        )
    if region_labels == "clip" and not clip_model:
        raise ValueError("region_labels='clip' needs clip_model: a CLIP model directory or hub id")
    if region_labels == "detector" and clip_model is not None:
        raise ValueError("clip_model applies to region_labels='clip' only")
    if not 0 <= mask_conf_threshold < 1 or max_masks < 1:
        raise ValueError("mask_conf_threshold must be in [0, 1) and max_masks at least 1")


@register_reward(
    RewardDeclaration(
        "plausibility",
        "a language model's P(yes) that each image region's label (detector box, or segmenter mask named by CLIP or "
        "the detector) belongs in the prompted scene",
        (0.0, 1.0),
        "box- or mask-area-weighted mean of P(yes) normalised over yes/no, per region label; 1 for labels the "
        "prompt names",
        profile_keys=("conf_threshold", "iou_threshold"),
        uses_detector=True,
    )
)
def plausibility(**config: Any) -> PlausibilityReward:
    """Scene plausibility; config: language_model, detector, template, conf_threshold, iou_threshold,
    max_detections, batch_size, device, dtype, cache_size, kernels_backend, regions ("boxes" | "masks"),
    segmenter, region_labels ("clip" | "detector"), clip_model, mask_conf_threshold, max_masks."""
    return PlausibilityReward(**config)
