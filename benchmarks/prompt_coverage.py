"""Benchmark: how many prompts the parser can fully score with a closed (COCO) vocabulary vs an open one, at the
parser level (no detector), on T2I-CompBench's numeracy validation prompts and on GenEval-style prompts generated
from GenEval's templates over its 80 class names.

A prompt is fully scoreable when its parse has at least one object and no unknown noun: every noun it names is
either an object (or exclude) to check or absent. Closed is parse_prompt(prompt); open adds open_vocabulary=True.

Run: .venv/bin/python benchmarks/prompt_coverage.py [--numeracy PATH] [--json]   (offline, a few seconds)"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rewardscope.models.prompt import (  # noqa: E402
    COCO_CLASSES,
    GENEVAL_COLORS,
    GENEVAL_POSITIONS,
    ParsedPrompt,
    _inflect,
    geneval_name,
    parse_prompt,
)

NUMERACY_PATH = ROOT / "benchmarks" / "data" / "t2i_compbench_numeracy_val.txt"
TOP_UNSEEN = 15
# GenEval's pair templates are sampled at random; here each class is paired with the next PARTNERS classes.
PARTNERS = 3
COUNT_WORDS = ("two", "three", "four")


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def geneval_plural(name: str) -> str:
    # GenEval's prompts/create_prompts.py pluralises naively ("benchs", "skises"); the parser knows that spelling.
    return f"{name}es" if name.endswith("s") else f"{name}s"


def geneval_prompts() -> dict[str, list[str]]:
    """A deterministic instantiation of GenEval's six templates over its 80 names, by tag."""
    names = [geneval_name(name) for name in COCO_CLASSES]
    a = _inflect().a  # "a dog", "an umbrella", "an orange cat"
    pairs = [(names[i], names[(i + step) % len(names)]) for i in range(len(names)) for step in range(1, PARTNERS + 1)]
    colors = [GENEVAL_COLORS[i % len(GENEVAL_COLORS)] for i in range(2 * len(pairs))]
    return {
        "single_object": [f"a photo of {a(name)}" for name in names],
        "two_object": [f"a photo of {a(first)} and {a(second)}" for first, second in pairs],
        "counting": [f"a photo of {number} {geneval_plural(name)}" for name in names for number in COUNT_WORDS],
        "colors": [f"a photo of {a(f'{colors[i]} {name}')}" for i, name in enumerate(names)],
        "position": [
            f"a photo of {a(first)} {GENEVAL_POSITIONS[i % len(GENEVAL_POSITIONS)]} {a(second)}"
            for i, (first, second) in enumerate(pairs)
        ],
        "color_attr": [
            f"a photo of {a(f'{colors[2 * i]} {first}')} and {a(f'{colors[2 * i + 1]} {second}')}"
            for i, (first, second) in enumerate(pairs)
        ],
    }


def fully_scoreable(parsed: ParsedPrompt) -> bool:
    return bool(parsed.objects) and not parsed.unknown


def coverage(prompts: Sequence[str]) -> dict:
    """Shares (0..1) of prompts with an object and fully scoreable, closed vs open, and the unseen nouns."""
    closed = [parse_prompt(prompt) for prompt in prompts]
    opened = [parse_prompt(prompt, open_vocabulary=True) for prompt in prompts]
    unseen_closed = Counter(noun for parsed in closed for noun in parsed.unknown)
    unseen_open = Counter(noun for parsed in opened for noun in parsed.unknown)

    def share(flags) -> float:
        flags = list(flags)
        return sum(flags) / len(flags) if flags else 0.0

    return {
        "prompts": len(prompts),
        "with_object": {
            "closed": share(bool(p.objects) for p in closed),
            "open": share(bool(p.objects) for p in opened),
        },
        "fully_scoreable": {
            "closed": share(map(fully_scoreable, closed)),
            "open": share(map(fully_scoreable, opened)),
        },
        "top_unseen_closed": unseen_closed.most_common(TOP_UNSEEN),
        "top_unseen_open": unseen_open.most_common(TOP_UNSEEN),
    }


def markdown(results: dict[str, dict]) -> str:
    lines = [
        "| prompt set | prompts | ≥1 object: closed | open | fully scoreable: closed | open |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in results.items():
        with_object, scoreable = row["with_object"], row["fully_scoreable"]
        lines.append(
            f"| {name} | {row['prompts']} | {with_object['closed']:.1%} | {with_object['open']:.1%} "
            f"| {scoreable['closed']:.1%} | {scoreable['open']:.1%} |"
        )
    for name, row in results.items():
        for mode in ("closed", "open"):
            if row[f"top_unseen_{mode}"]:
                nouns = ", ".join(f"{noun} ({count})" for noun, count in row[f"top_unseen_{mode}"])
                lines.append(f"\n{name}, the {TOP_UNSEEN} most frequent unknown nouns ({mode}): {nouns}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numeracy", type=Path, default=NUMERACY_PATH, help="T2I-CompBench numeracy prompts")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of Markdown")
    args = parser.parse_args()

    geneval = geneval_prompts()
    results = {
        "T2I-CompBench numeracy (val)": coverage(read_prompts(args.numeracy)),
        "GenEval templates": coverage([prompt for prompts in geneval.values() for prompt in prompts]),
    }
    results |= {f"GenEval: {tag}": coverage(prompts) for tag, prompts in geneval.items()}
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(markdown(results))


if __name__ == "__main__":
    main()
