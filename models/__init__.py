"""rewardscope rewards: the Scorer, the reward registry and the rewards themselves.
`from models import Scorer` is the in-process API."""

from .detection.detector import single_threaded
from .registry import create_reward, list_rewards, register_reward
from .scorer import Scorer
from .types import RewardOutput, Sample, ScoreResult

__all__ = [
    "RewardOutput",
    "Sample",
    "ScoreResult",
    "Scorer",
    "create_reward",
    "list_rewards",
    "register_reward",
    "single_threaded",
]
