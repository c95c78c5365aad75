"""The Triton kernels (run on CPU in Triton's interpreter) against the torch reference, torchvision's NMS and
hand-computed cases; and the backend dispatch in kernels/ops.py."""

from __future__ import annotations

import os

# conftest.py sets TRITON_INTERPRET=1 on machines without CUDA before triton.language is first imported;
# these tests run the kernels on CPU tensors, so they need the interpreter either way.
os.environ.setdefault("TRITON_INTERPRET", "1")

import inspect  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

pytest.importorskip("triton")

from oracles import brute_force_pmf  # noqa: E402
from rewardscope.kernels import ops as kernel_ops  # noqa: E402
from rewardscope.kernels import reference  # noqa: E402
from rewardscope.kernels.ops import BoxMatch, LayoutMatch  # noqa: E402
from rewardscope.kernels.triton.box_match import box_match as triton_box_match  # noqa: E402
from rewardscope.kernels.triton.layout_match import layout_match as triton_layout_match  # noqa: E402
from test_kernels_reference import (  # noqa: E402
    CONTAINMENT_CASES,
    INVALID_NUM_CLASSES,
    assert_keeps_what_batched_nms_keeps,
    boxes_of_one_image,
    open_vocabulary_batch,
)

BOX_MATCH_BACKENDS = {"triton": triton_box_match, "reference": reference.box_match}
LAYOUT_MATCH_BACKENDS = {"triton": triton_layout_match, "reference": reference.layout_match}


def make_candidates(batch, num, classes, seed, *, offset=0.0, score_levels=None, dtype=torch.float32):
    """[B, N, 4 + C] clustered boxes (so NMS has work to do) with scores skewed low, like a detector's.
    score_levels quantises the scores to that many values, to force ties."""
    generator = torch.Generator().manual_seed(seed)
    centers = (torch.rand(batch, num, 2, generator=generator) * 5).round() * 40
    centers = centers + torch.rand(batch, num, 2, generator=generator) * 6
    sizes = 10 + torch.rand(batch, num, 2, generator=generator) * 40
    boxes = torch.cat([centers - sizes / 2, centers + sizes / 2], -1) + offset
    scores = torch.rand(batch, num, classes, generator=generator) ** 3
    if score_levels:
        scores = (scores * score_levels).ceil() / score_levels
    return torch.cat([boxes, scores], -1).to(dtype)


def degenerate_boxes(candidates):
    """Every third box zero-width, every third inverted in x, every ninth inverted in x and y."""
    candidates = candidates.clone()
    candidates[:, 0::3, 2] = candidates[:, 0::3, 0]
    candidates[:, 1::3, 0], candidates[:, 1::3, 2] = candidates[:, 1::3, 2].clone(), candidates[:, 1::3, 0].clone()
    candidates[:, 2::9, :4] = candidates[:, 2::9, [2, 3, 0, 1]]
    return candidates


def prompt_slots(batch, classes):
    """Slots: first class, last class, padding, class 1 (or 0), a repeat of the first with an unreachable count."""
    class_ids = torch.tensor([[0, classes - 1, -1, min(1, classes - 1), 0]] * batch)
    requested = torch.tensor([[1, 3, 2, 0, 500]] * batch)
    return class_ids, requested


def assert_box_matches_agree(got: BoxMatch, want: BoxMatch, atol: float = 1e-5, rtol: float = 0.0) -> None:
    for field in BoxMatch._fields:
        actual, expected = getattr(got, field), getattr(want, field)
        assert actual.shape == expected.shape and actual.dtype == expected.dtype, field
        if actual.dtype.is_floating_point:
            torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m, f=field: f"{f}: {m}")
        else:
            assert torch.equal(actual, expected), f"{field}: {actual.tolist()} != {expected.tolist()}"


def assert_kept_rows_are_consistent(match: BoxMatch, candidates: torch.Tensor, max_detections: int) -> None:
    """Kept rows: sorted by score, within budget, padded with -1 / 0, boxes and classes read from candidates."""
    for b, kept in enumerate(match.num_kept.tolist()):
        assert kept <= max_detections
        scores = match.keep_scores[b, :kept]
        assert (scores[:-1] >= scores[1:]).all()
        assert (match.keep_indices[b, kept:] == -1).all() and (match.keep_classes[b, kept:] == -1).all()
        assert (match.keep_scores[b, kept:] == 0).all() and (match.keep_boxes[b, kept:] == 0).all()
        index = match.keep_indices[b, :kept]
        assert torch.equal(match.keep_boxes[b, :kept], candidates[b, index, :4])
        assert torch.equal(match.keep_classes[b, :kept], candidates[b, index, 4:].argmax(-1))


