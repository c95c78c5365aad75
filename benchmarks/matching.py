"""Benchmark: detector forward ms/image at batch 1, 8, 32 vs the vectorised post-processing (box_match +
matching score), and a per-image Python-loop implementation of the same score as the baseline.

Run: .venv/bin/python benchmarks/matching.py   (prints a table and the two ratios the core issue sets)"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import photos, timed  # noqa: E402
from rewardscope.kernels import ops as kernel_ops  # noqa: E402
from rewardscope.models.detection.detector import OnnxDetector, letterbox_batch  # noqa: E402
from rewardscope.models.detection.export import embedded_detector_path  # noqa: E402
from rewardscope.models.detection.matching import seed_score  # noqa: E402


def loop_score(candidates: list[list[float]], prompt: list[tuple[int, int]], conf: float, iou: float) -> float:
    """The seed score the way a one-off script computes it: Python loops per candidate, class and pair."""

    def overlap(a, b):
        width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = width * height
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    detections: dict[int, list[tuple[float, list[float]]]] = {}
    for row in candidates:
        scores = row[4:]
        best = max(range(len(scores)), key=scores.__getitem__)
        if scores[best] > conf:
            detections.setdefault(best, []).append((scores[best], row[:4]))
    kept: dict[int, list[float]] = {}
    for cls, items in detections.items():
        items.sort(key=lambda item: -item[0])
        chosen: list[tuple[float, list[float]]] = []
        for score, box in items:
            if all(overlap(box, other) <= iou for _, other in chosen):
                chosen.append((score, box))
        kept[cls] = [score for score, _ in chosen]
    category, quantity = [], []
    for cls, wanted in prompt:
        found = kept.get(cls, [])
        category.append(sum(found) / len(found) if found else 0.0)
        quantity.append(min(len(found), wanted) / max(len(found), wanted))
    c, q = sum(category) / len(category), sum(quantity) / len(quantity)
    return 2 * c * q / (c + q) if c + q > 0 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: default)")
    args = parser.parse_args()

    from rewardscope.models.detection.detector import DetectorConfig

    detector = OnnxDetector(embedded_detector_path(), DetectorConfig(intra_op_threads=args.threads, batch_size=32))
    images = photos()
    height, width = detector.input_size
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, {platform.python_version()}, torch {torch.__version__}"
    )
    print(f"detector: {detector.version} on {detector.providers[0]}, input {height}x{width}, {len(images)} photos")

    rows = []
    forward_ms = {}
    for batch_size in (1, 8, 32):
        batch_images = [images[i % len(images)] for i in range(batch_size)]
        batch, _ = letterbox_batch(batch_images, height, width)
        forward = timed(lambda batch=batch: detector.forward(batch), args.repeats) / batch_size
        preprocess = timed(lambda b=batch_images: letterbox_batch(b, height, width), args.repeats) / batch_size
        forward_ms[batch_size] = forward * 1e3
        rows.append((f"forward, batch {batch_size}", forward * 1e3))
        rows.append((f"letterbox, batch {batch_size}", preprocess * 1e3))

    batch_images = [images[i % len(images)] for i in range(32)]
    candidates = detector(batch_images)
    # Two prompt objects per image (person x2, and the image's own second class slot: dog x1).
    class_ids = torch.tensor([[0, 16]] * 32)
    requested = torch.tensor([[2, 1]] * 32)
    mask = torch.ones_like(class_ids, dtype=torch.bool)

    def vectorised():
        match = kernel_ops.box_match(candidates, class_ids, requested, 0.25, 0.45, 100)
        return seed_score(match.counts, match.confidence_mean, requested, mask)[0]

    post = timed(vectorised, args.repeats) / 32
    rows.append(("post-processing (box_match + score), batch 32", post * 1e3))

    loop_inputs = candidates.tolist()
    prompt = [(0, 2), (16, 1)]

    def looped():
        return [loop_score(rows_, prompt, 0.25, 0.45) for rows_ in loop_inputs]

    loop = timed(looped, max(1, args.repeats // 2)) / 32
    rows.append(("post-processing, per-image Python loop (baseline)", loop * 1e3))
    agree = np.allclose(vectorised().numpy(), looped(), atol=1e-5)

    print(f"\n{'stage':<52} {'ms/image':>9}")
    for name, value in rows:
        print(f"{name:<52} {value:>9.3f}")
    best_forward = min(forward_ms.values())
    print(f"\npost-processing / forward (best batch): {post * 1e3 / best_forward * 100:.2f}%   (goal <= 5%)")
    print(f"speed-up over the Python loop:          {loop / post:.1f}x   (goal >= 20x)")
    print(f"vectorised and loop scores agree:       {agree}")


if __name__ == "__main__":
    main()
