"""Reward functions in the signatures RL trainers call: TRL's DDPOTrainer (and ddpo-pytorch) and flow-GRPO,
each with a `.submit(...)` that returns a Future so sampling the next batch overlaps scoring this one.

Items the service could not score follow `on_failure` (rewardscope_client.failures): "raise" (default) names them
in an error, "impute" gives each the mean of its prompt's valid items (marked in the metadata's `imputed`), "nan"
leaves NaN for loops that mask. Never 0: a 0 would teach the model that the image was bad when the service merely
could not score it. The metadata keeps the reasons (`errors`, `error_codes`) and the `valid` mask.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np

from .client import Metadata, RewardClient
from .failures import FailurePolicy
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


class _OnResult(Future):
    """A Future finished when its result is first asked for (the scoring behind it still runs in the background):
    trainers resolve a step's reward futures in batch order (TRL: `[(r.result(), m.result()) for r, m in mapped]`),
    so a failed item imputed in one call sees the valid rewards of the calls resolved before it (FailurePolicy keeps
    that history), however the background calls raced."""

    def __init__(self, source: Future[Any], finish: Callable[[Any], Any]) -> None:
        super().__init__()
        self._source, self._finish, self._finishing = source, finish, threading.Lock()

    def result(self, timeout: float | None = None) -> Any:
        with self._finishing:
            if not super().done():
                try:
                    self.set_result(self._finish(self._source.result(timeout)))
                except Exception as exc:  # handed to the caller, as a Future does
                    self.set_exception(exc)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            self.result(timeout)
        except Exception as exc:
            return exc
        return None

    def done(self) -> bool:
        return super().done() or self._source.done()

    def add_done_callback(self, fn: Callable[[Future[Any]], object]) -> None:
        self._source.add_done_callback(lambda _: fn(self))


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
    Failed items: see on_failure (module docstring). as_futures: the call returns (Future[rewards],
    Future[metadata]), what TRL's `async_reward_computation=True` branch unpacks and resolves.
    """

    def __init__(
        self,
        client: RewardClient,
        rewards: str | RewardSpec | None,
        profile: str | None,
        select: str,
        on_failure: str = "raise",
        as_futures: bool = False,
    ) -> None:
        self.client, self.rewards, self.profile, self.select = client, rewards, profile, select
        self.policy, self.as_futures = FailurePolicy(on_failure), as_futures

    def _finish(self, device: Any, prompts: Sequence[str]) -> Callable[[ScoreBatch], tuple[Any, dict[str, Any]]]:
        def finish(batch: ScoreBatch) -> tuple[Any, dict[str, Any]]:
            failed = self.policy.check(batch, prompts)
            values = self.policy.apply(_select(batch, self.select), failed, prompts, self.select)
            info = {**batch_info(batch), "imputed": self.policy.imputed(failed)}
            if device is not None:
                import torch  # the input was a tensor, so torch is importable

                return torch.as_tensor(values, dtype=torch.float32, device=device), info
            return values, info

        return finish

    def __call__(self, images: Any, prompts: Sequence[str], prompt_metadata: Metadata = None) -> Any:
        if self.as_futures:
            both = self.submit(images, prompts, prompt_metadata)
            return _OnResult(both, lambda pair: pair[0]), _OnResult(both, lambda pair: pair[1])
        batch = self.client.score(images, prompts, prompt_metadata, rewards=self.rewards, profile=self.profile)
        return self._finish(_torch_device(images), list(prompts))(batch)

    def submit(
        self, images: Any, prompts: Sequence[str], prompt_metadata: Metadata = None
    ) -> Future[tuple[Any, dict[str, Any]]]:
        """The same call in the background: a Future of (rewards, metadata); the inputs may be reused at once."""
        future = self.client.score_async(images, prompts, prompt_metadata, rewards=self.rewards, profile=self.profile)
        return _OnResult(future, self._finish(_torch_device(images), list(prompts)))


