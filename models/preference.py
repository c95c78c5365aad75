"""Preference rewards: CLIPScore, the LAION aesthetic predictor and PickScore on a shared CLIP backbone, plus
HPSv2 and ImageReward through their own packages (optional extras `[hpsv2]`, `[imagereward]`)."""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .clip import DEFAULT_CLIP, load_clip, resolve_device, resolve_dtype
from .hf import ModelNotFoundError, file_sha256
from .registry import RewardDeclaration, register_reward
from .types import RewardOutput, Sample

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIPSCORE_WEIGHT = 2.5  # Hessel et al. 2021
SAFE_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class MissingExtraError(ImportError):
    """A reward whose model code lives in an optional package that is not installed."""


def require_package(module: str, extra: str, reward: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"the {reward!r} reward needs the {module!r} package, which is not installed: "
            f"pip install 'rewardscope[{extra}]'"
        ) from exc


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch file through torch.load(weights_only=True): tensors and
    plain containers only. A file that needs unpickling of anything else is refused, never executed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"weights file {str(path)!r} does not exist")
    if path.suffix in SAFE_SUFFIXES:
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"weights must be .safetensors or a torch file ({', '.join(TORCH_SUFFIXES)}): {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"refusing to load {path}: it holds pickled objects beyond tensors (weights_only load failed); "
            "convert it to safetensors from a trusted environment"
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def _checkpoint_version(path: Path) -> str:
    if path.parent.parent.name == "snapshots":  # a hub cache file: the snapshot commit names it
        return f"{path.stem}@{path.parent.name[:12]}"
    return f"{path.stem}@{file_sha256(path)[:16]}"


