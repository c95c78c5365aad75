"""Differentiable rewards: reward values and d(weighted total)/d(pixels) for float images [B, 3, H, W] in [0, 1],
so training that back-propagates a reward into the image (ReFL, DRaFT, AlignProp) can call a remote reward.

Each differentiable reward is built from a loaded Scorer reward and shares its models:
- matching: the soft matching score on the detector's torch twin (TorchDetector), or on an open-vocabulary
  detector's own torch model (ZeroShotDetector.detect_pixels, queried with the prompt's nouns). Category
  confidence C_k is the probability-weighted mean of the kept detections' class-k scores (soft class assignment:
  a detection counts towards every prompt class with that class's score), quantity confidence Q_k is
  P(count = n_k) under the Poisson-binomial soft count of those scores, and the score is the F1 of their means,
  as in the soft variant.
  Detection *selection* (confidence floor, class-aware NMS, top-M) is a discrete choice: it is recomputed every
  forward and held fixed in the backward pass. The floor is lower than the scoring threshold (`selection_floor`,
  default 0.05) because an object the detector scores 0.2 must be in the set for its gradient to raise it.
- clip / pickscore / aesthetic: the same CLIP forward as scoring, with CLIP's resize, centre crop and
  normalisation done in torch (bicubic with antialiasing, as the processor) so the pixels keep their graph.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from rewardscope.kernels import ops as kernel_ops
from rewardscope.kernels.reference import poisson_binomial

from .clip import ClipBackbone, projected_features
from .detection.matching import f1_score
from .detection.torch_detector import TorchDetector
from .prompt import ParsedPrompt, parse_prompt
from .registry import declaration, declarations
from .types import Unscorable

SELECTION_FLOOR = 0.05


class NotDifferentiableError(ValueError):
    """A reward with no differentiable form here (or whose torch model is not configured)."""


@dataclass
class GradientOutput:
    """Per-reward values [B] (float64, NaN where unscorable), their per-item errors, and the graph's total."""

    values: torch.Tensor  # differentiable [B]; rows of failed items are 0 in the graph and NaN in `reported`
    errors: dict[int, tuple[str, str]] = field(default_factory=dict)  # row -> (code, message)
    details: list[dict[str, Any]] = field(default_factory=list)


