"""Tiny random-init Hugging Face models saved to directories, loaded by the rewards exactly like real ones:
a BLIP captioner, a BLIP VQA model and a GPT-2 causal LM, over a small English word vocabulary (offline)."""

from __future__ import annotations

from pathlib import Path

import torch

# Enough words for captions, the generated questions and the plausibility template to tokenize into known ids.
WORDS = """
a an the of on in at and with by to from is are was there this that it its image picture photo show shows does
do would appear answer question yes no what which how many one two three four five six seven eight nine ten
left right above below next top bottom front behind near under over beside between inside outside middle
dog dogs cat cats person people man men woman women child bus car cars truck train bicycle motorcycle airplane
boat bird horse sheep cow elephant bear zebra giraffe apple apples banana orange pizza cake cup bottle chair
couch bed table tv laptop clock vase book umbrella tie ball kite bench street road grass field sky water snow
beach city room kitchen park tree trees building house wall window door floor plate food sign light
red orange yellow green blue purple pink brown black white gray large small big little old young standing
sitting running walking playing riding eating holding looking lying flying parked open closed empty full
puppy lawn sports highway
""".split()
PUNCTUATION = [":", "?", ",", ".", "!", "'", "-"]


def vocabulary() -> list[str]:
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS + PUNCTUATION)]


def save_model(directory: Path, model_class, config, preprocessor, seed: int) -> Path:
    """Seeds torch, builds `model_class(config)` in eval mode and saves it with its tokenizer or processor."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    preprocessor.save_pretrained(directory)
    return directory


def blip_processor(image_size: int):
    """BERT word-piece tokenizer (with BLIP's [DEC] start token) and a BLIP image processor."""
    from transformers import BertTokenizer, BlipImageProcessor, BlipProcessor

    tokenizer = BertTokenizer(vocab={word: index for index, word in enumerate(vocabulary())}, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def save_tiny_blip(directory: Path, task: str, image_size: int = 32, hidden: int = 32, seed: int = 0) -> Path:
    """task "caption" (BlipForConditionalGeneration) or "vqa" (BlipForQuestionAnswering) -> saved directory."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipForQuestionAnswering

    processor = blip_processor(image_size)
    tokenizer = processor.tokenizer
    # A wide initialisation so that random-init answers differ from question to question and image to image.
    layers = {"num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 2 * hidden}
    layers["initializer_range"] = 0.3
    config = BlipConfig(
        vision_config={"hidden_size": hidden, "image_size": image_size, "patch_size": 8, **layers},
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "encoder_hidden_size": hidden,
            "max_position_embeddings": 128,
            "bos_token_id": tokenizer.bos_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "eos_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **layers,
        },
        projection_dim=hidden,
        image_text_hidden_size=hidden,
        initializer_range=0.3,
    )
    model_class = {"caption": BlipForConditionalGeneration, "vqa": BlipForQuestionAnswering}[task]
    return save_model(directory, model_class, config, processor, seed)


def word_tokenizer():
    """A word-level tokenizer (lower-cased, split on whitespace and punctuation) in which " yes" and " no" are
    single tokens, with "</s>" as end of text."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [*vocabulary(), "</s>"]
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>", bos_token="</s>"
    )


def save_tiny_causal_lm(directory: Path, hidden: int = 32, seed: int = 0, positions: int = 128) -> Path:
    """GPT-2 with 2 layers over the word-level tokenizer; `positions` tokens of context (the VQA question writer's
    few-shot prompt needs 512)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = word_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=positions,
        n_embd=hidden,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.3,
    )
    return save_model(directory, GPT2LMHeadModel, config, tokenizer, seed)


def save_tiny_blip2(directory: Path, image_size: int = 32, hidden: int = 32, seed: int = 0) -> Path:
    """BLIP-2 (ViT, Q-Former with 4 queries, 1-layer OPT) over the word-level tokenizer: an image-text-to-text
    model for the generic captioning and question-answering paths."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor, OPTConfig

    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=word_tokenizer(), num_query_tokens=4)
    tokenizer = processor.tokenizer  # now with the "<image>" placeholder token
    layers = {"num_hidden_layers": 1, "num_attention_heads": 2, "initializer_range": 0.3}
    text_config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        word_embed_proj_dim=hidden,
        ffn_dim=2 * hidden,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **layers,
    )
    config = Blip2Config(
        vision_config={
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "image_size": image_size,
            "patch_size": 8,
            **layers,
        },
        qformer_config={
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "encoder_hidden_size": hidden,
            "vocab_size": len(tokenizer),
            **layers,
        },
        text_config=text_config.to_dict(),
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        initializer_range=0.3,
    )
    return save_model(directory, Blip2ForConditionalGeneration, config, processor, seed)


def save_all(root: Path) -> dict[str, Path]:
    """The three tiny models under `root`: {"captioner", "vqa", "language_model"} -> directory."""
    return {
        "captioner": save_tiny_blip(root / "tiny-blip-caption", "caption"),
        "vqa": save_tiny_blip(root / "tiny-blip-vqa", "vqa", seed=1),
        "language_model": save_tiny_causal_lm(root / "tiny-gpt2", seed=2),
    }
