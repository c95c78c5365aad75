"""What a trainer adapter does with items the service could not score, so a failure never reaches a training loop
as a silent NaN: RL trainers normalise rewards into advantages over the whole batch (mean and std), and one NaN
there turns every advantage, and the loss, into NaN.

on_failure:
- "raise" (default): a clear error naming each failed item and why. Nothing reaches the trainer.
- "impute": a failed item gets the mean of the call's valid items with the same prompt, else the mean of the valid
  values of this call and the recent ones (trainers call the reward once per sample batch and normalise over all
  the batches of a step); a warning counts them and the metadata marks them (`imputed`). With that mean in its
  place, the failed sample's advantage lands near 0 under the trainers' normalisation, so it barely moves the
  policy.
- "nan": NaN stays, for loops that mask; `nan_aware_advantages` is a drop-in normalisation that does.

A prompt the service can never score (its nouns are none the detector knows) is reported once per adapter, not at
every step.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from .results import ScoreBatch

log = logging.getLogger("rewardscope_client")

ON_FAILURE = ("raise", "impute", "nan")
# Error codes that a prompt will get at every step, whatever the image: reported once.
NEVER_SCORABLE = frozenset({"no_countable_object", "unknown_class", "empty_prompt", "colour_unavailable"})


class ItemsFailed(RuntimeError):
    """Items of a reward call that the service could not score, under on_failure="raise"."""

    def __init__(self, failed: Sequence[int], batch: ScoreBatch, total: int) -> None:
        self.indices = list(failed)
        self.reasons = {i: (batch.error_codes[i], batch.errors[i]) for i in self.indices}
        listed = "; ".join(f"item {i}: {code or 'error'}: {error}" for i, (code, error) in self.reasons.items())
        super().__init__(
            f"{len(self.indices)} of {total} items could not be scored ({listed}). Pass on_failure='impute' to give "
            "each the mean reward of the call's valid items with its prompt, or on_failure='nan' to mask them yourself"
        )


class FailurePolicy:
    """Applies on_failure to the values a trainer receives; remembers the prompts it already reported."""

    def __init__(self, on_failure: str = "raise", history: int = 256) -> None:
        if on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure must be one of {', '.join(ON_FAILURE)}; got {on_failure!r}")
        self.on_failure = on_failure
        self._reported: set[str] = set()
        # Valid values of the recent calls, per series ("total" or a reward's name): trainers call the reward once
        # per sample batch and normalise over the epoch's batches, so a failed item whose prompt has no valid item
        # in its call takes the recent mean, not the mean of one small call.
        self._recent: dict[str, collections.deque[float]] = {}
        self.history = history
        self._lock = threading.Lock()

    def check(self, batch: ScoreBatch, prompts: Sequence[str]) -> np.ndarray:
        """bool [B]: the failed items (no total). Raises ItemsFailed under "raise"; reports never-scorable prompts
        once; under "impute", refuses a call in which nothing scored when nothing valid was scored before either
        (there is nothing to impute from)."""
        failed = ~batch.valid
        if not failed.any():
            return failed
        indices = np.flatnonzero(failed).tolist()
        for i in indices:
            prompt = prompts[i] if i < len(prompts) else ""
            if batch.error_codes[i] in NEVER_SCORABLE and prompt not in self._reported:
                self._reported.add(prompt)
                log.warning("prompt %r can never be scored by this service: %s", prompt, batch.errors[i])
        with self._lock:
            seen_valid = any(self._recent.values())
        if self.on_failure == "raise" or (self.on_failure == "impute" and failed.all() and not seen_valid):
            raise ItemsFailed(indices, batch, len(failed))
        if self.on_failure == "impute":
            log.warning(
                "rewardscope: %d of %d rewards imputed (items %s): the mean of their prompt's valid items",
                len(indices),
                len(failed),
                indices,
            )
        return failed

    def imputed(self, failed: np.ndarray) -> np.ndarray:
        """bool [B]: the items whose reward was imputed (the metadata's `imputed`)."""
        return failed.copy() if self.on_failure == "impute" else np.zeros_like(failed)

    def apply(
        self, values: np.ndarray, failed: np.ndarray, prompts: Sequence[str], series: str = "total"
    ) -> np.ndarray:
        """values [B] float64 with the failed items imputed (under "impute"), or as they are. A failed item with no
        valid item of its prompt in the call takes the mean of the valid values of this call and the recent ones
        (`history` values of `series`)."""
        if self.on_failure != "impute":
            return values
        valid = values[np.isfinite(values) & ~failed].tolist()
        with self._lock:
            recent = self._recent.setdefault(series, collections.deque(maxlen=self.history))
            recent.extend(valid)
            pool = list(recent)
        if not failed.any() and np.isfinite(values).all():
            return values
        return impute(values, failed, prompts, fallback=float(np.mean(pool)) if pool else None)


def impute(values: np.ndarray, failed: np.ndarray, prompts: Sequence[str], fallback: float | None = None) -> np.ndarray:
    """Each failed (or non-finite) entry -> the mean of the finite entries with the same prompt, else `fallback`
    (given: the recent mean), else the mean of all finite entries. values [B]; failed bool [B]."""
    out = np.array(values, dtype=np.float64, copy=True)
    missing = failed | ~np.isfinite(out)
    usable = ~missing
    if not usable.any() and fallback is None:
        raise ValueError("no valid value to impute from")
    prompt_of = np.asarray([str(p) for p in prompts], dtype=object)
    for i in np.flatnonzero(missing):
        same = usable & (prompt_of == prompt_of[i])
        out[i] = out[same].mean() if same.any() else fallback if fallback is not None else out[usable].mean()
    return out


def nan_aware_advantages(rewards: Any, prompts: Sequence[str] | None = None, eps: float = 1e-8) -> Any:
    """(r - mean) / (std + eps) over the finite rewards (per prompt when `prompts` is given and the prompt has at
    least two finite rewards, else over the whole batch); a non-finite reward gets advantage 0. numpy in, numpy out;
    a torch tensor in, a tensor out (same dtype and device)."""
    tensor = None
    if type(rewards).__module__.startswith("torch"):
        tensor = rewards
        rewards = rewards.detach().double().cpu().numpy()
    values = np.asarray(rewards, dtype=np.float64)
    finite = np.isfinite(values)
    advantages = np.zeros_like(values)
    if finite.any():
        groups = [finite]
        if prompts is not None:
            prompt_of = np.asarray([str(p) for p in prompts], dtype=object)
            groups = [(prompt_of == prompt) & finite for prompt in dict.fromkeys(prompt_of.tolist())]
        for group in groups:
            pool = group if group.sum() >= 2 else finite
            mean, std = values[pool].mean(), values[pool].std()
            advantages[group] = (values[group] - mean) / (std + eps)
    if tensor is not None:
        import torch

        return torch.as_tensor(advantages, dtype=tensor.dtype, device=tensor.device)
    return advantages