class SoftMatchingGradient:
    """The differentiable matching score described in the module docstring."""

    name = "matching"

    def __init__(
        self,
        detector: Any,
        iou_threshold: float = 0.45,
        max_detections: int = 100,
        selection_floor: float = SELECTION_FLOOR,
        kernels_backend: str | None = None,
        parse: Callable[[str], ParsedPrompt] | None = None,
    ) -> None:
        self.detector = detector
        self.iou_threshold, self.max_detections = iou_threshold, max_detections
        self.selection_floor, self.kernels_backend = selection_floor, kernels_backend
        # An open-vocabulary detector (ZeroShotDetector.detect_pixels) is asked each prompt's nouns as its queries.
        self.open_vocabulary = bool(getattr(detector, "open_vocabulary", False))
        self.parse = parse or (lambda prompt: parse_prompt(prompt, detector.class_names))
        self.class_index = {name: index for index, name in enumerate(detector.class_names)}
        self.version = f"{detector.version}+soft-grad"

    def _plan(self, prompt: str) -> tuple[list[int], list[int], tuple[str, ...]]:
        """(class id per object, requested counts, the class names the ids index)."""
        parsed = self.parse(prompt)
        if not parsed.objects:
            known = "countable object" if self.open_vocabulary else "object the detector knows"
            raise Unscorable("no_countable_object", f"prompt names no {known}")
        if not self.open_vocabulary:
            ids = [self.class_index[s.class_name] for s in parsed.objects]
            return ids, [s.count for s in parsed.objects], self.detector.class_names
        names = tuple(dict.fromkeys(s.class_name for s in parsed.objects))
        ids = [names.index(s.class_name) for s in parsed.objects]
        return ids, [s.count for s in parsed.objects], names

    def __call__(self, pixels: torch.Tensor, prompts: Sequence[str]) -> GradientOutput:
        plans: dict[int, tuple[list[int], list[int], tuple[str, ...]]] = {}
        errors: dict[int, tuple[str, str]] = {}
        for row, prompt in enumerate(prompts):
            try:
                plans[row] = self._plan(prompt)
            except Unscorable as exc:
                errors[row] = (exc.code, str(exc))
        batch = pixels.shape[0]
        # Closed vocabulary: every row runs (one class list). Open: only the rows with queries run the detector.
        rows = list(range(batch)) if not self.open_vocabulary else sorted(plans)
        if not rows:
            return GradientOutput(torch.zeros(batch, dtype=torch.float64), errors, [{} for _ in range(batch)])
        width = max((len(plan[0]) for plan in plans.values()), default=1)
        class_ids = torch.full((len(rows), width), -1, dtype=torch.int64)
        requested = torch.zeros((len(rows), width), dtype=torch.int64)
        for position, row in enumerate(rows):
            if row in plans:
                ids, counts, _ = plans[row]
                class_ids[position, : len(ids)] = torch.tensor(ids)
                requested[position, : len(counts)] = torch.tensor(counts)

        num_classes = None
        if self.open_vocabulary:  # [R, N, 4 + Q] in the graph, and each row's query count
            candidates, num_classes = self.detector.detect_pixels(pixels[rows], [plans[row][2] for row in rows])
        else:
            candidates = self.detector.detect(pixels)  # [B, N, 4 + C], in the graph
        with torch.no_grad():  # the discrete selection: fixed in the backward pass
            selection = kernel_ops.box_match(
                candidates.detach().float(),
                class_ids,
                requested,
                self.selection_floor,
                self.iou_threshold,
                self.max_detections,
                num_classes=num_classes,
                backend=self.kernels_backend,
            )
        values, details = soft_matching(candidates[..., 4:], selection.keep_indices, class_ids, requested)
        if len(rows) == batch:
            return GradientOutput(values, errors, details)
        index = torch.tensor(rows, dtype=torch.int64)
        spread = torch.zeros(batch, dtype=values.dtype, device=values.device).index_put((index,), values)
        all_details: list[dict[str, Any]] = [{} for _ in range(batch)]
        for position, row in enumerate(rows):
            all_details[row] = details[position]
        return GradientOutput(spread, errors, all_details)

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "detector": self.detector.describe(),
            "selection_floor": self.selection_floor,
            "iou_threshold": self.iou_threshold,
            "max_detections": self.max_detections,
            "scale": "F1 of probability-weighted class confidence and P(count = n) (soft class assignment)",
        }


