"""The one image decoder: bytes, paths, PIL images and uint8 arrays -> RGB PIL image.
Enforces size, pixel and format limits before pixels are decoded, applies EXIF orientation.
Animated or multi-page files (GIF, APNG, WebP, TIFF) are scored on their first frame, the one every viewer shows
first and the one PIL opens: later frames are never decoded, so a long animation costs no more than a still."""

from __future__ import annotations

import base64
import binascii
import io
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
# File suffixes the folder tools (folder scoring, DPO export) take for images.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageError(ValueError):
    """A per-item image problem. `code` is stable and machine-readable; the message is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 32 * 1024 * 1024
    # 20000 x 20000 is 400 MP: far beyond any generator's output, and a decompression-bomb shape.
    max_pixels: int = 40_000_000
    min_side: int = 8
    # Beyond 20:1 a detector's square letterbox (416 px) leaves the short side under 21 px: a sliver no reward
    # model can read, whose score would be an artefact (often 0), not a measurement.
    max_aspect_ratio: float = 20.0
    formats: tuple[str, ...] = ALLOWED_FORMATS


DEFAULT_LIMITS = ImageLimits()


def _check_shape(width: int, height: int, limits: ImageLimits) -> None:
    if width * height > limits.max_pixels:
        raise ImageError(
            "too_many_pixels",
            f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}",
        )
    if min(width, height) < limits.min_side:
        raise ImageError("too_small", f"image is {width}x{height}; each side must be >= {limits.min_side} px")
    if max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise ImageError(
            "too_small",
            f"image is {width}x{height}; its short side is too small for its long side "
            f"(aspect ratio at most {limits.max_aspect_ratio:g}:1)",
        )


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation. Only rotated images are transposed: exif_transpose copies every image it is
    given, even one already upright, and this runs on every image the Scorer sees (PIL inputs included)."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) in (0, 1):
        return image
    return ImageOps.exif_transpose(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Alpha is composited on white; 16-bit and float are rescaled, not clipped."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        if image.mode.startswith("I;16"):
            low, high = 0.0, 65535.0
        scaled = np.zeros_like(values) if high <= low else (values - low) / (high - low) * 255.0
        return Image.fromarray(np.clip(scaled + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _pil_open():
    """PIL's own Image.open. Importing ultralytics replaces it with a wrapper that, on an unidentified file,
    tries to install and register a HEIF plugin: a wider decoder surface and a network attempt we refuse."""
    opener = Image.open
    if getattr(opener, "__module__", "") == "ultralytics.utils.patches":
        opener = sys.modules["ultralytics.utils.patches"]._image_open
    return opener


def decode_bytes(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Encoded image bytes -> RGB PIL image, checking byte size, format and pixel count before decoding."""
    if len(data) > limits.max_bytes:
        raise ImageError("too_many_bytes", f"image is {len(data)} bytes; the limit is {limits.max_bytes}")
    if not data:
        raise ImageError("empty", "image data is empty")
    try:
        # formats= stops PIL from trying every plugin it has (some parse untrusted data poorly).
        image = _pil_open()(io.BytesIO(data), formats=list(limits.formats))
    except Image.DecompressionBombError as exc:
        raise ImageError("too_many_pixels", f"image exceeds the pixel limit of {limits.max_pixels}: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError(
            "unsupported_format", f"not a readable image in an allowed format ({', '.join(limits.formats)})"
        ) from None
    except Exception as exc:  # truncated headers and the like
        raise ImageError("decode_failed", f"cannot read image header: {exc}") from None
    _check_shape(*image.size, limits)
    try:
        image.load()
        image = _upright(image)
    except Exception as exc:
        raise ImageError("decode_failed", f"cannot decode image ({image.format}): {exc}") from None
    return _to_rgb(image)


def decode_array(array: np.ndarray, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """uint8 (or uint16) array, HW or HWC with 1, 3 or 4 channels -> RGB PIL image."""
    if not isinstance(array, np.ndarray):
        raise ImageError("bad_array", f"expected a numpy array, got {type(array).__name__}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageError("bad_array", f"array shape {array.shape} is not HW or HWC with C in (1, 3, 4)")
    _check_shape(array.shape[1], array.shape[0], limits)
    _check_dtype(array.dtype)
    if array.dtype.itemsize == 2:  # either byte order: astype gives native uint16
        array = (array.astype(np.uint16) >> 8).astype(np.uint8)
    return _to_rgb(Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)))


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.kind == "u" and dtype.itemsize in (1, 2) and dtype.fields is None:
        return
    hint = "; scale floats in [0, 1] with (x * 255).round().astype(np.uint8)" if dtype.kind == "f" else ""
    raise ImageError("bad_array", f"array dtype {dtype} is not uint8 (or uint16){hint}")


