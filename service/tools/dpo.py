"""DPO pairs from folders of N candidates per prompt: score them with a Scorer, combine the rewards, keep best vs
worst (AGFSync) and write Parquet in the Pick-a-Pic v2 column layout that Diffusion-DPO training scripts read.

Folder layouts:
  nested  DIR/<prompt_id>/prompt.txt + DIR/<prompt_id>/*.png|jpg|jpeg|webp
  flat    DIR/*.png|... + DIR/prompts.jsonl, one {"file": "a.png", "prompt": "...", "prompt_id": "..."} a line
          (prompt_id optional: candidates of the same prompt text form one group)
Candidates are ordered by file name within a group; a score tie keeps the earlier file first."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rewardscope.models.combine import combine, preference_pair
from rewardscope.models.images import IMAGE_SUFFIXES
from rewardscope.models.scorer import Scorer

PROMPTS_FILE, PROMPT_FILE = "prompts.jsonl", "prompt.txt"


@dataclass
class CandidateGroup:
    prompt_id: str
    prompt: str
    files: list[Path]


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_candidate_groups(root: str | Path) -> list[CandidateGroup]:
    """The prompt groups of a candidates folder, in either layout (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    prompts_file = root / PROMPTS_FILE
    if prompts_file.is_file():
        groups: dict[str, CandidateGroup] = {}
        for number, line in enumerate(prompts_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            entry = json.loads(line)
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or "prompt" not in entry:
                raise ValueError(f"{PROMPTS_FILE}:{number}: expected {{'file': ..., 'prompt': ...}}")
            path = root / entry["file"]
            if not path.is_file():
                raise ValueError(f"{PROMPTS_FILE}:{number}: no image {entry['file']!r}")
            key = str(entry.get("prompt_id", entry["prompt"]))
            group = groups.setdefault(key, CandidateGroup(key, str(entry["prompt"]), []))
            if group.prompt != entry["prompt"]:
                raise ValueError(f"{PROMPTS_FILE}:{number}: prompt_id {key!r} already has another prompt")
            group.files.append(path)
        for group in groups.values():
            group.files.sort()
        return list(groups.values())
    groups_list = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        images = _images(folder)
        if not images:
            continue
        if not (folder / PROMPT_FILE).is_file():
            raise ValueError(f"{folder} has images but no {PROMPT_FILE}")
        groups_list.append(CandidateGroup(folder.name, (folder / PROMPT_FILE).read_text().strip(), images))
    if not groups_list:
        raise ValueError(f"{root} holds neither {PROMPTS_FILE} nor <prompt_id>/{PROMPT_FILE} folders with images")
    return groups_list


@dataclass
class DpoSummary:
    groups: int = 0
    pairs: int = 0
    below_margin: int = 0  # best - worst < margin, or every candidate tied
    identical: int = 0  # best and worst are the same bytes (duplicates differ only by float noise)
    too_few_scored: int = 0  # fewer than two candidates scored (errors are in `errors`)
    errors: list[str] = field(default_factory=list)


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            # Pick-a-Pic v2 columns read by Diffusion-DPO: label_0 = 1 means jpg_0 is preferred.
            ("caption", pa.string()),
            ("jpg_0", pa.binary()),
            ("jpg_1", pa.binary()),
            ("label_0", pa.float64()),
            ("label_1", pa.float64()),
            ("are_different", pa.bool_()),
            ("has_label", pa.bool_()),
            # ours
            ("prompt_id", pa.string()),
            ("image_0_path", pa.string()),
            ("image_1_path", pa.string()),
            ("score_0", pa.float64()),
            ("score_1", pa.float64()),
            ("margin", pa.float64()),
            ("rewards_0", pa.string()),
            ("rewards_1", pa.string()),
            ("num_candidates", pa.int32()),
            ("aggregation", pa.string()),
        ]
    )


def export_dpo_pairs(
    root: str | Path,
    output: str | Path,
    scorer: Scorer,
    normalization: str = "none",
    aggregation: str = "weighted_sum",
    margin: float = 0.0,
    batch_size: int = 32,
    on_group: Callable[[CandidateGroup], None] | None = None,
) -> DpoSummary:
    """Score every group's candidates, keep (best, worst) where they differ by at least `margin`, write Parquet.
    jpg_0 / jpg_1 hold the candidates' file bytes as they are on disk (PNG stays PNG; PIL opens either)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, output = Path(root), Path(output)
    groups = read_candidate_groups(root)
    summary = DpoSummary(groups=len(groups))
    schema = _schema()
    output.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(output, schema) as writer:
        chunk: list[CandidateGroup] = []
        for index, group in enumerate(groups):
            chunk.append(group)
            if sum(len(g.files) for g in chunk) >= batch_size or index == len(groups) - 1:
                rows = _score_chunk(root, chunk, scorer, normalization, aggregation, margin, summary)
                if rows:
                    writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                for done in chunk:
                    if on_group is not None:
                        on_group(done)
                chunk = []
    return summary


def _score_chunk(
    root: Path,
    groups: list[CandidateGroup],
    scorer: Scorer,
    normalization: str,
    aggregation: str,
    margin: float,
    summary: DpoSummary,
) -> list[dict[str, Any]]:
    files = [file for group in groups for file in group.files]
    prompts = [group.prompt for group in groups for _ in group.files]
    results = scorer.score([str(file) for file in files], prompts)
    rows, start = [], 0
    for group in groups:
        members = results[start : start + len(group.files)]
        start += len(group.files)
        for file, result in zip(group.files, members, strict=True):
            if result.error:
                summary.errors.append(f"{file.relative_to(root)}: {result.error}")
        if normalization == "none" and aggregation == "weighted_sum":
            scores = [member.total for member in members]
        else:
            values = {name: [member.rewards[name] for member in members] for name in scorer.weights}
            scores = combine(values, scorer.weights, normalization, aggregation)
        if sum(score is not None for score in scores) < 2:
            summary.too_few_scored += 1
            continue
        pair = preference_pair(scores, margin)
        if pair is None:
            summary.below_margin += 1
            continue
        chosen, rejected = group.files[pair.chosen].read_bytes(), group.files[pair.rejected].read_bytes()
        if chosen == rejected:
            summary.identical += 1
            continue
        rows.append(
            {
                "caption": group.prompt,
                "jpg_0": chosen,
                "jpg_1": rejected,
                "label_0": 1.0,
                "label_1": 0.0,
                "are_different": True,
                "has_label": True,
                "prompt_id": group.prompt_id,
                "image_0_path": str(group.files[pair.chosen].relative_to(root)),
                "image_1_path": str(group.files[pair.rejected].relative_to(root)),
                "score_0": scores[pair.chosen],
                "score_1": scores[pair.rejected],
                "margin": pair.margin,
                "rewards_0": json.dumps(members[pair.chosen].rewards),
                "rewards_1": json.dumps(members[pair.rejected].rewards),
                "num_candidates": len(group.files),
                "aggregation": f"{aggregation}/{normalization}",
            }
        )
        summary.pairs += 1
    return rows
