"""Benchmark: Python's garbage-collector pauses in a loaded service process, before and after gc.freeze().

The service imports BentoML, torch and the models: a few hundred thousand objects the collector tracks. Each full
(generation 2) collection walks all of them with the GIL held, stalling every request in flight. The service
freezes what start-up loaded (service/app.py); this measures what that buys, in one run: the same /score work
(RewardEngine.score on 4-image requests, answers serialised as the service does) with the collector's callbacks
timing every collection, first as start-up leaves the heap, then after gc.freeze(). As in a loaded server, the
last `--in-flight` requests stay alive (their decoded items and answers), so objects outlive the young
generations as they do while requests queue.

Run: .venv/bin/python benchmarks/gc_pauses.py [--requests 200] [--in-flight 64]"""

from __future__ import annotations

import argparse
import base64
import collections
import gc
import io
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

import service.app  # noqa: E402,F401 - the service's imports, as a served worker holds them
from loadtests import PROMPTS, generator_like_photos  # noqa: E402
from service.engine import RewardEngine  # noqa: E402
from service.schemas import ScoreItem  # noqa: E402
from service.settings import ServiceSettings  # noqa: E402


def requests(count: int) -> list[list[ScoreItem]]:
    from PIL import Image

    items = []
    for name, pixels in generator_like_photos().items():
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        items.append(ScoreItem(image=base64.b64encode(buffer.getvalue()).decode(), prompt=PROMPTS[name]))
    return [[items[(start + k) % len(items)] for k in range(4)] for start in range(count)]


def run(engine: RewardEngine, bodies: list[list[ScoreItem]], in_flight: int) -> tuple[float, dict[int, list[float]]]:
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started: list[float] = []

    def timer(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            pauses[info["generation"]].append(time.perf_counter() - started.pop())

    gc.callbacks.append(timer)
    try:
        held: collections.deque = collections.deque(maxlen=in_flight)
        begin = time.perf_counter()
        for body in bodies:
            prepared = engine.prepare(body)
            answers = engine.score_answers(engine.run(prepared))
            held.append((prepared, answers, [answer.model_dump_json() for answer in answers]))
        return time.perf_counter() - begin, pauses
    finally:
        gc.callbacks.remove(timer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--in-flight", type=int, default=64, help="requests kept alive, as queued in a server")
    args = parser.parse_args()
    engine = RewardEngine(ServiceSettings(golden_check=False))
    bodies = requests(args.requests)
    run(engine, bodies[:4], args.in_flight)  # warm-up
    print(
        f"tracked objects after start-up: {len(gc.get_objects())}; {args.requests} requests of 4 JPEGs each,"
        f" the last {args.in_flight} kept alive"
    )
    print(f"{'heap':<14} {'seconds':>8} {'gen2 collections':>17} {'gen2 max ms':>12} {'all GC ms':>10} {'GC share':>9}")
    for label in ("as loaded", "gc.freeze()"):
        if label == "gc.freeze()":
            gc.freeze()
        seconds, pauses = run(engine, bodies, args.in_flight)
        total = sum(sum(values) for values in pauses.values())
        print(
            f"{label:<14} {seconds:>8.2f} {len(pauses[2]):>17} {max(pauses[2], default=0) * 1e3:>12.1f}"
            f" {total * 1e3:>10.1f} {total / seconds:>9.1%}"
        )


if __name__ == "__main__":
    main()
