"""Benchmark: the service (`rewardscope serve`: decode threads, work-conserving batching on two model lanes, 503
shedding) against a reward-server-style baseline (loadtests/baseline_server.py: Flask behind one gunicorn sync
worker, one request at a time), both with the same Scorer and embedded detector, under the same closed-loop load
at concurrency 1, 8, 32 and 64, side by side in one run: per concurrency, windows in the order A B B A, so
drifting background load hits both alike.
Each client thread has its own httpx client and sends the next request as soon as its last one is answered (after
a 503, once Retry-After has passed); every request carries 4 JPEG-encoded 512x512 photos (bus, zidane, skimage
astronaut/chelsea/coffee/rocket/motorcycle) with prompts, base64 in JSON, the same bodies for both sides.

Per side and concurrency: images/s (images in 200 answers whose items all scored, answered in the measured
windows, / their length), p50/p99 latency over those successful requests only, p99 "e2e" of the same requests
from their first try (a request shed with 503 is sent again after Retry-After), and apart from them the 503s
(by the service's in-flight limit, or its latency budget) and other errors; and the CPU time all of the
server's processes spent per such image, which other jobs on a shared machine disturb less than wall time.
Then the service's batch-size curve (REWARDSCOPE_MAX_BATCH_SIZE 1..32, 1 image per request at concurrency 32, a
fresh server per size) beside the detector alone (letterbox + forward) at batch sizes 1..32.

Run: .venv/bin/python benchmarks/service_vs_baseline.py [--duration 30] [--warmup 5] [--skip-curve]"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import random
import re
import statistics
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _name, _value in (("YOLO_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1")):
    os.environ.setdefault(_name, _value)
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import httpx  # noqa: E402
import psutil  # noqa: E402
from rewardscope_client.images import encode_image  # noqa: E402
from serving import running_server, server_tree  # noqa: E402

from loadtests import PROMPTS, generator_like_photos  # noqa: E402
from loadtests.baseline_server import running_baseline  # noqa: E402

CONCURRENCY = (1, 8, 32, 64)
BATCH_SIZES = (1, 2, 4, 8, 16, 32)
HEADERS = {"content-type": "application/json"}


@dataclass
class Window:
    """What one side answered inside one measured window of closed-loop load."""

    seconds: float
    latencies_ms: list[float] = field(default_factory=list)  # requests answered 200 with every item scored
    # the same requests from their first attempt: a request shed with 503 and retried counts all its tries
    end_to_end_ms: list[float] = field(default_factory=list)
    shed: Counter[str] = field(default_factory=Counter)  # 503s by who refused: in-flight limit or latency budget
    errors: int = 0  # anything else: other statuses, items with errors, transport failures
    cpu_seconds: float = 0.0  # CPU time of the server's processes over the window (all of its threads)


@dataclass
class Point:
    side: str
    concurrency: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    p99_end_to_end_ms: float
    ok: int
    shed: Counter[str]
    errors: int
    cpu_ms_per_image: float

    @classmethod
    def pooled(cls, side: str, concurrency: int, per_request: int, windows: list[Window]) -> Point:
        latencies = [latency for window in windows for latency in window.latencies_ms]
        end_to_end = [latency for window in windows for latency in window.end_to_end_ms]
        images = len(latencies) * per_request
        return cls(
            side,
            concurrency,
            len(latencies) * per_request / sum(window.seconds for window in windows),
            statistics.median(latencies) if latencies else float("nan"),
            percentile(latencies, 99) if latencies else float("nan"),
            percentile(end_to_end, 99) if end_to_end else float("nan"),
            len(latencies),
            sum((window.shed for window in windows), Counter()),
            sum(window.errors for window in windows),
            sum(window.cpu_seconds for window in windows) * 1e3 / images if images else float("nan"),
        )


def request_bodies(per_request: int, count: int = 28) -> list[bytes]:
    """`count` /score bodies of `per_request` JPEG items each, cycling through the photos."""
    photos = generator_like_photos()
    items = [{**encode_image(pixels, "jpeg"), "prompt": PROMPTS[name]} for name, pixels in photos.items()]
    return [
        json.dumps({"items": [items[(start + k) % len(items)] for k in range(per_request)]}).encode()
        for start in range(count)
    ]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def shed_reason(response: httpx.Response) -> str:
    """Why the service answered 503: its in-flight limit (N requests in flight), or its latency budget (the work
    already queued would take longer than max_latency_ms)."""
    return "in-flight limit" if "in flight" in response.text else "latency budget"


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def closed_loop(
    url: str, bodies: list[bytes], per_request: int, concurrency: int, warmup_s: float, duration_s: float
) -> Window:
    """`concurrency` threads, each posting the next body as soon as its last answer came back (after a 503, once
    its Retry-After has passed, as rewardscope_client does). Answers that arrive within [start + warmup,
    start + warmup + duration] are measured; the rest warm up or drain."""
    started = time.monotonic()
    window = (started + warmup_s, started + warmup_s + duration_s)
    measured = Window(duration_s)
    lock = threading.Lock()

    def client_thread(offset: int) -> None:
        with httpx.Client(timeout=600) as client:
            sent_count = offset
            first_try: float | None = None
            while time.monotonic() < window[1]:
                body = bodies[sent_count % len(bodies)]
                sent = time.monotonic()
                first_try = sent if first_try is None else first_try
                response = None
                try:
                    response = client.post(url + "/score", content=body, headers=HEADERS)
                    answer = response.json() if response.status_code == 200 else None
                    scored = answer is not None and len(answer) == per_request
                    scored = scored and all(item["error"] is None for item in answer)
                except (httpx.HTTPError, ValueError):
                    scored = False
                answered = time.monotonic()
                retried = response is not None and response.status_code == 503
                if window[0] <= answered <= window[1]:
                    with lock:
                        if scored:
                            measured.latencies_ms.append((answered - sent) * 1e3)
                            measured.end_to_end_ms.append((answered - first_try) * 1e3)
                        elif response is not None and response.status_code == 503:
                            measured.shed[shed_reason(response)] += 1
                        else:
                            measured.errors += 1
                if retried:  # the same body again, after Retry-After, as rewardscope_client does
                    time.sleep(float(response.headers.get("retry-after", 1)) + random.uniform(0, 0.05))
                else:
                    sent_count += concurrency
                    first_try = None

    processes = server_tree(url)
    with ThreadPoolExecutor(concurrency) as pool:
        threads = [pool.submit(client_thread, offset) for offset in range(concurrency)]
        time.sleep(max(0.0, window[0] - time.monotonic()))
        cpu_start = cpu_seconds(processes)
        time.sleep(max(0.0, window[1] - time.monotonic()))
        measured.cpu_seconds = cpu_seconds(processes) - cpu_start
        for thread in threads:
            thread.result()
    return measured


def warm(url: str, bodies: list[bytes], requests: int = 8) -> None:
    with httpx.Client(timeout=600) as client:
        for body in bodies[:requests]:
            client.post(url + "/score", content=body, headers=HEADERS).raise_for_status()


def mean_batch(url: str) -> float:
    """Mean items per batched /score call, from the service's rewardscope_batch_size histogram."""
    text = httpx.get(url + "/metrics", timeout=10).text

    def value(series: str) -> float:
        found = re.search(rf'^rewardscope_batch_size_{series}\{{endpoint="score"\}}\s+([0-9.e+]+)$', text, re.M)
        return float(found.group(1)) if found else float("nan")

    return value("sum") / value("count")


