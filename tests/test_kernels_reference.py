"""The torch box_match (CPU path and future Triton oracle) against plain per-image loops on awkward inputs."""

from __future__ import annotations

import pytest
import torch
import torchvision
from oracles import brute_force_pmf
from rewardscope.kernels.ops import box_match, poisson_binomial


def loop_oracle(candidates, class_ids, requested, conf, iou, max_det):
    """Per image: filter, best class, torchvision batched_nms, then count per prompt class in Python."""
    results = []
    for b in range(candidates.shape[0]):
        scores, classes = candidates[b, :, 4:].max(-1)
        keep_mask = scores > conf
        index = torch.nonzero(keep_mask)[:, 0]
        kept = torchvision.ops.batched_nms(
            candidates[b, index, :4].double(), scores[index].double(), classes[index], iou
        )[:max_det]
        kept_index = index[kept]
        per_slot = []
        for cls in class_ids[b].tolist():
            if cls < 0:
                per_slot.append((0, 0.0))
                continue
            chosen = [float(scores[i]) for i in kept_index.tolist() if int(classes[i]) == cls]
            per_slot.append((len(chosen), sum(chosen) / len(chosen) if chosen else 0.0))
        results.append((kept_index.tolist(), per_slot))
    return results


def random_candidates(batch, num, classes, seed, clustered=True):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.rand(batch, num, 2, generator=generator) * 200
    if clustered:  # many overlapping boxes, so NMS has work to do
        centers = (centers / 40).round() * 40 + torch.rand(batch, num, 2, generator=generator) * 6
    sizes = 10 + torch.rand(batch, num, 2, generator=generator) * 40
    boxes = torch.cat([centers - sizes / 2, centers + sizes / 2], -1)
    scores = torch.rand(batch, num, classes, generator=generator) ** 3
    return torch.cat([boxes, scores], -1)


@pytest.mark.parametrize(
    "batch, num, classes, conf, iou, max_det, seed",
    [
        (1, 1, 1, 0.25, 0.45, 100, 0),  # a single candidate
        (3, 50, 4, 0.25, 0.45, 100, 1),
        (4, 300, 80, 0.10, 0.45, 100, 2),  # COCO-sized class axis
        (2, 200, 3, 0.05, 0.30, 5, 3),  # max_detections truncates
        (2, 100, 2, 0.99, 0.45, 100, 4),  # nearly nothing passes the threshold
        (2, 120, 5, 0.10, 1.00, 100, 5),  # IoU 1: NMS keeps everything
    ],
)
def test_box_match_matches_per_image_loop(batch, num, classes, conf, iou, max_det, seed):
    candidates = random_candidates(batch, num, classes, seed)
    class_ids = torch.tensor([[0, classes - 1, -1]] * batch)
    requested = torch.tensor([[1, 3, 0]] * batch)
    match = box_match(candidates, class_ids, requested, conf, iou, max_det)
    for b, (kept_index, per_slot) in enumerate(loop_oracle(candidates, class_ids, requested, conf, iou, max_det)):
        assert int(match.num_kept[b]) == len(kept_index)
        assert match.keep_indices[b, : len(kept_index)].tolist() == kept_index
        assert (match.keep_indices[b, len(kept_index) :] == -1).all()
        for slot, (count, mean) in enumerate(per_slot):
            assert int(match.counts[b, slot]) == count
            assert float(match.confidence_mean[b, slot]) == pytest.approx(mean, abs=1e-6)


def test_box_match_with_no_candidate_above_threshold_counts_zero():
    candidates = random_candidates(2, 10, 3, seed=7)
    candidates[..., 4:] = 0.01
    match = box_match(candidates, torch.tensor([[0, 1]] * 2), torch.tensor([[1, 0]] * 2), 0.25)
    assert match.num_kept.tolist() == [0, 0]
    assert match.counts.tolist() == [[0, 0], [0, 0]]
    # Nothing detected: P(count = 1) = 0, P(count = 0) = 1.
    assert match.p_exact.tolist() == [[0.0, 1.0], [0.0, 1.0]]


