"""Python client of the rewardscope reward-scoring service: sync and async clients, image transport,
and reward functions for RL trainers (rewardscope_client.adapters). torch is optional and imported lazily;
rewardscope_client.autograd (RemoteReward) needs it."""

from ._version import __version__
from .client import AsyncRewardClient, RewardClient
from .images import encode_image, encode_images, split_images, to_uint8
from .protocol import RetryPolicy
from .results import GradBatch, RewardServiceError, ScoreBatch

__all__ = [
    "AsyncRewardClient",
    "GradBatch",
    "RetryPolicy",
    "RewardClient",
    "RewardServiceError",
    "ScoreBatch",
    "__version__",
    "encode_image",
    "encode_images",
    "split_images",
    "to_uint8",
]