PARITY_CASES = {
    "clustered boxes, 3 classes": dict(batch=2, num=120, classes=3),
    "80 classes: three class chunks per candidate": dict(batch=2, num=100, classes=80, conf=0.05),
    "one class": dict(batch=2, num=100, classes=1, conf=0.1),
    "one image": dict(batch=1, num=60, classes=4, conf=0.1),
    "64 images of few candidates": dict(batch=64, num=12, classes=3, conf=0.1),
    "ranks span three 64-box tiles": dict(batch=1, num=170, classes=2, conf=0.01),
    "more kept boxes than max_detections": dict(batch=2, num=150, classes=3, conf=0.05, iou=1.0, max_det=5),
    "pre_nms_topk keeps only the 40 best": dict(batch=2, num=150, classes=3, conf=0.05, topk=40),
    "IoU threshold 1 keeps everything": dict(batch=2, num=80, classes=3, conf=0.05, iou=1.0),
    "IoU threshold 0 suppresses any overlap": dict(batch=2, num=80, classes=3, conf=0.05, iou=0.0),
    "score ties (4 score levels, ties in class too)": dict(batch=2, num=150, classes=3, conf=0.25, levels=4),
    "negative coordinates": dict(batch=2, num=100, classes=3, conf=0.05, offset=-300.0),
    "zero-area and inverted boxes": dict(batch=2, num=90, classes=2, conf=0.05, degenerate=True),
    "nothing above the threshold (scores < 1)": dict(batch=2, num=50, classes=3, conf=1.0),
    "no candidates (N = 0)": dict(batch=3, num=0, classes=3),
    "float64 candidates": dict(batch=2, num=100, classes=3, conf=0.05, dtype=torch.float64),
    "float16 candidates": dict(batch=2, num=100, classes=3, conf=0.05, dtype=torch.float16, atol=2e-3),
    # Sums rounded to bfloat16 may differ by one unit in the last place (8 bits of mantissa).
    "bfloat16 candidates": dict(batch=2, num=100, classes=3, conf=0.05, dtype=torch.bfloat16, atol=2e-2, rtol=1e-2),
    "non-contiguous candidates": dict(batch=2, num=100, classes=5, conf=0.05, strided=True),
}


def parity_candidates(case):
    """The candidates a PARITY_CASES entry describes."""
    candidates = make_candidates(
        case["batch"],
        case["num"],
        case["classes"],
        seed=len(str(case)),
        offset=case.get("offset", 0.0),
        score_levels=case.get("levels"),
        dtype=case.get("dtype", torch.float32),
    )
    if case.get("degenerate"):
        candidates = degenerate_boxes(candidates)
    if case.get("strided"):  # every other row of a wider tensor
        wide = torch.zeros(case["batch"], 2 * case["num"], 4 + case["classes"], dtype=candidates.dtype)
        wide[:, ::2] = candidates
        candidates = wide[:, ::2]
        assert not candidates.is_contiguous()
    return candidates


@pytest.mark.parametrize("case", PARITY_CASES.values(), ids=PARITY_CASES.keys())
def test_triton_box_match_equals_reference(case):
    candidates = parity_candidates(case)
    class_ids, requested = prompt_slots(case["batch"], case["classes"])
    options = (case.get("conf", 0.25), case.get("iou", 0.45), case.get("max_det", 100), case.get("topk", 1000))
    got = triton_box_match(candidates, class_ids, requested, *options)
    want = reference.box_match(candidates, class_ids, requested, *options)
    assert_box_matches_agree(got, want, atol=case.get("atol", 1e-5), rtol=case.get("rtol", 0.0))
    assert_kept_rows_are_consistent(got, candidates, options[2])


