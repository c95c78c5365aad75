"""Tiny random-init CLIP models saved with save_pretrained, and a synthetic labelled set, for offline tests and
benchmarks. The tokenizer is a real CLIPTokenizer over a byte-level vocabulary with no merges (a token a character)."""

from __future__ import annotations

import atexit
import functools
import json
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_tiny_clip(
    directory: Path,
    seed: int = 0,
    projection_dim: int = 768,
    image_size: int = 32,
    patch_size: int = 8,
    hidden: int = 32,
    layers: int = 1,
    heads: int = 2,
) -> Path:
    """A random-init CLIPModel (default: 1 layer per tower, hidden 32, patch 8) plus CLIPProcessor, written to
    `directory`. Bigger settings give a real architecture's compute (benchmarks) with random weights."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    characters = sorted(ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(characters + [c + "</w>" for c in characters])}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tower = {"hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers}
    tower["num_attention_heads"] = heads
    config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": len(vocab),
            "max_position_embeddings": 77,
            "bos_token_id": vocab["<|startoftext|>"],
            "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"],
        },
        vision_config={**tower, "image_size": image_size, "patch_size": patch_size},
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer,
    )
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def make_aesthetic_head(path: Path, input_size: int, seed: int = 0) -> Path:
    """Random weights for the LAION aesthetic MLP, as safetensors or (suffix .pth) a torch state dict."""
    from rewardscope.models.preference import AestheticMLP
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    state = {key: value.contiguous() for key, value in AestheticMLP(input_size).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


@functools.cache
def shared_tiny_clip(seed: int = 0) -> Path:
    """One tiny CLIP directory per test process (768-d embeddings, like ViT-L/14's, so the aesthetic MLP fits)."""
    directory = tempfile.mkdtemp(prefix="rewardscope-tiny-clip-")
    atexit.register(shutil.rmtree, directory, True)
    return make_tiny_clip(Path(directory), seed=seed)


COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 220, 40)}
OBJECTS = ("dog", "cup", "car", "chair")


def make_labelled_set(root, images: int, seed: int) -> list[dict]:
    """Noisy images of one dominant colour (with a grey patch); per image one matching prompt (label 1) and
    one naming another colour (label 0). Written as labels.jsonl with paths relative to it."""
    rng, pick = np.random.default_rng(seed), random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(images):
        color = list(COLORS)[index % len(COLORS)]
        size = int(rng.integers(32, 72))
        pixels = np.array(COLORS[color], dtype=float) + rng.normal(0, 25, (size, size, 3))
        x, y, w = rng.integers(0, size // 2, 3)
        pixels[y : y + w // 2 + 4, x : x + w // 2 + 4] = rng.integers(60, 200)
        name = f"{seed}-{index:04d}.png"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name)
        other = pick.choice([c for c in COLORS if c != color])
        rows.append({"image": name, "prompt": f"a photo of a {color} {pick.choice(OBJECTS)}", "label": 1})
        rows.append({"image": name, "prompt": f"a photo of a {other} {pick.choice(OBJECTS)}", "label": 0})
    (root / "labels.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows
