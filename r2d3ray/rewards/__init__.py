"""Rewards on rendered views: the interface (base), the registry and combination, and the rewards.

Reward modules are imported on demand by ``build_reward`` so that importing this package stays cheap.
"""

from r2d3ray.rewards.base import NonFiniteRewardError, RewardModel, RewardOutput
from r2d3ray.rewards.registry import (
    CombinedReward,
    CombinedRewardOutput,
    available_rewards,
    build_reward,
    register_reward,
)

__all__ = [
    "CombinedReward",
    "CombinedRewardOutput",
    "NonFiniteRewardError",
    "RewardModel",
    "RewardOutput",
    "available_rewards",
    "build_reward",
    "register_reward",
]