# Smaller than PARITY_CASES (each runs at three containment thresholds in the interpreter).
CONTAINMENT_PARITY_CASES = {
    "clustered boxes, 3 classes": dict(batch=2, num=60, classes=3, conf=0.05),
    "ranks span three 64-box tiles": dict(batch=1, num=170, classes=2, conf=0.01),
    "more kept boxes than max_detections": dict(batch=2, num=80, classes=2, conf=0.05, max_det=4),
    "pre_nms_topk keeps only the 30 best": dict(batch=2, num=80, classes=2, conf=0.05, topk=30),
    "IoU threshold 1: only containment merges": dict(batch=2, num=60, classes=2, conf=0.05, iou=1.0),
    "score ties": dict(batch=2, num=80, classes=2, conf=0.25, levels=4),
    "negative coordinates": dict(batch=2, num=60, classes=3, conf=0.05, offset=-300.0),
    "zero-area and inverted boxes": dict(batch=2, num=60, classes=2, conf=0.05, degenerate=True),
    "float64 candidates": dict(batch=2, num=60, classes=3, conf=0.05, dtype=torch.float64),
    "float16 candidates": dict(batch=2, num=60, classes=3, conf=0.05, dtype=torch.float16, atol=2e-3),
    "no candidates (N = 0)": dict(batch=2, num=0, classes=3),
}


@pytest.mark.parametrize("containment", [0.5, 0.9, 1.0])
@pytest.mark.parametrize("case", CONTAINMENT_PARITY_CASES.values(), ids=CONTAINMENT_PARITY_CASES.keys())
def test_triton_box_match_with_containment_equals_reference(case, containment):
    candidates = parity_candidates(case)
    class_ids, requested = prompt_slots(case["batch"], case["classes"])
    options = (case.get("conf", 0.25), case.get("iou", 0.45), case.get("max_det", 100), case.get("topk", 1000))
    got = triton_box_match(candidates, class_ids, requested, *options, containment)
    want = reference.box_match(candidates, class_ids, requested, *options, containment)
    assert_box_matches_agree(got, want, atol=case.get("atol", 1e-5))
    assert_kept_rows_are_consistent(got, candidates, options[2])


def test_containment_parity_cases_exercise_the_rule():
    # At 0.5 the containment rule merges boxes plain NMS keeps in the random parity inputs (else the parity
    # above would only compare plain NMS twice).
    case = CONTAINMENT_PARITY_CASES["clustered boxes, 3 classes"]
    candidates = parity_candidates(case)
    slots = prompt_slots(case["batch"], case["classes"])
    plain = triton_box_match(candidates, *slots, case["conf"])
    merged = triton_box_match(candidates, *slots, case["conf"], containment_threshold=0.5)
    assert (merged.num_kept <= plain.num_kept).all() and merged.num_kept.sum() < plain.num_kept.sum()


@pytest.mark.parametrize("backend", BOX_MATCH_BACKENDS)
@pytest.mark.parametrize(
    "boxes, scores, classes, iou, containment, kept", CONTAINMENT_CASES.values(), ids=CONTAINMENT_CASES.keys()
)
def test_containment_rule_on_both_backends(backend, boxes, scores, classes, iou, containment, kept):
    candidates = boxes_of_one_image(boxes, scores, classes)
    slots = (torch.tensor([[0, 1]]), torch.tensor([[1, 1]]))
    match = BOX_MATCH_BACKENDS[backend](candidates, *slots, 0.25, iou, 100, 1000, containment)
    assert match.keep_indices[0, : match.num_kept[0]].tolist() == kept


def test_containment_threshold_1_on_triton_keeps_what_torchvision_batched_nms_keeps():
    candidates = make_candidates(2, 80, 3, seed=4)
    match = triton_box_match(candidates, *prompt_slots(2, 3), 0.1, 0.45, 100, 1000, 1.0)
    assert_keeps_what_batched_nms_keeps(match, candidates, 0.1, 0.45, 100)


@pytest.mark.parametrize(
    "batch, num, classes, iou, seed", [(1, 100, 3, 0.45, 0), (8, 40, 80, 0.5, 1), (2, 120, 1, 0.3, 2)]
)
def test_triton_box_match_keeps_what_torchvision_batched_nms_keeps(batch, num, classes, iou, seed):
    # Non-negative coordinates: batched_nms's offset trick (offset = class * (max + 1)) lets classes overlap
    # when coordinates go below -1; the kernels are exact per class there (see the negative-coordinates case).
    candidates = make_candidates(batch, num, classes, seed)
    match = triton_box_match(candidates, *prompt_slots(batch, classes), 0.1, iou, 100, 1000)
    for b in range(batch):
        scores, classes_of = candidates[b, :, 4:].max(-1)
        index = torch.nonzero(scores > 0.1)[:, 0]
        kept = torchvision.ops.batched_nms(
            candidates[b, index, :4].double(), scores[index].double(), classes_of[index], iou
        )[:100]
        assert match.keep_indices[b, : match.num_kept[b]].tolist() == index[kept].tolist()


