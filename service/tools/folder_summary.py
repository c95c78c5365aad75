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


def summarise(
    rows: list[dict[str, Any]], geneval_reward: str | None = None, profile: str | None = None
) -> dict[str, Any]:
    """Mean per reward over the rows that scored, per-category means, and GenEval's summary figures when the
    rows carry a GenEval-style 0/1 reward. profile: the label of the profile the rows were scored under
    ("geneval@1"), recorded in the summary."""
    names = sorted({name for row in rows for name in (row.get("rewards") or {})})
    summary: dict[str, Any] = {"images": len(rows), "errors": sum(row.get("error") is not None for row in rows)}
    if profile is not None:
        summary["profile"] = profile
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
    scoreable = scoreability(rows)
    if scoreable is not None:
        summary["scoreable"] = scoreable
    if geneval_reward and rows:
        summary["geneval"] = geneval_summary(rows, geneval_reward, profile)
    return summary


def scoreability(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Over the prompts judged by detection rewards (their details list the prompt's nouns the detector cannot see,
    `unknown`): how many are fully scoreable (every noun seen), and the unseen nouns by frequency, so a partial
    score is never mistaken for the benchmark's. None when no row carries detection details."""
    prompts: dict[str, set[str]] = {}
    for row in rows:
        for details in (row.get("details") or {}).values():
            if isinstance(details, dict) and isinstance(details.get("unknown"), list):
                prompts.setdefault(row.get("group") or row["prompt"], set()).update(details["unknown"])
        if row.get("error_code") == "no_countable_object":  # every noun unseen: no details to read them from
            prompts.setdefault(row.get("group") or row["prompt"], set()).add("(no noun the detector knows)")
    if not prompts:
        return None
    nouns: dict[str, int] = {}
    for unseen in prompts.values():
        for noun in unseen:
            nouns[noun] = nouns.get(noun, 0) + 1
    full = sum(not unseen for unseen in prompts.values())
    return {
        "prompts": len(prompts),
        "fully_scoreable": full,
        "share": full / len(prompts),
        "unseen_nouns": dict(sorted(nouns.items(), key=lambda item: (-item[1], item[0]))),
    }


def geneval_summary(rows: Sequence[dict[str, Any]], reward: str, profile: str | None = None) -> dict[str, Any]:
    """GenEval's own summary (djghosh13/geneval evaluation/summary_scores.py, commit d927da8), one row per image:
    % correct images = mean over all images (S:28); % correct prompts = share of prompts with ANY correct image
    (S:29); per task = share of the tag's images that are correct, tags in first-appearance order (S:38-40);
    overall = unweighted mean of the per-task figures over every tag present (S:43).

    A row the reward could not judge (value None: a decode failure, an attribute we cannot check) counts as
    incorrect everywhere, as GenEval's evaluator counts an image it cannot confirm, so every total counts every
    row; `failed` and `failures` (error code, else message -> count) say how many such rows there were."""
    correct = [(row.get("rewards") or {}).get(reward) == 1.0 for row in rows]
    failures: dict[str, int] = {}
    for row in rows:
        if (row.get("rewards") or {}).get(reward) is None:
            reason = row.get("error_code") or row.get("error") or "no_result"
            failures[reason] = failures.get(reason, 0) + 1
    prompts: dict[str, bool] = {}
    tasks: dict[str, dict[str, Any]] = {}  # insertion order = first appearance (groupby(sort=False))
    for row, ok in zip(rows, correct, strict=True):
        group = row.get("group") or row["prompt"]
        prompts[group] = prompts.get(group, False) or ok
        task = tasks.setdefault(row.get("tag") or "untagged", {"correct": 0, "total": 0})
        task["correct"] += ok
        task["total"] += 1
    for task in tasks.values():
        task["accuracy"] = task["correct"] / task["total"]
    return {
        "profile": profile,
        "total_images": len(rows),
        "total_prompts": len(prompts),
        "correct_images": sum(correct) / len(rows),
        "correct_prompts": sum(prompts.values()) / len(prompts),
        "tasks": tasks,
        "overall": sum(task["accuracy"] for task in tasks.values()) / len(tasks),
        "failed": sum(failures.values()),
        "failures": dict(sorted(failures.items(), key=lambda item: (-item[1], item[0]))),
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"images: {summary['images']}  errors: {summary['errors']}"]
    for name, value in summary["mean"].items():
        lines.append(f"mean {name}: {'n/a' if value is None else f'{value:.4f}'}")
    scoreable = summary.get("scoreable")
    if scoreable and scoreable["fully_scoreable"] < scoreable["prompts"]:
        top = ", ".join(f"{noun} ({count})" for noun, count in list(scoreable["unseen_nouns"].items())[:10])
        lines.append(
            f"fully scoreable prompts: {scoreable['fully_scoreable']} / {scoreable['prompts']} "
            f"({scoreable['share']:.0%}); nouns the detector cannot see: {top}"
        )
    geneval = summary.get("geneval")
    if geneval:
        lines += [
            "",
            "Summary",
            "=======",
            *([f"Profile: {geneval['profile']}"] if geneval.get("profile") else []),
            f"Total images: {geneval['total_images']}",
            f"Total prompts: {geneval['total_prompts']}",
            f"% correct images: {geneval['correct_images']:.2%}",
            f"% correct prompts: {geneval['correct_prompts']:.2%}",
            *_failures_line(geneval),
            "",
            "Task breakdown",
            "==============",
        ]
        for tag, task in geneval["tasks"].items():
            lines.append(f"{tag:<16} = {task['accuracy']:.2%} ({task['correct']} / {task['total']})")
        lines.append(f"\nOverall score (avg. over tasks): {geneval['overall']:.5f}")
    return "\n".join(lines)


def _failures_line(geneval: dict[str, Any]) -> list[str]:
    if not geneval.get("failed"):
        return []
    reasons = ", ".join(f"{reason}: {count}" for reason, count in geneval["failures"].items())
    return [f"Failed items (counted incorrect): {geneval['failed']} — {reasons}"]
