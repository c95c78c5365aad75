"""A reward model trained on binary human labels of image-text alignment (Lee et al. 2023): frozen CLIP image and
prompt embeddings -> MLP head, binary cross-entropy plus an optional prompt-classification loss; train, save, load."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .clip import DEFAULT_CLIP, load_clip
from .combine import average_ranks
from .hf import ModelNotFoundError, file_sha256
from .prompt import COCO_CLASSES, COLORS, parse_prompt
from .registry import RewardDeclaration, register_reward
from .types import RewardOutput, Sample

log = logging.getLogger(__name__)

FORMAT = "rewardscope-feedback/1"
HEAD_FILE, CONFIG_FILE, REPORT_FILE = "head.safetensors", "config.json", "report.json"
IMAGE_KEYS, PROMPT_KEYS = ("image", "image_path", "path", "file"), ("prompt", "caption", "text")
COUNT_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


class FeedbackHead(nn.Module):
    """MLP on the pair features [image, prompt, image * prompt] of unit CLIP embeddings [B, D] -> logits [B]."""

    def __init__(self, embedding_dim: int, hidden: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(3 * embedding_dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        # Unit vectors have components of about 1/sqrt(D) and their products about 1/D: rescale all three to
        # about unit size so the MLP does not start on a flat loss (observed: no progress in 20 epochs at D=768).
        dim = image.shape[-1]
        features = torch.cat([image * dim**0.5, text * dim**0.5, image * text * dim], dim=-1)
        return self.net(features).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class LabelledPair:
    image: Path
    prompt: str
    label: int  # 1: the image matches the prompt (human label), 0: it does not


def _pick(record: dict[str, Any], keys: Sequence[str], where: str) -> Any:
    for key in keys:
        if key in record and record[key] not in (None, ""):
            return record[key]
    raise ValueError(f"{where}: missing {keys[0]!r} (also accepted: {', '.join(keys[1:])})")


def _label(value: Any, where: str) -> int:
    text = str(value).strip().lower()
    if text in ("1", "1.0", "true", "yes"):
        return 1
    if text in ("0", "0.0", "false", "no"):
        return 0
    raise ValueError(f"{where}: label must be 0 or 1, got {value!r}")


def read_labels(path: str | Path) -> list[LabelledPair]:
    """(image, prompt, label) rows from JSONL (one object a line) or CSV (with a header). Keys: image (or
    image_path / path / file), prompt (or caption / text), label (0/1, true/false). Relative image paths are
    resolved against the labels file's folder."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as handle:
            records = [(f"{path.name}:{n + 2}", row) for n, row in enumerate(csv.DictReader(handle))]
    elif path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        records = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"{path.name}:{number}: expected a JSON object")
                records.append((f"{path.name}:{number}", record))
    else:
        raise ValueError(f"labels must be .jsonl or .csv, got {path.name}")
    pairs = []
    for where, record in records:
        image = Path(str(_pick(record, IMAGE_KEYS, where))).expanduser()
        pairs.append(
            LabelledPair(
                image if image.is_absolute() else path.parent / image,
                str(_pick(record, PROMPT_KEYS, where)),
                _label(_pick(record, ("label",), where), where),
            )
        )
    if not pairs:
        raise ValueError(f"{path} holds no labelled pairs")
    return pairs


def _replace_word(text: str, word: str, replacement: str) -> str | None:
    pattern = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)
    return pattern.sub(replacement, text, count=1) if pattern.search(text) else None


def perturb_prompt(prompt: str, rng: random.Random, count: int = 3) -> list[str]:
    """Up to `count` distinct prompts that no longer describe the image (Lee et al.'s auxiliary task): one
    colour word, count word or object noun of the parsed prompt swapped for another of its kind."""
    import inflect

    plural = inflect.engine().plural_noun
    parsed = parse_prompt(prompt)
    options: list[str] = []
    for spec in parsed.objects:
        if spec.color:
            other = rng.choice([c for c in COLORS if c != spec.color])
            options.append(_replace_word(prompt, spec.color, other) or "")
        if spec.count <= len(COUNT_WORDS):
            other_count = rng.choice([n for n in range(1, len(COUNT_WORDS) + 1) if n != spec.count])
            word = COUNT_WORDS[spec.count - 1]
            options.append(
                _replace_word(prompt, word, COUNT_WORDS[other_count - 1])
                or _replace_word(prompt, str(spec.count), str(other_count))
                or ""
            )
        other_class = rng.choice([c for c in COCO_CLASSES if c != spec.class_name])
        options.append(
            _replace_word(prompt, plural(spec.class_name), plural(other_class))
            or _replace_word(prompt, spec.class_name, other_class)
            or ""
        )
    unique = [p for p in dict.fromkeys(options) if p and p.lower() != prompt.lower()]
    rng.shuffle(unique)
    return unique[:count]


