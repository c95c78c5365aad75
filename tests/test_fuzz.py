"""Fuzzing: schemathesis against a real server's OpenAPI schema, hypothesis on the image decoder and the prompt
parser. Whatever arrives, the service answers below 500 (or 503 when shedding) and the parsers fail only with
their own documented errors. benchmarks/fuzz.py runs the same drivers for far more cases."""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import numpy as np
import psutil
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from rewardscope.models.images import (
    DEFAULT_LIMITS,
    ImageError,
    ImageLimits,
    decode_array,
    decode_base64,
    decode_bytes,
    decode_npy,
)
from rewardscope.models.prompt import (
    COCO_CLASSES,
    COLORS,
    MAX_COUNT,
    MAX_METADATA_ENTRIES,
    MAX_PROMPT_CHARS,
    RELATIONS,
    ParsedPrompt,
    from_geneval_metadata,
    parse_prompt,
    to_geneval_metadata,
)
from rewardscope.models.registry import matching_variants
from serving import TOKEN, server_tree

# Damaged TIFF/EXIF data makes PIL warn before it raises or skips the tag: expected here, not news.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")

AUTH = {"Authorization": f"Bearer {TOKEN}"}
API_CASES = 400
# benchmarks/fuzz.py raises the example count and seeds the run itself (pytest --hypothesis-seed); unset, every
# property runs a fixed, derandomised sequence.
LONG_RUN_EXAMPLES = os.environ.get("REWARDSCOPE_FUZZ_EXAMPLES")
# Every code service/images.py raises; a new one must be added here on purpose.
IMAGE_ERROR_CODES = frozenset(
    ("too_many_bytes", "empty", "too_many_pixels", "unsupported_format", "decode_failed", "too_small", "bad_array")
)
BASE64_ERROR_CODES = frozenset(("too_many_bytes", "bad_base64"))
# A generous per-example bound: a decoder or parser that takes this long on a tiny input hangs, it is not slow.
HANG_GUARD = timedelta(seconds=20)
UNIT_SETTINGS = settings(
    max_examples=int(LONG_RUN_EXAMPLES or 150),
    derandomize=LONG_RUN_EXAMPLES is None,
    database=None,
    deadline=HANG_GUARD,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---------------------------------------------------------------------------------------------------------
# Real images: the seeds for mutation and the payloads that carry fuzzed requests onto the scoring path.


def ultralytics_photo(name: str) -> Image.Image:
    import ultralytics

    return Image.open(Path(ultralytics.__file__).parent / "assets" / name).convert("RGB")


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@functools.cache
def seed_files() -> tuple[bytes, ...]:
    """Small real photos in every allowed format and the odd modes the decoder converts (alpha, 16-bit, CMYK,
    palette, EXIF-rotated, animated and multi-page): valid files whose mutations reach deep into each decoder."""
    photo = ultralytics_photo("bus.jpg").resize((48, 64))
    frames = [photo.rotate(angle) for angle in (90, 180)]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    return (
        encode(photo, "GIF", save_all=True, append_images=frames, duration=40, loop=0),
        encode(photo, "PNG", save_all=True, append_images=frames),
        encode(photo, "WEBP", save_all=True, append_images=frames),
        encode(photo, "TIFF", save_all=True, append_images=frames),
        encode(photo, "JPEG", quality=90),
        encode(photo, "JPEG", quality=90, progressive=True),
        encode(photo, "JPEG", exif=exif.tobytes()),
        encode(photo.convert("CMYK"), "JPEG"),
        encode(photo, "PNG"),
        encode(photo.convert("RGBA"), "PNG"),
        encode(photo.convert("P"), "PNG"),
        encode(photo.convert("L").convert("I;16"), "PNG"),
        encode(photo, "WEBP"),
        encode(photo, "GIF"),
        encode(photo, "BMP"),
        encode(photo, "TIFF"),
        encode(photo, "TIFF", compression="tiff_lzw"),
    )


@functools.cache
def real_payloads() -> tuple[dict[str, str], ...]:
    """Image sources a request can carry: a JPEG and a PNG photo (field `image`), and a .npy array (`array`)."""
    bus = ultralytics_photo("bus.jpg").resize((240, 320))
    zidane = ultralytics_photo("zidane.jpg").resize((320, 180))
    return (
        {"image": base64.b64encode(encode(bus, "JPEG", quality=90)).decode()},
        {"image": base64.b64encode(encode(zidane, "PNG")).decode()},
        {"array": base64.b64encode(npy_bytes(np.asarray(bus.resize((120, 160))))).decode()},
    )


@functools.cache
def grad_payloads() -> tuple[dict[str, str], ...]:
    """/grad takes float images [3, H, W] in [0, 1] as .npy (field `array`)."""
    bus = np.asarray(ultralytics_photo("bus.jpg").resize((48, 64)), dtype=np.float32) / 255
    return ({"array": base64.b64encode(npy_bytes(bus.transpose(2, 0, 1).astype(np.float16))).decode()},)


REAL_PROMPTS = ("four people and a bus", "two people", "a tie", "a photo of two clocks", "no dogs")

# ---------------------------------------------------------------------------------------------------------
# API fuzzing (also driven by benchmarks/fuzz.py)


# The routes service/app.py mounts beside BentoML's are missing from its OpenAPI document; described here (as
# app.py parses them) so that they are fuzzed too.
MOUNTED_ROUTES: dict[str, Any] = {
    "openapi": "3.0.2",
    "info": {"title": "rewardscope: mounted Starlette routes", "version": "1"},
    "paths": {
        "/rewards": {"get": {"responses": {"200": {"description": "rewards, models, limits"}}}},
        "/golden": {"get": {"responses": {"200": {"description": "golden check report"}}}},
        "/score/upload": {
            "post": {
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["images", "prompts"],
                                "properties": {
                                    "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                                    "prompts": {"type": "string", "description": "JSON list of strings"},
                                    "rewards": {"type": "string", "description": "JSON list or object"},
                                    "profile": {"type": "string"},
                                },
                            }
                        }
                    },
                },
                "responses": {"200": {"description": "as /score"}},
            }
        },
    },
}


