"""HFDetector: tiny random-init YOLOS, DETR and RT-DETR models saved like hub checkpoints, loaded through
load_detector and the Scorer, checked on real photos against transformers' own post-processing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from rewardscope.models.detection.detector import Detector, DetectorConfig
from rewardscope.models.detection.hf_detector import HFDetector, class_names_from_labels, is_transformers_detector
from rewardscope.models.detection.matching import load_detector
from rewardscope.models.prompt import parse_prompt

from rewardscope import Scorer

# COCO-like: a placeholder id between real classes, as COCO DETR/YOLOS configs have "N/A" at unused ids.
ID2LABEL = {0: "person", 1: "dog", 2: "N/A", 3: "cat"}
NAMES = ("person", "dog", "∅", "cat")
SOFTMAX = {"yolos": True, "detr": True, "rt_detr": False}
QUERIES = {"yolos": 5, "detr": 6, "rt_detr": 7}


# --- tiny models, saved like tests/tiny_models.py saves its own -------------------------------------------------


def _save(directory: Path, model_class, config, processor, seed: int, spread: tuple[str, ...] = ()) -> Path:
    """Seeds torch, builds `model_class(config)` in eval mode, draws the parameters named in `spread` (left at zero
    by the model's init) from N(0, 0.5), and saves the model with its image processor."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name in spread:
            model.get_parameter(name).normal_(std=0.5)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def save_tiny_yolos(directory: Path, seed: int = 0) -> Path:
    """YOLOS (ViT with detection tokens; softmax head with a no-object logit), 1 layer, hidden 32, 5 queries."""
    from transformers import YolosConfig, YolosForObjectDetection, YolosImageProcessor

    config = YolosConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=[64, 96],
        patch_size=16,
        num_detection_tokens=QUERIES["yolos"],
        id2label=ID2LABEL,
        initializer_range=0.2,
    )
    processor = YolosImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    # the detection tokens and position embeddings start at zero: every query would predict the same box
    spread = ("vit.embeddings.detection_tokens", "vit.embeddings.position_embeddings", "vit.embeddings.cls_token")
    return _save(directory, YolosForObjectDetection, config, processor, seed, spread)


def save_tiny_detr(directory: Path, seed: int = 0) -> Path:
    """DETR on a tiny transformers ResNet (no timm, nothing pretrained): softmax head with a no-object logit."""
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

    backbone = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], out_features=["stage4"]
    )
    config = DetrConfig(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone_config=backbone,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=QUERIES["detr"],
        id2label=ID2LABEL,
        init_std=0.2,
    )
    processor = DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    return _save(directory, DetrForObjectDetection, config, processor, seed)


def save_tiny_rt_detr(directory: Path, seed: int = 0) -> Path:
    """RT-DETR (focal loss: one sigmoid per class, no no-object logit) on a tiny RT-DETR ResNet, 1 decoder layer."""
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrImageProcessor, RTDetrResNetConfig

    backbone = RTDetrResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], out_features=["stage2", "stage3", "stage4"]
    )
    config = RTDetrConfig(
        backbone_config=backbone,
        use_pretrained_backbone=False,
        encoder_in_channels=[16, 32, 64],
        encoder_hidden_dim=32,
        encoder_ffn_dim=64,
        encoder_attention_heads=2,
        d_model=32,
        decoder_in_channels=[32, 32, 32],
        decoder_ffn_dim=64,
        decoder_attention_heads=2,
        decoder_layers=1,
        num_queries=QUERIES["rt_detr"],
        num_denoising=0,
        id2label=ID2LABEL,
        initializer_range=0.2,
    )
    processor = RTDetrImageProcessor(size={"height": 64, "width": 64})
    return _save(directory, RTDetrForObjectDetection, config, processor, seed)


SAVERS = {"yolos": save_tiny_yolos, "detr": save_tiny_detr, "rt_detr": save_tiny_rt_detr}


@pytest.fixture(scope="module", params=sorted(SAVERS))
def tiny(request, tmp_path_factory) -> tuple[str, Path]:
    kind = request.param
    return kind, SAVERS[kind](tmp_path_factory.mktemp(kind) / f"tiny-{kind}")