def soft_matching(
    class_scores: torch.Tensor, keep_indices: torch.Tensor, class_ids: torch.Tensor, requested: torch.Tensor
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """class_scores [B, N, C] (in the graph), keep_indices [B, M] (-1 padded), class_ids / requested [B, K]
    (-1 padded) -> differentiable score [B] and per-row details. See the module docstring for the definition."""
    batch, kept = keep_indices.shape
    num_classes = class_scores.shape[-1]
    valid = keep_indices >= 0  # [B, M]
    slot_mask = class_ids >= 0  # [B, K]
    gathered = torch.gather(class_scores, 1, keep_indices.clamp(min=0)[..., None].expand(batch, kept, num_classes))
    slots = class_ids.clamp(min=0)[:, None, :].expand(batch, kept, class_ids.shape[1])
    probability = torch.gather(gathered, 2, slots).transpose(1, 2)  # [B, K, M]: P(detection m is class k)
    probability = probability * (valid[:, None, :] & slot_mask[..., None])
    width = int(valid.sum(-1).max()) if batch else 0
    pmf = poisson_binomial(probability[..., :width])  # [B, K, width + 1]
    reachable = requested <= width
    p_exact = pmf.gather(-1, requested.clamp(0, width)[..., None])[..., 0] * (reachable & slot_mask)
    mass = probability.sum(-1)
    # Probability-weighted mean score; 0 (not NaN) where the slot has no mass at all.
    category = torch.where(mass > 1e-12, (probability * probability).sum(-1) / mass.clamp(min=1e-12), 0.0)
    values, category_mean, quantity_mean = f1_score(category, p_exact, slot_mask)
    details = [
        {
            "category_confidence": float(category_mean[row].detach()),
            "quantity_confidence": float(quantity_mean[row].detach()),
            "expected_counts": [float(v) for v in mass[row][slot_mask[row]].detach()],
            "selected": int(valid[row].sum()),
        }
        for row in range(batch)
    ]
    return values, details


class ClipGradient:
    """CLIPScore, PickScore or the aesthetic rating with the CLIP preprocessing done in torch."""

    def __init__(self, name: str, backbone: ClipBackbone, reward: Any) -> None:
        self.name, self.backbone, self.reward = name, backbone, reward
        self.version = reward.version
        processor = backbone.processor.image_processor
        size = processor.size
        self.resize_to = int(size.get("shortest_edge") or min(size.get("height", 224), size.get("width", 224)))
        crop = processor.crop_size
        self.crop = (int(crop["height"]), int(crop["width"]))
        self.mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self._text_cache: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> CLIP pixel_values: shortest edge to `resize_to`, centre crop, normalise."""
        height, width = pixels.shape[2:]
        scale = self.resize_to / min(height, width)
        size = (max(self.crop[0], round(height * scale)), max(self.crop[1], round(width * scale)))
        resized = F.interpolate(pixels, size=size, mode="bicubic", align_corners=False, antialias=True)
        top, left = (size[0] - self.crop[0]) // 2, (size[1] - self.crop[1]) // 2
        cropped = resized[:, :, top : top + self.crop[0], left : left + self.crop[1]]
        return (cropped - self.mean.to(cropped)) / self.std.to(cropped)

    def embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, D] unit image embeddings, in the graph."""
        model = self.backbone.model
        pixels = pixels.to(self.backbone.device, torch.promote_types(pixels.dtype, torch.float32))
        values = self.preprocess(pixels).to(self.backbone.dtype)
        features = projected_features(model.get_image_features(pixel_values=values))
        # float32 at least (fp16 models), float64 kept (finite-difference checks run the model in float64).
        return F.normalize(features.to(torch.promote_types(features.dtype, torch.float32)), dim=-1)

    def _texts(self, prompts: Sequence[str]) -> torch.Tensor:
        with self._lock:
            missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
            if missing:
                for prompt, row in zip(missing, self.backbone.text_embeddings(missing), strict=True):
                    self._text_cache[prompt] = row
                    if len(self._text_cache) > 4096:
                        self._text_cache.pop(next(iter(self._text_cache)))
            return torch.stack([self._text_cache[p] for p in prompts])

    def __call__(self, pixels: torch.Tensor, prompts: Sequence[str]) -> GradientOutput:
        embeddings = self.embeddings(pixels)

        def cosines() -> torch.Tensor:
            texts = self._texts([self.reward.text_of(prompt) for prompt in prompts])
            return (embeddings * texts.to(embeddings.device)).sum(-1).double()

        # The reward's own formula on its embeddings (shared with its score()): one definition of each value.
        values, details = self.reward.from_embeddings(embeddings, cosines)
        return GradientOutput(values, details=details)

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "model": self.backbone.describe()}


def gradient_reward(name: str, reward: Any, torch_detector: dict[str, Any] | None = None) -> Any:
    """The differentiable form of a loaded Scorer reward, sharing its models: the reward builds it
    (`reward.gradient_form`), for the rewards whose declaration says differentiable.

    torch_detector: for matching with a detector other than the embedded one, the torch twin's
    TorchDetector.from_ultralytics arguments ({"config": yaml, "weights": safetensors, "names": [...]})."""
    if not declaration(name).differentiable or not hasattr(reward, "gradient_form"):
        served = ", ".join(differentiable_rewards())
        raise NotDifferentiableError(f"reward {name!r} has no differentiable form; differentiable: {served}")
    return reward.gradient_form(name, torch_detector=torch_detector)


