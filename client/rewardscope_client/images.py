"""Image inputs -> the service's transport: {"array": base64 .npy} or {"image": base64 file}.
Accepts PIL images, numpy arrays, torch tensors (imported lazily, never at module load), paths and bytes."""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

Encoding = Literal["npy", "png", "jpeg"]
ENCODINGS: tuple[str, ...] = ("npy", "png", "jpeg")
CHANNEL_COUNTS = (1, 3, 4)
# Float pixels must lie in [0, 1]; this slack absorbs decoder overshoot while still catching [-1, 1] or
# [0, 255] inputs, which would otherwise be clipped into plausible-looking but wrong images.
FLOAT_RANGE_SLACK = 0.05
JPEG_QUALITY = 95
# PNG modes the server's decoder reads as they are; anything else is converted to RGB first.
PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"})


def is_torch_tensor(value: Any) -> bool:
    """True for torch tensors, without importing torch."""
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _is_pixels(value: Any) -> bool:
    return isinstance(value, np.ndarray) or is_torch_tensor(value)


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    if values.size and not np.isfinite(values).all():
        raise ValueError("float image holds NaN or infinite values")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if low < -FLOAT_RANGE_SLACK or high > 1.0 + FLOAT_RANGE_SLACK:
        raise ValueError(
            f"float images must hold values in [0, 1]; got [{low:.3g}, {high:.3g}] "
            "(map [-1, 1] outputs with (x + 1) / 2, or pass uint8 for [0, 255])"
        )
    return np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


def _integer_to_uint8(values: np.ndarray) -> np.ndarray:
    if values.dtype == np.uint8:
        return values
    if values.dtype == np.uint16:  # the server reads 16-bit the same way: keep the high byte
        return (values >> 8).astype(np.uint8)
    if values.dtype == np.bool_:
        raise ValueError("boolean arrays are not images; pass uint8 or float in [0, 1]")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise ValueError(f"integer image of dtype {values.dtype} has values outside [0, 255]")
    return values.astype(np.uint8)


