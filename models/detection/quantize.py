"""int8 detectors for CPU: onnxruntime static quantization (QDQ, per-channel int8 Conv weights, uint8
activations calibrated on real photos). The decode head stays float, so boxes and scores keep their form."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import onnx
from PIL import Image, ImageOps

from ..hf import file_sha256
from .detector import OnnxDetector, letterbox_batch
from .export import atomic_place, cache_dir, write_metadata

log = logging.getLogger(__name__)


def calibration_photos() -> list[Image.Image]:
    """Real photos that ship with an installed dependency (ultralytics' assets), and their mirror images."""
    import ultralytics

    assets = Path(ultralytics.__file__).parent / "assets"
    photos = [Image.open(assets / name).convert("RGB") for name in ("bus.jpg", "zidane.jpg")]
    return photos + [ImageOps.mirror(photo) for photo in photos]


def quantize_detector(source: Path, target: Path, calibration: Sequence[Image.Image]) -> Path:
    """Static int8 quantization of an ONNX detector; metadata is copied and the version marked `+int8`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    float_detector = OnnxDetector(source)
    height, width = float_detector.input_size
    batch = float_detector.fixed_batch or 1
    inputs = [letterbox_batch([image] * batch, height, width)[0] for image in calibration]

    class Photos(CalibrationDataReader):
        def __init__(self) -> None:
            self.remaining = iter(inputs)

        def get_next(self) -> dict | None:
            tensor = next(self.remaining, None)
            return None if tensor is None else {float_detector.input_name: tensor}

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        quantize_static(
            str(source),
            str(built),
            Photos(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            op_types_to_quantize=["Conv"],  # the sigmoid/exp decode stays float: scores keep their meaning
        )
        metadata = {prop.key: prop.value for prop in onnx.load(str(source)).metadata_props}
        metadata["model_version"] = f"{float_detector.version}+int8"
        write_metadata(built, metadata)
        atomic_place(built, target)
    return target


def quantized_path(source: Path, directory: Path | None = None) -> Path:
    """The int8 twin of an ONNX detector, built on first use and cached by the float model's hash."""
    target = (directory or cache_dir()) / f"{source.stem}-{file_sha256(source)[:12]}-int8.onnx"
    if not target.exists():
        log.info("quantizing %s to int8 at %s", source.name, target)
        quantize_detector(source, target, calibration_photos())
    return target
