"""Soak test of the served RewardService: measure its capacity (closed-loop images/s), then hold a paced
open-loop load at a fraction of it for a long time while sampling the server's memory. It passes with zero
errors and resident memory (RSS, summed over the server's process tree: `bentoml serve` spawns its workers)
growing less than 5 % from the warm-up sample to the last. Also holds the load primitives (closed loop, paced
open loop, one httpx.Client per thread) that tests/test_overload.py reuses. Traffic goes to 127.0.0.1 only.

Run: .venv/bin/python loadtests/soak.py [--duration 1800] [--load 0.8] [--sample-s 60] [--out DIR]
Writes DIR/report.json (rewritten at every sample while running, verdict "running"); exit status 1 on failure.

Warm-up: the capacity phase already sends every batch shape through the server, so the run's warm-up only has to
cover allocator arenas settling under the steady load: the first sample taken at or after --warmup-s seconds
(default min(120 s, a quarter of the run)) is the baseline the last sample is compared with."""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import math
import os
import platform
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

from serving import running_server, server_process  # noqa: E402

MAX_RSS_GROWTH = 0.05
SCORE_TOLERANCE = 1e-6  # the same image scored in different batches may differ in the last float bits
LATE_S = 1.0  # a paced request sent more than this after its due time counts as late

# A 200 answer -> None when every item is right, else what is wrong with it.
Check = Callable[[httpx.Response], str | None]


@dataclass
class Outcome:
    """One request: when it was due and sent (seconds after the load started), and how it ended."""

    due: float
    sent: float
    latency: float
    status: int | None  # None: no answer at all (connection error, timeout)
    retry_after: str | None = None
    error: str | None = None  # the transport failure, or what the check found wrong in a 200 answer


def score_body(image: bytes, prompt: str, items: int) -> bytes:
    """A /score request body of `items` copies of one encoded image, serialised once so senders only send."""
    entry = {"image": base64.b64encode(image).decode(), "prompt": prompt}
    return json.dumps({"items": [entry] * items}).encode()


def default_photo() -> Path:
    """bus.jpg from ultralytics' assets: four people and a bus, which the embedded detector finds."""
    import ultralytics

    return Path(ultralytics.__file__).parent / "assets" / "bus.jpg"


def totals_check(reference: list[float]) -> Check:
    """Accept a /score answer only when every item has no error and the reference's total."""

    def check(response: httpx.Response) -> str | None:
        try:
            items = response.json()
        except ValueError:
            return f"answer is not JSON: {response.text[:200]!r}"
        if not isinstance(items, list) or len(items) != len(reference):
            return f"expected {len(reference)} items, got {str(items)[:200]}"
        for index, (item, expected) in enumerate(zip(items, reference, strict=True)):
            if item.get("error") is not None:
                return f"item {index}: {item.get('error_code')}: {item['error']}"
            total = item.get("total")
            if not isinstance(total, float | int) or not abs(total - expected) <= SCORE_TOLERANCE:
                return f"item {index}: total {total} != {expected}"
        return None

    return check


def send(client: httpx.Client, url: str, body: bytes, check: Check | None, due: float, origin: float) -> Outcome:
    """POST one pre-serialised body to url/score and record its outcome; never raises for transport failures."""
    sent = time.monotonic()
    try:
        response = client.post(url + "/score", content=body, headers={"content-type": "application/json"})
    except httpx.HTTPError as exc:
        return Outcome(due, sent - origin, time.monotonic() - sent, None, error=f"{type(exc).__name__}: {exc}")
    latency = time.monotonic() - sent
    error = check(response) if check is not None and response.status_code == 200 else None
    return Outcome(due, sent - origin, latency, response.status_code, response.headers.get("retry-after"), error)


