"""The in-process API on real photos and real weights: ordering of prompts, thresholds, per-item errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from rewardscope.models.detection.matching import MatchingReward

from rewardscope import Scorer, create_reward, list_rewards


@pytest.fixture(scope="module")
def scorer():
    return Scorer(["matching"])


def test_bus_photo_orders_prompts_by_how_well_they_match(scorer, bus):
    four, one, cat = scorer.score([bus] * 3, ["four people", "a person", "a cat"])
    people = [d for d in four.details["matching"]["detections"] if d["class"] == "person"]
    assert len(people) >= 3
    assert four.rewards["matching"] > one.rewards["matching"] > cat.rewards["matching"]
    assert cat.rewards["matching"] == 0.0 and cat.error is None  # a real 0: no cat detected


def test_low_threshold_also_finds_the_bus(bus):
    low = Scorer({"matching": 1.0}, config={"matching": {"conf_threshold": 0.1}})
    (result,) = low.score([bus], ["a bus"])
    objects = result.details["matching"]["objects"]
    assert objects[0]["class"] == "bus" and objects[0]["detected"] >= 1
    assert result.rewards["matching"] > 0


def test_breakdown_is_consistent_with_the_detections(scorer, bus):
    (result,) = scorer.score([bus], ["two people and a bus"])
    details = result.details["matching"]
    for spec in details["objects"]:
        scores = [d["score"] for d in details["detections"] if d["class"] == spec["class"]]
        assert spec["detected"] == len(scores)
        assert spec["category_confidence"] == pytest.approx(np.mean(scores) if scores else 0.0, abs=1e-3)
    c, q = details["category_confidence"], details["quantity_confidence"]
    assert result.rewards["matching"] == pytest.approx(2 * c * q / (c + q))
    assert details["detector"]["version"].startswith("yolov3-tiny-darknet@")
    assert details["version"] == details["detector"]["version"]


def test_images_as_pil_array_path_and_bytes_score_alike(scorer, bus, bus_path):
    sources = [bus, np.asarray(bus), bus_path, str(bus_path), bus_path.read_bytes()]
    values = [r.rewards["matching"] for r in scorer.score(sources, ["four people"] * len(sources))]
    assert values[0] == pytest.approx(values[1])
    assert all(v == pytest.approx(values[2], abs=0.02) for v in values)  # JPEG decode vs convert("RGB")


def test_one_bad_item_fails_alone_and_never_scores_zero(scorer, bus):
    corrupt = b"\xff\xd8\xff\xe0 not really a jpeg"
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    items = [bus, corrupt, bus, buffer.getvalue(), bus, bus]
    prompts = ["a person", "a person", "a unicorn", "a person", 42, "a person"]
    results = scorer.score(items, prompts)
    good = [r for i, r in enumerate(results) if i in (0, 5)]
    assert all(r.error is None and r.rewards["matching"] > 0 for r in good)
    assert good[0].rewards["matching"] == pytest.approx(good[1].rewards["matching"])
    for index, fragment in [
        (1, "decode_failed"),
        (2, "unicorn"),
        (3, "too_small"),
        (4, "prompt must be a string"),
    ]:
        assert results[index].rewards["matching"] is None and results[index].total is None
        assert fragment in results[index].error


def test_prompt_without_countable_objects_says_so(scorer, bus):
    (result,) = scorer.score([bus], ["a beautiful sunset over the sea"])
    assert result.rewards["matching"] is None
    assert "no object the detector knows" in result.error


def test_weighted_total_combines_variants(bus):
    scorer = Scorer({"matching": 0.5, "numeracy": 2.0})
    (result,) = scorer.score([bus], ["four people"])
    expected = 0.5 * result.rewards["matching"] + 2.0 * result.rewards["numeracy"]
    assert result.total == pytest.approx(expected)


@pytest.mark.parametrize(
    "prompt, metadata, variant, expected",
    [
        ("a photo of a bus", None, "geneval", 1.0),
        ("a photo of a cat", None, "geneval", 0.0),
        ("a photo of two buses", None, "geneval", 0.0),
        ("a photo of a bus above a person", None, "geneval", 0.0),  # people stand beside, not under, the bus
        ("a photo of a person left of a person", None, "geneval", 0.0),  # a person is not left of itself
        (
            "",
            {"include": [{"class": "person", "count": 3}], "exclude": [{"class": "person", "count": 30}]},
            "geneval",
            1.0,
        ),
        (
            "",
            {"include": [{"class": "person", "count": 2}], "exclude": [{"class": "person", "count": 3}]},
            "geneval",
            0.0,
        ),
        ("a bus and a cat", None, "numeracy", 0.5),
    ],
)
def test_variants_on_the_bus_photo(bus, prompt, metadata, variant, expected):
    reward = create_reward("matching", variant=variant)
    from rewardscope.models.types import Sample

    (output,) = reward.score([Sample(bus, prompt, metadata)])
    assert output.value == expected


def test_geneval_colour_prompts_are_unscorable_without_a_colour_model(bus):
    from rewardscope.models.types import Sample

    (output,) = create_reward("geneval").score([Sample(bus, "a photo of a yellow bus", None)])
    assert output.value is None and "colour" in output.error


def test_registry_lists_and_rejects_by_name():
    assert {"matching", "geneval", "numeracy"} <= set(list_rewards())
    with pytest.raises(KeyError, match="available"):
        create_reward("nope")
    with pytest.raises(ValueError, match="variant"):
        MatchingReward(variant="nope")


def test_random_init_yolov8n_runs_through_the_matching_score(yolov8n_onnx, bus, zidane):
    scorer = Scorer(["matching"], config={"matching": {"detector": str(yolov8n_onnx), "conf_threshold": 0.0}})
    results = scorer.score([bus, zidane, bus], ["a bus", "two people", "a bus"])
    assert all(r.error is None for r in results)
    assert all(0.0 <= r.rewards["matching"] <= 1.0 for r in results)
    assert results[0].rewards["matching"] == pytest.approx(results[2].rewards["matching"])
    assert results[0].details["matching"]["version"].startswith("yolov8n@random-init")
