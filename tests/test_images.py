"""The one image decoder: odd but valid images are converted, hostile or broken ones rejected with a code."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from rewardscope.models.images import ImageError, ImageLimits, decode_array, decode_bytes, load_image


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def exif_rotated_jpeg() -> bytes:
    """A 40x20 image whose EXIF says 'rotate 90': decoded, it must be 20x40."""
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW
    return encode(image, "JPEG", exif=exif.tobytes())


@pytest.mark.parametrize(
    "data, size",
    [
        (encode(Image.new("L", (32, 24), 128)), (32, 24)),
        (encode(Image.new("RGBA", (32, 24), (0, 0, 0, 0))), (32, 24)),
        (encode(Image.new("P", (30, 30))), (30, 30)),
        (encode(Image.new("I;16", (16, 16), 40000)), (16, 16)),
        (encode(Image.new("RGB", (64, 48)), "JPEG"), (64, 48)),
        (encode(Image.new("RGB", (64, 48)), "WEBP"), (64, 48)),
        (encode(Image.new("CMYK", (20, 20)), "JPEG"), (20, 20)),
        (exif_rotated_jpeg(), (20, 40)),
    ],
    ids=["grayscale", "rgba", "palette", "16-bit", "jpeg", "webp", "cmyk", "exif-rotated"],
)
def test_valid_images_decode_to_rgb_of_the_right_size(data, size):
    image = decode_bytes(data)
    assert image.mode == "RGB"
    assert image.size == size


def test_transparent_pixels_become_white_not_black():
    image = decode_bytes(encode(Image.new("RGBA", (10, 10), (0, 0, 0, 0))))
    assert image.getpixel((5, 5)) == (255, 255, 255)


def test_sixteen_bit_values_are_rescaled_not_clipped():
    image = decode_bytes(encode(Image.new("I;16", (16, 16), 32768)))
    assert image.getpixel((0, 0)) == (128, 128, 128)


def huge_png() -> bytes:
    # 20000 x 20000 at 1 bit per pixel: a few KB on disk, 400 MP once decoded as RGB.
    return encode(Image.new("1", (20000, 20000)))


@pytest.mark.parametrize(
    "data, code",
    [
        (b"", "empty"),
        (b"definitely not an image", "unsupported_format"),
        (encode(Image.new("RGB", (64, 64)), "JPEG")[:200], "decode_failed"),
        (encode(Image.new("RGB", (1, 1))), "too_small"),
        (encode(Image.new("RGB", (32, 32)), "ICO"), "unsupported_format"),
    ],
    ids=["empty", "garbage", "truncated-jpeg", "1x1", "ico-not-allowed"],
)
def test_broken_or_disallowed_images_are_rejected_with_a_code(data, code):
    with pytest.raises(ImageError) as error:
        decode_bytes(data)
    assert error.value.code == code


def test_decompression_bomb_is_rejected_before_decoding():
    with pytest.raises(ImageError) as error:
        decode_bytes(huge_png())
    assert error.value.code == "too_many_pixels"
    assert "400000000" in str(error.value)


def test_byte_limit_applies_before_parsing():
    with pytest.raises(ImageError) as error:
        decode_bytes(encode(Image.new("RGB", (64, 64))), ImageLimits(max_bytes=10))
    assert error.value.code == "too_many_bytes"


@pytest.mark.parametrize(
    "array, size",
    [
        (np.zeros((24, 32, 3), np.uint8), (32, 24)),
        (np.zeros((24, 32), np.uint8), (32, 24)),
        (np.zeros((24, 32, 1), np.uint8), (32, 24)),
        (np.zeros((24, 32, 4), np.uint8), (32, 24)),
        (np.full((24, 32, 3), 65535, np.uint16), (32, 24)),
    ],
)
def test_arrays_in_hw_or_hwc_decode(array, size):
    assert decode_array(array).size == size


@pytest.mark.parametrize(
    "array",
    [np.zeros((24, 32, 3), np.float32), np.zeros((3, 24, 32, 3), np.uint8), np.zeros((24, 32, 2), np.uint8)],
    ids=["float", "4-d", "two-channels"],
)
def test_ambiguous_arrays_are_rejected(array):
    with pytest.raises(ImageError) as error:
        decode_array(array)
    assert error.value.code == "bad_array"


def test_paths_and_pil_images_go_through_the_same_checks(tmp_path):
    path = tmp_path / "tiny.png"
    Image.new("RGB", (2, 2)).save(path)
    for source in (path, str(path), Image.new("RGB", (2, 2))):
        with pytest.raises(ImageError):
            load_image(source)
    with pytest.raises(ImageError) as error:
        load_image(tmp_path / "missing.png")
    assert error.value.code == "not_found"
    with pytest.raises(ImageError) as error:
        load_image(12345)
    assert error.value.code == "bad_type"


def test_an_exif_rotated_pil_image_is_turned_upright_without_touching_the_callers_copy():
    opened = Image.open(io.BytesIO(exif_rotated_jpeg()))
    assert load_image(opened).size == (20, 40)
    assert opened.size == (40, 20)
    upright = Image.new("RGB", (40, 20))
    assert load_image(upright) is upright  # no orientation: no copy on the hot path


@pytest.mark.parametrize(
    "payload, npy, expected",
    [
        ("png", False, 2000 * 1000 * 3),
        ("jpeg", False, 640 * 480 * 3),
        ("npy", True, 64 * 48 * 3),
        ("junk", False, 0),
        ("not base64 at all!", False, 0),
    ],
)
def test_the_decoded_pixel_budget_reads_sizes_from_headers_alone(payload, npy, expected):
    """The service's admission cost of an item: width x height x 3 from the header of a base64 payload (even a
    truncated one), 0 where no header can be read (such an item then fails alone, without being decoded)."""
    import base64

    from rewardscope.models.images import decoded_bytes_of_base64

    buffer = io.BytesIO()
    if payload == "png":
        Image.new("RGB", (2000, 1000)).save(buffer, format="PNG")
    elif payload == "jpeg":
        Image.new("RGB", (640, 480), (9, 99, 199)).save(buffer, format="JPEG")
    elif payload == "npy":
        np.save(buffer, np.zeros((64, 48, 3), np.uint8))
    else:
        buffer.write(payload.encode())
    text = base64.b64encode(buffer.getvalue()).decode() if payload != "not base64 at all!" else payload
    assert decoded_bytes_of_base64(text, npy) == expected
    if payload == "png":
        assert decoded_bytes_of_base64(text[:100], npy) == expected  # the header alone suffices