def load_schemas(base_url: str) -> list[schemathesis.BaseSchema]:
    """The service's own OpenAPI document as BentoML serves it (behind the bearer token), and MOUNTED_ROUTES."""
    served = schemathesis.openapi.from_url(f"{base_url}/docs.json", headers=AUTH, timeout=30)
    return [served, schemathesis.openapi.from_dict(MOUNTED_ROUTES)]


def case_strategy(schemas: list[schemathesis.BaseSchema]) -> st.SearchStrategy[schemathesis.Case]:
    """Cases for every operation: schema-valid ones, plus schema-violating ones where an operation takes input."""
    strategies = []
    for schema in schemas:
        for result in schema.get_all_operations():
            operation = result.ok()
            strategies.append(operation.as_strategy(schemathesis.GenerationMode.POSITIVE))
            if list(operation.body) or list(operation.iter_parameters()):
                strategies.append(operation.as_strategy(schemathesis.GenerationMode.NEGATIVE))
    return st.one_of(strategies)


MATCH_VARIANTS = tuple(matching_variants())  # the one list (the registered matching rewards)


# How a generated request's body is used: as generated, with real photos as its image sources, or rebuilt valid.
IMAGE_MODES = st.sampled_from(("as generated", "real images", "valid"))


def with_real_images(
    case: schemathesis.Case, mode: str, draw: Callable[[st.SearchStrategy], Any], budget: int = 3
) -> int:
    """ "real images": the generated image sources become real photos (lists cut to `budget` entries, so a request
    stays cheap); "valid": a valid body built from the generated one, real photos and prompts in its list
    structure. One malformed item fails validation of a whole request, so without the second mode almost nothing
    would reach the models. Returns the number of real images placed."""
    if mode == "as generated" or not isinstance(case.body, dict):
        return 0
    if case.operation.path == "/score/upload":
        return with_real_uploads(case.body, draw, budget, valid=mode == "valid")
    payloads = grad_payloads() if case.operation.path == "/grad" else real_payloads()
    placed = 0

    def source() -> dict[str, str]:
        nonlocal placed
        placed += 1
        return dict(draw(st.sampled_from(payloads)))

    def cut(value: Any, size: int) -> list:
        return value[:size] if isinstance(value, list) and value else [{}]

    if mode == "valid":
        prompts = st.sampled_from(REAL_PROMPTS)
        if "groups" in case.body:
            case.body = {
                "groups": [
                    {"prompt": draw(prompts), "candidates": [source() for _ in cut(group.get("candidates"), budget)]}
                    for group in cut(case.body["groups"], 2)
                    if isinstance(group, dict)
                ]
            }
        else:
            case.body = {
                "items": [
                    {
                        **source(),
                        "prompt": draw(prompts),
                        **({"variant": item["variant"]} if item.get("variant") in MATCH_VARIANTS else {}),
                    }
                    for item in cut(case.body.get("items"), budget)
                    if isinstance(item, dict)
                ]
            }
        return placed

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for child in node:
                visit(child)
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            if key in ("items", "groups", "candidates") and isinstance(value, list):
                del value[budget:]
                for entry in value if key != "groups" else ():
                    if isinstance(entry, dict):
                        entry.pop("image", None)
                        entry.pop("array", None)
                        entry.update(source())
            visit(value)

    visit(case.body)
    return placed