def gc_pauses(url: str) -> str:
    """The service's garbage-collector pauses so far, per generation: count and total seconds."""
    text = httpx.get(url + "/metrics", timeout=10).text
    parts = []
    for generation in ("0", "1", "2"):
        found = {
            kind: re.search(
                rf'^rewardscope_gc_pause_seconds_{kind}\{{generation="{generation}"\}}\s+([0-9.e+]+)$', text, re.M
            )
            for kind in ("count", "sum")
        }
        if found["count"]:
            count, total = (float(found[kind].group(1)) for kind in ("count", "sum"))
            parts.append(f"gen{generation}: {count:.0f} collections, {total * 1e3:.0f} ms")
    return "; ".join(parts) or "not exported"


def detector_curve(sizes: list[int], repeats: int) -> dict[int, tuple[float, float]]:
    """Detector alone at each batch size: (letterbox ms/image, forward ms/image), median of `repeats`."""
    from common import timed
    from PIL import Image
    from rewardscope.models.detection.detector import DetectorConfig, OnnxDetector, letterbox_batch
    from rewardscope.models.detection.export import embedded_detector_path

    images = [Image.fromarray(pixels) for pixels in generator_like_photos().values()]
    detector = OnnxDetector(embedded_detector_path(), DetectorConfig(batch_size=max(sizes)))
    height, width = detector.input_size
    curve = {}
    for size in sizes:
        batch_images = [images[i % len(images)] for i in range(size)]
        batch, _ = letterbox_batch(batch_images, height, width)
        letterbox = timed(lambda b=batch_images: letterbox_batch(b, height, width), repeats) / size
        forward = timed(lambda b=batch: detector.forward(b), repeats) / size
        curve[size] = (letterbox * 1e3, forward * 1e3)
    return curve


