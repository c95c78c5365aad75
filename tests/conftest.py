"""Shared fixtures: offline environment, real photos, the embedded detector converted once per session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path


def _scratch_unless_set(variable: str, prefix: str) -> None:
    """Point variable at a fresh temp dir, removed when the process exits (the test run, or a child that imported
    this module), unless the caller set it: then it is theirs, and kept."""
    if variable not in os.environ:
        os.environ[variable] = path = tempfile.mkdtemp(prefix=prefix)
        owner = os.getpid()
        atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, ignore_errors=True))


# Before any import of ultralytics / transformers: never reach for the network.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
_scratch_unless_set("YOLO_CONFIG_DIR", "rewardscope-yolo-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_scratch_unless_set("REWARDSCOPE_CACHE", "rewardscope-cache-")

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
def token_server():
    """One served RewardService with the defaults and serving.TOKEN, shared by the test modules that need nothing
    else (hostile input, fuzzing): a server start costs seconds of model loading and the golden check."""
    from serving import TOKEN, running_server

    with running_server({"REWARDSCOPE_TOKEN": TOKEN}) as base_url:
        yield base_url


@pytest.fixture(scope="session")
def embedded_onnx() -> Path:
    from rewardscope.models.detection.export import embedded_detector_path

    return embedded_detector_path()


@pytest.fixture(scope="session")
def detector(embedded_onnx: Path):
    from rewardscope.models.detection.detector import OnnxDetector

    return OnnxDetector(embedded_onnx)


@pytest.fixture(scope="session")
def yolov8n_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init yolov8n exported through our exporter with a fixed batch of 2 (offline)."""
    from rewardscope.models.detection.export import export_ultralytics
    from rewardscope.models.prompt import COCO_CLASSES

    target = tmp_path_factory.mktemp("yolo") / "yolov8n-random.onnx"
    return export_ultralytics("yolov8n.yaml", target, imgsz=320, batch=2, names=COCO_CLASSES)
