"""A client with the token cannot exhaust the service: memory follows decoded pixels, not items, and stalled
uploads hold nothing. Through a real `rewardscope serve` (the session's shared server), traffic to 127.0.0.1 only,
bounded in count and time."""

from __future__ import annotations

import base64
import io
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import ultralytics_asset
from PIL import Image
from serving import TOKEN, server_tree

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {TOKEN}"}
GB = 1 << 30


def compressible_png(side: int = 6320) -> bytes:
    """A 1-bit side x side PNG: a few KB on the wire, side² x 3 bytes (120 MB at 6320) once decoded to RGB."""
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


def normal_item() -> dict[str, str]:
    return {"image": base64.b64encode(ultralytics_asset("bus.jpg").read_bytes()).decode(), "prompt": "a bus"}


def rss(base_url: str) -> int:
    return sum(process.memory_info().rss for process in server_tree(base_url))


class PeakRss:
    """Samples the server tree's RSS every 50 ms on a thread until stopped; keeps the peak."""

    def __init__(self, base_url: str) -> None:
        self.base_url, self.peak, self._stop = base_url, rss(base_url), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss(self.base_url))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_a_burst_of_huge_compressible_pngs_is_held_to_the_decoded_pixel_budget(token_server):
    png = compressible_png()
    assert len(png) < 10_000
    items = [{"image": base64.b64encode(png).decode(), "prompt": "a photo of a cat"}] * 24  # 2.9 GB decoded
    http = httpx.Client(base_url=token_server, headers=AUTH, timeout=300)
    assert http.post("/score", json={"items": [normal_item()]}).status_code == 200  # warm
    before = rss(token_server)
    with PeakRss(token_server) as peak, ThreadPoolExecutor(1) as pool:
        burst = pool.submit(http.post, "/score", json={"items": items})
        time.sleep(1.0)
        assert not burst.done()
        meanwhile = http.post("/score", json={"items": [normal_item()]})
        assert meanwhile.status_code == 200 and meanwhile.json()[0]["rewards"]["matching"] is not None
        assert not burst.done(), "the normal request answered while the burst was still being scored"
        answered = burst.result()
    assert answered.status_code == 200, answered.text[:500]
    results = answered.json()
    assert len(results) == 24 and all(result["error"] is None for result in results)
    assert peak.peak - before <= 2 * GB, f"RSS grew {(peak.peak - before) / GB:.2f} GB"
    time.sleep(1.0)
    assert rss(token_server) - before <= 1 * GB, f"RSS stayed {(rss(token_server) - before) / GB:.2f} GB up"
    metrics = http.get("/metrics").text
    assert re.search(r"^rewardscope_decoded_bytes_in_flight(\{[^}]*\})? 0\.0$", metrics, re.M), metrics[-3000:]


def stalled_upload(base_url: str) -> socket.socket:
    """Headers with the token and a declared 1 MB body, then 10 bytes of it, and nothing more."""
    host, port = base_url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=30)
    connection.sendall(
        (
            "POST /score HTTP/1.1\r\n"
            f"Host: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
            '{"items": '
        ).encode()
    )
    return connection


def read_answer(connection: socket.socket) -> str:
    """Everything the server sends until it closes the connection (it does, after answering a stalled body)."""
    chunks = []
    while chunk := connection.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks).decode()


def test_stalled_uploads_hold_no_slot_and_end_with_408_after_the_idle_timeout(token_server):
    connections = [stalled_upload(token_server) for _ in range(64)]  # the default MAX_CONCURRENCY
    try:
        started = time.monotonic()
        with httpx.Client(base_url=token_server, headers=AUTH, timeout=60) as http:
            for _ in range(3):
                response = http.post("/score", json={"items": [normal_item()]})
                assert response.status_code == 200, response.text[:300]
        assert time.monotonic() - started < 5, "the stalled uploads must still be open for this check to mean much"
        for connection in connections:  # then each ends, well before the 300 s request timeout
            answer = read_answer(connection)
            assert answer.startswith("HTTP/1.1 408"), answer[:200]
            assert '"reason": "stalled"' in answer
        assert time.monotonic() - started < 30
    finally:
        for connection in connections:
            connection.close()
    metrics = httpx.get(f"{token_server}/metrics", headers=AUTH).text
    assert 'rewardscope_refusals_total{reason="stalled"}' in metrics


def test_deeply_nested_json_in_an_upload_form_is_a_4xx_not_a_500(token_server):
    files = [("images", ("bus.jpg", ultralytics_asset("bus.jpg").read_bytes(), "image/jpeg"))]
    nested = "[" * 5000 + "]" * 5000
    for field in ("prompts", "rewards"):
        data = {"prompts": '["a bus"]', field: nested}
        response = httpx.post(f"{token_server}/score/upload", files=files, data=data, headers=AUTH, timeout=60)
        assert response.status_code == 422 and "nested too deeply" in response.text, response.text[:300]