def run_threads(target: Callable[[], None], count: int) -> None:
    """Runs `target` on `count` daemon threads at once and waits until every one has returned."""
    threads = [threading.Thread(target=target, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def closed_loop(
    url: str, body: bytes, clients: int, seconds: float, check: Check | None = None, timeout: float = 120
) -> tuple[list[Outcome], float]:
    """`clients` threads each send the next request as soon as the last is answered, for `seconds`.
    Returns the outcomes and the wall time from start to the last answer."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    origin = time.monotonic()
    stop = origin + seconds

    def client_loop() -> None:
        with httpx.Client(timeout=timeout) as client:
            while time.monotonic() < stop:
                outcome = send(client, url, body, check, time.monotonic() - origin, origin)
                with lock:
                    outcomes.append(outcome)

    run_threads(client_loop, clients)
    return sorted(outcomes, key=lambda outcome: outcome.due), time.monotonic() - origin


def paced(
    url: str,
    body: bytes,
    rate: float,
    count: int,
    workers: int,
    check: Check | None = None,
    timeout: float = 120,
    last_sent: threading.Event | None = None,
    sink: list[Outcome] | None = None,
) -> list[Outcome]:
    """Open loop: request k is due at k / rate seconds, whatever the answers so far; `workers` threads take the
    due times in order, so the offered rate holds while fewer than `workers` requests are unanswered (beyond,
    requests go out late: Outcome.sent - Outcome.due). `last_sent` is set when the last request goes out;
    outcomes are appended to `sink` as they come, for progress reports."""
    outcomes: list[Outcome] = [] if sink is None else sink
    lock = threading.Lock()
    next_index = 0
    origin = time.monotonic() + 0.05

    def worker() -> None:
        nonlocal next_index
        with httpx.Client(timeout=timeout) as client:
            while True:
                with lock:
                    index, next_index = next_index, next_index + 1
                if index >= count:
                    return
                due = index / rate
                time.sleep(max(0.0, origin + due - time.monotonic()))
                if index == count - 1 and last_sent is not None:
                    last_sent.set()
                outcome = send(client, url, body, check, due, origin)
                with lock:
                    outcomes.append(outcome)

    run_threads(worker, workers)
    return sorted(outcomes, key=lambda outcome: outcome.due)


def items_scored(url: str) -> float:
    """Items the server's models scored so far (rewardscope_items_total over endpoints, from /metrics)."""
    metrics = httpx.get(url + "/metrics", timeout=30).text
    return sum(float(line.split(" ")[1]) for line in metrics.splitlines() if line.startswith("rewardscope_items_total"))


def tree_rss(root: psutil.Process) -> tuple[int, int]:
    """(RSS bytes summed over root and all its descendants, number of processes)."""
    total, processes = 0, 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
            processes += 1
        except psutil.NoSuchProcess:  # a worker restarting between listing and reading
            pass
    return total, processes


def rss_summary(samples: list[dict[str, float]], warmup_s: float) -> dict[str, Any]:
    """Growth of the last sample over the warm-up sample (the first at or after warmup_s), and the maximum.
    samples: [{"t_s": seconds into the run, "rss_bytes": ...}] in time order."""
    after = [sample for sample in samples if sample["t_s"] >= warmup_s]
    if len(after) < 2:
        return {
            "warmup_s": warmup_s,
            "growth": None,
            "below_limit": False,
            "reason": "fewer than 2 samples after warm-up",
        }
    baseline, last = after[0], after[-1]
    peak = max(after, key=lambda sample: sample["rss_bytes"])
    growth = last["rss_bytes"] / baseline["rss_bytes"] - 1
    return {
        "warmup_s": warmup_s,
        "warmup_sample": baseline,
        "last_sample": last,
        "max_sample": peak,
        "growth": growth,
        "max_growth": peak["rss_bytes"] / baseline["rss_bytes"] - 1,
        "limit": MAX_RSS_GROWTH,
        "below_limit": growth < MAX_RSS_GROWTH,
    }


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def outcome_counts(outcomes: list[Outcome], items: int) -> dict[str, Any]:
    """Requests by how they ended; an error is any non-200 answer, no answer, or a wrong 200 answer."""
    statuses = Counter(str(outcome.status) for outcome in outcomes if outcome.status is not None)
    ok = [outcome for outcome in outcomes if outcome.status == 200 and outcome.error is None]
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "items_ok": len(ok) * items,
        "statuses": dict(statuses),
        "transport_errors": sum(outcome.status is None for outcome in outcomes),
        "item_errors": sum(outcome.status == 200 and outcome.error is not None for outcome in outcomes),
        "errors": len(outcomes) - len(ok),
    }


def soak(args: argparse.Namespace, progress: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Start the service, measure capacity, hold the paced load while sampling RSS; return the report."""
    body = score_body(args.image.read_bytes(), args.prompt, args.items)
    report: dict[str, Any] = {
        "command": [sys.executable, *sys.argv],
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "config": {name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items()},
        "verdict": "running",
    }
    with running_server(args.env) as url:
        with httpx.Client(timeout=120) as client:
            first = client.post(url + "/score", content=body, headers={"content-type": "application/json"})
        first.raise_for_status()
        reference = [item["total"] for item in first.json()]
        if any(item["error"] is not None for item in first.json()):
            raise RuntimeError(f"the soak image fails on its own: {first.json()[0]['error']}")
        check = totals_check(reference)
        root = server_process(url)
        report["server"] = {"url": url, "pid": root.pid, "reference_totals": reference}

        closed_loop(url, body, args.capacity_clients, min(5.0, args.capacity_s), check)  # warm every batch shape
        outcomes, seconds = closed_loop(url, body, args.capacity_clients, args.capacity_s, check)
        capacity = outcome_counts(outcomes, args.items)
        capacity_rate = capacity["items_ok"] / seconds
        report["capacity"] = {
            **capacity,
            "clients": args.capacity_clients,
            "seconds": seconds,
            "images_per_s": capacity_rate,
            "latency_p50_s": percentile([outcome.latency for outcome in outcomes], 50),
        }
        if capacity["errors"] or capacity_rate <= 0:
            report["verdict"] = "fail"
            failed = [outcome for outcome in outcomes if outcome.error or outcome.status != 200]
            report["errors"] = [outcome.error or str(outcome.status) for outcome in failed][:20]
            return report

        rate = args.load * capacity_rate / args.items  # requests/s
        count = max(1, int(rate * args.duration))
        report["target"] = {"images_per_s": args.load * capacity_rate, "requests_per_s": rate, "requests": count}
        scored_before = items_scored(url)
        results: list[Outcome] = []
        runner = threading.Thread(
            target=paced, args=(url, body, rate, count, args.workers, check), kwargs={"sink": results}, daemon=True
        )
        samples: list[dict[str, float]] = []
        started = time.monotonic()
        runner.start()
        for index in range(int(args.duration // args.sample_s) + 1):
            time.sleep(max(0.0, started + index * args.sample_s - time.monotonic()))
            rss, processes = tree_rss(root)
            samples.append({"t_s": round(time.monotonic() - started, 3), "rss_bytes": rss, "processes": processes})
            progress({**report, "counts": outcome_counts(list(results), args.items), "rss": {"samples": samples}})
        runner.join()
        results.sort(key=lambda outcome: outcome.due)
        elapsed = time.monotonic() - started
        scored = items_scored(url) - scored_before

    counts = outcome_counts(results, args.items)
    latencies = [outcome.latency for outcome in results if outcome.status is not None]
    lags = [outcome.sent - outcome.due for outcome in results]
    rss = {**rss_summary(samples, args.warmup_s), "samples": samples}
    report.update(
        counts=counts,
        items_scored_by_server=scored,
        offered={
            "requests_per_s": len(results) / elapsed,
            "seconds": elapsed,
            "late_requests": sum(lag > LATE_S for lag in lags),
            "max_lag_s": max(lags, default=0.0),
        },
        latency_s={
            "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99),
            "max": max(latencies, default=None),
        },
        rss=rss,
        errors=[
            f"t={outcome.due:.1f}s: {outcome.error or outcome.status}"
            for outcome in results
            if outcome.error or outcome.status != 200
        ][:20],
    )
    report["checks"] = {
        "zero_errors": counts["errors"] == 0 and counts["requests"] == count,
        "rss_growth_below_limit": rss["below_limit"],
        # Every item answered was scored once, and nothing else was: no lost or duplicated work.
        "server_scored_what_was_answered": math.isclose(scored, counts["items_ok"]),
    }
    report["verdict"] = "pass" if all(report["checks"].values()) else "fail"
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=1800, help="seconds of paced load (default 30 min)")
    parser.add_argument("--load", type=float, default=0.8, help="fraction of the measured capacity to offer")
    parser.add_argument("--sample-s", type=float, default=60, help="seconds between RSS samples")
    parser.add_argument("--warmup-s", type=float, help="baseline = first sample at or after this; min(120, dur/4)")
    parser.add_argument("--capacity-s", type=float, default=20, help="seconds of the closed-loop capacity run")
    parser.add_argument("--capacity-clients", type=int, default=4, help="closed-loop clients measuring capacity")
    parser.add_argument("--workers", type=int, default=6, help="threads sending the paced load")
    parser.add_argument("--items", type=int, default=4, help="images per /score request")
    parser.add_argument("--image", type=Path, default=None, help="the photo scored (default: bus.jpg)")
    parser.add_argument("--prompt", default="four people and a bus")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="server environment")
    parser.add_argument("--out", type=Path, default=Path("soak-report"), help="directory for report.json")
    args = parser.parse_args(argv)
    if args.warmup_s is None:
        args.warmup_s = min(120.0, args.duration / 4)
    args.image = args.image or default_photo()
    args.env = dict(entry.split("=", 1) for entry in args.env)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Offline, like the test suite: nothing may reach for weights over the network.
    for name, value in (("YOLO_OFFLINE", "1"), ("YOLO_AUTOINSTALL", "false"), ("HF_HUB_OFFLINE", "1")):
        os.environ.setdefault(name, value)
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "report.json"

    def write(report: dict[str, Any]) -> None:
        partial = path.with_suffix(".json.tmp")
        partial.write_text(json.dumps(report, indent=2, default=str))
        partial.replace(path)  # readers never see half a report

    report = soak(args, write)
    write(report)
    rss = report.get("rss", {})
    print(
        f"{report['verdict']}: {report.get('counts', {}).get('requests', 0)} requests, "
        f"{report.get('counts', {}).get('errors', 'n/a')} errors, RSS growth {rss.get('growth')}, "
        f"p50/p99 {report.get('latency_s', {}).get('p50')}/{report.get('latency_s', {}).get('p99')} s -> {path}"
    )
    return 0 if report["verdict"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
