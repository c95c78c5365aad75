"""Benchmark: images/s of each preference reward through the Scorer at batch 1 and 32, and what sharing one CLIP
backbone saves when clip, aesthetic and pickscore run together (one image forward instead of three).

Models: tiny random-init CLIPs (the test fixtures) and, with --base, a random-init CLIP ViT-B/32-sized model (the
real architecture's compute; weights do not change speed). Real checkpoints are used where the local Hugging Face
cache has them (openai/clip-vit-large-patch14, yuvalkirstain/PickScore_v1); hpsv2 / imagereward where installed.

Run: .venv/bin/python benchmarks/preference.py [--base] [--repeats 5]"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from common import photos, timed  # noqa: E402
from PIL import Image  # noqa: E402
from rewardscope.models.clip import load_clip  # noqa: E402
from rewardscope.models.feedback import TrainConfig, train_feedback_reward  # noqa: E402
from rewardscope.models.hf import ModelNotFoundError, resolve_model  # noqa: E402
from rewardscope.models.preference import MissingExtraError  # noqa: E402
from tiny_clip import make_aesthetic_head, make_labelled_set, make_tiny_clip  # noqa: E402

from rewardscope import Scorer  # noqa: E402


def throughput(scorer: Scorer, images: list[Image.Image], batch: int, repeats: int) -> float:
    """Images per second scoring `batch` images per Scorer call (decoding of PIL inputs included)."""
    chunk = [images[i % len(images)] for i in range(batch)]
    prompts = ["a photo of a bus on a street"] * batch
    results = scorer.score(chunk, prompts)
    failed = [r.error for r in results if r.error]
    if failed:
        raise RuntimeError(failed[0])
    return batch / timed(lambda: scorer.score(chunk, prompts), repeats)


def cached(model: str) -> bool:
    try:
        resolve_model(model)
        return True
    except ModelNotFoundError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--base", action="store_true", help="also a random-init ViT-B/32-sized CLIP (slower)")
    args = parser.parse_args()
    torch.manual_seed(0)
    images = photos()
    work = Path(tempfile.mkdtemp(prefix="rewardscope-bench-"))
    models = {"tiny (random init, 1 layer, 32 px)": make_tiny_clip(work / "tiny")}
    if args.base:
        models["ViT-B/32-sized (random init, 224 px)"] = make_tiny_clip(
            work / "base", projection_dim=768, image_size=224, patch_size=32, hidden=768, layers=12, heads=12
        )
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(f"# device: {'cuda' if torch.cuda.is_available() else 'cpu'} (fp16 on CUDA, fp32 on CPU)\n")
    print("| model | reward | images/s batch 1 | images/s batch 32 | ratio |")
    print("|---|---|---|---|---|")
    sharing_rows = []
    for label, directory in models.items():
        head = make_aesthetic_head(work / f"{directory.name}-aesthetic.safetensors", 768)
        make_labelled_set(work / f"{directory.name}-labels", images=24, seed=0)
        feedback = work / f"{directory.name}-feedback"
        config = TrainConfig(clip_model=str(directory), epochs=5)
        train_feedback_reward(work / f"{directory.name}-labels" / "labels.jsonl", feedback, config, False)
        configs = {
            "clip": {"model": str(directory)},
            "aesthetic": {"model": str(directory), "head": str(head)},
            "pickscore": {"model": str(directory), "processor": str(directory)},
            f"feedback:{feedback}": {},
        }
        for name, reward_config in configs.items():
            scorer = Scorer([name], config={name: reward_config})
            one = throughput(scorer, images, 1, args.repeats)
            many = throughput(scorer, images, 32, args.repeats)
            shown = "feedback" if name.startswith("feedback") else name
            print(f"| {label} | {shown} | {one:.1f} | {many:.1f} | {many / one:.2f}x |")
        # Sharing: the three CLIP rewards on one backbone vs on three copies of the same weights.
        copies = {}
        for reward in ("clip", "aesthetic", "pickscore"):
            copy = work / f"{directory.name}-{reward}"
            shutil.copytree(directory, copy)
            copies[reward] = {**configs[reward], "model": str(copy)}
            if reward == "pickscore":
                copies[reward]["processor"] = str(copy)
        shared = Scorer(["clip", "aesthetic", "pickscore"], config={k: configs[k] for k in copies})
        separate = Scorer(["clip", "aesthetic", "pickscore"], config=copies)
        backbones = {id(r.backbone): r.backbone for r in separate.rewards.values()}
        shared_backbone = load_clip(str(directory))
        before_shared = shared_backbone.image_forwards
        before_separate = sum(b.image_forwards for b in backbones.values())
        shared_rate = throughput(shared, images, 32, args.repeats)
        separate_rate = throughput(separate, images, 32, args.repeats)
        calls = args.repeats + 2  # check call + warm-up + repeats
        sharing_rows.append(
            (
                label,
                (shared_backbone.image_forwards - before_shared) / (32 * calls),
                (sum(b.image_forwards for b in backbones.values()) - before_separate) / (32 * calls),
                1000 / shared_rate,
                1000 / separate_rate,
            )
        )
    print("\nclip + aesthetic + pickscore in one Scorer call, batch 32:\n")
    print("| model | forwards/image shared | forwards/image separate | ms/image shared | ms/image separate | saved |")
    print("|---|---|---|---|---|---|")
    for label, fwd_shared, fwd_separate, ms_shared, ms_separate in sharing_rows:
        saved = 1 - ms_shared / ms_separate
        print(
            f"| {label} | {fwd_shared:.0f} | {fwd_separate:.0f} | {ms_shared:.2f} | {ms_separate:.2f} | {saved:.0%} |"
        )
    print("\nreal checkpoints and optional packages:")
    for model in ("openai/clip-vit-large-patch14", "yuvalkirstain/PickScore_v1"):
        print(f"- {model}: {'in the local HF cache' if cached(model) else 'not in the local HF cache: not measured'}")
    for reward in ("hpsv2", "imagereward"):
        try:
            Scorer([reward])
            print(f"- {reward}: installed, with weights (run it here to measure)")
        except MissingExtraError as exc:
            print(f"- {reward}: {exc}")
        except (ModelNotFoundError, OSError) as exc:
            print(f"- {reward}: installed, weights missing: {exc}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
