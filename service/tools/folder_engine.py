"""The local folder engine: backends (in-process Scorer, or a running service through the client) driven by the
service's own pipeline (rewardscope.service.batching.Batcher: decoding ahead on worker threads within a budget, up
to `lanes` batches scored side by side, a batch beside another kept to one core), rows written in order by the
resumable writer."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image
from rewardscope.models.images import ImageError, load_image

from ..batching import Batcher
from .folder_layouts import FolderItem
from .folder_results import RESULTS_FILE, ResultsWriter


class Backend(Protocol):
    """Scores a batch: in-process (Scorer) or remote (rewardscope-client). Returns one row dict per item."""

    # A context in which a batch that runs beside another keeps to one core; None: nothing to narrow (remote).
    narrow: Callable[[], contextlib.AbstractContextManager[object]] | None

    def prefetch(self, item: FolderItem) -> Any: ...

    def score(self, images: list[Any], prompts: list[str], metadata: list[dict | None]) -> list[dict[str, Any]]: ...


def decode_or_path(item: FolderItem) -> Any:
    """Read and decode on a worker thread; a file that fails is handed on as its path, so the Scorer's decoder
    reports it per row exactly as it would have."""
    try:
        return load_image(item.path)
    except ImageError:
        return item.path


class ScorerBackend:
    def __init__(self, scorer: Any) -> None:
        from rewardscope.models.detection.detector import single_threaded

        self.scorer = scorer
        self.prepare = scorer.letterbox_hooks()  # the letterbox resize, run on the decode workers
        self.narrow = single_threaded

    def prefetch(self, item: FolderItem) -> Any:
        image = decode_or_path(item)
        if isinstance(image, Image.Image):
            for prepare in self.prepare:
                prepare(image)
        return image

    def score(self, images, prompts, metadata):
        return [result.to_dict() for result in self.scorer.score(images, prompts, metadata)]


class ClientBackend:
    """Through a running service: the same rows, scored remotely (images travel as their files)."""

    narrow = None

    def __init__(self, client: Any, rewards: dict[str, float], profile: str | None = None) -> None:
        self.client, self.rewards, self.profile = client, rewards, profile  # profile None: the service's default

    def prefetch(self, item: FolderItem) -> Any:
        return item.path  # the client sends the file's bytes unchanged; the service decodes

    def score(self, images, prompts, metadata):
        batch = self.client.score(images, prompts, metadata=metadata, rewards=self.rewards, profile=self.profile)
        return [
            {key: item.get(key) for key in ("rewards", "total", "details", "error", "error_code")}
            for item in batch.items
        ]


@dataclass
class RunStats:
    scored: int = 0
    skipped: int = 0
    errors: int = 0
    seconds: float = 0.0
    interrupted: bool = False


def _write_rows(
    writer: ResultsWriter,
    stats: RunStats,
    batch: Sequence[FolderItem],
    results: Sequence[dict[str, Any]],
    on_batch: Callable[[int], None] | None,
) -> None:
    """One scored batch -> rows (item fields + result), appended and fsync'd; counted in stats."""
    rows = [
        {"key": i.key, "file": str(i.path), "prompt": i.prompt, "tag": i.tag, "group": i.group, **result}
        for i, result in zip(batch, results, strict=True)
    ]
    writer.write(rows)
    stats.scored += len(rows)
    stats.errors += sum(row["error"] is not None for row in rows)
    if on_batch:
        on_batch(len(rows))


def score_items(
    items: Sequence[FolderItem],
    backend: Backend,
    out_dir: Path,
    batch_size: int = 8,
    prefetch_batches: int = 2,
    on_batch: Callable[[int], None] | None = None,
    lanes: int = 2,
) -> RunStats:
    """Score what out_dir does not hold yet, batch by batch, through the service's Batcher: up to
    `prefetch_batches` batches decode ahead on worker threads so the model never waits on disk, up to `lanes`
    batches score side by side (each then on one core: see models.single_threaded), rows written in input order.
    Ctrl-C stops after writing the batches already scored."""
    writer = ResultsWriter(out_dir / RESULTS_FILE)
    todo = [item for item in items if item.key not in writer.done]
    stats = RunStats(skipped=len(items) - len(todo))
    batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
    started = time.perf_counter()
    # The models and libraries loaded so far live for the whole run: frozen out of the garbage collector, full
    # collections (the GIL held throughout) stop rescanning them, as in the service (benchmarks/RESULTS.md).
    gc.freeze()

    def write(batch: list[FolderItem], results: list[dict[str, Any]]) -> None:
        _write_rows(writer, stats, batch, results, on_batch)

    try:
        _run_to_end(_score_batches(batches, backend, batch_size, max(0, prefetch_batches), max(1, lanes), write))
    except KeyboardInterrupt:
        stats.interrupted = True
    finally:
        writer.close()
        gc.unfreeze()
    stats.seconds = time.perf_counter() - started
    return stats


def _run_to_end(coroutine: Any) -> None:
    """asyncio.run, also from a thread that already runs an event loop (a notebook): then on a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coroutine)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="folder-run") as runner:
        runner.submit(asyncio.run, coroutine).result()


async def _score_batches(
    batches: list[list[FolderItem]],
    backend: Backend,
    batch_size: int,
    prefetch_batches: int,
    lanes: int,
    write: Callable[[list[FolderItem], list[dict[str, Any]]], None],
) -> None:
    """Each batch is one request to a Batcher (no latency budget: a folder run waits rather than refuses); the
    batches in flight stay within what decodes ahead and what the lanes run, answers written as they come in order."""
    ahead = prefetch_batches + lanes
    batcher: Batcher[FolderItem, tuple[FolderItem, Any], dict[str, Any]] = Batcher(
        lambda pairs: backend.score(
            [image for _, image in pairs], [i.prompt for i, _ in pairs], [i.metadata for i, _ in pairs]
        ),
        max_batch_size=batch_size,
        max_latency_s=math.inf,
        max_ahead_items=ahead * batch_size,
        lanes=lanes,
        narrow=backend.narrow,
        name="folder",
    )

    def decode(batch: Sequence[FolderItem]) -> list[tuple[FolderItem, Any]]:
        return [(item, backend.prefetch(item)) for item in batch]

    window: collections.deque[tuple[list[FolderItem], asyncio.Task[list[dict[str, Any]]]]] = collections.deque()
    try:
        for batch in batches:
            window.append((batch, asyncio.create_task(batcher.submit(batch, decode))))
            while len(window) > ahead:
                done, task = window.popleft()
                write(done, await task)
        while window:
            done, task = window.popleft()
            write(done, await task)
    except asyncio.CancelledError:  # Ctrl-C: keep the rows of the batches already scored, in order
        while window and window[0][1].done() and not window[0][1].cancelled() and window[0][1].exception() is None:
            done, task = window.popleft()
            write(done, task.result())
        raise
    finally:
        for _, task in window:
            task.cancel()
        batcher.shutdown()
