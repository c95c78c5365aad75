"""Benchmark: the folder pipeline (prefetching decode on worker threads, batches scored on two lanes, fsync'd
JSONL) against the detector alone on pre-decoded inputs (the limit: the better of one session on all cores and
two one-thread lanes side by side) and a naive open-and-score-one-at-a-time loop,
on one folder of 512 JPEGs, side by side in one run.

Run: .venv/bin/python benchmarks/folders.py [--images 512]"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from models import Scorer, single_threaded  # noqa: E402
from models.detection.detector import letterbox_batch  # noqa: E402
from service import folders  # noqa: E402


def make_folder(root: Path, count: int) -> None:
    import skimage.data
    import ultralytics

    assets = Path(ultralytics.__file__).parent / "assets"
    photos = [Image.open(assets / name).convert("RGB") for name in ("bus.jpg", "zidane.jpg")]
    photos += [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in ("astronaut", "coffee")]
    for index in range(count):
        photos[index % len(photos)].save(root / f"two_people_{index:05d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lanes", type=int, default=2, help="batches scored side by side by the pipeline")
    parser.add_argument("--spinning", action="store_true", help="let onnxruntime's idle threads spin (old default)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "folder"
        root.mkdir()
        make_folder(root, args.images)
        _, items = folders.folder_items(root)
        options = {"batch_size": args.batch_size, "allow_spinning": args.spinning}
        scorer = Scorer(["matching"], config={"matching": options})
        detector = scorer.rewards["matching"].detector
        scorer.score([items[0].path], [items[0].prompt])  # warm-up

        # The limit: the detector's forward pass over inputs already decoded and letterboxed.
        decoded = [Image.open(item.path).convert("RGB") for item in items]
        height, width = detector.input_size
        batches = [
            letterbox_batch(decoded[i : i + args.batch_size], height, width)[0]
            for i in range(0, len(decoded), args.batch_size)
        ]
        started, cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            detector.forward(batch)
        wide_rate = len(items) / (time.perf_counter() - started)
        wide_cpu_ms = (time.process_time() - cpu) * 1e3 / len(items)

        # The same forward passes as the pipeline's two lanes run them: two threads, one onnxruntime thread each.
        def lane(share: list) -> None:
            with single_threaded():
                for batch in share:
                    detector.forward(batch)

        with single_threaded():
            detector.forward(batches[0])  # make the one-thread session before timing
        started, cpu = time.perf_counter(), time.process_time()
        with ThreadPoolExecutor(2) as lanes:
            list(lanes.map(lane, [batches[0::2], batches[1::2]]))
        lanes_rate = len(items) / (time.perf_counter() - started)
        cpu_ms = {"detector forward alone, 2 lanes x 1 thread": (time.process_time() - cpu) * 1e3 / len(items)}
        detector_rate = max(wide_rate, lanes_rate)  # the limit: the detector's better configuration
        del decoded, batches

        started, cpu = time.perf_counter(), time.process_time()
        backend = folders.ScorerBackend(scorer)
        stats = folders.score_items(items, backend, Path(scratch) / "out", args.batch_size, lanes=args.lanes)
        pipeline_rate = stats.scored / (time.perf_counter() - started)
        cpu_ms["folder pipeline (decode+score+write)"] = (time.process_time() - cpu) * 1e3 / stats.scored
        cpu_ms["detector forward alone, all cores (pre-decoded)"] = wide_cpu_ms

        started = time.perf_counter()
        for item in items[: len(items) // 4]:
            scorer.score([Image.open(item.path)], [item.prompt])
        naive_rate = (len(items) // 4) / (time.perf_counter() - started)

    spinning = "on" if args.spinning else "off"
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.images} JPEGs, batch {args.batch_size}, "
        f"onnxruntime spinning {spinning}, pipeline lanes {args.lanes}"
    )
    print(f"{'path':<52} {'images/s':>9} {'vs detector':>12} {'CPU ms/image':>13}")
    for name, rate in [
        ("detector forward alone, all cores (pre-decoded)", wide_rate),
        ("detector forward alone, 2 lanes x 1 thread", lanes_rate),
        ("folder pipeline (decode+score+write)", pipeline_rate),
        ("naive loop (open, score one at a time; 1/4 of files)", naive_rate),
    ]:
        cpu_text = f"{cpu_ms[name]:>13.1f}" if name in cpu_ms else ""
        print(f"{name:<52} {rate:>9.1f} {rate / detector_rate:>12.2f} {cpu_text}")
    print(f"pipeline / detector alone (the better of the two): {pipeline_rate / detector_rate:.2f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
