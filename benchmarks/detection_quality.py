"""Benchmark (issue #18): how well the embedded YOLOv3-tiny's `matching` reward tells a true prompt from perturbed ones
on the seven real photos available offline, and what three options do to that:

1. containment merging in box_match (same-class boxes more than `containment_threshold` inside one another are one
   object, as T2I-CompBench counts): off (1.0), 0.9 and 0.7;
2. a flipped second pass (test-time augmentation): the detector also runs on the mirror image, its boxes are mapped
   back and added to the candidates, and box_match's NMS merges the duplicates (implemented here only);
3. the int8 detector against fp32: the order of the prompts by score, and the largest score difference.

The true prompts were written by hand from looking at the photos (COCO classes and counts), never from the
detector's output; the perturbed prompts are made from them by rule: each object's count +-1 (2 for a singleton),
and each object's class swapped for one that is absent from every photo (giraffe), its count kept.
Scores are the seed `matching` variant at the train profile's thresholds (confidence 0.25, NMS IoU 0.45).

Run: .venv/bin/python benchmarks/detection_quality.py   (prints markdown tables; a few minutes on 2 cores at most)
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402
from rewardscope.models.detection.detector import Detector, DetectorConfig  # noqa: E402
from rewardscope.models.detection.matching import MatchingReward, load_detector  # noqa: E402
from rewardscope.models.types import Sample  # noqa: E402

CONF, IOU = 0.25, 0.45  # the train profile (models/profiles.py)
NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}


@dataclass(frozen=True)
class Thing:
    """One COCO object of a prompt: how many, and the words for one and for several."""

    count: int
    singular: str
    plural: str

    def phrase(self) -> str:
        if self.count == 1:
            return f"{'an' if self.singular[0] in 'aeiou' else 'a'} {self.singular}"
        return f"{NUMBERS[self.count]} {self.plural}"


@dataclass(frozen=True)
class Photo:
    name: str
    load: Callable[[], Image.Image]
    truth: tuple[Thing, ...] | None  # None: nothing in the photo is a COCO class
    note: str


def _asset(name: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        import ultralytics

        return Image.open(Path(ultralytics.__file__).parent / "assets" / name).convert("RGB")

    return load


def _skimage(name: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        import skimage.data

        pixels = getattr(skimage.data, name)()
        if isinstance(pixels, tuple):  # stereo_motorcycle: (left, right, disparity); the left view
            pixels = pixels[0]
        return Image.fromarray(pixels).convert("RGB")

    return load


# Written from looking at the photos. Objects cut by the frame or too small to name at a glance are left out
# (noted); a prompt names what a person describing the photo in COCO terms would.
PHOTOS = (
    Photo(
        "bus.jpg",
        _asset("bus.jpg"),
        (Thing(1, "bus", "buses"), Thing(4, "person", "people")),
        "two men in front, one at each edge (left cut by the frame)",
    ),
    Photo(
        "zidane.jpg",
        _asset("zidane.jpg"),
        (Thing(2, "person", "people"), Thing(2, "tie", "ties")),
        "both men wear a tie (the right one's under a lanyard)",
    ),
    Photo("astronaut", _skimage("astronaut"), (Thing(1, "person", "people"),), "shuttle model, flag, helmet: not COCO"),
    Photo("chelsea", _skimage("chelsea"), (Thing(1, "cat", "cats"),), "close-up of one cat's face"),
    Photo(
        "coffee",
        _skimage("coffee"),
        (Thing(1, "cup", "cups"), Thing(1, "spoon", "spoons")),
        "espresso cup on a saucer, a spoon beside it",
    ),
    Photo("rocket", _skimage("rocket"), None, "launch rocket, towers, lamps: no COCO object; no true prompt"),
    Photo(
        "motorcycle",
        _skimage("stereo_motorcycle"),
        (Thing(1, "motorcycle", "motorcycles"), Thing(1, "bench", "benches")),
        "left view; a wooden bench behind; a bicycle cut by the left edge and shelf bottles not named",
    ),
)
ABSENT = ("giraffe", "giraffes")


def prompt_of(things: tuple[Thing, ...]) -> str:
    return " and ".join(thing.phrase() for thing in things)


def perturbed(truth: tuple[Thing, ...], absent: tuple[str, str]) -> list[tuple[str, str]]:
    """(kind, prompt): per object, its count +1 and -1 (a singleton only +1: 'two'), then its class swapped."""
    out: list[tuple[str, str]] = []
    for index, thing in enumerate(truth):
        counts = [thing.count + 1] + ([thing.count - 1] if thing.count > 1 else [])
        for count in counts:
            changed = Thing(count, thing.singular, thing.plural)
            out.append(("count", prompt_of(truth[:index] + (changed,) + truth[index + 1 :])))
    for index, thing in enumerate(truth):
        swapped = Thing(thing.count, *absent)
        out.append(("class", prompt_of(truth[:index] + (swapped,) + truth[index + 1 :])))
    return out


def flip_candidates(detector: Detector, images: list[Image.Image]) -> torch.Tensor:
    """Test-time augmentation: candidates of each image and of its mirror image, the mirror's boxes mapped back
    (x0, x1 = W - x1', W - x0'), concatenated along the candidate axis: [B, 2N, 4 + C]. box_match's class-aware
    NMS then merges the pairs that both passes found. One detector call on the 2B images."""
    mirrored = [ImageOps.mirror(image) for image in images]
    candidates = detector(images + mirrored)
    count = len(images)
    plain, flipped = candidates[:count], candidates[count:].clone()
    widths = torch.tensor([image.width for image in images], dtype=flipped.dtype)[:, None]
    x0, x1 = widths - flipped[..., 2], widths - flipped[..., 0]
    flipped[..., 0], flipped[..., 2] = x0, x1
    return torch.cat([plain, flipped], 1)


class WrappedDetector:
    """A Detector (the protocol MatchingReward takes) over another: optionally with the flip pass, optionally
    caching candidates per image object, so every setting scores the same detector output."""

    def __init__(self, inner: Detector, flip: bool, cache: bool) -> None:
        self.inner, self.flip, self.cache = inner, flip, cache
        self.class_names, self.version = inner.class_names, inner.version + ("+flip" if flip else "")
        self.nms_iou = getattr(inner, "nms_iou", IOU)
        self._cached: dict[int, tuple[Image.Image, torch.Tensor]] = {}

    def _run(self, images: list[Image.Image]) -> torch.Tensor:
        return flip_candidates(self.inner, images) if self.flip else self.inner(images)

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        if not self.cache:
            return self._run(images)
        for image in images:  # one image at a time: every image gives the same number of candidates
            if id(image) not in self._cached:
                self._cached[id(image)] = (image, self._run([image])[0])
        return torch.stack([self._cached[id(image)][1] for image in images])

    def prepare(self, image: Image.Image) -> None:
        return None

    def describe(self) -> dict[str, object]:
        return {**self.inner.describe(), "flip": self.flip}

    def torch_twin(self) -> Any:
        return None


def reward(detector: Detector, containment: float) -> MatchingReward:
    return MatchingReward(
        variant="seed", detector=detector, conf_threshold=CONF, iou_threshold=IOU, containment_threshold=containment
    )


def scores(scorer: MatchingReward, image: Image.Image, prompts: list[str]) -> tuple[list[float], list[dict]]:
    outputs = scorer.score([Sample(image, prompt) for prompt in prompts])
    for output in outputs:
        if output.value is None:
            raise RuntimeError(f"unscorable: {output.error}")
    return [float(o.value) for o in outputs], [o.details for o in outputs]  # type: ignore[arg-type]


def detections_by_class(details: dict) -> str:
    counts = Counter(d["class"] for d in details["detections"])
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def fidelity(true_score: float, others: list[float]) -> tuple[int, int, list[float]]:
    margins = [true_score - other for other in others]
    return sum(margin > 0 for margin in margins), len(margins), margins


def kendall_tau_b(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b (ties in either list allowed); nan when either list is all ties."""
    concordant = discordant = ties_a = ties_b = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        sa, sb = (a[i] > a[j]) - (a[i] < a[j]), (b[i] > b[j]) - (b[i] < b[j])
        if sa == 0 and sb == 0:
            continue
        if sa == 0:
            ties_a += 1
        elif sb == 0:
            ties_b += 1
        elif sa == sb:
            concordant += 1
        else:
            discordant += 1
    denominator = ((concordant + discordant + ties_a) * (concordant + discordant + ties_b)) ** 0.5
    return (concordant - discordant) / denominator if denominator else float("nan")


