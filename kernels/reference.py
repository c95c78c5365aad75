"""Torch implementations of the box-matching post-processing: the CPU path and the oracle for the Triton
kernels, which implement the same signatures. Everything is vectorised over the batch: no per-box loops."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torchvision


class BoxMatch(NamedTuple):
    """Result of box_match for a batch of B images and K prompt classes per image (M = max_detections).

    keep_indices [B, M] int64: candidate index of each kept detection, -1 padding, sorted by score.
    keep_boxes [B, M, 4], keep_scores [B, M], keep_classes [B, M] int64 (-1 padding).
    num_kept [B] int64.
    counts [B, K] int64: kept detections of each prompt class (0 for padded class slots).
    confidence_sum [B, K], confidence_mean [B, K] (0 where count is 0).
    p_exact [B, K]: P(count = requested) when each kept detection is real with probability = its score.
    p_at_least [B, K]: P(count >= requested) under the same Poisson-binomial model.
    """

    keep_indices: torch.Tensor
    keep_boxes: torch.Tensor
    keep_scores: torch.Tensor
    keep_classes: torch.Tensor
    num_kept: torch.Tensor
    counts: torch.Tensor
    confidence_sum: torch.Tensor
    confidence_mean: torch.Tensor
    p_exact: torch.Tensor
    p_at_least: torch.Tensor


def select_candidates(
    candidates: torch.Tensor,
    conf_threshold: float,
    iou_threshold: float,
    max_detections: int,
    pre_nms_topk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Confidence filter, best class, top-k pre-selection and class-aware NMS over a whole batch at once.

    candidates [B, N, 4 + C] -> (keep_indices, keep_scores, keep_classes) each [B, M] (-1 / 0 padded),
    num_kept [B]; M = max_detections, kept rows sorted by descending score.
    """
    batch, num_candidates = candidates.shape[:2]
    device = candidates.device
    scores, classes = candidates[..., 4:].max(-1)  # [B, N]
    scores = torch.where(scores > conf_threshold, scores, torch.full_like(scores, -1.0))
    topk = min(pre_nms_topk, num_candidates)
    top_scores, top_index = scores.topk(topk, dim=1)  # [B, T], descending
    image_index = torch.arange(batch, device=device)[:, None].expand(batch, topk)
    valid = top_scores > conf_threshold
    flat_image, flat_index, flat_scores = image_index[valid], top_index[valid], top_scores[valid]
    flat_classes = classes[flat_image, flat_index]
    boxes = candidates[flat_image, flat_index, :4].double()

    # Class-aware NMS for all images in one call: shift each (image, class) group to its own region of the
    # plane so boxes of different groups never overlap. Dense group ids and float64 keep the shift exact.
    group = flat_image * candidates.shape[-1] + flat_classes
    _, dense_group = torch.unique(group, return_inverse=True)
    span = boxes.max() + 1 if boxes.numel() else boxes.new_tensor(1.0)
    kept = torchvision.ops.nms(boxes + (dense_group * span)[:, None], flat_scores.double(), iou_threshold)

    # nms returns kept rows by descending score; a stable sort by image keeps that order within each image.
    kept = kept[torch.sort(flat_image[kept], stable=True).indices]
    kept_image = flat_image[kept]
    per_image = torch.bincount(kept_image, minlength=batch)
    first_row = torch.cumsum(per_image, 0) - per_image
    rank = torch.arange(kept.numel(), device=device) - first_row[kept_image]
    in_budget = rank < max_detections
    kept, kept_image, rank = kept[in_budget], kept_image[in_budget], rank[in_budget]

    keep_indices = torch.full((batch, max_detections), -1, dtype=torch.int64, device=device)
    keep_scores = torch.zeros((batch, max_detections), dtype=candidates.dtype, device=device)
    keep_classes = torch.full((batch, max_detections), -1, dtype=torch.int64, device=device)
    keep_indices[kept_image, rank] = flat_index[kept]
    keep_scores[kept_image, rank] = flat_scores[kept]
    keep_classes[kept_image, rank] = flat_classes[kept]
    return keep_indices, keep_scores, keep_classes, per_image.clamp(max=max_detections)


