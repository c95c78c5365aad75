"""Benchmark: what a reward gradient costs. ms/image of forward-only vs forward+backward at batch 1 and 8 for the
differentiable matching score (embedded YOLOv3-tiny, torch) and CLIPScore (a random-init CLIP ViT-B/32-sized
model: the real architecture's compute), in process; then /grad over HTTP against a real server, and the request
and response bytes per image (float16 and float32 pixels in, scaled float16 gradient out).

Run: .venv/bin/python benchmarks/gradients.py [--size 512] [--repeats 3] [--no-server]"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import photos, timed  # noqa: E402
from rewardscope.models.gradients import gradient_reward, reward_gradients  # noqa: E402
from tiny_clip import make_tiny_clip  # noqa: E402

from rewardscope import Scorer  # noqa: E402


def pixel_batch(size: int, batch: int) -> torch.Tensor:
    """`batch` real photos resized to size x size, as [B, 3, size, size] float32 in [0, 1]."""
    images = photos()
    chosen = [images[i % len(images)].resize((size, size)) for i in range(batch)]
    return torch.from_numpy(np.stack([np.asarray(image) for image in chosen])).permute(0, 3, 1, 2).float() / 255


def in_process(rewards: dict, size: int, repeats: int) -> list[tuple[str, int, float, float]]:
    rows = []
    for name, reward in rewards.items():
        for batch in (1, 8):
            pixels = pixel_batch(size, batch)
            prompts = ["four people and a bus"] * batch

            def forward(reward=reward, pixels=pixels, prompts=prompts) -> None:
                with torch.no_grad():
                    reward(pixels, prompts)

            def backward(name=name, reward=reward, pixels=pixels, prompts=prompts) -> None:
                reward_gradients({name: reward}, {name: 1.0}, pixels, prompts)

            rows.append((name, batch, timed(forward, repeats) / batch * 1e3, timed(backward, repeats) / batch * 1e3))
    return rows


def npy_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode()


def over_http(size: int, repeats: int, clip_dir: Path) -> list[tuple[str, int, float, int, int]]:
    import httpx
    from serving import running_server

    env = {"REWARDSCOPE_REWARDS": "matching,clip", "REWARDSCOPE_CONFIG": json.dumps({"clip": {"model": str(clip_dir)}})}
    rows = []
    with running_server(env) as base_url, httpx.Client(base_url=base_url, timeout=300) as client:
        for dtype in ("float16", "float32"):
            for batch in (1, 8):
                pixels = pixel_batch(size, batch).numpy().astype(dtype)
                body = json.dumps(
                    {"items": [{"array": npy_b64(p), "prompt": "four people", "rewards": ["matching"]} for p in pixels]}
                ).encode()
                answer: list[httpx.Response] = []

                def call(body=body, answer=answer) -> None:
                    response = client.post("/grad", content=body, headers={"content-type": "application/json"})
                    response.raise_for_status()
                    answer[:] = [response]

                seconds = timed(call, repeats)
                rows.append((dtype, batch, seconds / batch * 1e3, len(body) // batch, len(answer[0].content) // batch))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (generator-like)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-server", action="store_true", help="skip the HTTP part")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="rewardscope-bench-grad-") as work:  # a 0.7 GB model: never left behind
        run(args, Path(work))


def run(args: argparse.Namespace, work: Path) -> None:
    clip_dir = make_tiny_clip(
        work / "base", projection_dim=768, image_size=224, patch_size=32, hidden=768, layers=12, heads=12
    )
    scorer = Scorer(["matching", "clip"], config={"clip": {"model": str(clip_dir)}})
    rewards = {name: gradient_reward(name, reward) for name, reward in scorer.rewards.items()}
    threads = torch.get_num_threads()
    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {threads}")
    print(f"# images {args.size}x{args.size} (real photos resized), median of {args.repeats}\n")
    print("| reward | batch | forward ms/image | forward+backward ms/image | ratio |")
    print("|---|---|---|---|---|")
    for name, batch, forward, backward in in_process(rewards, args.size, args.repeats):
        print(f"| {name} | {batch} | {forward:.1f} | {backward:.1f} | {backward / forward:.2f} |")
    if args.no_server:
        return
    print("\n/grad over HTTP (matching), whole request:\n")
    print("| pixels in | batch | ms/image | request bytes/image | response bytes/image |")
    print("|---|---|---|---|---|")
    for dtype, batch, ms, request, response in over_http(args.size, args.repeats, clip_dir):
        print(f"| {dtype} | {batch} | {ms:.1f} | {request:,} | {response:,} |")


if __name__ == "__main__":
    main()
