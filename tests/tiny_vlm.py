"""Tiny random-init image-text-to-text models of three families (Qwen2-VL, Idefics3 / SmolVLM, LLaVA) saved to
directories with their processors, tokenizers and chat templates, loaded by vlm_judge exactly like real ones."""

from __future__ import annotations

import re
from pathlib import Path

from tiny_models import save_model

# Enough words for the judge's prompts (all versions) and the test prompts to tokenize into known ids.
BASE_WORDS = """
a an the of on in at and with by to from is are was it its this that image picture photo prompt generated rate
how well one single number answer user assistant system you helpful dog cat bus man men woman people person
street road red blue green yellow white black standing playing ball park two three
""".split()
DIGITS = [str(digit) for digit in range(10)]
PUNCTUATION = [":", "?", ",", ".", "!", "'", '"', "-", "(", ")", ";", "/", "):", ").", '".', '":']


def _prompt_words() -> list[str]:
    from rewardscope.models.vlm_judge import PROMPTS

    text = " ".join(template for version in PROMPTS.values() for template in version.values())
    return sorted({word.lower() for word in re.findall(r"[A-Za-z]+", text)})


def words() -> list[str]:
    return list(dict.fromkeys([*BASE_WORDS, *_prompt_words()]))


def chat_tokenizer(special_tokens: list[str], style: str, pad_token: str, eos_token: str, digits: bool = True):
    """A word-level tokenizer over words(), digits and punctuation, lower-cased, with `special_tokens` as added
    special tokens, splitting text the way a real family's tokenizer does around a rating:
    - "byte_level" (SmolLM2, Qwen2): digits one by one, then GPT-2 byte-level words: " 7" is "Ġ" + "7", "\\n" is "Ċ";
    - "metaspace" (Llama's sentencepiece, LLaVA-1.5): spaces become "▁" word prefixes, digits and punctuation split
      off: " 7" is "▁" + "7", and decoding a lone "▁" gives "" (sentencepiece drops a leading space).
    digits=False leaves the digits out of the vocabulary (they become the unknown token)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    plain = [*words(), *(DIGITS if digits else ()), *PUNCTUATION]
    prefix = {"byte_level": "Ġ", "metaspace": "▁"}[style]
    spaces = ["Ġ", "Ċ", "ĊĊ", "ĠĠ"] if style == "byte_level" else ["▁", "\n"]
    vocabulary = ["[UNK]", *spaces, *plain, *(f"{prefix}{word}" for word in plain if word not in DIGITS)]
    backend = Tokenizer(models.WordLevel({token: index for index, token in enumerate(vocabulary)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    if style == "byte_level":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        backend.decoder = decoders.ByteLevel()
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split("\n", behavior="isolated"),
                pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.Punctuation(behavior="isolated"),
            ]
        )
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special_tokens])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token=pad_token,
        eos_token=eos_token,
        extra_special_tokens=[token for token in special_tokens if token not in (pad_token, eos_token)],
    )


def _llama_text(tokenizer, hidden: int, layers: int = 2) -> dict:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "initializer_range": 0.3,
    }


# Qwen2-VL-Instruct's template, trimmed to images and text (its default system message kept).
QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2_VL_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def _save_tiny_qwen(directory: Path, seed: int, hidden: int, version: str) -> Path:
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    if version == "2":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model
        from transformers import Qwen2VLProcessor as Processor

        vision = {"embed_dim": hidden, "hidden_size": hidden, "mlp_ratio": 2}
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
        from transformers import Qwen2_5_VLProcessor as Processor

        # Windowed attention over 56 px windows in the first block, full attention in the second.
        vision = {
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "out_hidden_size": hidden,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        }
    tokenizer = chat_tokenizer(QWEN2_VL_SPECIAL, style="byte_level", pad_token="<|endoftext|>", eos_token="<|im_end|>")
    pixels = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}
    processor = Processor(
        Qwen2VLImageProcessor(**pixels), tokenizer, Qwen2VLVideoProcessor(**pixels), chat_template=QWEN2_VL_TEMPLATE
    )
    token = tokenizer.convert_tokens_to_ids
    text = _llama_text(tokenizer, hidden)
    text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0}
    config = Config(
        text_config=text,
        vision_config={
            **vision,
            "depth": 1 if version == "2" else 2,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "initializer_range": 0.3,
        },
        image_token_id=token("<|image_pad|>"),
        video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"),
        vision_end_token_id=token("<|vision_end|>"),
    )
    return save_model(directory, Model, config, processor, seed)


def save_tiny_qwen2_vl(directory: Path, seed: int = 0, hidden: int = 32) -> Path:
    """Qwen2-VL: 2-layer Qwen2 text model (M-RoPE), 1-block ViT (patch 14, 2x2 merge); images resized to 56-112
    px a side (4 to 16 image tokens)."""
    return _save_tiny_qwen(directory, seed, hidden, "2")


def save_tiny_qwen2_5_vl(directory: Path, seed: int = 0, hidden: int = 32) -> Path:
    """Qwen2.5-VL: as save_tiny_qwen2_vl, with Qwen2.5-VL's 2-block windowed ViT (SwiGLU, RMSNorm)."""
    return _save_tiny_qwen(directory, seed, hidden, "2.5")


