"""The comparator for the service: a reward server the way RL fine-tuning repos write one today, a Flask app
behind one gunicorn sync worker, so one request is scored at a time. Same models, same work per image and the
same /score answer as the service: the one Scorer (embedded detector, the service's thresholds), the service's
base64/.npy transport decoding, JSON in and out; no dynamic batching, admission control or auth.

Run: .venv/bin/python -m loadtests.baseline_server --port 8000   (gunicorn, 1 sync worker, 127.0.0.1 only)"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flask import Flask, jsonify, request
from gunicorn.app.base import BaseApplication
from rewardscope.models.images import ImageError, ImageLimits, decode_base64, decode_npy
from rewardscope.models.types import ScoreResult
from rewardscope.service.settings import ServiceSettings

from rewardscope import Scorer

ROOT = Path(__file__).resolve().parents[1]


def _decode(item: dict[str, Any], limits: ImageLimits) -> Any:
    if item.get("image") is not None:
        return decode_base64(item["image"], limits)
    return decode_npy(decode_base64(item.get("array") or "", limits), limits)


def create_app(settings: ServiceSettings | None = None) -> Flask:
    """The Flask app; models load here, once per worker, as in the service's __init__."""
    settings = settings or ServiceSettings.from_env()
    limits = ImageLimits(max_pixels=settings.max_pixels)
    scorer = Scorer(
        {name: 1.0 for name in settings.rewards},
        config=settings.reward_config(settings.rewards),
        image_limits=limits,
        profile=settings.profile,
    )
    versions = scorer.versions()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes

    @app.post("/score")
    def score() -> Any:
        items = (request.get_json(silent=True) or {}).get("items")
        if not isinstance(items, list) or not items or len(items) > settings.max_items:
            return jsonify({"error": f"send {{'items': [...]}} with 1 to {settings.max_items} items"}), 422
        answers: list[dict[str, Any] | None] = [None] * len(items)
        decoded: list[tuple[int, Any]] = []
        for index, item in enumerate(items):
            try:
                decoded.append((index, _decode(item, limits)))
            except ImageError as exc:
                failed = ScoreResult(rewards={name: None for name in scorer.weights})
                failed.add_error(str(exc), exc.code)
                # An item that failed decoding names no model versions, as in the service.
                answers[index] = {**failed.to_dict(), "profile": scorer.profile, "versions": {}}
        started = time.perf_counter()
        scored = scorer.score(
            [image for _, image in decoded],
            [items[index].get("prompt") for index, _ in decoded],
            [items[index].get("metadata") for index, _ in decoded],
        )
        seconds = time.perf_counter() - started
        for (index, _), result in zip(decoded, scored, strict=True):
            answers[index] = {**result.to_dict(), "profile": scorer.profile, "versions": versions}
        # Scorer time apart from transport and JSON: what benchmarks compare with the service's reward latency.
        return jsonify(answers), 200, {"server-timing": f"score;dur={seconds * 1e3:.2f}"}

    @app.get("/readyz")
    def readyz() -> Any:
        return jsonify({"ready": True})

    return app


class BaselineServer(BaseApplication):
    """gunicorn with one sync worker: the worker scores one request at a time, later ones wait in the backlog."""

    def __init__(self, host: str, port: int) -> None:
        self.options = {
            "bind": f"{host}:{port}",
            "workers": 1,
            "worker_class": "sync",
            "timeout": 600,  # a worker busy on one long request is not hung
            "backlog": 2048,
        }
        super().__init__()

    def load_config(self) -> None:
        for name, value in self.options.items():
            self.cfg.set(name, value)

    def load(self) -> Flask:
        return create_app()


@contextlib.contextmanager
def running_baseline(env: dict[str, str] | None = None, timeout: float = 180) -> Iterator[str]:
    """Yield the base URL of the baseline on a free 127.0.0.1 port; its process tree is found by
    tests/serving.server_tree, as the service's is."""
    sys.path.insert(0, str(ROOT / "tests"))
    from serving import free_port, serving_process

    port = free_port()
    command = [sys.executable, "-m", "loadtests.baseline_server", "--host", "127.0.0.1", "--port", str(port)]
    with serving_process(command, port, {**os.environ, **(env or {})}, "/readyz", "baseline", timeout) as url:
        yield url


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--host", default="127.0.0.1", choices=("127.0.0.1", "localhost", "::1"), help="no auth: loopback"
    )
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    BaselineServer(args.host, args.port).run()


if __name__ == "__main__":
    main()
