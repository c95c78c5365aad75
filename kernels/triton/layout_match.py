"""Triton layout_match: greedy one-to-one IoU matching of detections to target boxes of the same class.
Same signature, rule and results as kernels.reference.layout_match (read its docstring for the rule)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .. import reference
from ..reference import LayoutMatch
from .box_match import check_device


@triton.jit
def _layout_match_kernel(
    det_boxes_ptr,
    det_scores_ptr,
    det_classes_ptr,
    target_boxes_ptr,
    target_classes_ptr,
    iou_ptr,
    best_iou_ptr,
    matched_ptr,
    matched_index_ptr,
    num_dets,
    num_targets,
    det_stride_b,
    det_stride_m,
    det_stride_c,
    target_stride_b,
    target_stride_t,
    target_stride_c,
    DETS: tl.constexpr,
):
    # Grid [B]: one program per image keeps the image's M detections in registers (boxes, areas and scores in
    # float64, classes, a "taken" flag; DETS >= M lanes) and walks the T targets in order. For each target:
    # IoU against all detections as one [DETS] vector, then the pick among same-class untaken detections by
    # three masked reductions (max IoU, then max score among IoU ties, then min index among score ties).
    # Traffic per image: reads M * (4s + s + 8) + T * (4s + 8), writes T * (8 + 1 + 8).
    image = tl.program_id(0).to(tl.int64)
    iou_threshold = tl.load(iou_ptr)
    det = tl.arange(0, DETS)
    det_ok = det < num_dets
    det_ptr = det_boxes_ptr + image * det_stride_b + det.to(tl.int64) * det_stride_m
    dx0 = tl.load(det_ptr, mask=det_ok, other=0.0).to(tl.float64)
    dy0 = tl.load(det_ptr + det_stride_c, mask=det_ok, other=0.0).to(tl.float64)
    dx1 = tl.load(det_ptr + 2 * det_stride_c, mask=det_ok, other=0.0).to(tl.float64)
    dy1 = tl.load(det_ptr + 3 * det_stride_c, mask=det_ok, other=0.0).to(tl.float64)
    det_area = tl.maximum(dx1 - dx0, 0.0) * tl.maximum(dy1 - dy0, 0.0)
    det_score = tl.load(det_scores_ptr + image * num_dets + det, mask=det_ok, other=0.0).to(tl.float64)
    det_class = tl.load(det_classes_ptr + image * num_dets + det, mask=det_ok, other=-1)
    taken = tl.zeros([DETS], dtype=tl.int32)
    for t in range(num_targets):
        target_ptr = target_boxes_ptr + image * target_stride_b + t * target_stride_t
        tx0 = tl.load(target_ptr).to(tl.float64)
        ty0 = tl.load(target_ptr + target_stride_c).to(tl.float64)
        tx1 = tl.load(target_ptr + 2 * target_stride_c).to(tl.float64)
        ty1 = tl.load(target_ptr + 3 * target_stride_c).to(tl.float64)
        target_class = tl.load(target_classes_ptr + image * num_targets + t)
        width = tl.maximum(tl.minimum(tx1, dx1) - tl.maximum(tx0, dx0), 0.0)
        height = tl.maximum(tl.minimum(ty1, dy1) - tl.maximum(ty0, dy0), 0.0)
        inter = width * height
        union = tl.maximum(tx1 - tx0, 0.0) * tl.maximum(ty1 - ty0, 0.0) + det_area - inter
        iou = tl.where(union > 0.0, inter / tl.where(union > 0.0, union, 1.0), 0.0)

        candidate = det_ok & (det_class == target_class) & (target_class >= 0) & (taken == 0)
        candidate_iou = tl.where(candidate, iou, -1.0)
        top_iou = tl.max(candidate_iou, 0)
        tied = candidate & (candidate_iou == top_iou)
        tied_score = tl.where(tied, det_score, float("-inf"))
        pick = tied & (tied_score == tl.max(tied_score, 0))
        picked = tl.min(tl.where(pick, det, DETS), 0)
        has_candidate = tl.max(candidate.to(tl.int32), 0) > 0
        hit = has_candidate & (top_iou >= iou_threshold)
        tl.store(best_iou_ptr + image * num_targets + t, tl.where(has_candidate, top_iou, 0.0))
        tl.store(matched_ptr + image * num_targets + t, hit.to(tl.int8))
        tl.store(matched_index_ptr + image * num_targets + t, tl.where(hit, picked, -1).to(tl.int64))
        taken = taken | ((det == picked) & hit).to(tl.int32)


INTERPRETED = isinstance(_layout_match_kernel, InterpretedFunction)


@reference.takes_arguments_of(reference.layout_match)
def layout_match(det_boxes, det_scores, det_classes, target_boxes, target_classes, iou_threshold) -> LayoutMatch:
    """Greedy matching of detections [B, M] to targets [B, T] of the same class (see reference.layout_match).

    det_boxes [B, M, 4], det_scores [B, M], det_classes [B, M] int64 (-1 padding);
    target_boxes [B, T, 4], target_classes [B, T] int64 (-1 padding). M is held in registers (<= a few
    thousand), T is walked in order.
    """
    if det_boxes.ndim != 3 or det_boxes.shape[-1] != 4 or target_boxes.ndim != 3 or target_boxes.shape[-1] != 4:
        raise ValueError(
            f"boxes must be [B, M, 4] and [B, T, 4], got {tuple(det_boxes.shape)}, {tuple(target_boxes.shape)}"
        )
    check_device(INTERPRETED, det_boxes, det_scores, det_classes, target_boxes, target_classes)
    batch, num_targets = target_classes.shape
    num_dets = det_classes.shape[1]
    device = det_boxes.device
    det_scores = det_scores.contiguous()
    det_classes = det_classes.to(torch.int64).contiguous()
    target_classes = target_classes.to(torch.int64).contiguous()
    # float64 buffer, cast on return: the same rounding as the reference's final .to(dtype).
    best_iou = torch.zeros((batch, num_targets), dtype=torch.float64, device=device)
    matched = torch.zeros((batch, num_targets), dtype=torch.int8, device=device)
    matched_index = torch.full((batch, num_targets), -1, dtype=torch.int64, device=device)
    if batch and num_targets and num_dets:
        iou = torch.full((1,), iou_threshold, dtype=torch.float64, device=device)
        _layout_match_kernel[(batch,)](
            det_boxes,
            det_scores,
            det_classes,
            target_boxes,
            target_classes,
            iou,
            best_iou,
            matched,
            matched_index,
            num_dets,
            num_targets,
            *det_boxes.stride(),
            *target_boxes.stride(),
            DETS=triton.next_power_of_2(num_dets),
            enable_fp_fusion=False,  # IoU rounded like the reference
        )
    return LayoutMatch(best_iou.to(det_boxes.dtype), matched.bool(), matched_index)