def with_real_uploads(body: dict, draw: Callable[[st.SearchStrategy], Any], budget: int, valid: bool) -> int:
    """The multipart form's file parts become real JPEG/PNG files; valid: prompts a JSON list of the same length."""
    images = body.get("images")
    count = min(len(images), budget) if isinstance(images, list) and images else 1
    files = [base64.b64decode(draw(st.sampled_from(real_payloads()[:2]))["image"]) for _ in range(count)]
    body["images"] = files
    if valid:
        body["prompts"] = json.dumps([draw(st.sampled_from(REAL_PROMPTS)) for _ in files])
        body.pop("rewards", None)
        body.pop("profile", None)
    return count


def scored_anything(payload: Any) -> bool:
    """Whether a response carries a reward a model computed (a number under `total` or `score`)."""
    if isinstance(payload, list):
        return any(scored_anything(child) for child in payload)
    if isinstance(payload, dict):
        computed = any(isinstance(payload.get(key), float | int) for key in ("total", "score"))
        return computed or any(scored_anything(child) for child in payload.values())
    return False


@dataclass
class FuzzTally:
    """What the server answered: a status histogram, the cases that got a 5xx other than 503 (as curl lines),
    transport failures (timeouts, resets: a hang or a crash), and how many requests reached a model."""

    statuses: Counter = field(default_factory=Counter)
    per_operation: Counter = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    transport_errors: list[str] = field(default_factory=list)
    negative_accepted: Counter = field(default_factory=Counter)  # schema-violating bodies answered 2xx, per operation
    submitted: list[str] = field(default_factory=list)  # task ids from /jobs/score/submit, followed up afterwards
    job_statuses: Counter = field(default_factory=Counter)  # "status: N" / "get: N" for those tasks
    real_images_sent: int = 0
    scored: int = 0

    @property
    def cases(self) -> int:
        return sum(self.statuses.values()) + len(self.transport_errors)

    def record(
        self,
        case: schemathesis.Case,
        response: schemathesis.Response | None,
        error: str = "",
        as_generated: bool = True,
    ) -> None:
        self.per_operation[case.operation.label] += 1
        if response is None:
            self.transport_errors.append(f"{error}: {reproduction(case)}")
            return
        self.statuses[response.status_code] += 1
        negative = case.meta is not None and case.meta.generation.mode == schemathesis.GenerationMode.NEGATIVE
        if negative and as_generated and 200 <= response.status_code < 300:
            self.negative_accepted[case.operation.label] += 1
        if response.status_code >= 500 and response.status_code != 503:
            self.server_errors.append(f"{response.status_code} {response.text[:300]!r}: {reproduction(case)}")
        if response.status_code == 200 and any("json" in value for value in response.headers.get("content-type", ())):
            payload = response.json()
            self.scored += scored_anything(payload)
            if case.operation.path == "/jobs/score/submit" and isinstance(payload, dict):
                self.submitted.append(str(payload.get("task_id")))

    def follow_jobs(self, base_url: str, timeout_s: float = 120) -> None:
        """Ask for the status and result of every task the fuzz submitted (each ends success or failure; a failure's
        `get` is a 409 naming the reason, never a 5xx)."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=base_url, headers=AUTH, timeout=60) as client:
            for task_id in self.submitted:
                query = {"task_id": task_id}
                try:
                    status = client.get("/jobs/score/status", params=query)
                    while status.status_code == 200 and status.json().get("status") in ("pending", "in_progress"):
                        if time.monotonic() > deadline:
                            break
                        time.sleep(0.2)
                        status = client.get("/jobs/score/status", params=query)
                    result = client.get("/jobs/score/get", params=query)
                except httpx.HTTPError as exc:
                    self.transport_errors.append(f"{type(exc).__name__}: following task {task_id}")
                    continue
                for response in (status, result):
                    self.job_statuses[f"{response.url.path.rsplit('/', 1)[1]}: {response.status_code}"] += 1
                    if response.status_code >= 500 and response.status_code != 503:
                        self.server_errors.append(f"{response.status_code} {response.text[:300]!r}: GET {response.url}")
        self.submitted.clear()


def reproduction(case: schemathesis.Case, limit: int = 2000) -> str:
    command = case.as_curl_command(headers=AUTH)
    return command if len(command) <= limit else command[:limit] + "..."


def fuzz_api(
    base_url: str, cases: int, seed: int | None = None, tally: FuzzTally | None = None, timeout_s: float = 120
) -> FuzzTally:
    """Send `cases` schemathesis cases (bearer token on each) and tally the answers into `tally` (a new one by
    default). seed=None derandomises: the same cases every run."""
    strategy = case_strategy(load_schemas(base_url))
    tally = FuzzTally() if tally is None else tally
    session = requests.Session()

    @settings(
        max_examples=cases,
        derandomize=seed is None,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def send(data: st.DataObject) -> None:
        case = data.draw(strategy, label="case")
        mode = data.draw(IMAGE_MODES, label="images")
        tally.real_images_sent += with_real_images(case, mode, data.draw)
        try:
            response = case.call(base_url=base_url, session=session, headers=AUTH, timeout=timeout_s)
        except requests.RequestException as exc:
            tally.record(case, None, type(exc).__name__)
            return
        tally.record(case, response, as_generated=mode == "as generated")

    (send if seed is None else hypothesis.seed(seed)(send))()
    session.close()
    tally.follow_jobs(base_url)
    return tally


def still_serving(base_url: str, workers: list[psutil.Process]) -> list[str]:
    """Problems with the server after fuzzing: a dead or replaced process, or a real request that fails."""
    problems = [f"process {p.pid} is gone" for p in workers if not p.is_running()]
    now = {p.pid for p in server_tree(base_url)}
    problems += [f"new process {pid} (a worker restarted)" for pid in now - {p.pid for p in workers}]
    item = {**real_payloads()[0], "prompt": "four people and a bus"}
    response = httpx.post(f"{base_url}/score", json={"items": [item]}, headers=AUTH, timeout=120)
    if response.status_code != 200 or response.json()[0]["rewards"]["matching"] is None:
        problems.append(f"a normal /score request got {response.status_code}: {response.text[:300]}")
    return problems


@pytest.fixture(scope="module")
def server(token_server: str) -> str:
    return token_server


@pytest.mark.slow
def test_schemathesis_cases_never_get_a_server_error_nor_crash_the_server(server):
    workers = server_tree(server)
    tally = fuzz_api(server, API_CASES)
    assert tally.cases >= API_CASES
    assert tally.server_errors == []
    assert tally.transport_errors == []
    assert still_serving(server, workers) == []
    # The fuzz reached the models, not only the validators: some requests came back with computed rewards.
    assert tally.real_images_sent > 0
    assert tally.scored > 0
    # Every submitted task was followed to its answer: a result, or the validation error of its body.
    assert sum(count for key, count in tally.job_statuses.items() if key.startswith("get: ")) > 0
    # Schema-violating bodies are refused as client errors, except by the task submit route, which (BentoML's
    # design) validates when the task runs: its 400 then comes from /jobs/score/get, as followed above.
    assert any(400 <= status < 500 for status in tally.statuses)
    assert set(tally.negative_accepted) <= {"POST /jobs/score/submit"}


# ---------------------------------------------------------------------------------------------------------
# Image decoder


def assert_decoded_or_refused(decode: Callable[[], Image.Image], limits: ImageLimits = DEFAULT_LIMITS) -> None:
    """The decoder's contract: an RGB image within the limits, or ImageError with a known code; nothing else."""
    try:
        image = decode()
    except ImageError as error:
        assert error.code in IMAGE_ERROR_CODES, error.code
        return
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB"
    width, height = image.size
    assert min(width, height) >= limits.min_side
    assert width * height <= limits.max_pixels
    image.tobytes()  # the pixels are really there


