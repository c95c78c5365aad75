"""A torch implementation of Darknet .cfg networks (the YOLOv3-tiny subset) that loads .weights files.
Used to convert the embedded YOLOv3-tiny to ONNX, and later as the differentiable torch path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def parse_cfg(text: str) -> list[dict[str, str]]:
    """Darknet cfg text -> list of sections, each {"type": name, key: value, ...}."""
    sections: list[dict[str, str]] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            sections.append({"type": line.strip("[]").strip()})
        elif "=" in line:
            key, value = line.split("=", 1)
            sections[-1][key.strip()] = value.strip()
    return sections


class _MaxPoolSame(nn.Module):
    """Darknet maxpool: stride-1 pooling keeps the size by padding right/bottom (edge pad == -inf pad for max)."""

    def __init__(self, size: int, stride: int) -> None:
        super().__init__()
        self.size, self.stride = size, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.size > 1:
            x = F.pad(x, (0, self.size - 1, 0, self.size - 1), mode="replicate")
        return F.max_pool2d(x, self.size, self.stride)


class YoloHead(nn.Module):
    """Decodes one [yolo] layer: raw [B, A*(5+C), H, W] -> [B, H*W*A, 4 + C] boxes (cx, cy, w, h, input px)
    and scores objectness * class probability, both sigmoid as in YOLOv3."""

    def __init__(self, anchors: list[tuple[float, float]], num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor, input_height: int, input_width: int) -> torch.Tensor:
        batch, _, height, width = x.shape
        num_anchors = self.anchors.shape[0]
        x = x.view(batch, num_anchors, 5 + self.num_classes, height, width).permute(0, 3, 4, 1, 2)
        grid_y, grid_x = torch.meshgrid(
            torch.arange(height, dtype=x.dtype, device=x.device),
            torch.arange(width, dtype=x.dtype, device=x.device),
            indexing="ij",
        )
        center_x = (torch.sigmoid(x[..., 0]) + grid_x[..., None]) * (input_width / width)
        center_y = (torch.sigmoid(x[..., 1]) + grid_y[..., None]) * (input_height / height)
        box_w = torch.exp(x[..., 2]) * self.anchors[:, 0]
        box_h = torch.exp(x[..., 3]) * self.anchors[:, 1]
        scores = torch.sigmoid(x[..., 4:5]) * torch.sigmoid(x[..., 5:])
        out = torch.cat([torch.stack([center_x, center_y, box_w, box_h], -1), scores], -1)
        return out.reshape(batch, height * width * num_anchors, 4 + self.num_classes)


class DarknetYolo(nn.Module):
    """Darknet YOLO network built from a cfg. forward(images [B, 3, H, W] in [0, 1]) -> [B, 4 + C, N]
    with rows (cx, cy, w, h) in input pixels then per-class scores: the layout ultralytics exports use,
    so one decoder serves both kinds of detector."""

    def __init__(self, cfg_text: str) -> None:
        super().__init__()
        sections = parse_cfg(cfg_text)
        net, self.blocks = sections[0], sections[1:]
        self.input_size = (int(net.get("height", 416)), int(net.get("width", 416)))
        self.layers = nn.ModuleList()
        channels: list[int] = []
        in_channels = int(net.get("channels", 3))
        self.num_classes = 0
        for block in self.blocks:
            kind = block["type"]
            if kind == "convolutional":
                filters, size = int(block["filters"]), int(block["size"])
                stride, batch_norm = int(block.get("stride", 1)), int(block.get("batch_normalize", 0))
                padding = size // 2 if int(block.get("pad", 0)) else 0
                layer = nn.Sequential()
                layer.add_module("conv", nn.Conv2d(in_channels, filters, size, stride, padding, bias=not batch_norm))
                if batch_norm:
                    layer.add_module("bn", nn.BatchNorm2d(filters, momentum=0.01, eps=1e-5))
                if block.get("activation", "linear") == "leaky":
                    layer.add_module("act", nn.LeakyReLU(0.1))
                out_channels = filters
            elif kind == "maxpool":
                layer = _MaxPoolSame(int(block["size"]), int(block["stride"]))
                out_channels = in_channels
            elif kind == "upsample":
                layer = nn.Upsample(scale_factor=int(block["stride"]), mode="nearest")
                out_channels = in_channels
            elif kind == "route":
                sources = [int(v) for v in block["layers"].split(",")]
                block["_sources"] = ",".join(str(s if s >= 0 else len(channels) + s) for s in sources)
                layer = nn.Identity()
                out_channels = sum(channels[int(s)] for s in block["_sources"].split(","))
            elif kind == "yolo":
                mask = [int(v) for v in block["mask"].split(",")]
                values = [float(v) for v in block["anchors"].split(",")]
                pairs = list(zip(values[0::2], values[1::2], strict=True))
                self.num_classes = int(block["classes"])
                layer = YoloHead([pairs[i] for i in mask], self.num_classes)
                out_channels = in_channels
            else:
                raise ValueError(f"Darknet layer [{kind}] is not supported")
            self.layers.append(layer)
            channels.append(out_channels)
            in_channels = out_channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        outputs: list[torch.Tensor] = []
        detections: list[torch.Tensor] = []
        x = images
        for block, layer in zip(self.blocks, self.layers, strict=True):
            if block["type"] == "route":
                x = torch.cat([outputs[int(s)] for s in block["_sources"].split(",")], 1)
            elif block["type"] == "yolo":
                detections.append(layer(x, images.shape[2], images.shape[3]))
            else:
                x = layer(x)
            outputs.append(x)
        return torch.cat(detections, 1).transpose(1, 2)

    def load_darknet_weights(self, path: str | Path) -> None:
        """Read a Darknet .weights file: header, then per conv layer (BN beta, gamma, mean, var | bias), weights."""
        with open(path, "rb") as handle:
            major, minor, _revision = np.fromfile(handle, dtype=np.int32, count=3)
            seen_dtype = np.int64 if (major * 10 + minor) >= 2 and major < 1000 and minor < 1000 else np.int32
            np.fromfile(handle, dtype=seen_dtype, count=1)
            weights = np.fromfile(handle, dtype=np.float32)
        offset = 0

        def take(tensor: torch.Tensor) -> None:
            nonlocal offset
            count = tensor.numel()
            if offset + count > weights.size:
                raise ValueError(f"{path}: weights file is shorter than the cfg needs")
            tensor.data.copy_(torch.from_numpy(weights[offset : offset + count]).view_as(tensor))
            offset += count

        for block, layer in zip(self.blocks, self.layers, strict=True):
            if block["type"] != "convolutional":
                continue
            if "bn" in layer._modules:
                bn = layer.bn
                for tensor in (bn.bias, bn.weight, bn.running_mean, bn.running_var):
                    take(tensor)
            else:
                take(layer.conv.bias)
            take(layer.conv.weight)
        if offset != weights.size:
            raise ValueError(f"{path}: {weights.size - offset} weights left over; cfg and weights do not match")