def reference(directory: Path, image: Image.Image) -> dict[str, torch.Tensor]:
    """transformers' own path for one image: processor, model, post_process_object_detection(threshold=0)."""
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    processor = AutoImageProcessor.from_pretrained(directory)
    model = AutoModelForObjectDetection.from_pretrained(directory).eval()
    with torch.inference_mode():
        outputs = model(**processor(images=[image], return_tensors="pt"))
    (result,) = processor.post_process_object_detection(
        outputs, threshold=0, target_sizes=[(image.height, image.width)]
    )
    return result


# --- tests -------------------------------------------------------------------------------------------------------


def test_candidates_match_the_processors_own_post_processing(tiny, bus, zidane):
    kind, directory = tiny
    detector = load_detector(str(directory), DetectorConfig())
    assert isinstance(detector, HFDetector) and isinstance(detector, Detector)
    assert detector.class_names == NAMES and detector.placeholder_columns == (2,)
    assert detector.nms_iou == 1.0 and detector.torch_twin() is None
    assert detector.version.startswith(f"{kind}:tiny-{kind}@") and len(detector.version.split("@")[1]) == 12

    images = [bus, zidane]  # different sizes: each image's own pixels and its own processed shape
    candidates = detector(images)
    assert candidates.shape == (2, QUERIES[kind], 4 + len(NAMES)) and candidates.dtype == torch.float32
    for row, image in enumerate(images):
        boxes, scores = candidates[row, :, :4], candidates[row, :, 4:]
        # boxes clamped to the image; x0 <= x1, y0 <= y1
        assert (
            (boxes >= 0).all() and (boxes[:, [0, 2]] <= image.width).all() and (boxes[:, [1, 3]] <= image.height).all()
        )
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
        assert (scores >= 0).all() and (scores <= 1).all()
        if SOFTMAX[kind]:  # the no-object probability is what is missing from 1
            assert (scores.sum(-1) <= 1 + 1e-6).all() and (scores.sum(-1) < 1 - 1e-4).all()

        expected = reference(directory, image)
        limits = torch.tensor([image.width, image.height] * 2, dtype=torch.float32)
        expected_boxes = expected["boxes"].clamp(min=0).minimum(limits)
        if SOFTMAX[kind]:  # one result per query, in query order: top score and its label
            top, label = scores.max(-1)
            torch.testing.assert_close(top, expected["scores"])
            assert torch.equal(label, expected["labels"])
            torch.testing.assert_close(boxes, expected_boxes)
        else:  # RT-DETR: the top N (query, class) pairs of the sigmoid scores, each with its query's box
            assert len(expected["scores"]) == QUERIES[kind]
            for score, label, box in zip(expected["scores"], expected["labels"], expected_boxes, strict=True):
                query = int(torch.argmin((scores[:, label] - score).abs()))
                torch.testing.assert_close(scores[query, label], score)
                torch.testing.assert_close(boxes[query], box)
            torch.testing.assert_close(scores.flatten().topk(QUERIES[kind]).values, expected["scores"])


def test_an_images_candidates_do_not_depend_on_its_batch(tiny, bus, zidane):
    _, directory = tiny
    detector = HFDetector(directory, batch_size=2)
    alone = torch.cat([detector([image]) for image in (bus, zidane, bus)])
    together = detector([bus, zidane, bus])  # bus twice: one chunk of 2 for the shared shape
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)
    assert detector([]).shape == (0, QUERIES[tiny[0]], 4 + len(NAMES))


def test_the_scorer_runs_matching_on_an_hf_detector(tiny, bus_path):
    kind, directory = tiny
    scorer = Scorer(["matching"], config={"matching": {"detector": str(directory)}})
    reward = scorer.rewards["matching"]
    assert isinstance(reward.detector, HFDetector) and reward.detector is load_detector(
        str(directory), DetectorConfig()
    )
    (result,) = scorer.score([bus_path], ["two people and a dog"])
    assert result.error is None, result.error
    assert 0 <= result.rewards["matching"] <= 1
    details = result.details["matching"]
    assert details["detector"]["version"] == reward.detector.version
    assert {detection["class"] for detection in details["detections"]} <= set(NAMES)
    described = scorer.describe()["matching"]["detector"]
    assert described["nms"] == "none (set prediction)" and described["num_classes"] == len(NAMES)
    assert described["num_queries"] == QUERIES[kind] and described["model_type"] == kind
    assert described["input_size"] == ([64, 64] if kind == "rt_detr" else {"shortest_edge": 64, "longest_edge": 96})
    # with no IoU threshold of its own, the reward takes the detector's: none for a set-prediction model
    unsuppressed = Scorer(["matching"], config={"matching": {"detector": str(directory), "iou_threshold": None}})
    assert unsuppressed.rewards["matching"].iou_threshold == 1.0


