"""Benchmark: caption and VQA rewards, ms/image at batch 1 (one score() call per image) vs batch 16 (one call
for 16 images), with tiny random-init BLIP models built on the spot, and with the documented default models
(Salesforce/blip-image-captioning-large, Salesforce/blip-vqa-base) when their weights are in the local cache.

Run: .venv/bin/python benchmarks/caption_vqa.py   (prints a table; offline)"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
import transformers  # noqa: E402
from common import ms_per_image, photos  # noqa: E402
from rewardscope.models.caption import DEFAULT_CAPTIONER, CaptionReward  # noqa: E402
from rewardscope.models.hf import ModelNotFoundError, resolve_model  # noqa: E402
from rewardscope.models.types import Sample  # noqa: E402
from rewardscope.models.vqa import DEFAULT_VQA_MODEL, VqaReward  # noqa: E402

PROMPTS = (
    "four people and a bus",
    "two men with red ties",
    "an astronaut next to a flag",
    "a cat on a sofa",
    "a cup of coffee on a table",
    "a rocket above a launch pad",
)


def samples(count: int) -> list[Sample]:
    images = photos()
    return [Sample(images[i % len(images)], PROMPTS[i % len(PROMPTS)]) for i in range(count)]


def save_base_blip(directory: Path, task: str) -> Path:
    """Random-init BLIP with BLIP-base's architecture (ViT-B/16 at 384 px, 12-layer BERT-base text): real-size
    compute without downloaded weights; the small test vocabulary keeps only the output layer smaller."""
    from tiny_models import blip_processor
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipForQuestionAnswering

    processor = blip_processor(384)
    tokenizer = processor.tokenizer
    config = BlipConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "eos_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    )
    model_class = {"caption": BlipForConditionalGeneration, "vqa": BlipForQuestionAnswering}[task]
    model_class(config).eval().save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="images per measurement (the large batch)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--base", action="store_true", help="also random-init BLIP-base-sized models (slow on CPU)")
    args = parser.parse_args()
    torch.manual_seed(0)
    from tiny_models import save_tiny_blip

    batch = samples(args.images)
    rows = []
    with tempfile.TemporaryDirectory(prefix="rewardscope-bench-") as root:
        tiny_captioner = save_tiny_blip(Path(root) / "tiny-blip-caption", "caption")
        tiny_vqa = save_tiny_blip(Path(root) / "tiny-blip-vqa", "vqa", seed=1)
        setups = [
            ("caption", "tiny BLIP (random init, 32 px)", lambda: CaptionReward(captioner=str(tiny_captioner))),
            ("vqa", "tiny BLIP VQA (random init, 32 px)", lambda: VqaReward(model=str(tiny_vqa))),
        ]
        if args.base:
            base_captioner = save_base_blip(Path(root) / "random-blip-base-caption", "caption")
            base_vqa = save_base_blip(Path(root) / "random-blip-base-vqa", "vqa")
            label = "BLIP-base size (random init, 384 px)"
            setups += [
                ("caption", label, lambda: CaptionReward(captioner=str(base_captioner))),
                ("vqa", label, lambda: VqaReward(model=str(base_vqa))),
            ]
        notes = []
        for name, model, build in (
            ("caption", DEFAULT_CAPTIONER, lambda: CaptionReward()),
            ("vqa", DEFAULT_VQA_MODEL, lambda: VqaReward()),
        ):
            try:
                resolve_model(model)
            except ModelNotFoundError:
                notes.append(f"{name}: default {model} not measured: its weights are not in the local cache")
                continue
            setups.append((name, model, build))
        for name, model, build in setups:
            reward = build()
            one = ms_per_image(reward, batch, 1, args.repeats)
            many = ms_per_image(reward, batch, len(batch), args.repeats)
            rows.append((name, model, one, many))

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, device {'cuda' if torch.cuda.is_available() else 'cpu'}"
    )
    print(
        f"inputs: {args.images} images (bus, zidane, skimage astronaut/chelsea/coffee/rocket, cycled), "
        f"median of {args.repeats} runs after one warm-up\n"
    )
    print(f"| reward | model | batch 1 ms/image | batch {args.images} ms/image | speed-up |")
    print("|---|---|---|---|---|")
    for name, model, one, many in rows:
        print(f"| {name} | {model} | {one:.2f} | {many:.2f} | {one / many:.2f}x |")
    for note in notes:
        print(f"\n- {note}")


if __name__ == "__main__":
    main()