def pair_of_candidates(first_box, second_box, scores=(0.9, 0.8), classes=(0, 0), num_classes=2):
    candidates = torch.zeros(1, 2, 4 + num_classes, dtype=torch.float64)
    candidates[0, :, :4] = torch.tensor([first_box, second_box], dtype=torch.float64)
    candidates[0, 0, 4 + classes[0]], candidates[0, 1, 4 + classes[1]] = scores
    return candidates


NMS_RULE_CASES = {
    # IoU([0,0,2,1], [0,0,1,1]) = 1/2 exactly: suppression needs IoU strictly above the threshold.
    "IoU equal to the threshold does not suppress": (pair_of_candidates([0, 0, 2, 1], [0, 0, 1, 1]), 0.5, [0, 1]),
    "IoU just above the threshold suppresses": (pair_of_candidates([0, 0, 2, 1], [0, 0, 1, 1]), 0.49, [0]),
    "identical boxes of different classes both survive": (
        pair_of_candidates([10, 10, 50, 50], [10, 10, 50, 50], classes=(0, 1)),
        0.45,
        [0, 1],
    ),
    "identical zero-area boxes never suppress (0 / 0)": (
        pair_of_candidates([10, 10, 10, 50], [10, 10, 10, 50]),
        0.45,
        [0, 1],
    ),
    "an inverted box overlaps nothing": (pair_of_candidates([50, 10, 10, 50], [10, 10, 50, 50]), 0.45, [0, 1]),
    "the lower score is suppressed whatever its index": (
        pair_of_candidates([10, 10, 50, 50], [12, 12, 50, 50], scores=(0.5, 0.9)),
        0.45,
        [1],
    ),
    "classes far apart stay apart with negative coordinates": (
        pair_of_candidates([-41, -41, -1, -1], [60, 60, 100, 100], classes=(1, 0)),
        0.45,
        [0, 1],
    ),
}


@pytest.mark.parametrize("backend", BOX_MATCH_BACKENDS)
@pytest.mark.parametrize("candidates, iou, kept", NMS_RULE_CASES.values(), ids=NMS_RULE_CASES.keys())
def test_nms_rule(backend, candidates, iou, kept):
    match = BOX_MATCH_BACKENDS[backend](candidates, torch.tensor([[0, 1]]), torch.tensor([[1, 1]]), 0.25, iou)
    assert match.keep_indices[0, : match.num_kept[0]].tolist() == kept


def test_equal_scores_break_ties_in_topk_order_on_both_backends():
    candidates = make_candidates(1, 150, 1, seed=3)
    candidates[0, :, :4] = torch.tensor([10.0, 10.0, 50.0, 50.0])  # all the same box
    candidates[0, :, 4] = 0.5  # all the same score: exactly one survives
    first = candidates[..., 4].topk(150, dim=1).indices[0, 0]
    for box_match in BOX_MATCH_BACKENDS.values():
        match = box_match(candidates, torch.tensor([[0]]), torch.tensor([[1]]))
        assert match.num_kept.tolist() == [1] and match.keep_indices[0, 0] == first


@pytest.mark.parametrize(
    "scores",
    [[0.9], [0.9, 0.8, 0.5], [1.0, 1.0, 0.3], [0.3] * 8, [0.99, 0.3, 0.5, 0.75, 0.6, 0.4, 0.27, 0.95, 0.55]],
    ids=["one detection", "three", "certain detections", "eight equal", "nine mixed"],
)
def test_soft_count_is_the_poisson_binomial_of_the_kept_scores(scores):
    # Boxes far apart, so all are kept; one slot per requested count n = 0 .. len + 1.
    num = len(scores)
    candidates = torch.zeros(1, num, 5, dtype=torch.float64)
    corner = torch.arange(num, dtype=torch.float64) * 100
    candidates[0, :, 0], candidates[0, :, 1], candidates[0, :, 2], candidates[0, :, 3] = corner, 0, corner + 10, 10
    candidates[0, :, 4] = torch.tensor(scores, dtype=torch.float64)
    wanted = torch.arange(num + 2)[None]
    match = triton_box_match(candidates, torch.zeros_like(wanted), wanted)
    pmf = brute_force_pmf(scores) + [0.0]
    assert match.p_exact[0].tolist() == pytest.approx(pmf, abs=1e-12)
    assert float(match.p_exact[0].sum()) == pytest.approx(1.0, abs=1e-12)
    assert match.p_at_least[0].tolist() == pytest.approx([sum(pmf[n:]) for n in range(num + 2)], abs=1e-12)
    assert match.counts[0].tolist() == [num] * (num + 2)
    assert match.confidence_mean[0, 0].item() == pytest.approx(sum(scores) / num)


