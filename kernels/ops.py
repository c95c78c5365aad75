"""Box-matching post-processing kernels. Callers use these functions, never an implementation directly:
the device picks the implementation (CUDA tensors -> Triton, CPU tensors -> the torch reference).

Override per call with backend="triton" | "reference", or for the process with the environment variable
REWARDSCOPE_KERNELS=triton | reference | auto (the argument wins over the variable). Triton on CPU tensors
runs only in Triton's interpreter: set TRITON_INTERPRET=1 before the first call (the Triton modules are
imported lazily, on first use, so setting it after importing this package still works).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import threading
import types

import torch

from . import reference
from .reference import BoxMatch, LayoutMatch, poisson_binomial

__all__ = ["BACKENDS", "BoxMatch", "LayoutMatch", "box_match", "layout_match", "poisson_binomial"]

BACKENDS = ("triton", "reference")
ENV_VARIABLE = "REWARDSCOPE_KERNELS"

# Triton's interpreter keeps per-launch state in globals: two threads interpreting at once corrupt each other.
_INTERPRETER_LOCK = threading.Lock()
_IMPORT_LOCK = threading.Lock()


def _triton_module(name: str) -> types.ModuleType:
    """rewardscope.kernels.triton.<name>, imported on first use (defining its kernels reads TRITON_INTERPRET)."""
    with _IMPORT_LOCK:
        return importlib.import_module(f"{__package__}.triton.{name}")


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str | None, tensor: torch.Tensor) -> str:
    """The implementation a call runs: the backend argument, else REWARDSCOPE_KERNELS, else the device."""
    choice = backend if backend is not None else os.environ.get(ENV_VARIABLE, "auto").strip().lower() or "auto"
    if choice not in (*BACKENDS, "auto"):
        source = "backend" if backend is not None else ENV_VARIABLE
        raise ValueError(f"{source} must be one of 'triton', 'reference' or 'auto', got {choice!r}")
    if choice == "auto":
        return "triton" if tensor.is_cuda and _triton_installed() else "reference"
    return choice


def _run_triton(name: str, *args, **kwargs):
    if not _triton_installed():
        raise RuntimeError("backend 'triton' needs the triton package; use backend='reference'")
    module = _triton_module(name)
    lock = _INTERPRETER_LOCK if module.INTERPRETED else contextlib.nullcontext()
    with lock:
        return getattr(module, name)(*args, **kwargs)


def box_match(
    candidates: torch.Tensor,
    class_ids: torch.Tensor,
    requested: torch.Tensor,
    conf_threshold: float = 0.25,
    iou_threshold: float = 0.45,
    max_detections: int = 100,
    pre_nms_topk: int = 1000,
    *,
    backend: str | None = None,
) -> BoxMatch:
    """Detections -> per-(image, prompt class) counts, confidences and soft counts.

    candidates [B, N, 4 + C]: boxes x0, y0, x1, y1 then per-class scores.
    class_ids [B, K] int64: prompt class of each slot, -1 for padding.
    requested [B, K] int64: requested count per slot (ignored for padding).
    backend: "triton" | "reference" | "auto" | None (None: REWARDSCOPE_KERNELS, else auto; auto: CUDA tensors
    -> triton, others -> reference).
    See rewardscope.kernels.reference.box_match for the outputs; both backends return the same kept detections.
    """
    args = (candidates, class_ids, requested, conf_threshold, iou_threshold, max_detections, pre_nms_topk)
    if resolve_backend(backend, candidates) == "triton":
        return _run_triton("box_match", *args)
    return reference.box_match(*args)


def layout_match(
    det_boxes: torch.Tensor,
    det_scores: torch.Tensor,
    det_classes: torch.Tensor,
    target_boxes: torch.Tensor,
    target_classes: torch.Tensor,
    iou_threshold: float = 0.5,
    *,
    backend: str | None = None,
) -> LayoutMatch:
    """Greedy one-to-one IoU matching of detections [B, M] to target boxes [B, T] of the same class.

    det_boxes [B, M, 4], det_scores [B, M], det_classes [B, M] int64 (-1 padding);
    target_boxes [B, T, 4], target_classes [B, T] int64 (-1 padding).
    backend: as for box_match. The matching rule is in rewardscope.kernels.reference.layout_match's docstring.
    """
    args = (det_boxes, det_scores, det_classes, target_boxes, target_classes, iou_threshold)
    if resolve_backend(backend, det_boxes) == "triton":
        return _run_triton("layout_match", *args)
    return reference.layout_match(*args)
