"""Reward functions in the signatures RL trainers call: TRL's DDPOTrainer (and ddpo-pytorch) and flow-GRPO,
each with a `.submit(...)` that returns a Future so sampling the next batch overlaps scoring this one.

Failed items come back as NaN, with the reasons in the metadata (`errors`, `error_codes`) and a `valid` mask:
training code must mask NaN rewards (e.g. drop those samples from the advantage statistics), never fill 0 —
a 0 would teach the model that the image was bad when the service merely could not score it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np

from .client import Metadata, RewardClient
from .images import is_torch_tensor
from .protocol import RewardSpec
from .results import ScoreBatch

Result = TypeVar("Result")


def _then(future: Future[ScoreBatch], finish: Callable[[ScoreBatch], Result]) -> Future[Result]:
    """A Future of finish(batch) once `future` resolves; errors propagate."""
    chained: Future[Result] = Future()

    def resolve(done: Future[ScoreBatch]) -> None:
        if done.cancelled():
            chained.cancel()
            return
        try:
            chained.set_result(finish(done.result()))
        except Exception as exc:  # handed to the waiting caller, not swallowed
            chained.set_exception(exc)

    future.add_done_callback(resolve)
    return chained


def _torch_device(images: Any) -> Any:
    """The device of the input's tensor(s), or None when the input holds no torch tensor."""
    if is_torch_tensor(images):
        return images.device
    if isinstance(images, (list, tuple)):
        for image in images:
            if is_torch_tensor(image):
                return image.device
    return None


def batch_info(batch: ScoreBatch) -> dict[str, Any]:
    """What a trainer logs next to the rewards: per-reward arrays, the valid mask, errors, details, versions."""
    return {
        "rewards": batch.rewards,
        "total": batch.total,
        "valid": batch.valid,
        "errors": batch.errors,
        "error_codes": batch.error_codes,
        "details": batch.details,
        "versions": batch.versions,
    }


def _select(batch: ScoreBatch, select: str) -> np.ndarray:
    if select == "total":
        return batch.total
    if select not in batch.rewards:
        raise KeyError(f"reward {select!r} not in the service's answer; it has {sorted(batch.rewards)}")
    return batch.rewards[select]


class DDPORewardFunction:
    """reward_fn(images, prompts, prompt_metadata) -> (rewards [B], metadata dict): TRL DDPOTrainer's
    `reward_function` and ddpo-pytorch's reward_fn.

    images: a tensor [B, 3, H, W] in [0, 1] (as the pipelines produce), or anything RewardClient.score takes.
    rewards: float32 torch tensor on the images' device when the images are torch tensors, else float64 numpy.
    NaN marks a failed item (metadata["errors"] says why; metadata["valid"] is the mask).
    """

    def __init__(
        self, client: RewardClient, rewards: str | RewardSpec | None, profile: str | None, select: str
    ) -> None:
        self.client, self.rewards, self.profile, self.select = client, rewards, profile, select

    def _finish(self, device: Any) -> Callable[[ScoreBatch], tuple[Any, dict[str, Any]]]:
        def finish(batch: ScoreBatch) -> tuple[Any, dict[str, Any]]:
            values = _select(batch, self.select)
            if device is not None:
                import torch  # the input was a tensor, so torch is importable

                return torch.as_tensor(values, dtype=torch.float32, device=device), batch_info(batch)
            return values, batch_info(batch)

        return finish

    def __call__(
        self, images: Any, prompts: Sequence[str], prompt_metadata: Metadata = None
    ) -> tuple[Any, dict[str, Any]]:
        batch = self.client.score(images, prompts, prompt_metadata, rewards=self.rewards, profile=self.profile)
        return self._finish(_torch_device(images))(batch)

    def submit(
        self, images: Any, prompts: Sequence[str], prompt_metadata: Metadata = None
    ) -> Future[tuple[Any, dict[str, Any]]]:
        """The same call in the background: a Future of (rewards, metadata); the inputs may be reused at once."""
        future = self.client.score_async(images, prompts, prompt_metadata, rewards=self.rewards, profile=self.profile)
        return _then(future, self._finish(_torch_device(images)))


class FlowGRPORewardFunction:
    """reward_fn(images, prompts, metadata, only_strict=True) -> (scores, info): flow-GRPO's multi_score
    signature. scores: {reward name: float64 [B], ..., "avg": the weighted total [B]}, the dict flow-GRPO's
    training loop reads ("avg" is the training reward); NaN marks a failed item (info["errors"] says why,
    info["valid"] is the mask). only_strict is accepted for compatibility and has no effect: the service
    computes the rewards asked for.
    """

    def __init__(self, client: RewardClient, rewards: str | RewardSpec | None, profile: str | None) -> None:
        self.client, self.rewards, self.profile = client, rewards, profile

    @staticmethod
    def _finish(batch: ScoreBatch) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return {**batch.rewards, "avg": batch.total}, batch_info(batch)

    def __call__(
        self, images: Any, prompts: Sequence[str], metadata: Metadata = None, only_strict: bool = True
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        del only_strict
        return self._finish(self.client.score(images, prompts, metadata, rewards=self.rewards, profile=self.profile))

    def submit(
        self, images: Any, prompts: Sequence[str], metadata: Metadata = None, only_strict: bool = True
    ) -> Future[tuple[dict[str, np.ndarray], dict[str, Any]]]:
        """The same call in the background: a Future of (scores, info); the inputs may be reused at once."""
        del only_strict
        future = self.client.score_async(images, prompts, metadata, rewards=self.rewards, profile=self.profile)
        return _then(future, self._finish)


def ddpo_reward_fn(
    client: RewardClient, rewards: str | RewardSpec | None = None, profile: str | None = None, select: str = "total"
) -> DDPORewardFunction:
    """A TRL DDPOTrainer `reward_function` scoring through `client`.

    rewards / profile: as RewardClient.score. select: "total" (the weighted sum) or one reward's name.
    Usage: DDPOTrainer(config, ddpo_reward_fn(RewardClient(url)), prompt_fn, pipeline).
    """
    return DDPORewardFunction(client, rewards, profile, select)


def flow_grpo_reward_fn(
    client: RewardClient, rewards: str | RewardSpec | None = None, profile: str | None = None
) -> FlowGRPORewardFunction:
    """A flow-GRPO reward_fn scoring through `client`: a drop-in for `multi_score(device, score_dict)`.
    With rewards={name: weight}, "avg" is the service's weighted total, as multi_score's is.
    For overlap: `future = reward_fn.submit(images, prompts, metadata)` in place of executor.submit(reward_fn, ...)."""
    return FlowGRPORewardFunction(client, rewards, profile)
