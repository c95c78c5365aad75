"""Hostile inputs, one named case each. Through a real `bentoml serve` (BentoML's own parsing included) every case
gets either a 4xx whose body names the problem, or a per-item error (code + message, value null, never 0) while
the rest of its batch is scored exactly as in a clean request; afterwards the same worker still serves.
Unit checks pin the decoder's decisions (first GIF frame, aspect ratio, .npy headers checked before allocating).

Covered elsewhere, not repeated here: byte limit -> 413 and a lone corrupt PNG in a batch of 32
(test_service_e2e.py), the decoder's modes, EXIF and limits one by one (test_images.py), random bytes, arrays
and prompts (test_fuzz.py). URLs, paths and pickles as images, and auth, are in test_security.py."""

from __future__ import annotations

import base64
import io
import json
import struct
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image
from rewardscope.models.images import ImageError, decode_array, decode_bytes, decode_npy
from rewardscope.service.engine import RewardEngine
from rewardscope.service.schemas import ScoreItem
from rewardscope.service.settings import ServiceSettings
from serving import TOKEN, server_tree

AUTH = {"Authorization": f"Bearer {TOKEN}"}
BUS_PROMPT = "four people and a bus"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def npy_header_only(shape: tuple[int, ...], data: bytes = b"", dtype: str = "|u1") -> bytes:
    """A .npy whose header declares `shape` but which carries only `data`: a few bytes posing as a huge array."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + data


def animated_gif(first: Image.Image) -> bytes:
    """Two frames: `first`, then its negative, so scoring the wrong frame would show."""
    second = Image.fromarray(255 - np.asarray(first))
    return encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)


def bus_bytes() -> bytes:
    from conftest import ultralytics_asset

    return ultralytics_asset("bus.jpg").read_bytes()


def bus_pixels() -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(bus_bytes())).convert("RGB"))


def image_item(data: bytes, prompt: str = BUS_PROMPT, **extra: Any) -> dict[str, Any]:
    return {"image": b64(data), "prompt": prompt, **extra}


def array_item(data: bytes, prompt: str = BUS_PROMPT) -> dict[str, Any]:
    return {"array": b64(data), "prompt": prompt}


# ---------------------------------------------------------------------------------------------------------------
# The catalogue. Builders run inside the tests (some payloads are tens of MB).


@dataclass(frozen=True)
class Refused:
    """An item that must fail alone: its error code and a fragment of the message that says what is wrong."""

    item: Callable[[], dict[str, Any]]
    code: str
    message: str


PER_ITEM: dict[str, Refused] = {
    # 20000 x 20000 at 1 bit per pixel: a few KB on the wire, 400 MP once decoded.
    "decompression-bomb-png": Refused(
        lambda: image_item(encode(Image.new("1", (20000, 20000)), "PNG")), "too_many_pixels", "400000000"
    ),
    "1x100000-image": Refused(
        lambda: image_item(encode(Image.new("RGB", (1, 100000)), "PNG")), "too_small", "1x100000"
    ),
    "8x100000-sliver": Refused(
        lambda: image_item(encode(Image.new("RGB", (100000, 8), (90, 90, 90)), "PNG")), "too_small", "aspect ratio"
    ),
    "truncated-jpeg": Refused(lambda: image_item(bus_bytes()[: len(bus_bytes()) // 2]), "decode_failed", "truncated"),
    "svg-posing-as-image": Refused(
        lambda: image_item(b'<svg xmlns="http://www.w3.org/2000/svg" width="640" height="480"><rect/></svg>'),
        "unsupported_format",
        "not a readable image",
    ),
    "plain-text-posing-as-image": Refused(
        lambda: image_item(b"four people and a bus, definitely a JPEG\n" * 50), "unsupported_format", "PNG, JPEG"
    ),
    "gif-magic-then-garbage": Refused(
        lambda: image_item(b"GIF89a" + b"\xff" * 64), "unsupported_format", "allowed format"
    ),
    # 33 MiB once decoded, one MiB past the per-image byte limit (the request itself stays under its 64 MiB).
    "huge-base64-string": Refused(
        lambda: {"image": "A" * (((33 << 20) // 3) * 4), "prompt": BUS_PROMPT}, "too_many_bytes", "more than"
    ),
    "npy-float32-nan": Refused(
        lambda: array_item(npy_bytes(np.full((64, 64, 3), np.nan, np.float32))), "bad_array", "float32"
    ),
    "npy-float64-inf": Refused(lambda: array_item(npy_bytes(np.full((64, 64, 3), np.inf))), "bad_array", "float64"),
    "npy-int64": Refused(lambda: array_item(npy_bytes(np.zeros((64, 64, 3), np.int64))), "bad_array", "int64"),
    "npy-bool": Refused(lambda: array_item(npy_bytes(np.zeros((64, 64, 3), bool))), "bad_array", "bool"),
    "npy-complex": Refused(lambda: array_item(npy_bytes(np.zeros((64, 64, 3), np.complex64))), "bad_array", "complex"),
    "npy-structured-dtype": Refused(
        lambda: array_item(npy_bytes(np.zeros((64, 64), [("r", "u1"), ("g", "u1"), ("b", "u1")]))), "bad_array", "dtype"
    ),
    "npy-batch-of-images-4d": Refused(
        lambda: array_item(npy_bytes(np.zeros((2, 64, 64, 3), np.uint8))), "bad_array", "(2, 64, 64, 3)"
    ),
    "npy-channels-first": Refused(
        lambda: array_item(npy_bytes(np.zeros((3, 64, 64), np.uint8))), "bad_array", "(3, 64, 64)"
    ),
    "npy-two-channels": Refused(lambda: array_item(npy_bytes(np.zeros((64, 64, 2), np.uint8))), "bad_array", "C in"),
    "npy-scalar": Refused(lambda: array_item(npy_bytes(np.array(7, np.uint8))), "bad_array", "shape ()"),
    "npy-pickled-objects": Refused(
        lambda: array_item(npy_bytes(np.array([{"a": 1}], dtype=object), allow_pickle=True)), "bad_array", "object"
    ),
    "npy-header-declares-7-gigabytes": Refused(
        lambda: array_item(npy_header_only((40000, 60000, 3), b"\0" * 64)), "too_many_pixels", "40000"
    ),
    "npy-header-longer-than-its-data": Refused(
        lambda: array_item(npy_header_only((64, 64, 3), b"\0" * 10)), "bad_array", "declares"
    ),
    "npz-archive-as-array": Refused(
        lambda: array_item(_npz(np.zeros((64, 64, 3), np.uint8))), "bad_array", "not a plain .npy"
    ),
    "unknown-reward-name": Refused(
        lambda: image_item(bus_bytes(), rewards=["matching", "no-such-reward"]), "unknown_reward", "no-such-reward"
    ),
    "unknown-profile": Refused(lambda: image_item(bus_bytes(), profile="lenient"), "unknown_profile", "lenient"),
}


def _npz(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, image=array)
    return buffer.getvalue()


@dataclass(frozen=True)
class Twin:
    """An odd but valid item, and a plain item that must score exactly like it."""

    item: Callable[[], dict[str, Any]]
    twin: Callable[[], dict[str, Any]]


def _gif_first_frame_png() -> bytes:
    frame = Image.open(io.BytesIO(animated_gif(Image.fromarray(bus_pixels()))))  # frame 0, as PIL opens it
    return encode(frame.convert("RGB"), "PNG")


def _cmyk_jpeg() -> bytes:
    return encode(Image.fromarray(bus_pixels()).convert("CMYK"), "JPEG", quality=95)


def _png16(array: np.ndarray) -> bytes:
    """uint8 pixels x 257 -> 16-bit PNG (RGB or gray) written by OpenCV, whose high bytes are the input again."""
    wide = array.astype(np.uint16) * 257
    ok, data = cv2.imencode(".png", wide[:, :, ::-1] if wide.ndim == 3 else wide)
    assert ok
    return data.tobytes()


def _gray() -> np.ndarray:
    return np.asarray(Image.fromarray(bus_pixels()).convert("L"))


SCORED: dict[str, Twin] = {
    # Decision: an animated GIF is scored on its first frame (service/images.py), never on a later one.
    "animated-gif-scores-its-first-frame": Twin(
        lambda: image_item(animated_gif(Image.fromarray(bus_pixels()))), lambda: image_item(_gif_first_frame_png())
    ),
    "cmyk-jpeg": Twin(
        lambda: image_item(_cmyk_jpeg()),
        lambda: image_item(encode(Image.open(io.BytesIO(_cmyk_jpeg())).convert("RGB"), "PNG")),
    ),
    "16-bit-rgb-png": Twin(lambda: image_item(_png16(bus_pixels())), lambda: image_item(bus_bytes())),
    "16-bit-grayscale-png": Twin(
        lambda: image_item(_png16(_gray())), lambda: image_item(encode(Image.fromarray(_gray()), "PNG"))
    ),
    "control-characters-in-prompt": Twin(
        lambda: image_item(bus_bytes(), "four\x00 people\x1b[31m and\u202e a\u200b bus\r\n\x7f"),
        lambda: image_item(bus_bytes()),
    ),
    "emoji-in-prompt": Twin(
        lambda: image_item(bus_bytes(), "four 👨\u200d👩\u200d👧 people and a 🚌 bus 🏳️\u200d🌈"),
        lambda: image_item(bus_bytes()),
    ),
    "npy-big-endian-uint16": Twin(
        lambda: array_item(npy_bytes((bus_pixels().astype(np.uint16) * 257).astype(">u2"))),
        lambda: image_item(bus_bytes()),
    ),
    "npy-fortran-order": Twin(
        lambda: array_item(npy_bytes(np.asfortranarray(bus_pixels()))), lambda: image_item(bus_bytes())
    ),
}


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


@dataclass(frozen=True)
class WholeRequest:
    """A body refused as a whole with a 4xx; `message` is a fragment of the answer that says what is wrong."""

    body: Callable[[str], str]  # base64 of a good image -> raw JSON text
    message: str


def _with(image: str, prompt: str = json.dumps(BUS_PROMPT), extra: str = "") -> str:
    return f'{{"items": [{{"image": "{image}", "prompt": {prompt}{extra}}}]}}'


REFUSED: dict[str, WholeRequest] = {
    "10000-character-prompt": WholeRequest(lambda image: _with(image, json.dumps("a bus " * 1667)), "2000 characters"),
    "deeply-nested-json": WholeRequest(
        lambda image: _with(image, extra=f', "metadata": {nested(100_000)}'), "recursion limit"
    ),
    "lone-surrogate-in-prompt": WholeRequest(lambda image: _with(image, '"a \\ud800 bus"'), "Invalid JSON"),
    "negative-weight": WholeRequest(
        lambda image: _with(image, extra=', "rewards": {"matching": -1}'), "greater than or equal to 0"
    ),
    "weight-1e308": WholeRequest(
        lambda image: _with(image, extra=', "rewards": {"matching": 1e308}'), "less than or equal to 1000000"
    ),
    "weight-overflowing-to-inf": WholeRequest(
        lambda image: _with(image, extra=', "rewards": {"matching": 1e999}'), "finite number"
    ),
    "weight-nan": WholeRequest(lambda image: _with(image, extra=', "rewards": {"matching": NaN}'), "finite number"),
    "weight-infinity": WholeRequest(
        lambda image: _with(image, extra=', "rewards": {"matching": Infinity}'), "finite number"
    ),
    "all-weights-zero": WholeRequest(
        lambda image: _with(image, extra=', "rewards": {"matching": 0}'), "at least one reward weight"
    ),
    "weights-as-a-string": WholeRequest(lambda image: _with(image, extra=', "rewards": "matching"'), "valid array"),
}


# ---------------------------------------------------------------------------------------------------------------
# Through a real server.


@pytest.fixture(scope="module")
def server(token_server: str) -> str:
    return token_server


@pytest.fixture(scope="module")
def processes(server) -> set[int]:
    return {p.pid for p in server_tree(server)}


@pytest.fixture(scope="module")
def http(server, processes):
    with httpx.Client(base_url=server, headers=AUTH, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def good() -> list[dict[str, Any]]:
    from conftest import ultralytics_asset

    zidane = ultralytics_asset("zidane.jpg").read_bytes()
    return [image_item(bus_bytes()), image_item(zidane, "two people and a tie")]


@pytest.fixture(scope="module")
def clean(http, good) -> list[dict[str, Any]]:
    response = http.post("/score", json={"items": good})
    assert response.status_code == 200
    results = response.json()
    assert all(result["error"] is None and result["rewards"]["matching"] > 0 for result in results)
    return results


def close(a: Any, b: Any) -> bool:
    """Equal JSON values, floats within 1e-6: the same model on the same pixels, in batches of other sizes."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[key], b[key]) for key in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(close, a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, abs=1e-6)
    return a == b