def test_identical_boxes_of_different_classes_both_survive_nms():
    candidates = torch.zeros(1, 2, 6)
    candidates[0, :, :4] = torch.tensor([10.0, 10.0, 50.0, 50.0])
    candidates[0, 0, 4], candidates[0, 1, 5] = 0.9, 0.8
    match = box_match(candidates, torch.tensor([[0, 1]]), torch.tensor([[1, 1]]))
    assert match.counts.tolist() == [[1, 1]]


def test_boxes_far_apart_in_different_images_do_not_suppress_each_other():
    candidates = torch.zeros(2, 1, 5)
    candidates[:, 0, :4] = torch.tensor([0.0, 0.0, 5000.0, 5000.0])
    candidates[:, 0, 4] = 0.9
    match = box_match(candidates, torch.tensor([[0], [0]]), torch.tensor([[1], [1]]))
    assert match.counts.tolist() == [[1], [1]]


@pytest.mark.parametrize(
    "probabilities",
    [[0.5], [0.9, 0.5, 0.2], [1.0, 1.0, 0.0], [0.3] * 8, [0.99, 0.01, 0.5, 0.75, 0.6, 0.4, 0.2, 0.1, 0.05]],
)
def test_poisson_binomial_equals_enumeration(probabilities):
    pmf = poisson_binomial(torch.tensor([probabilities], dtype=torch.float64))[0]
    assert pmf.tolist() == pytest.approx(brute_force_pmf(probabilities), abs=1e-9)


def test_soft_count_probabilities_follow_the_kept_scores():
    candidates = torch.zeros(1, 3, 5)
    candidates[0, :, :4] = torch.tensor([[0, 0, 10, 10], [100, 100, 110, 110], [200, 200, 210, 210]]).float()
    candidates[0, :, 4] = torch.tensor([0.9, 0.8, 0.5])
    match = box_match(candidates.double(), torch.tensor([[0, 0, 0]]), torch.tensor([[2, 3, 4]]))
    pmf = brute_force_pmf([0.9, 0.8, 0.5])
    assert match.p_exact[0].tolist() == pytest.approx([pmf[2], pmf[3], 0.0])
    assert match.p_at_least[0].tolist() == pytest.approx([pmf[2] + pmf[3], pmf[3], 0.0])


def test_soft_count_is_differentiable_in_the_scores():
    scores = torch.tensor([[0.9, 0.6, 0.3]], dtype=torch.float64, requires_grad=True)
    pmf = poisson_binomial(scores)
    pmf[0, 2].backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all() and scores.grad.abs().sum() > 0


# Containment merging ------------------------------------------------------------------------------------


def boxes_of_one_image(boxes, scores, classes, num_classes=2):
    """One image of len(boxes) float64 candidates: box, score of its class, 0 for the other classes."""
    candidates = torch.zeros(1, len(boxes), 4 + num_classes, dtype=torch.float64)
    candidates[0, :, :4] = torch.tensor(boxes, dtype=torch.float64)
    for row, (score, cls) in enumerate(zip(scores, classes, strict=True)):
        candidates[0, row, 4 + cls] = score
    return candidates


