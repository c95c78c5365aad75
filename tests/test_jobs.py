"""Background jobs: a durable queue the service owns. Unit checks pin the store's caps, recovery and retention; end
to end, through real `rewardscope serve` processes on 127.0.0.1: /score stays served while a large job runs, a
finished job survives a restart, a job killed mid-run is reported failed with the reason, and SIGTERM drains."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image
from rewardscope.service.jobs import (
    CANCELLED,
    FAILURE,
    INTERRUPTED,
    PENDING,
    RUNNING,
    SUCCESS,
    JobLimits,
    JobRefused,
    JobRunner,
    JobStore,
)
from rewardscope_client import RewardClient, RewardServiceError
from serving import TOKEN, running_server, server_process, server_tree

AUTH = {"Authorization": f"Bearer {TOKEN}"}


# ---------------------------------------------------------------------------------------------------------------
# The store


def test_a_submission_past_a_cap_is_refused_with_its_reason(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3", JobLimits(max_queued=2, max_stored_bytes=100))
    with pytest.raises(JobRefused) as too_large:
        store.submit(b"x" * 101, 1)
    assert (too_large.value.status, too_large.value.reason) == (413, "job_too_large")
    store.submit(b"x" * 60, 1)
    with pytest.raises(JobRefused) as store_full:
        store.submit(b"x" * 41, 1)  # 60 + 41 > 100 bytes stored
    assert (store_full.value.status, store_full.value.reason) == (429, "job_store_full")
    store.submit(b"x" * 40, 1)
    with pytest.raises(JobRefused) as queue_full:
        store.submit(b"", 1)  # two jobs queued: the cap
    assert (queue_full.value.status, queue_full.value.reason) == (429, "job_queue_full")
    assert queue_full.value.retry_after_s and store_full.value.retry_after_s
    assert store.counts() == (2, 100)


def test_jobs_run_oldest_first_and_a_result_replaces_the_stored_input(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    first, second = store.submit(b"[1]", 1), store.submit(b"[2]", 1)
    assert store.take() == (first, b"[1]")
    assert store.status(first)["status"] == RUNNING and store.status(second)["status"] == PENDING
    assert store.finish(first, b'["done"]')
    assert store.result(first) == (SUCCESS, b'["done"]', None)
    assert store.counts() == (1, len(b"[2]") + len(b'["done"]'))


def test_a_job_running_when_the_process_died_is_failed_with_the_reason_on_reopen(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    done, running, queued = store.submit(b"[1]", 1), store.submit(b"[2]", 1), store.submit(b"[3]", 1)
    store.take()
    store.finish(done, b'["ok"]')
    store.take()  # `running` starts; the process dies here (no close, no requeue)
    reopened = JobStore(path)
    assert reopened.interrupted == 1
    assert reopened.result(done) == (SUCCESS, b'["ok"]', None)
    assert reopened.result(running) == (FAILURE, None, INTERRUPTED)
    assert reopened.status(queued)["status"] == PENDING  # never started: still queued, runs after the restart


def test_a_clean_stop_requeues_the_running_job_and_cancel_and_delete_end_jobs(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    job, other = store.submit(b"[1]", 1), store.submit(b"[2]", 1)
    store.take()
    store.requeue(job)
    assert store.status(job)["status"] == PENDING and store.take()[0] == job
    assert store.cancel(job) == CANCELLED and not store.finish(job, b"[]")  # a cancelled job keeps no result
    assert store.cancel(job) == CANCELLED and store.cancel("f" * 32) is None
    assert store.delete(other) and store.status(other) is None and not store.delete(other)


def test_finished_jobs_are_purged_after_the_retention_time(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path, JobLimits(retention_s=3600))
    old, recent = store.submit(b"[1]", 1), store.submit(b"[2]", 1)
    for job in (old, recent):
        store.take()
        store.finish(job, b"[]")
    with sqlite3.connect(path) as db:
        db.execute("UPDATE jobs SET finished = finished - 7200 WHERE id = ?", (old,))
    store.submit(b"[3]", 1)  # every submission purges first
    assert store.status(old) is None and store.status(recent)["status"] == SUCCESS


def test_the_runner_runs_queued_jobs_in_slices_and_stops_a_cancelled_one(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    done = store.submit(json.dumps([1, 2, 3]).encode(), 3)
    cancelled = store.submit(json.dumps([4, 5, 6, 7]).encode(), 4)
    slices: list[list[int]] = []

    async def score(items):
        slices.append(list(items))
        if items[0] == 4:
            store.cancel(cancelled)  # cancelled while its first slice is scoring
        return [item * 10 for item in items]

    async def until(condition):
        deadline = time.monotonic() + 20  # a liveness bound, far below the runner's 60 s idle wait
        while not condition():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)

    async def scenario():
        runner = JobRunner(store, json.loads, score, lambda answers: json.dumps(answers).encode(), slice_items=2)
        runner.start()
        await until(lambda: store.status(cancelled)["status"] == CANCELLED and store.status(done)["status"] == SUCCESS)
        await asyncio.sleep(0.1)  # the runner is idle now, waiting
        late = store.submit(b"[8]", 1)
        runner.wake()  # what the submit endpoint does: an idle runner takes the job at once
        await until(lambda: store.status(late)["status"] == SUCCESS)
        await runner.stop()
        return late

    late = asyncio.run(scenario())
    assert slices == [[1, 2], [3], [4, 5], [8]]
    assert store.result(done) == (SUCCESS, b"[10, 20, 30]", None)
    assert store.result(cancelled)[0] == CANCELLED and store.result(late)[1] == b"[80]"


# ---------------------------------------------------------------------------------------------------------------
# Through real servers


def small_jpeg_item(prompt: str = "a bus") -> dict[str, str]:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 96), (200, 120, 40)).save(buffer, format="JPEG")
    return {"image": base64.b64encode(buffer.getvalue()).decode(), "prompt": prompt}


def wait_status(http: httpx.Client, job_id: str, wanted: set[str], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = http.get("/jobs/score/status", params={"task_id": job_id}).json()
        if status["status"] in wanted:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.1)


@pytest.mark.slow
def test_score_is_served_while_a_large_job_runs(token_server):
    with httpx.Client(base_url=token_server, headers=AUTH, timeout=120) as http:
        job = http.post("/jobs/score/submit", json={"items": [small_jpeg_item()] * 1536})
        assert job.status_code == 200, job.text[:300]
        job_id = job.json()["task_id"]
        wait_status(http, job_id, {RUNNING})
        for _ in range(3):  # answered ahead of the job's remaining items, not after them
            response = http.post("/score", json={"items": [small_jpeg_item("a cat")] * 4})
            assert response.status_code == 200 and len(response.json()) == 4
            assert http.get("/jobs/score/status", params={"task_id": job_id}).json()["status"] == RUNNING
    with RewardClient(token_server, token=TOKEN) as client:
        assert client.cancel(job_id) == CANCELLED
        client.delete(job_id)
        with pytest.raises(RewardServiceError) as gone:
            client.status(job_id)
        assert gone.value.status_code == 404


@pytest.mark.slow
def test_a_finished_job_survives_a_restart_and_a_job_killed_mid_run_is_reported_failed(tmp_path):
    # TMPDIR: a killed BentoML leaves its socket folders behind; here they go with tmp_path, not into /tmp.
    (tmp_path / "tmp").mkdir()
    env = {"REWARDSCOPE_TOKEN": TOKEN, "REWARDSCOPE_JOBS_DIR": str(tmp_path), "TMPDIR": str(tmp_path / "tmp")}
    with running_server(env) as base_url, httpx.Client(base_url=base_url, headers=AUTH, timeout=120) as http:
        done = http.post("/jobs/score/submit", json={"items": [small_jpeg_item()] * 3}).json()["task_id"]
        wait_status(http, done, {SUCCESS})
        result = http.get("/jobs/score/get", params={"task_id": done}).json()
        killed = http.post("/jobs/score/submit", json={"items": [small_jpeg_item()] * 2048}).json()["task_id"]
        wait_status(http, killed, {RUNNING})
        for process in server_tree(base_url):  # an unclean stop: no drain, no requeue; workers included
            process.kill()
    with running_server(env) as base_url, httpx.Client(base_url=base_url, headers=AUTH, timeout=120) as http:
        assert http.get("/jobs/score/status", params={"task_id": done}).json()["status"] == SUCCESS
        assert http.get("/jobs/score/get", params={"task_id": done}).json() == result
        with RewardClient(base_url, token=TOKEN) as client:
            assert list(client.result(done).total) == pytest.approx([item["total"] for item in result])
        failed = http.get("/jobs/score/status", params={"task_id": killed}).json()
        assert failed["status"] == FAILURE and "resubmit" in failed["error"]
        answer = http.get("/jobs/score/get", params={"task_id": killed})
        assert answer.status_code == 409 and "resubmit" in answer.json()["error"]


@pytest.mark.slow
def test_sigterm_finishes_the_work_in_flight_refuses_new_work_and_exits_within_the_drain_time(tmp_path):
    drain_s = 15
    env = {"REWARDSCOPE_TOKEN": TOKEN, "REWARDSCOPE_JOBS_DIR": str(tmp_path), "REWARDSCOPE_DRAIN_S": str(drain_s)}
    with running_server(env) as base_url, httpx.Client(base_url=base_url, headers=AUTH, timeout=120) as http:
        job = http.post("/jobs/score/submit", json={"items": [small_jpeg_item()] * 2048}).json()["task_id"]
        wait_status(http, job, {RUNNING})
        server = server_process(base_url)
        workers = server_tree(base_url)[1:]
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(http.post, "/score", json={"items": [small_jpeg_item("a cat")] * 64})
            time.sleep(0.3)
            os.killpg(server.pid, signal.SIGTERM)
            stopped = time.monotonic()
            time.sleep(0.3)
            try:  # refused cleanly while draining, or the server has already gone: never a reset mid-answer
                late = http.post("/score", json={"items": [small_jpeg_item()]})
                assert late.status_code == 503 and late.json()["reason"] == "draining", late.text[:300]
                assert int(late.headers["retry-after"]) >= 1
            except httpx.ConnectError:
                pass
            answered = in_flight.result()
        assert answered.status_code == 200 and len(answered.json()) == 64
        server.wait(timeout=drain_s + 45)  # a liveness bound: the drain time plus a generous margin
        _, alive = psutil.wait_procs(workers, timeout=5)
        assert alive == [] and time.monotonic() - stopped < drain_s + 45
    with running_server(env) as base_url, httpx.Client(base_url=base_url, headers=AUTH, timeout=120) as http:
        # the job that was running at SIGTERM went back to the queue and runs again after the restart
        assert wait_status(http, job, {RUNNING, SUCCESS})["status"] in (RUNNING, SUCCESS)
        http.put("/jobs/score/cancel", params={"task_id": job})


@pytest.mark.slow
def test_job_routes_refuse_unknown_or_malformed_ids_with_404(token_server):
    with httpx.Client(base_url=token_server, headers=AUTH, timeout=30) as http:
        for job_id in ("f" * 32, "../../etc/passwd", "' OR 1=1 --"):
            assert http.get("/jobs/score/status", params={"task_id": job_id}).status_code == 404
            assert http.get("/jobs/score/get", params={"task_id": job_id}).status_code == 404
            assert http.put("/jobs/score/cancel", params={"task_id": job_id}).status_code == 404
            assert http.request("DELETE", "/jobs/score", params={"task_id": job_id}).status_code == 404


def test_the_job_database_lives_in_the_configured_folder(tmp_path):
    from rewardscope.service.settings import ServiceSettings

    settings = ServiceSettings.from_env({"REWARDSCOPE_JOBS_DIR": str(tmp_path)})
    assert settings.jobs_path() == Path(tmp_path) / "jobs.sqlite3"