# ---------------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainConfig:
    clip_model: str = DEFAULT_CLIP
    clip_processor: str | None = None
    hidden: int = 256
    dropout: float = 0.1
    epochs: int = 200
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    validation_fraction: float = 0.2
    patience: int = 20  # epochs without a better validation loss before stopping
    seed: int = 0
    aux_weight: float = 0.0  # weight of the prompt-classification loss; 0 turns it off
    aux_negatives: int = 3  # perturbed prompts per positive pair
    device: str | None = None
    dtype: str | None = None
    embed_batch_size: int = 32


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve by the rank (Mann-Whitney) formula, ties counted half; None with one class."""
    positives = sum(1 for label in labels if label == 1)
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return None
    ranks = average_ranks(scores)
    rank_sum = sum(rank for rank, label in zip(ranks, labels, strict=True) if label == 1)
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def split_indices(groups: Sequence[Any], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded train/validation split of row indices by group (the image): rows of one image stay on one side,
    so validation measures images the head never saw. About `fraction` of the groups go to validation."""
    unique = list(dict.fromkeys(groups))
    random.Random(seed).shuffle(unique)
    cut = min(round(len(unique) * fraction), len(unique) - 1) if len(unique) > 1 else 0
    held_out = set(unique[:cut])
    train = [index for index, group in enumerate(groups) if group not in held_out]
    validation = [index for index, group in enumerate(groups) if group in held_out]
    return train, validation


@dataclass
class _Tensors:
    image: torch.Tensor  # [N, D]
    text: torch.Tensor  # [N, D]
    label: torch.Tensor  # [N] float
    negatives: torch.Tensor  # [N, K, D] perturbed-prompt embeddings
    negative_mask: torch.Tensor  # [N, K] bool: which negatives exist (positives with perturbable prompts)


def _metrics(head: FeedbackHead, data: _Tensors, rows: list[int]) -> dict[str, float | None]:
    if not rows:
        return {"loss": None, "accuracy": None, "auc": None}
    head.eval()
    with torch.no_grad():
        logits = head(data.image[rows], data.text[rows])
        labels = data.label[rows]
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels).item()
    predicted = (logits > 0).float()
    return {
        "loss": loss,
        "accuracy": (predicted == labels).float().mean().item(),
        "auc": roc_auc([int(v) for v in labels.tolist()], logits.tolist()),
    }


def _aux_loss(head: FeedbackHead, data: _Tensors, batch: torch.Tensor) -> torch.Tensor | None:
    """Prompt classification: among the true prompt and its perturbations, the true one should score highest."""
    keep = batch[(data.label[batch] == 1) & data.negative_mask[batch].any(-1)]
    if keep.numel() == 0:
        return None
    image, negatives = data.image[keep], data.negatives[keep]
    true_logit = head(image, data.text[keep]).unsqueeze(-1)
    k = negatives.shape[1]
    negative_logits = head(image.unsqueeze(1).expand(-1, k, -1), negatives)
    negative_logits = negative_logits.masked_fill(~data.negative_mask[keep], float("-inf"))
    logits = torch.cat([true_logit, negative_logits], dim=-1)
    return nn.functional.cross_entropy(logits, torch.zeros(len(keep), dtype=torch.long))