BIG, SMALL = [0, 0, 100, 100], [10, 10, 40, 40]  # SMALL inside BIG: IoU 900 / 10000 = 0.09, containment 1
HALF_INSIDE = [80, 0, 120, 10]  # area 400, 200 of it inside BIG: containment 0.5 exactly, IoU 200 / 10200
# SIDE overlaps BIG by 40 x 100: IoU 4000 / 16000 = 0.25, containment 0.4. CORNER lies inside SIDE (containment 1)
# and misses BIG: it survives exactly when SIDE was suppressed.
SIDE, CORNER = [60, 0, 160, 100], [130, 10, 160, 40]
# (boxes, scores, classes, iou_threshold, containment_threshold, kept indices in score order)
# Three boxes of one class, by score: BIG, then SIDE (overlapping it), then CORNER (inside SIDE).
NESTED = ([BIG, SIDE, CORNER], [0.9, 0.8, 0.7], [0, 0, 0])
CONTAINMENT_CASES = {
    "a box inside a kept box of its class is merged": ([BIG, SMALL], [0.9, 0.8], [0, 0], 0.45, 0.9, [0]),
    "without containment NMS keeps both (IoU 0.09)": ([BIG, SMALL], [0.9, 0.8], [0, 0], 0.45, 1.0, [0, 1]),
    "the rule is symmetric: a kept small box merges a big one around it": (
        [BIG, SMALL],
        [0.8, 0.9],
        [0, 0],
        0.45,
        0.9,
        [1],
    ),
    "boxes of different classes never merge": ([BIG, SMALL], [0.9, 0.8], [0, 1], 0.45, 0.5, [0, 1]),
    "containment equal to the threshold keeps the box (strict >)": (
        [BIG, HALF_INSIDE],
        [0.9, 0.8],
        [0, 0],
        0.45,
        0.5,
        [0, 1],
    ),
    "containment just above the threshold merges": ([BIG, HALF_INSIDE], [0.9, 0.8], [0, 0], 0.45, 0.49, [0]),
    "a zero-area box inside another has containment 0": (
        [BIG, [20, 20, 20, 60]],
        [0.9, 0.8],
        [0, 0],
        0.45,
        0.0,
        [0, 1],
    ),
    "IoU still suppresses on its own": ([BIG, [0, 0, 100, 90]], [0.9, 0.8], [0, 0], 0.45, 0.95, [0]),
    "greedy: a box merged by containment suppresses nothing": (*NESTED, 0.45, 0.3, [0, 2]),
    "greedy: a box suppressed by IoU suppresses nothing, a kept one merges": (*NESTED, 0.2, 0.9, [0, 2]),
    "greedy: the kept box merges the one inside it": (*NESTED, 0.45, 0.9, [0, 1]),
}


@pytest.mark.parametrize(
    "boxes, scores, classes, iou, containment, kept", CONTAINMENT_CASES.values(), ids=CONTAINMENT_CASES.keys()
)
def test_containment_rule(boxes, scores, classes, iou, containment, kept):
    candidates = boxes_of_one_image(boxes, scores, classes)
    match = box_match(candidates, torch.tensor([[0, 1]]), torch.tensor([[1, 1]]), 0.25, iou, 100, 1000, containment)
    assert match.keep_indices[0, : match.num_kept[0]].tolist() == kept
    assert match.counts[0].tolist() == [sum(classes[i] == 0 for i in kept), sum(classes[i] == 1 for i in kept)]


def containment_loop_oracle(candidates, conf, iou_threshold, max_det, topk, containment_threshold):
    """Per image, in Python floats (IEEE doubles, the reference's float64 operations in the same order): the
    topk ranking, then the greedy NMS with the IoU and containment rules, box by box."""
    results = []
    for b in range(candidates.shape[0]):
        scores, classes = candidates[b, :, 4:].max(-1)
        scores = torch.where(scores > conf, scores, torch.full_like(scores, -1.0))
        top_scores, top_index = scores.topk(min(topk, scores.numel()))
        order = [int(i) for s, i in zip(top_scores.tolist(), top_index.tolist(), strict=True) if s > conf]
        boxes = candidates[b, :, :4].double().tolist()
        kept = []
        for j in order:
            jx0, jy0, jx1, jy1 = boxes[j]
            suppressed = False
            for i in kept:
                if int(classes[i]) != int(classes[j]):
                    continue
                ix0, iy0, ix1, iy1 = boxes[i]
                inter = max(min(ix1, jx1) - max(ix0, jx0), 0.0) * max(min(iy1, jy1) - max(iy0, jy0), 0.0)
                union = (ix1 - ix0) * (iy1 - iy0) + (jx1 - jx0) * (jy1 - jy0) - inter
                smaller = min(max(ix1 - ix0, 0.0) * max(iy1 - iy0, 0.0), max(jx1 - jx0, 0.0) * max(jy1 - jy0, 0.0))
                if (union != 0 and inter / union > iou_threshold) or (
                    smaller > 0 and inter / smaller > containment_threshold
                ):
                    suppressed = True
                    break
            if not suppressed:
                kept.append(j)
        results.append(kept[:max_det])
    return results