def test_soft_count_of_padding_and_empty_slots():
    candidates = pair_of_candidates([0, 0, 10, 10], [50, 50, 60, 60], scores=(0.9, 0.6), classes=(0, 0))
    class_ids, requested = torch.tensor([[-1, 1, 1, 0]]), torch.tensor([[1, 0, 1, -3]])
    match = triton_box_match(candidates, class_ids, requested)
    # Padding: all zero. A class with no detection: P(count = 0) = 1. A negative request counts as 0.
    assert match.counts.tolist() == [[0, 0, 0, 2]]
    assert match.p_exact[0].tolist() == pytest.approx([0.0, 1.0, 0.0, 0.1 * 0.4])
    assert match.p_at_least[0].tolist() == pytest.approx([0.0, 1.0, 0.0, 1.0])


def test_triton_box_match_on_empty_batch_and_no_slots():
    for batch, slots in [(0, 2), (2, 0)]:
        candidates = make_candidates(batch, 10, 3, seed=0)
        class_ids = torch.zeros(batch, slots, dtype=torch.int64)
        got = triton_box_match(candidates, class_ids, class_ids)
        assert_box_matches_agree(got, reference.box_match(candidates, class_ids, class_ids))


def test_triton_box_match_rejects_malformed_shapes_like_the_reference():
    for box_match in BOX_MATCH_BACKENDS.values():
        with pytest.raises(ValueError):
            box_match(torch.zeros(1, 5, 4), torch.zeros(1, 1, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int64))
        with pytest.raises(ValueError):
            box_match(torch.zeros(1, 5, 6), torch.zeros(1, 2, dtype=torch.int64), torch.zeros(1, 3, dtype=torch.int64))


# Per-image class counts: C = the longest query list, columns >= num_classes[b] padding (garbage here).
OPEN_VOCABULARY_CASES = {
    "3 columns, counts 0 / 1 / 3": dict(batch=3, num=100, classes=3, counts=[0, 1, 3]),
    # 70 columns are three 32-column chunks: 70 reads all three, 33 one column of the second, 64 exactly two.
    "70 columns, counts 1 / 70 / 33": dict(batch=3, num=80, classes=70, counts=[1, 70, 33]),
    "70 columns, counts 64 / 0": dict(batch=2, num=60, classes=70, counts=[64, 0]),
    "5 columns, random counts": dict(batch=3, num=150, classes=5, counts="random"),
}


@pytest.mark.parametrize("containment", [1.0, 0.5])
@pytest.mark.parametrize("case", OPEN_VOCABULARY_CASES.values(), ids=OPEN_VOCABULARY_CASES.keys())
def test_triton_box_match_with_num_classes_equals_reference(case, containment):
    counts = case["counts"]
    if counts == "random":
        counts = torch.randint(0, case["classes"] + 1, (case["batch"],), generator=torch.Generator().manual_seed(5))
        counts = counts.tolist()
    seed = len(str(case))
    candidates, zeroed, num_classes = open_vocabulary_batch(case["batch"], case["num"], case["classes"], seed, counts)
    class_ids, requested = prompt_slots(case["batch"], case["classes"])
    options = (0.05, 0.45, 100, 1000, containment)
    got = triton_box_match(candidates, class_ids, requested, *options, num_classes)
    want = reference.box_match(candidates, class_ids, requested, *options, num_classes)
    assert_box_matches_agree(got, want)
    # Kept classes are read from the real columns (padding zeroed: below every kept score).
    assert_kept_rows_are_consistent(got, zeroed, 100)
    assert (got.num_kept[num_classes == 0] == 0).all() and got.num_kept.sum() > 0


@pytest.mark.parametrize("conf", [0.25, -5.0, float("-inf")])
def test_triton_image_without_columns_keeps_nothing_at_any_threshold(conf):
    # Its rows score -inf, not -1: a threshold below -1 (every real row passes it) does not let them through.
    candidates = make_candidates(2, 20, 3, seed=7)
    slots = (torch.tensor([[0, 1]] * 2), torch.tensor([[1, 1]] * 2))
    got = triton_box_match(candidates, *slots, conf, num_classes=torch.tensor([0, 3]))
    assert_box_matches_agree(got, reference.box_match(candidates, *slots, conf, num_classes=torch.tensor([0, 3])))
    assert got.num_kept[0] == 0 and (got.keep_indices[0] == -1).all() and got.num_kept[1] > 0