@st.composite
def mutated_files(draw: st.DrawFn) -> bytes:
    """A real file with a few bit flips, byte overwrites, truncations, duplicated ranges or splices of another."""
    files = seed_files()
    data = bytearray(draw(st.sampled_from(files)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(("flip", "overwrite", "truncate", "duplicate", "splice")))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            data[at : at + 4] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "truncate":
            del data[at:]
        elif kind == "duplicate":
            data[at:at] = data[at : at + draw(st.integers(1, 256))]
        else:
            other = draw(st.sampled_from(files))
            start = draw(st.integers(0, len(other) - 1))
            data[at:] = other[start:]
    return bytes(data)


@UNIT_SETTINGS
@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes_decode_to_rgb_or_raise_image_error(data):
    assert_decoded_or_refused(lambda: decode_bytes(data))


@UNIT_SETTINGS
@given(data=mutated_files())
def test_mutated_real_files_decode_to_rgb_or_raise_image_error(data):
    assert_decoded_or_refused(lambda: decode_bytes(data))


@UNIT_SETTINGS
@given(data=mutated_files(), max_pixels=st.integers(1, 4000), min_side=st.integers(1, 64))
def test_mutated_files_respect_any_limits(data, max_pixels, min_side):
    limits = ImageLimits(max_pixels=max_pixels, min_side=min_side)
    assert_decoded_or_refused(lambda: decode_bytes(data, limits), limits)


# Half the draws are the dtypes the decoder takes, so the success path is fuzzed too.
ARRAY_DTYPES = st.one_of(
    st.sampled_from(["u1", "<u2"]),
    st.sampled_from([">u2", "i1", "i2", "<i4", "i8", "f2", "f4", ">f8", "c8", "?", "U3", "S2", "M8[s]", "u1,u1,u1"]),
)


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    """Arrays of many dtypes and shapes, mostly image-like (HW, HWC) with some sides under the limits."""
    side = st.one_of(st.integers(8, 40), st.integers(0, 9))
    shape = draw(
        st.one_of(
            st.tuples(side, side, st.sampled_from((1, 3, 3, 4))),
            st.tuples(side, side),
            st.tuples(side, side, st.sampled_from((0, 2, 5))),
            hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=12),
        )
    )
    array = draw(hnp.arrays(np.dtype(draw(ARRAY_DTYPES)), shape))
    return array[::-1] if array.ndim and draw(st.booleans()) else array  # also non-contiguous views


