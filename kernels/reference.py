"""Torch implementations of the box-matching post-processing: the CPU path and the oracle for the Triton
kernels, which implement the same signatures. Everything is vectorised over the batch: no per-box loops."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import torch
import torchvision

_Result = TypeVar("_Result")


def takes_arguments_of(reference: Callable[..., _Result]) -> Callable[[Callable[..., _Result]], Callable[..., _Result]]:
    """Decorator for another backend's implementation: it takes its arguments as `reference` declares them
    (names, order, defaults), so each signature is written once, here. The implementation receives every
    argument positionally, defaults applied."""
    signature = inspect.signature(reference)

    def decorate(implementation: Callable[..., _Result]) -> Callable[..., _Result]:
        @functools.wraps(implementation)
        def call(*args: Any, **kwargs: Any) -> _Result:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return implementation(*bound.args)

        call.__signature__ = signature  # type: ignore[attr-defined]
        return call

    return decorate


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


def suppression_matrix(
    boxes: torch.Tensor,
    classes: torch.Tensor,
    valid: torch.Tensor,
    iou_threshold: float,
    containment_threshold: float,
) -> torch.Tensor:
    """[B, T, 4] boxes in rank order, classes [B, T], valid [B, T] -> [B, T, T] bool: rank i suppresses rank j.

    Set when j > i, both valid, same class and IoU(i, j) > iou_threshold or inter(i, j) / min(area_i, area_j) >
    containment_threshold (both strict, float64). The IoU uses torchvision's CPU nms operations in its order
    (unclamped areas, 0 / 0 never suppresses), as the Triton kernel does; the containment uses areas clamped at
    0, and a pair with a zero-area box has containment 0. inter <= min(area_i, area_j) holds in floating point
    too, so a containment threshold >= 1 never fires.
    """
    boxes = boxes.double()
    a, b = boxes[:, :, None, :], boxes[:, None, :, :]
    width = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    height = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = width * height
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    union = area[:, :, None] + area[:, None, :] - inter
    has_union = union != 0
    overlaps = has_union & (inter / torch.where(has_union, union, 1.0) > iou_threshold)
    clamped = (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)
    smaller = torch.minimum(clamped[:, :, None], clamped[:, None, :])
    has_area = smaller > 0
    contained = has_area & (inter / torch.where(has_area, smaller, 1.0) > containment_threshold)
    rank = torch.arange(boxes.shape[1], device=boxes.device)
    return (
        (overlaps | contained)
        & (classes[:, :, None] == classes[:, None, :])
        & valid[:, :, None]
        & valid[:, None, :]
        & (rank[None, None, :] > rank[None, :, None])
    )


def greedy_nms(suppress: torch.Tensor, valid: torch.Tensor, max_detections: int) -> torch.Tensor:
    """[B, T, T] suppression matrix (rank i suppresses rank j > i), valid [B, T] -> kept [B, T] bool.

    The greedy of NMS: ranks are visited in order; a valid rank not suppressed by an earlier kept rank is kept.
    Sequential over the T ranks, vectorised over the batch; stops once every image kept max_detections (later
    ranks could not enter the output anyway).
    """
    batch, num_top = valid.shape
    removed = ~valid
    kept = torch.zeros_like(valid)
    kept_count = torch.zeros(batch, dtype=torch.int64, device=valid.device)
    for rank in range(num_top):
        alive = ~removed[:, rank]
        kept[:, rank] = alive
        removed |= suppress[:, rank] & alive[:, None]
        kept_count += alive
        if rank % 64 == 63 and bool((kept_count >= max_detections).all()):
            break
    return kept


def select_candidates(
    candidates: torch.Tensor,
    conf_threshold: float,
    iou_threshold: float,
    max_detections: int,
    pre_nms_topk: int,
    containment_threshold: float = 1.0,
    num_classes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Confidence filter, best class, top-k pre-selection and class-aware NMS over a whole batch at once.

    candidates [B, N, 4 + C] -> (keep_indices, keep_scores, keep_classes) each [B, M] (-1 / 0 padded),
    num_kept [B]; M = max_detections, kept rows sorted by descending score. containment_threshold < 1 adds
    box_match's containment rule to the NMS (torchvision's nms otherwise). num_classes [B] (validated by
    box_match): image b's best class is taken over its first num_classes[b] score columns only; None: all C.
    """
    batch, num_candidates = candidates.shape[:2]
    device = candidates.device
    class_scores = candidates[..., 4:]
    if num_classes is not None:
        padded = torch.arange(class_scores.shape[-1], device=device) >= num_classes[:, None]  # [B, C]
        class_scores = class_scores.masked_fill(padded[:, None, :], -math.inf)
    scores, classes = class_scores.max(-1)  # [B, N]
    scores = torch.where(scores > conf_threshold, scores, torch.full_like(scores, -1.0))
    if num_classes is not None:
        # An image without score columns keeps nothing, whatever the threshold: -inf is above none (-1 is
        # above a threshold below -1).
        scores = scores.masked_fill((num_classes == 0)[:, None], -math.inf)
    topk = min(pre_nms_topk, num_candidates)
    top_scores, top_index = scores.topk(topk, dim=1)  # [B, T], descending
    image_index = torch.arange(batch, device=device)[:, None].expand(batch, topk)
    valid = top_scores > conf_threshold
    flat_image, flat_index, flat_scores = image_index[valid], top_index[valid], top_scores[valid]
    flat_classes = classes[flat_image, flat_index]
    boxes = candidates[flat_image, flat_index, :4].double()

    if containment_threshold >= 1:
        # Class-aware NMS for all images in one call: shift each (image, class) group to its own region of the
        # plane so boxes of different groups never overlap. Dense group ids and float64 keep the shift exact.
        # The span is the coordinate range (+1), not max + 1: with negative coordinates max + 1 lets groups
        # overlap.
        group = flat_image * candidates.shape[-1] + flat_classes
        _, dense_group = torch.unique(group, return_inverse=True)
        span = boxes.max() - boxes.min() + 1 if boxes.numel() else boxes.new_tensor(1.0)
        # nms orders by score with an unstable sort; ordering by topk position instead (topk already sorted
        # each image by descending score) breaks score ties in topk order, deterministically, like the Triton
        # kernel.
        flat_rank = torch.arange(topk, device=device).expand(batch, topk)[valid]
        kept = torchvision.ops.nms(boxes + (dense_group * span)[:, None], -flat_rank.double(), iou_threshold)
    else:
        # torchvision has no containment rule: a [B, T', T'] suppression matrix over the valid ranks (a prefix
        # of each image's topk list, T' the longest) and the greedy over it, in rank order as above.
        width = int(valid.sum(1).max()) if batch else 0
        ranked = valid[:, :width]
        ranked_boxes = torch.gather(candidates[..., :4], 1, top_index[:, :width, None].expand(batch, width, 4)).double()
        suppress = suppression_matrix(
            ranked_boxes, classes.gather(1, top_index[:, :width]), ranked, iou_threshold, containment_threshold
        )
        kept_ranks = greedy_nms(suppress, ranked, max_detections)
        # Flat rows were taken from [B, T] in row-major order, so a kept (image, rank) is row cumsum - 1.
        flat_row = torch.cumsum(valid.flatten(), 0).view(batch, topk)[:, :width] - 1
        kept = flat_row[kept_ranks]

    # nms returns kept rows by topk rank; a stable sort by image keeps that order within each image.
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
    if generating.numel() == 0:  # an empty batch: MKL's FFT rejects it
        return probabilities.new_zeros(*probabilities.shape[:-1], length)
    pmf = torch.fft.fft(generating, dim=-1).real / length
    return pmf.clamp(0.0, 1.0).to(probabilities.dtype)