def pair_agreement(a: list[float], b: list[float]) -> tuple[int, int]:
    """Pairs of prompts whose order (>, =, <) is the same under both score lists, and all pairs."""
    pairs = list(itertools.combinations(range(len(a)), 2))
    same = sum(((a[i] > a[j]) - (a[i] < a[j])) == ((b[i] > b[j]) - (b[i] < b[j])) for i, j in pairs)
    return same, len(pairs)


def paired_median_ms(first: Callable[[], object], second: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median ms of each function over `repeats` alternating calls (after one warm-up call each), so both see the
    same machine load."""
    first(), second()
    samples: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for function, out in ((first, samples[0]), (second, samples[1])):
            start = time.perf_counter()
            function()
            out.append(time.perf_counter() - start)
    return statistics.median(samples[0]) * 1e3, statistics.median(samples[1]) * 1e3


def order_of(values: list[float]) -> str:
    """Prompt numbers by score, highest first; '=' between equal scores."""
    ranked = sorted(range(len(values)), key=lambda i: (-values[i], i))
    text = str(ranked[0])
    for previous, current in itertools.pairwise(ranked):
        text += (" = " if values[current] == values[previous] else " > ") + str(current)
    return text


def boxes_text(details: dict) -> str:
    return "<br>".join(
        f"{d['class']} {d['score']:.2f} [{', '.join(f'{v:.0f}' for v in d['box'])}]" for d in details["detections"]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=9, help="timed runs per photo for the cost table (median)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    parser.add_argument("--skip-int8", action="store_true", help="leave out the int8 comparison (builds a model)")
    args = parser.parse_args()

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; Python {platform.python_version()}; ", end="")
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; load average {load}")
    config = DetectorConfig(intra_op_threads=args.threads)
    fp32 = load_detector(None, config)
    int8 = None if args.skip_int8 else load_detector(None, config, quantized=True)  # built once, then cached
    print(f"detector: {fp32.version}{f' and {int8.version}' if int8 else ''}; matching seed, conf {CONF}, IoU {IOU}\n")
    images = {photo.name: photo.load() for photo in PHOTOS}
    prompts: dict[str, list[tuple[str, str]]] = {}  # photo -> [(kind, prompt)], the true prompt first
    for photo in PHOTOS:
        if photo.truth is not None:
            prompts[photo.name] = [("true", prompt_of(photo.truth)), *perturbed(photo.truth, ABSENT)]
        else:
            prompts[photo.name] = [("class", Thing(1, *ABSENT).phrase())]

    plain, flipped = WrappedDetector(fp32, False, True), WrappedDetector(fp32, True, True)
    settings = {
        "off": reward(plain, 1.0),
        "c0.9": reward(plain, 0.9),
        "c0.7": reward(plain, 0.7),
        "flip": reward(flipped, 1.0),
        "flip+c0.9": reward(flipped, 0.9),
    }
    if int8 is not None:
        settings["int8"] = reward(WrappedDetector(int8, False, True), 1.0)
    results: dict[str, dict[str, list[float]]] = {key: {} for key in settings}
    kept: dict[str, dict[str, dict]] = {key: {} for key in settings}
    for key, scorer in settings.items():
        for photo in PHOTOS:
            texts = [text for _, text in prompts[photo.name]]
            values, details = scores(scorer, images[photo.name], texts)
            results[key][photo.name] = values
            kept[key][photo.name] = details[0]

    print("### Photos and prompts (true prompts written by hand; perturbations by rule)\n")
    rows = []
    for photo in PHOTOS:
        true = prompt_of(photo.truth) if photo.truth else "— (skipped: no COCO object)"
        others = "; ".join(f"{text} ({kind})" for kind, text in prompts[photo.name] if kind != "true")
        rows.append([photo.name, f"{images[photo.name].width}×{images[photo.name].height}", true, others, photo.note])
    print(table(["photo", "size", "true prompt", "perturbed prompts", "note"], rows) + "\n")

    print(f"### Every score (matching, seed; conf {CONF}, IoU {IOU}; int8: containment off)\n")
    rows = []
    for photo in PHOTOS:
        for index, (kind, text) in enumerate(prompts[photo.name]):
            values = (fmt(results[key][photo.name][index]) for key in settings)
            rows.append([photo.name, str(index), kind, text, *values])
    print(table(["photo", "#", "kind", "prompt", *settings], rows) + "\n")

    print(f"### Detections per class kept at conf {CONF} (NMS {IOU})\n")
    rows = [[photo.name, *(detections_by_class(kept[key][photo.name]) for key in settings)] for photo in PHOTOS]
    print(table(["photo", *settings], rows) + "\n")

    print("### Highest candidate score of each true-prompt class, before any threshold (fp32; kept if > 0.25)\n")
    rows = []
    for photo in PHOTOS:
        candidates = plain([images[photo.name]])[0]
        for thing in photo.truth or ():
            column = 4 + fp32.class_names.index(thing.singular)
            best = float(candidates[:, column].max())
            rows.append([photo.name, thing.singular, str(thing.count), fmt(best), "yes" if best > CONF else "**no**"])
    print(table(["photo", "class", "in the photo", "best score", "above 0.25"], rows) + "\n")

    print("### Kept boxes (class score [x0, y0, x1, y1]) on the photos where the settings keep different boxes\n")
    rows = []
    for photo in PHOTOS:
        texts = {key: boxes_text(kept[key][photo.name]) for key in settings}
        if len(set(texts.values())) > 1:
            rows.append([photo.name, *(texts[key] or "none" for key in settings)])
    print(table(["photo", *settings], rows) + "\n")

    def fidelity_table(keys: list[str]) -> None:
        header = ["photo"]
        header += [f"true score {k}" for k in keys] + [f"true > pert. {k}" for k in keys]
        header += [f"mean margin {k}" for k in keys]
        rows, totals = [], {k: ([], 0, 0, []) for k in keys}
        for photo in PHOTOS:
            if photo.truth is None:
                rows.append([photo.name] + ["—"] * (3 * len(keys)))
                continue
            cells: list[list[str]] = [[], [], []]
            for k in keys:
                values = results[k][photo.name]
                wins, pairs, margins = fidelity(values[0], values[1:])
                true_scores, all_wins, all_pairs, all_margins = totals[k]
                true_scores.append(values[0])
                all_margins.extend(margins)
                totals[k] = (true_scores, all_wins + wins, all_pairs + pairs, all_margins)
                cells[0].append(fmt(values[0]))
                cells[1].append(f"{wins}/{pairs}")
                cells[2].append(fmt(statistics.mean(margins)))
            rows.append([photo.name, *cells[0], *cells[1], *cells[2]])
        total = [
            *(fmt(statistics.mean(totals[k][0])) for k in keys),
            *(f"{totals[k][1]}/{totals[k][2]} ({totals[k][1] / totals[k][2]:.0%})" for k in keys),
            *(fmt(statistics.mean(totals[k][3])) for k in keys),
        ]
        rows.append(["**all 6 scored**", *(f"**{cell}**" for cell in total)])
        print(table(header, rows) + "\n")
        by_kind = []
        for kind in ("count", "class"):
            cells = []
            for k in keys:
                margins = [
                    results[k][name][0] - results[k][name][i]
                    for name, listed in prompts.items()
                    if listed[0][0] == "true"
                    for i, (kind_i, _) in enumerate(listed)
                    if kind_i == kind
                ]
                wins, ties = sum(m > 0 for m in margins), sum(m == 0 for m in margins)
                cells.append(f"{wins}/{len(margins)} (ties {ties}), margin {fmt(statistics.mean(margins))}")
            by_kind.append([f"{kind} perturbations", *cells])
        print(table(["pairs", *keys], by_kind) + "\n")

    print("### 1. Fidelity: containment merging off (1.0) vs 0.9 vs 0.7\n")
    print("`true > pert.`: pairs where the true prompt scores strictly higher; margin: true − perturbed.\n")
    fidelity_table(["off", "c0.9", "c0.7"])

    print("### 2. Flipped second pass: fidelity (containment off; flip + 0.9 for reference)\n")
    fidelity_table(["off", "flip", "flip+c0.9"])

    print(f"### 2b. Flip pass cost (ms/image, median of {args.repeats} alternating runs: detector, box_match, score)\n")
    timed_plain = reward(WrappedDetector(fp32, False, False), 1.0)
    timed_flip = reward(WrappedDetector(fp32, True, False), 1.0)
    rows, plain_all, flip_all = [], [], []
    for photo in PHOTOS:
        sample = [Sample(images[photo.name], prompts[photo.name][0][1])]
        ms_plain, ms_flip = paired_median_ms(
            lambda s=sample: timed_plain.score(s), lambda s=sample: timed_flip.score(s), args.repeats
        )
        plain_all.append(ms_plain)
        flip_all.append(ms_flip)
        rows.append([photo.name, fmt(ms_plain, 1), fmt(ms_flip, 1), f"{ms_flip / ms_plain:.2f}×"])
    batch = [Sample(images[p.name], prompts[p.name][0][1]) for p in PHOTOS]
    ms_plain, ms_flip = paired_median_ms(
        lambda: timed_plain.score(batch), lambda: timed_flip.score(batch), args.repeats
    )
    ms_plain, ms_flip = ms_plain / len(batch), ms_flip / len(batch)
    median_plain, median_flip = statistics.median(plain_all), statistics.median(flip_all)
    rows.append(
        [
            "median of the photos, batch 1",
            fmt(median_plain, 1),
            fmt(median_flip, 1),
            f"{median_flip / median_plain:.2f}×",
        ]
    )
    rows.append(["all 7 in one batch, per image", fmt(ms_plain, 1), fmt(ms_flip, 1), f"{ms_flip / ms_plain:.2f}×"])
    print(table(["photo", "plain ms", "flip ms", "flip / plain"], rows) + "\n")

    if int8 is None:
        return
    print("### 3. int8 vs fp32: order of each photo's prompts by score (containment off)\n")
    print("Prompt numbers are the # of the every-score table (0: the true prompt); '=' joins equal scores.\n")
    rows, flat_diff = [], 0.0
    for photo in PHOTOS:
        a, b = results["off"][photo.name], results["int8"][photo.name]
        same, pairs = pair_agreement(a, b)
        diff = max(abs(x - y) for x, y in zip(a, b, strict=True))
        flat_diff = max(flat_diff, diff)
        tau = kendall_tau_b(a, b) if len(a) > 1 else float("nan")
        everything_zero = not any(a) and not any(b)
        verdict = "yes" if same == pairs else "**no**"
        rows.append(
            [
                photo.name,
                str(len(a)),
                verdict + (" (all scores 0 in both)" if everything_zero else ""),
                f"{same}/{pairs}",
                "—" if tau != tau else fmt(tau, 2),
                fmt(diff),
                order_of(a),
                order_of(b),
            ]
        )
    header = ["photo", "prompts", "same order", "pairs in same order", "Kendall τ-b", "max abs Δscore"]
    print(table(header + ["fp32 order", "int8 order"], rows) + "\n")
    print(f"Largest abs(fp32 − int8) over all {sum(len(v) for v in prompts.values())} prompts: {flat_diff:.3f}\n")


if __name__ == "__main__":
    main()
