"""The int8 detector option: static quantization calibrated on real photos keeps the bus-photo behaviour."""

from __future__ import annotations

import onnx
import pytest

from rewardscope import Scorer


@pytest.fixture(scope="module")
def int8_scorer():
    return Scorer(["matching"], config={"matching": {"quantized": True}})


def test_the_int8_detector_is_a_quantized_twin_with_its_own_version(int8_scorer):
    reward = int8_scorer.rewards["matching"]
    assert reward.version.startswith("yolov3-tiny-darknet@") and reward.version.endswith("+int8")
    graph = onnx.load(str(reward.detector.path)).graph
    assert any(node.op_type == "QuantizeLinear" for node in graph.node)
    assert reward.describe()["precision"] == "int8"
    assert reward.detector.class_names == Scorer(["matching"]).rewards["matching"].detector.class_names


def test_int8_keeps_the_bus_photo_ordering(int8_scorer, bus):
    four, one, cat = int8_scorer.score([bus] * 3, ["four people", "a person", "a cat"])
    people = [d for d in four.details["matching"]["detections"] if d["class"] == "person"]
    assert len(people) >= 3
    assert four.rewards["matching"] > one.rewards["matching"] > cat.rewards["matching"]


def test_int8_finds_the_bus_at_threshold_0_1(bus):
    scorer = Scorer(["matching"], config={"matching": {"quantized": True, "conf_threshold": 0.1}})
    (result,) = scorer.score([bus], ["a bus"])
    assert result.details["matching"]["objects"][0]["detected"] >= 1