@pytest.mark.parametrize("containment", [0.5, 0.9, 0.999])
@pytest.mark.parametrize(
    "batch, num, classes, conf, iou, max_det, topk, seed",
    [
        (3, 60, 3, 0.1, 0.45, 100, 1000, 11),
        (2, 150, 2, 0.05, 0.3, 100, 1000, 12),
        (2, 150, 2, 0.05, 0.45, 7, 1000, 13),  # max_detections truncates
        (2, 120, 4, 0.05, 1.0, 100, 50, 14),  # IoU 1: only containment merges; topk keeps 50
        (1, 1, 1, 0.25, 0.45, 100, 1000, 15),
    ],
)
def test_containment_nms_matches_per_image_loop(batch, num, classes, conf, iou, max_det, topk, seed, containment):
    candidates = random_candidates(batch, num, classes, seed)
    class_ids, requested = torch.tensor([[0, classes - 1]] * batch), torch.tensor([[1, 2]] * batch)
    match = box_match(candidates, class_ids, requested, conf, iou, max_det, topk, containment)
    for b, kept in enumerate(containment_loop_oracle(candidates, conf, iou, max_det, topk, containment)):
        assert match.keep_indices[b, : match.num_kept[b]].tolist() == kept
        assert (match.keep_indices[b, len(kept) :] == -1).all()


def test_containment_merges_boxes_that_plain_nms_keeps():
    # The random inputs above exercise the rule: containment 0.5 keeps strictly fewer boxes than plain NMS.
    candidates = random_candidates(4, 150, 3, seed=16)
    slots = (torch.tensor([[0, 1, 2]] * 4), torch.tensor([[1, 1, 1]] * 4))
    plain = box_match(candidates, *slots, 0.05, 0.45)
    merged = box_match(candidates, *slots, 0.05, 0.45, containment_threshold=0.5)
    assert (merged.num_kept <= plain.num_kept).all() and merged.num_kept.sum() < plain.num_kept.sum()


def assert_keeps_what_batched_nms_keeps(match, candidates, conf, iou, max_detections):
    """Per image: the kept indices are torchvision's batched_nms over the candidates above conf (best class each)."""
    for b in range(candidates.shape[0]):
        scores, classes = candidates[b, :, 4:].max(-1)
        index = torch.nonzero(scores > conf)[:, 0]
        kept = torchvision.ops.batched_nms(
            candidates[b, index, :4].double(), scores[index].double(), classes[index], iou
        )[:max_detections]
        assert match.keep_indices[b, : match.num_kept[b]].tolist() == index[kept].tolist()


@pytest.mark.parametrize("seed", [17, 18])
def test_containment_threshold_1_keeps_what_batched_nms_keeps(seed):
    candidates = random_candidates(3, 120, 3, seed)
    class_ids, requested = torch.tensor([[0, 1, 2]] * 3), torch.tensor([[1, 1, 1]] * 3)
    match = box_match(candidates, class_ids, requested, 0.1, 0.45, 100, 1000, 1.0)
    assert_keeps_what_batched_nms_keeps(match, candidates, 0.1, 0.45, 100)
    # The greedy path with a threshold that cannot fire (NaN compares false) agrees with the torchvision path.
    nan = box_match(candidates, class_ids, requested, 0.1, 0.45, 100, 1000, float("nan"))
    for field in match._fields:
        assert torch.equal(getattr(nan, field), getattr(match, field)), field


# Per-image class counts (open-vocabulary detectors) -------------------------------------------------------