def poisson_binomial(probabilities: torch.Tensor) -> torch.Tensor:
    """[..., M] independent success probabilities -> pmf of the number of successes [..., M + 1].

    Evaluates the generating function prod_m (1 - p_m + p_m z) at the M + 1 roots of unity and inverts
    with one FFT: exact up to float64 rounding, vectorised, and differentiable in the probabilities.
    """
    num = probabilities.shape[-1]
    length = num + 1
    roots = torch.exp(
        2j * math.pi * torch.arange(length, device=probabilities.device, dtype=torch.float64) / length
    )  # [L]
    p = probabilities.double()[..., None, :]  # [..., 1, M]
    generating = torch.prod(1 - p + p * roots[:, None], dim=-1)  # [..., L]
    pmf = torch.fft.fft(generating, dim=-1).real / length
    return pmf.clamp(0.0, 1.0).to(probabilities.dtype)


def box_match(
    candidates: torch.Tensor,
    class_ids: torch.Tensor,
    requested: torch.Tensor,
    conf_threshold: float = 0.25,
    iou_threshold: float = 0.45,
    max_detections: int = 100,
    pre_nms_topk: int = 1000,
) -> BoxMatch:
    """Detections -> per-(image, prompt class) counts, confidences and soft counts.

    candidates [B, N, 4 + C]: boxes x0, y0, x1, y1 then per-class scores.
    class_ids [B, K] int64: prompt class of each slot, -1 for padding.
    requested [B, K] int64: requested count per slot (ignored for padding).
    """
    if candidates.ndim != 3 or candidates.shape[-1] < 5:
        raise ValueError(f"candidates must be [B, N, 4 + C], got {tuple(candidates.shape)}")
    if class_ids.shape != requested.shape or class_ids.shape[0] != candidates.shape[0]:
        raise ValueError(f"class_ids {tuple(class_ids.shape)} and requested must both be [B, K]")
    keep_indices, keep_scores, keep_classes, num_kept = select_candidates(
        candidates, conf_threshold, iou_threshold, max_detections, pre_nms_topk
    )
    batch = candidates.shape[0]
    gather_index = keep_indices.clamp(min=0)[..., None].expand(batch, max_detections, 4)
    keep_boxes = torch.gather(candidates[..., :4], 1, gather_index) * (keep_indices >= 0)[..., None]

    # [B, K, M]: which kept detection belongs to which prompt slot.
    member = (keep_classes[:, None, :] == class_ids[:, :, None]) & (class_ids[:, :, None] >= 0)
    member_scores = keep_scores[:, None, :] * member
    counts = member.sum(-1)
    confidence_sum = member_scores.sum(-1)
    confidence_mean = torch.where(counts > 0, confidence_sum / counts.clamp(min=1), torch.zeros_like(confidence_sum))

    # Soft count over the slots' detections; trimming the padded columns keeps the FFT small.
    width = int(num_kept.max()) if batch else 0
    pmf = poisson_binomial(member_scores[..., :width])  # [B, K, width + 1]
    target = requested.clamp(min=0)
    reachable = target <= width
    p_exact = torch.where(
        reachable,
        pmf.gather(-1, target.clamp(max=width)[..., None])[..., 0],
        torch.zeros_like(confidence_sum),
    )
    cdf_below = torch.cumsum(pmf, -1) - pmf  # P(count < n) at index n
    p_at_least = torch.where(
        reachable,
        (1 - cdf_below.gather(-1, target.clamp(max=width)[..., None])[..., 0]).clamp(0, 1),
        torch.zeros_like(confidence_sum),
    )
    padding = class_ids < 0
    p_exact = p_exact.masked_fill(padding, 0)
    p_at_least = p_at_least.masked_fill(padding, 0)
    return BoxMatch(
        keep_indices,
        keep_boxes,
        keep_scores,
        keep_classes,
        num_kept,
        counts,
        confidence_sum,
        confidence_mean,
        p_exact,
        p_at_least,
    )
