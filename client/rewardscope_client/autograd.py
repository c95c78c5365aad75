"""RemoteReward: a remote reward inside torch autograd. The forward pass sends the images to POST /grad and
returns the rewards on the caller's device; the backward pass multiplies the upstream gradient by the
d(reward)/d(image) the service returned with them. So a training job that holds no reward model can run

    loss = -remote_reward(images, prompts, client).mean()
    loss.backward()

and direct reward fine-tuning (ReFL, DRaFT, AlignProp) back-propagates through the remote reward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .client import RewardClient
from .protocol import RewardSpec


class RemoteReward(torch.autograd.Function):
    """apply(images [B, 3, H, W] float in [0, 1], prompts, client, rewards, profile) -> total reward [B].

    A failed item raises (RuntimeError with the service's per-item message) rather than returning a value:
    a NaN inside a loss would poison the whole step, and a 0 would be a wrong reward."""

    @staticmethod
    def forward(ctx: Any, images: torch.Tensor, prompts: Sequence[str], client: RewardClient, rewards, profile):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W]; got {tuple(images.shape)}")
        batch = client.grad(images.detach(), prompts, rewards=rewards, profile=profile)
        failed = [(i, batch.errors[i]) for i in range(len(batch)) if not batch.valid[i]]
        if failed:
            summary = "; ".join(f"item {i}: {message}" for i, message in failed[:3])
            raise RuntimeError(f"{len(failed)} of {len(batch)} items could not be scored: {summary}")
        ctx.save_for_backward(torch.from_numpy(np.stack(batch.grads)).to(images.device, images.dtype))
        return torch.from_numpy(batch.total).to(images.device, images.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        (grads,) = ctx.saved_tensors
        return grad_output[:, None, None, None] * grads, None, None, None, None


def remote_reward(
    images: torch.Tensor,
    prompts: str | Sequence[str],
    client: RewardClient,
    rewards: str | RewardSpec | None = None,
    profile: str | None = None,
) -> torch.Tensor:
    """The weighted total reward [B] of the served differentiable rewards, differentiable in `images`."""
    prompt_list = [prompts] * images.shape[0] if isinstance(prompts, str) else list(prompts)
    return RemoteReward.apply(images, prompt_list, client, rewards, profile)