def point_row(point: Point) -> str:
    return (
        f"{point.concurrency:>11} {point.side:>8} {point.images_per_s:>9.1f} {point.p50_ms:>8.0f}"
        f" {point.p99_ms:>8.0f} {point.p99_end_to_end_ms:>9.0f} {point.ok:>5}"
        f" {point.shed['in-flight limit']:>13} {point.shed['latency budget']:>10}"
        f" {point.errors:>6} {point.cpu_ms_per_image:>12.1f}"
    )


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--duration", type=float, default=30, help="measured seconds per side and concurrency (two windows)"
    )
    parser.add_argument("--warmup", type=float, default=5, help="unmeasured seconds before each window")
    parser.add_argument("--per-request", type=int, default=4, help="images per /score request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    parser.add_argument("--curve-duration", type=float, default=15, help="measured seconds per batch size")
    parser.add_argument("--skip-curve", action="store_true", help="only the service-vs-baseline table")
    parser.add_argument("--server-env", action="append", default=[], help="KEY=VALUE for the service only")
    args = parser.parse_args()
    server_env = dict(entry.split("=", 1) for entry in args.server_env)

    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; load {load()}")
    print(
        f"requests: {args.per_request} JPEG 512x512 images each; per side and concurrency 2 windows of"
        f" {args.warmup}s warm-up + {args.duration / 2}s measured, in the order A B B A"
    )
    bodies = request_bodies(args.per_request)
    points: list[Point] = []
    header = (
        f"{'concurrency':>11} {'side':>8} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'p99 e2e':>9} {'ok':>5}"
        f" {'503 in-flight':>13} {'503 budget':>10} {'errors':>6} {'CPU ms/image':>12}  load"
    )
    with running_server(server_env) as service_url, running_baseline() as baseline_url:
        sides = {"service": service_url, "baseline": baseline_url}
        for url in sides.values():
            warm(url, bodies)
        print(f"\n{header}")
        for turn, concurrency in enumerate(args.concurrency):
            # A B B A, half the duration each: a drift in the shared machine's load falls on both sides alike.
            first, second = ("service", "baseline") if turn % 2 == 0 else ("baseline", "service")
            windows: dict[str, list[Window]] = {first: [], second: []}
            for side in (first, second, second, first):
                windows[side].append(
                    closed_loop(sides[side], bodies, args.per_request, concurrency, args.warmup, args.duration / 2)
                )
            for side in sides:
                point = Point.pooled(side, concurrency, args.per_request, windows[side])
                points.append(point)
                print(point_row(point) + f"  {load()}", flush=True)
        print(f"service garbage-collector pauses: {gc_pauses(service_url)}")
    print(
        f"\n{'concurrency':>11} {'images/s ratio':>15} {'p99 ratio':>10} {'p99 e2e ratio':>14}   (service / baseline)"
    )
    for concurrency in args.concurrency:
        service, baseline = (
            next(p for p in points if p.side == side and p.concurrency == concurrency) for side in sides
        )
        print(
            f"{concurrency:>11} {service.images_per_s / baseline.images_per_s:>15.2f}"
            f" {service.p99_ms / baseline.p99_ms:>10.2f}"
            f" {service.p99_end_to_end_ms / baseline.p99_end_to_end_ms:>14.2f}"
        )
    if args.skip_curve:
        return

    single = request_bodies(1)
    print("\nservice batch-size curve: 1 image per request, concurrency 32, a fresh server per max batch size")
    print(f"{'max batch':>9} {'mean batch':>10} {'images/s':>9} {'ms/image':>9} {'p99 ms':>8} {'503':>5}  load")
    for size in args.batch_sizes:
        with running_server({**server_env, "REWARDSCOPE_MAX_BATCH_SIZE": str(size)}) as url:
            warm(url, single, 16)
            window = closed_loop(url, single, 1, 32, args.warmup, args.curve_duration)
            batch = mean_batch(url)
        point = Point.pooled("service", 32, 1, [window])
        print(
            f"{size:>9} {batch:>10.1f} {point.images_per_s:>9.1f} {1e3 / point.images_per_s:>9.2f}"
            f" {point.p99_ms:>8.0f} {sum(point.shed.values()):>5}  {load()}",
            flush=True,
        )
    print("\ndetector alone (same photos, pre-decoded; median of 5)")
    print(f"{'batch':>5} {'letterbox ms/image':>18} {'forward ms/image':>16} {'images/s':>9}")
    for size, (letterbox, forward) in detector_curve(args.batch_sizes, 5).items():
        print(f"{size:>5} {letterbox:>18.2f} {forward:>16.2f} {1e3 / (letterbox + forward):>9.1f}")
    print(f"\nload at the end: {load()}")


if __name__ == "__main__":
    main()
