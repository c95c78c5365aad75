"""ZeroShotDetector: tiny random-init OWL-ViT, OWLv2, Grounding DINO and MM Grounding DINO saved like hub checkpoints
(tests/tiny_zero_shot.py), loaded through the real loader, checked on real photos against transformers' own
processor, model and post-processing; per-image query sets, the text cache, the ONNX image side and the
differentiable pixel path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rewardscope.models.detection.detector import Detector, DetectorConfig
from rewardscope.models.detection.zero_shot import (
    ZeroShotDetector,
    is_zero_shot_detector,
    load_zero_shot_detector,
)
from tiny_zero_shot import SAVERS

OWL_TYPES = ("owlvit", "owlv2")
GROUNDING_TYPES = ("grounding-dino", "mm-grounding-dino")
QUERIES = ("peach", "red bus", "person")  # "red bus": a query of two tokens


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models' ops are microseconds: on a shared 2-core machine a second intra-op thread only waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zero-shot")
    return {kind: saver(root / f"tiny-{kind}") for kind, saver in SAVERS.items()}


@pytest.fixture(scope="module")
def chelsea() -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.chelsea()).convert("RGB")


@pytest.fixture(scope="module")
def small_photos(bus, zidane, chelsea) -> list[Image.Image]:
    """Three real photos of three sizes, downscaled so that the many-call tests stay fast."""
    return [bus.reduce(4), zidane.reduce(4), chelsea.reduce(2)]


def clamped(boxes: torch.Tensor, image: Image.Image) -> torch.Tensor:
    return boxes.clamp(min=0).minimum(torch.tensor([image.width, image.height] * 2, dtype=boxes.dtype))


# --- transformers' own path, written out --------------------------------------------------------------------------


def owl_reference(directory: Path, image: Image.Image, texts: list[str]):
    """OWL: processor(text, images) -> model -> post_process_grounded_object_detection(threshold=0)."""
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    processor = AutoProcessor.from_pretrained(directory)
    model = AutoModelForZeroShotObjectDetection.from_pretrained(directory).eval()
    with torch.inference_mode():
        outputs = model(**processor(text=[texts], images=[image], return_tensors="pt"))
    (result,) = processor.post_process_grounded_object_detection(
        outputs, threshold=0, target_sizes=[(image.height, image.width)]
    )
    return outputs, result


def grounding_reference(directory: Path, image: Image.Image, phrases: list[str]):
    """Grounding DINO: processor(images, text=phrases) (it joins them "a. b.") -> model -> the processor's
    post_process_grounded_object_detection(threshold=0, text_threshold=0)."""
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    processor = AutoProcessor.from_pretrained(directory)
    model = AutoModelForZeroShotObjectDetection.from_pretrained(directory).eval()
    inputs = processor(images=[image], text=[phrases], return_tensors="pt")
    with torch.inference_mode():
        outputs = model(**inputs)
    (result,) = processor.post_process_grounded_object_detection(
        outputs, inputs["input_ids"], threshold=0, text_threshold=0, target_sizes=[(image.height, image.width)]
    )
    return inputs["input_ids"][0], outputs, result


def phrase_positions(input_ids: torch.Tensor) -> list[list[int]]:
    """Token positions of each phrase, as Grounding DINO delimits them (generate_masks_with_special_tokens_and_
    transfer_map: [CLS] 101, [SEP] 102, "." 1012 and "?" 1029 close a phrase)."""
    phrases, current = [], []
    for position, token in enumerate(input_ids.tolist()):
        if token in (101, 102, 1012, 1029):
            if current:
                phrases.append(current)
            current = []
        else:
            current.append(position)
    return phrases


# --- tests ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(SAVERS))
def test_candidates_equal_transformers_own_outputs_on_real_photos(kind, saved, bus, zidane, chelsea):
    detector = load_zero_shot_detector(str(saved[kind]), DetectorConfig())
    assert isinstance(detector, ZeroShotDetector) and isinstance(detector, Detector)
    assert detector.open_vocabulary and detector.class_names == () and detector.torch_twin() is None
    assert detector.version.startswith(f"{kind}:tiny-{kind}@") and len(detector.version.split("@")[1]) == 12
    assert detector.nms_iou == (0.3 if kind in OWL_TYPES else 1.0)

    images = [bus, zidane, chelsea]  # three sizes, portrait and landscape: OWLv2's square padding differs
    candidates, num_queries = detector.detect_queries(images, [QUERIES] * 3)
    assert candidates.dtype == torch.float32 and num_queries.tolist() == [3, 3, 3]
    assert candidates.shape == (3, detector.num_boxes, 4 + len(QUERIES))
    texts = [detector.query_text(name) for name in QUERIES]
    for row, image in enumerate(images):
        boxes, scores = candidates[row, :, :4], candidates[row, :, 4:]
        assert (boxes[:, 2:] >= boxes[:, :2]).all() and (scores >= 0).all() and (scores <= 1).all()
        if kind in OWL_TYPES:
            outputs, expected = owl_reference(saved[kind], image, texts)
            reference_boxes = clamped(expected["boxes"], image)
            torch.testing.assert_close(boxes, reference_boxes)
            # A box wholly outside the image (no area once clamped) is no detection: every query scores 0 there.
            inside = (reference_boxes[:, 2] > reference_boxes[:, 0]) & (reference_boxes[:, 3] > reference_boxes[:, 1])
            if kind == "owlv2" and image.width != image.height:  # patches of the padding predict such boxes
                assert not inside.all()
            # every (box, query), not just the best
            torch.testing.assert_close(scores, outputs.logits[0].sigmoid() * inside[:, None])
            # the processor keeps each box's best query: its score, label and box in image pixels
            top, label = scores.max(-1)
            torch.testing.assert_close(top[inside], expected["scores"][inside])
            assert torch.equal(label[inside], expected["labels"][inside])
        else:
            input_ids, outputs, expected = grounding_reference(saved[kind], image, texts)
            assert detector.query_tokens(tuple(texts)).input_ids[0].tolist() == input_ids.tolist()
            positions = phrase_positions(input_ids)
            assert [len(p) for p in positions] == [1, 2, 1]  # "red bus" is two tokens, and both count
            probabilities = outputs.logits[0].sigmoid()
            reference_boxes = clamped(expected["boxes"], image)
            torch.testing.assert_close(boxes, reference_boxes)
            inside = (reference_boxes[:, 2] > reference_boxes[:, 0]) & (reference_boxes[:, 3] > reference_boxes[:, 1])
            per_query = torch.stack([probabilities[:, p].amax(-1) for p in positions], -1)
            torch.testing.assert_close(scores, per_query * inside[:, None])
            # the processor's score is the max over all token positions ([CLS], "." and [SEP] too): never lower
            assert (expected["scores"] >= scores.amax(-1) - 1e-6).all()
            best_token = probabilities.argmax(-1)
            # where a box's best token is one of a query's, the processor's score is that query's score
            for box, token in enumerate(best_token.tolist()):
                for query, tokens in enumerate(positions):
                    if token in tokens and inside[box]:
                        torch.testing.assert_close(scores[box, query], expected["scores"][box])


@pytest.mark.parametrize("kind", sorted(SAVERS))
def test_each_image_has_its_own_queries_and_its_batch_changes_nothing(kind, saved, small_photos):
    detector = ZeroShotDetector(saved[kind], batch_size=2)  # 4 images: chunks of 2, mixed query sets in each
    images = [*small_photos, small_photos[0]]
    query_sets = [("peach", "candle", "dog"), ("person",), (), ("candle", "peach")]
    together, num_queries = detector.detect_queries(images, query_sets)
    assert num_queries.tolist() == [3, 1, 0, 2] and together.shape == (4, detector.num_boxes, 4 + 3)
    for row, (image, names) in enumerate(zip(images, query_sets, strict=True)):
        alone, count = detector.detect_queries([image], [names])
        assert count.tolist() == [len(names)] and alone.shape[-1] == 4 + len(names)
        if names or kind in OWL_TYPES:
            torch.testing.assert_close(together[row, :, : 4 + len(names)], alone[0], atol=1e-5, rtol=1e-5)
        assert (together[row, :, 4 + len(names) :] == 0).all()  # padded columns
    if kind in OWL_TYPES:  # a query's score depends on that query alone: another order reorders the columns
        torch.testing.assert_close(together[3, :, 4:6], together[0, :, [5, 4]], atol=1e-5, rtol=1e-5)
    else:  # Grounding DINO fuses the whole text with the image, and does not run an image with no queries
        assert not together[2].any()
    empty, none = detector.detect_queries([], [])
    assert empty.shape == (0, detector.num_boxes, 4) and none.tolist() == []
    with pytest.raises(ValueError, match="one sequence of names per image"):
        detector.detect_queries(images, query_sets[:2])
    with pytest.raises(ValueError, match="not the string"):
        detector.detect_queries(images[:1], ["peach"])


@pytest.mark.parametrize("kind", OWL_TYPES)
def test_the_text_tower_runs_once_per_new_query_text(kind, saved, small_photos):
    detector = ZeroShotDetector(saved[kind])
    batches: list[int] = []  # rows per text-tower forward
    text_model = getattr(detector.model, detector.model.base_model_prefix).text_model  # OwlViTModel.text_model
    text_model.register_forward_hook(
        lambda module, args, kwargs, output: batches.append(len(kwargs["input_ids"])), with_kwargs=True
    )

    first, _ = detector.detect_queries(small_photos[:2], [("peach", "candle"), ("candle", "dog")])
    assert batches == [3]  # the three distinct texts, in one batch
    second, _ = detector.detect_queries(small_photos[:2], [("peach", "candle"), ("candle", "dog")])
    assert batches == [3]  # all cached: no text-tower call
    torch.testing.assert_close(second, first)
    described = detector.describe()["text_cache"]
    assert described["holds"] == "text embeddings" and described["entries"] == 3
    assert (described["hits"], described["misses"]) == (3, 3)
    detector.detect_queries(small_photos[:1], [("peach", "horse")])
    assert batches == [3, 1]  # only "a photo of a horse"


@pytest.mark.parametrize("kind", sorted(SAVERS))
def test_the_text_cache_is_bounded_and_changes_no_score(kind, saved, small_photos):
    bounded = ZeroShotDetector(saved[kind], text_cache_size=2)
    uncached = ZeroShotDetector(saved[kind], text_cache_size=0)
    rounds = [[("peach",), ("dog", "cat")], [("bus", "tie"), ("peach",)], [("dog", "cat"), ("horse",)]]
    for query_sets in rounds:
        got, _ = bounded.detect_queries(small_photos[:2], query_sets)
        want, _ = uncached.detect_queries(small_photos[:2], query_sets)
        torch.testing.assert_close(got, want)
        assert len(bounded.text_cache) <= 2 and len(uncached.text_cache) == 0
    described = bounded.describe()
    if kind in OWL_TYPES:
        assert described["text_cache"]["holds"] == "text embeddings"
        assert bounded.text_cache.keys() == ["a photo of a cat", "a photo of a horse"]  # least recent out
    else:
        assert described["text_cache"]["holds"] == "tokenization only"
        assert "fused" in described["text_cache"]["not_cached"]
        assert bounded.text_cache.keys() == [("dog", "cat"), ("horse",)]
    assert described["text_cache"]["capacity"] == 2 and uncached.describe()["text_cache"]["hits"] == 0


@pytest.mark.parametrize("kind", OWL_TYPES)
def test_the_onnx_image_side_gives_the_torch_candidates(kind, saved, tmp_path, small_photos):
    """export_image_encoder writes the image side at the processor's fixed size with a dynamic batch; loaded back,
    onnxruntime runs it and the same torch code combines its outputs with the text embeddings."""
    torch_side = ZeroShotDetector(saved[kind], batch_size=2)
    path = torch_side.export_image_encoder(tmp_path / f"{kind}-image.onnx")
    metadata = json.loads(path.with_suffix(".json").read_text())
    assert metadata["model_version"] == torch_side.source.version and metadata["input_size"] == "[96, 96]"
    onnx_side = ZeroShotDetector(saved[kind], batch_size=2, onnx_image_encoder=str(path))
    assert onnx_side.version == torch_side.version + "+onnx"
    assert onnx_side.describe()["image_runtime"] == "onnx" and torch_side.describe()["image_runtime"] == "torch"

    query_sets = [("peach", "candle"), ("person",), ("dog", "cat", "tie")]  # 3 images: chunks of 2 and 1
    expected, _ = torch_side.detect_queries(small_photos, query_sets)
    got, _ = onnx_side.detect_queries(small_photos, query_sets)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    other = "owlv2" if kind == "owlvit" else "owlvit"  # an export of another model is refused
    with pytest.raises(ValueError, match="exported from"):
        ZeroShotDetector(saved[other], onnx_image_encoder=str(path))


@pytest.mark.parametrize("kind", GROUNDING_TYPES)
def test_grounding_dino_has_no_image_side_to_export(kind, saved, tmp_path):
    detector = ZeroShotDetector(saved[kind])
    with pytest.raises(NotImplementedError, match="fused"):
        detector.export_image_encoder(tmp_path / "image.onnx")
    with pytest.raises(ValueError, match="OWL"):
        ZeroShotDetector(saved[kind], onnx_image_encoder=str(tmp_path / "image.onnx"))


def decoded(photos: list[Image.Image]) -> torch.Tensor:
    """RGB photos of one size -> float pixels [B, 3, H, W] in [0, 1], as a training loop would hand them over."""
    return torch.from_numpy(np.stack([np.asarray(photo) for photo in photos])).permute(0, 3, 1, 2).float() / 255


# A photo already at the processor's input size (OWL-ViT: a 96 x 96 square; Grounding DINO: shortest edge 64,
# longest <= 96): no resize rounds it, so detect_pixels must give detect_queries' candidates up to float noise.
AT_INPUT_SIZE = {"owlvit": (96, 96), "owlv2": (96, 72), "grounding-dino": (96, 64), "mm-grounding-dino": (64, 96)}


@pytest.mark.parametrize("kind", sorted(SAVERS))
def test_detect_pixels_gives_detect_queries_candidates_and_gradients(kind, saved, chelsea):
    detector = ZeroShotDetector(saved[kind])
    photo = chelsea.resize(AT_INPUT_SIZE[kind], Image.BILINEAR)
    photos = [photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]  # one size, as detect_pixels needs
    query_sets = [("peach", "red bus"), ("person",)]
    expected, expected_counts = detector.detect_queries(photos, query_sets)

    pixels = decoded(photos).requires_grad_(True)
    candidates, counts = detector.detect_pixels(pixels, query_sets)
    assert candidates.requires_grad and torch.equal(counts, expected_counts)
    torch.testing.assert_close(candidates.detach(), expected, atol=1e-4, rtol=1e-4)

    (candidates[..., 4:].sum() + candidates[..., :4].sum() / 1000).backward()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in detector.model.parameters())  # the model stays frozen


@pytest.mark.parametrize("kind", sorted(SAVERS))
def test_detect_pixels_preprocesses_as_the_processor_does(kind, saved, chelsea, zidane):
    """Real photos at their own sizes. OWLv2's processor works in float throughout (rescale, pad to a square, blur,
    resize): the same torch ops, equal up to float noise. OWL-ViT and Grounding DINO resize uint8 images with torch's
    fixed-point antialiased kernels and round: their pixel values and ours differ by less than one grey level. That
    moves the tiny OWL-ViT's scores by < 1.5e-2 and its boxes by about a pixel (measured; tolerances 3e-2 and 2 px).
    Grounding DINO's candidates are not compared at full size: its two-stage query selection takes the top-N
    encoder proposals, and the random model's near-tied proposals swap places under a grey level of change."""
    detector = ZeroShotDetector(saved[kind])
    for photo in (chelsea, zidane.reduce(2)):  # zidane halved: OWLv2's blur of the full photo takes seconds
        photos = [photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
        pixels = decoded(photos)
        processed = detector.image_processor(images=photos, return_tensors="pt")["pixel_values"]
        ours = detector.preprocess_pixels(pixels)
        std = torch.tensor(detector.image_processor.image_std)[None, :, None, None]
        grey_levels = float(((ours - processed).abs() * std * 255).max())
        assert ours.shape == processed.shape and grey_levels < (1e-3 if kind == "owlv2" else 1.0)
        if kind in OWL_TYPES:
            query_sets = [("peach", "red bus"), ("person",)]
            expected, _ = detector.detect_queries(photos, query_sets)
            candidates, _ = detector.detect_pixels(pixels, query_sets)
            score_tolerance, box_tolerance = (1e-4, 1e-3) if kind == "owlv2" else (3e-2, 2.0)
            torch.testing.assert_close(candidates[..., 4:], expected[..., 4:], atol=score_tolerance, rtol=0)
            torch.testing.assert_close(candidates[..., :4], expected[..., :4], atol=box_tolerance, rtol=0)


def test_open_vocabulary_detectors_need_queries(saved, bus):
    detector = ZeroShotDetector(saved["owlv2"])
    with pytest.raises(TypeError, match="detect_queries"):
        detector([bus])


@pytest.mark.parametrize(
    ("kind", "template", "name", "text"),
    [
        ("owlvit", None, "peach", "a photo of a peach"),
        ("owlv2", "an image of {}", "two cats", "an image of two cats"),
        ("grounding-dino", None, "Peach", "peach"),  # lower-cased, as the processor joins its phrases
        ("grounding-dino", "a {}.", "red bus", "a red bus"),  # "." ends a phrase in the model: never inside one
        ("mm-grounding-dino", None, " fire  hydrant ", "fire hydrant"),
    ],
)
def test_query_text_applies_the_familys_template(kind, template, name, text, saved):
    detector = ZeroShotDetector(saved[kind], query_template=template)
    assert detector.query_text(name) == text
    assert detector.describe()["query_template"] == (template or ("{}" if "grounding" in kind else "a photo of a {}"))


def test_a_template_without_a_place_for_the_name_is_refused(saved):
    with pytest.raises(ValueError, match="query_template"):
        ZeroShotDetector(saved["owlvit"], query_template="a photo")


def test_zero_shot_models_are_recognised_and_others_are_not(saved, tmp_path, monkeypatch, embedded_onnx):
    for directory in saved.values():
        assert is_zero_shot_detector(directory) and is_zero_shot_detector(str(directory))
    assert not is_zero_shot_detector(embedded_onnx)
    yolos = tmp_path / "yolos"
    yolos.mkdir()
    (yolos / "config.json").write_text(json.dumps({"model_type": "yolos"}))
    assert not is_zero_shot_detector(yolos)
    assert not is_zero_shot_detector(tmp_path)  # a directory without config.json
    assert not is_zero_shot_detector("someone/not-in-the-cache")

    # a hub id whose snapshot is in the local cache (offline) is recognised and loads, named by the hub id
    from huggingface_hub import constants

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--tiny--owlv2"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in saved["owlv2"].iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert is_zero_shot_detector("tiny/owlv2")
    detector = load_zero_shot_detector("tiny/owlv2", DetectorConfig(batch_size=3))
    assert detector.batch_size == 3 and detector.version.startswith("owlv2:tiny/owlv2@")


def test_loaded_detectors_are_shared_per_model_config_and_options(saved):
    directory = str(saved["owlvit"])
    shared = load_zero_shot_detector(directory, DetectorConfig(batch_size=4))
    assert load_zero_shot_detector(directory, DetectorConfig(batch_size=4)) is shared
    assert load_zero_shot_detector(directory, DetectorConfig(batch_size=2)) is not shared
    templated = load_zero_shot_detector(directory, DetectorConfig(batch_size=4), query_template="{}")
    assert templated is not shared and templated.query_text("dog") == "dog"
    with pytest.raises(ValueError, match="quantized"):
        load_zero_shot_detector(directory, DetectorConfig(), quantized=True)