@UNIT_SETTINGS
@given(array=arrays(), max_pixels=st.sampled_from((40_000_000, 600)))
def test_random_arrays_decode_to_rgb_or_raise_image_error(array, max_pixels):
    limits = ImageLimits(max_pixels=max_pixels)
    assert_decoded_or_refused(lambda: decode_array(array, limits), limits)
    assert_decoded_or_refused(lambda: decode_npy(npy_bytes(array), limits), limits)


@UNIT_SETTINGS
@given(array=arrays(), cut=st.integers(0, 200), noise=st.binary(max_size=64))
def test_damaged_npy_files_raise_image_error(array, cut, noise):
    data = npy_bytes(array)
    assert_decoded_or_refused(lambda: decode_npy(data[: max(len(data) - cut, 0)] + noise))


def test_pickled_object_arrays_are_refused_without_unpickling():
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ImageError) as error:
        decode_npy(buffer.getvalue())
    assert error.value.code == "bad_array"


@UNIT_SETTINGS
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode())))
def test_base64_transport_decodes_or_raises_image_error(text):
    try:
        data = decode_base64(text)
    except ImageError as error:
        assert error.code in BASE64_ERROR_CODES
        return
    assert isinstance(data, bytes)


# ---------------------------------------------------------------------------------------------------------
# Prompt parser

