"""Load tests of the rewardscope service: a locustfile of realistic users, its runner, and a reward-server-style
baseline (Flask + gunicorn) to compare against. Everything here talks to 127.0.0.1 only.

This module holds the photos they all send; it imports neither locust (which monkeypatches with gevent on
import) nor torch."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

GENERATOR_SIZE = 512  # what SD-1.5-class generators emit; the detector letterboxes it to 416

# Photo -> a prompt naming objects the detector knows, so that no item may fail with no_countable_object.
PROMPTS: dict[str, str] = {
    "bus": "four people and a bus",
    "zidane": "two people and a tie",
    "astronaut": "a portrait of a person in a space suit",
    "chelsea": "a photo of a cat",
    "coffee": "a cup of coffee on a table",
    "rocket": "a rocket launch watched by a person",
    "motorcycle": "a motorcycle parked in a garage",
}


def _ultralytics_assets() -> Path:
    # Located without importing ultralytics: that would pull torch into every load-generating process.
    spec = importlib.util.find_spec("ultralytics")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the photos bus.jpg and zidane.jpg come from the ultralytics package")
    return Path(next(iter(spec.submodule_search_locations))) / "assets"


def generator_like_photos(size: int = GENERATOR_SIZE) -> dict[str, np.ndarray]:
    """The real photos of PROMPTS, centre-cropped square and resized to size x size: uint8 [size, size, 3]."""
    import skimage.data

    sources = {name: Image.open(_ultralytics_assets() / f"{name}.jpg") for name in ("bus", "zidane")}
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        sources[name] = Image.fromarray(getattr(skimage.data, name)())
    sources["motorcycle"] = Image.fromarray(skimage.data.stereo_motorcycle()[0])
    return {
        name: np.asarray(ImageOps.fit(sources[name].convert("RGB"), (size, size), Image.Resampling.LANCZOS))
        for name in PROMPTS
    }
