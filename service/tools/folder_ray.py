"""The Ray Data engine: the same rows as the local engine, scored by an actor pool, streamed into the same writer."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .folder_engine import RunStats, _write_rows
from .folder_layouts import FolderItem
from .folder_results import RESULTS_FILE, ResultsWriter


def score_items_ray(
    items: Sequence[FolderItem],
    rewards: dict[str, float],
    config: dict[str, dict[str, Any]],
    out_dir: Path,
    batch_size: int = 8,
    actors: int = 1,
    gpus_per_actor: float = 0,
    address: str | None = None,
    on_batch: Callable[[int], None] | None = None,
    profile: str | None = None,
) -> RunStats:
    """The same rows through Ray Data: read the item list, map_batches the Scorer in an actor pool (each actor
    loads the models once), and stream each finished batch, in item order, into the same resumable writer as the
    local engine, so a killed run loses at most the batches in flight and resumes by key. address: an existing
    cluster ("auto" or ray://...), else a local instance."""
    import ray
    from rewardscope.models.scorer import Scorer

    writer = ResultsWriter(out_dir / RESULTS_FILE)
    todo = [item for item in items if item.key not in writer.done]
    stats = RunStats(skipped=len(items) - len(todo))
    if not todo:
        writer.close()
        return stats
    started = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=None if address else os.cpu_count(), include_dashboard=False)
    # Batches come back in the order of the item list (the rows stay comparable with the local engine's).
    ray.data.DataContext.get_current().execution_options.preserve_order = True

    class ScoreActor:
        def __init__(self) -> None:
            self.scorer = Scorer(rewards, config=config, profile=profile)

        def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
            metadata = [json.loads(text) if text else None for text in batch["metadata"]]
            results = self.scorer.score([Path(p) for p in batch["path"]], list(batch["prompt"]), metadata)
            return {"key": batch["key"], "result": [json.dumps(result.to_dict()) for result in results]}

    records = [
        {
            "key": i.key,
            "path": str(i.path),
            "prompt": i.prompt,
            "metadata": json.dumps(i.metadata) if i.metadata else "",
        }
        for i in todo
    ]
    by_key = {item.key: item for item in todo}
    scored = ray.data.from_items(records).map_batches(
        ScoreActor, batch_size=batch_size, concurrency=actors, num_gpus=gpus_per_actor
    )
    try:
        for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
            keys = [str(key) for key in batch["key"]]
            results = [json.loads(str(text)) for text in batch["result"]]
            _write_rows(writer, stats, [by_key[key] for key in keys], results, on_batch)
    except KeyboardInterrupt:
        stats.interrupted = True
    finally:
        writer.close()
    stats.seconds = time.perf_counter() - started
    return stats
