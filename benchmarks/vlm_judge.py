"""Benchmark: vlm_judge CPU ms/image (4 aspects per image: 4 rows of next-token logits) at base size, batch 1 vs 4
images per score() call, on real photos. The models are random-init with real architectures, saved and loaded
through the real loader (models/hf.py); weights are random, so only the cost is meaningful.

- SmolVLM-256M-Instruct's architecture (Idefics3): SmolLM2-135M text model (hidden 576, 30 layers, 9 heads / 3 KV
  heads, MLP 1536, vocabulary 49280, untied output layer), SigLIP-B/16 vision tower at 512 px (768 wide, 12 layers),
  pixel shuffle 4 (64 tokens per 512 px tile). Image splitting off by default (one 512 px tile per image);
  --splitting turns it on with the sizes SmolVLM-256M-Instruct's processor config sets (as we know them; not
  checked offline): long side resized to 2048, tiles of 512 plus the global image (13 tiles for bus.jpg).
- --qwen2-vl-2b: Qwen2-VL-2B-Instruct's architecture (Qwen2-1.5B text model: hidden 1536, 28 layers, 12 heads / 2 KV
  heads, MLP 8960, vocabulary 151936; 32-block ViT 1280 wide, patch 14, 2x2 merge), images capped at 448 x 448
  pixels (256 image tokens). 2.2 billion parameters: 8.8 GB in fp32, so not saved: the in-memory model replaces the
  weights of a judge loaded from a tiny Qwen2-VL directory with the same processor, and runs through the same reward
  class.

The tokenizer is the tests' word-level one (tests/tiny_vlm.py), so the prompts' text token counts are close to, not
equal to, the real BPE tokenizers'; the image tokens, which dominate, are exact. Every row runs the vision tower
on its image: 4 aspects = 4 vision forwards per image.

Run: .venv/bin/python benchmarks/vlm_judge.py [--splitting] [--qwen2-vl-2b]   (prints a Markdown table; offline)"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
import transformers  # noqa: E402
from common import ms_per_image, photos  # noqa: E402
from rewardscope.models.types import Sample  # noqa: E402
from rewardscope.models.vlm_judge import VlmJudgeReward  # noqa: E402

PROMPTS = ("four people and a bus", "two men with red ties", "an astronaut next to a flag", "a cat on a sofa")


def save_smolvlm_256m(directory: Path, image_splitting: bool) -> Path:
    """Random-init Idefics3 with SmolVLM-256M-Instruct's sizes (module docstring), saved with its processor."""
    from tiny_vlm import IDEFICS3_SPECIAL, IDEFICS3_TEMPLATE, chat_tokenizer
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    tokenizer = chat_tokenizer(
        IDEFICS3_SPECIAL, style="byte_level", pad_token="<|im_end|>", eos_token="<end_of_utterance>"
    )
    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": 4 * 512}, max_image_size={"longest_edge": 512}, do_image_splitting=image_splitting
    )
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=64, chat_template=IDEFICS3_TEMPLATE)
    config = Idefics3Config(
        text_config={
            "model_type": "llama",
            "vocab_size": 49280,
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "max_position_embeddings": 8192,
            "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
            "rms_norm_eps": 1e-5,
            "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": False,
        },
        vision_config={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 512,
            "patch_size": 16,
        },
        scale_factor=4,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config).eval()
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


QWEN2_VL_2B_TEXT = {
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
    "tie_word_embeddings": True,
}
QWEN2_VL_2B_VISION = {
    "depth": 32,
    "embed_dim": 1280,
    "hidden_size": 1536,
    "num_heads": 16,
    "mlp_ratio": 4,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}


def qwen2_vl_2b_reward(root: Path, batch_size: int) -> VlmJudgeReward:
    """A reward loaded from a tiny Qwen2-VL directory whose processor caps images at 448 x 448 pixels, with its
    judge's model replaced by a random-init in-memory model of Qwen2-VL-2B-Instruct's sizes (module docstring)."""
    from tiny_vlm import save_tiny_qwen2_vl
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    directory = save_tiny_qwen2_vl(root / "qwen2-vl-processor")
    reward = VlmJudgeReward(
        model=str(directory),
        batch_size=batch_size,
        processor_options={"size": {"shortest_edge": 56 * 56, "longest_edge": 448 * 448}},
    )
    tiny = reward.judge.model.config
    config = Qwen2VLConfig(
        text_config=QWEN2_VL_2B_TEXT,
        vision_config=QWEN2_VL_2B_VISION,
        image_token_id=tiny.image_token_id,
        video_token_id=tiny.video_token_id,
        vision_start_token_id=tiny.vision_start_token_id,
        vision_end_token_id=tiny.vision_end_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    reward.judge.model = Qwen2VLForConditionalGeneration(config).eval()
    reward.judge.context_length = QWEN2_VL_2B_TEXT["max_position_embeddings"]
    return reward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4, help="images per measurement (the large batch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--splitting", action="store_true", help="SmolVLM's image splitting on (13 tiles for bus)")
    parser.add_argument("--qwen2-vl-2b", action="store_true", help="also Qwen2-VL-2B sizes (in memory, slow)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    images = photos()
    batch = [Sample(images[i % len(images)], PROMPTS[i % len(PROMPTS)]) for i in range(args.images)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="rewardscope-bench-") as root:
        started = time.perf_counter()
        directory = save_smolvlm_256m(Path(root) / "random-smolvlm-256m", args.splitting)
        reward = VlmJudgeReward(model=str(directory), batch_size=4 * args.images)
        loaded = time.perf_counter() - started
        splitting = "on" if args.splitting else "off"
        label = f"SmolVLM-256M size (Idefics3, random init, 512 px, splitting {splitting})"
        rows.append((label, *_measure(reward, batch, args.repeats)))
        setups = []
        if args.qwen2_vl_2b:
            setups.append(("Qwen2-VL-2B size (random init, in memory, <= 448 x 448 px)", qwen2_vl_2b_reward))
        for label, build in setups:
            rows.append((label, *_measure(build(Path(root), 4 * args.images), batch, args.repeats)))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, CPU fp32"
    )
    print(
        f"inputs: {args.images} photos (bus, zidane, skimage astronaut, chelsea), 4 aspects each, median of "
        f"{args.repeats} runs after one warm-up; SmolVLM-size save + load {loaded:.1f} s\n"
    )
    print(
        f"| model | input tokens per row | batch 1 image (4 rows a forward) ms/image | batch {args.images} images "
        f"({4 * args.images} rows a forward) ms/image | speed-up |"
    )
    print("|---|---|---|---|---|")
    for label, tokens, one, many in rows:
        print(f"| {label} | {tokens} | {one:.0f} | {many:.0f} | {one / many:.2f}x |")


def _measure(reward: VlmJudgeReward, batch: list[Sample], repeats: int) -> tuple[str, float, float]:
    lengths = [
        reward.judge.input_length(
            sample.image,
            reward.question("faithfulness", sample.prompt),
            reward.scale_tokens.answer_lead,
            reward.processor_options,
        )
        for sample in batch
    ]
    one = ms_per_image(reward, batch, 1, repeats)
    many = ms_per_image(reward, batch, len(batch), repeats)
    return f"{min(lengths)}-{max(lengths)}", one, many


if __name__ == "__main__":
    main()
