"""Scoring folders of generated images: layouts (flat + prompts file, GenEval, T2I-CompBench), a prefetching
engine, a resumable JSONL writer with a Parquet copy, and the run summary (GenEval's figures included)."""

from __future__ import annotations

import collections
import contextlib
import csv
import gc
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image
from rewardscope.models.images import ImageError, load_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LAYOUTS = ("flat", "geneval", "t2i-compbench")
RESULTS_FILE = "results.jsonl"


@dataclass(frozen=True)
class FolderItem:
    """One image to score. key is its path relative to the folder root: the row's identity for resuming."""

    key: str
    path: Path
    prompt: str
    metadata: dict[str, Any] | None = None
    tag: str | None = None  # prompt category (GenEval tag, T2I-CompBench category)
    group: str | None = None  # images of the same prompt share a group


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def detect_layout(root: Path) -> str:
    if any((child / "metadata.jsonl").is_file() for child in root.iterdir() if child.is_dir()):
        return "geneval"
    if (root / "samples").is_dir() and not (root / "metadata.jsonl").exists():
        return "t2i-compbench"
    return "flat"


def geneval_items(root: Path) -> list[FolderItem]:
    """<root>/<NNNNN>/metadata.jsonl (one JSON object: prompt, tag, include, exclude) + samples/*.png."""
    items = []
    for folder in sorted(child for child in root.iterdir() if (child / "metadata.jsonl").is_file()):
        metadata = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])
        prompt = metadata.get("prompt", "")
        spec = {key: metadata[key] for key in ("include", "exclude") if key in metadata}
        for image in _images_in(folder / "samples") if (folder / "samples").is_dir() else []:
            key = image.relative_to(root).as_posix()
            items.append(FolderItem(key, image, prompt, spec or None, metadata.get("tag"), folder.name))
    return items


def t2i_compbench_items(root: Path, category: str | None = None) -> list[FolderItem]:
    """<root>/samples/<prompt>_<index>.png, the prompt being the file name before the last underscore."""
    items = []
    for image in _images_in(root / "samples"):
        prompt = image.stem.rsplit("_", 1)[0] if "_" in image.stem else image.stem
        items.append(FolderItem(image.relative_to(root).as_posix(), image, prompt, None, category, prompt))
    return items


def _prompt_from_name(stem: str) -> str:
    stem = re.sub(r"[_-]\d+$", "", stem)  # a trailing sample index
    return re.sub(r"[_-]+", " ", stem).strip()


def read_prompts_file(path: Path) -> dict[str, dict[str, Any]]:
    """CSV (columns file, prompt[, metadata as JSON]) or JSONL ({"file", "prompt", "metadata"?}) -> by file."""
    entries: dict[str, dict[str, Any]] = {}
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as handle:
            rows: Iterable[dict[str, Any]] = list(csv.DictReader(handle))
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for row in rows:
        if "file" not in row or "prompt" not in row:
            raise ValueError(f"{path}: every entry needs 'file' and 'prompt', got {sorted(row)}")
        metadata = row.get("metadata")
        if isinstance(metadata, str):
            metadata = json.loads(metadata) if metadata.strip() else None
        entries[row["file"]] = {"prompt": row["prompt"], "metadata": metadata, "tag": row.get("tag") or None}
    return entries


def flat_items(root: Path, prompts_file: Path | None = None) -> list[FolderItem]:
    """Images in root; prompts from a CSV/JSONL mapping file name -> prompt, else from the file names."""
    mapping = read_prompts_file(prompts_file) if prompts_file else {}
    items = []
    for image in _images_in(root):
        entry = mapping.get(image.name)
        if mapping and entry is None:
            continue  # the prompts file decides which images belong to the run
        prompt = entry["prompt"] if entry else _prompt_from_name(image.stem)
        metadata, tag = (entry["metadata"], entry["tag"]) if entry else (None, None)
        items.append(FolderItem(image.name, image, prompt, metadata, tag, prompt))
    return items


def folder_items(root: Path, layout: str = "auto", prompts_file: Path | None = None) -> tuple[str, list[FolderItem]]:
    layout = detect_layout(root) if layout == "auto" else layout
    if layout == "geneval":
        return layout, geneval_items(root)
    if layout == "t2i-compbench":
        return layout, t2i_compbench_items(root)
    if layout == "flat":
        return layout, flat_items(root, prompts_file)
    raise ValueError(f"unknown layout {layout!r}; choose from auto, {', '.join(LAYOUTS)}")


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