class FlowGRPORewardFunction:
    """reward_fn(images, prompts, metadata, only_strict=True) -> (scores, info): flow-GRPO's multi_score
    signature. scores: {reward name: float64 [B], ..., "avg": the weighted total [B]}, the dict flow-GRPO's
    training loop reads ("avg" is the training reward). Failed items: see on_failure (module docstring); info
    keeps `errors`, `valid` and `imputed`. only_strict is accepted for compatibility and has no effect: the
    service computes the rewards asked for.
    """

    def __init__(
        self, client: RewardClient, rewards: str | RewardSpec | None, profile: str | None, on_failure: str = "raise"
    ) -> None:
        self.client, self.rewards, self.profile = client, rewards, profile
        self.policy = FailurePolicy(on_failure)

    def _finish(self, prompts: Sequence[str]) -> Callable[[ScoreBatch], tuple[dict[str, np.ndarray], dict[str, Any]]]:
        def finish(batch: ScoreBatch) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
            failed = self.policy.check(batch, prompts)
            scores = {name: self.policy.apply(values, failed, prompts, name) for name, values in batch.rewards.items()}
            scores["avg"] = self.policy.apply(batch.total, failed, prompts)
            return scores, {
                **batch_info(batch),
                "imputed": self.policy.imputed(failed),
            }

        return finish

    def __call__(
        self, images: Any, prompts: Sequence[str], metadata: Metadata = None, only_strict: bool = True
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        del only_strict
        batch = self.client.score(images, prompts, metadata, rewards=self.rewards, profile=self.profile)
        return self._finish(list(prompts))(batch)

    def submit(
        self, images: Any, prompts: Sequence[str], metadata: Metadata = None, only_strict: bool = True
    ) -> Future[tuple[dict[str, np.ndarray], dict[str, Any]]]:
        """The same call in the background: a Future of (scores, info); the inputs may be reused at once."""
        del only_strict
        future = self.client.score_async(images, prompts, metadata, rewards=self.rewards, profile=self.profile)
        return _OnResult(future, self._finish(list(prompts)))


def ddpo_reward_fn(
    client: RewardClient,
    rewards: str | RewardSpec | None = None,
    profile: str | None = None,
    select: str = "total",
    on_failure: str = "raise",
    as_futures: bool = False,
) -> DDPORewardFunction:
    """A TRL DDPOTrainer `reward_function` scoring through `client` (DDPOTrainer exists in trl < 0.24).

    rewards / profile: as RewardClient.score. select: "total" (the weighted sum) or one reward's name.
    on_failure: "raise" | "impute" | "nan" (rewardscope_client.failures). as_futures=True for
    DDPOConfig(async_reward_computation=True). Usage: DDPOTrainer(config, ddpo_reward_fn(RewardClient(url)),
    prompt_fn, pipeline).
    """
    return DDPORewardFunction(client, rewards, profile, select, on_failure, as_futures)


def flow_grpo_reward_fn(
    client: RewardClient,
    rewards: str | RewardSpec | None = None,
    profile: str | None = None,
    on_failure: str = "raise",
) -> FlowGRPORewardFunction:
    """A flow-GRPO reward_fn scoring through `client`: a drop-in for `multi_score(device, score_dict)`.
    With rewards={name: weight}, "avg" is the service's weighted total, as multi_score's is.
    on_failure: "raise" | "impute" | "nan" (rewardscope_client.failures).
    For overlap: `future = reward_fn.submit(images, prompts, metadata)` in place of executor.submit(reward_fn, ...)."""
    return FlowGRPORewardFunction(client, rewards, profile, on_failure)


# More trainers live in rewardscope_client.trainers (it imports this module, so they are re-exported lazily):
# AlignProp (differentiable, through POST /grad), verl / verl-omni and DanceGRPO (per-sample calls coalesced into
# batched requests), and the config-string factories of ddpo-pytorch and flow_grpo.
_TRAINER_ADAPTERS = frozenset(
    {"alignprop_reward_fn", "verl_compute_score", "dancegrpo_reward", "ddpo_pytorch_reward", "flow_grpo_score"}
)


def __getattr__(name: str) -> Any:
    if name in _TRAINER_ADAPTERS:
        from . import trainers

        return getattr(trainers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
