"""The soak test's CI version: loadtests/soak.py for 60 s at 80 % of the measured capacity must end with zero
errors, flat server memory and a report that accounts for every request. Warm-up for 60 s: soak.py's default,
a quarter of the run (15 s), which suffices because its capacity phase has already run the server at full
load before the paced run starts. The long run is the same command with --duration 1800."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from serving import ROOT

sys.path.insert(0, str(ROOT))
from loadtests.soak import MAX_RSS_GROWTH, Outcome, outcome_counts, rss_summary  # noqa: E402

MB = 1 << 20


def samples(*megabytes: float, every_s: float = 5.0) -> list[dict[str, float]]:
    return [{"t_s": index * every_s, "rss_bytes": value * MB} for index, value in enumerate(megabytes)]


@pytest.mark.parametrize(
    ("rss_mb", "warmup_s", "growth", "passes"),
    [
        ((1000, 1000, 1000, 1000), 5, 0.0, True),
        ((1000, 1000, 1020, 1049), 5, 0.049, True),
        ((1000, 1000, 1030, 1060), 5, 0.06, False),  # a leak of 6 % over the run
        ((500, 900, 1000, 1000, 1010), 9, 0.01, True),  # growth during warm-up does not count
        ((1000, 1000, 1400, 1000), 5, 0.0, True),  # a transient peak is reported, not judged
        ((1000, 1000, 1000), 10, None, False),  # one sample after warm-up: nothing to compare
    ],
)
def test_rss_growth_is_judged_from_the_warm_up_sample_to_the_last(rss_mb, warmup_s, growth, passes):
    summary = rss_summary(samples(*rss_mb), warmup_s)
    assert summary["below_limit"] is passes
    if growth is None:
        assert summary["growth"] is None
        return
    assert summary["growth"] == pytest.approx(growth, abs=1e-9)
    assert summary["warmup_sample"]["t_s"] >= warmup_s
    assert summary["max_sample"]["rss_bytes"] == max(rss_mb[1:]) * MB


def test_every_answer_but_a_correct_200_counts_as_an_error():
    outcomes = [
        Outcome(0.0, 0.0, 0.1, 200),
        Outcome(0.1, 0.1, 0.1, 200, error="item 2: total 0.1 != 0.8"),
        Outcome(0.2, 0.2, 0.0, 503, retry_after="1"),
        Outcome(0.3, 0.3, 30.0, None, error="ReadTimeout: timed out"),
        Outcome(0.4, 0.4, 0.1, 200),
    ]
    counts = outcome_counts(outcomes, items=4)
    assert counts == {
        "requests": 5,
        "ok": 2,
        "items_ok": 8,
        "statuses": {"200": 3, "503": 1},
        "transport_errors": 1,
        "item_errors": 1,
        "errors": 3,
    }


@pytest.mark.slow
def test_a_minute_at_eighty_percent_of_capacity_has_no_errors_and_flat_memory(tmp_path):
    out = tmp_path / "soak"
    command = [sys.executable, str(ROOT / "loadtests" / "soak.py"), "--duration", "60", "--sample-s", "5"]
    command += ["--capacity-s", "10", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert (out / "report.json").exists(), result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-3000:]}\n{json.dumps(report)[:3000]}"
    assert report["verdict"] == "pass"
    assert report["checks"] == {
        "zero_errors": True,
        "rss_growth_below_limit": True,
        "server_scored_what_was_answered": True,
    }

    # The paced load: 80 % of the measured capacity, every request answered 200 with the reference scores.
    capacity, target, counts = report["capacity"], report["target"], report["counts"]
    assert capacity["errors"] == 0 and capacity["images_per_s"] > 0
    assert target["images_per_s"] == pytest.approx(0.8 * capacity["images_per_s"])
    assert counts["requests"] == counts["ok"] == target["requests"] > 0
    assert counts["statuses"] == {"200": counts["requests"]} and report["errors"] == []
    assert report["items_scored_by_server"] == counts["items_ok"] == 4 * counts["ok"]
    assert 0 < report["latency_s"]["p50"] <= report["latency_s"]["p99"] <= report["latency_s"]["max"]

    # Memory: a sample every 5 s over the whole minute, judged from the first sample after 15 s to the last.
    rss = report["rss"]
    times = [sample["t_s"] for sample in rss["samples"]]
    assert len(times) == 13 and times == sorted(times) and times[-1] >= 60
    assert rss["warmup_s"] == 15 and rss["warmup_sample"]["t_s"] >= 15
    assert rss["warmup_sample"] == next(sample for sample in rss["samples"] if sample["t_s"] >= 15)
    assert rss["last_sample"] == rss["samples"][-1]
    assert rss["growth"] == pytest.approx(rss["last_sample"]["rss_bytes"] / rss["warmup_sample"]["rss_bytes"] - 1)
    assert rss["growth"] < MAX_RSS_GROWTH
    after_warmup = [sample for sample in rss["samples"] if sample["t_s"] >= 15]
    assert rss["max_sample"]["rss_bytes"] == max(sample["rss_bytes"] for sample in after_warmup)
    assert all(sample["processes"] >= 2 for sample in rss["samples"])  # `bentoml serve` and its worker
