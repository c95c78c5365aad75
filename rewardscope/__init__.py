"""rewardscope: reward scoring for text-to-image alignment. `from rewardscope import Scorer` is the Python API.

The card's folders at the repo root are this package's subpackages: service/ -> rewardscope.service, models/ ->
rewardscope.models, kernels/ -> rewardscope.kernels (pyproject.toml maps them; they hold no __init__.py, so none of
them is ever importable as a top-level package). The names below load on first use, so `import rewardscope`
(and the CLI's start) does not pay for torch until a Scorer is wanted.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

# Run from a checkout (pytest, `python -m`, `bentoml serve` at the repo root), this folder is found before the
# installed one; extend_path adds the installed package's folder, where the card's folders are mapped.
__path__ = pkgutil.extend_path(__path__, __name__)

__version__ = "0.2.0"

_EXPORTS = {
    "Scorer": "rewardscope.models.scorer",
    "create_reward": "rewardscope.models.registry",
    "list_rewards": "rewardscope.models.registry",
    "register_reward": "rewardscope.models.registry",
    "RewardOutput": "rewardscope.models.types",
    "Sample": "rewardscope.models.types",
    "ScoreResult": "rewardscope.models.types",
}

__all__ = [
    "RewardOutput",
    "Sample",
    "ScoreResult",
    "Scorer",
    "__version__",
    "create_reward",
    "list_rewards",
    "register_reward",
]

if TYPE_CHECKING:
    from rewardscope.models.registry import create_reward, list_rewards, register_reward
    from rewardscope.models.scorer import Scorer
    from rewardscope.models.types import RewardOutput, Sample, ScoreResult


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rewardscope' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
