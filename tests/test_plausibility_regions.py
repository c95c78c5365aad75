"""The plausibility reward on segment masks (FineRewards' SAM reward labels segments, not boxes): the FastSAM-style
segmenter over a random-init one-class ultralytics seg export, CLIP and detector labels, mask-union weights, and
the boxes mode left as it was. Random weights give real outputs of real code; expectations are recomputed here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from rewardscope.kernels import ops as kernel_ops
from rewardscope.models.clip import load_clip, masked_crop
from rewardscope.models.prompt import COCO_CLASSES
from rewardscope.models.regions import (
    FASTSAM_IOU_THRESHOLD,
    DetectorRegionLabeller,
    FastSamSegmenter,
    masks_for_boxes,
)
from rewardscope.models.types import Sample
from tiny_clip import shared_tiny_clip
from tiny_models import save_tiny_causal_lm

from rewardscope import Scorer, create_reward

IMGSZ = 320
# The random-init network's scores lie between 0 and about 0.05 on the photos: a threshold low enough for masks.
MASK_CONF = 0.002


@pytest.fixture(scope="module")
def fastsam_onnx(tmp_path_factory: pytest.TempPathFactory, bus: Image.Image, zidane: Image.Image) -> Path:
    """A random-init FastSAM-shaped model: yolov8n-seg with one class ("object"), exported by ultralytics to ONNX
    (offline: conftest sets YOLO_OFFLINE, YOLO_AUTOINSTALL and a scratch YOLO_CONFIG_DIR) with our metadata.

    Unlike test_seg_masks' export, the network first takes batch-norm statistics from one pass over the two
    photos: a random-init network's activations shrink to nothing layer by layer, so every candidate would get the
    same image-sized box and an empty mask; with the statistics, boxes, scores and masks vary with the image."""
    import ultralytics
    import yaml
    from rewardscope.models.detection.export import write_metadata
    from ultralytics import YOLO

    folder = tmp_path_factory.mktemp("fastsam")
    spec = yaml.safe_load((Path(ultralytics.__file__).parent / "cfg/models/v8/yolov8-seg.yaml").read_text())
    spec["nc"] = 1
    config = folder / "fastsam-yolov8n-seg.yaml"  # "yolov8n" in the name: ultralytics reads the n scale from it
    config.write_text(yaml.safe_dump(spec))
    photos = [np.asarray(image.resize((IMGSZ, IMGSZ))) for image in (bus, zidane)]
    batch = torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).float() / 255
    with pytest.MonkeyPatch.context() as patch, torch.random.fork_rng():
        patch.chdir(folder)  # ultralytics writes a .yaml model's export into the working directory
        torch.manual_seed(0)
        network = YOLO(str(config))
        for module in network.model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = 1.0  # the running statistics become this one batch's
        network.model.train()
        with torch.no_grad():
            network.model(batch)
        network.model.eval()
        exported = Path(
            network.export(format="onnx", imgsz=IMGSZ, batch=1, dynamic=False, nms=False, simplify=False)
        ).resolve()
    write_metadata(
        exported,
        {
            "output_format": "cxcywh+scores",
            "model_version": "fastsam-yolov8n-seg@random-init",
            "names": repr({0: "object"}),
        },
    )
    return exported


@pytest.fixture(scope="module")
def language_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm") / "tiny-gpt2", seed=2))


@pytest.fixture(scope="module")
def clip_model() -> str:
    return str(shared_tiny_clip())


@pytest.fixture(scope="module")
def masks_config(language_model, fastsam_onnx, clip_model) -> dict:
    return {
        "language_model": language_model,
        "regions": "masks",
        "segmenter": str(fastsam_onnx),
        "clip_model": clip_model,
        "mask_conf_threshold": MASK_CONF,
        "device": "cpu",
    }


@pytest.fixture(scope="module")
def masks_reward(masks_config):
    return create_reward("plausibility", **masks_config)


@pytest.fixture(scope="module")
def segmenter(masks_reward) -> FastSamSegmenter:
    return masks_reward.segmenter


def union(masks: list[np.ndarray]) -> int:
    return int(np.logical_or.reduce(np.stack(masks)).sum())


def by_label(entries: list[dict]) -> dict[str, dict]:
    return {entry["label"]: entry for entry in entries}


# -- the segmenter ----------------------------------------------------------------------------------------------
def test_segmenter_masks_are_the_instance_masks_of_the_class_agnostic_nms_survivors(segmenter, bus, zidane):
    network = segmenter.network
    assert network.class_names == ("object",) and network.has_masks
    images = [bus, zidane]
    regions = segmenter(images)
    detections = network.detect(images)
    for row, image in enumerate(images):
        candidates = detections.candidates[row]
        scores = candidates[:, 4:].amax(-1)
        above = (scores > MASK_CONF).nonzero()[:, 0]
        order = torchvision.ops.nms(candidates[above, :4].double(), scores[above].double(), FASTSAM_IOU_THRESHOLD)
        kept = above[order][: segmenter.max_masks]
        masks = network.instance_masks(detections, row, kept, candidates[kept, :4])
        nonempty = masks.flatten(1).any(1)
        assert [region.candidate for region in regions[row]] == kept[nonempty].tolist()
        for region, mask, index in zip(regions[row], masks[nonempty], kept[nonempty].tolist(), strict=True):
            assert region.mask.dtype == np.bool_ and region.mask.shape == (image.height, image.width)
            assert np.array_equal(region.mask, mask.numpy())
            assert region.box == tuple(candidates[index, :4].tolist()) and region.score == float(scores[index])
        areas = [int(region.mask.sum()) for region in regions[row]]
        box_areas = [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in (region.box for region in regions[row])]
        # The fixture's masks are real segments: several per image, some covering only part of their box.
        assert len(regions[row]) > 3 and any(area < 0.9 * box for area, box in zip(areas, box_areas, strict=True))


def test_detection_boxes_take_their_best_iou_mask_inside_the_box_or_else_the_whole_box(segmenter, bus):
    # What a colour check on a detector without masks would crop: a detection's mask from the segmenter.
    regions = segmenter([bus])[0]
    x0, y0, x1, y1 = regions[0].box
    boxes = torch.tensor([regions[0].box, (0, 0, 5, 5), (x0, y0, x0 + 0.8 * (x1 - x0), y1)], dtype=torch.float64)
    masks, matched = masks_for_boxes(regions, boxes, bus.size)
    assert masks.shape == (3, bus.height, bus.width) and matched.tolist() == [True, False, True]
    assert np.array_equal(masks[0].numpy(), regions[0].mask)  # its own region, already inside its box
    assert masks[1].sum() == 25 and masks[1, :5, :5].all()  # no region near: the whole box
    iou = torchvision.ops.box_iou(boxes[2:], torch.tensor([region.box for region in regions], dtype=torch.float64))
    expected = regions[int(iou.argmax())].mask.copy()
    expected[:, int(np.ceil(float(boxes[2, 2]))) :] = False
    expected[:, : int(np.ceil(x0))] = False
    expected[: int(np.ceil(y0))] = False
    expected[int(np.ceil(y1)) :] = False
    assert np.array_equal(masks[2].numpy(), expected)
    # An image without regions: every box is its whole box.
    masks, matched = masks_for_boxes([], boxes[1:2], bus.size)
    assert not matched.any() and masks.shape == (1, bus.height, bus.width) and masks.sum() == 25


# -- the boxes mode -------------------------------------------------------------------------------------------
def test_boxes_mode_is_the_default_and_its_output_is_unchanged(language_model, bus):
    default = create_reward("plausibility", language_model=language_model, device="cpu")
    explicit = create_reward("plausibility", language_model=language_model, device="cpu", regions="boxes")
    samples = [Sample(bus, "a cat in a kitchen"), Sample(bus, "four people and a bus")]
    first, second = default.score(samples), explicit.score(samples)
    assert [(o.value, o.details, o.error, o.code) for o in first] == [
        (o.value, o.details, o.error, o.code) for o in second
    ]
    assert default.version == explicit.version == f"{default.judge.source.version}+{default.detector.version}"
    for output in first:
        assert output.details.keys() == {"models", "labels"}
        for entry in output.details["labels"]:
            assert entry.keys() == {"label", "area", "likelihood", "source", "weight"}
    described = default.describe()
    assert described["params"]["regions"] == "boxes" and set(described["models"]) == {"language_model", "detector"}
    assert default.segmenter is None and default.labeller is None


# -- masks labelled by CLIP -----------------------------------------------------------------------------------
def test_mask_labels_are_clips_argmax_and_weights_their_union_areas(masks_reward, segmenter, clip_model, bus):
    prompt = "a giraffe next to a lamp in a kitchen"
    (output,) = masks_reward.score([Sample(bus, prompt)])
    regions = segmenter([bus])[0]

    backbone = load_clip(clip_model, None, "cpu")
    candidates = list(dict.fromkeys(["giraffe", "lamp", "kitchen", *COCO_CLASSES]))
    text = backbone.text_embeddings([f"a photo of a {label}" for label in candidates])
    crops = backbone.image_embeddings([masked_crop(bus, region.mask, region.box) for region in regions])
    probabilities = (backbone.logit_scale * crops @ text.T).softmax(-1)
    labels = [candidates[index] for index in probabilities.argmax(-1).tolist()]
    masks: dict[str, list[np.ndarray]] = {}
    for region, label in zip(regions, labels, strict=True):
        masks.setdefault(label, []).append(region.mask)

    details = output.details
    entries = by_label(details["labels"])
    assert output.error is None and set(entries) == set(masks)
    assert details["masks"] == {"segmented": len(regions), "unlabelled": 0}
    total = sum(union(label_masks) for label_masks in masks.values())
    for label, label_masks in masks.items():
        entry = entries[label]
        assert entry["region"] == "mask" and entry["masks"] == len(label_masks)
        assert entry["area"] == union(label_masks) and entry["weight"] == pytest.approx(entry["area"] / total)
        if entry["source"] == "model":
            assert entry["likelihood"] == masks_reward.judge([masks_reward.question(label, prompt)])[0]
        else:
            assert label in ("giraffe", "lamp", "kitchen") and entry["likelihood"] == 1.0
        chosen = [float(p.max()) for p, name in zip(probabilities, labels, strict=True) if name == label]
        assert entry["label_confidence"] == pytest.approx(np.mean(chosen), abs=1e-5)
    # Overlapping masks of one label count once: the union, not the sum.
    assert any(entry["area"] < sum(int(m.sum()) for m in masks[label]) for label, entry in entries.items())
    expected = sum(entry["area"] * entry["likelihood"] for entry in entries.values()) / total
    assert output.value == pytest.approx(expected, abs=1e-12)


def test_labels_the_prompt_names_count_one_without_asking(masks_reward, bus):
    # "a dog" leaves CLIP's candidates the COCO classes; naming the largest label keeps the same candidates.
    (first,) = masks_reward.score([Sample(bus, "a dog")])
    largest = max(first.details["labels"], key=lambda entry: entry["area"])["label"]
    (named,) = masks_reward.score([Sample(bus, f"a {largest}")])
    entries = by_label(named.details["labels"])
    assert set(entries) == {entry["label"] for entry in first.details["labels"]}
    assert entries[largest]["likelihood"] == 1.0 and entries[largest]["source"] == "prompt"
    assert all(entry["source"] == "model" for label, entry in entries.items() if label != largest)
    assert named.value == pytest.approx(
        sum(entry["weight"] * entry["likelihood"] for entry in entries.values()), abs=1e-12
    )


def test_an_image_with_no_mask_above_the_threshold_has_no_value(masks_config, bus):
    reward = create_reward("plausibility", **{**masks_config, "mask_conf_threshold": 0.99})
    (output,) = reward.score([Sample(bus, "a cat in a kitchen")])
    assert output.value is None and output.code == "no_regions" and "segmented" in output.error
    assert output.details["labels"] == [] and output.details["masks"] == {"segmented": 0, "unlabelled": 0}


def test_a_chunk_runs_one_segmenter_pass_and_one_clip_image_call(masks_reward, bus, zidane, monkeypatch):
    network, backbone = masks_reward.segmenter.network, masks_reward.labeller.backbone
    calls = {"detect": 0, "image_embeddings": 0}

    def counted(name, original):
        def call(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        return call

    monkeypatch.setattr(network, "detect", counted("detect", network.detect))
    monkeypatch.setattr(backbone, "image_embeddings", counted("image_embeddings", backbone.image_embeddings))
    samples = [Sample(bus, "a bus on a street"), Sample(zidane, "two men in a room")]
    together = masks_reward.score(samples)
    assert calls == {"detect": 1, "image_embeddings": 1}
    for sample, batched in zip(samples, together, strict=True):
        (alone,) = masks_reward.score([sample])
        assert [(e["label"], e["area"], e["masks"]) for e in alone.details["labels"]] == [
            (e["label"], e["area"], e["masks"]) for e in batched.details["labels"]
        ]
        assert alone.value == pytest.approx(batched.value, abs=1e-6)


# -- masks labelled by the detector ---------------------------------------------------------------------------
def test_detector_labels_name_each_mask_after_its_best_iou_detection(language_model, fastsam_onnx, segmenter, bus):
    reward = create_reward(
        "plausibility",
        language_model=language_model,
        regions="masks",
        segmenter=str(fastsam_onnx),
        region_labels="detector",
        mask_conf_threshold=MASK_CONF,
        device="cpu",
    )
    assert isinstance(reward.labeller, DetectorRegionLabeller) and not reward.labeller.open_vocabulary
    named, output = reward.score([Sample(bus, "a bus on a street"), Sample(bus, "a cat in a kitchen")])
    regions = segmenter([bus])[0]

    detector = reward.detector  # the embedded YOLOv3-tiny
    no_slots = torch.full((1, 1), -1, dtype=torch.int64)
    match = kernel_ops.box_match(detector([bus]), no_slots, torch.zeros_like(no_slots), 0.25, 0.45, 100)
    kept = int(match.num_kept[0])
    boxes, classes = match.keep_boxes[0, :kept].double(), match.keep_classes[0, :kept].tolist()
    iou = torchvision.ops.box_iou(torch.tensor([region.box for region in regions], dtype=torch.float64), boxes)
    best, index = iou.max(1)
    masks: dict[str, list[np.ndarray]] = {}
    for region, overlap, position in zip(regions, best.tolist(), index.tolist(), strict=True):
        if overlap >= 0.5:
            masks.setdefault(detector.class_names[classes[position]], []).append(region.mask)
    unlabelled = int((best < 0.5).sum())

    entries = by_label(output.details["labels"])
    assert output.error is None and set(entries) == set(masks) and set(entries) <= set(detector.class_names)
    assert output.details["masks"] == {"segmented": len(regions), "unlabelled": unlabelled}
    assert 0 < unlabelled < len(regions)  # the fixture's masks: some meet a detection, some none
    total = sum(union(label_masks) for label_masks in masks.values())
    for label, entry in entries.items():
        assert entry["area"] == union(masks[label]) and entry["weight"] == pytest.approx(entry["area"] / total)
        assert entry["source"] == "model" and entry["region"] == "mask"
        assert entry["likelihood"] == reward.judge([reward.question(label, "a cat in a kitchen")])[0]
    expected = sum(entry["area"] * entry["likelihood"] for entry in entries.values()) / total
    assert output.value == pytest.approx(expected, abs=1e-12)
    # The detector classes the prompt names count 1.0; the same masks, areas and weights.
    named_entries = by_label(named.details["labels"])
    assert "bus" in entries and named_entries["bus"]["likelihood"] == 1.0 and named_entries["bus"]["source"] == "prompt"
    assert all(named_entries[label]["source"] == "model" for label in entries if label != "bus")
    assert {label: (e["area"], e["weight"]) for label, e in named_entries.items()} == {
        label: (e["area"], e["weight"]) for label, e in entries.items()
    }
    assert reward.version.endswith(f"+masks:{segmenter.version}+detector:{detector.version}")


# -- options and description ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, message",
    [
        ({"regions": "pixels"}, "regions must be one of boxes, masks"),
        ({"regions": "masks"}, "needs segmenter"),
        ({"regions": "masks", "segmenter": "SEG"}, "needs clip_model"),
        ({"regions": "masks", "segmenter": "SEG", "region_labels": "sam", "clip_model": "CLIP"}, "region_labels must"),
        ({"regions": "masks", "segmenter": "SEG", "region_labels": "detector", "clip_model": "CLIP"}, "clip_model app"),
        ({"segmenter": "SEG"}, "regions='masks' only"),
        ({"clip_model": "CLIP"}, "regions='masks' only"),
        ({"regions": "masks", "segmenter": "SEG", "clip_model": "CLIP", "mask_conf_threshold": 1.0}, "mask_conf"),
        ({"regions": "masks", "segmenter": "SEG", "clip_model": "CLIP", "max_masks": 0}, "max_masks"),
        ({"regions": "masks", "segmenter": "DETECTOR", "clip_model": "CLIP"}, "not an ultralytics segmentation"),
    ],
)
def test_bad_region_options_raise_value_error(options, message, language_model, fastsam_onnx, clip_model):
    paths = {"SEG": str(fastsam_onnx), "CLIP": clip_model}
    if options.get("segmenter") == "DETECTOR":
        from rewardscope.models.detection.export import embedded_detector_path

        paths["DETECTOR"] = str(embedded_detector_path())
    resolved = {key: paths.get(value, value) if isinstance(value, str) else value for key, value in options.items()}
    with pytest.raises(ValueError, match=message):
        create_reward("plausibility", language_model=language_model, device="cpu", **resolved)


def test_describe_and_version_name_the_segmenter_and_the_labeller(masks_reward, masks_config, segmenter):
    backbone = masks_reward.labeller.backbone
    assert (
        masks_reward.version == f"{masks_reward.judge.source.version}+masks:{segmenter.version}+clip:{backbone.version}"
    )
    assert segmenter.version == "fastsam-yolov8n-seg@random-init"
    described = Scorer(["plausibility"], config={"plausibility": masks_config}).describe()["plausibility"]
    params = described["params"]
    assert params["regions"] == "masks" and params["region_labels"] == "clip"
    assert (params["mask_conf_threshold"], params["mask_iou_threshold"], params["max_masks"]) == (MASK_CONF, 0.7, 32)
    assert set(described["models"]) == {"language_model", "segmenter", "region_labeller"}
    assert described["models"]["segmenter"]["version"] == segmenter.version
    assert described["models"]["region_labeller"]["clip"]["version"] == backbone.version
    assert described["precision"] == {"language_model": "fp32", "segmenter": "fp32", "clip": "fp32"}
    assert "mask-area" in described["scale"] and described["version"] == masks_reward.version
    assert masks_reward.detector is None  # CLIP names the masks: no detector is loaded


def test_the_geneval_colour_check_reads_the_segmenters_masks(fastsam_onnx, clip_model, segmenter, bus, monkeypatch):
    # GenEval pastes each object's mask over grey #999 and crops to its box (evaluate_images.py lines 81-106). A
    # detector without masks (the embedded YOLOv3-tiny) takes them from the segmenter: each kept box its best-IoU
    # region's mask, inside the box, or the whole box where no region reaches IoU 0.5.
    import rewardscope.models.clip as clip

    calls = []
    original = clip.masked_crop

    def spy(image, mask, box, background="#999"):
        calls.append((np.asarray(mask).copy(), list(box)))
        return original(image, mask, box, background)

    monkeypatch.setattr(clip, "masked_crop", spy)
    config = {
        "color_model": clip_model,
        "color_segmenter": str(fastsam_onnx),
        "color_mask_conf_threshold": MASK_CONF,
    }
    scorer = Scorer(["geneval"], config={"geneval": config})
    metadata = {"tag": "color_attr", "include": [{"class": "bus", "count": 1, "color": "red"}]}
    (result,) = scorer.score([bus], [""], [metadata])
    details = result.details["geneval"]
    assert result.error is None and details["colour_region"].startswith("segmenter mask")
    assert "+color_masks:" in result.details["geneval"]["version"]
    (mask, box), *_ = calls
    assert len(calls) == 1 and len(details["objects"][0]["predicted_colors"]) == 1
    expected, matched = masks_for_boxes(segmenter([bus])[0], torch.tensor([box]), bus.size)
    assert np.array_equal(mask, expected[0].numpy())
    assert bool(matched[0]) and mask.sum() < (box[2] - box[0]) * (box[3] - box[1])  # a real segment, not the box


def test_a_colour_segmenter_needs_a_colour_model(fastsam_onnx):
    with pytest.raises(ValueError, match="needs color_model"):
        create_reward("geneval", color_segmenter=str(fastsam_onnx))