@pytest.mark.parametrize("num_classes, message", INVALID_NUM_CLASSES.values(), ids=INVALID_NUM_CLASSES.keys())
def test_both_backends_reject_the_same_num_classes(num_classes, message):
    slots = (torch.zeros(2, 1, dtype=torch.int64), torch.zeros(2, 1, dtype=torch.int64))
    messages = []
    for box_match in BOX_MATCH_BACKENDS.values():
        with pytest.raises(ValueError) as error:
            box_match(torch.zeros(2, 5, 7), *slots, num_classes=num_classes)
        messages.append(str(error.value))
    assert messages[0] == messages[1] and messages[0].startswith(message)


# layout_match ---------------------------------------------------------------------------------------------


def layout_inputs(detections, targets):
    """detections: [(box, score, class)], targets: [(box, class)] for one image -> the five tensors."""
    det_boxes = torch.tensor([[box for box, _, _ in detections]], dtype=torch.float32).reshape(1, -1, 4)
    det_scores = torch.tensor([[score for _, score, _ in detections]], dtype=torch.float32).reshape(1, -1)
    det_classes = torch.tensor([[cls for _, _, cls in detections]], dtype=torch.int64).reshape(1, -1)
    target_boxes = torch.tensor([[box for box, _ in targets]], dtype=torch.float32).reshape(1, -1, 4)
    target_classes = torch.tensor([[cls for _, cls in targets]], dtype=torch.int64).reshape(1, -1)
    return det_boxes, det_scores, det_classes, target_boxes, target_classes


BOX = [0, 0, 10, 10]
HALF = [0, 0, 10, 5]  # IoU with BOX = 0.5 exactly
SHIFTED = [0, 0, 10, 8]  # IoU with BOX = 0.8
LAYOUT_CASES = {
    "a target takes the same-class detection with the highest IoU": (
        [(HALF, 0.9, 0), (SHIFTED, 0.5, 0)],
        [(BOX, 0)],
        0.5,
        [0.8],
        [True],
        [1],
    ),
    "a detection matches one target only: the next target takes the next best": (
        [(HALF, 0.9, 0), (SHIFTED, 0.5, 0)],
        [(BOX, 0), (BOX, 0)],
        0.5,
        [0.8, 0.5],
        [True, True],
        [1, 0],
    ),
    "targets are served in order, not by IoU": (
        [(SHIFTED, 0.9, 0)],
        [(HALF, 0), (BOX, 0)],
        0.5,
        [10 / 16, 0.0],
        [True, False],
        [0, -1],
    ),
    "below the threshold: IoU reported, nothing taken": (
        [(HALF, 0.9, 0)],
        [(BOX, 0), (HALF, 0)],
        0.6,
        [0.5, 1.0],
        [False, True],
        [-1, 0],
    ),
    "IoU equal to the threshold matches": ([(HALF, 0.9, 0)], [(BOX, 0)], 0.5, [0.5], [True], [0]),
    "other classes are invisible": ([(BOX, 0.9, 1)], [(BOX, 0)], 0.5, [0.0], [False], [-1]),
    "IoU ties go to the higher score": ([(BOX, 0.5, 0), (BOX, 0.9, 0)], [(BOX, 0)], 0.5, [1.0], [True], [1]),
    "IoU and score ties go to the lower index": ([(BOX, 0.7, 0), (BOX, 0.7, 0)], [(BOX, 0)], 0.5, [1.0], [True], [0]),
    "padding targets and padding detections never match": (
        [(BOX, 0.9, -1), (BOX, 0.9, 0)],
        [(BOX, -1), (BOX, 0)],
        0.5,
        [0.0, 1.0],
        [False, True],
        [-1, 1],
    ),
    "zero-area and inverted boxes have IoU 0": (
        [([0, 0, 0, 10], 0.9, 0), ([10, 0, 0, 10], 0.8, 0)],
        [(BOX, 0), ([0, 0, 0, 10], 0)],
        0.0,
        [0.0, 0.0],
        [True, True],
        [0, 1],
    ),
}


