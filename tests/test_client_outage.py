"""Issue #19's outage test: a real `rewardscope serve` is stopped for 20 s in the middle of a client call and started
again on the same port; the call, retrying within its time budget (retry_for), completes with real scores."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from serving import free_port, running_server

pytest.importorskip("rewardscope_client")
from rewardscope_client import RewardClient  # noqa: E402

pytestmark = pytest.mark.slow

OUTAGE_S = 20.0
PROMPT = "four people and a bus"


def service_on(port: int) -> contextlib.AbstractContextManager[str]:
    """A served RewardService on 127.0.0.1:port (a fixed port, so that it can come back where it was), until the
    block ends: then the whole process tree is stopped (serving.running_server). No golden check at start (it
    only slows the restart) and a short drain on SIGTERM."""
    return running_server({"REWARDSCOPE_GOLDEN_CHECK": "false", "REWARDSCOPE_DRAIN_S": "2"}, port=port)


class GatedTransport(httpx.HTTPTransport):
    """Records each attempt's outcome (its status, or the transport error's name). Once an attempt has been answered,
    later attempts wait for `gate`: the test stops the service between a call's first and second chunk, so the
    call is certainly mid-run when the service goes away."""

    def __init__(self) -> None:
        super().__init__()
        self.outcomes: list[int | str] = []  # list.append is atomic: safe from the client's threads
        self.answered = threading.Event()
        self.gate = threading.Event()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.answered.is_set():
            self.gate.wait(timeout=300)
        try:
            response = super().handle_request(request)
        except httpx.HTTPError as exc:
            self.outcomes.append(type(exc).__name__)
            raise
        self.outcomes.append(response.status_code)
        self.answered.set()
        return response


def test_a_call_survives_the_service_stopping_for_20_s_and_restarting(bus):
    port = free_port()
    images, prompts = [bus] * 4, [PROMPT] * 4
    transport = GatedTransport()
    with contextlib.ExitStack() as first_run, ThreadPoolExecutor(1) as caller:
        base_url = first_run.enter_context(service_on(port))
        with RewardClient(base_url) as plain:
            reference = plain.score(images, prompts)
        client = RewardClient(base_url, retry_for=120.0, chunk_size=2, max_concurrency=1, transport=transport)
        # Default backoff, with the ladder's 30 s cap lowered to 4 s: the test need not wait out a long step
        # after the restart. The budget (retry_for) is what is under test.
        client.retry.max_backoff = 4.0
        try:
            started = time.monotonic()
            call = caller.submit(client.score, images, prompts)
            assert transport.answered.wait(timeout=120), "the first chunk was never answered"
            first_run.close()  # stop the service, the whole process tree, between the call's two chunks
            transport.gate.set()
            time.sleep(OUTAGE_S)
            assert not call.done(), "the call ended while the service was down"
            with service_on(port) as again:
                assert again == base_url
                batch = call.result(timeout=150)
            elapsed = time.monotonic() - started
        finally:
            transport.gate.set()
            client.close()
    assert elapsed >= OUTAGE_S
    failures = [outcome for outcome in transport.outcomes if outcome != 200]
    assert failures, f"no attempt failed: the outage was not exercised ({transport.outcomes})"
    assert set(failures) <= {"ConnectError", "ReadError", "RemoteProtocolError", 502, 503, 504}, transport.outcomes
    assert transport.outcomes.count(200) == 2  # one success per chunk: nothing scored twice
    assert np.isfinite(batch.total).all() and batch.valid.all()
    np.testing.assert_allclose(batch.total, reference.total, atol=1e-6)
    assert batch.versions == reference.versions
    print(f"call completed after {elapsed:.1f} s across a {OUTAGE_S:g} s outage: {transport.outcomes}")
