"""Long fuzzing run: schemathesis cases against a real `bentoml serve` (127.0.0.1, bearer token on every case),
then the hypothesis properties of tests/test_fuzz.py (image decoder, prompt parser) with many more examples.
Prints cases sent, the status-code histogram, server errors (>= 500 other than 503), crashes and time.

Run: .venv/bin/python benchmarks/fuzz.py [--cases 10000] [--examples 10000] [--seed 0] [--budget-minutes 25]"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import conftest  # noqa: E402, F401  (the offline environment the tests run in)
from serving import running_server  # noqa: E402
from test_fuzz import TOKEN, FuzzTally, fuzz_api, server_workers, still_serving  # noqa: E402

CHUNK = 500  # cases per hypothesis run: each chunk its own seed, so the time budget is checked between chunks


def rss_mib(processes) -> float:
    return sum(process.memory_info().rss for process in processes if process.is_running()) / 2**20


def fuzz_server(cases: int, seed: int, deadline: float) -> None:
    with running_server({"REWARDSCOPE_TOKEN": TOKEN}) as base_url:
        workers = server_workers(base_url)
        rss = [rss_mib(workers)]  # at start, then after each chunk
        tally = FuzzTally()
        started = time.perf_counter()
        chunk = 0
        while tally.cases < cases and time.monotonic() < deadline:
            fuzz_api(base_url, min(CHUNK, cases - tally.cases), seed=seed + chunk, tally=tally)
            chunk += 1
            elapsed = time.perf_counter() - started
            rss.append(rss_mib(server_workers(base_url)))
            statuses = dict(sorted(tally.statuses.items()))
            print(f"  {tally.cases} cases, {elapsed:.0f} s, RSS {rss[-1]:.0f} MiB, statuses {statuses}", flush=True)
        elapsed = time.perf_counter() - started
        problems = still_serving(base_url, workers)

    print(f"\nAPI: {tally.cases} cases sent (asked for {cases}) in {elapsed:.0f} s ({tally.cases / elapsed:.1f}/s)")
    if tally.cases < cases:
        print("  stopped by the time budget")
    print(f"  status codes: {dict(sorted(tally.statuses.items()))}")
    print(f"  per operation: {dict(sorted(tally.per_operation.items()))}")
    print(f"  real images placed: {tally.real_images_sent}; responses with model-computed rewards: {tally.scored}")
    print(f"  >= 500 other than 503: {len(tally.server_errors)}")
    for line in tally.server_errors[:10]:
        print(f"    {line}")
    print(f"  transport errors (timeouts, resets): {len(tally.transport_errors)}")
    for line in tally.transport_errors[:10]:
        print(f"    {line}")
    print(
        f"  schema-violating bodies (sent as generated) answered 2xx: {dict(sorted(tally.negative_accepted.items()))}"
    )
    print(f"  submitted tasks followed up (endpoint: status code): {dict(sorted(tally.job_statuses.items()))}")
    print(f"  crashes / failed health after the run: {len(problems)} {problems}")
    # The first chunk loads what is loaded lazily (the /grad model, Scorers per variant); growth after it would leak.
    warm = rss[1] if len(rss) > 1 else rss[0]
    print(
        f"  server RSS (MiB, all processes): {rss[0]:.0f} at start, {warm:.0f} after {CHUNK} cases, {rss[-1]:.0f} last"
    )


def fuzz_properties(examples: int, seed: int) -> None:
    command = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", "--durations=0",
        "--hypothesis-show-statistics", f"--hypothesis-seed={seed}", "-k", "not schemathesis",
        str(ROOT / "tests" / "test_fuzz.py"),
    ]  # fmt: skip
    print(f"\nproperties: {examples} examples each: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    result = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, "REWARDSCOPE_FUZZ_EXAMPLES": str(examples)},
        capture_output=True,
        text=True,
    )
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    shown = ("tests/test_fuzz.py::", " passing, ", " call ", " passed", " failed")
    print("\n".join(line for line in lines if any(part in line for part in shown) and "[" not in line))
    print(f"properties: exit {result.returncode} in {time.perf_counter() - started:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=10_000, help="schemathesis cases against the server")
    parser.add_argument("--examples", type=int, default=10_000, help="hypothesis examples per property")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-minutes", type=float, default=25, help="wall-clock bound for the API part")
    args = parser.parse_args()

    load = os.getloadavg()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; {datetime.date.today()}; "
        f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; seed {args.seed}",
        flush=True,
    )
    started = time.perf_counter()
    fuzz_server(args.cases, args.seed, time.monotonic() + args.budget_minutes * 60)
    fuzz_properties(args.examples, args.seed)
    load = os.getloadavg()
    print(f"total {time.perf_counter() - started:.0f} s; load at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