def _embed(pairs: list[LabelledPair], config: TrainConfig, progress: Any) -> tuple[_Tensors, Any]:
    from rewardscope.models.images import load_image

    backbone = load_clip(config.clip_model, config.clip_processor, config.device, config.dtype)
    images = []
    task = progress.add_task("embedding images", total=len(pairs))
    for start in range(0, len(pairs), config.embed_batch_size):
        chunk = pairs[start : start + config.embed_batch_size]
        decoded = [load_image(pair.image) for pair in chunk]
        images.append(backbone.image_embeddings(decoded, config.embed_batch_size).cpu())
        progress.advance(task, len(chunk))
    rng = random.Random(config.seed)
    negatives = [
        perturb_prompt(pair.prompt, rng, config.aux_negatives) if config.aux_weight > 0 and pair.label == 1 else []
        for pair in pairs
    ]
    texts = list(dict.fromkeys([pair.prompt for pair in pairs] + [p for group in negatives for p in group]))
    text_embeddings = backbone.text_embeddings(texts).cpu()
    row = {text: index for index, text in enumerate(texts)}
    dim = text_embeddings.shape[1]
    k = max(1, config.aux_negatives)
    negative_tensor = torch.zeros((len(pairs), k, dim))
    negative_mask = torch.zeros((len(pairs), k), dtype=torch.bool)
    for index, group in enumerate(negatives):
        for slot, prompt in enumerate(group[:k]):
            negative_tensor[index, slot] = text_embeddings[row[prompt]]
            negative_mask[index, slot] = True
    data = _Tensors(
        image=torch.cat(images),
        text=text_embeddings[[row[pair.prompt] for pair in pairs]],
        label=torch.tensor([float(pair.label) for pair in pairs]),
        negatives=negative_tensor,
        negative_mask=negative_mask,
    )
    return data, backbone


@dataclass
class TrainingReport:
    examples: int
    train: int
    validation: int
    positives: int
    epochs_run: int
    best_epoch: int
    train_metrics: dict[str, float | None]
    validation_metrics: dict[str, float | None]
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    labels_file: str = ""
    labels_sha256: str = ""
    seconds: float = 0.0


