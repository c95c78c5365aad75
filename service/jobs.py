"""Background scoring jobs: a durable queue in a SQLite file the service owns, run one job at a time behind
interactive traffic (the Batcher scores job items only when no interactive request is queued).

A job's items are stored until it ends, its result until `retention_s` after it ended. Caps on queued jobs and on
the bytes stored refuse a submission up front (JobRefused: 413 for a job larger than the whole store, 429 while
the queue or the store is full). A restarted service answers status and result for every job it kept; jobs that
were running when the process died are marked failed with the reason, so clients resubmit; on a clean stop the
running job goes back to the queue and runs again after the restart."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PENDING, RUNNING, SUCCESS, FAILURE, CANCELLED = "pending", "in_progress", "success", "failure", "cancelled"
FINISHED = (SUCCESS, FAILURE, CANCELLED)
JOB_ID = re.compile(r"[0-9a-f]{32}")
INTERRUPTED = "the service stopped while this job ran (unclean stop); resubmit it"

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    items INTEGER NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    input BLOB,
    result BLOB,
    error TEXT,
    stored_bytes INTEGER NOT NULL
)
"""


class JobRefused(Exception):
    """A submission the store cannot take now: `status` (413 or 429), `reason` (stable) and a message."""

    def __init__(self, status: int, reason: str, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status, self.reason, self.retry_after_s = status, reason, retry_after_s


@dataclass(frozen=True)
class JobLimits:
    max_queued: int = 16  # jobs pending or running
    max_stored_bytes: int = 1 << 30  # inputs of queued jobs + results of finished ones
    retention_s: float = 24 * 3600.0  # how long a finished job's result is kept


class JobStore:
    """The jobs table. Thread-safe (one connection behind a lock); callers on an event loop use asyncio.to_thread
    for the calls that move blobs."""

    def __init__(self, path: Path, limits: JobLimits = JobLimits()) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.limits = path, limits
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(SCHEMA)
        self.interrupted = self._recover()

    def _recover(self) -> int:
        """Jobs left running by a process that died: failed, with the reason. Returns how many."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE jobs SET status=?, error=?, finished=?, input=NULL, stored_bytes=0 WHERE status=?",
                (FAILURE, INTERRUPTED, time.time(), RUNNING),
            )
            self._purge()
            return cursor.rowcount

    def purge(self) -> None:
        """Delete the finished jobs older than the retention time."""
        with self._lock:
            self._purge()

    def _purge(self) -> None:
        self._db.execute(
            "DELETE FROM jobs WHERE finished IS NOT NULL AND finished < ?", (time.time() - self.limits.retention_s,)
        )

    def _scalar(self, query: str, *args: Any) -> int:
        return int(self._db.execute(query, args).fetchone()[0] or 0)

    def submit(self, payload: bytes, items: int) -> str:
        """Store a job's items (JSON) and queue it; returns its id. Raises JobRefused when a cap would be passed."""
        if len(payload) > self.limits.max_stored_bytes:
            raise JobRefused(
                413, "job_too_large", f"job is {len(payload)} bytes; the job store holds {self.limits.max_stored_bytes}"
            )
        with self._lock:
            self._purge()
            queued = self._scalar("SELECT COUNT(*) FROM jobs WHERE status IN (?, ?)", PENDING, RUNNING)
            if queued >= self.limits.max_queued:
                raise JobRefused(429, "job_queue_full", f"{queued} jobs queued or running (the cap); retry later", 30)
            stored = self._scalar("SELECT SUM(stored_bytes) FROM jobs")
            if stored + len(payload) > self.limits.max_stored_bytes:
                raise JobRefused(
                    429,
                    "job_store_full",
                    f"the job store holds {stored} of {self.limits.max_stored_bytes} bytes; fetch and delete finished"
                    " jobs, or retry later",
                    60,
                )
            job_id = uuid.uuid4().hex
            self._db.execute(
                "INSERT INTO jobs (id, status, items, created, input, stored_bytes) VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, PENDING, items, time.time(), payload, len(payload)),
            )
            return job_id

    def _row(self, query: str, *args: Any) -> tuple[Any, ...] | None:
        with self._lock:
            return self._db.execute(query, args).fetchone()

    def status(self, job_id: str) -> dict[str, Any] | None:
        row = self._row("SELECT id, status, items, created, started, finished, error FROM jobs WHERE id=?", job_id)
        if row is None:
            return None
        keys = ("task_id", "status", "items", "created_at", "started_at", "finished_at", "error")
        return dict(zip(keys, row, strict=True))

    def result(self, job_id: str) -> tuple[str, bytes | None, str | None] | None:
        """(status, result JSON when it succeeded, error) or None for an unknown id."""
        row = self._row("SELECT status, result, error FROM jobs WHERE id=?", job_id)
        return None if row is None else (row[0], row[1], row[2])

    def take(self) -> tuple[str, bytes] | None:
        """The oldest pending job, now marked running: (id, items JSON)."""
        with self._lock:
            row = self._db.execute(
                "SELECT id, input FROM jobs WHERE status=? ORDER BY created LIMIT 1", (PENDING,)
            ).fetchone()
            if row is None:
                return None
            self._db.execute("UPDATE jobs SET status=?, started=? WHERE id=?", (RUNNING, time.time(), row[0]))
            return row[0], row[1]

    def finish(self, job_id: str, result: bytes) -> bool:
        """Store a running job's result; False if it was cancelled or deleted meanwhile."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE jobs SET status=?, result=?, input=NULL, stored_bytes=?, finished=? WHERE id=? AND status=?",
                (SUCCESS, result, len(result), time.time(), job_id, RUNNING),
            )
            return cursor.rowcount == 1

    def fail(self, job_id: str, error: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status=?, error=?, input=NULL, stored_bytes=0, finished=? WHERE id=? AND status=?",
                (FAILURE, error, time.time(), job_id, RUNNING),
            )

    def requeue(self, job_id: str) -> None:
        """A running job back to the queue (a clean stop): it runs again, from the start, after the restart."""
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status=?, started=NULL WHERE id=? AND status=?", (PENDING, job_id, RUNNING)
            )

    def cancel(self, job_id: str) -> str | None:
        """Cancel a pending or running job; returns the job's status after the call, None for an unknown id."""
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status=?, input=NULL, stored_bytes=0, finished=? WHERE id=? AND status IN (?, ?)",
                (CANCELLED, time.time(), job_id, PENDING, RUNNING),
            )
            row = self._db.execute("SELECT status FROM jobs WHERE id=?", (job_id,)).fetchone()
        return None if row is None else row[0]

    def delete(self, job_id: str) -> bool:
        """Forget a job and its stored data (a running one stops at its next slice)."""
        with self._lock:
            return self._db.execute("DELETE FROM jobs WHERE id=?", (job_id,)).rowcount == 1

    def is_running(self, job_id: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT status FROM jobs WHERE id=?", (job_id,)).fetchone()
        return row is not None and row[0] == RUNNING

    def counts(self) -> tuple[int, int]:
        """(jobs queued or running, bytes stored)."""
        with self._lock:
            queued = self._scalar("SELECT COUNT(*) FROM jobs WHERE status IN (?, ?)", PENDING, RUNNING)
            return queued, self._scalar("SELECT SUM(stored_bytes) FROM jobs")

    def close(self) -> None:
        with self._lock:
            self._db.close()


class JobRunner:
    """Runs the store's jobs one at a time on the event loop it is started on. `score` scores a slice of a job's
    items (parsed by `parse`) as background work and returns one JSON-ready answer per item; between slices the
    runner checks the job was not cancelled or deleted."""

    def __init__(
        self,
        store: JobStore,
        parse: Callable[[bytes], Sequence[Any]],
        score: Callable[[Sequence[Any]], Awaitable[list[Any]]],
        encode: Callable[[list[Any]], bytes],
        slice_items: int = 64,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.store, self.parse, self.score, self.encode = store, parse, score, encode
        self.slice_items = max(1, slice_items)
        self.on_change = on_change or (lambda: None)
        self.current: str | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="rewardscope-jobs")

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake.clear()  # before looking: a submission from now on wakes the wait below
            taken = await asyncio.to_thread(self.store.take)
            self.on_change()
            if taken is None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 60)
                await asyncio.to_thread(self.store.purge)  # expired results go even when nobody submits
                continue
            await self._run_job(*taken)

    async def _run_job(self, job_id: str, payload: bytes) -> None:
        self.current = job_id
        try:
            items = self.parse(payload)
            del payload
            answers: list[Any] = []
            for start in range(0, len(items), self.slice_items):
                if not await asyncio.to_thread(self.store.is_running, job_id):
                    log.info("job %s stopped: cancelled or deleted", job_id)
                    return
                answers.extend(await self.score(items[start : start + self.slice_items]))
            await asyncio.to_thread(self.store.finish, job_id, self.encode(answers))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the job fails, with the reason; the runner goes on
            log.warning("job %s failed: %s", job_id, exc)
            await asyncio.to_thread(self.store.fail, job_id, f"{type(exc).__name__}: {exc}")
        finally:
            self.current = None
            self.on_change()

    async def stop(self) -> None:
        """Stop running; the job in progress goes back to the queue (it runs again after a restart)."""
        current = self.current
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if current is not None:
            self.store.requeue(current)
            log.info("job %s requeued at shutdown", current)