class _ClipReward:
    """Common part of the rewards computed from one shared CLIP backbone (see models/clip.py)."""

    name = "clip"

    def __init__(
        self,
        *,  # configured by name, from a config mapping
        model: str = DEFAULT_CLIP,
        processor: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int = 32,
    ) -> None:
        self.backbone = load_clip(model, processor, device, dtype)
        self.batch_size = max(1, int(batch_size))
        self.version = self.backbone.version

    prefix = ""  # put before each prompt (CLIPScore's code: "A photo depicts ")

    def value_range(self) -> list[float | None]:
        raise NotImplementedError

    def text_of(self, prompt: str) -> str:
        """The text embedded for a prompt."""
        return self.prefix + prompt

    def params(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size}

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "model": self.backbone.describe(),
            "params": self.params(),
            "precision": self.backbone.describe()["precision"],
            "range": self.value_range(),  # the declaration's, for this instance's weight / logit scale
        }

    def gradient_form(self, name: str, torch_detector: Any = None) -> Any:
        """The differentiable form (models/gradients.py), on this reward's backbone and formula."""
        from .gradients import ClipGradient

        return ClipGradient(name, self.backbone, self)

    def from_embeddings(
        self, embeddings: torch.Tensor, cosines: Callable[[], torch.Tensor]
    ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Values [B] (in the autograd graph) and details from unit image embeddings [B, D]; `cosines()` gives
        [B] cosines with the prompts, computed only if this reward needs them."""
        raise NotImplementedError

    def _cosines(self, samples: list[Sample]) -> torch.Tensor:
        """[B] cosine of each image with its own prompt; each distinct prompt is embedded once."""
        images = self.backbone.sample_embeddings(samples, self.batch_size)
        prompts = list(dict.fromkeys(self.text_of(sample.prompt) for sample in samples))
        texts = self.backbone.text_embeddings(prompts)
        row_of = {prompt: row for row, prompt in enumerate(prompts)}
        rows = torch.tensor([row_of[self.text_of(sample.prompt)] for sample in samples], device=texts.device)
        return (images * texts[rows]).sum(-1)


@register_reward(
    RewardDeclaration(
        "clip",
        "CLIPScore (Hessel et al. 2021) with any transformers CLIP",
        (0.0, CLIPSCORE_WEIGHT),
        "CLIPScore: w * max(cos(image, prefix + prompt), 0), w = 2.5; prompts truncated to the model's 77 tokens",
        differentiable=True,
        model_options=(("model", DEFAULT_CLIP),),
    )
)
class ClipScoreReward(_ClipReward):
    """CLIPScore (Hessel et al. 2021): w * max(cos(image, prompt), 0) with w = 2.5, any transformers CLIP."""

    name = "clip"

    def __init__(self, weight: float = CLIPSCORE_WEIGHT, prefix: str = "", **config: Any) -> None:
        super().__init__(**config)
        self.weight, self.prefix = float(weight), str(prefix)

    def value_range(self) -> list[float | None]:
        return [0.0, self.weight]

    def from_embeddings(self, embeddings, cosines):
        cos = cosines()
        return self.weight * cos.clamp(min=0), [{"cosine": float(c)} for c in cos.detach()]

    def params(self) -> dict[str, Any]:
        return {**super().params(), "weight": self.weight, "prefix": self.prefix}

    def score(self, samples: list[Sample]) -> list[RewardOutput]:
        cosines = self._cosines(samples).cpu().tolist()
        return [RewardOutput(self.weight * max(cos, 0.0), {"cosine": cos}) for cos in cosines]


@register_reward(
    RewardDeclaration(
        "pickscore",
        "PickScore (Kirstain et al. 2023): a CLIP-H tuned on Pick-a-Pic preferences",
        (-100.0, 100.0),
        "logit_scale * cos(image, prompt) (PickScore_v1: logit_scale = 100; typical values 18-23)",
        differentiable=True,
    )
)
class PickScoreReward(_ClipReward):
    """PickScore (Kirstain et al. 2023): logit_scale * cos(image, prompt) from the Pick-a-Pic-tuned CLIP-H."""

    name = "pickscore"

    def __init__(self, model: str = PICKSCORE_MODEL, processor: str | None = PICKSCORE_PROCESSOR, **config: Any):
        super().__init__(model=model, processor=processor, **config)

    def value_range(self) -> list[float | None]:
        return [-self.backbone.logit_scale, self.backbone.logit_scale]

    def from_embeddings(self, embeddings, cosines):
        cos = cosines()
        return self.backbone.logit_scale * cos, [{"cosine": float(c)} for c in cos.detach()]

    def params(self) -> dict[str, Any]:
        return {**super().params(), "logit_scale": self.backbone.logit_scale}

    def score(self, samples: list[Sample]) -> list[RewardOutput]:
        cosines = self._cosines(samples).cpu().tolist()
        scale = self.backbone.logit_scale
        return [RewardOutput(scale * cos, {"cosine": cos}) for cos in cosines]


class AestheticMLP(nn.Module):
    """LAION improved aesthetic predictor head: an MLP on L2-normalised CLIP ViT-L/14 image embeddings [B, 768].
    No activations, as in the released model; parameter names match its state dict (`layers.N.*`)."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[B, D] unit embeddings -> [B] ratings."""
        return self.layers(embeddings).squeeze(-1)


@register_reward(
    RewardDeclaration(
        "aesthetic",
        "LAION improved aesthetic predictor on the CLIP ViT-L/14 image embedding (the prompt is ignored)",
        (None, None),
        "LAION aesthetic rating on the 1-10 AVA scale (unbounded MLP output; most photos 4-7)",
        differentiable=True,
    )
)
class AestheticReward(_ClipReward):
    """LAION improved aesthetic predictor: the MLP above on the CLIP image embedding; the prompt is ignored.

    head: the MLP's weights, `sac+logos+ava1-l14-linearMSE.pth` (loaded with weights_only=True) or a
    safetensors conversion of it. model: the CLIP it was trained on (openai/clip-vit-large-patch14).
    """

    name = "aesthetic"

    def __init__(self, head: str | None = None, **config: Any) -> None:
        if not head:
            raise ValueError(
                "the aesthetic reward needs `head`: a path to the LAION improved-aesthetic-predictor MLP weights "
                "(sac+logos+ava1-l14-linearMSE.pth, or its safetensors conversion)"
            )
        state = load_weights(head)  # before the CLIP load: a bad head fails fast
        super().__init__(**config)
        first = state.get("layers.0.weight")
        if first is None:
            raise ValueError(f"{head} is not an aesthetic MLP state dict (no layers.0.weight)")
        if first.shape[1] != self.backbone.embedding_dim:
            raise ValueError(
                f"aesthetic head expects {first.shape[1]}-d embeddings; CLIP {self.backbone.model_id} gives "
                f"{self.backbone.embedding_dim}-d"
            )
        self.head = AestheticMLP(first.shape[1])
        self.head.load_state_dict(state)
        self.head.eval().to(self.backbone.device)
        self.head_path = Path(head)
        self.version = f"{self.backbone.version}+{_checkpoint_version(self.head_path)}"

    def value_range(self) -> list[float | None]:
        return [None, None]

    def params(self) -> dict[str, Any]:
        return {**super().params(), "head": str(self.head_path)}

    def from_embeddings(self, embeddings, cosines):
        head_dtype = next(self.head.parameters()).dtype
        return self.head(embeddings.to(head_dtype)).double(), [{} for _ in range(len(embeddings))]

    def score(self, samples: list[Sample]) -> list[RewardOutput]:
        embeddings = self.backbone.sample_embeddings(samples, self.batch_size)
        with torch.inference_mode():
            ratings = self.head(embeddings).cpu().tolist()
        return [RewardOutput(rating) for rating in ratings]


def _hub_file(repo: str, filename: str, what: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, local_files_only=True))
    except Exception:
        raise ModelNotFoundError(
            f"{what}: {repo}/{filename} is not in the local Hugging Face cache and nothing is downloaded at run "
            f"time; fetch it once (`hf download {repo} {filename}`) or pass a local path"
        ) from None


class _PackagedReward:
    """Common part of the rewards that run a model through its authors' package (HPSv2, ImageReward)."""

    name: str
    version: str
    batch_size: int
    dtype: torch.dtype

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "params": {"batch_size": self.batch_size},
            "precision": str(self.dtype).removeprefix("torch."),
        }


