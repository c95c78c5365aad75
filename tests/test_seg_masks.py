"""Instance masks from ultralytics segmentation exports (issue #18, GenEval's colour check on masked crops):
OnnxDetector.detect / instance_masks against ultralytics' own mask post-processing, and clip.masked_crop."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from rewardscope.models.clip import masked_crop
from rewardscope.models.detection.detector import OnnxDetector, letterbox_batch

IMGSZ = 320


@pytest.fixture(scope="module")
def seg_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init yolov8n-seg exported through our exporter (offline: conftest sets YOLO_OFFLINE,
    YOLO_AUTOINSTALL and a scratch YOLO_CONFIG_DIR before ultralytics is imported)."""
    from rewardscope.models.detection.export import export_ultralytics
    from rewardscope.models.prompt import COCO_CLASSES

    folder = tmp_path_factory.mktemp("yolo-seg")
    with pytest.MonkeyPatch.context() as patch, torch.random.fork_rng():
        patch.chdir(folder)  # ultralytics writes a .yaml model's export into the working directory
        torch.manual_seed(0)  # the same random-init weights on every run
        return export_ultralytics(
            "yolov8n-seg.yaml", folder / "yolov8n-seg.onnx", imgsz=IMGSZ, batch=1, names=COCO_CLASSES
        )


@pytest.fixture(scope="module")
def seg(seg_onnx: Path) -> OnnxDetector:
    return OnnxDetector(seg_onnx)


@pytest.fixture(scope="module")
def seg_detections(seg, bus, zidane):
    # bus is portrait (letterbox pads x), zidane landscape (pads y); the fixed batch of 1 runs them in two chunks.
    return seg.detect([bus, zidane])


def test_detection_models_are_unchanged(detector, bus, zidane):
    images = [bus, zidane]
    detections = detector.detect(images)
    assert detector.has_masks is False and detector.describe()["masks"] is False
    assert detections.coefficients is None and detections.protos is None
    assert torch.equal(detector(images), detections.candidates)
    # The path __call__ took before detect() existed.
    batch, geometry = letterbox_batch(images, *detector.input_size)
    sizes = np.array([image.size for image in images], dtype=np.float64)
    assert torch.equal(detections.candidates, detector.decode(detector.forward(batch), geometry, sizes))
    assert detections.image_sizes.tolist() == [list(bus.size), list(zidane.size)]
    with pytest.raises(ValueError, match="not a segmentation model"):
        detector.instance_masks(detections, 0, [0], detections.candidates[0, :1, :4])


def test_seg_export_carries_our_metadata(seg_onnx):
    from rewardscope.models.prompt import COCO_CLASSES

    metadata = {p.key: p.value for p in onnx.load(str(seg_onnx)).metadata_props}
    assert metadata["model_version"] == "yolov8n-seg@random-init"
    assert metadata["names"] == repr(dict(enumerate(COCO_CLASSES)))
    assert metadata["imgsz"] == repr([IMGSZ, IMGSZ]) and metadata["task"] == "segment"


