"""POST /grad: reward values and d(weighted total)/d(image) for float images, so a training job can put a remote
reward inside autograd (client: rewardscope_client.RemoteReward). The math is models/gradients.py; here are the
transport (float16/float32 .npy in, scaled float16 .npy out), the limits, and grouping into same-size chunks."""

from __future__ import annotations

import base64
import io
import logging
import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from rewardscope.models.gradients import (
    NotDifferentiableError,
    differentiable_rewards,
    gradient_reward,
    reward_gradients,
)
from rewardscope.models.images import ImageError, decode_base64, read_npy

from . import metrics
from .engine import RequestItemError, RewardEngine
from .schemas import RewardSpec

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
log = logging.getLogger(__name__)


class GradItem(BaseModel):
    """One float image and its prompt."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"example": {"array": "<base64 .npy float16 [3, H, W]>", "prompt": "five people"}},
    )

    array: str = Field(description="base64 of a .npy float16 or float32 array [3, H, W] with values in [0, 1]")
    prompt: str = Field(max_length=2000)
    rewards: RewardSpec | None = Field(
        default=None,
        description="names or {name: weight} among the served differentiable ones "
        f"({', '.join(differentiable_rewards())}); default: every served reward that is differentiable",
    )
    profile: str | None = None


class GradResult(BaseModel):
    """Values per reward (null where it failed), the weighted total, and d(total)/d(image) = grad * grad_scale."""

    rewards: dict[str, float | None] = Field(default_factory=dict)
    total: float | None = None
    grad: str | None = Field(default=None, description="base64 .npy float16 [3, H, W]; multiply by grad_scale")
    grad_scale: float | None = Field(default=None, description="max |d total / d pixel|: fp16 keeps the shape")
    details: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    error_code: str | None = None
    versions: dict[str, str] = Field(default_factory=dict)


def encode_gradient(grad: torch.Tensor) -> tuple[str, float]:
    """float32 [3, H, W] -> (base64 .npy float16 of grad / scale, scale). Scaling by the largest magnitude keeps
    fp16's 11 bits of precision for the gradient's large entries instead of flushing small gradients to 0."""
    array = grad.detach().cpu().float().numpy()
    scale = float(np.abs(array).max()) if array.size else 0.0
    scaled = array / scale if scale > 0 else array
    buffer = io.BytesIO()
    np.save(buffer, scaled.astype(np.float16), allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode(), scale


def decode_pixels(text: str, engine: RewardEngine) -> torch.Tensor:
    """base64 .npy float16/float32 [3, H, W] (or [1, 3, H, W]) in [0, 1] -> float32 tensor, with the service's
    byte limit and /grad's pixel limit checked on the header before the pixels are touched (images.read_npy)."""
    limits, max_pixels = engine.limits, engine.settings.max_grad_pixels

    def check(shape: tuple[int, ...], dtype: np.dtype) -> None:
        if dtype not in FLOAT_DTYPES:
            raise ImageError("bad_array", f"/grad takes float16 or float32 arrays in [0, 1], got {dtype}")
        if len(shape) == 4 and shape[0] == 1:
            shape = shape[1:]
        if len(shape) != 3 or shape[0] != 3:
            raise ImageError("bad_array", f"/grad takes one image [3, H, W] per item, got shape {list(shape)}")
        height, width = shape[1:]
        if height * width > max_pixels:
            raise ImageError("too_many_pixels", f"image is {width}x{height}; /grad allows {max_pixels} pixels")
        if min(height, width) < limits.min_side:
            raise ImageError("too_small", f"image is {width}x{height}; each side must be >= {limits.min_side} px")

    array = read_npy(decode_base64(text, limits), limits, check)
    array = array.reshape(array.shape[-3:])
    if not np.isfinite(array).all():
        raise ImageError("non_finite", "array holds NaN or infinity")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 1:
        raise ImageError("out_of_range", f"pixel values must lie in [0, 1]; got [{low}, {high}]")
    return torch.from_numpy(array.astype(np.float32))


