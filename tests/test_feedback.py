"""The human-feedback reward model: train on a labelled set whose label is learnable from the image (does the
prompt's colour word name the image's dominant colour?), measure held-out accuracy, then serve it as a reward."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from rewardscope.models.feedback import (
    TrainConfig,
    perturb_prompt,
    read_labels,
    roc_auc,
    split_indices,
    train_feedback_reward,
)
from rewardscope.models.hf import ModelNotFoundError
from rewardscope.models.registry import is_registered, split_reward_name
from rewardscope.service.engine import RewardEngine
from rewardscope.service.settings import ServiceSettings
from rewardscope.service.tools.cli import main
from tiny_clip import make_labelled_set, shared_tiny_clip

from rewardscope import Scorer, create_reward


@pytest.fixture(scope="module")
def clip_dir():
    return shared_tiny_clip()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, clip_dir):
    """Trained through the CLI, as a user would: `rewardscope train-reward labels.jsonl --output DIR`."""
    root = tmp_path_factory.mktemp("feedback")
    make_labelled_set(root / "train", images=120, seed=0)
    output = root / "head"
    code = main(
        ["train-reward", str(root / "train" / "labels.jsonl"), "--output", str(output)]
        + ["--clip-model", str(clip_dir), "--quiet", "--seed", "0"]
    )
    assert code == 0
    return output


def test_training_reaches_held_out_accuracy_on_images_it_never_saw(trained):
    report = json.loads((trained / "report.json").read_text())
    assert report["validation"] >= 40 and report["train"] + report["validation"] == report["examples"] == 240
    assert report["validation_metrics"]["accuracy"] >= 0.9
    assert report["validation_metrics"]["auc"] >= 0.9
    assert 1 <= report["best_epoch"] <= report["epochs_run"] <= 200
    config = json.loads((trained / "config.json").read_text())
    assert config["clip_model"] == str(shared_tiny_clip().resolve())
    assert (trained / "head.safetensors").is_file()


def test_the_trained_head_serves_as_a_reward_on_a_fresh_labelled_set(trained, tmp_path):
    rows = make_labelled_set(tmp_path, images=40, seed=7)
    name = f"feedback:{trained}"
    results = Scorer([name]).score([tmp_path / row["image"] for row in rows], [row["prompt"] for row in rows])
    values = [result.rewards[name] for result in results]
    assert all(value is not None and 0.0 <= value <= 1.0 for value in values)
    accuracy = np.mean([(value > 0.5) == bool(row["label"]) for value, row in zip(values, rows, strict=True)])
    assert accuracy >= 0.9
    assert roc_auc([row["label"] for row in rows], values) >= 0.9
    assert results[0].details[name]["version"].startswith(f"feedback-{trained.name}@")


def test_feedback_names_are_accepted_by_the_registry_and_the_service(trained):
    name = f"feedback:{trained}"
    assert split_reward_name(name) == ("feedback", str(trained))
    assert is_registered(name) and not is_registered("nonsense:/x")
    assert create_reward("feedback", path=str(trained)).version == create_reward(name).version
    engine = RewardEngine(ServiceSettings(rewards=[name]))
    described = engine.describe()["rewards"][name]
    assert described["range"] == [0.0, 1.0] and described["training"]["accuracy"] >= 0.9
    with pytest.raises(ValueError, match="not registered"):
        RewardEngine(ServiceSettings(rewards=["nonsense:/x"]))


def test_a_missing_feedback_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="train-reward"):
        create_reward(f"feedback:{tmp_path / 'none'}")


def test_the_auxiliary_prompt_classification_loss_trains_too(tmp_path, clip_dir):
    make_labelled_set(tmp_path, images=60, seed=3)
    config = TrainConfig(clip_model=str(clip_dir), aux_weight=0.5, epochs=60, seed=1)
    report = train_feedback_reward(tmp_path / "labels.jsonl", tmp_path / "aux", config, show_progress=False)
    assert report.validation_metrics["accuracy"] >= 0.9
    assert report.config["aux_weight"] == 0.5


@pytest.mark.parametrize(
    "prompt, changed",
    [
        ("a photo of a red car", {"red", "car"}),
        ("two dogs and a cat", {"two", "dogs", "cat"}),
        ("three blue cups", {"three", "blue", "cups"}),
    ],
)
def test_perturbed_prompts_swap_a_colour_count_or_object_word(prompt, changed):
    variants = perturb_prompt(prompt, random.Random(0), count=10)
    assert variants and len(set(variants)) == len(variants)
    for variant in variants:
        assert variant != prompt
        old, new = set(prompt.split()), set(variant.split())
        assert len(old - new) == 1 and (old - new) <= changed


def test_a_prompt_without_objects_has_no_perturbation():
    assert perturb_prompt("an abstract painting", random.Random(0)) == []


def test_labels_read_from_csv_and_jsonl_with_relative_paths(tmp_path):
    (tmp_path / "labels.csv").write_text("image,prompt,label\na.png,a red car,1\nsub/b.png,a cat,false\n")
    pairs = read_labels(tmp_path / "labels.csv")
    assert [(p.image, p.prompt, p.label) for p in pairs] == [
        (tmp_path / "a.png", "a red car", 1),
        (tmp_path / "sub" / "b.png", "a cat", 0),
    ]
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "prompt": "x", "label": 2}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: label must be 0 or 1"):
        read_labels(tmp_path / "bad.jsonl")


@pytest.mark.parametrize(
    "labels, scores, auc",
    [
        ([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 1.0),
        ([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9], 0.0),
        ([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5], 0.5),
        ([0, 1, 1, 0], [0.1, 0.4, 0.35, 0.8], 0.5),
        ([1, 1], [0.3, 0.4], None),
    ],
    ids=["perfect", "inverted", "all-tied", "mixed", "one-class"],
)
def test_roc_auc_by_ranks(labels, scores, auc):
    assert roc_auc(labels, scores) == (None if auc is None else pytest.approx(auc))


def test_split_keeps_an_image_on_one_side_and_is_seeded():
    groups = [f"img{i // 2}" for i in range(40)]
    train, validation = split_indices(groups, 0.25, seed=5)
    assert sorted(train + validation) == list(range(40))
    assert not {groups[i] for i in train} & {groups[i] for i in validation}
    assert len({groups[i] for i in validation}) == 5
    assert split_indices(groups, 0.25, seed=5) == (train, validation)
