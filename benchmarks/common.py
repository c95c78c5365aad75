"""Shared by the benchmarks: the real photos they run on and a median timer."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image


def photos() -> list[Image.Image]:
    """bus.jpg and zidane.jpg (ultralytics assets), then skimage's astronaut, chelsea, coffee and rocket."""
    import skimage.data
    import ultralytics

    assets = Path(ultralytics.__file__).parent / "assets"
    images = [Image.open(assets / name).convert("RGB") for name in ("bus.jpg", "zidane.jpg")]
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        images.append(Image.fromarray(getattr(skimage.data, name)()).convert("RGB"))
    return images


def timed(function: Callable[[], object], repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    function()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def ms_per_image(reward, samples: list, images_per_call: int, repeats: int) -> float:
    """Median ms per image (after one warm-up) of scoring `samples` with reward.score in calls of images_per_call,
    every item scored (a failure stops the benchmark: its time would not be a scoring time)."""

    def run() -> None:
        for start in range(0, len(samples), images_per_call):
            outputs = reward.score(samples[start : start + images_per_call])
            assert all(output.value is not None for output in outputs), [output.error for output in outputs]

    return 1000 * timed(run, repeats) / len(samples)
