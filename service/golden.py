"""Start-up trust check: score bundled golden images and compare with recorded expectations.
A mismatch (collapsed confidences, a wrong config scoring everything near 0) keeps the service not-ready."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rewardscope.models.profiles import get_profile
from rewardscope.models.scorer import Scorer

log = logging.getLogger(__name__)

BUNDLED = Path(__file__).parent / "golden" / "expectations.json"
CASES = (
    ("bus.jpg", "four people and a bus"),
    ("bus.jpg", "a cat"),
    ("zidane.jpg", "two people"),
)


def golden_image(name: str) -> Path:
    """Golden photos are the ones ultralytics ships in its package (an installed dependency)."""
    import ultralytics

    return Path(ultralytics.__file__).parent / "assets" / name


@dataclass
class GoldenReport:
    ok: bool
    checked: int = 0
    differences: list[str] = field(default_factory=list)
    skipped: str | None = None

    def summary(self) -> str:
        if self.skipped:
            return f"golden check skipped: {self.skipped}"
        if self.ok:
            return f"golden check passed ({self.checked} cases)"
        return "golden check FAILED:\n  " + "\n  ".join(self.differences)


def _observe(scorer: Scorer) -> list[dict[str, Any]]:
    results = scorer.score([golden_image(name) for name, _ in CASES], [prompt for _, prompt in CASES])
    observed = []
    for (image, prompt), result in zip(CASES, results, strict=True):
        detections: dict[str, int] = {}
        for detection in result.details.get("matching", {}).get("detections", []):
            detections[detection["class"]] = detections.get(detection["class"], 0) + 1
        observed.append(
            {"image": image, "prompt": prompt, "score": result.rewards.get("matching"), "detections": detections}
        )
    return observed


def record(scorer: Scorer, profile: str, tolerance: float = 0.02) -> dict[str, Any]:
    """Expectations as the running models produce them now (regenerate after a deliberate model change)."""
    return {
        "detector_version": scorer.versions()["matching"],
        "profile": profile,
        "tolerance": tolerance,
        "cases": _observe(scorer),
    }


def check(scorer: Scorer, profile: str, expectations_path: Path | None = None) -> GoldenReport:
    path = expectations_path or BUNDLED
    expected = json.loads(Path(path).read_text())
    version = scorer.versions().get("matching")
    if version != expected["detector_version"] or get_profile(profile).name != get_profile(expected["profile"]).name:
        return GoldenReport(
            ok=True,
            skipped=f"expectations are for {expected['detector_version']} / {expected['profile']}, "
            f"running {version} / {profile}",
        )
    report = GoldenReport(ok=True)
    tolerance = float(expected["tolerance"])
    for want, got in zip(expected["cases"], _observe(scorer), strict=True):
        report.checked += 1
        label = f"{want['image']} / {want['prompt']!r}"
        if got["score"] is None or abs(got["score"] - want["score"]) > tolerance:
            report.differences.append(f"{label}: score {got['score']} expected {want['score']} ± {tolerance}")
        if got["detections"] != want["detections"]:
            report.differences.append(f"{label}: detections {got['detections']} expected {want['detections']}")
    report.ok = not report.differences
    return report