def assert_scored_like(result: dict[str, Any], expected: dict[str, Any]) -> None:
    assert result["error"] is None and result["error_code"] is None
    assert close(result["rewards"], expected["rewards"]), (result["rewards"], expected["rewards"])
    assert close(result["details"]["matching"]["objects"], expected["details"]["matching"]["objects"])


@pytest.mark.slow
@pytest.mark.parametrize("case", PER_ITEM.values(), ids=PER_ITEM.keys())
def test_a_hostile_item_fails_alone_and_the_rest_of_its_batch_is_scored(http, good, clean, case):
    response = http.post("/score", json={"items": [good[0], case.item(), good[1]]})
    assert response.status_code == 200, response.text[:500]
    first, failed, last = response.json()
    assert failed["error_code"] == case.code, failed["error"]
    assert case.message in failed["error"]
    assert failed["rewards"] == {"matching": None} and failed["total"] is None  # never a stand-in 0
    assert_scored_like(first, clean[0])
    assert_scored_like(last, clean[1])


@pytest.mark.slow
@pytest.mark.parametrize("case", SCORED.values(), ids=SCORED.keys())
def test_an_odd_but_valid_item_scores_like_its_plain_twin(http, good, clean, case):
    response = http.post("/score", json={"items": [good[0], case.item(), case.twin(), good[1]]})
    assert response.status_code == 200, response.text[:500]
    first, odd, twin, last = response.json()
    assert isinstance(odd["rewards"]["matching"], float) and odd["rewards"]["matching"] > 0
    assert_scored_like(odd, twin)
    assert_scored_like(first, clean[0])
    assert_scored_like(last, clean[1])


