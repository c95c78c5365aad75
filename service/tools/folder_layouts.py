"""Folder layouts: which images a folder holds and the prompt (and metadata) of each: a flat folder with a prompts
file or prompts in file names, GenEval's <root>/<NNNNN>/metadata.jsonl + samples/, T2I-CompBench's samples/."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rewardscope.models.images import IMAGE_SUFFIXES

LAYOUTS = ("flat", "geneval", "t2i-compbench")


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
