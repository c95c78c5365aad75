"""Generative judges end to end: the VLM judge (tiny random-init Qwen2-VL and Idefics3 saved with save_pretrained)
and VQA with LLM-written questions (a tiny causal LM) served by a real `rewardscope serve`, scored by the folder CLI,
combined by /rank and turned into DPO pairs as AGFSync builds them (best vs worst of a weighted sum per prompt)."""

from __future__ import annotations

import base64
import io
import json
import shutil

import httpx
import pyarrow.parquet as pq
import pytest
from rewardscope.service.tools import folders
from rewardscope.service.tools.cli import main
from serving import running_server
from tiny_models import save_tiny_blip, save_tiny_causal_lm
from tiny_vlm import save_tiny_qwen2_vl

from rewardscope import Scorer

REWARDS = ["vlm_judge", "vqa"]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("generative-judges")
    return {
        "vlm_judge": {"model": str(save_tiny_qwen2_vl(root / "tiny-qwen2-vl"))},
        "vqa": {
            "model": str(save_tiny_blip(root / "tiny-blip-vqa", "vqa")),
            "questions": "llm",
            "question_model": str(save_tiny_causal_lm(root / "tiny-lm", seed=3, positions=512)),
            "question_max_new_tokens": 16,
        },
    }


@pytest.fixture(scope="module")
def local(config) -> Scorer:
    return Scorer(REWARDS, config=config)


@pytest.fixture(scope="module")
def http(config):
    env = {"REWARDSCOPE_REWARDS": ",".join(REWARDS), "REWARDSCOPE_CONFIG": json.dumps(config)}
    with running_server(env) as base_url, httpx.Client(base_url=base_url, timeout=180) as client:
        yield client


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def jpeg(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.mark.slow
def test_rewards_states_the_judges_range_scale_and_models(http, config):
    described = http.get("/rewards").json()["rewards"]
    judge = described["vlm_judge"]
    assert judge["range"] == [0.0, 1.0] and "expected" in judge["scale"]
    assert judge["version"].startswith("tiny-qwen2-vl@") and "+prompts:v1" in judge["version"]
    assert "+questions:" in described["vqa"]["version"]


@pytest.mark.slow
def test_score_over_http_equals_the_in_process_scorer(http, local, bus_path):
    item = {"image": b64(bus_path.read_bytes()), "prompt": "four people and a bus"}
    (served,) = http.post("/score", json={"items": [item]}).json()
    (expected,) = local.score([bus_path.read_bytes()], [item["prompt"]])
    assert served["error"] is None and set(served["rewards"]) == set(REWARDS)
    for name in REWARDS:
        assert served["rewards"][name] == pytest.approx(expected.rewards[name], abs=1e-5)
    aspects = served["details"]["vlm_judge"]["aspects"]
    assert set(aspects) == {"style", "coherence", "aesthetics", "faithfulness"}
    assert served["details"]["vlm_judge"]["prompt_version"] == "v1"
    # the tiny random LM writes no valid question: the item falls back to templates and says so
    assert served["details"]["vqa"]["question_source"] == "template" and served["details"]["vqa"]["fallback"]


@pytest.mark.slow
def test_rank_combines_the_judges(http, bus_path, zidane):
    candidates = [{"image": b64(bus_path.read_bytes())}, {"image": b64(jpeg(zidane))}]
    group = {"prompt": "two people", "candidates": candidates}
    body = {"groups": [group], "rewards": {"vlm_judge": 0.7, "vqa": 0.3}}
    (ranked,) = http.post("/rank", json=body).json()
    for candidate, score in zip(ranked["candidates"], ranked["scores"], strict=True):
        expected = 0.7 * candidate["rewards"]["vlm_judge"] + 0.3 * candidate["rewards"]["vqa"]
        assert score == pytest.approx(expected, abs=1e-6)
    best = max(range(2), key=lambda index: ranked["scores"][index])
    assert ranked["chosen"] == best and ranked["rejected"] == 1 - best


def test_the_folder_cli_scores_with_both_judges(config, tmp_path, bus_path, monkeypatch):
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(bus_path, flat / "a bus.jpg")
    monkeypatch.setenv("REWARDSCOPE_CONFIG", json.dumps(config))
    out = tmp_path / "out"
    assert main(["score", str(flat), "--out", str(out), "--rewards", *REWARDS, "--no-progress"]) == 0
    (row,) = folders.read_rows(out)
    assert row["error"] is None, row
    assert row["details"]["vqa"]["question_source"] == "template" and "+questions:" in row["details"]["vqa"]["version"]
    details = row["details"]["vlm_judge"]
    assert 0.0 <= row["rewards"]["vlm_judge"] <= 1.0
    weights = {aspect: entry["weight"] for aspect, entry in details["aspects"].items()}
    mean = sum(weights[a] * e["score"] for a, e in details["aspects"].items()) / sum(weights.values())
    assert row["rewards"]["vlm_judge"] == pytest.approx(mean)


def test_dpo_pairs_as_agfsync_builds_them(config, tmp_path, bus_path, zidane, capsys):
    # AGFSync (Anjingkun/AGFSync build_dataset.py): per prompt, the weighted sum of its scorers over the N candidates;
    # the argmax is the chosen image, the argmin the rejected one. Here: the VLM judge and VQA, 0.7 / 0.3.
    import skimage.data
    from PIL import Image

    folder = tmp_path / "candidates" / "p1"
    folder.mkdir(parents=True)
    (folder / "prompt.txt").write_text("two people on a street\n")
    shutil.copy(bus_path, folder / "0.jpg")
    (folder / "1.jpg").write_bytes(jpeg(zidane))
    Image.fromarray(skimage.data.astronaut()).save(folder / "2.png")
    out = tmp_path / "pairs.parquet"
    weights = {"vlm_judge": 0.7, "vqa": 0.3}
    argv = ["dpo-pairs", str(tmp_path / "candidates"), "--output", str(out), "--config", json.dumps(config)]
    assert main([*argv, "--rewards", *(f"{name}={weight}" for name, weight in weights.items())]) == 0
    (row,) = pq.read_table(out).to_pylist()
    files = [folder / "0.jpg", folder / "1.jpg", folder / "2.png"]
    scored = Scorer(weights, config=config).score(files, ["two people on a street"] * 3)
    totals = [sum(w * result.rewards[name] for name, w in weights.items()) for result in scored]
    best, worst = totals.index(max(totals)), totals.index(min(totals))
    assert row["image_0_path"] == f"p1/{files[best].name}" and row["image_1_path"] == f"p1/{files[worst].name}"
    assert row["score_0"] == pytest.approx(totals[best], abs=1e-6)
