"""The load-test runner and the baseline server, run for real: a short bounded locust run against a started
service (CSVs, a summary that agrees with them, no failures at a modest load), and the Flask/gunicorn baseline
answering /score exactly as the service does, so the service-vs-baseline benchmark compares equal work."""

from __future__ import annotations

import base64
import csv
import json
import sys
from pathlib import Path

import httpx
import pytest
from serving import running_server

# loadtests/ is a folder of the repository, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loadtests import PROMPTS, generator_like_photos  # noqa: E402
from loadtests.baseline_server import running_baseline  # noqa: E402
from loadtests.run import main as run_loadtest  # noqa: E402

pytestmark = pytest.mark.slow

# name -> (fewest, most) images one successful request carries (npy parts are split under the byte budget).
IMAGES_PER_REQUEST = {"/match": (1, 1), "/rank": (8, 32), "/score [jpeg]": (16, 64), "/score [npy]": (1, 64)}


@pytest.fixture(scope="module")
def load_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("loadtest")
    code = run_loadtest(["--users", "3", "--spawn-rate", "3", "--run-time", "20", "--out", str(out)])
    return code, out


def test_load_run_writes_locust_csvs_and_a_summary(load_run: tuple[int, Path]) -> None:
    code, out = load_run
    for name in ("locust_stats.csv", "locust_failures.csv", "locust_stats_history.csv", "locust_images.json"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mix"] == ["TrainingLoopUser", "EvaluatorUser", "RankerUser"] and summary["users"] == 3
    assert code == 0 and summary["locust_exit_code"] == 0


def test_summary_agrees_with_the_csv(load_run: tuple[int, Path]) -> None:
    _, out = load_run
    summary = json.loads((out / "summary.json").read_text())["endpoints"]
    counted = json.loads((out / "locust_images.json").read_text())
    images = counted["images"]
    with open(out / "locust_stats.csv", newline="") as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    assert set(summary) == set(rows) and "Aggregated" in rows
    # The CSVs are final: every answered request the locustfile saw is in them.
    in_csv = {name: int(row["Request Count"]) for name, row in rows.items() if name != "Aggregated"}
    assert in_csv == counted["requests"]
    for name, row in rows.items():
        entry = summary[name]
        assert entry["requests"] == int(row["Request Count"]) and entry["failures"] == int(row["Failure Count"])
        assert entry["requests_per_s"] == pytest.approx(float(row["Requests/s"]))
        assert (entry["p50_ms"], entry["p95_ms"], entry["p99_ms"]) == (
            float(row["50%"]),
            float(row["95%"]),
            float(row["99%"]),
        )
        scored = sum(images.values()) if name == "Aggregated" else images.get(name, 0)
        assert entry["images"] == scored
        assert entry["images_per_s"] == pytest.approx(scored / int(row["Request Count"]) * float(row["Requests/s"]))
        # Locust buckets response times (3432 ms counts as 3400): percentiles may pass the exact max.
        assert entry["p50_ms"] <= entry["p95_ms"] <= entry["p99_ms"]


def test_modest_load_has_no_failures_and_counts_images_per_request(load_run: tuple[int, Path]) -> None:
    _, out = load_run
    summary = json.loads((out / "summary.json").read_text())
    endpoints = summary["endpoints"]
    assert summary["failures"] == [] and endpoints["Aggregated"]["failures"] == 0
    assert endpoints["/match"]["requests"] > 0 and endpoints["/rank"]["requests"] > 0
    for name, (fewest, most) in IMAGES_PER_REQUEST.items():
        if name in endpoints:
            assert (
                fewest * endpoints[name]["requests"] <= endpoints[name]["images"] <= most * endpoints[name]["requests"]
            )
    # The service scored at least what the clients saw answered (it may also finish requests cut at the stop).
    assert summary["server_items_scored"] >= endpoints["Aggregated"]["images"] > 0


def test_baseline_answers_score_like_the_service(bus_path: Path) -> None:
    from rewardscope_client.images import encode_image

    photos = generator_like_photos()
    items = [
        {**encode_image(photos["bus"], "npy"), "prompt": PROMPTS["bus"]},
        {**encode_image(photos["zidane"], "jpeg"), "prompt": PROMPTS["zidane"]},
        {"image": base64.b64encode(bus_path.read_bytes()).decode(), "prompt": "a cat and two dogs"},
        {"image": "not base64 at all!", "prompt": "a cat"},
        {**encode_image(photos["chelsea"], "jpeg"), "prompt": "a rocket launch"},  # nothing countable
    ]
    answers = []
    with running_server() as service_url, running_baseline() as baseline_url:
        for url in (service_url, baseline_url):
            response = httpx.post(url + "/score", json={"items": items}, timeout=120)
            assert response.status_code == 200, response.text
            answers.append(response.json())
    service, baseline = answers
    assert baseline == service
    assert service[0]["rewards"]["matching"] > 0.5 and service[3]["error_code"] == "bad_base64"
    assert service[4]["error_code"] == "no_countable_object" and service[4]["versions"]
