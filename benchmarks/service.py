"""Benchmark: images/s through the HTTP service (real `bentoml serve` on 127.0.0.1) at concurrency 1, 8 and
32, against the in-process Scorer on the same images, measured side by side in one run.

Run: .venv/bin/python benchmarks/service.py [--images 96] [--per-request 1]"""

from __future__ import annotations

import argparse
import base64
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import httpx  # noqa: E402
from serving import running_server  # noqa: E402

from rewardscope import Scorer  # noqa: E402


def photos() -> list[bytes]:
    import ultralytics

    assets = Path(ultralytics.__file__).parent / "assets"
    return [(assets / name).read_bytes() for name in ("bus.jpg", "zidane.jpg")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=96, help="images per measurement")
    parser.add_argument("--per-request", type=int, default=1, help="images per HTTP request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()

    sources = photos()
    images = [sources[i % len(sources)] for i in range(args.images)]
    prompts = ["four people and a bus" if i % 2 == 0 else "two people" for i in range(args.images)]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.images} JPEG images, {args.per_request}/request"
    )

    scorer = Scorer(["matching"], config={"matching": {"batch_size": 32}})
    scorer.score(images[:4], prompts[:4])  # warm-up
    started = time.perf_counter()
    for start in range(0, len(images), 32):
        scorer.score(images[start : start + 32], prompts[start : start + 32])
    in_process = len(images) / (time.perf_counter() - started)
    print(f"in-process Scorer (batches of 32): {in_process:.1f} images/s")

    encoded = [base64.b64encode(image).decode() for image in images]
    requests = [
        {
            "items": [
                {"image": encoded[j], "prompt": prompts[j]} for j in range(i, min(i + args.per_request, len(images)))
            ]
        }
        for i in range(0, len(images), args.per_request)
    ]
    with running_server() as base_url:
        with httpx.Client(base_url=base_url, timeout=300, limits=httpx.Limits(max_connections=64)) as client:
            client.post("/score", json=requests[0])  # warm-up
            print(f"\n{'concurrency':>11} {'images/s':>9} {'vs in-process':>14} {'errors':>7}")
            for concurrency in args.concurrency:
                started = time.perf_counter()
                with ThreadPoolExecutor(concurrency) as pool:
                    statuses = list(pool.map(lambda body: client.post("/score", json=body).status_code, requests))
                rate = len(images) / (time.perf_counter() - started)
                errors = sum(status != 200 for status in statuses)
                print(f"{concurrency:>11} {rate:>9.1f} {rate / in_process:>14.2f} {errors:>7}")


if __name__ == "__main__":
    main()
