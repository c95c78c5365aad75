"""Run the locust users of loadtests/locustfile.py headless, for a bounded time, against a service it starts on
127.0.0.1 (or one already running there), and summarise locust's CSVs: requests/s, images/s, p50/p95/p99 and
failures per endpoint, as summary.json and a printed table.

Run: .venv/bin/python loadtests/run.py --users 6 --spawn-rate 2 --run-time 60 --out /tmp/loadtest
     [--mix training evaluator ranker] [--think-scale 1] [--server-env REWARDSCOPE_MAX_BATCH_SIZE=16]

Locust runs as a subprocess: it monkeypatches the standard library with gevent, which must stay out of the
caller's process (pytest, benchmarks)."""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import os
import platform
import re
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
# The service and the photos stay offline, as under `make serve`.
for _name, _value in (("YOLO_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1")):
    os.environ.setdefault(_name, _value)
if str(ROOT / "tests") not in sys.path:
    sys.path.append(str(ROOT / "tests"))

import httpx  # noqa: E402
from serving import running_server  # noqa: E402

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
USER_CLASSES = {"training": "TrainingLoopUser", "evaluator": "EvaluatorUser", "ranker": "RankerUser"}
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
AGGREGATED = "Aggregated"


def run_locust(
    base_url: str,
    prefix: Path,
    users: int,
    spawn_rate: float,
    run_time_s: int,
    mix: Sequence[str],
    token: str | None,
    think_scale: float = 1.0,
) -> int:
    """Run locust headless for run_time_s; its CSVs land at prefix_*.csv, its log at prefix.log. Returns its
    exit code (1 when any request failed)."""
    if urlsplit(base_url).hostname not in LOOPBACK:
        raise ValueError(f"load tests target 127.0.0.1 only, not {base_url}")
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--only-summary",
        "-u",
        str(users),
        "-r",
        str(spawn_rate),
        "--run-time",
        f"{run_time_s}s",
        "--csv",
        str(prefix),
        "--host",
        base_url,
        *(USER_CLASSES[name] for name in mix),
    ]
    environment = {**os.environ, "REWARDSCOPE_LOADTEST_THINK_SCALE": str(think_scale)}
    environment.pop("REWARDSCOPE_TOKEN", None)
    if token:
        environment["REWARDSCOPE_TOKEN"] = token
    with open(f"{prefix}.log", "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        # Bounded: locust's own --run-time, plus start-up (photo encoding) and the stop.
        finished = subprocess.run(
            command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT, timeout=run_time_s + 180
        )
    return finished.returncode


def _number(value: str) -> float:
    return float(value) if value not in ("", "N/A") else 0.0


def summarise(prefix: Path) -> dict[str, Any]:
    """Per request name (and 'Aggregated'): requests, failures, requests/s, images, images/s, p50/p95/p99 ms.
    images/s = images scored successfully / the span locust's requests/s is taken over (requests / requests/s).
    Percentiles are locust's, over response times it buckets (147 -> 150, 3432 -> 3400, 58760 -> 59000 ms)."""
    images = json.loads(Path(f"{prefix}_images.json").read_text())["images"]
    endpoints: dict[str, dict[str, Any]] = {}
    with open(f"{prefix}_stats.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            name = row["Name"]
            requests, rate = int(row["Request Count"]), _number(row["Requests/s"])
            scored = sum(images.values()) if name == AGGREGATED else int(images.get(name, 0))
            endpoints[name] = {
                "requests": requests,
                "failures": int(row["Failure Count"]),
                "requests_per_s": rate,
                "images": scored,
                "images_per_s": scored * rate / requests if requests else 0.0,
                "p50_ms": _number(row["50%"]),
                "p95_ms": _number(row["95%"]),
                "p99_ms": _number(row["99%"]),
                "average_ms": _number(row["Average Response Time"]),
                "max_ms": _number(row["Max Response Time"]),
            }
    failures = []
    with open(f"{prefix}_failures.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            failures.append({"name": row["Name"], "error": row["Error"], "occurrences": int(row["Occurrences"])})
    return {"endpoints": endpoints, "failures": failures}


def print_table(summary: dict[str, Any]) -> None:
    print(
        f"{'endpoint':<16} {'requests':>8} {'failures':>8} {'req/s':>7} {'images/s':>9}"
        f" {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
    )
    for name, row in summary["endpoints"].items():
        print(
            f"{name:<16} {row['requests']:>8} {row['failures']:>8} {row['requests_per_s']:>7.2f}"
            f" {row['images_per_s']:>9.1f} {row['p50_ms']:>8.0f} {row['p95_ms']:>8.0f} {row['p99_ms']:>8.0f}"
        )
    for failure in summary["failures"]:
        print(f"  failed {failure['occurrences']}x {failure['name']}: {failure['error'][:160]}")


def server_items(base_url: str, token: str | None) -> int | None:
    """Items the service says it scored (rewardscope_items_total over endpoints), read from /metrics."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        text = httpx.get(base_url + "/metrics", headers=headers, timeout=10).text
    except httpx.HTTPError:
        return None
    counts = re.findall(r"^rewardscope_items_total\{[^}]*\}\s+([0-9.e+]+)$", text, flags=re.MULTILINE)
    return int(sum(float(count) for count in counts)) if counts else None


@contextlib.contextmanager
def target(host: str | None, token: str | None, server_env: dict[str, str]) -> Iterator[str]:
    """The service to load: the given 127.0.0.1 URL, or a fresh `rewardscope serve` (stopped afterwards)."""
    if host is not None:
        yield host.rstrip("/")
        return
    with running_server({"REWARDSCOPE_TOKEN": token or "", **server_env}) as base_url:
        yield base_url


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", "-u", type=int, default=6, help="concurrent locust users")
    parser.add_argument("--spawn-rate", "-r", type=float, default=2, help="users started per second")
    parser.add_argument("--run-time", "-t", type=int, default=60, help="seconds of load (bounded)")
    parser.add_argument("--out", type=Path, help="output folder (default: a new temporary folder)")
    parser.add_argument("--mix", nargs="+", choices=list(USER_CLASSES), default=list(USER_CLASSES))
    parser.add_argument("--think-scale", type=float, default=1.0, help="scales users' waits; 0: closed loop")
    parser.add_argument("--host", help="an already running service on 127.0.0.1 (token: $REWARDSCOPE_TOKEN)")
    parser.add_argument("--server-env", action="append", default=[], help="KEY=VALUE for the started service")
    args = parser.parse_args(argv)
    if args.host is not None and urlsplit(args.host).hostname not in LOOPBACK:
        parser.error("--host must be a 127.0.0.1 / localhost URL")
    server_env = dict(entry.split("=", 1) for entry in args.server_env)
    out = args.out or Path(tempfile.mkdtemp(prefix="rewardscope-loadtest-"))
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / "locust"
    # A started service gets a fresh token, so the run exercises auth as deployed.
    token = os.environ.get("REWARDSCOPE_TOKEN") if args.host else secrets.token_urlsafe(16)

    load_before = os.getloadavg()
    with target(args.host, token, server_env) as base_url:
        exit_code = run_locust(
            base_url, prefix, args.users, args.spawn_rate, args.run_time, args.mix, token, args.think_scale
        )
        scored_by_server = server_items(base_url, token)
    summary = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_average_before": [round(value, 2) for value in load_before],
        "load_average_after": [round(value, 2) for value in os.getloadavg()],
        "users": args.users,
        "spawn_rate": args.spawn_rate,
        "run_time_s": args.run_time,
        "mix": [USER_CLASSES[name] for name in args.mix],
        "think_scale": args.think_scale,
        "server_env": server_env,
        "locust_exit_code": exit_code,
        "server_items_scored": scored_by_server,
        **summarise(prefix),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{summary['machine']}; load {summary['load_average_before']} -> {summary['load_average_after']}")
    print(f"{args.users} users ({', '.join(summary['mix'])}), {args.run_time}s against {base_url}\n")
    print_table(summary)
    print(f"\nCSVs, log and summary.json in {out}")
    return 0 if exit_code == 0 and summary["endpoints"].get(AGGREGATED, {}).get("failures", 1) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
