"""Triton box_match: confidence filter + best class, class-aware NMS through an IoU bitmask, and per-(image,
prompt class) count / confidence / soft count. Same signature and results as kernels.reference.box_match.

Stages (B images, N candidates, C classes, T = min(pre_nms_topk, N), W = ceil(T / 64) mask words per row,
M = max_detections, K prompt slots; s = bytes per candidate element):
  1. _best_class_kernel   [B, ceil(N / 128)]  candidates -> score (thresholded) and class per candidate, over
                                               the image's first num_classes[b] columns when given
  2. torch.topk           per image            scores -> T candidates in descending score (the tie order)
  3. _iou_mask_kernel     [B, T / 16, W]       16 x 64 strips of "row suppresses column" bits (IoU or
                                               containment), same class only
  4. _nms_sweep_kernel    [B]                  greedy walk over the bitmask -> kept detections, padded
  5. _soft_count_kernel   [B]                  per prompt slot: count, confidence sum / mean, Poisson-binomial
Importing this module defines the kernels: set TRITON_INTERPRET=1 before importing it to run them on CPU
tensors (the tests do; kernels/ops.py imports it lazily for that reason).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .. import reference
from ..reference import BoxMatch

# Fixed launch configurations (no autotuning: the interpreter cannot run multi-config autotune). Register
# counts from ptxas for sm_90, fp32 candidates: stage 1 128, stage 3 136, stage 4 90, stage 5 116, with no
# spills (stage 5's 48-byte stack frame is libdevice's float64 sin / cos).
CANDIDATE_BLOCK = 128  # candidates per program in stage 1 (8 warps)
CLASS_BLOCK = 32  # classes per chunk in stage 1 (C = 80 takes three chunks)
TILE = 64  # bits per mask word (int64) = columns per stage-3 program = ranks per stage-4 tile row
MASK_ROWS = 16  # rows per stage-3 program: a 16 x 64 strip of a 64 x 64 tile keeps float64 IoU in registers
SWEEP_UNROLL = 16  # stage-4 steps whose loads are issued together


@triton.jit
def _exact_float(x):
    """float16 / bfloat16 -> float32 (exact), wider types unchanged: comparisons then never run on 16-bit
    floats (the interpreter compares bfloat16 wrongly), and results are stored back without rounding."""
    if x.dtype.primitive_bitwidth < 32:
        return x.to(tl.float32)
    else:
        return x


@triton.jit
def _to_output(x, ptr):
    """A float64 result in the element type of `ptr`, via float32 for 16-bit types (the interpreter cannot
    convert float64 to bfloat16 directly)."""
    if ptr.dtype.element_ty.primitive_bitwidth < 32:
        return x.to(tl.float32).to(ptr.dtype.element_ty)
    else:
        return x.to(ptr.dtype.element_ty)


@triton.jit
def _best_class_kernel(
    candidates_ptr,
    conf_ptr,
    num_classes_ptr,
    scores_ptr,
    classes_ptr,
    num_candidates,
    num_classes,
    stride_b,
    stride_n,
    stride_c,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PER_IMAGE: tl.constexpr,
):
    # Stage 1. Grid [B, ceil(N / BLOCK_N)]: one program scans BLOCK_N candidates of one image, loading the
    # class scores in [BLOCK_N, BLOCK_C] tiles and keeping a running max and first argmax (torch.max's tie
    # rule: the lowest class index). Scores not above conf_threshold become -1 (as in the reference).
    # PER_IMAGE (box_match got num_classes): the image's count c_b is read from num_classes_ptr and only its
    # first c_b columns are loaded (padding columns are masked off, chunks past c_b not visited); an image
    # with c_b = 0 gets score -inf on every row (above no threshold: never kept), as in the reference.
    # Otherwise c_b = C (the num_classes argument) and num_classes_ptr is not read.
    # Traffic per image: reads N * c_b * s (the box columns are skipped) + 8 per program when PER_IMAGE,
    # writes N * (s + 4).
    image = tl.program_id(0).to(tl.int64)
    if PER_IMAGE:
        image_classes = tl.load(num_classes_ptr + image).to(tl.int32)
    else:
        image_classes = num_classes
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_candidates
    row_ptr = candidates_ptr + image * stride_b + rows.to(tl.int64)[:, None] * stride_n + 4 * stride_c
    cols = tl.arange(0, BLOCK_C)
    tile = tl.load(
        row_ptr + cols[None, :] * stride_c,
        mask=row_ok[:, None] & (cols[None, :] < image_classes),
        other=float("-inf"),
    )
    tile = _exact_float(tile)
    best, best_class = tl.max(tile, 1, return_indices=True, return_indices_tie_break_left=True)
    for start in range(BLOCK_C, image_classes, BLOCK_C):
        chunk_cols = start + cols
        tile = tl.load(
            row_ptr + chunk_cols[None, :] * stride_c,
            mask=row_ok[:, None] & (chunk_cols[None, :] < image_classes),
            other=float("-inf"),
        )
        tile = _exact_float(tile)
        chunk_best, chunk_class = tl.max(tile, 1, return_indices=True, return_indices_tie_break_left=True)
        better = chunk_best > best  # strict: an equal score in a later chunk keeps the earlier class
        best = tl.where(better, chunk_best, best)
        best_class = tl.where(better, chunk_class + start, best_class)
    conf = _exact_float(tl.load(conf_ptr))  # rounded to the candidates' dtype, like torch's comparison
    score = tl.where(best > conf, best, -1.0)
    if PER_IMAGE:
        score = tl.where(image_classes > 0, score, float("-inf"))
    tl.store(scores_ptr + image * num_candidates + rows, score, mask=row_ok)
    tl.store(classes_ptr + image * num_candidates + rows, best_class.to(tl.int32), mask=row_ok)


@triton.jit
def _load_ranked(
    candidates_ptr,
    classes_ptr,
    top_index_ptr,
    top_scores_ptr,
    conf,
    image,
    ranks,
    num_candidates,
    num_top,
    stride_b,
    stride_n,
    stride_c,
):
    """Boxes (float64), classes and validity of the candidates at the given topk ranks of one image."""
    in_range = ranks < num_top
    index = tl.load(top_index_ptr + image * num_top + ranks, mask=in_range, other=0)
    score = _exact_float(tl.load(top_scores_ptr + image * num_top + ranks, mask=in_range, other=0.0))
    valid = in_range & (score > conf)
    box_ptr = candidates_ptr + image * stride_b + index * stride_n
    x0 = tl.load(box_ptr, mask=in_range, other=0.0).to(tl.float64)
    y0 = tl.load(box_ptr + stride_c, mask=in_range, other=0.0).to(tl.float64)
    x1 = tl.load(box_ptr + 2 * stride_c, mask=in_range, other=0.0).to(tl.float64)
    y1 = tl.load(box_ptr + 3 * stride_c, mask=in_range, other=0.0).to(tl.float64)
    cls = tl.load(classes_ptr + image * num_candidates + index, mask=in_range, other=-1)
    return x0, y0, x1, y1, cls, valid


@triton.jit
def _iou_mask_kernel(
    candidates_ptr,
    classes_ptr,
    top_index_ptr,
    top_scores_ptr,
    conf_ptr,
    iou_ptr,
    containment_ptr,
    mask_ptr,
    num_candidates,
    num_top,
    num_words,
    stride_b,
    stride_n,
    stride_c,
    ROWS: tl.constexpr,
    TILE: tl.constexpr,
    CONTAINMENT: tl.constexpr,
):
    # Stage 3. Grid [B, ceil(T / ROWS), W]: program (image, r, c) covers ranks [ROWS r, ROWS r + ROWS) x
    # [64c, 64c + 64) of the image's topk list (a ROWS x 64 tile of a 64 x 64 bitmask tile) and writes
    # mask[image, i, c], one int64 word per row i: bit (j - 64c) is set when rank i suppresses rank j, i.e.
    # j > i, both valid (score > conf), same class and IoU > iou_threshold (strict, float64, the same
    # operations as torchvision's CPU nms, launched without FMA contraction; 0 / 0 never suppresses), or, when
    # CONTAINMENT (containment_threshold < 1), inter / min(area_i, area_j) > containment_threshold (areas
    # clamped at 0; a zero-area box has containment 0), as reference.suppression_matrix computes it.
    # Programs whose columns all precede their rows exit at once, so only the upper triangle is computed and
    # written. No float IoU matrix is stored.
    # Traffic per image: reads T ranked rows (index 8, score s, class 4, box 4s bytes) once from HBM and
    # ~(T / ROWS) * W / 2 times (ROWS + 64) of them from L2; writes ~T * W / 2 * 8 bytes of mask words.
    image = tl.program_id(0).to(tl.int64)
    row_start = tl.program_id(1) * ROWS
    col_tile = tl.program_id(2)
    if col_tile * TILE + TILE - 1 <= row_start:
        return
    conf = _exact_float(tl.load(conf_ptr))
    iou_threshold = tl.load(iou_ptr)
    rows = row_start + tl.arange(0, ROWS)
    cols = col_tile * TILE + tl.arange(0, TILE)
    ax0, ay0, ax1, ay1, a_cls, a_valid = _load_ranked(
        candidates_ptr,
        classes_ptr,
        top_index_ptr,
        top_scores_ptr,
        conf,
        image,
        rows,
        num_candidates,
        num_top,
        stride_b,
        stride_n,
        stride_c,
    )
    bx0, by0, bx1, by1, b_cls, b_valid = _load_ranked(
        candidates_ptr,
        classes_ptr,
        top_index_ptr,
        top_scores_ptr,
        conf,
        image,
        cols,
        num_candidates,
        num_top,
        stride_b,
        stride_n,
        stride_c,
    )
    width = tl.maximum(tl.minimum(ax1[:, None], bx1[None, :]) - tl.maximum(ax0[:, None], bx0[None, :]), 0.0)
    height = tl.maximum(tl.minimum(ay1[:, None], by1[None, :]) - tl.maximum(ay0[:, None], by0[None, :]), 0.0)
    inter = width * height
    union = ((ax1 - ax0) * (ay1 - ay0))[:, None] + ((bx1 - bx0) * (by1 - by0))[None, :] - inter
    has_union = union != 0.0
    overlaps = has_union & (inter / tl.where(has_union, union, 1.0) > iou_threshold)
    if CONTAINMENT:
        containment_threshold = tl.load(containment_ptr)
        a_area = tl.maximum(ax1 - ax0, 0.0) * tl.maximum(ay1 - ay0, 0.0)
        b_area = tl.maximum(bx1 - bx0, 0.0) * tl.maximum(by1 - by0, 0.0)
        smaller = tl.minimum(a_area[:, None], b_area[None, :])
        has_area = smaller > 0.0
        contained = has_area & (inter / tl.where(has_area, smaller, 1.0) > containment_threshold)
        overlaps = overlaps | contained
    suppress = (
        overlaps
        & (a_cls[:, None] == b_cls[None, :])
        & a_valid[:, None]
        & b_valid[None, :]
        & (cols[None, :] > rows[:, None])
    )
    # The bits of a row are distinct powers of two, so their sum is their OR (bit 63 wraps to the sign bit).
    words = tl.sum(suppress.to(tl.int64) << tl.arange(0, TILE).to(tl.int64)[None, :], 1)
    tl.store(mask_ptr + (image * num_top + rows) * num_words + col_tile, words, mask=rows < num_top)


@triton.jit
def _nms_sweep_kernel(
    candidates_ptr,
    classes_ptr,
    top_index_ptr,
    top_scores_ptr,
    conf_ptr,
    mask_ptr,
    keep_indices_ptr,
    keep_boxes_ptr,
    keep_scores_ptr,
    keep_classes_ptr,
    num_kept_ptr,
    num_candidates,
    num_top,
    num_words,
    max_detections,
    stride_b,
    stride_n,
    stride_c,
    TILE: tl.constexpr,
    WORDS: tl.constexpr,
    MAX_DET: tl.constexpr,
    UNROLL: tl.constexpr,
):
    # Stage 4. Grid [B]: one program walks its image's topk list in rank order, 64 ranks (one tile row) at a
    # time, with `removed` = W_pad words of "suppressed by a kept box" bits in registers. Within a tile row
    # the walk is a 64-step chain on one scalar word (the row's validity and suppression bits for these 64
    # ranks, updated from the diagonal word of each kept rank); a kept rank also ORs its later words into
    # `removed` (a [W_pad] load whose address does not depend on the chain). It stops once M boxes are kept and
    # writes the kept boxes in rank order (= descending score, ties in topk order) and the -1 / 0 padding.
    # Traffic per image: reads at most T * W / 2 * 8 (the upper-triangle mask, just written: L2) + T * s
    # (scores) + M * (8 + 4 + 4s) (kept rows), writes M * (8 + 5s + 8) + 8.
    image = tl.program_id(0).to(tl.int64)
    conf = _exact_float(tl.load(conf_ptr))
    lane = tl.arange(0, TILE)
    word_index = tl.arange(0, WORDS)
    removed = tl.zeros([WORDS], dtype=tl.int64)
    kept_count = 0
    row_tile = 0
    while (row_tile < num_words) & (kept_count < max_detections):
        ranks = row_tile * TILE + lane
        in_range = ranks < num_top
        score = _exact_float(tl.load(top_scores_ptr + image * num_top + ranks, mask=in_range, other=0.0))
        valid = in_range & (score > conf)
        blocked = tl.sum(tl.where(valid, 0, 1).to(tl.int64) << lane.to(tl.int64), 0)  # distinct bits: sum = OR
        blocked = blocked | tl.sum(tl.where(word_index == row_tile, removed, 0))
        row_ptr = mask_ptr + (image * num_top + row_tile * TILE) * num_words
        later_words = (word_index > row_tile) & (word_index < num_words)
        keep_bits = tl.zeros([], dtype=tl.int64)
        # Unrolled by UNROLL, and the loads do not depend on the chain: a group's loads fly together.
        for group in range(0, TILE, UNROLL):
            for offset in tl.static_range(UNROLL):
                step = group + offset
                row_ok = row_tile * TILE + step < num_top
                diagonal = tl.load(row_ptr + step * num_words + row_tile, mask=row_ok, other=0)
                later = tl.load(row_ptr + step * num_words + word_index, mask=row_ok & later_words, other=0)
                bit = tl.full([], 1, tl.int64) << step.to(tl.int64)
                alive = (blocked & bit) == 0  # invalid and out-of-range ranks start blocked
                keep_bits = keep_bits | tl.where(alive, bit, 0)
                blocked = blocked | tl.where(alive, diagonal, 0)
                removed = removed | tl.where(alive, later, 0)
        kept = ((keep_bits >> lane.to(tl.int64)) & 1) != 0

        slot = kept_count + tl.cumsum(kept.to(tl.int32), 0) - 1
        out = kept & (slot < max_detections)
        out_slot = image * max_detections + slot
        index = tl.load(top_index_ptr + image * num_top + ranks, mask=out, other=0)
        tl.store(keep_indices_ptr + out_slot, index, mask=out)
        tl.store(keep_scores_ptr + out_slot, tl.load(top_scores_ptr + image * num_top + ranks, mask=out), mask=out)
        cls = tl.load(classes_ptr + image * num_candidates + index, mask=out)
        tl.store(keep_classes_ptr + out_slot, cls.to(tl.int64), mask=out)
        box_ptr = candidates_ptr + image * stride_b + index * stride_n
        for coordinate in tl.static_range(4):
            value = tl.load(box_ptr + coordinate * stride_c, mask=out)
            tl.store(keep_boxes_ptr + out_slot * 4 + coordinate, value, mask=out)
        kept_count += tl.sum(kept.to(tl.int32))
        row_tile += 1

    num_kept = tl.minimum(kept_count, max_detections)
    tl.store(num_kept_ptr + image, num_kept.to(tl.int64))
    slots = tl.arange(0, MAX_DET)
    padding = (slots >= num_kept) & (slots < max_detections)
    pad_slot = image * max_detections + slots
    tl.store(keep_indices_ptr + pad_slot, tl.full([MAX_DET], -1, tl.int64), mask=padding)
    tl.store(keep_scores_ptr + pad_slot, tl.zeros([MAX_DET], tl.float32), mask=padding)
    tl.store(keep_classes_ptr + pad_slot, tl.full([MAX_DET], -1, tl.int64), mask=padding)
    for coordinate in tl.static_range(4):
        tl.store(keep_boxes_ptr + pad_slot * 4 + coordinate, tl.zeros([MAX_DET], tl.float32), mask=padding)


@triton.jit
def _soft_count_kernel(
    keep_scores_ptr,
    keep_classes_ptr,
    num_kept_ptr,
    class_ids_ptr,
    requested_ptr,
    counts_ptr,
    sum_ptr,
    mean_ptr,
    p_exact_ptr,
    p_at_least_ptr,
    num_slots,
    max_detections,
    SLOTS: tl.constexpr,
    MAX_DET: tl.constexpr,
    ROOTS: tl.constexpr,
):
    # Stage 5. Grid [B]: one program per image, all K prompt slots at once ([SLOTS, MAX_DET] and
    # [SLOTS, ROOTS] register tiles, ROOTS >= M + 1). Count and confidence sum are masked reductions over the
    # kept detections. Soft count: with c_k = count members and L = c_k + 1 roots of unity w^l, the
    # generating function G(z) = prod_m (1 - p_m + p_m z) is built at all L roots at once by one pass over the
    # kept detections (real / imaginary float64 pairs); then only the needed inverse-DFT terms are evaluated:
    #   P(count = n)  = 1/L sum_l Re(G(w^l) w^(-l n))
    #   P(count >= n) = 1/L sum_l Re(G(w^l) D_l),  D_0 = L - n,  D_l = (w^(-l n) - 1) / (1 - w^(-l))
    # (D_l is the geometric sum of w^(-l k) over k = n .. L-1). Both are clamped to [0, 1]; n > count gives 0.
    # Traffic per image: reads M * (s + 8) + K * 16 + 8, writes K * (8 + 4s).
    image = tl.program_id(0).to(tl.int64)
    slot = tl.arange(0, SLOTS)
    slot_ok = slot < num_slots
    cls = tl.load(class_ids_ptr + image * num_slots + slot, mask=slot_ok, other=-1)
    wanted = tl.maximum(tl.load(requested_ptr + image * num_slots + slot, mask=slot_ok, other=0), 0)
    num_kept = tl.load(num_kept_ptr + image)

    kept = tl.arange(0, MAX_DET)
    kept_ok = kept < num_kept
    kept_class = tl.load(keep_classes_ptr + image * max_detections + kept, mask=kept_ok, other=-1)
    kept_score = tl.load(keep_scores_ptr + image * max_detections + kept, mask=kept_ok, other=0.0)
    member = (kept_class[None, :] == cls[:, None]) & (cls[:, None] >= 0) & kept_ok[None, :]
    count = tl.sum(member.to(tl.int64), 1)
    total = tl.sum(tl.where(member, kept_score.to(tl.float64)[None, :], 0.0), 1)
    mean = tl.where(count > 0, total / tl.maximum(count, 1).to(tl.float64), 0.0)

    length = count + 1  # [SLOTS]
    root = tl.arange(0, ROOTS)[None, :].to(tl.int64)
    root_ok = root < length[:, None]
    two_pi = tl.full([], 6.283185307179586, tl.float64)  # a bare float literal would be float32
    angle = two_pi * root.to(tl.float64) / length[:, None].to(tl.float64)
    cos_root, sin_root = tl.cos(angle), tl.sin(angle)
    real = tl.full([SLOTS, ROOTS], 1.0, tl.float64)
    imag = tl.zeros([SLOTS, ROOTS], tl.float64)
    for m in range(num_kept):
        m_class = tl.load(keep_classes_ptr + image * max_detections + m)
        m_score = tl.load(keep_scores_ptr + image * max_detections + m).to(tl.float64)
        p = tl.where((cls == m_class) & (cls >= 0), m_score, 0.0)[:, None]
        factor_real = 1.0 - p + p * cos_root
        factor_imag = p * sin_root
        real, imag = real * factor_real - imag * factor_imag, real * factor_imag + imag * factor_real

    # w^(-l n) with the angle reduced mod L first, so it stays exact for large l * n.
    turn = (root * wanted[:, None]) % length[:, None]
    back = two_pi * turn.to(tl.float64) / length[:, None].to(tl.float64)
    back_real, back_imag = tl.cos(back), -tl.sin(back)
    exact_terms = real * back_real - imag * back_imag
    p_exact = tl.sum(tl.where(root_ok, exact_terms, 0.0), 1) / length.to(tl.float64)

    # D_l = (w^(-l n) - 1) / (1 - w^(-l)) for l > 0; 1 - w^(-l) = (1 - cos) + i sin.
    num_real, num_imag = back_real - 1.0, back_imag
    den_real, den_imag = 1.0 - cos_root, sin_root
    den_norm = tl.where(root_ok & (root > 0), den_real * den_real + den_imag * den_imag, 1.0)
    tail_real = (num_real * den_real + num_imag * den_imag) / den_norm
    tail_imag = (num_imag * den_real - num_real * den_imag) / den_norm
    tail_real = tl.where(root == 0, (length - wanted)[:, None].to(tl.float64), tail_real)
    tail_imag = tl.where(root == 0, 0.0, tail_imag)
    tail_terms = real * tail_real - imag * tail_imag
    p_at_least = tl.sum(tl.where(root_ok, tail_terms, 0.0), 1) / length.to(tl.float64)

    reachable = (wanted <= count) & (cls >= 0)
    p_exact = tl.where(reachable, tl.minimum(tl.maximum(p_exact, 0.0), 1.0), 0.0)
    p_at_least = tl.where(reachable, tl.minimum(tl.maximum(p_at_least, 0.0), 1.0), 0.0)
    out = image * num_slots + slot
    tl.store(counts_ptr + out, count, mask=slot_ok)
    tl.store(sum_ptr + out, _to_output(total, sum_ptr), mask=slot_ok)
    tl.store(mean_ptr + out, _to_output(mean, mean_ptr), mask=slot_ok)
    tl.store(p_exact_ptr + out, _to_output(p_exact, p_exact_ptr), mask=slot_ok)
    tl.store(p_at_least_ptr + out, _to_output(p_at_least, p_at_least_ptr), mask=slot_ok)


INTERPRETED = isinstance(_best_class_kernel, InterpretedFunction)


def check_device(interpreted: bool, *tensors: torch.Tensor) -> None:
    """Triton runs CUDA tensors, or CPU tensors when the kernels were defined under TRITON_INTERPRET=1."""
    devices = {tensor.device for tensor in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cuda" or (interpreted and device.type == "cpu"):
        return
    raise RuntimeError(
        f"the Triton kernels got {device.type} tensors: they run CUDA tensors, or CPU tensors only in Triton's "
        "interpreter (set TRITON_INTERPRET=1 before rewardscope.kernels.triton.* is imported); "
        "use backend='reference' for the torch implementation"
    )


@reference.takes_arguments_of(reference.box_match)
def box_match(
    candidates,
    class_ids,
    requested,
    conf_threshold,
    iou_threshold,
    max_detections,
    pre_nms_topk,
    containment_threshold,
    num_classes,
):
    """Detections -> per-(image, prompt class) counts, confidences and soft counts (see reference.box_match).

    candidates [B, N, 4 + C] (any float dtype, any strides); class_ids [B, K] int64 (-1 padding);
    requested [B, K] int64. containment_threshold < 1 also merges a same-class box lying more than that
    fraction inside a kept one (intersection / the smaller area), the duplicate rule of T2I-CompBench's
    numeracy evaluation; 1 (the default) never fires and skips the test. num_classes [B] int64 (each in
    [0, C]) or None (all C): image b's best class is taken over its first num_classes[b] score columns, the
    padding after them is never read; checking its range costs one device sync. Kept detections, their order
    and tie-breaking match the reference exactly; the float outputs agree to rounding.
    """
    if candidates.ndim != 3 or candidates.shape[-1] < 5:
        raise ValueError(f"candidates must be [B, N, 4 + C], got {tuple(candidates.shape)}")
    if class_ids.shape != requested.shape or class_ids.shape[0] != candidates.shape[0]:
        raise ValueError(f"class_ids {tuple(class_ids.shape)} and requested must both be [B, K]")
    reference.check_num_classes(num_classes, candidates)
    check_device(INTERPRETED, candidates, class_ids, requested, *([] if num_classes is None else [num_classes]))
    batch, num_candidates, width = candidates.shape
    total_classes, num_slots = width - 4, class_ids.shape[1]
    device, dtype = candidates.device, candidates.dtype
    class_ids = class_ids.to(torch.int64).contiguous()
    requested = requested.to(torch.int64).contiguous()
    # Thresholds travel as tensors: conf in the candidates' dtype (torch rounds the Python float to it before
    # comparing), the IoU and containment thresholds in float64 (torchvision compares a float64 IoU with a
    # double; the reference's containment is float64 too).
    conf = torch.full((1,), conf_threshold, dtype=dtype, device=device)
    iou = torch.full((1,), iou_threshold, dtype=torch.float64, device=device)
    containment = torch.full((1,), containment_threshold, dtype=torch.float64, device=device)
    strides = candidates.stride()

    keep_indices = torch.empty((batch, max_detections), dtype=torch.int64, device=device)
    keep_boxes = torch.empty((batch, max_detections, 4), dtype=dtype, device=device)
    keep_scores = torch.empty((batch, max_detections), dtype=dtype, device=device)
    keep_classes = torch.empty((batch, max_detections), dtype=torch.int64, device=device)
    num_kept = torch.empty((batch,), dtype=torch.int64, device=device)
    num_top = min(pre_nms_topk, num_candidates)
    max_det_block = triton.next_power_of_2(max(max_detections, 1))
    if not (batch and num_top > 0 and max_detections > 0):
        keep_indices.fill_(-1)
        keep_boxes.zero_()
        keep_scores.zero_()
        keep_classes.fill_(-1)
        num_kept.zero_()
    else:
        scores = torch.empty((batch, num_candidates), dtype=dtype, device=device)
        classes = torch.empty((batch, num_candidates), dtype=torch.int32, device=device)
        _best_class_kernel[(batch, triton.cdiv(num_candidates, CANDIDATE_BLOCK))](
            candidates,
            conf,
            conf if num_classes is None else num_classes.contiguous(),  # not read when PER_IMAGE is False
            scores,
            classes,
            num_candidates,
            total_classes,
            *strides,
            BLOCK_N=CANDIDATE_BLOCK,
            BLOCK_C=CLASS_BLOCK,
            PER_IMAGE=num_classes is not None,
            num_warps=8,
        )
        # The same call as the reference on the same scores: the same order, ties included.
        top_scores, top_index = scores.topk(num_top, dim=1)
        num_words = triton.cdiv(num_top, TILE)
        mask = torch.empty((batch, num_top, num_words), dtype=torch.int64, device=device)
        _iou_mask_kernel[(batch, triton.cdiv(num_top, MASK_ROWS), num_words)](
            candidates,
            classes,
            top_index,
            top_scores,
            conf,
            iou,
            containment,
            mask,
            num_candidates,
            num_top,
            num_words,
            *strides,
            ROWS=MASK_ROWS,
            TILE=TILE,
            # The ratio is at most 1: a threshold >= 1 never fires, so that launch skips the test.
            CONTAINMENT=bool(containment_threshold < 1),
            num_warps=4,
            enable_fp_fusion=False,  # no FMA: the IoU rounds like torchvision's CPU loop, bit for bit
        )
        _nms_sweep_kernel[(batch,)](
            candidates,
            classes,
            top_index,
            top_scores,
            conf,
            mask,
            keep_indices,
            keep_boxes,
            keep_scores,
            keep_classes,
            num_kept,
            num_candidates,
            num_top,
            num_words,
            max_detections,
            *strides,
            TILE=TILE,
            WORDS=triton.next_power_of_2(num_words),
            MAX_DET=max_det_block,
            UNROLL=SWEEP_UNROLL,
            num_warps=1,
        )

    # counts, confidence_sum, confidence_mean, p_exact, p_at_least: BoxMatch's fields after num_kept.
    soft = (
        torch.empty((batch, num_slots), dtype=torch.int64, device=device),
        *(torch.empty((batch, num_slots), dtype=dtype, device=device) for _ in range(4)),
    )
    if batch and num_slots:
        _soft_count_kernel[(batch,)](
            keep_scores,
            keep_classes,
            num_kept,
            class_ids,
            requested,
            *soft,
            num_slots,
            max(max_detections, 0),
            SLOTS=triton.next_power_of_2(num_slots),
            MAX_DET=max_det_block,
            ROOTS=triton.next_power_of_2(max(max_detections, 0) + 1),
        )
    return BoxMatch(keep_indices, keep_boxes, keep_scores, keep_classes, num_kept, *soft)
