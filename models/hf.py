"""Hugging Face models for the rewards: a hub id or a local directory resolves to one local directory, loads
through one path, and carries a version (model name + short hash of config and weights) for every result."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# What a hub download fetches: configs, safetensors weights and tokenizer files. Never PyTorch .bin files: they
# are pickles, which can run code when loaded, and model weights load from safetensors only (load_pretrained).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ModelNotFoundError(FileNotFoundError):
    """A configured model is neither a local directory nor available from the (local) Hugging Face hub."""


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to a local directory.

    spec: as configured (hub id or path); path: the directory that loads; name: hub id or directory name;
    version: "{name}@{12 hex digits of the config + weights hash}".
    """

    spec: str
    path: Path
    name: str
    version: str

    def describe(self) -> dict[str, str]:
        return {"model": self.name, "path": str(self.path), "version": self.version}


def _weight_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    return [file for file in files if file.is_file()]


def _file_digest(path: Path) -> str:
    """sha256 of a file; files in the Hugging Face cache are symlinks to blobs already named by their sha256."""
    real = path.resolve()
    if real.parent.name == "blobs" and _SHA256.fullmatch(real.name):
        return real.name
    stat = real.stat()
    return _content_digest(str(real), stat.st_size, stat.st_mtime_ns)


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file's content (cached per path, size and mtime)."""
    return _file_digest(Path(path))


@functools.lru_cache(maxsize=256)
def _content_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_hash(directory: str | Path) -> str:
    """12 hex digits over config.json and the weight files (safetensors, else .bin) of a model directory."""
    directory = Path(directory)
    files = [directory / "config.json", *_weight_files(directory)]
    digest = hashlib.sha256()
    for file in files:
        if file.is_file():
            digest.update(f"{file.name}:{_file_digest(file)}\n".encode())
    return digest.hexdigest()[:12]


def _is_repo_id(spec: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def _hub_directory(repo_id: str) -> Path:
    """The local snapshot of a hub model: from the cache, or downloaded when the hub may be reached."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        if constants.is_offline_mode():
            raise ModelNotFoundError(
                f"model {repo_id!r} is not an existing directory and not in the local Hugging Face cache "
                "(offline: HF_HUB_OFFLINE is set); give a model directory or download it first"
            ) from None
    try:
        directory = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as exc:
        raise ModelNotFoundError(f"model {repo_id!r} could not be fetched from the hub: {exc}") from exc
    return directory


def resolve_model(spec: str | os.PathLike[str], name: str | None = None) -> ModelSource:
    """Hub id or local directory -> ModelSource. An existing directory wins; otherwise a valid hub id is looked
    up in the local cache (and downloaded unless HF_HUB_OFFLINE is set); anything else is a missing directory.
    Raises ModelNotFoundError with the reason, so a bad config fails when the reward is built."""
    text = os.fspath(spec)
    local = Path(text).expanduser()
    if local.is_dir():
        directory = local.resolve()
        if not (directory / "config.json").is_file():
            raise ModelNotFoundError(f"model directory {text!r} has no config.json")
        label = name or directory.name
    elif local.exists():
        raise ModelNotFoundError(f"model {text!r} is a file; give a model directory or a hub id")
    elif _is_repo_id(text):
        directory = _hub_directory(text)
        label = name or text
    else:
        raise ModelNotFoundError(f"model directory {text!r} does not exist")
    return ModelSource(text, directory, label, f"{label}@{weights_hash(directory)}")


def choose_device(device: str | None) -> torch.device:
    """None: the first CUDA device when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def choose_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """ "auto": fp16 on CUDA, fp32 elsewhere (half precision on CPU is slow and lossy); or a name from DTYPES."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}, got {dtype!r}") from None


def loads_weights(loader: Any) -> bool:
    """Whether loader.from_pretrained reads model weights: a PreTrainedModel class or an Auto model class (those
    carry a `_model_mapping`). Tokenizers, processors and configs read JSON and text files only."""
    from transformers import PreTrainedModel

    return isinstance(loader, type) and (issubclass(loader, PreTrainedModel) or hasattr(loader, "_model_mapping"))


def require_safetensors(source: ModelSource) -> None:
    """Model weights load from safetensors only: a .bin/.pt/.pth checkpoint is a pickle, which can run code when
    loaded. Raises ModelNotFoundError naming the pickled files and how to convert them."""
    if any(source.path.glob("*.safetensors")):
        return
    pickled = sorted(file.name for pattern in PICKLE_PATTERNS for file in source.path.glob(pattern))
    found = f"only pickled PyTorch weights ({', '.join(pickled)})" if pickled else "no weight files"
    raise ModelNotFoundError(
        f"{source.name} at {source.path} has {found}; model weights are loaded from safetensors only. Convert them "
        "where you trust the files: Model.from_pretrained(path).save_pretrained(path) writes model.safetensors"
    )


def load_pretrained(
    loader: Callable[..., Any], source: ModelSource, device: torch.device | None = None, **kwargs: Any
) -> Any:
    """loader.from_pretrained(source.path, **kwargs), moved to `device` and set to eval mode when it is a model.
    Always from the resolved local directory: the hub is consulted once, in resolve_model. A model's weights load
    with use_safetensors=True: transformers never falls back to a pickled pytorch_model.bin."""
    if loads_weights(loader):
        require_safetensors(source)
        kwargs = {**kwargs, "use_safetensors": True}
    try:
        loaded = loader.from_pretrained(source.path, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"cannot load {source.name} from {source.path}: {exc}") from exc
    if isinstance(loaded, torch.nn.Module):
        loaded = loaded.to(device or torch.device("cpu")).eval()
    return loaded


def model_class(source: ModelSource, allowed: dict[str, str], fallback: Callable[..., Any]) -> Callable[..., Any]:
    """The transformers class named first in the directory's config.json `architectures` when it is one of
    `allowed` (model_type -> class name mappings' values), else `fallback` (an Auto class)."""
    import json

    import transformers

    config = json.loads((source.path / "config.json").read_text())
    for architecture in config.get("architectures") or ():
        if architecture in allowed.values() and hasattr(transformers, architecture):
            return getattr(transformers, architecture)
    return fallback


def single_token_id(tokenizer: Any, word: str) -> int:
    """The one token id of `word` as it follows other text (" yes"); a word that splits fails loudly."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        tokens = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"{word!r} is {len(ids)} tokens ({tokens}) for this tokenizer; yes/no scoring needs one")
    if ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"{word!r} is unknown to this tokenizer (maps to its unk token)")
    return int(ids[0])


NORMALISATIONS = {
    "yes_no": "P(yes) = softmax over the logits of the 'yes' and 'no' tokens only",
    "vocab": "P(yes) = softmax over the full vocabulary, read at the 'yes' token",
}


def yes_probability(logits: torch.Tensor, yes_id: int, no_id: int, normalisation: str = "yes_no") -> torch.Tensor:
    """Next-token logits [N, V] -> P(yes) [N] in float64 (see NORMALISATIONS)."""
    logits = logits.double()
    if normalisation == "yes_no":
        return torch.softmax(logits[:, [yes_id, no_id]], dim=-1)[:, 0]
    if normalisation == "vocab":
        return torch.softmax(logits, dim=-1)[:, yes_id]
    raise ValueError(f"normalisation must be one of {', '.join(NORMALISATIONS)}, got {normalisation!r}")