@pytest.mark.parametrize("backend", LAYOUT_MATCH_BACKENDS)
@pytest.mark.parametrize(
    "detections, targets, threshold, best_iou, matched, index", LAYOUT_CASES.values(), ids=LAYOUT_CASES.keys()
)
def test_layout_match_rule(backend, detections, targets, threshold, best_iou, matched, index):
    result = LAYOUT_MATCH_BACKENDS[backend](*layout_inputs(detections, targets), threshold)
    assert result.best_iou[0].tolist() == pytest.approx(best_iou)
    assert result.matched[0].tolist() == matched
    assert result.matched_index[0].tolist() == index


def random_layout(batch, num_dets, num_targets, classes, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)

    def boxes(num):
        corner = (torch.rand(batch, num, 2, generator=generator) * 4).round() * 10
        size = 8 + (torch.rand(batch, num, 2, generator=generator) * 4).round() * 2
        return torch.cat([corner, corner + size], -1).to(dtype)

    det_classes = torch.randint(-1, classes, (batch, num_dets), generator=generator)
    det_scores = ((torch.rand(batch, num_dets, generator=generator) * 4).round() / 4).to(dtype)  # ties
    target_classes = torch.randint(-1, classes, (batch, num_targets), generator=generator)
    return boxes(num_dets), det_scores, det_classes, boxes(num_targets), target_classes


@pytest.mark.parametrize(
    "batch, num_dets, num_targets, classes, threshold, dtype",
    [
        (4, 30, 8, 3, 0.5, torch.float32),
        (2, 100, 12, 1, 0.3, torch.float64),
        (3, 0, 4, 2, 0.5, torch.float32),
        (3, 5, 0, 2, 0.5, torch.float32),
        (16, 6, 6, 2, 0.0, torch.float32),
    ],
    ids=["3 classes", "one class, float64", "no detections", "no targets", "threshold 0 matches any pick"],
)
def test_triton_layout_match_equals_reference(batch, num_dets, num_targets, classes, threshold, dtype):
    inputs = random_layout(batch, num_dets, num_targets, classes, seed=num_dets + num_targets, dtype=dtype)
    got, want = triton_layout_match(*inputs, threshold), reference.layout_match(*inputs, threshold)
    for field in LayoutMatch._fields:
        assert getattr(got, field).dtype == getattr(want, field).dtype, field
        assert torch.equal(getattr(got, field), getattr(want, field)), field


def test_layout_match_each_detection_matches_at_most_once():
    result = triton_layout_match(*random_layout(8, 10, 12, 2, seed=5), 0.1)
    for row in result.matched_index.tolist():
        taken = [index for index in row if index >= 0]
        assert len(taken) == len(set(taken))


# dispatch -------------------------------------------------------------------------------------------------


@pytest.fixture
def calls(monkeypatch):
    """Records which implementation each dispatched call reached."""
    record = []
    monkeypatch.delenv("REWARDSCOPE_KERNELS", raising=False)
    for backend, module in [
        ("reference", reference),
        ("triton", sys.modules["rewardscope.kernels.triton.box_match"]),
        ("triton", sys.modules["rewardscope.kernels.triton.layout_match"]),
    ]:
        for name in ("box_match", "layout_match"):
            if hasattr(module, name):
                original = getattr(module, name)

                def spy(*args, _original=original, _tag=(backend, name), **kwargs):
                    record.append(_tag)
                    return _original(*args, **kwargs)

                monkeypatch.setattr(module, name, spy)
    return record


def small_box_match_inputs():
    return make_candidates(1, 8, 2, seed=0), torch.tensor([[0, 1]]), torch.tensor([[1, 1]])


DISPATCH_CASES = {
    "CPU tensors run the reference by default": (None, None, "reference"),
    "REWARDSCOPE_KERNELS=auto: the device decides": (None, "auto", "reference"),
    "REWARDSCOPE_KERNELS=triton forces Triton": (None, "triton", "triton"),
    "REWARDSCOPE_KERNELS=reference forces the reference": (None, "reference", "reference"),
    "the environment variable is case-insensitive": (None, " Triton ", "triton"),
    "backend='triton' forces Triton": ("triton", None, "triton"),
    "the argument wins over the environment (triton)": ("triton", "reference", "triton"),
    "the argument wins over the environment (reference)": ("reference", "triton", "reference"),
    "backend='auto' is the device's choice": ("auto", "triton", "reference"),
}