def test_seg_model_outputs(seg, seg_detections, bus, zidane):
    assert seg.has_masks and seg.mask_dim == 32 and seg.describe()["masks"] is True
    assert seg.num_classes == 80 and seg.input_size == (IMGSZ, IMGSZ) and seg.fixed_batch == 1
    candidates, coefficients, protos = seg_detections.candidates, seg_detections.coefficients, seg_detections.protos
    count = candidates.shape[1]
    assert candidates.shape == (2, (IMGSZ // 8) ** 2 + (IMGSZ // 16) ** 2 + (IMGSZ // 32) ** 2, 4 + 80)
    assert coefficients.shape == (2, count, 32)
    assert protos.shape == (2, 32, IMGSZ // 4, IMGSZ // 4)
    # Same candidates as decoding the box and score rows of the raw output; coefficients are the rows after them.
    batch, geometry = letterbox_batch([bus, zidane], IMGSZ, IMGSZ)
    raw = np.concatenate([seg.forward(batch[i : i + 1]) for i in range(2)])
    sizes = seg_detections.image_sizes
    assert torch.equal(candidates, seg.decode(raw[:, :84], geometry, sizes))
    assert torch.equal(coefficients, torch.from_numpy(raw[:, 84:]).transpose(1, 2))
    assert torch.equal(seg([bus, zidane]), candidates)


def _structured(detections, seed: int = 0):
    """The same detections with smooth, mixed-sign prototypes. A random-init network's prototypes are nearly
    constant away from the borders, so its masks are whole boxes or thin strips; these give masks with edges
    everywhere, which exercises the interpolation and letterbox crop."""
    generator = torch.Generator().manual_seed(seed)
    batch, channels, height, width = detections.protos.shape
    coarse = torch.randn(batch, channels, height // 8, width // 8, generator=generator)
    protos = F.interpolate(coarse, (height, width), mode="bilinear")
    coefficients = torch.randn(detections.coefficients.shape, generator=generator)
    return dataclasses.replace(detections, protos=protos, coefficients=coefficients)


def _reference_scale_masks(detections, image_index, indices, boxes, input_size):
    """Ultralytics' own steps: logits of the prototypes, bilinear to the input size (process_mask, upsample=True),
    ops.scale_masks to the original image, threshold at 0 (sigmoid > 0.5), ops.crop_mask with the boxes."""
    from ultralytics.utils import ops

    protos = detections.protos[image_index].float()
    logits = detections.coefficients[image_index, indices].float() @ protos.view(protos.shape[0], -1)
    logits = F.interpolate(logits.view(1, -1, *protos.shape[1:]), input_size, mode="bilinear")
    width, height = (int(v) for v in detections.image_sizes[image_index])
    masks = (ops.scale_masks(logits, (height, width))[0] > 0).byte()
    return ops.crop_mask(masks, boxes.clone()).bool()


def _pick(detections, image_index):
    """Candidate indices: the top-scoring few and a spread across the anchor grid (small and large boxes)."""
    candidates = detections.candidates[image_index]
    top = candidates[:, 4:].amax(1).argsort(descending=True)[:4].tolist()
    spread = np.linspace(0, candidates.shape[0] - 1, 8).astype(int).tolist()
    indices = list(dict.fromkeys(top + spread))
    return indices, candidates[indices, :4]


@pytest.mark.parametrize("structured", [False, True], ids=["model-protos", "structured-protos"])
@pytest.mark.parametrize("image_index", [0, 1], ids=["bus-pad-x", "zidane-pad-y"])
def test_instance_masks_match_ultralytics(seg, seg_detections, structured, image_index):
    from ultralytics.utils import ops

    detections = _structured(seg_detections) if structured else seg_detections
    indices, boxes = _pick(detections, image_index)
    masks = seg.instance_masks(detections, image_index, indices, boxes)
    width, height = (int(v) for v in detections.image_sizes[image_index])
    assert masks.dtype == torch.bool and masks.shape == (len(indices), height, width)

    # Exactly ultralytics' upsample -> scale_masks -> threshold -> crop_mask.
    assert torch.equal(masks, _reference_scale_masks(detections, image_index, indices, boxes, seg.input_size))

    # process_mask_native (retina_masks=True) upsamples the prototypes by 4, 2 or 1 (the least that still crops the
    # padding on whole pixels) instead of to the full input size: bilinear twice vs once moves a few border pixels.
    protos, coefficients = detections.protos[image_index], detections.coefficients[image_index, indices]
    native = ops.process_mask_native(protos, coefficients, boxes.clone(), (height, width)).bool()
    # Measured: the model's own (near-constant) prototypes differ in none or in whole rows / columns along an edge,
    # the structured ones in scattered mask-edge pixels; either way under 0.05 % of the boxes' pixels.
    differing = (native != masks).sum().item()
    assert differing <= 0.01 * (boxes[:, 2:] - boxes[:, :2]).prod(1).sum().item(), differing

    # Nothing outside the boxes.
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.tolist(), strict=True):
        inside = torch.zeros_like(mask)
        inside[int(np.ceil(y0)) : int(np.ceil(y1)), int(np.ceil(x0)) : int(np.ceil(x1))] = True
        assert not (mask & ~inside).any()
    if structured:  # the structured prototypes really give partial masks
        assert ((masks.sum((1, 2)) > 0) & (masks.sum((1, 2)) < (boxes[:, 2:] - boxes[:, :2]).prod(1) * 0.9)).any()


def test_instance_masks_of_no_candidates(seg, seg_detections, bus):
    masks = seg.instance_masks(seg_detections, 0, [], torch.zeros((0, 4)))
    assert masks.shape == (0, bus.height, bus.width) and masks.dtype == torch.bool


def test_masked_crop_pastes_the_mask_over_grey_and_crops_to_the_box():
    pixels = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3) * 5
    image = Image.fromarray(pixels)
    mask = torch.zeros((4, 4), dtype=torch.bool)
    mask[1, 1] = mask[2, 2] = mask[0, 3] = True  # (0, 3) lies outside the box
    crop = masked_crop(image, mask, [1, 1, 3, 4])
    assert crop.size == (2, 3)  # x 1..2, y 1..3
    result = np.asarray(crop)
    grey = (153, 153, 153)  # #999
    for y in range(3):
        for x in range(2):
            inside = bool(mask[y + 1, x + 1])
            expected = tuple(pixels[y + 1, x + 1]) if inside else grey
            assert tuple(result[y, x]) == expected, (x, y)
    # A numpy mask and a PIL mask give the same crop; the box is clamped as crop_box clamps it.
    assert np.array_equal(np.asarray(masked_crop(image, mask.numpy(), [1, 1, 3, 4])), result)
    as_pil = Image.fromarray(mask.numpy().astype(np.uint8) * 255)
    assert np.array_equal(np.asarray(masked_crop(image, as_pil, [1, 1, 3, 4])), result)
    assert masked_crop(image, mask, [-5, -5, 10, 10]).size == (4, 4)
    with pytest.raises(ValueError, match="mask of shape"):
        masked_crop(image, torch.zeros((3, 4), dtype=torch.bool), [0, 0, 4, 4])


def test_the_geneval_colour_check_reads_masks_from_a_seg_model(seg_onnx, seg, bus, monkeypatch):
    # GenEval pastes each object's mask over grey #999 and crops to its box (evaluate_images.py lines 81-106): with
    # a seg model, every crop the colour classifier sees is such a masked crop, and the details say so.
    import rewardscope.models.clip as clip
    from rewardscope.models.scorer import Scorer
    from tiny_clip import shared_tiny_clip

    scores = seg([bus])[0, :, 4:]
    best_class = seg.class_names[int(scores.max(0).values.argmax())]  # the class a random-init model finds
    calls = []
    original = clip.masked_crop

    def spy(image, mask, box, background="#999"):
        calls.append((tuple(mask.shape), box))
        return original(image, mask, box, background)

    monkeypatch.setattr(clip, "masked_crop", spy)
    config = {"detector": str(seg_onnx), "color_model": str(shared_tiny_clip()), "conf_threshold": 0.0}
    scorer = Scorer(["geneval"], config={"geneval": config})
    metadata = {"tag": "colors", "include": [{"class": best_class, "count": 1, "color": "red"}]}
    (result,) = scorer.score([bus], [""], [metadata])
    details = result.details["geneval"]
    assert result.error is None and details["colour_region"].startswith("mask over grey #999")
    assert calls and all(shape == (bus.height, bus.width) for shape, _ in calls), best_class
    assert len(details["objects"][0]["predicted_colors"]) == 1
