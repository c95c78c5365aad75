"""Benchmark: CPU ms/image of the zero-shot detectors at base size, on a real photo (bus.jpg) with 4 queries:
(a) OWL text cache cold (cleared before every call) against warm, (b) OWL image side in torch against ONNX
(exported once with export_image_encoder), and Grounding DINO base (its tokenization cache only, cold and warm).

Models are random-init at the real architectures' sizes (weights do not change speed; none can be downloaded here):
OWLv2 base (Owlv2Config() with the vision tower at 960 px as google/owlv2-base-patch16-ensemble has it: ViT-B/16,
3600 boxes), OWL-ViT base (OwlViTConfig(): ViT-B/32 at 768 px, 576 boxes) and Grounding DINO base
(GroundingDinoConfig(): Swin-T, BERT-base, 900 queries; the processor's 800 / 1333 px). Each is saved with
save_pretrained to a temp dir and loaded through load_zero_shot_detector, so the measured path is the served one.
The OWL heads are redrawn at 1 / sqrt(fan-in) as the tests' tiny models are (transformers' generic init draws them
from N(0, 1), which saturates every box and score and makes the ONNX-torch comparison meaningless at this width).
The tokenizers are the tests' small-vocabulary ones: OWL pads every query to 16 tokens whatever the vocabulary, and
Grounding DINO's text here is as many tokens as BERT-base's would be, so the text compute is the real one.

Variants of one model are timed side by side: each repeat runs every variant once (after one warm-up call each),
and the table shows medians. torch runs on os.cpu_count() threads (torch.set_num_threads), onnxruntime on its
default (all cores).

Run: .venv/bin/python benchmarks/zero_shot.py [--repeats 3] [--skip owlv2 owlvit grounding-dino]
(about 2 minutes on 2 cores at --repeats 1, 3 to 4 at --repeats 3)"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from rewardscope.models.detection.detector import DetectorConfig  # noqa: E402
from rewardscope.models.detection.zero_shot import ZeroShotDetector, load_zero_shot_detector  # noqa: E402
from tiny_zero_shot import bert_tokenizer, clip_tokenizer, owl_heads_like_trained  # noqa: E402

QUERIES = ("person", "bus", "dog", "umbrella")


def save_owlv2_base(directory: Path) -> Path:
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    tokenizer = clip_tokenizer()
    model = Owlv2ForObjectDetection(Owlv2Config(vision_config={"image_size": 960}))
    owl_heads_like_trained(model)
    processor = Owlv2Processor(image_processor=Owlv2ImageProcessor(), tokenizer=tokenizer)  # 960 x 960
    return _save(directory, model, processor)


def save_owlvit_base(directory: Path) -> Path:
    from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor

    model = OwlViTForObjectDetection(OwlViTConfig())
    owl_heads_like_trained(model)
    processor = OwlViTProcessor(image_processor=OwlViTImageProcessor(), tokenizer=clip_tokenizer())  # 768 x 768
    return _save(directory, model, processor)


def save_grounding_dino_base(directory: Path) -> Path:
    from transformers import (
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
    )

    # transformers' own Swin, random init: no timm, no pretrained backbone weights fetched
    model = GroundingDinoForObjectDetection(GroundingDinoConfig(use_pretrained_backbone=False))
    processor = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(), tokenizer=bert_tokenizer())
    return _save(directory, model, processor)


def _save(directory: Path, model: torch.nn.Module, processor) -> Path:
    model.eval().save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def side_by_side(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each variant: one warm-up call each, then `repeats` rounds of one call each."""
    for function in variants.values():
        function()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, function in variants.items():
            start = time.perf_counter()
            function()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def cold(detector: ZeroShotDetector, call: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        detector.text_cache.clear()
        return call()

    return run


def owl_rows(kind: str, directory: Path, workdir: Path, image, repeats: int) -> list[list[str]]:
    config = DetectorConfig(batch_size=1)
    torch_side = load_zero_shot_detector(str(directory), config)
    start = time.perf_counter()
    onnx_path = torch_side.export_image_encoder(workdir / f"{kind}-image.onnx")
    export_s = time.perf_counter() - start
    onnx_side = load_zero_shot_detector(str(directory), config, onnx_image_encoder=str(onnx_path))
    queries = [QUERIES]
    difference = (onnx_side.detect_queries([image], queries)[0] - torch_side.detect_queries([image], queries)[0]).abs()

    def ask(detector: ZeroShotDetector) -> Callable[[], object]:
        return lambda: detector.detect_queries([image], queries)

    texts = [torch_side.query_text(name) for name in QUERIES]
    times = side_by_side(
        {
            "torch warm": ask(torch_side),
            "torch cold": cold(torch_side, ask(torch_side)),
            "onnx warm": ask(onnx_side),
            "onnx cold": cold(onnx_side, ask(onnx_side)),
            # what the cache saves, alone: the 4 texts through the text tower (tokenizer included)
            "text tower": cold(torch_side, lambda: torch_side._text_embeddings(texts)),
        },
        repeats,
    )
    ms = {name: 1000 * seconds for name, seconds in times.items()}
    size = "x".join(str(side) for side in torch_side.input_size())
    largest = float(difference.max())
    print(f"{kind}: ONNX export {export_s:.0f} s; largest |onnx - torch| in the candidates: {largest:.1e}")
    return [
        [
            kind,
            size,
            str(torch_side.num_boxes),
            f"{ms['torch warm']:.0f}",
            f"{ms['torch cold']:.0f}",
            f"{ms['torch cold'] / ms['torch warm']:.3f}",
            f"{ms['text tower']:.0f}",
            f"{ms['onnx warm']:.0f}",
            f"{ms['onnx cold']:.0f}",
            f"{ms['onnx warm'] / ms['torch warm']:.2f}",
        ]
    ]


def grounding_rows(directory: Path, image, repeats: int) -> list[list[str]]:
    detector = load_zero_shot_detector(str(directory), DetectorConfig(batch_size=1))
    queries = [QUERIES]

    def ask() -> object:
        return detector.detect_queries([image], queries)

    times = side_by_side({"warm": ask, "cold": cold(detector, ask)}, repeats)
    size = detector.image_processor(images=[image], return_tensors="pt")["pixel_values"].shape[-2:]
    return [
        [
            "grounding-dino",
            f"{size[0]}x{size[1]}",
            str(detector.num_boxes),
            f"{1000 * times['warm']:.0f}",
            f"{1000 * times['cold']:.0f}",
            f"{times['cold'] / times['warm']:.3f}",
            "n/a (fused)",
            "n/a (fused)",
            "n/a (fused)",
            "n/a",
        ]
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["owlv2", "owlvit", "grounding-dino"])
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    import ultralytics

    image = Image.open(Path(ultralytics.__file__).parent / "assets" / "bus.jpg").convert("RGB")  # 810 x 1080
    rows: list[list[str]] = []
    # The reference point, in the same run: the embedded closed-vocabulary YOLOv3-tiny (ONNX, 416 px, 80 classes).
    from rewardscope.models.detection.matching import load_detector

    embedded = load_detector(None, DetectorConfig())
    embedded_ms = 1000 * side_by_side({"embedded": lambda: embedded([image])}, args.repeats)["embedded"]
    rows.append(["embedded yolov3-tiny (onnx, closed)", "416x416", "2535", f"{embedded_ms:.0f}", *["n/a"] * 6])
    with tempfile.TemporaryDirectory(prefix="zero-shot-bench-") as temp:
        workdir = Path(temp)
        for kind, saver in (("owlv2", save_owlv2_base), ("owlvit", save_owlvit_base)):
            if kind not in args.skip:
                torch.manual_seed(0)
                rows += owl_rows(kind, saver(workdir / kind), workdir, image, args.repeats)
        if "grounding-dino" not in args.skip:
            torch.manual_seed(0)
            rows += grounding_rows(save_grounding_dino_base(workdir / "grounding-dino"), image, args.repeats)

    print(
        f"\nZero-shot detectors, CPU ms/image (1 image per call, {len(QUERIES)} queries, bus.jpg 810x1080), "
        f"median of {args.repeats} after a warm-up; torch threads = os.cpu_count() = {threads}, onnxruntime default; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}\n"
    )
    header = [
        "model",
        "input (h x w)",
        "boxes",
        "torch, text cached (ms)",
        "torch, cache cold (ms)",
        "cold / warm",
        "text tower alone, cold (ms)",
        "onnx image side, cached (ms)",
        "onnx, cache cold (ms)",
        "onnx / torch (cached)",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(
        "\ncold: the text cache cleared before every call, so the 4 query texts run through the text tower (OWL) "
        "or are tokenized again (Grounding DINO, whose text encoder runs on every call: it is fused with the image)."
    )


if __name__ == "__main__":
    main()