@pytest.mark.parametrize("backend, environment, expected", DISPATCH_CASES.values(), ids=DISPATCH_CASES.keys())
def test_dispatch_picks_the_backend(calls, monkeypatch, backend, environment, expected):
    if environment is not None:
        monkeypatch.setenv("REWARDSCOPE_KERNELS", environment)
    kernel_ops.box_match(*small_box_match_inputs(), backend=backend)
    kernel_ops.layout_match(*layout_inputs([(BOX, 0.9, 0)], [(BOX, 0)]), backend=backend)
    assert calls == [(expected, "box_match"), (expected, "layout_match")]


def test_both_dispatched_backends_give_the_same_result(calls):
    inputs = small_box_match_inputs()
    assert_box_matches_agree(
        kernel_ops.box_match(*inputs, backend="triton"), kernel_ops.box_match(*inputs, backend="reference")
    )


def test_dispatched_box_match_takes_num_classes_on_both_backends(calls):
    # Both backends declare it (the Triton twin through takes_arguments_of), and the dispatch exposes it.
    parameters = list(inspect.signature(triton_box_match).parameters)
    assert parameters[-1] == "num_classes"
    assert list(inspect.signature(kernel_ops.box_match).parameters) == [*parameters, "backend"]
    candidates, zeroed, num_classes = open_vocabulary_batch(2, 12, 3, seed=6, counts=[1, 3])
    slots = (torch.tensor([[0, 2]] * 2), torch.tensor([[1, 1]] * 2))
    got = kernel_ops.box_match(candidates, *slots, 0.05, num_classes=num_classes, backend="triton")
    want = kernel_ops.box_match(candidates, *slots, 0.05, num_classes=num_classes, backend="reference")
    assert calls == [("triton", "box_match"), ("reference", "box_match")]
    assert_box_matches_agree(got, want)
    assert got.num_kept.sum() > 0 and got.counts[0, 1] == 0  # image 0 has no class 2


@pytest.mark.parametrize(
    "backend, environment",
    [("cuda", None), (None, "fast"), ("Triton", None)],
    ids=["bad argument", "bad environment variable", "the argument is case-sensitive"],
)
def test_dispatch_rejects_unknown_backends(calls, monkeypatch, backend, environment):
    if environment is not None:
        monkeypatch.setenv("REWARDSCOPE_KERNELS", environment)
    with pytest.raises(ValueError, match="triton"):
        kernel_ops.box_match(*small_box_match_inputs(), backend=backend)
    assert calls == []


@pytest.mark.parametrize("module", ["rewardscope.kernels.triton.box_match", "rewardscope.kernels.triton.layout_match"])
def test_forced_triton_on_cpu_without_the_interpreter_raises_a_clear_error(monkeypatch, module):
    monkeypatch.setattr(sys.modules[module], "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        if module == "rewardscope.kernels.triton.box_match":
            kernel_ops.box_match(*small_box_match_inputs(), backend="triton")
        else:
            kernel_ops.layout_match(*layout_inputs([(BOX, 0.9, 0)], [(BOX, 0)]), backend="triton")


def test_importing_the_triton_modules_keeps_the_dispatch_functions():
    # The Triton modules are submodules of rewardscope.kernels, not of ops: importing them never replaces the
    # dispatch functions of the same names.
    import rewardscope.kernels.triton.box_match  # noqa: F401
    import rewardscope.kernels.triton.layout_match  # noqa: F401

    assert callable(kernel_ops.box_match) and kernel_ops.box_match.__module__ == "rewardscope.kernels.ops"
    assert callable(kernel_ops.layout_match) and kernel_ops.layout_match.__module__ == "rewardscope.kernels.ops"


def test_interpreted_calls_from_threads_are_serialised_and_correct():
    inputs = [make_candidates(1, 20, 2, seed=seed) for seed in range(4)]
    slots = (torch.tensor([[0, 1]]), torch.tensor([[1, 2]]))
    results = [None] * len(inputs)

    def run(i):
        results[i] = kernel_ops.box_match(inputs[i], *slots, 0.05, backend="triton")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for candidates, result in zip(inputs, results, strict=True):
        assert_box_matches_agree(result, reference.box_match(candidates, *slots, 0.05))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_run_triton_by_default(calls):
    candidates, class_ids, requested = (t.cuda() for t in small_box_match_inputs())
    kernel_ops.box_match(candidates, class_ids, requested)
    assert calls == [("triton", "box_match")]
