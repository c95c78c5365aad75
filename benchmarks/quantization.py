"""Benchmark: the int8 (static QDQ) detector against fp32, side by side in one run, across onnxruntime session
options (graph optimisation level, intra-op threads); plus the bus.jpg prompt ordering with each.

Run: .venv/bin/python benchmarks/quantization.py"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import photos, timed  # noqa: E402
from rewardscope.models.detection.detector import DetectorConfig, OnnxDetector, letterbox_batch  # noqa: E402
from rewardscope.models.detection.export import embedded_detector_path  # noqa: E402
from rewardscope.models.detection.quantize import quantized_path  # noqa: E402

from rewardscope import Scorer  # noqa: E402


def main() -> None:
    fp32 = embedded_detector_path()
    int8 = quantized_path(fp32)
    images = photos()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {len(images)} photos cycled")
    print(f"{'model':<6} {'graph opt':<9} {'threads':>7} {'batch':>5} {'ms/image':>9}")
    rates: dict[tuple[str, str, int, int], float] = {}
    for optimization in ("basic", "all"):
        for threads in (1, 0):
            for batch_size in (1, 8):
                batch, _ = letterbox_batch([images[i % len(images)] for i in range(batch_size)], 416, 416)
                for name, path in (("fp32", fp32), ("int8", int8)):
                    config = DetectorConfig(intra_op_threads=threads, graph_optimization=optimization)
                    detector = OnnxDetector(path, config)
                    ms = timed(lambda d=detector, b=batch: d.forward(b), 5) / batch_size * 1e3
                    rates[(name, optimization, threads, batch_size)] = ms
                    print(f"{name:<6} {optimization:<9} {threads or 'all':>7} {batch_size:>5} {ms:>9.2f}")
    for batch_size in (1, 8):
        ratio = rates[("fp32", "all", 0, batch_size)] / rates[("int8", "all", 0, batch_size)]
        print(f"int8 speed-up, default options, batch {batch_size}: {ratio:.2f}x (goal >= 1.5x)")
    import ultralytics

    bus = Path(ultralytics.__file__).parent / "assets" / "bus.jpg"
    for quantized in (False, True):
        scorer = Scorer(["matching"], config={"matching": {"quantized": quantized}})
        values = [r.rewards["matching"] for r in scorer.score([bus] * 3, ["four people", "a person", "a cat"])]
        label = "int8" if quantized else "fp32"
        print(f"{label} bus.jpg: four people {values[0]:.3f} > a person {values[1]:.3f} > a cat {values[2]:.3f}")


if __name__ == "__main__":
    main()