def matching_gradient(name: str, reward: Any, torch_detector: dict[str, Any] | None = None) -> SoftMatchingGradient:
    """A matching reward's soft, differentiable form on its detector's torch twin (an open-vocabulary detector is a
    torch model itself: its detect_pixels is the differentiable path)."""
    if getattr(reward, "open_vocabulary", False):
        return SoftMatchingGradient(
            reward.detector,
            reward.iou_threshold,
            reward.max_detections,
            kernels_backend=reward.kernels_backend,
            parse=reward._parse,
        )
    detector = TorchDetector.from_ultralytics(**torch_detector) if torch_detector else reward.detector.torch_twin()
    if detector is None:
        raise NotDifferentiableError(
            f"{name}: detector {reward.detector.version} has no torch twin configured "
            "(config torch_detector: {'config': <ultralytics yaml>, 'weights': <safetensors>})"
        )
    if detector.class_names != reward.vocabulary:
        raise NotDifferentiableError(f"{name}: the torch detector's classes differ from the served detector's")
    return SoftMatchingGradient(
        detector, reward.iou_threshold, reward.max_detections, kernels_backend=reward.kernels_backend
    )


def differentiable_rewards() -> list[str]:
    """Registered rewards whose declaration says they have a differentiable form."""
    return [name for name, declared in declarations().items() if declared.differentiable]


@dataclass
class GradientResult:
    """rewards[name] [B] float64 (NaN where that reward failed for the item), total [B] (NaN if any weighted
    reward failed), grad [B, 3, H, W] float32 = d total / d pixels (zeros for failed items), errors per row."""

    rewards: dict[str, torch.Tensor]
    total: torch.Tensor
    grad: torch.Tensor
    errors: dict[int, tuple[str, str]]
    details: list[dict[str, Any]]


def reward_gradients(
    rewards: dict[str, Any], weights: dict[str, float], pixels: torch.Tensor, prompts: Sequence[str]
) -> GradientResult:
    """Values and d(sum_r w_r * reward_r)/d(pixels) for a same-size batch; rewards: name -> gradient reward."""
    if len(prompts) != pixels.shape[0]:
        raise ValueError(f"{pixels.shape[0]} images but {len(prompts)} prompts")
    leaf = pixels.detach().to(torch.promote_types(pixels.dtype, torch.float32)).requires_grad_(True)
    batch = leaf.shape[0]
    total = torch.zeros(batch, dtype=torch.float64)
    reported: dict[str, torch.Tensor] = {}
    errors: dict[int, tuple[str, str]] = {}
    details: list[dict[str, Any]] = [{} for _ in range(batch)]
    failed = torch.zeros(batch, dtype=torch.bool)
    with torch.enable_grad():
        for name, weight in weights.items():
            output = rewards[name](leaf, prompts)
            values = output.values.cpu()
            bad = torch.zeros(batch, dtype=torch.bool)
            for row, (code, message) in output.errors.items():
                bad[row] = True
                errors.setdefault(row, (code, f"{name}: {message}"))
            for row, detail in enumerate(output.details):
                details[row][name] = detail
            failed |= bad
            reported[name] = torch.where(bad, math.nan, values.detach())
            total = total + weight * torch.where(bad, 0.0, values)
        grad = None
        if total.requires_grad:  # False when every item failed every reward
            (grad,) = torch.autograd.grad(total.sum(), leaf, allow_unused=True)
    grad = torch.zeros_like(leaf) if grad is None else grad
    grad[failed] = 0
    return GradientResult(reported, torch.where(failed, math.nan, total.detach()), grad.detach(), errors, details)