@pytest.mark.slow
@pytest.mark.parametrize("case", REFUSED.values(), ids=REFUSED.keys())
def test_a_malformed_request_is_refused_whole_with_a_4xx_that_says_why(http, good, case):
    body = case.body(good[0]["image"])
    response = http.post("/score", content=body.encode(), headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500, response.text[:500]
    assert case.message in response.text


@pytest.mark.slow
def test_nan_and_inf_in_layout_boxes_fail_that_match_item_alone(http, good):
    """The one float array a request carries: /match layout targets [x0, y0, x1, y1]."""
    layout = [{"class": "bus", "box": [float("nan"), 0, float("inf"), 100]}]
    plain = [{**item, "variant": "seed"} for item in good]
    hostile = {**good[0], "variant": "layout", "metadata": {"layout": layout}}
    clean = http.post("/match", json={"items": plain}).json()
    # NaN and Infinity are not JSON: sent as Python's json writes them, which BentoML's parser accepts.
    body = json.dumps({"items": [plain[0], hostile, plain[1]]})
    first, failed, last = http.post("/match", content=body, headers={"content-type": "application/json"}).json()
    assert failed["score"] is None and failed["error_code"] == "bad_metadata" and "finite" in failed["error"]
    assert [first["score"], last["score"]] == pytest.approx([result["score"] for result in clean], abs=1e-6)


@pytest.mark.slow
def test_the_same_worker_still_serves_after_the_catalogue(http, server, processes, good, clean):
    assert {p.pid for p in server_tree(server)} == processes  # no worker died and was replaced
    response = http.post("/score", json={"items": good})
    assert response.status_code == 200
    for result, expected in zip(response.json(), clean, strict=True):
        assert_scored_like(result, expected)


# ---------------------------------------------------------------------------------------------------------------
# Unit level: the decoder's decisions and the engine's weights.


def test_an_animated_gif_decodes_to_its_first_frame_not_a_later_one():
    first = Image.fromarray(bus_pixels())
    data = animated_gif(first)
    decoded = np.asarray(decode_bytes(data))
    opened = Image.open(io.BytesIO(data))
    assert np.array_equal(decoded, np.asarray(opened.convert("RGB")))
    opened.seek(1)
    assert not np.array_equal(decoded, np.asarray(opened.convert("RGB")))


@pytest.mark.parametrize(
    "size, decodes",
    [((416, 416), True), ((2000, 100), True), ((100, 2000), True), ((2001, 100), False), ((100, 2001), False)],
    ids=["square", "20-to-1-wide", "20-to-1-tall", "past-20-to-1-wide", "past-20-to-1-tall"],
)
def test_images_thinner_than_20_to_1_are_refused_as_too_small(size, decodes):
    data = encode(Image.new("RGB", size), "PNG")
    if decodes:
        assert decode_bytes(data).size == size
    else:
        with pytest.raises(ImageError, match="aspect ratio") as error:
            decode_bytes(data)
        assert error.value.code == "too_small"


def test_a_npy_header_is_checked_before_its_array_is_allocated():
    # 6000 x 6000 x 3 is within the pixel limit: 108 MB that np.load would allocate before finding 10 bytes.
    data = npy_header_only((6000, 6000, 3), b"\0" * 10)
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match="declares") as error:
            decode_npy(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert error.value.code == "bad_array"
    assert peak < 1 << 20


def test_uint16_arrays_decode_alike_in_either_byte_order():
    pixels = np.random.default_rng(0).integers(0, 65536, (32, 48, 3)).astype(np.uint16)
    native = np.asarray(decode_array(pixels))
    assert np.array_equal(np.asarray(decode_array(pixels.astype(">u2"))), native)
    assert np.array_equal(np.asarray(decode_npy(npy_bytes(pixels.astype(">u2")))), native)
    assert np.array_equal(native, (pixels >> 8).astype(np.uint8))


def test_a_float_array_is_refused_with_how_to_convert_it():
    with pytest.raises(ImageError, match=r"\(x \* 255\)\.round\(\)\.astype\(np\.uint8\)"):
        decode_array(np.full((32, 32, 3), 0.5, np.float32))


def test_request_weights_share_one_loaded_scorer_and_only_scale_the_total():
    """Weights come from requests: a Scorer cached per weight value would grow with every value a client sends."""
    engine = RewardEngine(ServiceSettings(golden_check=False))
    image = b64(bus_bytes())
    totals = {}
    for weight in (1.0, 0.5, 2.0, 1e6, 0.123456789):
        (result,) = engine.score([ScoreItem(image=image, prompt=BUS_PROMPT, rewards={"matching": weight})])
        assert result.total == pytest.approx(weight * result.rewards["matching"], rel=1e-12)
        totals[weight] = result.rewards["matching"]
    assert len(set(totals.values())) == 1  # the reward itself does not depend on the weight
    assert len(engine._scorers) == 1
    assert engine.scorer({"matching": 3.0}, "train").rewards is engine.scorer({"matching": 1.0}, "train").rewards


@pytest.mark.parametrize(
    "rewards, message",
    [
        ({"matching": -0.5}, "greater than or equal to 0"),
        ({"matching": 1e308}, "less than or equal to 1000000"),
        ({"matching": float("nan")}, "finite number"),
        ({"matching": float("inf")}, "finite number"),
        ({"matching": 0.0}, "at least one reward weight must be > 0"),
    ],
    ids=["negative", "1e308", "nan", "inf", "all-zero"],
)
def test_absurd_weights_are_schema_errors_that_name_the_reward(rewards, message):
    with pytest.raises(ValueError, match=message):
        ScoreItem(image="eA==", prompt="a bus", rewards=rewards)


def test_the_catalogue_files_are_what_they_claim(tmp_path: Path):
    """Guards the builders themselves: a 'bomb' that is small on the wire, a sliver that really is 8 px, a GIF that
    really animates, a CMYK JPEG that really is CMYK and 16-bit PNGs that really are 16-bit."""
    bomb = base64.b64decode(PER_ITEM["decompression-bomb-png"].item()["image"])
    assert len(bomb) < 100_000 and struct.unpack(">II", bomb[16:24]) == (20000, 20000)  # PNG IHDR width, height
    assert Image.open(io.BytesIO(animated_gif(Image.fromarray(bus_pixels())))).n_frames == 2
    assert Image.open(io.BytesIO(_cmyk_jpeg())).mode == "CMYK"
    path = tmp_path / "gray16.png"
    path.write_bytes(_png16(_gray()))
    assert Image.open(path).mode == "I;16"
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    rgb16 = cv2.imdecode(np.frombuffer(_png16(bus_pixels()), np.uint8), cv2.IMREAD_UNCHANGED)
    assert rgb16.dtype == np.uint16 and rgb16.shape[2] == 3
