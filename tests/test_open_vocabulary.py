"""Open-vocabulary matching: a zero-shot detector (tiny random-init OWLv2 / Grounding DINO saved with
save_pretrained) asked each prompt's nouns as text queries, through the Scorer, the CLI's folder scoring, HTTP and
/grad. The values are recomputed here from the detector's own candidates and the seed paper's rule."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from rewardscope.kernels import reference
from rewardscope.models.detection.matching import MAX_OPEN_QUERIES
from rewardscope.models.gradients import gradient_reward, reward_gradients
from rewardscope.service.tools import folders
from rewardscope.service.tools.cli import main
from serving import running_server
from tiny_zero_shot import SAVERS, save_tiny_owlv2

from rewardscope import Scorer

PROMPT = "three peaches and a candle"
# Low enough that the tiny random model keeps detections of both queries (its scores spread over about 0.005-0.99).
OPTIONS = {"conf_threshold": 0.05}


@pytest.fixture(scope="module")
def owlv2_dir(tmp_path_factory) -> Path:
    return save_tiny_owlv2(tmp_path_factory.mktemp("open-vocab") / "tiny-owlv2")


@pytest.fixture(scope="module")
def owlv2_scorer(owlv2_dir) -> Scorer:
    return Scorer(["matching"], config={"matching": {"detector": str(owlv2_dir), **OPTIONS}})


def seed_rule(counts: list[int], means: list[float], requested: list[int]) -> float:
    """The seed paper's matching score, written out: q = min(d, n) / max(d, n) (0 when d = 0), C and Q the means of
    the per-object confidences and q, score = 2CQ / (C + Q) (0 when both are 0)."""
    quantity = [min(d, n) / max(d, n) if d else 0.0 for d, n in zip(counts, requested, strict=True)]
    category_mean, quantity_mean = sum(means) / len(means), sum(quantity) / len(quantity)
    total = category_mean + quantity_mean
    return 2 * category_mean * quantity_mean / total if total else 0.0


def test_each_noun_is_one_query_and_the_score_follows_the_seed_rule(owlv2_scorer, bus):
    (result,) = owlv2_scorer.score([bus], [PROMPT])
    assert result.error is None, result.error
    details = result.details["matching"]
    reward = owlv2_scorer.rewards["matching"]
    assert [query["class"] for query in details["queries"]] == ["peach", "candle"]
    assert [query["query"] for query in details["queries"]] == [
        reward.detector.query_text("peach"),
        reward.detector.query_text("candle"),
    ]
    assert [(o["class"], o["requested"]) for o in details["objects"]] == [("peach", 3), ("candle", 1)]
    assert details["unknown"] == []
    # Recomputed from the detector's own candidates for these two queries and the reference kernel.
    candidates, num_queries = reward.detector.detect_queries([bus], [("peach", "candle")])
    assert num_queries.tolist() == [2] and candidates.shape[-1] == 4 + 2
    match = reference.box_match(
        candidates, torch.tensor([[0, 1]]), torch.tensor([[3, 1]]), 0.05, reward.iou_threshold, 100
    )
    counts, means = match.counts[0].tolist(), match.confidence_mean[0].tolist()
    assert [o["detected"] for o in details["objects"]] == counts
    assert sum(counts) > 0  # the test means something only if the tiny model detects at this threshold
    assert result.rewards["matching"] == pytest.approx(seed_rule(counts, means, [3, 1]), abs=1e-6)
    # Each query's detections are listed under it, and together they are the item's detections.
    listed = sorted((query["class"], d["score"]) for query in details["queries"] for d in query["detections"])
    assert listed == sorted((d["class"], d["score"]) for d in details["detections"])
    assert [len(query["detections"]) for query in details["queries"]] == counts


def test_the_coco_default_reports_both_nouns_unseen(bus):
    (result,) = Scorer(["matching"]).score([bus], [PROMPT])
    assert result.rewards["matching"] is None and result.total is None
    assert result.error_code == "no_countable_object"
    assert "peach, candle" in result.error


def test_items_with_different_query_sets_batch_as_they_score_alone(owlv2_scorer, bus, zidane):
    prompts = [PROMPT, "two dogs and a lamp on a table", "a lantern"]
    images = [bus, zidane, bus]
    together = owlv2_scorer.score(images, prompts)
    for image, prompt, batched in zip(images, prompts, together, strict=True):
        (alone,) = owlv2_scorer.score([image], [prompt])
        assert batched.rewards == pytest.approx(alone.rewards)
        assert batched.details["matching"]["detections"] == alone.details["matching"]["detections"]
    assert [q["class"] for q in together[1].details["matching"]["queries"]] == ["dog", "lamp", "dining table"]


def test_every_variant_runs_on_open_queries(owlv2_dir, bus):
    config = {name: {"detector": str(owlv2_dir), **OPTIONS} for name in ("numeracy", "matching_soft", "geneval")}
    scorer = Scorer(["numeracy", "matching_soft", "geneval"], config=config)
    (result,) = scorer.score([bus], [PROMPT])
    assert result.error is None, result.error
    numeracy = result.details["numeracy"]["objects"]
    expected = np.mean([0.5 * (o["detected"] > 0) + 0.5 * (o["detected"] == o["requested"]) for o in numeracy])
    assert result.rewards["numeracy"] == pytest.approx(expected)
    assert 0.0 <= result.rewards["matching_soft"] <= 1.0 and result.rewards["geneval"] in (0.0, 1.0)


def test_too_many_nouns_fail_the_item_alone(owlv2_scorer, bus):
    nouns = [f"{word}s" for word in ("lamp", "candle", "peach", "lantern", "kettle", "vase", "drum", "flag")]
    many = ", ".join(f"two {prefix}{noun}" for prefix in ("", "re", "un", "pre", "sub") for noun in nouns)
    results = owlv2_scorer.score([bus, bus], [many, PROMPT])
    objects = {spec for spec in many.split(", ")}
    assert len(objects) > MAX_OPEN_QUERIES
    assert results[0].error_code == "too_many_queries" and results[0].rewards["matching"] is None
    assert results[1].error is None


def test_rewards_reports_an_open_vocabulary(owlv2_scorer):
    described = owlv2_scorer.describe()["matching"]
    assert described["vocabulary"] == "open"
    assert described["detector"]["vocabulary"] == "open"
    assert list(Scorer(["matching"]).describe()["matching"]["vocabulary"])[:2] == ["person", "bicycle"]


@pytest.mark.parametrize("kind", ["owlvit", "grounding-dino", "mm-grounding-dino"])
def test_every_zero_shot_family_scores_the_same_prompt(kind, tmp_path, bus):
    directory = SAVERS[kind](tmp_path / f"tiny-{kind}")
    # conf 0: every box with a positive score counts, so each tiny random model has detections to score
    scorer = Scorer(["matching"], config={"matching": {"detector": str(directory), "conf_threshold": 0.0}})
    (result,) = scorer.score([bus], [PROMPT])
    assert result.error is None, result.error
    details = result.details["matching"]
    assert details["detector"]["version"].startswith(f"{kind}:")
    assert [query["class"] for query in details["queries"]] == ["peach", "candle"]
    counts = [o["detected"] for o in details["objects"]]
    means = [o["category_confidence"] for o in details["objects"]]
    assert sum(counts) > 0
    assert result.rewards["matching"] == pytest.approx(seed_rule(counts, means, [3, 1]), abs=1e-6)


def test_the_open_vocabulary_gradient_matches_finite_differences(owlv2_scorer, bus):
    reward = gradient_reward("matching", owlv2_scorer.rewards["matching"])
    pixels = torch.from_numpy(np.asarray(bus.resize((96, 64)), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    # At the selection floor the tiny model's expected count is about 9 per query: P(count = 9) is far from 0, so the
    # soft score and its gradient are too (for "three peaches" both are about 1e-3).
    prompt = "nine peaches and nine candles"
    result = reward_gradients({"matching": reward}, {"matching": 1.0}, torch.cat([pixels, pixels]), [prompt, "a photo"])
    assert torch.isfinite(result.rewards["matching"][0]) and torch.isnan(result.rewards["matching"][1])
    assert result.errors[1][0] == "no_countable_object" and result.grad[1].abs().sum() == 0
    grad = result.grad[0]
    assert torch.isfinite(grad).all() and grad.norm() > 0
    # The directional derivative along the gradient is its norm: central differences agree.
    direction, step = grad / grad.norm(), 1e-3

    def value(image: torch.Tensor) -> float:
        return float(reward_gradients({"matching": reward}, {"matching": 1.0}, image, [prompt]).rewards["matching"][0])

    slope = (value(pixels + step * direction[None]) - value(pixels - step * direction[None])) / (2 * step)
    assert slope == pytest.approx(float(grad.norm()), rel=1e-2)


def test_the_folder_cli_scores_open_nouns(owlv2_dir, tmp_path, bus_path, monkeypatch):
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(bus_path, flat / f"{PROMPT}.jpg")
    monkeypatch.setenv("REWARDSCOPE_DETECTOR", str(owlv2_dir))
    monkeypatch.setenv("REWARDSCOPE_CONFIG", json.dumps({"matching": OPTIONS}))
    out = tmp_path / "out"
    assert main(["score", str(flat), "--out", str(out), "--no-progress"]) == 0
    (row,) = folders.read_rows(out)
    assert row["error"] is None, row
    details = row["details"]["matching"]
    assert [query["class"] for query in details["queries"]] == ["peach", "candle"]
    assert details["detector"]["version"].startswith("owlv2:")


def npy_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.slow
def test_http_scores_rewards_and_grads_with_an_open_vocabulary(owlv2_dir, owlv2_scorer, bus_path, bus):
    env = {
        "REWARDSCOPE_DETECTOR": str(owlv2_dir),
        "REWARDSCOPE_CONFIG": json.dumps({"matching": OPTIONS}),
        "REWARDSCOPE_GOLDEN_CHECK": "false",
    }
    with running_server(env) as base_url, httpx.Client(base_url=base_url, timeout=120) as client:
        described = client.get("/rewards").json()["rewards"]["matching"]
        assert described["vocabulary"] == "open" and described["detector"]["vocabulary"] == "open"
        image = base64.b64encode(bus_path.read_bytes()).decode()
        response = client.post("/score", json={"items": [{"image": image, "prompt": PROMPT}]})
        assert response.status_code == 200, response.text
        (answer,) = response.json()
        (local,) = owlv2_scorer.score([bus], [PROMPT])
        assert answer["error"] is None
        assert answer["rewards"]["matching"] == pytest.approx(local.rewards["matching"], abs=1e-6)
        assert [q["class"] for q in answer["details"]["matching"]["queries"]] == ["peach", "candle"]
        pixels = np.asarray(bus.resize((96, 64)), dtype=np.float32).transpose(2, 0, 1) / 255
        grad = client.post("/grad", json={"items": [{"array": npy_b64(pixels), "prompt": PROMPT}]})
        assert grad.status_code == 200, grad.text
        (graded,) = grad.json()
        assert graded["error"] is None and np.isfinite(graded["rewards"]["matching"])


def test_an_open_vocabulary_detector_names_mask_regions_with_prompt_nouns_and_coco_names(owlv2_scorer, bus):
    from rewardscope.models.prompt import COCO_CLASSES
    from rewardscope.models.regions import DetectorRegionLabeller, Region

    detector = owlv2_scorer.rewards["matching"].detector
    labeller = DetectorRegionLabeller(detector, conf_threshold=0.05, iou_threshold=0.3)
    prompt_labels = labeller.prompt_labels(PROMPT)
    assert prompt_labels == ("peach", "candle")
    queries = list(dict.fromkeys([*prompt_labels, *COCO_CLASSES]))
    # Regions placed on the detector's own kept boxes (IoU 1) take those detections' query names.
    candidates, num_queries = detector.detect_queries([bus], [queries])
    assert num_queries.tolist() == [82]
    no_slots = torch.tensor([[-1]])
    match = reference.box_match(candidates, no_slots, torch.zeros_like(no_slots), 0.05, 0.3, 100)
    kept = int(match.num_kept[0])
    assert kept > 0
    boxes = match.keep_boxes[0, :kept]
    regions = []
    for box in boxes.tolist():
        mask = np.zeros((bus.height, bus.width), dtype=bool)
        mask[int(box[1]) : int(box[3]) + 1, int(box[0]) : int(box[2]) + 1] = True
        regions.append(Region(mask, tuple(box), 1.0, 0))
    (labels,) = labeller([bus], [prompt_labels], [regions])
    expected = [queries[c] for c in match.keep_classes[0, :kept].tolist()]
    assert [label.label for label in labels] == expected
    assert [label.confidence for label in labels] == pytest.approx(match.keep_scores[0, :kept].tolist())


def test_plausibility_refuses_box_regions_from_an_open_vocabulary_detector(owlv2_dir, tmp_path):
    from tiny_models import save_tiny_causal_lm

    from rewardscope import create_reward

    language_model = save_tiny_causal_lm(tmp_path / "tiny-lm")
    with pytest.raises(ValueError, match="open-vocabulary detector has none"):
        create_reward("plausibility", language_model=str(language_model), detector=str(owlv2_dir), device="cpu")


def test_detector_options_reach_the_zero_shot_detector(owlv2_dir, owlv2_scorer, tmp_path, bus):
    # The OWL image side exported to ONNX and served through the reward's config: the same candidates as torch.
    onnx = owlv2_scorer.rewards["matching"].detector.export_image_encoder(tmp_path / "owlv2-image.onnx")
    options = {"onnx_image_encoder": str(onnx), "query_template": "a picture of a {}"}
    scorer = Scorer(["matching"], config={"matching": {"detector": str(owlv2_dir), "detector_options": options}})
    detector = scorer.rewards["matching"].detector
    assert detector.describe()["image_runtime"] == "onnx" and detector.version.endswith("+onnx")
    (result,) = scorer.score([bus], [PROMPT])
    assert [q["query"] for q in result.details["matching"]["queries"]] == [
        "a picture of a peach",
        "a picture of a candle",
    ]
    torch_side = Scorer(
        ["matching"],
        config={"matching": {"detector": str(owlv2_dir), "detector_options": options | {"onnx_image_encoder": None}}},
    )
    (expected,) = torch_side.score([bus], [PROMPT])
    assert result.rewards["matching"] == pytest.approx(expected.rewards["matching"], abs=1e-3)
    with pytest.raises(ValueError, match="zero-shot detectors only"):
        Scorer(["matching"], config={"matching": {"detector_options": {"query_template": "{}"}}})