def load_image(source: Any, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decode one image given as a PIL image, a numpy array, encoded bytes or a local file path."""
    if isinstance(source, Image.Image):
        _check_shape(*source.size, limits)
        return _to_rgb(_upright(source))
    if isinstance(source, np.ndarray):
        return decode_array(source, limits)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_bytes(bytes(source), limits)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageError("not_found", f"no image file at {str(path)!r}")
        if path.stat().st_size > limits.max_bytes:
            raise ImageError(
                "too_many_bytes",
                f"{path.name} is {path.stat().st_size} bytes; the limit is {limits.max_bytes}",
            )
        return decode_bytes(path.read_bytes(), limits)
    raise ImageError("bad_type", f"cannot read an image from a {type(source).__name__}")


# numpy parses a .npy header with ast.literal_eval, and CPython 3.11's AST constructor is not safe to run from
# several threads at once: decode threads then failed good arrays at random with "SystemError: AST constructor
# recursion depth mismatch" (python/cpython#106905). Headers are a few hundred bytes: parsing them one at a time
# costs nothing.
_NPY_HEADER_LOCK = threading.Lock()


def _npy_header(stream: io.BytesIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy file at the start of `stream`; versions 1.0 and 2.0 only."""
    version = np.lib.format.read_magic(stream)
    if version not in ((1, 0), (2, 0)):  # 3.0 exists only for structured dtypes with non-latin-1 field names
        raise ValueError(f"format version {version} is not supported")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    with _NPY_HEADER_LOCK:
        return read_header(stream)


def read_npy(data: bytes, limits: ImageLimits, check: Callable[[tuple[int, ...], np.dtype], None]) -> np.ndarray:
    """A .npy file's bytes -> an array viewing `data`. The header's dtype and shape are checked (by `check`, which
    raises ImageError) before anything is allocated: a few bytes may declare a 100 GB array. Object arrays are
    refused: no unpickling. `data` must hold exactly what the header declares."""
    if len(data) > limits.max_bytes:
        raise ImageError("too_many_bytes", f"array is {len(data)} bytes; the limit is {limits.max_bytes}")
    stream = io.BytesIO(data)
    try:
        shape, fortran_order, dtype = _npy_header(stream)
    except Exception as exc:  # numpy raises ValueError, EOFError, SyntaxError... on malformed headers
        raise ImageError("bad_array", f"not a plain .npy array: {exc}") from None
    if dtype.hasobject:
        raise ImageError("bad_array", "object arrays are refused (loading them would unpickle request data)")
    check(tuple(shape), dtype)
    declared = int(np.prod(shape)) * dtype.itemsize
    offset = stream.tell()
    if len(data) - offset != declared:
        raise ImageError(
            "bad_array",
            f"the header declares {tuple(shape)} {dtype} ({declared} bytes) but {len(data) - offset} bytes follow",
        )
    array = np.frombuffer(data, dtype=dtype, count=declared // dtype.itemsize, offset=offset)
    return array.reshape(shape, order="F" if fortran_order else "C")


def _check_image_header(shape: tuple[int, ...], dtype: np.dtype, limits: ImageLimits) -> None:
    _check_dtype(dtype)
    if len(shape) == 3 and shape[2] == 1:
        shape = shape[:2]
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (3, 4)):
        raise ImageError("bad_array", f"array shape {tuple(shape)} is not HW or HWC with C in (1, 3, 4)")
    _check_shape(shape[1], shape[0], limits)


def decode_npy(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """A .npy file's bytes (uint8/uint16, HW or HWC) -> RGB PIL image; see read_npy for the checks."""
    return decode_array(read_npy(data, limits, lambda shape, dtype: _check_image_header(shape, dtype, limits)), limits)


def decoded_bytes(data: bytes, npy: bool = False) -> int:
    """The bytes `data` will hold once decoded to RGB (width x height x 3), read from its header alone: what the
    service's decoded-pixel budget counts before anything is decoded. 0 for data whose header cannot be read (the
    decoder then refuses it without decoding). npy: `data` is a .npy file."""
    try:
        if npy:
            shape = _npy_header(io.BytesIO(data))[0]
            height, width = (int(shape[0]), int(shape[1])) if len(shape) >= 2 else (0, 0)
        else:
            with _pil_open()(io.BytesIO(data), formats=list(ALLOWED_FORMATS)) as image:
                width, height = image.size
    except Exception:  # unreadable headers of any kind: the decoder reports them per item
        return 0
    return max(0, width) * max(0, height) * 3


def _base64_body(text: str) -> str:
    """The base64 of a payload: data URLs (data:image/png;base64,....) are tolerated."""
    return text.split(",", 1)[1] if text.startswith("data:") and "," in text else text


def decode_base64(text: str, limits: ImageLimits = DEFAULT_LIMITS) -> bytes:
    """Strict base64 -> bytes, refusing input whose decoded size would pass the byte limit."""
    if len(text) * 3 // 4 > limits.max_bytes + 3:
        raise ImageError("too_many_bytes", f"payload decodes to more than {limits.max_bytes} bytes")
    try:
        return base64.b64decode(_base64_body(text), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError("bad_base64", f"image is not valid base64: {exc}") from None


# Headers sit at the start: the first 64 KiB decoded is enough for nearly every file (a JPEG's size follows its
# EXIF and ICC segments), so only that much is decoded unless the header lies further.
HEADER_PREFIX_CHARS = 4 * (64 * 1024 // 3)  # base64 characters of the first 64 KiB (a multiple of 4)


def decoded_bytes_of_base64(text: str, npy: bool = False) -> int:
    """decoded_bytes of a base64 payload, decoding its first 64 KiB (all of it only where the header lies beyond);
    0 when no header can be read."""
    body = _base64_body(text)
    for part in (body[:HEADER_PREFIX_CHARS], body) if len(body) > HEADER_PREFIX_CHARS else (body,):
        try:
            size = decoded_bytes(base64.b64decode(part[: len(part) - len(part) % 4], validate=True), npy=npy)
        except (binascii.Error, ValueError):
            return 0
        if size:
            return size
    return 0
