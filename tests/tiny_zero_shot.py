"""Tiny random-init open-vocabulary detectors (OWL-ViT, OWLv2, Grounding DINO, MM Grounding DINO) saved with
save_pretrained, model and processor, so tests load them through the real loader exactly like hub checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Query words the tests use, on top of tiny_models' vocabulary: every one a single token in both tokenizers below.
QUERY_WORDS = """
peach candle person people bus dog cat tie ball chair bicycle horse car umbrella window photo hat glove
""".split()
CLIP_EXTRA = ["!", ".", ",", "'", "-", "?"]
# Grounding DINO's model masks its text self-attention at BERT-base-uncased ids (SPECIAL_TOKENS in
# transformers/models/grounding_dino/modeling_grounding_dino.py): [CLS] 101, [SEP] 102, "." 1012, "?" 1029. The
# tiny vocabulary keeps those ids, so phrases are delimited in the model as in the real one.
BERT_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}


def _words() -> list[str]:
    from tiny_models import WORDS

    return list(dict.fromkeys([*WORDS, *QUERY_WORDS]))


def clip_tokenizer(max_length: int = 16):
    """A CLIPTokenizer (BPE with "</w>" word ends, as OWL-ViT/OWLv2 checkpoints ship) whose merges are learnt from
    `_words()` by tokenizers' BPE trainer until every word is one token. "!" is id 0: real OWL checkpoints pad with "!"
    (id 0), and the OWL models treat a query whose first token is 0 as padding. The end-of-text token has the
    highest id: the text tower pools at argmax(input_ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    learner = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    learner.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=10_000,  # more than the words need: merging goes on until every word is whole
        min_frequency=1,
        end_of_word_suffix="</w>",
        continuing_subword_prefix="",
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyz0123456789"),
        show_progress=False,
    )
    learner.train_from_iterator([_words()], trainer=trainer)
    learnt = json.loads(learner.to_str())["model"]
    tokens = [token for token, _ in sorted(learnt["vocab"].items(), key=lambda item: item[1])]
    marks = [mark + end for mark in CLIP_EXTRA for end in ("", "</w>")]  # "!" first: id 0
    vocab = {token: index for index, token in enumerate(dict.fromkeys([*marks, *tokens]))}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in learnt["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=max_length)


def bert_tokenizer():
    """A BertTokenizer (word piece, lower case) over `_words()` with BERT-base-uncased's special-token ids."""
    from transformers import BertTokenizer

    by_id = {index: token for token, index in BERT_IDS.items()}
    words = iter(word for word in _words() if word not in BERT_IDS)
    size = max(BERT_IDS.values()) + 1 + 32
    vocab: dict[str, int] = {}
    for index in range(size):
        token = by_id.get(index) or next(words, None) or f"[unused{index}]"
        vocab[token] = index
    for word in words:  # more words than free ids: append
        vocab[word] = len(vocab)
    for mark in (",", "!", "'", "-", ":"):
        vocab.setdefault(mark, len(vocab))
    return BertTokenizer(vocab=vocab, do_lower_case=True)


def _save(directory: Path, model, processor, spread: tuple[str, ...] = ()) -> Path:
    """Draws the parameters named in `spread` from N(0, 0.5) and saves the model with its processor."""
    with torch.no_grad():
        for name in spread:
            model.get_parameter(name).normal_(std=0.5)
    directory.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def owl_heads_like_trained(model) -> None:
    """The OWL heads' linear layers are drawn from N(0, 1) by transformers' generic init (initializer_factor 1): every
    logit and box saturates (scores 0 or 1, boxes the whole image). Redrawn at 1 / sqrt(fan-in), with the boxes' last
    layer smaller and the logit scale lifted (elu(.) + 1 = 3), the scores spread over (0, 1) and the boxes stay near
    their patches, as a trained model's do."""
    with torch.no_grad():
        for head in (model.class_head, model.box_head):
            for layer in head.modules():
                if isinstance(layer, torch.nn.Linear):
                    layer.weight.normal_(std=layer.in_features**-0.5)
        model.box_head.dense2.weight.mul_(0.3)
        model.class_head.logit_scale.bias.fill_(2.0)


def _owl_towers(tokenizer, image_size: int, hidden: int) -> tuple[dict, dict]:
    layers = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 1}
    layers["num_attention_heads"] = 2
    text = {
        **layers,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": tokenizer.model_max_length,
        "pad_token_id": 0,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    vision = {**layers, "image_size": image_size, "patch_size": 16}
    return text, vision


def save_tiny_owlvit(directory: Path, seed: int = 0, image_size: int = 96, hidden: int = 32) -> Path:
    """OWL-ViT (CLIP towers, one box per patch: (96 / 16)^2 = 36 boxes), 1 layer per tower, hidden 32. The processor
    resizes to image_size x image_size (aspect not kept), as OwlViTImageProcessor does at 768."""
    from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor

    tokenizer = clip_tokenizer()
    text, vision = _owl_towers(tokenizer, image_size, hidden)
    # projection_dim = text hidden size: the class head compares image embeddings (projected to the text width)
    # with the projected text embeddings.
    config = OwlViTConfig(text_config=text, vision_config=vision, projection_dim=hidden)
    torch.manual_seed(seed)
    model = OwlViTForObjectDetection(config)
    owl_heads_like_trained(model)
    square = {"height": image_size, "width": image_size}
    image_processor = OwlViTImageProcessor(size=square, crop_size=square)
    processor = OwlViTProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return _save(directory, model, processor)


def save_tiny_owlv2(directory: Path, seed: int = 0, image_size: int = 96, hidden: int = 32) -> Path:
    """OWLv2 (as OWL-ViT plus an objectness head; its processor pads each image to a square before resizing)."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    tokenizer = clip_tokenizer()
    text, vision = _owl_towers(tokenizer, image_size, hidden)
    config = Owlv2Config(text_config=text, vision_config=vision, projection_dim=hidden)
    torch.manual_seed(seed)
    model = Owlv2ForObjectDetection(config)
    owl_heads_like_trained(model)
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": image_size, "width": image_size}), tokenizer=tokenizer
    )
    return _save(directory, model, processor)


def _grounding_dino_config(config_class, tokenizer, num_queries: int, hidden: int):
    from transformers import BertConfig, ResNetConfig

    backbone = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], out_features=["stage2", "stage3", "stage4"]
    )
    text = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    return config_class(
        backbone_config=backbone,
        use_pretrained_backbone=False,
        use_timm_backbone=False,
        text_config=text,
        d_model=hidden,
        num_queries=num_queries,
        encoder_layers=1,
        # 2 decoder layers: transformers ties decoder layer 0's box head to the later layers' and fails on 1 layer
        decoder_layers=2,
        encoder_ffn_dim=2 * hidden,
        decoder_ffn_dim=2 * hidden,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=64,
        init_std=0.2,
    )


def save_tiny_grounding_dino(directory: Path, seed: int = 0, num_queries: int = 12, hidden: int = 32) -> Path:
    """Grounding DINO on a tiny transformers ResNet (no timm, nothing pretrained) and a 1-layer BERT, 12 queries,
    1 encoder and 2 decoder layers; the processor resizes to shortest edge 64, longest 96."""
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

    return _save_grounding(directory, GroundingDinoConfig, GroundingDinoForObjectDetection, seed, num_queries, hidden)


def save_tiny_mm_grounding_dino(directory: Path, seed: int = 0, num_queries: int = 12, hidden: int = 32) -> Path:
    """MM Grounding DINO (the same processor and outputs; its contrastive head is scaled and biased), tiny as above."""
    from transformers import MMGroundingDinoConfig, MMGroundingDinoForObjectDetection

    return _save_grounding(
        directory, MMGroundingDinoConfig, MMGroundingDinoForObjectDetection, seed, num_queries, hidden
    )


def _save_grounding(directory: Path, config_class, model_class, seed: int, num_queries: int, hidden: int) -> Path:
    from transformers import GroundingDinoImageProcessor, GroundingDinoProcessor

    tokenizer = bert_tokenizer()
    config = _grounding_dino_config(config_class, tokenizer, num_queries, hidden)
    torch.manual_seed(seed)
    model = model_class(config)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    processor = GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return _save(directory, model, processor)


SAVERS = {
    "owlvit": save_tiny_owlvit,
    "owlv2": save_tiny_owlv2,
    "grounding-dino": save_tiny_grounding_dino,
    "mm-grounding-dino": save_tiny_mm_grounding_dino,
}