def train_feedback_reward(
    labels: str | Path,
    output: str | Path,
    config: TrainConfig | None = None,
    show_progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainingReport:
    """Train a feedback head on a labels file and write it to `output` (head.safetensors, config.json,
    report.json); the directory then loads as reward "feedback:<output>"."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from safetensors.torch import save_file

    config = config or TrainConfig()
    started = time.perf_counter()
    labels, output = Path(labels), Path(output)
    pairs = read_labels(labels)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not show_progress, transient=False) as progress:
        data, backbone = _embed(pairs, config, progress)
        label_list = [pair.label for pair in pairs]
        train_rows, validation_rows = split_indices(
            [pair.image.resolve() for pair in pairs], config.validation_fraction, config.seed
        )
        if not train_rows:
            raise ValueError("no training examples after the split")
        torch.manual_seed(config.seed)
        head = FeedbackHead(data.image.shape[1], config.hidden, config.dropout)
        optimizer = torch.optim.AdamW(head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        generator = torch.Generator().manual_seed(config.seed)
        train_tensor = torch.tensor(train_rows)
        best = (float("inf"), 0, {k: v.clone() for k, v in head.state_dict().items()})
        history: list[dict[str, Any]] = []
        stale = 0
        task = progress.add_task("training", total=config.epochs)
        for epoch in range(1, config.epochs + 1):
            head.train()
            total_loss, batches = 0.0, 0
            for batch in train_tensor[torch.randperm(len(train_tensor), generator=generator)].split(config.batch_size):
                logits = head(data.image[batch], data.text[batch])
                loss = nn.functional.binary_cross_entropy_with_logits(logits, data.label[batch])
                if config.aux_weight > 0:
                    aux = _aux_loss(head, data, batch)
                    if aux is not None:
                        loss = loss + config.aux_weight * aux
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total_loss, batches = total_loss + loss.item(), batches + 1
            monitored = validation_rows or train_rows  # with no validation set, stop on the training loss
            metrics = _metrics(head, data, monitored)
            entry = {"epoch": epoch, "train_loss": total_loss / batches, **{f"val_{k}": v for k, v in metrics.items()}}
            history.append(entry)
            if on_epoch is not None:
                on_epoch(entry)
            progress.update(task, advance=1, description=f"training (val loss {metrics['loss']:.4f})")
            if metrics["loss"] < best[0] - 1e-6:
                best, stale = (metrics["loss"], epoch, {k: v.clone() for k, v in head.state_dict().items()}), 0
            else:
                stale += 1
                if stale >= config.patience:
                    break
    head.load_state_dict(best[2])
    head.eval()
    report = TrainingReport(
        examples=len(pairs),
        train=len(train_rows),
        validation=len(validation_rows),
        positives=sum(label_list),
        epochs_run=len(history),
        best_epoch=best[1],
        train_metrics=_metrics(head, data, train_rows),
        validation_metrics=_metrics(head, data, validation_rows),
        history=history,
        config={**asdict(config), "clip_version": backbone.version},
        labels_file=str(labels),
        labels_sha256=file_sha256(labels),
        seconds=round(time.perf_counter() - started, 3),
    )
    output.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(output / HEAD_FILE))
    clip_model = str(Path(config.clip_model).resolve()) if Path(config.clip_model).is_dir() else config.clip_model
    processor = config.clip_processor
    if processor and Path(processor).is_dir():
        processor = str(Path(processor).resolve())
    head_config = {
        "format": FORMAT,
        "clip_model": clip_model,
        "clip_processor": processor,
        "clip_version": backbone.version,
        "embedding_dim": int(data.image.shape[1]),
        "hidden": config.hidden,
        "dropout": config.dropout,
        "features": "concat(image, prompt, image * prompt) of unit CLIP embeddings",
        "output": "sigmoid(logit) = P(label = 1), the probability that a person judges the image to match the prompt",
    }
    (output / CONFIG_FILE).write_text(json.dumps(head_config, indent=2) + "\n")
    (output / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


# ---------------------------------------------------------------------------------------------------------
# Reward


@register_reward(
    RewardDeclaration(
        "feedback",
        "an MLP head trained on binary human labels over frozen CLIP embeddings (Lee et al. 2023)",
        (0.0, 1.0),
        "P(a person labels the image as matching the prompt), from a head trained on binary labels",
        argument="the directory `rewardscope train-reward` wrote",
    )
)
class FeedbackReward:
    """A trained feedback head as a reward: P(a person labels the image as matching the prompt), in [0, 1].
    Built as "feedback:<directory>" (or create_reward("feedback", path=...)) from train_feedback_reward's output."""

    name = "feedback"

    def __init__(self, path: str, device: str | None = None, dtype: str | None = None, batch_size: int = 32) -> None:
        from safetensors.torch import load_file

        self.path = Path(path).expanduser()
        config_path = self.path / CONFIG_FILE
        if not config_path.is_file() or not (self.path / HEAD_FILE).is_file():
            raise ModelNotFoundError(
                f"feedback model {str(self.path)!r} has no {CONFIG_FILE} + {HEAD_FILE}; "
                "train one with `rewardscope train-reward LABELS --output DIR`"
            )
        self.config = json.loads(config_path.read_text())
        if self.config.get("format") != FORMAT:
            raise ValueError(f"{config_path} is not a {FORMAT} model config")
        self.backbone = load_clip(self.config["clip_model"], self.config.get("clip_processor"), device, dtype)
        if self.backbone.embedding_dim != self.config["embedding_dim"]:
            raise ValueError(
                f"feedback head expects {self.config['embedding_dim']}-d CLIP embeddings; "
                f"{self.config['clip_model']} gives {self.backbone.embedding_dim}-d"
            )
        self.head = FeedbackHead(self.config["embedding_dim"], self.config["hidden"], self.config["dropout"])
        self.head.load_state_dict(load_file(str(self.path / HEAD_FILE)))
        self.head.eval().to(self.backbone.device)
        self.batch_size = max(1, int(batch_size))
        head_hash = hashlib.sha256((self.path / HEAD_FILE).read_bytes()).hexdigest()[:16]
        self.version = f"feedback-{self.path.name}@{head_hash}"
        report = self.path / REPORT_FILE
        self.report = json.loads(report.read_text()) if report.is_file() else {}

    def describe(self) -> dict[str, Any]:
        validation = self.report.get("validation_metrics", {})
        return {
            "name": self.name,
            "version": self.version,
            "model": {**self.backbone.describe(), "head": str(self.path)},
            "params": {"batch_size": self.batch_size},
            "training": {"accuracy": validation.get("accuracy"), "auc": validation.get("auc")},
            "precision": self.backbone.describe()["precision"],
        }

    def score(self, samples: list[Sample]) -> list[RewardOutput]:
        images = self.backbone.sample_embeddings(samples, self.batch_size)
        prompts = list(dict.fromkeys(sample.prompt for sample in samples))
        texts = self.backbone.text_embeddings(prompts)
        row_of = {prompt: row for row, prompt in enumerate(prompts)}
        rows = torch.tensor([row_of[sample.prompt] for sample in samples], device=texts.device)
        with torch.inference_mode():
            logits = self.head(images, texts[rows]).cpu().tolist()
        return [RewardOutput(float(torch.sigmoid(torch.tensor(logit))), {"logit": logit}) for logit in logits]
