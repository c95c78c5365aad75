"""The local folder engine: backends (in-process Scorer, or a running service through the client), decoding ahead on
worker threads, up to `lanes` batches scored side by side, rows written in order by the resumable writer."""

from __future__ import annotations

import collections
import contextlib
import gc
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image
from rewardscope.models.images import ImageError, load_image

from .folder_layouts import FolderItem
from .folder_results import RESULTS_FILE, ResultsWriter


class Backend(Protocol):
    """Scores a batch: in-process (Scorer) or remote (rewardscope-client). Returns one row dict per item."""

    def prefetch(self, item: FolderItem) -> Any: ...

    def score(
        self, images: list[Any], prompts: list[str], metadata: list[dict | None], narrow: bool = False
    ) -> list[dict[str, Any]]:
        """narrow: this batch runs beside another, so an in-process model should keep to one core."""
        ...


def decode_or_path(item: FolderItem) -> Any:
    """Read and decode on a worker thread; a file that fails is handed on as its path, so the Scorer's decoder
    reports it per row exactly as it would have."""
    try:
        return load_image(item.path)
    except ImageError:
        return item.path


class ScorerBackend:
    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer
        self.prepare = scorer.letterbox_hooks()  # the letterbox resize, run on the decode workers
        from rewardscope.models.detection.detector import single_threaded

        self.single_threaded = single_threaded

    def prefetch(self, item: FolderItem) -> Any:
        image = decode_or_path(item)
        if isinstance(image, Image.Image):
            for prepare in self.prepare:
                prepare(image)
        return image

    def score(self, images, prompts, metadata, narrow=False):
        with self.single_threaded() if narrow else contextlib.nullcontext():
            return [result.to_dict() for result in self.scorer.score(images, prompts, metadata)]


class ClientBackend:
    """Through a running service: the same rows, scored remotely (images travel as their files)."""

    def __init__(self, client: Any, rewards: dict[str, float]) -> None:
        self.client, self.rewards = client, rewards

    def prefetch(self, item: FolderItem) -> Any:
        return item.path  # the client sends the file's bytes unchanged; the service decodes

    def score(self, images, prompts, metadata, narrow=False):
        batch = self.client.score(images, prompts, metadata=metadata, rewards=self.rewards)
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
    """Score what out_dir does not hold yet, batch by batch; decoding runs ahead on worker threads so the
    model never waits on disk, and up to `lanes` batches score side by side (each then on one core: see
    models.single_threaded), written in order. Ctrl-C stops after writing the batches already scoring."""
    writer = ResultsWriter(out_dir / RESULTS_FILE)
    todo = [item for item in items if item.key not in writer.done]
    stats = RunStats(skipped=len(items) - len(todo))
    batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
    lanes = max(1, lanes)
    started = time.perf_counter()
    # The models and libraries loaded so far live for the whole run: frozen out of the garbage collector, full
    # collections (the GIL held throughout) stop rescanning them, as in the service (benchmarks/RESULTS.md).
    gc.freeze()

    def write(batch: list[FolderItem], results: list[dict[str, Any]]) -> None:
        _write_rows(writer, stats, batch, results, on_batch)

    with (
        ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode") as pool,
        ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="score") as scoring,
    ):
        pending = [[pool.submit(backend.prefetch, i) for i in b] for b in batches[: prefetch_batches + lanes - 1]]
        in_flight: collections.deque[tuple[list[FolderItem], Future[list[dict[str, Any]]]]] = collections.deque()
        try:
            for index, batch in enumerate(batches):
                if len(pending) < len(batches):  # keep the same number of batches decoding ahead
                    pending.append([pool.submit(backend.prefetch, i) for i in batches[len(pending)]])
                images = [future.result() for future in pending[index]]
                pending[index] = []
                # Side by side only when another batch runs or follows: a lone batch keeps every core.
                narrow = lanes > 1 and (bool(in_flight) or index + 1 < len(batches))
                prompts, metadata = [i.prompt for i in batch], [i.metadata for i in batch]
                in_flight.append((batch, scoring.submit(backend.score, images, prompts, metadata, narrow)))
                while len(in_flight) >= lanes:
                    done, future = in_flight.popleft()
                    write(done, future.result())
            while in_flight:
                done, future = in_flight.popleft()
                write(done, future.result())
        except KeyboardInterrupt:
            stats.interrupted = True
            for futures in pending:
                for future in futures:
                    future.cancel()
            for done, future in in_flight:  # already scoring: keep their rows
                try:
                    write(done, future.result())
                except Exception:  # noqa: BLE001 - stopping; what cannot be written is rescored on resume
                    break
        finally:
            writer.close()
            gc.unfreeze()
    stats.seconds = time.perf_counter() - started
    return stats
