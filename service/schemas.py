"""The HTTP API contract: pydantic request and response models, with examples for the OpenAPI schema.
Images travel as base64 of an encoded file (PNG, JPEG, WebP) or of a .npy uint8 array (HWC, RGB)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from rewardscope.models.registry import matching_variants

MAX_WEIGHT = 1e6
# A weight scales one reward inside the total. Every reward is higher-is-better, so a negative weight would make a
# training loop optimise the opposite; NaN or inf would poison every total (and is not JSON); MAX_WEIGHT keeps
# totals far inside float range (1e308 x two rewards overflows to inf).
Weight = Annotated[float, Field(ge=0, le=MAX_WEIGHT, allow_inf_nan=False)]


def _some_weight_positive(weights: dict[str, float]) -> dict[str, float]:
    if weights and not any(weight > 0 for weight in weights.values()):
        raise ValueError("at least one reward weight must be > 0 (with every weight 0 each total would be 0)")
    return weights


RewardSpec = list[str] | Annotated[dict[str, Weight], AfterValidator(_some_weight_positive)]

EXAMPLE_IMAGE = "<base64 of a PNG/JPEG/WebP file>"


class ImageInput(BaseModel):
    """One image: exactly one of `image` (base64 of an encoded file) or `array` (base64 of a .npy file)."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(default=None, description="base64 of a PNG, JPEG or WebP file")
    array: str | None = Field(
        default=None, description="base64 of a .npy file holding a uint8 array [H, W, 3] (or [H, W])"
    )

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ImageInput:
        if (self.image is None) == (self.array is None):
            raise ValueError("give exactly one of 'image' (base64 file) or 'array' (base64 .npy)")
        return self


class ScoreItem(ImageInput):
    """One (image, prompt) pair to score, with the rewards to compute for it."""

    prompt: str = Field(max_length=2000)
    metadata: dict[str, Any] | None = Field(
        default=None, description="GenEval-style {'include': [...], 'exclude': [...]} replaces prompt parsing"
    )
    rewards: RewardSpec | None = Field(default=None, description="names, or {name: weight}; default: the service's")
    profile: str | None = Field(
        default=None,
        description="named profile of rules (GET /rewards lists them; docs/profiles.md), e.g. 'train', 'geneval', "
        "'t2i-compbench', 'seed-reference', 'clipscore'; 'name@version' pins the version",
    )

    model_config = ConfigDict(
        extra="forbid",
        # BentoML's OpenAPI schema takes the singular OpenAPI 3.0 `example`.
        json_schema_extra={
            "example": {"image": EXAMPLE_IMAGE, "prompt": "four people and a bus", "rewards": {"matching": 1.0}}
        },
    )


# The matching variants, from the registered rewards' declarations (the one list; models/detection/matching.py).
MatchVariant = Literal[tuple(matching_variants())]  # type: ignore[valid-type]


class MatchItem(ScoreItem):
    """One (image, prompt) pair for the detection matching score with a chosen variant."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {"image": EXAMPLE_IMAGE, "prompt": "a photo of two clocks", "variant": "geneval"}
        },
    )

    variant: MatchVariant = "seed"
    rewards: None = Field(default=None, exclude=True)


class ItemResult(BaseModel):
    """Per-item answer. `error` set means the item failed (wholly or for some rewards): its values are None."""

    rewards: dict[str, float | None]
    total: float | None
    details: dict[str, Any]
    error: str | None = None
    error_code: str | None = Field(default=None, description="machine-readable code of the first error")
    profile: str = Field(description="the profile the item was scored under, with its version ('geneval@1')")
    versions: dict[str, str]


class MatchResult(BaseModel):
    score: float | None
    variant: str
    details: dict[str, Any]
    error: str | None = None
    error_code: str | None = None
    profile: str = Field(description="the profile the item was scored under, with its version ('geneval@1')")
    versions: dict[str, str]


class RankGroup(BaseModel):
    """N candidate images for one prompt (e.g. N samples of a diffusion model)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"example": {"prompt": "three dogs", "candidates": [{"image": EXAMPLE_IMAGE}] * 2}},
    )

    prompt: str = Field(max_length=2000)
    candidates: list[ImageInput] = Field(min_length=1, max_length=64)
    metadata: dict[str, Any] | None = None


class RankOptions(BaseModel):
    """How /rank combines rewards per group. The defaults rank by the weighted total, as /score's `total`."""

    model_config = ConfigDict(extra="forbid")

    normalization: Literal["none", "zscore", "rank"] = Field(
        default="none", description="per reward, over the group's scored candidates, before the weighted sum"
    )
    aggregation: Literal["weighted_sum", "rank_sum"] = Field(
        default="weighted_sum", description="rank_sum: sum of weight x rank within the group (FineRewards)"
    )
    margin: float | None = Field(
        default=None, ge=0, description="no chosen/rejected pair when best - worst < margin, or on a tie"
    )
    likelihood_weights: Literal["softmax", "minmax"] | None = Field(
        default=None, description="also return per-candidate reward-weighted-likelihood weights"
    )
    temperature: float = Field(
        default=1.0,
        gt=0,
        description="softmax temperature for likelihood_weights",
        # BentoML serves OpenAPI 3.0, where exclusiveMinimum is a flag beside minimum; pydantic writes the
        # JSON Schema 2020 number, which 3.0 tools (schemathesis, generators) reject.
        json_schema_extra={"minimum": 0, "exclusiveMinimum": True},
    )


class RankResult(BaseModel):
    scores: list[float | None] = Field(
        description="combined reward per candidate (default: the weighted total); None where it failed"
    )
    order: list[int] = Field(description="scored candidates, best first; ties keep the lower index first")
    chosen: int | None = Field(description="best candidate (DPO 'chosen'); None with fewer than 2 scored")
    rejected: int | None = Field(description="worst candidate (DPO 'rejected'); None with fewer than 2 scored")
    candidates: list[ItemResult]
    weights: list[float | None] | None = Field(
        default=None, description="reward-weighted-likelihood weights, when asked for; None where unscored"
    )
    normalization: str = "none"
    aggregation: str = "weighted_sum"
