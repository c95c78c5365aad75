"""The soft-count and layout variants of the matching score, and kernel-backend parity on a real photo."""

from __future__ import annotations

import pytest
import torch
from oracles import brute_force_pmf
from rewardscope.models.detection.matching import f1_score
from rewardscope.models.types import Sample

from rewardscope import create_reward


def test_f1_score_uses_the_given_quantity_confidence():
    category = torch.tensor([[0.8, 0.4, 0.9]], dtype=torch.float64)
    quantity = torch.tensor([[0.5, 0.1, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    score, c, q = f1_score(category, quantity, mask)
    assert float(c[0]) == pytest.approx(0.6) and float(q[0]) == pytest.approx(0.3)
    assert float(score[0]) == pytest.approx(2 * 0.6 * 0.3 / 0.9)


@pytest.fixture(scope="module")
def soft():
    return create_reward("matching", variant="soft")


@pytest.mark.parametrize("prompt, count", [("four people", 4), ("two people", 2), ("a person", 1)])
def test_soft_quantity_is_the_poisson_binomial_probability_of_the_requested_count(soft, bus, prompt, count):
    (output,) = soft.score([Sample(bus, prompt)])
    details = output.details
    people = [d["score"] for d in details["detections"] if d["class"] == "person"]
    (person,) = details["objects"]
    assert person["quantity_confidence"] == pytest.approx(brute_force_pmf(people)[count], abs=1e-3)
    c, q = details["category_confidence"], details["quantity_confidence"]
    assert output.value == pytest.approx(2 * c * q / (c + q))


def test_soft_prefers_the_likelier_count(soft, bus):
    # Four people are detected with scores 0.97, 0.78, 0.69, 0.53: exactly three or four is likelier than one.
    three, one = soft.score([Sample(bus, "three people"), Sample(bus, "a person")])
    assert three.value > one.value


@pytest.fixture(scope="module")
def layout():
    return create_reward("matching", variant="layout")


def test_layout_scores_iou_against_target_boxes(layout, bus):
    seed = create_reward("matching").score([Sample(bus, "a bus")])[0]
    (bus_box,) = [d["box"] for d in seed.details["detections"] if d["class"] == "bus"]
    metadata = {"layout": [{"class": "bus", "box": bus_box}, {"class": "person", "box": [0.0, 0.0, 20.0, 20.0]}]}
    (output,) = layout.score([Sample(bus, "a bus and a person", metadata)])
    on_bus, in_corner = output.details["targets"]
    assert on_bus["best_iou"] == pytest.approx(1.0, abs=1e-3) and on_bus["matched"]
    assert in_corner["best_iou"] == 0.0 and not in_corner["matched"]
    assert output.value == pytest.approx((on_bus["best_iou"] + 0.0) / 2)
    assert output.details["recall"] == 0.5


@pytest.mark.parametrize(
    "metadata, code",
    [
        (None, "no_layout"),
        ({"layout": []}, "no_layout"),
        ({"layout": [{"class": "unicorn", "box": [0, 0, 10, 10]}]}, "unknown_class"),
        ({"layout": [{"class": "dog", "box": [10, 10, 0, 0]}]}, "bad_metadata"),
        ({"layout": [{"class": "dog", "box": [0, 0, 10]}]}, "bad_metadata"),
        ({"layout": [{"class": "dog", "box": [0, 0, 10, float("nan")]}]}, "bad_metadata"),
        ({"layout": [{"class": "dog"}]}, "bad_metadata"),
    ],
)
def test_bad_layouts_fail_the_item_with_a_code(layout, bus, metadata, code):
    (output,) = layout.score([Sample(bus, "a dog", metadata)])
    assert output.value is None and output.code == code


@pytest.mark.parametrize("variant", ["seed", "soft", "layout"])
def test_forced_triton_and_reference_paths_score_the_bus_identically(bus, variant):
    metadata = {
        "layout": [
            {"class": "bus", "box": [20.0, 230.0, 800.0, 750.0]},
            {"class": "person", "box": [50, 400, 210, 900]},
        ]
    }
    samples = [Sample(bus, "four people and a bus", metadata)]
    outputs = {
        backend: create_reward("matching", variant=variant, kernels_backend=backend).score(samples)[0]
        for backend in ("reference", "triton")
    }
    assert outputs["triton"].value == outputs["reference"].value
    # Same detections and counts; soft-count probabilities come from different float32 algorithms (FFT vs
    # in-kernel DFT) and agree to ~1e-7.
    assert rounded(outputs["triton"].details) == rounded(outputs["reference"].details)


def rounded(value, digits=6):
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, list):
        return [rounded(item, digits) for item in value]
    return value