@register_reward(
    RewardDeclaration(
        "hpsv2",
        "HPS v2 / v2.1 (Wu et al. 2023) through the hpsv2 package",
        (-1.0, 1.0),
        "HPS v2: cosine of image and prompt features (typical 0.2-0.35)",
    )
)
class HPSv2Reward(_PackagedReward):
    """HPS v2 / v2.1 (Wu et al. 2023) through the `hpsv2` package: cosine of HPS-tuned OpenCLIP ViT-H-14 image
    and prompt features. checkpoint: local HPS_v2*.pt, else the xswu/HPSv2 file from the local hub cache."""

    name = "hpsv2"
    HUB_REPO = "xswu/HPSv2"
    CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}

    def __init__(
        self,
        checkpoint: str | None = None,
        hps_version: str = "v2.1",
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int = 16,
    ) -> None:
        require_package("hpsv2", "hpsv2", self.name)
        from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer

        if hps_version not in self.CHECKPOINTS:
            raise ValueError(f"hps_version must be one of {', '.join(self.CHECKPOINTS)}")
        path = Path(checkpoint) if checkpoint else _hub_file(self.HUB_REPO, self.CHECKPOINTS[hps_version], "hpsv2")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        # pretrained=None: the HPS checkpoint carries every weight, so nothing else is fetched.
        model, _, self.preprocess = create_model_and_transforms(
            "ViT-H-14", None, precision="fp32", device="cpu", jit=False, output_dict=True
        )
        model.load_state_dict(load_weights(path))
        self.model = model.to(self.device, self.dtype).eval()
        self.tokenizer = get_tokenizer("ViT-H-14")
        self.batch_size = max(1, int(batch_size))
        self.version = f"hpsv2-{hps_version}:{_checkpoint_version(path)}"

    @torch.inference_mode()
    def score(self, samples: list[Sample]) -> list[RewardOutput]:
        values: list[float] = []
        for start in range(0, len(samples), self.batch_size):
            chunk = samples[start : start + self.batch_size]
            pixels = torch.stack([self.preprocess(sample.image) for sample in chunk]).to(self.device, self.dtype)
            tokens = self.tokenizer([sample.prompt for sample in chunk]).to(self.device)
            outputs = self.model(pixels, tokens)
            image, text = outputs["image_features"].float(), outputs["text_features"].float()
            values.extend((image * text).sum(-1).cpu().tolist())
        return [RewardOutput(value) for value in values]


@register_reward(
    RewardDeclaration(
        "imagereward",
        "ImageReward (Xu et al. 2023) through the image-reward package",
        (None, None),
        "ImageReward: standardised reward (about N(0, 1) over its training prompts)",
    )
)
class ImageRewardReward(_PackagedReward):
    """ImageReward (Xu et al. 2023) through the `image-reward` package: BLIP cross-attention features -> MLP,
    standardised by the released mean/std. checkpoint / med_config: local files, else THUDM/ImageReward's from the
    local hub cache (BLIP's tokenizer, bert-base-uncased, must be in that cache too)."""

    name = "imagereward"
    HUB_REPO = "THUDM/ImageReward"

    def __init__(
        self,
        checkpoint: str | None = None,
        med_config: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int = 16,
    ) -> None:
        require_package("ImageReward", "imagereward", self.name)
        from ImageReward.ImageReward import ImageReward as ImageRewardModel

        path = Path(checkpoint) if checkpoint else _hub_file(self.HUB_REPO, "ImageReward.pt", "imagereward")
        config = Path(med_config) if med_config else _hub_file(self.HUB_REPO, "med_config.json", "imagereward")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        model = ImageRewardModel(med_config=str(config), device=self.device)
        model.load_state_dict(load_weights(path), strict=False)  # the package's own loader is non-strict too
        self.model = model.to(self.device, self.dtype).eval()
        self.model.mlp.float()
        self.batch_size = max(1, int(batch_size))
        self.version = f"imagereward:{_checkpoint_version(path)}"

    @torch.inference_mode()
    def score(self, samples: list[Sample]) -> list[RewardOutput]:
        blip, values = self.model.blip, []
        for start in range(0, len(samples), self.batch_size):
            chunk = samples[start : start + self.batch_size]
            # The package scores one image per call; this is the same computation, batched.
            text = blip.tokenizer(
                [sample.prompt for sample in chunk],
                padding="max_length",
                truncation=True,
                max_length=35,
                return_tensors="pt",
            ).to(self.device)
            pixels = torch.stack([self.model.preprocess(sample.image) for sample in chunk]).to(self.device, self.dtype)
            image_embeds = blip.visual_encoder(pixels)
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
            features = blip.text_encoder(
                text.input_ids,
                attention_mask=text.attention_mask,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_atts,
                return_dict=True,
            ).last_hidden_state[:, 0, :]
            rewards = (self.model.mlp(features.float()).squeeze(-1) - self.model.mean) / self.model.std
            values.extend(rewards.cpu().tolist())
        return [RewardOutput(value) for value in values]
