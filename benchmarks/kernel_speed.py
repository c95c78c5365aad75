"""Benchmark: box_match post-processing at YOLO sizes (N = 8400 / 25200 candidates, C = 80 classes).

On CUDA: the fused Triton box_match vs torchvision batched_nms + torch counting, B in {1, 8, 64}, and their
ratio (both measured in this run, same inputs; kept detections compared). On CPU: the torch reference's
ms/image, and a worked memory roofline of the Triton kernel for an H100 (the CPU cannot time it).

Run: .venv/bin/python benchmarks/kernel_speed.py [--cpu-batches 1 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torchvision  # noqa: E402
from rewardscope.kernels import ops as kernel_ops  # noqa: E402
from rewardscope.kernels import reference  # noqa: E402

SIZES = (8400, 25200)  # YOLOv8 at 640 px; YOLOv5/v7 anchor heads at 640 px
NUM_CLASSES = 80
CONF, IOU, MAX_DET, TOPK = 0.25, 0.45, 100, 1000
H100_BANDWIDTH = 3.35e12  # bytes / s, HBM3 (SXM)


def yolo_like_candidates(batch: int, num: int, classes: int, device: str, seed: int = 0) -> torch.Tensor:
    """Boxes clustered around 20 objects per image; 5 % of candidates carry one confident class, the rest
    background noise below 0.05, like a trained detector's raw head output."""
    generator = torch.Generator().manual_seed(seed)
    objects = torch.rand(batch, 20, 4, generator=generator) * torch.tensor([600.0, 600.0, 150.0, 150.0])
    owner = torch.randint(0, 20, (batch, num), generator=generator)
    chosen = torch.gather(objects, 1, owner[..., None].expand(batch, num, 4))
    jitter = torch.randn(batch, num, 4, generator=generator) * 6
    center, size = chosen[..., :2] + jitter[..., :2], (chosen[..., 2:] + 20 + jitter[..., 2:]).clamp(min=2)
    boxes = torch.cat([center - size / 2, center + size / 2], -1)
    scores = torch.rand(batch, num, classes, generator=generator) * 0.05
    confident = torch.rand(batch, num, generator=generator) < 0.05
    object_class = (owner * 7) % classes
    scores[confident, object_class[confident]] = 0.2 + 0.75 * torch.rand(int(confident.sum()), generator=generator)
    return torch.cat([boxes, scores], -1).to(device)