def _torch_to_numpy_uint8(tensor: Any) -> np.ndarray:
    """A tensor of any layout -> uint8 numpy array of the same shape, converted on the tensor's device
    (one quarter of the float bytes cross to the host)."""
    import torch  # lazily: torch stays optional

    tensor = tensor.detach()
    if tensor.is_floating_point():
        finite = bool(torch.isfinite(tensor).all()) if tensor.numel() else True
        if not finite:
            raise ValueError("float image holds NaN or infinite values")
        low, high = (float(tensor.min()), float(tensor.max())) if tensor.numel() else (0.0, 1.0)
        if low < -FLOAT_RANGE_SLACK or high > 1.0 + FLOAT_RANGE_SLACK:
            raise ValueError(
                f"float images must hold values in [0, 1]; got [{low:.3g}, {high:.3g}] "
                "(map [-1, 1] outputs with (x + 1) / 2, or pass uint8 for [0, 255])"
            )
        tensor = (tensor.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
        return tensor.cpu().numpy()
    # Copy: .numpy() of a CPU tensor shares memory the caller may overwrite while a request is in flight.
    return _integer_to_uint8(np.array(tensor.cpu().numpy(), copy=True))


def to_uint8(pixels: Any, copy: bool = False) -> np.ndarray:
    """An array or tensor of any dtype -> uint8 numpy array of the same shape.
    float: values in [0, 1] scaled by 255 and rounded; uint16: high byte; other integers: must be in [0, 255]."""
    if is_torch_tensor(pixels):
        return _torch_to_numpy_uint8(pixels)
    values = np.asarray(pixels)
    if np.issubdtype(values.dtype, np.floating):
        return _float_to_uint8(values)
    converted = _integer_to_uint8(values)
    return converted.copy() if copy and converted is values else converted


def _channels_last(array: np.ndarray) -> np.ndarray:
    """One image: [H, W], [H, W, C] or [C, H, W] (C in 1, 3, 4) -> contiguous [H, W] or [H, W, C].
    Channels-last wins when the last axis has 1, 3 or 4 entries; otherwise a first axis of 1, 3 or 4 is C."""
    if array.ndim == 3:
        if array.shape[-1] not in CHANNEL_COUNTS and array.shape[0] in CHANNEL_COUNTS:
            array = array.transpose(1, 2, 0)
        if array.shape[-1] not in CHANNEL_COUNTS:
            raise ValueError(f"image of shape {tuple(array.shape)} is not [H, W, C] or [C, H, W] with C in 1, 3, 4")
        if array.shape[-1] == 1:
            array = array[:, :, 0]
    elif array.ndim != 2:
        raise ValueError(f"one image must be [H, W], [H, W, C] or [C, H, W]; got shape {tuple(array.shape)}")
    return np.ascontiguousarray(array)


def _batch_channels_last(batch: np.ndarray) -> list[np.ndarray]:
    """[B, H, W, C] or [B, C, H, W] -> B arrays [H, W, C] (or [H, W] for one channel)."""
    if batch.shape[-1] not in CHANNEL_COUNTS and batch.shape[1] in CHANNEL_COUNTS:
        batch = batch.transpose(0, 2, 3, 1)
    return [_channels_last(image) for image in batch]


@dataclass(frozen=True)
class InvalidImage:
    """An image that is not sent: it failed a local check (NaN or infinite pixels, e.g. an fp16 VAE overflow).
    Its item fails alone with `code`; the rest of its batch is scored."""

    reason: str
    code: str = "invalid_pixels"


def _non_finite_images(pixels: Any) -> list[bool]:
    """Per image of a float batch [B, ...]: True where it holds a NaN or infinite value (integers: none)."""
    if is_torch_tensor(pixels):
        import torch  # lazily: torch stays optional

        if not pixels.is_floating_point() or pixels.numel() == 0:
            return [False] * int(pixels.shape[0])
        return (~torch.isfinite(pixels.detach()).flatten(1).all(1)).tolist()
    values = np.asarray(pixels)
    if not np.issubdtype(values.dtype, np.floating) or values.size == 0:
        return [False] * values.shape[0]
    return (~np.isfinite(values.reshape(values.shape[0], -1)).all(1)).tolist()


def _split_batch(pixels: Any, copy: bool) -> list[Any]:
    """A batched array/tensor -> its images; an image with NaN or infinite pixels becomes an InvalidImage (zeros
    stand in for it while the batch converts), so it fails alone instead of failing the batch."""
    bad = _non_finite_images(pixels)
    if any(bad):
        pixels = pixels.clone() if is_torch_tensor(pixels) else np.array(pixels, copy=True)
        for index, is_bad in enumerate(bad):
            if is_bad:
                pixels[index] = 0
    entries: list[Any] = _batch_channels_last(to_uint8(pixels, copy=copy))
    reason = "float image holds NaN or infinite values (not sent)"
    return [InvalidImage(reason) if is_bad else entry for entry, is_bad in zip(entries, bad, strict=True)]


def split_images(images: Any, copy: bool = False) -> list[Any]:
    """A batch of images -> one entry per image, pixels as uint8 numpy [H, W(, C)].

    images: a sequence whose entries are PIL images, arrays/tensors ([H, W], [H, W, C], [C, H, W], or batched
    [B, H, W, C] / [B, C, H, W], which expand to B images), file paths or encoded bytes; or one batched
    array/tensor [B, ...]. PIL images, paths and bytes pass through unchanged. copy=True detaches the result
    from caller-owned numpy memory (for work that outlives the call).
    """
    if _is_pixels(images):
        if len(images.shape) != 4:
            raise ValueError(
                f"a single array or tensor must be a batch [B, H, W, C] or [B, C, H, W]; got shape "
                f"{tuple(images.shape)} (wrap one image in a list)"
            )
        return _split_batch(images, copy)
    if isinstance(images, (str, bytes, os.PathLike, Image.Image)):
        raise TypeError("images must be a sequence (list or tuple) of images, or a batched array/tensor")
    entries: list[Any] = []
    for image in images:
        if _is_pixels(image) and len(image.shape) == 4:
            entries.extend(_split_batch(image, copy))
        elif _is_pixels(image):
            if any(_non_finite_images(image[None])):
                entries.append(InvalidImage("float image holds NaN or infinite values (not sent)"))
            else:
                entries.append(_channels_last(to_uint8(image, copy=copy)))
        elif isinstance(image, (Image.Image, str, bytes, bytearray, memoryview, os.PathLike)):
            entries.append(image)
        else:
            raise TypeError(
                f"unsupported image type {type(image).__name__}: use a PIL image, numpy array, torch tensor, "
                "file path or encoded bytes"
            )
    return entries


def _as_file_image(image: Image.Image, image_format: str) -> Image.Image:
    """A PIL image the format can store; alpha is composited on white, as the server's decoder does."""
    keeps = ("RGB", "L") if image_format == "JPEG" else PNG_MODES
    if image.mode in keeps:
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def encode_file(image: Image.Image, image_format: Literal["PNG", "JPEG"]) -> bytes:
    buffer = io.BytesIO()
    image = _as_file_image(image, image_format)
    if image_format == "JPEG":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        # Level 1: most of the size win at a fraction of the default level's time.
        image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    """A uint8 [H, W(, C)] array -> .npy file bytes (plain dtype: the server loads with allow_pickle=False)."""
    if array.dtype != np.uint8:
        raise ValueError(f"npy transport carries uint8 arrays; got {array.dtype}")
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encode_image(image: Any, encoding: Encoding = "npy") -> dict[str, str]:
    """One image -> {"array": base64 .npy} or {"image": base64 file}, the service's ImageInput.

    encoding applies to pixel arrays and tensors: "npy" (lossless, no compression cost), "png" or "jpeg".
    PIL images travel as PNG (JPEG when encoding="jpeg"), so the server's decoder handles their mode and
    alpha. Paths and bytes travel as the file they are, unchanged.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}; got {encoding!r}")
    if isinstance(image, InvalidImage):  # /score and /match answer it per item; here there is no item to fail
        raise ValueError(image.reason)
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as handle:
            return {"image": _b64(handle.read())}
    if isinstance(image, (bytes, bytearray, memoryview)):
        return {"image": _b64(bytes(image))}
    if isinstance(image, Image.Image):
        return {"image": _b64(encode_file(image, "JPEG" if encoding == "jpeg" else "PNG"))}
    if _is_pixels(image):
        pixels = _channels_last(to_uint8(image))
        if encoding == "npy":
            return {"array": _b64(encode_npy(pixels))}
        return {"image": _b64(encode_file(Image.fromarray(pixels), "JPEG" if encoding == "jpeg" else "PNG"))}
    raise TypeError(f"unsupported image type {type(image).__name__}")


def encode_images(images: Any, encoding: Encoding = "npy") -> list[dict[str, str]]:
    """A batch of images (see split_images) -> one ImageInput dict per image, in order."""
    return [encode_image(image, encoding) for image in split_images(images)]