def check_num_classes(num_classes: torch.Tensor | None, candidates: torch.Tensor) -> None:
    """box_match's num_classes check, shared by both backends (the same inputs fail with the same message):
    None, or a [B] int64 tensor with every value in [0, C]. The range test reads the values (a device sync)."""
    if num_classes is None:
        return
    batch, width = candidates.shape[0], candidates.shape[-1] - 4
    if not isinstance(num_classes, torch.Tensor) or num_classes.shape != (batch,) or num_classes.dtype != torch.int64:
        is_tensor = isinstance(num_classes, torch.Tensor)
        got = f"{tuple(num_classes.shape)} {num_classes.dtype}" if is_tensor else type(num_classes).__name__
        raise ValueError(f"num_classes must be a [B] = [{batch}] int64 tensor, got {got}")
    if bool(((num_classes < 0) | (num_classes > width)).any()):
        low, high = int(num_classes.min()), int(num_classes.max())
        raise ValueError(f"num_classes must lie in [0, C] = [0, {width}], got values in [{low}, {high}]")


def box_match(
    candidates: torch.Tensor,
    class_ids: torch.Tensor,
    requested: torch.Tensor,
    conf_threshold: float = 0.25,
    iou_threshold: float = 0.45,
    max_detections: int = 100,
    pre_nms_topk: int = 1000,
    containment_threshold: float = 1.0,
    num_classes: torch.Tensor | None = None,
) -> BoxMatch:
    """Detections -> per-(image, prompt class) counts, confidences and soft counts.

    candidates [B, N, 4 + C]: boxes x0, y0, x1, y1 then per-class scores.
    class_ids [B, K] int64: prompt class of each slot, -1 for padding.
    requested [B, K] int64: requested count per slot (ignored for padding).
    num_classes [B] int64 or None: image b's real score columns are its first num_classes[b] (each in [0, C]);
    the columns after them are padding (per-image query lists padded to the longest), ignored whatever they
    hold: the best class is taken over the real columns only, and an image with none keeps nothing. None: all
    C columns of every image.

    Candidates scoring above conf_threshold (best class per candidate) go, at most pre_nms_topk per image, through
    greedy class-aware NMS in score order (ties in topk order): a box is dropped when a kept, higher-ranked box
    of its class has IoU > iou_threshold with it, or contains it: intersection / min(area of either box) >
    containment_threshold (strict; a zero-area box contains and is contained by nothing; float64). The
    containment rule merges duplicates that IoU misses, e.g. an animal's body and its head reported as two
    boxes of the same class; it follows T2I-CompBench's numeracy evaluation, which counts two same-class
    detections once when IoU > 0.9 or one lies more than 0.9 inside the other (UniDet_eval/numeracy_eval.py,
    calculate_iou; it measures boxes in inclusive pixels, +1 per side, this does not). The default 1.0 never
    fires (the ratio is at most 1): plain NMS, torchvision's. The first max_detections kept boxes are counted.
    """
    if candidates.ndim != 3 or candidates.shape[-1] < 5:
        raise ValueError(f"candidates must be [B, N, 4 + C], got {tuple(candidates.shape)}")
    if class_ids.shape != requested.shape or class_ids.shape[0] != candidates.shape[0]:
        raise ValueError(f"class_ids {tuple(class_ids.shape)} and requested must both be [B, K]")
    check_num_classes(num_classes, candidates)
    keep_indices, keep_scores, keep_classes, num_kept = select_candidates(
        candidates, conf_threshold, iou_threshold, max_detections, pre_nms_topk, containment_threshold, num_classes
    )
    batch = candidates.shape[0]
    gather_index = keep_indices.clamp(min=0)[..., None].expand(batch, max_detections, 4)
    # With N = 0 every slot is padding, but gather still needs a row 0 to point at.
    source = candidates[..., :4] if candidates.shape[1] else candidates.new_zeros(batch, 1, 4)
    keep_boxes = torch.gather(source, 1, gather_index) * (keep_indices >= 0)[..., None]

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