def test_placeholder_classes_are_unique_and_no_prompt_names_them():
    coco_like = {0: "N/A", 1: "Person", 2: "N/A", 3: "dining table", 5: "n/a"}
    names, placeholders = class_names_from_labels(coco_like, 6)
    assert names == ("∅", "person", "∅∅", "dining table", "∅∅∅", "∅∅∅∅") and placeholders == (0, 2, 4, 5)
    for prompt in ("n/a", "N/A and a person", "∅ ∅∅ 2 unused 4", "a dining table and 12 people"):
        parsed = parse_prompt(prompt, names)
        assert {spec.class_name for spec in parsed.objects} <= {"person", "dining table"}


def test_transformers_models_route_to_hf_and_onnx_files_do_not(tmp_path, monkeypatch, embedded_onnx):
    directory = save_tiny_yolos(tmp_path / "tiny-yolos")
    assert is_transformers_detector(directory) and not is_transformers_detector(embedded_onnx)
    assert not is_transformers_detector(tmp_path)  # a directory without config.json
    assert not is_transformers_detector("someone/not-in-the-cache")
    assert type(load_detector(str(embedded_onnx), DetectorConfig())).__name__ == "OnnxDetector"
    with pytest.raises(ValueError, match="quantized"):
        load_detector(str(directory), DetectorConfig(), quantized=True)

    # a hub id whose snapshot is in the local cache (offline) loads like the directory, named by the hub id
    from huggingface_hub import constants

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--tiny--yolos"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in directory.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert is_transformers_detector("tiny/yolos")
    detector = load_detector("tiny/yolos", DetectorConfig(batch_size=3))
    assert isinstance(detector, HFDetector) and detector.batch_size == 3
    assert detector.version.startswith("yolos:tiny/yolos@")
    assert detector.version.split("@")[1] == HFDetector(directory).version.split("@")[1]  # same weights, same hash


def test_a_yolos_model_exports_to_onnx_with_the_same_candidates(tmp_path, bus):
    """torch.onnx (the torch.export-based exporter) at the processor's input shape for this photo: onnxruntime's raw
    outputs, decoded by HFDetector.decode, equal the torch candidates. The graph is exported at one fixed shape
    (YOLOS interpolates its position embeddings to the input size); OnnxDetector does not load it (it runs YOLO
    letterbox models), so this is a parity check of the export, not a serving path."""
    import onnxruntime as ort

    detector = HFDetector(save_tiny_yolos(tmp_path / "tiny-yolos"))

    class RawOutputs(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            outputs = self.model(pixel_values=pixel_values)
            return outputs.logits, outputs.pred_boxes

    pixels = detector.processor(images=[bus], return_tensors="pt")["pixel_values"]
    path = tmp_path / "tiny-yolos.onnx"
    torch.onnx.export(RawOutputs(detector.model).eval(), (pixels,), str(path), dynamo=True, opset_version=18)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, pred_boxes = (
        torch.from_numpy(array) for array in session.run(None, {session.get_inputs()[0].name: pixels.numpy()})
    )
    decoded = detector.decode(logits, pred_boxes, torch.tensor([bus.size], dtype=torch.float32))
    torch.testing.assert_close(decoded, detector([bus]), atol=1e-3, rtol=1e-4)


def test_the_seed_reference_profile_runs_the_seed_codes_detector_family_without_nms(tmp_path, bus_path):
    # The seed code runs YOLOS at confidence 0.9 with no NMS (CQScore/F1Score.py lines 56-71): through the profile,
    # a YOLOS directory gets exactly that, and the unseen noun "balcony" joins the denominators.
    directory = save_tiny_yolos(tmp_path / "yolos")
    scorer = Scorer(["matching"], profile="seed-reference", config={"matching": {"detector": str(directory)}})
    (result,) = scorer.score([bus_path], ["two people and a balcony"])
    details = result.details["matching"]
    assert details["thresholds"]["confidence"] == 0.9 and details["thresholds"]["iou"] == 1.0
    assert details["unseen_in_denominator"] == 1 and result.error is None
