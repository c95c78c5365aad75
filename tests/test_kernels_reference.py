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