class LayoutMatch(NamedTuple):
    """Result of layout_match for B images with T target boxes each.

    best_iou [B, T] (det_boxes dtype): IoU of the detection each target picked, 0 when it had none to pick.
    matched [B, T] bool: the picked IoU reached the threshold, and the detection is now taken.
    matched_index [B, T] int64: the matched detection's index, -1 when unmatched.
    """

    best_iou: torch.Tensor
    matched: torch.Tensor
    matched_index: torch.Tensor


def pairwise_iou(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """[..., A, 4], [..., B, 4] -> IoU [..., A, B] in float64. Inverted boxes (x1 < x0 or y1 < y0) have zero
    area; a pair whose union is not positive has IoU 0 (so zero-area boxes never match anything)."""
    a, b = boxes_a.double()[..., :, None, :], boxes_b.double()[..., None, :, :]
    width = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    height = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = width * height
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / torch.where(union > 0, union, 1.0), 0.0)


def layout_match(
    det_boxes: torch.Tensor,
    det_scores: torch.Tensor,
    det_classes: torch.Tensor,
    target_boxes: torch.Tensor,
    target_classes: torch.Tensor,
    iou_threshold: float = 0.5,
) -> LayoutMatch:
    """Greedy one-to-one matching of detections to target boxes of the same class.

    det_boxes [B, M, 4], det_scores [B, M], det_classes [B, M] int64 (-1 padding);
    target_boxes [B, T, 4], target_classes [B, T] int64 (-1 padding).

    Rule: targets are visited in order t = 0 .. T-1. Target t of class c >= 0 looks at the detections of class
    c that no earlier target has matched, and picks the one with the highest IoU (pairwise_iou, float64),
    ties broken by the higher score, then by the lower index. best_iou[t] is the picked IoU (0 when there is
    nothing to pick). The target is matched, and the detection taken, when best_iou[t] >= iou_threshold; an
    unmatched target takes nothing. Padding targets pick nothing.

    The greedy walk is sequential over the T targets (each sees what the earlier ones left); every step is
    vectorised over the batch and the detections.
    """
    if det_boxes.ndim != 3 or det_boxes.shape[-1] != 4 or target_boxes.ndim != 3 or target_boxes.shape[-1] != 4:
        raise ValueError(
            f"boxes must be [B, M, 4] and [B, T, 4], got {tuple(det_boxes.shape)}, {tuple(target_boxes.shape)}"
        )
    batch, num_targets = target_classes.shape
    num_dets = det_classes.shape[1]
    device = det_boxes.device
    iou = pairwise_iou(target_boxes, det_boxes)  # [B, T, M]
    same_class = (det_classes[:, None, :] == target_classes[:, :, None]) & (target_classes[:, :, None] >= 0)
    scores = det_scores.double()
    det_index = torch.arange(num_dets, device=device).expand(batch, num_dets)
    taken = torch.zeros((batch, num_dets), dtype=torch.bool, device=device)
    best_iou = torch.zeros((batch, num_targets), dtype=torch.float64, device=device)
    matched = torch.zeros((batch, num_targets), dtype=torch.bool, device=device)
    matched_index = torch.full((batch, num_targets), -1, dtype=torch.int64, device=device)
    for t in range(num_targets if num_dets else 0):
        candidate = same_class[:, t] & ~taken  # [B, M]
        candidate_iou = torch.where(candidate, iou[:, t], -1.0)
        top_iou = candidate_iou.max(-1).values
        tied = candidate & (candidate_iou == top_iou[:, None])
        tied_score = torch.where(tied, scores, -math.inf)
        pick = tied & (tied_score == tied_score.max(-1).values[:, None])
        picked = torch.where(pick, det_index, num_dets).min(-1).values
        has_candidate = candidate.any(-1)
        hit = has_candidate & (top_iou >= iou_threshold)
        best_iou[:, t] = torch.where(has_candidate, top_iou, 0.0)
        matched[:, t] = hit
        matched_index[:, t] = torch.where(hit, picked, -1)
        taken |= (det_index == picked[:, None]) & hit[:, None]
    return LayoutMatch(best_iou.to(det_boxes.dtype), matched, matched_index)