class ResultsWriter:
    """Append-only JSONL: one write + fsync per batch, so a kill loses at most the batch in flight. On open,
    a torn last line (killed mid-write) is cut off and the keys already written are read back for resuming."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: set[str] = set()
        if path.exists():
            data = path.read_bytes()
            good = data.rfind(b"\n") + 1
            for line in data[:good].splitlines():
                if line.strip():
                    self.done.add(json.loads(line)["key"])
            if good != len(data):
                with open(path, "r+b") as handle:
                    handle.truncate(good)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(path, "ab")

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        payload = b"".join(json.dumps(row, sort_keys=True).encode() + b"\n" for row in rows)
        self._handle.write(payload)
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.done.update(row["key"] for row in rows)

    def close(self) -> None:
        self._handle.close()


def read_rows(out_dir: Path) -> list[dict[str, Any]]:
    path = out_dir / RESULTS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write_parquet(out_dir: Path, rows: list[dict[str, Any]]) -> Path:
    """A Parquet copy of the rows (one column per reward; details as JSON text), written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = sorted({name for row in rows for name in (row.get("rewards") or {})})
    columns: dict[str, list[Any]] = {key: [row.get(key) for row in rows] for key in ("key", "file", "prompt", "tag")}
    for name in names:
        columns[f"reward_{name}"] = [(row.get("rewards") or {}).get(name) for row in rows]
    columns["total"] = [row.get("total") for row in rows]
    columns["error"] = [row.get("error") for row in rows]
    columns["error_code"] = [row.get("error_code") for row in rows]
    columns["details"] = [json.dumps(row.get("details") or {}) for row in rows]
    target = out_dir / "results.parquet"
    scratch = target.with_suffix(".parquet.tmp")
    pq.write_table(pa.table(columns), scratch)
    os.replace(scratch, target)
    return target


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


def versions_of(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """reward -> model version, as the rows' details name them (every scored row carries its versions)."""
    versions: dict[str, str] = {}
    for row in rows:
        for name, details in (row.get("details") or {}).items():
            if isinstance(details, dict) and "version" in details:
                versions.setdefault(name, details["version"])
    return versions


def write_run_config(out_dir: Path, config: dict[str, Any], versions: dict[str, str]) -> None:
    (out_dir / "run.json").write_text(json.dumps({**config, "versions": versions}, indent=2, default=str) + "\n")


def summarise(rows: list[dict[str, Any]], geneval_reward: str | None = None) -> dict[str, Any]:
    """Mean per reward over the rows that scored, per-category means, and GenEval's summary figures when the
    rows carry a GenEval-style 0/1 reward (correct image = 1; correct prompt = all its images correct)."""
    names = sorted({name for row in rows for name in (row.get("rewards") or {})})
    summary: dict[str, Any] = {"images": len(rows), "errors": sum(row.get("error") is not None for row in rows)}
    means: dict[str, float | None] = {}
    for name in names:
        values = [row["rewards"][name] for row in rows if (row.get("rewards") or {}).get(name) is not None]
        means[name] = sum(values) / len(values) if values else None
    summary["mean"] = means
    by_tag: dict[str, dict[str, float]] = {}
    for tag in sorted({row.get("tag") for row in rows if row.get("tag")}):
        tagged = [row for row in rows if row.get("tag") == tag]
        by_tag[tag] = {}
        for name in names:
            values = [row["rewards"][name] for row in tagged if (row.get("rewards") or {}).get(name) is not None]
            by_tag[tag][name] = sum(values) / len(values) if values else None
    summary["by_tag"] = by_tag
    if geneval_reward and geneval_reward in names:
        scored = [row for row in rows if (row.get("rewards") or {}).get(geneval_reward) is not None]
        correct = [row["rewards"][geneval_reward] == 1.0 for row in scored]
        groups: dict[str, list[bool]] = {}
        for row, ok in zip(scored, correct, strict=True):
            groups.setdefault(row.get("group") or row["prompt"], []).append(ok)
        tags = {}
        for tag in sorted({row.get("tag") or "untagged" for row in scored}):
            marks = [ok for row, ok in zip(scored, correct, strict=True) if (row.get("tag") or "untagged") == tag]
            tags[tag] = {"correct": sum(marks), "total": len(marks), "accuracy": sum(marks) / len(marks)}
        summary["geneval"] = {
            "total_images": len(scored),
            "total_prompts": len(groups),
            "correct_images": sum(correct) / len(scored) if scored else None,
            "correct_prompts": sum(all(v) for v in groups.values()) / len(groups) if groups else None,
            "tasks": tags,
            "overall": sum(t["accuracy"] for t in tags.values()) / len(tags) if tags else None,
        }
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"images: {summary['images']}  errors: {summary['errors']}"]
    for name, value in summary["mean"].items():
        lines.append(f"mean {name}: {'n/a' if value is None else f'{value:.4f}'}")
    geneval = summary.get("geneval")
    if geneval:
        lines += [
            "",
            "Summary",
            "=======",
            f"Total images: {geneval['total_images']}",
            f"Total prompts: {geneval['total_prompts']}",
            f"% correct images: {geneval['correct_images']:.2%}",
            f"% correct prompts: {geneval['correct_prompts']:.2%}",
            "",
            "Task breakdown",
            "==============",
        ]
        for tag, task in geneval["tasks"].items():
            lines.append(f"{tag:<16} = {task['accuracy']:.2%} ({task['correct']} / {task['total']})")
        lines.append(f"\nOverall score (avg. over tasks): {geneval['overall']:.5f}")
    return "\n".join(lines)


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
