"""Run summaries: model versions, the run's config, means and per-tag figures, and GenEval's own summary."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


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
