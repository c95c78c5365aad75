"""Plain-Python oracles shared by the kernel and matching tests."""

from __future__ import annotations

import itertools


def brute_force_pmf(probabilities: list[float]) -> list[float]:
    """Distribution of the number of successes of independent Bernoulli trials, by enumerating outcomes."""
    pmf = [0.0] * (len(probabilities) + 1)
    for outcome in itertools.product([0, 1], repeat=len(probabilities)):
        weight = 1.0
        for hit, p in zip(outcome, probabilities, strict=True):
            weight *= p if hit else 1 - p
        pmf[sum(outcome)] += weight
    return pmf


def geneval_verdict(metadata: dict, detections: list[tuple[list[float], dict[str, float]]]) -> tuple[bool, list[str]]:
    """GenEval's verdict on one image, written out from its published rule (djghosh13/geneval
    evaluation/evaluate_images.py, commit 16f1681) for tests to hold ours against; colours left out.

    detections: (box x0 y0 x1 y1, {class: score}) as a detector with one list per class reports them (one box may
    be listed under several classes). Thresholds: 0.9 for tag "counting", else 0.3, strict (lines 230-233); at most
    16 per class, best first (234); no NMS (241, 289)."""
    threshold = 0.9 if metadata.get("tag") == "counting" else 0.3
    per_class: dict[str, list[tuple[float, list[float]]]] = {}
    for box, scores in detections:
        for name, score in scores.items():
            if score > threshold:
                per_class.setdefault(name, []).append((score, box))
    objects = {
        name: [box for _, box in sorted(found, key=lambda pair: -pair[0])[:16]] for name, found in per_class.items()
    }

    def relations(a: list[float], b: list[float]) -> set[str]:  # lines 140-157
        centre = [((a[0] + a[2]) / 2 - (b[0] + b[2]) / 2), ((a[1] + a[3]) / 2 - (b[1] + b[3]) / 2)]
        extent = [abs(a[2] - a[0]) + abs(b[2] - b[0]), abs(a[3] - a[1]) + abs(b[3] - b[1])]
        revised = [
            max(abs(c) - 0.1 * e, 0.0) * (1 if c > 0 else -1 if c < 0 else 0)
            for c, e in zip(centre, extent, strict=True)
        ]
        if all(abs(r) < 1e-3 for r in revised):
            return set()
        norm = (centre[0] ** 2 + centre[1] ** 2) ** 0.5
        dx, dy = revised[0] / norm, revised[1] / norm
        tests = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
        return {relation for relation, holds in tests.items() if holds}

    reasons: list[str] = []
    groups: list[list[list[float]] | None] = []
    for entry in metadata["include"]:  # lines 173-213
        name, count = entry["class"], entry["count"]
        found = objects.get(name, [])[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        elif "position" in entry:
            relation, target = entry["position"]
            if groups[target] is None:
                ok = False
                reasons.append(f"no target for {name} to be {relation}")
            else:
                for box in found:
                    for other in groups[target]:
                        held = relations(box, other)
                        if relation not in held:
                            ok = False
                            reasons.append(
                                f"expected {name} {relation} target, found {' and '.join(sorted(held))} target"
                            )
                            break
                    if not ok:
                        break
        groups.append(found if ok else None)
    for entry in metadata.get("exclude", []):  # lines 215-219
        if len(objects.get(entry["class"], [])) >= entry["count"]:
            reasons.append(f"expected {entry['class']}<{entry['count']}, found {len(objects[entry['class']])}")
    return not reasons, reasons
