"""What the client returns: ScoreBatch (per-item /score results as arrays, NaN where an item failed), GradBatch
(/grad: values and gradients) and
RewardServiceError (a request the service refused or could not answer, after any retries)."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class RewardServiceError(RuntimeError):
    """A request failed as a whole: refused (4xx), failed on the server (5xx), or unanswered after retries.

    status_code: the last HTTP status, None when no response came (connection error or timeout).
    message: the server's error message (or the transport error's).
    attempts: how many times the request was sent.
    """

    def __init__(
        self, message: str, status_code: int | None = None, path: str | None = None, attempts: int = 1
    ) -> None:
        self.message = message
        self.status_code = status_code
        self.path = path
        self.attempts = attempts
        where = f"{path} " if path else ""
        status = f"HTTP {status_code}" if status_code is not None else "no response"
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(f"{where}failed ({status}){tries}: {message}")


def _value(value: Any) -> float:
    return float("nan") if value is None else float(value)


@dataclass
class ScoreBatch:
    """Results of scoring N items, in input order.

    rewards: reward name -> float64 [N]; NaN where that reward failed for the item.
    total: float64 [N], the weighted sum of the rewards; NaN where any requested reward failed.
    NaN always means failure (see errors / error_codes), never a low score: mask it (`valid`), never fill 0.
    errors, error_codes: per item, None when the item scored cleanly.
    details: per item, reward name -> breakdown. versions: reward name -> model version (merged over items).
    items: the raw per-item JSON results.
    """

    rewards: dict[str, np.ndarray]
    total: np.ndarray
    errors: list[str | None]
    error_codes: list[str | None]
    details: list[dict[str, Any]]
    versions: dict[str, str]
    items: list[dict[str, Any]] = field(repr=False)

    @classmethod
    def from_items(cls, items: Sequence[Mapping[str, Any]]) -> ScoreBatch:
        names: dict[str, None] = {}  # ordered set: names in order of first appearance
        for item in items:
            names.update(dict.fromkeys(item.get("rewards") or {}))
        versions: dict[str, str] = {}
        for item in items:
            versions.update(item.get("versions") or {})
        return cls(
            rewards={
                name: np.array([_value((item.get("rewards") or {}).get(name)) for item in items], dtype=np.float64)
                for name in names
            },
            total=np.array([_value(item.get("total")) for item in items], dtype=np.float64),
            errors=[item.get("error") for item in items],
            error_codes=[item.get("error_code") for item in items],
            details=[dict(item.get("details") or {}) for item in items],
            versions=versions,
            items=[dict(item) for item in items],
        )

    def __len__(self) -> int:
        return len(self.items)

    @property
    def valid(self) -> np.ndarray:
        """bool [N]: True where the item has a total (every requested reward scored)."""
        return np.isfinite(self.total)


# np.load parses the header with ast.literal_eval, which CPython 3.11 cannot run from several threads at once
# (python/cpython#106905); score_async and the adapters' futures parse results on worker threads.
_NPY_LOCK = threading.Lock()


def _gradient(item: Mapping[str, Any], shape: tuple[int, ...]) -> np.ndarray:
    """The float32 gradient of one /grad result: fp16 .npy times grad_scale; zeros for a failed item."""
    if not item.get("grad"):
        return np.zeros(shape, dtype=np.float32)
    with _NPY_LOCK:
        array = np.load(io.BytesIO(base64.b64decode(item["grad"])), allow_pickle=False)
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"/grad returned a gradient of shape {list(array.shape)} for an image of {list(shape)}")
    return array.astype(np.float32) * np.float32(item.get("grad_scale") or 0.0)


@dataclass
class GradBatch(ScoreBatch):
    """ScoreBatch plus grads: one float32 [3, H, W] array per item, d(total)/d(pixels); zeros where the item
    failed (its total is NaN: mask with `valid`)."""

    grads: list[np.ndarray] = field(default_factory=list, repr=False)

    @classmethod
    def from_grad_items(cls, items: Sequence[Mapping[str, Any]], shapes: Sequence[tuple[int, ...]]) -> GradBatch:
        scores = ScoreBatch.from_items(items)
        grads = [_gradient(item, shape) for item, shape in zip(items, shapes, strict=True)]
        return cls(**{name: getattr(scores, name) for name in scores.__dataclass_fields__}, grads=grads)
