"""TorchDetector: the detector as a torch module, behind OnnxDetector's interface, for the one place that needs
it: reward gradients with respect to the image (POST /grad). Scoring without gradients stays on ONNX.

Two sources: the embedded Darknet YOLOv3-tiny (the same torch network its ONNX export is traced from, with the
same class names and version), and ultralytics models built from their .yaml with weights from a safetensors
state dict (ultralytics .pt checkpoints are pickles; they are not loaded here).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..hf import file_sha256
from .detector import LETTERBOX_FILL, Letterbox, decode_candidates, letterbox_batch, letterbox_size

_EMBEDDED: dict[str, TorchDetector] = {}
_EMBEDDED_LOCK = threading.Lock()


def letterbox_tensor(pixels: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, Letterbox]:
    """Differentiable letterbox of a same-size batch [B, 3, H, W] in [0, 1] -> [B, 3, height, width].
    Bilinear with antialiasing, which follows PIL's BILINEAR resize (what letterbox_batch uses) closely."""
    batch, _, image_h, image_w = pixels.shape
    scale = min(width / image_w, height / image_h)
    new_w, new_h = letterbox_size((image_w, image_h), height, width)
    pad_x, pad_y = (width - new_w) // 2, (height - new_h) // 2
    resized = pixels
    if (new_h, new_w) != (image_h, image_w):
        resized = F.interpolate(pixels, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    fill = LETTERBOX_FILL / 255
    padded = F.pad(resized, (pad_x, width - new_w - pad_x, pad_y, height - new_h - pad_y), value=fill)
    geometry = Letterbox(
        scale=np.full(batch, scale, dtype=np.float64), padding=np.tile([[pad_x, pad_y]], (batch, 1)).astype(np.float64)
    )
    return padded, geometry


class TorchDetector:
    """A YOLO-family torch module whose forward gives raw [B, 4 + C, N], with OnnxDetector's interface
    (class_names, input_size, version, describe(), __call__(PIL images) -> candidates) plus `detect`, the
    differentiable path from pixels to candidates."""

    def __init__(
        self,
        network: torch.nn.Module,
        class_names: tuple[str, ...],
        input_size: tuple[int, int],
        version: str,
        source: str,
        device: str | torch.device = "cpu",
    ) -> None:
        self.network = network.eval().requires_grad_(False).to(device)
        self.class_names = class_names
        self.input_size = input_size
        self.version = version
        self.source = source
        self.device = torch.device(device)
        self.dtype = next(self.network.parameters()).dtype

    @classmethod
    def embedded(cls, device: str | torch.device = "cpu") -> TorchDetector:
        """The embedded YOLOv3-tiny: the same cfg, weights, class names and version as its ONNX conversion."""
        from .darknet import DarknetYolo
        from .export import _embedded_files, embedded_class_names, embedded_version

        key = str(device)
        with _EMBEDDED_LOCK:
            if key not in _EMBEDDED:
                cfg_path, weights_path, names_path = _embedded_files()
                network = DarknetYolo(cfg_path.read_text())
                network.load_darknet_weights(weights_path)
                version = embedded_version(weights_path)
                names = embedded_class_names(names_path)
                _EMBEDDED[key] = cls(network, tuple(names), network.input_size, version, "embedded", device)
            return _EMBEDDED[key]

    @classmethod
    def from_ultralytics(
        cls,
        config: str | Path,
        weights: str | Path | None = None,
        names: list[str] | None = None,
        imgsz: int = 640,
        device: str | torch.device = "cpu",
    ) -> TorchDetector:
        """An ultralytics detection model from its .yaml; weights: a safetensors state dict (None: random init,
        for tests). names: the class names (their count sets the head's size when the yaml says otherwise)."""
        from safetensors.torch import load_file
        from ultralytics.nn.tasks import DetectionModel

        network = DetectionModel(str(config), nc=len(names) if names else None, verbose=False)
        version = f"{Path(config).stem}@random-init"
        if weights is not None:
            try:
                network.load_state_dict(load_file(str(weights)))
            except RuntimeError as exc:
                raise ValueError(f"{weights} does not fit {config} with {network.yaml['nc']} classes: {exc}") from None
            version = f"{Path(weights).stem}@{file_sha256(weights)[:16]}"
        model_names = names or [network.names[i] for i in sorted(network.names)]
        classes = int(network.yaml["nc"])
        if len(model_names) != classes:
            raise ValueError(f"{config} has {classes} classes but {len(model_names)} names were given")
        return cls(_RawOutput(network), tuple(model_names), (imgsz, imgsz), version, str(config), device)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def prepare(self, image: Any) -> None:
        """Nothing to do ahead: this detector letterboxes inside its (differentiable) forward."""

    def torch_twin(self) -> TorchDetector:
        return self

    def describe(self) -> dict[str, object]:
        return {
            "model": self.source,
            "version": self.version,
            "providers": [f"torch:{self.device}"],
            "input_size": list(self.input_size),
            "num_classes": self.num_classes,
        }

    def detect(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] (one size per batch) -> candidates [B, N, 4 + C], differentiable in pixels."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be [B, 3, H, W], got {tuple(pixels.shape)}")
        height, width = self.input_size
        batch, geometry = letterbox_tensor(pixels.to(self.device, self.dtype), height, width)
        sizes = np.tile([[pixels.shape[3], pixels.shape[2]]], (pixels.shape[0], 1)).astype(np.float64)
        return decode_candidates(self.network(batch), geometry, sizes)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB PIL images of any sizes -> candidates [B, N, 4 + C], with OnnxDetector's preprocessing."""
        height, width = self.input_size
        batch, geometry = letterbox_batch(images, height, width)
        sizes = np.array([image.size for image in images], dtype=np.float64)
        raw = self.network(torch.from_numpy(batch).to(self.device, self.dtype))
        return decode_candidates(raw, geometry, sizes).float().cpu()


class _RawOutput(torch.nn.Module):
    """Ultralytics' Detect head returns (raw, features) in eval mode; keep the raw [B, 4 + C, N]."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        output = self.model(images)
        return output[0] if isinstance(output, (tuple, list)) else output
