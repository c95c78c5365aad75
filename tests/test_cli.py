"""The `rewardscope` command line, run in-process through its main()."""

from __future__ import annotations

import json

from rewardscope.models.detection.detector import OnnxDetector
from rewardscope.models.prompt import COCO_CLASSES
from rewardscope.service.tools.cli import main


def test_score_prints_one_json_line_per_image_and_keeps_going_past_a_bad_one(bus_path, tmp_path, capsys):
    missing = tmp_path / "missing.png"
    assert main(["score", str(bus_path), str(missing), "--prompt", "four people"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["image"] for line in lines] == [str(bus_path), str(missing)]
    assert lines[0]["rewards"]["matching"] > 0.5 and lines[0]["error"] is None
    assert lines[1]["rewards"]["matching"] is None and "not_found" in lines[1]["error"]


def test_score_with_weights_and_a_variant(bus_path, capsys):
    argv = ["score", str(bus_path), "--prompt", "a bus", "--rewards", "matching=2", "--variant", "numeracy"]
    assert main(argv) == 0
    (line,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert line["rewards"]["matching"] == 1.0 and line["total"] == 2.0


def test_export_detector_writes_an_onnx_model_our_runtime_loads(tmp_path, capsys):
    target = tmp_path / "v8n.onnx"
    argv = ["export-detector", "yolov8n.yaml", "--output", str(target), "--imgsz", "256", "--names", "coco"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(target)
    detector = OnnxDetector(target)
    assert detector.class_names == COCO_CLASSES and detector.input_size == (256, 256)


def test_a_missing_model_is_one_clear_line_not_a_traceback(bus_path, capsys):
    argv = ["score", str(bus_path), "--prompt", "a bus", "--rewards", "caption"]
    assert main(argv) == 2  # the default captioner is not in the (offline) local cache
    error = capsys.readouterr().err
    assert error.startswith("rewardscope: ") and "Salesforce/blip-image-captioning-large" in error
