"""Reference profiles against the published rules they reproduce, on worked examples computed by hand.

The detections are given (GivenDetections below stands where the detector would), as each benchmark's scoring code
is given its detector's output: what is tested is the rule applied to them, which is what a profile reproduces.
Sources (read at the commits named in models/profiles.py; E: djghosh13/geneval evaluation/evaluate_images.py,
N: Karine-Huang/T2I-CompBench UniDet_eval/numeracy_eval.py, F: kingniu0329/Bridging-Visions CQScore/F1Score.py,
C: jmhessel/clipscore clipscore.py).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from rewardscope.models.detection.detector import OnnxDetector
from rewardscope.models.profiles import PROFILES, get_profile
from rewardscope.models.prompt import COCO_CLASSES, from_geneval_metadata, to_geneval_metadata
from rewardscope.models.scorer import Scorer
from rewardscope.service.engine import RewardEngine
from rewardscope.service.settings import ServiceSettings
from tiny_clip import shared_tiny_clip

IMAGE = Image.new("RGB", (400, 300), "gray")


@pytest.fixture(scope="module")
def tiny_clip_dir():
    return shared_tiny_clip()


class GivenDetections:
    """A Detector whose output is given: per image, (box x0 y0 x1 y1, {class: score}) rows, the other classes 0.
    nms_iou: the suppression its own post-processing needs (1.0: a set-prediction detector, none)."""

    class_names = COCO_CLASSES
    version = "given"

    def __init__(self, rows: list[tuple[list[float], dict[str, float]]], nms_iou: float = 0.45) -> None:
        self.rows, self.nms_iou = rows, nms_iou

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        candidates = torch.zeros(len(images), max(len(self.rows), 1), 4 + len(COCO_CLASSES))
        for index, (box, scores) in enumerate(self.rows):
            candidates[:, index, :4] = torch.tensor(box)
            for name, score in scores.items():
                candidates[:, index, 4 + COCO_CLASSES.index(name)] = score
        return candidates

    def prepare(self, image: Image.Image) -> None:
        pass

    def describe(self) -> dict[str, object]:
        return {"model": "given detections", "version": self.version}

    def torch_twin(self) -> None:
        return None


def apart(index: int, size: float = 30.0) -> list[float]:
    """Boxes that never overlap one another (one per index along a grid)."""
    x, y = 40.0 * (index % 9), 40.0 * (index // 9)
    return [x, y, x + size, y + size]


def verdict(profile: str, rows, metadata: dict, nms_iou: float = 0.45, reward: str = "geneval"):
    scorer = Scorer([reward], profile=profile, config={reward: {"detector": GivenDetections(rows, nms_iou)}})
    (result,) = scorer.score([IMAGE], [metadata.get("prompt", "")], [metadata])
    return result.rewards[reward], result.details[reward]


# -- GenEval ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("geneval", "coco"), [("computer mouse", "mouse"), ("tv remote", "remote"), ("computer keyboard", "keyboard")]
)
def test_geneval_class_names_resolve_both_ways(geneval, coco):
    # object_names.txt lines 65-67 name these three COCO classes GenEval's way; metadata uses those names.
    parsed = from_geneval_metadata({"include": [{"class": geneval, "count": 1}]})
    assert [spec.class_name for spec in parsed.objects] == [coco] and parsed.unknown == ()
    assert from_geneval_metadata({"include": [{"class": coco, "count": 1}]}).objects == parsed.objects  # COCO's too
    assert to_geneval_metadata(f"a photo of a {coco}")["include"] == [{"class": geneval, "count": 1}]


PEOPLE = [(apart(0), {"person": 0.95}), (apart(1), {"person": 0.92}), (apart(2), {"person": 0.5})]
TWO_PEOPLE = {
    "tag": "counting",
    "include": [{"class": "person", "count": 2}],
    "exclude": [{"class": "person", "count": 3}],
    "prompt": "a photo of two people",
}


def test_geneval_counting_prompts_are_judged_at_confidence_0_9():
    # E:230 counting -> 0.9: 0.95 and 0.92 pass, 0.5 does not. include person>=2 (E:177) holds; exclude person<3
    # (E:217) holds with 2 found: correct.
    value, details = verdict("geneval", PEOPLE, TWO_PEOPLE)
    assert value == 1.0 and details["reasons"] == [] and details["thresholds"]["confidence"] == 0.9
    # The same image and prompt at the train profile's 0.25: three people, the exclude fails (E:219's wording).
    value, details = verdict("train", PEOPLE, TWO_PEOPLE)
    assert value == 0.0 and details["reasons"] == ["expected person<3, found 3"]
    # Another tag keeps 0.3 (E:230): the 0.5 person counts, three people, the exclude fails.
    value, details = verdict("geneval", PEOPLE, {**TWO_PEOPLE, "tag": "two_object"})
    assert value == 0.0 and details["thresholds"]["confidence"] == 0.3


def test_geneval_counts_a_box_for_every_class_whose_score_passes():
    # GenEval's detector gives a list per class and E:231-244 reads each list alone: one box scored dog 0.6 and cat
    # 0.5 is a dog and a cat (both > 0.3). Taking each box's best class only would find no cat.
    rows = [(apart(0), {"dog": 0.6, "cat": 0.5})]
    two_object = {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]}
    assert verdict("geneval", rows, two_object)[0] == 1.0
    value, details = verdict("train", rows, two_object)
    assert value == 0.0 and details["reasons"] == ["expected cat>=1, found 0"]


def test_geneval_adds_no_nms_of_its_own():
    # E:289 max_overlap 1.0 turns E:241's NMS off. With a set-prediction detector (no NMS of its own) two person boxes
    # overlapping at IoU 0.6 are two people; the train profile's NMS at 0.45 keeps one.
    rows = [([0, 0, 100, 100], {"person": 0.9}), ([0, 25, 100, 125], {"person": 0.8})]  # IoU 75/125 = 0.6
    two = {
        "tag": "counting",
        "include": [{"class": "person", "count": 2}],
        "exclude": [{"class": "person", "count": 3}],
    }
    assert verdict("geneval", [(b, {"person": 0.95}) for b, _ in rows], two, nms_iou=1.0)[0] == 1.0
    assert verdict("train", rows, two, nms_iou=1.0)[1]["reasons"] == ["expected person>=2, found 1"]
    # A YOLO-style detector's own NMS (0.45) stays in every profile: raw anchors are not detections.
    assert verdict("geneval", [(b, {"person": 0.95}) for b, _ in rows], two)[1]["thresholds"]["iou"] == 0.45


def test_geneval_keeps_at_most_16_detections_per_class():
    # E:288 MAX_OBJECTS = 16, applied per class (E:234) before the exclude check: 20 people found, 16 kept, so
    # "fewer than 17 people" (exclude count 17) holds; without the cap 20 >= 17 would fail it.
    rows = [(apart(i), {"person": 0.9}) for i in range(20)]
    metadata = {"tag": "single_object", "include": [{"class": "person", "count": 1}]}
    metadata["exclude"] = [{"class": "person", "count": 17}]
    assert verdict("geneval", rows, metadata)[0] == 1.0
    assert verdict("train", rows, metadata)[1]["reasons"] == ["expected person<17, found 20"]


def test_geneval_names_its_classes_its_own_way_in_reasons_and_refuses_classes_it_cannot_see():
    rows = [(apart(0), {"bus": 0.9})]
    value, details = verdict("geneval", rows, {"tag": "two_object", "include": [{"class": "tv remote", "count": 1}]})
    assert value == 0.0 and details["reasons"] == ["expected tv remote>=1, found 0"]  # E:179's wording
    scorer = Scorer(["geneval"], profile="geneval", config={"geneval": {"detector": GivenDetections(rows)}})
    (result,) = scorer.score([IMAGE], [""], [{"tag": "two_object", "include": [{"class": "fish", "count": 1}]}])
    # Not a silent pass on the objects left: the item fails, and GenEval's summary counts it incorrect.
    assert result.rewards["geneval"] is None and result.error_code == "unknown_class"


def test_benchmark_is_an_alias_of_geneval_and_labels_carry_the_version():
    assert get_profile("benchmark") is PROFILES["geneval"]
    assert get_profile("geneval@1").label == "geneval@1"
    with pytest.raises(ValueError, match="version 1 here, not 2"):
        get_profile("geneval@2")
    with pytest.raises(ValueError, match="choose from"):
        get_profile("nonesuch")
    assert Scorer(
        ["numeracy"], profile="benchmark", config={"numeracy": {"detector": GivenDetections([])}}
    ).profile == ("geneval@1")


# -- T2I-CompBench numeracy ------------------------------------------------------------------------------------------


def test_t2i_compbench_numeracy_worked_example():
    # N:162-185, "two dogs and a cat" with three dogs and one cat detected: dog 0.5*1 + 0.5*[3 == 2] = 0.5,
    # cat 0.5 + 0.5 = 1, mean 0.75.
    rows = [(apart(0), {"dog": 0.8}), (apart(1), {"dog": 0.7}), (apart(2), {"dog": 0.6}), (apart(3), {"cat": 0.9})]
    value, _ = verdict("t2i-compbench", rows, {"prompt": "two dogs and a cat"}, reward="numeracy")
    assert value == pytest.approx(0.75)


def test_t2i_compbench_merges_a_box_lying_inside_another_of_its_label():
    # N:48-66, 120-130: a same-label box more than 0.9 inside a kept one is a duplicate. A dog's body [0,0,100,100]
    # and its head [10,10,40,40]: IoU 900/10000 = 0.09 (NMS keeps both), containment 900/900 = 1 > 0.9: one dog.
    rows = [([0, 0, 100, 100], {"dog": 0.8}), ([10, 10, 40, 40], {"dog": 0.7})]
    value, details = verdict("t2i-compbench", rows, {"prompt": "a dog"}, reward="numeracy")
    assert value == 1.0 and details["objects"][0]["detected"] == 1
    value, details = verdict("train", rows, {"prompt": "a dog"}, reward="numeracy")
    assert value == 0.5 and details["objects"][0]["detected"] == 2  # present (0.5), count 2 != 1 (0)


def test_t2i_compbench_judges_at_the_threshold_its_detector_head_applies():
    # unified_roi_heads.py lines 105-112 pass 0.1 to fast_rcnn_inference: a dog at 0.2 counts.
    rows = [(apart(0), {"dog": 0.2})]
    assert verdict("t2i-compbench", rows, {"prompt": "a dog"}, reward="numeracy")[0] == 1.0
    assert verdict("train", rows, {"prompt": "a dog"}, reward="numeracy")[0] == 0.0


# -- The seed paper's code ---------------------------------------------------------------------------------------


def test_seed_reference_worked_example_of_its_code():
    # F:90-112 on "two dogs and a cat" with dogs at 0.97, 0.95, 0.93 and no cat: N = 2 nouns;
    # P = (2.85 / 3) / 2 = 0.475, R = (min(3, 2) / max(3, 2)) / 2 = 1/3, F1 = 2PR / (P + R) = 0.3918...
    rows = [(apart(0), {"dog": 0.97}), (apart(1), {"dog": 0.95}), (apart(2), {"dog": 0.93})]
    value, details = verdict("seed-reference", rows, {"prompt": "two dogs and a cat"}, reward="matching")
    p, r = 0.475, 1 / 3
    assert value == pytest.approx(2 * p * r / (p + r), abs=1e-6)
    assert details["category_confidence"] == pytest.approx(p, abs=1e-6)


def test_seed_reference_counts_nouns_the_detector_cannot_see_in_its_denominators():
    # F:96 N = every distinct noun of the prompt: "two dogs and a balcony" has N = 2 though no detector here knows
    # balconies. Two dogs at 0.95 and 0.93: P = 0.94 / 2 = 0.47, R = (2/2) / 2 = 0.5, F1 = 2PR / (P + R).
    rows = [(apart(0), {"dog": 0.95}), (apart(1), {"dog": 0.93})]
    value, details = verdict("seed-reference", rows, {"prompt": "two dogs and a balcony"}, reward="matching")
    p, r = 0.47, 0.5
    assert value == pytest.approx(2 * p * r / (p + r), abs=1e-6) and details["unseen_in_denominator"] == 1
    # Our training default divides by the objects it can judge: P = 0.94, R = 1.
    assert verdict("train", rows, {"prompt": "two dogs and a balcony"}, reward="matching")[0] == pytest.approx(
        2 * 0.94 / 1.94, abs=1e-6
    )
    # F:67 confidence 0.9: a third dog at 0.85 is not seen by the reference, but is by the train profile.
    rows.append((apart(2), {"dog": 0.85}))
    assert verdict("seed-reference", rows, {"prompt": "two dogs and a balcony"}, reward="matching")[0] == (
        pytest.approx(2 * p * r / (p + r), abs=1e-6)
    )


# -- Models named by a profile ---------------------------------------------------------------------------------------


def test_clipscore_profile_names_the_papers_model_prefix_and_weight():
    # C:67-71 prefix "A photo depicts ", C:229 ViT-B/32, C:135 and C:159 w = 2.5.
    assert get_profile("clipscore").for_reward("clip") == {
        "model": "openai/clip-vit-base-patch32",
        "prefix": "A photo depicts ",
        "weight": 2.5,
    }


def test_a_profile_whose_model_is_not_loaded_answers_a_per_item_error(tiny_clip_dir):
    # The service pins each reward's model to what it loaded: a request under clipscore, whose model is ViT-B/32,
    # gets an error naming that model, never CLIPScore's prefix applied to another CLIP.
    engine = RewardEngine(ServiceSettings(rewards=["clip"], config={"clip": {"model": str(tiny_clip_dir)}}))
    (result,) = engine.scorer({"clip": 1.0}, "clipscore").score([IMAGE], ["a cat"])
    assert result.rewards["clip"] is None and result.error_code == "profile_model_unavailable"
    assert "openai/clip-vit-base-patch32" in result.error
    (result,) = engine.scorer({"clip": 1.0}, "train").score([IMAGE], ["a cat"])
    assert result.rewards["clip"] is not None


def test_the_clip_prefix_is_put_before_the_prompt(tiny_clip_dir):
    from rewardscope.models.types import Sample

    from rewardscope import create_reward

    plain = create_reward("clip", model=str(tiny_clip_dir))
    prefixed = create_reward("clip", model=str(tiny_clip_dir), prefix="A photo depicts ")
    image = plain.backbone.sample_embeddings([Sample(IMAGE, "a cat")], 1)
    text = plain.backbone.text_embeddings(["A photo depicts a cat"])
    expected = 2.5 * max(float((image * text).sum()), 0.0)
    assert prefixed.score([Sample(IMAGE, "a cat")])[0].value == pytest.approx(expected, abs=1e-5)
    assert prefixed.describe()["params"]["prefix"] == "A photo depicts "


def test_onnx_detector_declares_the_nms_its_raw_anchors_need():
    assert OnnxDetector.nms_iou == 0.45


# -- GenEval, case by case against its rule written out ----------------------------------------------------------

CLASSES = ("person", "dog", "cat", "bus", "tv remote", "computer keyboard")


def random_geneval_case(rng) -> tuple[dict, list]:
    """A GenEval-style prompt (the four tags whose checks need no colour model, shaped as prompts/create_prompts.py
    makes them) and detections around it: its classes and a distractor, scores on a grid of distinct values that
    straddle 0.3 and 0.9 without touching them, integer boxes (exact in float32)."""
    a, b = rng.sample(CLASSES, 2)
    tag = rng.choice(["single_object", "two_object", "counting", "position"])
    if tag == "single_object":
        metadata = {"include": [{"class": a, "count": 1}]}
    elif tag == "two_object":
        metadata = {"include": [{"class": a, "count": 1}, {"class": b, "count": 1}]}
    elif tag == "counting":
        n = rng.randint(2, 4)
        metadata = {"include": [{"class": a, "count": n}], "exclude": [{"class": a, "count": n + 1}]}
    else:
        relation = rng.choice(["left of", "right of", "above", "below"])
        metadata = {"include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}]}
    metadata["tag"] = tag
    # Distinct scores, half of the pool above 0.9 so that counting prompts can pass too.
    scores = rng.sample([k / 100 + 0.005 for k in range(1, 99)] + [0.9 + k / 1000 + 0.0005 for k in range(1, 99)], 16)
    detections = []
    for _ in range(rng.randint(0, 7)):
        x, y = rng.randint(0, 350), rng.randint(0, 250)
        box = [x, y, x + rng.randint(4, 50), y + rng.randint(4, 50)]
        names = rng.sample([a, b, rng.choice(CLASSES)], rng.randint(1, 2))
        detections.append((box, {name: scores.pop() for name in dict.fromkeys(names)}))
    return metadata, detections


def test_geneval_profile_gives_genevals_verdict_and_reasons_case_for_case():
    import random

    from oracles import geneval_verdict
    from rewardscope.models.prompt import from_geneval_metadata as parse_metadata

    rng = random.Random(18)
    cases = [random_geneval_case(rng) for _ in range(300)]
    outcomes = set()
    for metadata, detections in cases:
        coco = [(box, {parse_metadata({"include": [{"class": n}]}).objects[0].class_name: s for n, s in scores.items()})
                for box, scores in detections]  # fmt: skip
        value, details = verdict("geneval", coco, metadata, nms_iou=1.0)  # a set-prediction detector, as GenEval's
        expected, reasons = geneval_verdict(metadata, detections)
        assert (value == 1.0, details["reasons"]) == (expected, reasons), (metadata, detections)
        outcomes.add((metadata["tag"], expected))
    assert len(outcomes) == 8  # every tag, both verdicts: the cases exercise each rule