# SmolVLM-Instruct's template: "User:<image>{text}<end_of_utterance>\nAssistant:" after "<|im_start|>".
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IDEFICS3_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    *(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)),
]


def save_tiny_idefics3(directory: Path, seed: int = 0, hidden: int = 32, image_splitting: bool = True) -> Path:
    """Idefics3 (the SmolVLM family): 2-layer Llama text model, 1-layer SigLIP-style vision tower on 32 px tiles
    (patch 8, pixel shuffle 2: 4 tokens a tile); images resized to 64 px on the long side and split into up to
    2x2 tiles plus the global image."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    tokenizer = chat_tokenizer(
        IDEFICS3_SPECIAL, style="byte_level", pad_token="<|im_end|>", eos_token="<end_of_utterance>"
    )
    tile, patch, scale_factor = 32, 8, 2
    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": 2 * tile},
        max_image_size={"longest_edge": tile},
        do_image_splitting=image_splitting,
    )
    image_seq_len = (tile // patch) ** 2 // scale_factor**2
    processor = Idefics3Processor(
        image_processor, tokenizer, image_seq_len=image_seq_len, chat_template=IDEFICS3_TEMPLATE
    )
    config = Idefics3Config(
        text_config={"model_type": "llama", **_llama_text(tokenizer, hidden)},
        vision_config={
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": tile,
            "patch_size": patch,
            "initializer_range": 0.3,
        },
        scale_factor=scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    return save_model(directory, Idefics3ForConditionalGeneration, config, processor, seed)


# llava-hf/llava-1.5's template: "USER: <image>\n{text} ASSISTANT:".
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ item['text'] + ' ' }}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def save_tiny_llava(directory: Path, seed: int = 0, hidden: int = 32, digits: bool = True) -> Path:
    """LLaVA: 2-layer Llama text model, 1-layer CLIP vision tower on 32 px crops (patch 8: 16 image tokens, CLS
    dropped), over a Llama-style (sentencepiece metaspace) tokenizer; digits=False: no digit tokens."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    special = ["<s>", "</s>", "<pad>", "<image>"]
    tokenizer = chat_tokenizer(special, style="metaspace", pad_token="<pad>", eos_token="</s>", digits=digits)
    size, patch = 32, 8
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaProcessor(
        image_processor,
        tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_TEMPLATE,
        num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        text_config={"model_type": "llama", **_llama_text(tokenizer, hidden)},
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": size,
            "patch_size": patch,
            "projection_dim": hidden,
            "initializer_range": 0.3,
        },
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(size // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        pad_token_id=tokenizer.pad_token_id,
    )
    return save_model(directory, LlavaForConditionalGeneration, config, processor, seed)


FAMILIES = {
    "qwen2_vl": save_tiny_qwen2_vl,
    "qwen2_5_vl": save_tiny_qwen2_5_vl,
    "idefics3": save_tiny_idefics3,
    "llava": save_tiny_llava,
}