# Any code point, control characters, emoji and lone surrogates included (JSON can carry "\ud800").
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=300)
WORDS = st.sampled_from(
    (*COCO_CLASSES, *COLORS, *RELATIONS, "a", "an", "the", "two", "3", "no", "and", "of", "dogs", "people",
     "pair of", "next", "left", ",", ".", "'s", "without", "photo", "sitting", "mice", "🐶", "\x00", "\u200b"),
)  # fmt: skip
# Prompt-like text: vocabulary, numbers, relations and noise glued with odd separators.
PROMPT_LIKE = st.lists(st.one_of(WORDS, WORDS, st.text(max_size=8)), max_size=40).flatmap(
    lambda words: st.sampled_from((" ", "  ", "\t", "\n", ", ", "")).map(lambda sep: sep.join(words))
)
# Grammatical prompts: quantities, colours, classes, relations and negations in sentence order.
NOUN_PHRASE = st.tuples(
    st.sampled_from(("a", "an", "the", "two", "3", "several", "no", "a pair of", "twenty-one", "")),
    st.sampled_from((*COLORS, "", "")),
    st.sampled_from(COCO_CLASSES).flatmap(lambda name: st.sampled_from((name, name + "s"))),
).map(" ".join)
LINKS = st.sampled_from((*RELATIONS, "on top of", "and", "with", "without", ", ", "sits on"))
SENTENCES = st.lists(st.tuples(NOUN_PHRASE, LINKS).map(" ".join), min_size=1, max_size=6).map(
    lambda parts: "a photo of " + " ".join(parts) + " a dog"
)
# Up to 10k characters: a short piece repeated, so long inputs are cheap to generate.
LONG_TEXT = st.tuples(st.one_of(PROMPT_LIKE, ANY_TEXT).filter(bool), st.integers(1, 10_000)).map(
    lambda pair: (pair[0] * (pair[1] // len(pair[0]) + 1))[: pair[1]]
)
PROMPTS = st.one_of(ANY_TEXT, PROMPT_LIKE, SENTENCES, LONG_TEXT)
# Quality tags that name nothing; no prefix of them is a class, a synonym or a number.
FILLERS = (", highly detailed", ". 4k, hdr", ", photorealistic, sharp focus", "; cinematic lighting", ". octane")


def assert_well_formed(parsed: ParsedPrompt, vocabulary: tuple[str, ...] = COCO_CLASSES) -> None:
    for spec in (*parsed.objects, *parsed.exclude):
        assert spec.class_name in vocabulary
        assert type(spec.count) is int and 1 <= spec.count <= MAX_COUNT
        assert spec.color is None or spec.color in COLORS
    for spec in parsed.objects:
        if spec.relation is not None:
            assert spec.relation.relation in RELATIONS
            assert 0 <= spec.relation.target < len(parsed.objects)
    assert all(isinstance(noun, str) and noun for noun in parsed.unknown)


def parsed_fields(parsed: ParsedPrompt) -> tuple:
    return parsed.objects, parsed.exclude, parsed.unknown


@UNIT_SETTINGS
@given(text=PROMPTS)
def test_any_text_parses_to_vocabulary_objects_with_positive_counts(text):
    parsed = parse_prompt(text)
    assert parsed.prompt == text
    assert_well_formed(parsed)
    # The parse always has a GenEval form (its relations are acyclic), and that form reads back, unless it is
    # longer than a request's metadata may be: then the reader refuses it with its own error.
    metadata = to_geneval_metadata(parsed)
    json.dumps(metadata)
    if len(metadata["include"]) + len(metadata.get("exclude", ())) > MAX_METADATA_ENTRIES:
        with pytest.raises(ValueError, match="more than"):
            from_geneval_metadata(metadata)
        return
    back = from_geneval_metadata(metadata)
    key = lambda spec: (spec.class_name, spec.count, spec.color)  # noqa: E731
    assert Counter(map(key, back.objects)) == Counter(map(key, parsed.objects))


@UNIT_SETTINGS
@given(
    vocabulary=st.lists(st.one_of(st.sampled_from(COCO_CLASSES), ANY_TEXT.filter(str.strip)), min_size=1, max_size=8),
    text=PROMPTS,
)
def test_any_vocabulary_yields_only_its_own_classes(vocabulary, text):
    assert_well_formed(parse_prompt(text, vocabulary), tuple(vocabulary))


@UNIT_SETTINGS
@given(text=st.one_of(PROMPT_LIKE, SENTENCES, ANY_TEXT), filler=st.sampled_from(FILLERS))
def test_appending_quality_tags_does_not_change_the_objects(text, filler):
    before, after = parse_prompt(text), parse_prompt(text + filler)
    assert (after.objects, after.exclude) == (before.objects, before.exclude)


@UNIT_SETTINGS
@given(text=st.one_of(PROMPT_LIKE, SENTENCES).filter(str.isascii))
def test_upper_case_parses_the_same(text):
    assert parsed_fields(parse_prompt(text.upper())) == parsed_fields(parse_prompt(text))


@UNIT_SETTINGS
@given(text=st.one_of(PROMPT_LIKE, SENTENCES), spacing=st.sampled_from(("  ", "\t", " \n ", "\u00a0", "\u3000")))
def test_runs_of_whitespace_parse_like_one_space(text, spacing):
    spaced = text.replace(" ", spacing)
    if len(spaced) <= MAX_PROMPT_CHARS:  # beyond it truncation cuts the two at different words
        assert parsed_fields(parse_prompt(spaced)) == parsed_fields(parse_prompt(text))


def plural(name: str) -> str:
    import inflect

    *head, last = name.split()
    return " ".join((*head, inflect.engine().plural_noun(last)))


@pytest.mark.parametrize("class_name", COCO_CLASSES)
def test_two_of_every_class_is_one_object_with_count_two(class_name):
    for text in (f"two {plural(class_name)}", f"a photo of two {plural(class_name)}", f"2 {class_name}"):
        objects = parse_prompt(text).objects
        assert [(spec.class_name, spec.count) for spec in objects] == [(class_name, 2)], text


@UNIT_SETTINGS
@given(class_name=st.sampled_from(COCO_CLASSES), count=st.integers(1, MAX_COUNT), as_words=st.booleans())
def test_any_number_up_to_the_cap_is_the_count(class_name, count, as_words):
    import inflect

    number = inflect.engine().number_to_words(count) if as_words else str(count)
    noun = class_name if count == 1 else plural(class_name)
    objects = parse_prompt(f"a photo of {number} {noun}").objects
    assert [(spec.class_name, spec.count) for spec in objects] == [(class_name, count)]


@UNIT_SETTINGS
@given(class_name=st.sampled_from(COCO_CLASSES), count=st.integers(MAX_COUNT + 1, 10**30))
def test_numbers_beyond_the_cap_are_capped(class_name, count):
    objects = parse_prompt(f"{count} {plural(class_name)}").objects
    assert [(spec.class_name, spec.count) for spec in objects] == [(class_name, MAX_COUNT)]
