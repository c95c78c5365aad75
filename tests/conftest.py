"""Shared fixtures: offline environment, real photos, the embedded detector converted once per session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before any import of ultralytics / transformers: never reach for the network.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="rewardscope-yolo-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("REWARDSCOPE_CACHE", tempfile.mkdtemp(prefix="rewardscope-cache-"))

import torch  # noqa: E402  (importing torch alone does not import triton)

# Without a GPU, Triton kernels run in its interpreter, which must be chosen before triton.language is
# imported (torchvision imports it), so before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from PIL import Image  # noqa: E402


def ultralytics_asset(name: str) -> Path:
    import ultralytics

    return Path(ultralytics.__file__).parent / "assets" / name


@pytest.fixture(scope="session")
def bus_path() -> Path:
    return ultralytics_asset("bus.jpg")


@pytest.fixture(scope="session")
def bus(bus_path: Path) -> Image.Image:
    return Image.open(bus_path).convert("RGB")


@pytest.fixture(scope="session")
def zidane() -> Image.Image:
    return Image.open(ultralytics_asset("zidane.jpg")).convert("RGB")


@pytest.fixture(scope="session")
def embedded_onnx() -> Path:
    from models.detection.export import embedded_detector_path

    return embedded_detector_path()


@pytest.fixture(scope="session")
def detector(embedded_onnx: Path):
    from models.detection.detector import OnnxDetector

    return OnnxDetector(embedded_onnx)


@pytest.fixture(scope="session")
def yolov8n_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init yolov8n exported through our exporter with a fixed batch of 2 (offline)."""
    from models.detection.export import export_ultralytics
    from models.detection.prompt import COCO_CLASSES

    target = tmp_path_factory.mktemp("yolo") / "yolov8n-random.onnx"
    return export_ultralytics("yolov8n.yaml", target, imgsz=320, batch=2, names=COCO_CLASSES)
