"""Benchmark: the served worker's memory under a burst of huge, compressible images, with the decoded-pixel budgets
at their defaults and with them lifted (as before they existed), side by side in one run.

The burst is the one that used to exhaust memory: one /score of 24 one-bit 6320 x 6320 PNGs (4.9 KB each on the
wire, 120 MB each decoded to RGB). Reports RSS of the server tree before, at peak (sampled every 50 ms) and 2 s
after, and the burst's wall time.

Run: .venv/bin/python benchmarks/memory.py [--items 24]
"""

from __future__ import annotations

import argparse
import base64
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from serving import TOKEN, running_server  # noqa: E402
from test_pressure import AUTH, PeakRss, compressible_png, normal_item, rss  # noqa: E402

GB = 1 << 30
UNBOUNDED = str(1 << 50)


def burst(env: dict[str, str], items: int) -> dict[str, float]:
    png = base64.b64encode(compressible_png()).decode()
    with running_server({"REWARDSCOPE_TOKEN": TOKEN, **env}) as base_url:
        http = httpx.Client(base_url=base_url, headers=AUTH, timeout=600)
        http.post("/score", json={"items": [normal_item()]})  # warm
        before = rss(base_url)
        started = time.perf_counter()
        with PeakRss(base_url) as peak:
            answer = http.post("/score", json={"items": [{"image": png, "prompt": "a cat"}] * items})
        seconds = time.perf_counter() - started
        assert answer.status_code == 200, answer.text[:300]
        time.sleep(2)
        after = rss(base_url)
    return {"before": before / GB, "peak": peak.peak / GB, "after": after / GB, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=24)
    args = parser.parse_args()
    runs = {
        "budgets (defaults)": {},
        "budgets lifted": {
            "REWARDSCOPE_MAX_AHEAD_BYTES": UNBOUNDED,
            "REWARDSCOPE_MAX_REQUEST_DECODED_BYTES": UNBOUNDED,
        },
    }
    print("| configuration | RSS before (GB) | peak (GB) | growth (GB) | 2 s after, above before (GB) | burst (s) |")
    print("|---|---|---|---|---|---|")
    for name, env in runs.items():
        r = burst(env, args.items)
        print(
            f"| {name} | {r['before']:.2f} | {r['peak']:.2f} | {r['peak'] - r['before']:.2f} |"
            f" {r['after'] - r['before']:.2f} | {r['seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