class GradientEngine:
    """Builds the differentiable form of each served reward on first use (sharing the Scorer's models) and
    answers /grad items in same-size chunks of at most `grad_chunk_pixels` pixels (backward memory)."""

    def __init__(self, engine: RewardEngine) -> None:
        self.engine = engine
        self._rewards: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def _reward(self, name: str, profile: str) -> Any:
        key = (name, profile)
        with self._lock:
            if key not in self._rewards:
                scorer = self.engine.scorer({name: 1.0}, profile)
                options = self.engine.settings.config.get(name, {}).get("torch_detector")
                self._rewards[key] = gradient_reward(name, scorer.rewards[name], options)
            return self._rewards[key]

    def _default_weights(self, profile: str) -> dict[str, float]:
        """Without `rewards`, /grad uses the served rewards that have a differentiable form."""
        weights = {}
        for name, weight in self.engine.default_weights.items():
            try:
                self._reward(name, profile)
            except NotDifferentiableError:
                continue
            weights[name] = weight
        if not weights:
            raise RequestItemError(
                "not_differentiable", f"no served reward is one of {', '.join(differentiable_rewards())}"
            )
        return weights

    def _prepare(self, item: GradItem) -> tuple[dict[str, float], str, dict[str, Any], torch.Tensor]:
        profile = self.engine.resolve_profile(item.profile)
        weights = self._default_weights(profile) if item.rewards is None else self.engine.resolve_weights(item.rewards)
        rewards = {}
        for name in weights:
            try:
                rewards[name] = self._reward(name, profile)
            except NotDifferentiableError as exc:
                raise RequestItemError("not_differentiable", str(exc)) from None
        return weights, profile, rewards, decode_pixels(item.array, self.engine)

    def grad(self, items: Sequence[GradItem]) -> list[GradResult]:
        metrics.BATCH_SIZE.labels(endpoint="grad").observe(len(items))
        out: list[GradResult | None] = [None] * len(items)
        groups: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
        prepared: dict[tuple, dict[str, Any]] = {}
        for index, item in enumerate(items):
            try:
                weights, profile, rewards, pixels = self._prepare(item)
            except (RequestItemError, ImageError) as exc:
                out[index] = GradResult(error=str(exc), error_code=exc.code)
                continue
            key = (tuple(sorted(weights.items())), profile, tuple(pixels.shape))
            groups.setdefault(key, []).append((index, pixels))
            prepared[key] = rewards
        chunk_pixels = max(1, self.engine.settings.grad_chunk_pixels)
        for key, members in groups.items():
            weights, rewards = dict(key[0]), prepared[key]
            per_chunk = max(1, chunk_pixels // (key[2][1] * key[2][2]))
            versions = {name: reward.version for name, reward in rewards.items()}
            for start in range(0, len(members), per_chunk):
                self._run_chunk(members[start : start + per_chunk], items, rewards, weights, versions, out)
        metrics.ITEMS.labels(endpoint="grad").inc(len(items))
        for answer in out:
            if answer is not None and answer.error_code:
                metrics.ERRORS.labels(code=answer.error_code).inc()
        return out  # type: ignore[return-value]

    def _run_chunk(self, chunk, items, rewards, weights, versions, out) -> None:
        """One forward+backward over a chunk. If it raises, each item is retried alone, so one item that breaks a
        model fails by itself (code grad_failed) and never sinks the rest of its batch."""
        try:
            result = reward_gradients(
                rewards,
                weights,
                torch.stack([pixels for _, pixels in chunk]),
                [items[index].prompt for index, _ in chunk],
            )
        except Exception as exc:  # noqa: BLE001  a model failure must stay per item
            if len(chunk) > 1:
                for member in chunk:
                    self._run_chunk([member], items, rewards, weights, versions, out)
                return
            log.exception("/grad failed for one item")
            message = f"gradient failed: {type(exc).__name__}: {exc}"
            out[chunk[0][0]] = GradResult(error=message, error_code="grad_failed")
            return
        for row, (index, _) in enumerate(chunk):
            out[index] = self._result(result, row, versions)

    @staticmethod
    def _result(result: Any, row: int, versions: dict[str, str]) -> GradResult:
        values = {name: _finite(value[row]) for name, value in result.rewards.items()}
        if row in result.errors:
            code, message = result.errors[row]
            return GradResult(rewards=values, details=result.details[row], error=message, error_code=code)
        encoded, scale = encode_gradient(result.grad[row])
        return GradResult(
            rewards=values,
            total=_finite(result.total[row]),
            grad=encoded,
            grad_scale=scale,
            details=result.details[row],
            versions=versions,
        )


def _finite(value: torch.Tensor) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None