def prompt(batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    class_ids = torch.tensor([[0, 7, 14, -1]] * batch, device=device)
    return class_ids, torch.tensor([[1, 2, 3, 0]] * batch, device=device)


def torchvision_baseline(candidates, class_ids, requested):
    """The usual pipeline: filter + best class + top-k in torch, torchvision.ops.batched_nms over the whole
    batch (idxs = image * C + class), then per-slot counting and the soft count in torch."""
    batch, num, width = candidates.shape
    scores, classes = candidates[..., 4:].max(-1)
    scores = torch.where(scores > CONF, scores, -1.0)
    top_scores, top_index = scores.topk(min(TOPK, num), dim=1)
    image = torch.arange(batch, device=candidates.device)[:, None].expand_as(top_index)
    valid = top_scores > CONF
    image, index, kept_scores = image[valid], top_index[valid], top_scores[valid]
    kept_classes = classes[image, index]
    keep = torchvision.ops.batched_nms(
        candidates[image, index, :4], kept_scores, image * (width - 4) + kept_classes, IOU
    )
    keep = keep[torch.sort(image[keep], stable=True).indices]
    per_image = torch.bincount(image[keep], minlength=batch)
    rank = torch.arange(keep.numel(), device=keep.device) - (torch.cumsum(per_image, 0) - per_image)[image[keep]]
    keep, rank = keep[rank < MAX_DET], rank[rank < MAX_DET]
    keep_scores = torch.zeros(batch, MAX_DET, device=candidates.device)
    keep_classes = torch.full((batch, MAX_DET), -1, device=candidates.device)
    keep_scores[image[keep], rank] = kept_scores[keep]
    keep_classes[image[keep], rank] = kept_classes[keep]
    member = (keep_classes[:, None, :] == class_ids[:, :, None]) & (class_ids[:, :, None] >= 0)
    member_scores = keep_scores[:, None, :] * member
    pmf = reference.poisson_binomial(member_scores)
    target = requested.clamp(0, MAX_DET)[..., None]
    p_exact = pmf.gather(-1, target)[..., 0]
    p_at_least = 1 - (torch.cumsum(pmf, -1) - pmf).gather(-1, target)[..., 0]
    padding = class_ids < 0
    return member.sum(-1), member_scores.sum(-1), p_exact.masked_fill(padding, 0), p_at_least.masked_fill(padding, 0)


def timed(function, repeats: int, cuda: bool) -> float:
    """Median seconds per call after two warm-up calls (the first compiles the Triton kernels)."""
    function(), function()
    samples = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if cuda:
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def roofline(
    num: int, classes: int = NUM_CLASSES, top: int = TOPK, max_det: int = MAX_DET, slots: int = 4, size: int = 4
) -> list[tuple[str, int, int, int]]:
    """(stage, HBM bytes read, HBM bytes written, L2 re-read bytes) per image of the Triton kernel."""
    top = min(top, num)
    words = math.ceil(top / 64)
    strips = math.ceil(top / 16)
    active = sum(1 for r in range(strips) for c in range(words) if c * 64 + 63 > r * 16)  # stage-3 programs
    ranked = 8 + size + 4 + 4 * size  # index, score, class, box of one ranked candidate
    mask_words = active * 16 * 8
    return [
        # Rows are (4 + C) elements apart; 32-byte sectors make the box columns ride along: count whole rows.
        ("1 best class + conf filter", num * (4 + classes) * size, num * (size + 4), 0),
        ("2 torch.topk (one pass, lower bound)", num * size, top * (size + 8), 0),
        ("3 IoU bitmask, 16x64 strips", top * ranked, mask_words, active * (16 + 64) * ranked),
        ("4 greedy sweep + kept rows", mask_words + top * size + max_det * ranked, max_det * (8 + 5 * size + 8), 0),
        ("5 count, confidence, soft count", max_det * (size + 8) + slots * 16 + 8, slots * (8 + 4 * size), 0),
    ]


def print_header(header: str) -> None:
    """A markdown table's header row and the separator row under it, one run of dashes per column."""
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")


def cases(batches: list[int], device: str):
    """(batch, N, candidates, class_ids, requested) for every candidate count and batch size, in table order."""
    for num in SIZES:
        for batch in batches:
            candidates = yolo_like_candidates(batch, num, NUM_CLASSES, device)
            class_ids, requested = prompt(batch, device)
            yield batch, num, candidates, class_ids, requested


def print_roofline() -> None:
    print("\nRoofline of the fused Triton box_match per image (C = 80, T = min(1000, N), M = 100, K = 4, fp32)")
    print("time = (HBM bytes read + written) / 3.35e12 B/s (H100 SXM, HBM3); L2 re-reads (stage 3 re-reading")
    print("the T ranked rows, ~32 KB, for every strip) are listed but not counted; stage 4 is counted as reading")
    print("the mask from HBM although it was just written and sits in the 50 MB L2.")
    header = f"| {'stage':38s} | {'HBM read KB':>11s} | {'written KB':>10s} | {'L2 KB':>7s} | {'us @ 3.35 TB/s':>14s} |"
    for num in SIZES:
        rows = roofline(num)
        print(f"\nN = {num}")
        print_header(header)
        for stage, read, written, cached in rows:
            seconds = (read + written) / H100_BANDWIDTH
            print(
                f"| {stage:38s} | {read / 1e3:11.1f} | {written / 1e3:10.1f} | {cached / 1e3:7.1f} | "
                f"{seconds * 1e6:14.3f} |"
            )
        read, written = sum(row[1] for row in rows), sum(row[2] for row in rows)
        total = (read + written) / H100_BANDWIDTH
        print(f"| {'total':38s} | {read / 1e3:11.1f} | {written / 1e3:10.1f} | {'':7s} | {total * 1e6:14.3f} |")
        print(
            f"B = 1 / 8 / 64: {total * 1e6:.1f} / {8 * total * 1e6:.1f} / {64 * total * 1e6:.0f} us of HBM traffic. "
            "Below B ~ 16 the floor is latency instead:"
        )
        print("4 kernel launches + topk (~4 us each) plus stage 4's serial chain per image, T / 64 tile rows of 64")
        print("dependent steps (~20 cycles each at ~1.7 GHz: ~12 us for T = 1000), images in parallel.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--gpu-batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}"
    )

    if torch.cuda.is_available():
        print(f"\nCUDA: {torch.cuda.get_device_name()} (median of {args.repeats}, after warm-up)")
        print_header(
            f"| {'B':>3s} | {'N':>6s} | {'Triton ms':>9s} | {'torchvision ms':>14s} | {'ratio':>6s} | kept agree |"
        )
        for batch, num, candidates, class_ids, requested in cases(args.gpu_batches, "cuda"):
            inputs = (candidates, class_ids, requested)
            fused = timed(
                partial(kernel_ops.box_match, *inputs, CONF, IOU, MAX_DET, TOPK, backend="triton"),
                args.repeats,
                True,
            )
            baseline = timed(partial(torchvision_baseline, *inputs), args.repeats, True)
            got = kernel_ops.box_match(candidates, class_ids, requested, CONF, IOU, MAX_DET, TOPK, backend="triton")
            want = kernel_ops.box_match(candidates, class_ids, requested, CONF, IOU, MAX_DET, TOPK, backend="reference")
            agree = torch.equal(got.keep_indices, want.keep_indices) and torch.equal(got.counts, want.counts)
            print(
                f"| {batch:3d} | {num:6d} | {fused * 1e3:9.3f} | {baseline * 1e3:14.3f} | "
                f"{baseline / fused:5.1f}x | {'yes' if agree else 'NO':>10s} |"
            )
    else:
        print("\nCUDA: not available here; the Triton vs torchvision ratio needs a GPU (rerun this script there).")

    print(f"\nCPU: torch reference box_match (median of {args.repeats}, after warm-up; C = {NUM_CLASSES})")
    print_header(f"| {'B':>3s} | {'N':>6s} | {'kept/image':>10s} | {'ms/batch':>9s} | {'ms/image':>9s} |")
    for batch, num, candidates, class_ids, requested in cases(args.cpu_batches, "cpu"):
        inputs = (candidates, class_ids, requested)
        seconds = timed(
            partial(kernel_ops.box_match, *inputs, CONF, IOU, MAX_DET, TOPK, backend="reference"), args.repeats, False
        )
        kept = kernel_ops.box_match(*inputs, backend="reference").num_kept.double().mean()
        print(f"| {batch:3d} | {num:6d} | {kept:10.1f} | {seconds * 1e3:9.2f} | {seconds / batch * 1e3:9.2f} |")
    print_roofline()


if __name__ == "__main__":
    main()