def test_num_classes_hand_worked_example():
    # Image 0 has 3 real columns, image 1 one: its padded columns 1, 2 hold the highest scores, which would
    # win the best class, change the NMS and let candidate 2 pass the threshold.
    candidates = torch.tensor(
        [
            [
                [0, 0, 10, 10, 0.1, 0.8, 0.3],  # class 1 at 0.8
                [100, 100, 110, 110, 0.6, 0.2, 0.7],  # class 2 at 0.7
                [200, 200, 210, 210, 0.2, 0.1, 0.15],  # 0.2: below the threshold
            ],
            [
                [0, 0, 10, 10, 0.5, 0.99, 0.95],  # class 0 at 0.5: IoU 81 / 119 = 0.68 with the next box
                [1, 1, 11, 11, 0.6, 0.1, 0.9],  # class 0 at 0.6: ranked first, suppresses candidate 0
                [200, 200, 210, 210, 0.1, 0.9, 0.9],  # class 0 at 0.1: below the threshold
            ],
        ],
        dtype=torch.float64,
    )
    class_ids = torch.tensor([[1, 2, 0], [0, 1, -1]])
    requested = torch.tensor([[1, 1, 1], [1, 1, 0]])
    match = box_match(candidates, class_ids, requested, 0.25, 0.45, 4, num_classes=torch.tensor([3, 1]))
    assert match.num_kept.tolist() == [2, 1]
    assert match.keep_indices.tolist() == [[0, 1, -1, -1], [1, -1, -1, -1]]
    assert match.keep_classes.tolist() == [[1, 2, -1, -1], [0, -1, -1, -1]]
    assert match.keep_scores.tolist() == [[0.8, 0.7, 0.0, 0.0], [0.6, 0.0, 0.0, 0.0]]
    assert match.keep_boxes[1, 0].tolist() == [1, 1, 11, 11]
    # Image 1's class 1 is a padded column: nothing of it is ever kept.
    assert match.counts.tolist() == [[1, 1, 0], [1, 0, 0]]
    assert match.confidence_mean.tolist() == [[0.8, 0.7, 0.0], [0.6, 0.0, 0.0]]
    torch.testing.assert_close(match.p_exact, torch.tensor([[0.8, 0.7, 0.0], [0.6, 0.0, 0.0]], dtype=torch.float64))
    # Reading image 1's padded columns keeps all three of its candidates instead (classes 1, 2, 1 or 2).
    assert box_match(candidates, class_ids, requested, 0.25, 0.45, 4).num_kept.tolist() == [2, 3]


def open_vocabulary_batch(batch, num, classes, seed, counts):
    """random_candidates with per-image class counts `counts`: the padded columns hold garbage (scores above
    any threshold, inf, -inf, nan). -> (padded candidates, the same with zeros in the padding, num_classes)."""
    candidates = random_candidates(batch, num, classes, seed)
    num_classes = torch.tensor(counts, dtype=torch.int64)
    padding = torch.arange(classes) >= num_classes[:, None]  # [B, C]
    padding = padding[:, None, :].expand(batch, num, classes)
    zeroed = candidates.clone()
    zeroed[..., 4:] = zeroed[..., 4:].masked_fill(padding, 0.0)
    generator = torch.Generator().manual_seed(seed + 1)
    garbage = torch.rand(batch, num, classes, generator=generator) * 4 - 1
    specials = torch.tensor([float("inf"), float("-inf"), float("nan")])
    pick = torch.randint(0, 8, (batch, num, classes), generator=generator)
    garbage = torch.where(pick < 3, specials[pick.clamp(max=2)], garbage)
    padded = candidates.clone()
    padded[..., 4:] = torch.where(padding, garbage, zeroed[..., 4:])
    return padded, zeroed, num_classes


NUM_CLASSES_CASES = {
    "3 columns, counts 0 / 1 / 3": dict(batch=3, num=80, classes=3, counts=[0, 1, 3], seed=21),
    "70 columns, counts 70 / 33 / 0": dict(batch=3, num=100, classes=70, counts=[70, 33, 0], seed=22),
    "5 columns, counts 2 / 5": dict(batch=2, num=150, classes=5, counts=[2, 5], seed=23),
}


