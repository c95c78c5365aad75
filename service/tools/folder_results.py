"""Folder results: the append-only, fsync'd JSONL a run resumes from, and its Parquet copy."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.jsonl"


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
