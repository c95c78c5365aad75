"""Scene-plausibility reward (FineRewards' SAM reward): label the image's regions with the detector's kept
boxes, ask a causal language model how likely each label is in the prompted scene, weight by region area."""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from typing import Any

import torch
from rewardscope.kernels import ops as kernel_ops

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
from .registry import RewardDeclaration, register_reward
from .types import RewardOutput, Sample, Unscorable, score_planned

DEFAULT_LANGUAGE_MODEL = "Qwen/Qwen2.5-0.5B"
# {a_label}: the label with its article ("an apple"); {label} and {prompt} are also available.
DEFAULT_TEMPLATE = "Question: Would {a_label} appear in a picture of: {prompt}? Answer:"


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
    """Area-weighted mean over the image's detected region labels of P(label appears in the prompted scene),
    in [0, 1]; higher is better. Labels the prompt names count as 1.0 without asking the model. An image with
    no detected region has nothing to judge: error code "no_regions", no value."""

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
    ) -> None:
        if not 0 <= conf_threshold < 1 or not 0 < iou_threshold <= 1:
            raise ValueError("conf_threshold must be in [0, 1) and iou_threshold in (0, 1]")
        try:
            template.format(label="dog", a_label="a dog", prompt="a dog")
        except (KeyError, IndexError) as exc:
            raise ValueError(f"template may use only {{label}}, {{a_label}} and {{prompt}}: {exc}") from None
        self.template, self.kernels_backend = template, kernels_backend
        self.conf_threshold, self.iou_threshold, self.max_detections = conf_threshold, iou_threshold, max_detections
        self.batch_size = max(1, batch_size)
        # The default runtime config: the same ONNX session as the matching reward's, not a second one.
        self.detector = load_detector(detector, DetectorConfig())
        self.judge = load_language_model(
            str(language_model), str(choose_device(device)), dtype, self.batch_size, cache_size
        )
        self.version = f"{self.judge.source.version}+{self.detector.version}"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "models": {"language_model": self.judge.source.describe(), "detector": self.detector.describe()},
            "params": {
                "template": self.template,
                "conf_threshold": self.conf_threshold,
                "iou_threshold": self.iou_threshold,
                "max_detections": self.max_detections,
                "regions": "detector boxes (SAM masks: not yet)",
                "batch_size": self.batch_size,
                "device": str(self.judge.device),
                "answer_cache_size": self.judge.cache_size,
            },
            "precision": {"language_model": PRECISION[self.judge.dtype], "detector": "fp32"},
        }

    def _models(self) -> dict[str, str]:
        return {"language_model": self.judge.source.version, "detector": self.detector.version}

    def question(self, label: str, prompt: str) -> str:
        return self.template.format(label=label, a_label=_inflect().a(label), prompt=" ".join(prompt.split()))

    def _regions(self, samples: list[Sample]) -> list[dict[str, float]]:
        """Per image: label -> summed box area in pixels (overlapping boxes of one label count twice)."""
        candidates = self.detector([sample.image for sample in samples])
        no_slots = torch.full((len(samples), 1), -1, dtype=torch.int64)
        match = kernel_ops.box_match(
            candidates,
            no_slots,
            torch.zeros_like(no_slots),
            self.conf_threshold,
            self.iou_threshold,
            self.max_detections,
            backend=self.kernels_backend,
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

    def score(self, samples: list[Sample]) -> list[RewardOutput]:
        return score_planned(samples, self._named_labels, self._score_chunk, self.batch_size, self._failure_details)

    def _failure_details(self) -> dict[str, Any]:
        return {"models": self._models()}

    def _named_labels(self, sample: Sample) -> set[str]:
        """The detector labels the prompt names itself (they need no judging)."""
        if not sample.prompt.strip():
            raise Unscorable("empty_prompt", "the prompt is empty: no scene to judge labels in")
        return {spec.class_name for spec in parse_prompt(sample.prompt, self.detector.class_names).objects}

    def _score_chunk(self, samples: list[Sample], named: list[set[str]]) -> list[RewardOutput]:
        regions = self._regions(samples)
        asked = [
            self.question(label, sample.prompt)
            for sample, labels, prompt_labels in zip(samples, regions, named, strict=True)
            for label in labels
            if label not in prompt_labels
        ]
        answers = dict(zip(asked, self.judge(asked), strict=True)) if asked else {}
        outputs = []
        for sample, labels, prompt_labels in zip(samples, regions, named, strict=True):
            details: dict[str, Any] = {"models": self._models()}
            if not labels:
                details["labels"] = []
                outputs.append(RewardOutput(None, details, "no region was detected to judge", "no_regions"))
                continue
            entries = []
            for label, area in labels.items():
                if label in prompt_labels:
                    entries.append({"label": label, "area": area, "likelihood": 1.0, "source": "prompt"})
                else:
                    likelihood = answers[self.question(label, sample.prompt)]
                    entries.append({"label": label, "area": area, "likelihood": likelihood, "source": "model"})
            total_area = sum(entry["area"] for entry in entries)
            value = sum(entry["area"] * entry["likelihood"] for entry in entries) / total_area
            for entry in entries:
                entry["weight"] = entry["area"] / total_area
            details["labels"] = entries
            outputs.append(RewardOutput(value, details))
        return outputs


@register_reward(
    RewardDeclaration(
        "plausibility",
        "a language model's P(yes) that each detected region's label belongs in the prompted scene",
        (0.0, 1.0),
        "box-area-weighted mean of P(yes) normalised over yes/no, per detected label; 1 for labels the prompt names",
        profile_keys=("conf_threshold", "iou_threshold"),
        uses_detector=True,
    )
)
def plausibility(**config: Any) -> PlausibilityReward:
    """Scene plausibility; config: language_model, detector, template, conf_threshold, iou_threshold,
    max_detections, batch_size, device, dtype, cache_size, kernels_backend."""
    return PlausibilityReward(**config)