@pytest.mark.parametrize("containment", [1.0, 0.5])
@pytest.mark.parametrize("case", NUM_CLASSES_CASES.values(), ids=NUM_CLASSES_CASES.keys())
def test_padded_columns_do_not_change_any_output(case, containment):
    padded, zeroed, num_classes = open_vocabulary_batch(**case)
    class_ids = torch.tensor([[0, 1, case["classes"] - 1, -1]] * case["batch"])
    requested = torch.tensor([[1, 2, 1, 0]] * case["batch"])
    options = (0.05, 0.45, 100, 1000, containment)
    got = box_match(padded, class_ids, requested, *options, num_classes)
    want = box_match(zeroed, class_ids, requested, *options, num_classes)
    for field in got._fields:
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    assert got.num_kept.sum() > 0 and (got.num_kept[num_classes == 0] == 0).all()
    # Each image alone, cropped to its real columns, keeps the same detections.
    for b, count in enumerate(num_classes.tolist()):
        if count == 0:
            continue
        alone = box_match(padded[b : b + 1, :, : 4 + count], class_ids[b : b + 1], requested[b : b + 1], *options)
        for field in ("keep_indices", "keep_boxes", "keep_scores", "keep_classes", "num_kept", "counts"):
            assert torch.equal(getattr(alone, field)[0], getattr(got, field)[b]), (b, field)


@pytest.mark.parametrize("containment", [1.0, 0.5])
def test_num_classes_none_equals_full_counts(containment):
    candidates = random_candidates(3, 120, 4, seed=24)
    slots = (torch.tensor([[0, 3, -1]] * 3), torch.tensor([[1, 2, 0]] * 3))
    full = box_match(candidates, *slots, 0.05, 0.45, 100, 1000, containment, torch.tensor([4, 4, 4]))
    default = box_match(candidates, *slots, 0.05, 0.45, 100, 1000, containment)
    assert default.num_kept.sum() > 0
    for field in full._fields:
        assert torch.equal(getattr(full, field), getattr(default, field)), field


@pytest.mark.parametrize("conf", [0.25, -5.0, float("-inf")])
def test_num_classes_zero_keeps_nothing(conf):
    # Whatever the threshold (even one every score passes), an image without score columns keeps nothing.
    candidates = random_candidates(2, 30, 3, seed=25)
    candidates[..., 4:] = 0.9
    match = box_match(
        candidates, torch.tensor([[0, 1]] * 2), torch.tensor([[0, 1]] * 2), conf, num_classes=torch.tensor([0, 3])
    )
    assert match.num_kept[0] == 0 and match.num_kept[1] > 0
    assert (match.keep_indices[0] == -1).all() and (match.keep_classes[0] == -1).all()
    assert (match.keep_scores[0] == 0).all() and (match.keep_boxes[0] == 0).all()
    assert match.counts[0].tolist() == [0, 0] and match.confidence_mean[0].tolist() == [0.0, 0.0]
    # P(count = 0) = 1 and P(count >= 1) = 0 (up to the FFT's rounding: the batch's other image kept boxes).
    assert match.p_exact[0].tolist() == pytest.approx([1.0, 0.0], abs=1e-12)
    assert match.p_at_least[0].tolist() == pytest.approx([1.0, 0.0], abs=1e-12)


# For candidates [2, 5, 4 + 3]: num_classes that both backends reject, and the start of their message.
INVALID_NUM_CLASSES = {
    "one count too many": (torch.tensor([3, 3, 3]), "num_classes must be a [B] = [2] int64 tensor"),
    "[B, 1]": (torch.tensor([[3], [3]]), "num_classes must be a [B] = [2] int64 tensor"),
    "float": (torch.tensor([3.0, 1.0]), "num_classes must be a [B] = [2] int64 tensor"),
    "int32": (torch.tensor([3, 1], dtype=torch.int32), "num_classes must be a [B] = [2] int64 tensor"),
    "a list": ([3, 1], "num_classes must be a [B] = [2] int64 tensor"),
    "negative": (torch.tensor([3, -1]), "num_classes must lie in [0, C] = [0, 3]"),
    "above C": (torch.tensor([4, 1]), "num_classes must lie in [0, C] = [0, 3]"),
}


@pytest.mark.parametrize("num_classes, message", INVALID_NUM_CLASSES.values(), ids=INVALID_NUM_CLASSES.keys())
def test_invalid_num_classes_raise(num_classes, message):
    slots = (torch.zeros(2, 1, dtype=torch.int64), torch.zeros(2, 1, dtype=torch.int64))
    with pytest.raises(ValueError) as error:
        box_match(torch.zeros(2, 5, 7), *slots, num_classes=num_classes)
    assert str(error.value).startswith(message)
