"""End-to-end: a real `bentoml serve` of RewardService on 127.0.0.1, driven over HTTP.
Scores must equal the in-process Scorer's; limits, auth, batching, metrics, jobs and readiness hold."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from rewardscope.models.profiles import PROFILE_NAMES
from serving import ROOT, running_server

from rewardscope import Scorer

pytestmark = pytest.mark.slow
TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def npy(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return b64(buffer.getvalue())


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server():
    env = {"REWARDSCOPE_TOKEN": TOKEN, "REWARDSCOPE_MAX_REQUEST_BYTES": str(8 << 20)}
    with running_server(env) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, headers=AUTH, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def scorer():
    return Scorer(["matching"])


def test_scores_over_http_equal_the_in_process_scorer(http, scorer, bus, zidane, bus_path):
    items = [
        {"image": b64(bus_path.read_bytes()), "prompt": "four people and a bus"},
        {"array": npy(np.asarray(zidane)), "prompt": "two people"},
        {"image": b64(jpeg(zidane)), "prompt": "a tie"},
    ]
    response = http.post("/score", json={"items": items})
    assert response.status_code == 200
    served = response.json()
    local = scorer.score([bus_path.read_bytes(), np.asarray(zidane), jpeg(zidane)], [i["prompt"] for i in items])
    for remote, mine in zip(served, local, strict=True):
        assert remote["rewards"]["matching"] == pytest.approx(mine.rewards["matching"], abs=1e-6)
        assert remote["details"]["matching"]["objects"] == mine.details["matching"]["objects"]
        assert remote["versions"]["matching"].startswith("yolov3-tiny-darknet@")
        assert remote["profile"] == "train@1"


def test_a_corrupt_image_fails_alone_in_a_batch_of_32(http, bus_path):
    good = b64(bus_path.read_bytes())
    items = [{"image": good, "prompt": "four people"} for _ in range(32)]
    items[13] = {"image": b64(b"\x89PNG\r\n\x1a\n garbage"), "prompt": "four people"}
    results = http.post("/score", json={"items": items}).json()
    assert len(results) == 32
    failed = [index for index, result in enumerate(results) if result["error"]]
    assert failed == [13]
    assert results[13]["rewards"] == {"matching": None} and results[13]["total"] is None
    assert results[13]["error_code"] in ("unsupported_format", "decode_failed")
    assert all(result["rewards"]["matching"] > 0.5 for i, result in enumerate(results) if i != 13)


def test_a_request_over_the_byte_limit_gets_413_with_a_message(http):
    noise = np.random.default_rng(0).integers(0, 255, (1800, 1800, 3), dtype=np.uint8)  # ~9.7 MB as PNG
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG", compress_level=0)
    response = http.post("/score", json={"items": [{"image": b64(buffer.getvalue()), "prompt": "a cat"}]})
    assert response.status_code == 413
    assert "exceeds" in response.json()["error"]


def test_a_decompression_bomb_is_a_per_item_error(http):
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    (result,) = http.post("/score", json={"items": [{"image": b64(buffer.getvalue()), "prompt": "a cat"}]}).json()
    assert result["error_code"] == "too_many_pixels" and result["rewards"]["matching"] is None


@pytest.mark.parametrize(
    "body",
    [{"items": [{"prompt": "a cat"}]}, {"items": [{"image": "x", "array": "y", "prompt": "a"}]}, {"nope": 1}],
    ids=["no-image", "two-images", "no-items"],
)
def test_malformed_requests_are_the_callers_fault(http, body):
    assert 400 <= http.post("/score", json=body).status_code < 500


def test_without_the_token_requests_get_401_but_probes_stay_open(server):
    assert httpx.post(server + "/score", json={"items": []}).status_code == 401
    assert httpx.get(server + "/rewards", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(server + "/readyz").status_code == 200


def test_concurrent_requests_are_batched(http, server, bus_path):
    item = {"image": b64(bus_path.read_bytes()), "prompt": "a bus"}

    def one(_):
        with httpx.Client(base_url=server, headers=AUTH, timeout=120) as client:
            return client.post("/score", json={"items": [item]}).status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(one, range(64)))
    assert statuses == [200] * 64
    metrics = http.get("/metrics").text
    series = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in metrics.splitlines()
        if line.startswith('rewardscope_batch_size_bucket{endpoint="score",le="1.0"}')
        or line.startswith('rewardscope_batch_size_count{endpoint="score"}')
    }
    single = series['rewardscope_batch_size_bucket{endpoint="score",le="1.0"}']
    calls = series['rewardscope_batch_size_count{endpoint="score"}']
    assert calls > single, f"every call held one item: {series}"


def _same(served, alone, path="answer"):
    """Equal answers; floats to 1e-5 (a batch beside another runs the detector on one thread: sums may reorder)."""
    if isinstance(alone, float):
        assert served == pytest.approx(alone, abs=1e-5), path
    elif isinstance(alone, dict):
        assert served.keys() == alone.keys(), path
        for key in alone:
            _same(served[key], alone[key], f"{path}.{key}")
    elif isinstance(alone, list):
        assert len(served) == len(alone), path
        for index, (left, right) in enumerate(zip(served, alone, strict=True)):
            _same(left, right, f"{path}[{index}]")
    else:
        assert served == alone, path


def test_concurrent_score_match_and_rank_share_batches_and_answer_as_they_do_alone(http, server, bus_path, zidane):
    bus, people = b64(bus_path.read_bytes()), b64(jpeg(zidane))
    requests = [
        (
            "/score",
            {"items": [{"image": bus, "prompt": "four people and a bus"}, {"image": people, "prompt": "a tie"}]},
        ),
        ("/match", {"items": [{"image": people, "prompt": "two people", "variant": "numeracy"}]}),
        ("/rank", {"groups": [{"prompt": "four people", "candidates": [{"image": people}, {"image": bus}]}]}),
        ("/score", {"items": [{"image": "%%", "prompt": "a bus"}, {"image": bus, "prompt": "a bus"}]}),
    ]
    alone = [http.post(path, json=body).json() for path, body in requests]

    def send(index: int) -> tuple[int, httpx.Response]:
        with httpx.Client(base_url=server, headers=AUTH, timeout=120) as client:
            path, body = requests[index % len(requests)]
            return index % len(requests), client.post(path, json=body)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(32)))
    for kind, response in answers:
        assert response.status_code == 200, response.text
        _same(response.json(), alone[kind])
    waits = [line for line in http.get("/metrics").text.splitlines() if line.startswith("rewardscope_queue_wait")]
    assert any(
        line.startswith("rewardscope_queue_wait_seconds_count") and float(line.split()[-1]) > 0 for line in waits
    )


def test_metrics_expose_the_custom_series(http):
    text = http.get("/metrics").text
    for name in (
        "rewardscope_reward_latency_seconds_bucket",
        "rewardscope_items_total",
        "rewardscope_errors_total",
        "rewardscope_reward_value_bucket",
        "rewardscope_batch_size_bucket",
        "rewardscope_model_load_seconds",
        "rewardscope_golden_check_ok",
    ):
        assert name in text, name


def test_match_returns_the_breakdown_for_the_chosen_variant(http, bus_path):
    items = [
        {"image": b64(bus_path.read_bytes()), "prompt": "a photo of two buses", "variant": "geneval"},
        {"image": b64(bus_path.read_bytes()), "prompt": "four people", "variant": "soft"},
    ]
    geneval, soft = http.post("/match", json={"items": items}).json()
    assert geneval["score"] == 0.0 and geneval["details"]["reasons"] == ["expected bus>=2, found 1"]
    assert 0 < soft["score"] < 1 and soft["variant"] == "soft"
    assert soft["details"]["detections"] and soft["versions"]["matching"]


def test_rank_picks_best_and_worst_deterministically(http, bus_path, zidane):
    bus = b64(bus_path.read_bytes())
    group = {
        "prompt": "four people",
        "candidates": [{"image": b64(jpeg(zidane))}, {"image": bus}, {"image": "%%"}, {"image": bus}],
    }
    (ranked,) = http.post("/rank", json={"groups": [group]}).json()
    assert ranked["scores"][2] is None and ranked["candidates"][2]["error_code"] == "bad_base64"
    assert ranked["order"] == [1, 3, 0]  # equal scores keep the lower index first; the failure is not ranked
    assert (ranked["chosen"], ranked["rejected"]) == (1, 0)


def test_rewards_describe_range_direction_scale_and_versions(http):
    described = http.get("/rewards").json()
    matching = described["rewards"]["matching"]
    assert matching["range"] == [0.0, 1.0] and matching["direction"] == "higher is better"
    assert matching["scale"] and matching["version"].startswith("yolov3-tiny-darknet@")
    assert set(described["profiles"]) == set(PROFILE_NAMES)
    assert described["profiles"]["benchmark"] == {"alias_of": "geneval"}
    assert described["profiles"]["geneval"]["rewards"]["geneval"]["counting_conf_threshold"] == 0.9
    assert described["default_profile"] == "train@1"


def test_an_async_job_completes_with_the_same_scores_as_score(http, bus_path):
    items = [{"image": b64(bus_path.read_bytes()), "prompt": prompt} for prompt in ("a bus", "two people", "a cat")]
    task = http.post("/jobs/score/submit", json={"items": items}).json()
    deadline = time.monotonic() + 60
    while http.get("/jobs/score/status", params={"task_id": task["task_id"]}).json()["status"] in (
        "pending",
        "in_progress",
    ):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    from_job = http.get("/jobs/score/get", params={"task_id": task["task_id"]}).json()
    direct = http.post("/score", json={"items": items}).json()
    assert [r["rewards"] for r in from_job] == [r["rewards"] for r in direct]


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"items": [{"image": "aGk=", "prompt": 3}]}, "items.0.prompt"),
        ({"items": "not a list"}, "items"),
        ({"jobs": []}, "items"),
        ("{not json", "body"),
    ],
)
def test_a_bad_job_is_refused_at_submission_not_when_it_runs(http, body, where):
    content = body if isinstance(body, str) else json.dumps(body)
    response = http.post("/jobs/score/submit", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert "invalid job" in response.json()["error"] and where in response.json()["error"]


def test_a_corrupted_golden_expectation_keeps_the_service_not_ready(tmp_path):
    golden = json.loads((ROOT / "service" / "golden" / "expectations.json").read_text())
    golden["cases"][0]["score"] = 0.1  # as if the detector's confidences had collapsed
    corrupted = tmp_path / "golden.json"
    corrupted.write_text(json.dumps(golden))
    with running_server({"REWARDSCOPE_GOLDEN": str(corrupted)}, ready=False) as base_url:
        assert httpx.get(base_url + "/readyz").status_code == 503
        report = httpx.get(base_url + "/golden")
        assert report.status_code == 503
        (difference,) = report.json()["differences"]
        assert "bus.jpg" in difference and "expected 0.1" in difference


def test_the_service_refuses_remote_listening_without_a_token():
    env = {key: value for key, value in os.environ.items() if key != "REWARDSCOPE_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "rewardscope.service.tools.cli", "serve", "--host", "0.0.0.0", "--port", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode != 0 and "REWARDSCOPE_TOKEN" in result.stderr


def test_bentoml_build_accepts_the_bentofile(tmp_path):
    # What `make bento` does, in a copy of the build context: build the wheel the bentofile names, then the Bento.
    context = tmp_path / "context"
    (context / "service").mkdir(parents=True)
    for name in ("bentofile.yaml", "README.md", "requirements.lock", "service/bento_setup.sh"):
        shutil.copy2(ROOT / name, context / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(context / "dist")]
        + [str(ROOT)],
        check=True,
        capture_output=True,
    )
    bentoml = Path(sys.executable).with_name("bentoml")
    result = subprocess.run(
        [str(bentoml), "build", "--output", "tag", str(context)],
        cwd=context,
        capture_output=True,
        text=True,
        env={**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "true"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rewardscope:" in result.stdout
    (bento,) = (tmp_path / "home" / "bentos" / "rewardscope").glob("*/")
    wheels = [path.name for path in (bento / "env" / "python" / "wheels").glob("rewardscope-*.whl")]
    assert wheels == ["rewardscope-0.2.0-py3-none-any.whl"]
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "transformers==" in requirements and "torch==2.14.1" in requirements


def test_multipart_upload_scores_like_json(http, bus_path, zidane):
    files = [
        ("images", ("bus.jpg", bus_path.read_bytes(), "image/jpeg")),
        ("images", ("z.jpg", jpeg(zidane), "image/jpeg")),
    ]
    data = {"prompts": json.dumps(["four people and a bus", "two people"]), "profile": "benchmark"}
    uploaded = http.post("/score/upload", files=files, data=data)
    assert uploaded.status_code == 200
    as_json = http.post(
        "/score",
        json={
            "items": [
                {"image": b64(bus_path.read_bytes()), "prompt": "four people and a bus", "profile": "benchmark"},
                {"image": b64(jpeg(zidane)), "prompt": "two people", "profile": "benchmark"},
            ]
        },
    ).json()
    assert [r["rewards"] for r in uploaded.json()] == [r["rewards"] for r in as_json]
    assert uploaded.json()[0]["profile"] == "geneval@1"  # "benchmark" is the retired name of geneval


@pytest.mark.parametrize(
    "files, data",
    [
        ([("prompts", (None, '["a cat"]'))], None),
        ([("images", ("a.png", b"x", "image/png"))], {"prompts": "not json"}),
        ([("images", ("a.png", b"x", "image/png"))], {"prompts": '["one", "two"]'}),
    ],
    ids=["no-files", "bad-prompts", "count-mismatch"],
)
def test_bad_multipart_requests_are_422(http, files, data):
    response = http.post("/score/upload", files=files, data=data)
    assert response.status_code == 422 and response.json()["error"]


def test_a_url_in_place_of_a_file_is_never_fetched(http):
    # BentoML's own multipart parsing would download this; ours refuses non-file parts.
    parts = [("images", (None, "http://127.0.0.1:9/secret.png")), ("prompts", (None, '["a cat"]'))]
    response = http.post("/score/upload", files=parts)
    assert response.status_code == 422 and "file" in response.json()["error"]


def test_bodies_other_than_json_or_multipart_are_415(http):
    form = http.post("/score", data={"items": "[]"})
    assert form.status_code == 415 and "application/json" in form.json()["error"]
    pickled = http.post("/score", content=b"\x80\x04.", headers={"content-type": "application/vnd.bentoml+pickle"})
    assert pickled.status_code == 415
