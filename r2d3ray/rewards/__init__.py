"""Rewards on rendered views: the interface (base), the registry, the combiner, and the rewards.

Reward modules are imported on demand by ``build_reward`` so that importing this package stays cheap.
"""

from r2d3ray.rewards.base import NonFiniteRewardError, RewardModel, RewardOutput
from r2d3ray.rewards.combiner import CombinedReward, RewardAnswer, RewardCombiner
from r2d3ray.rewards.registry import available_rewards, build_reward, register_reward, rewards_from_app_config

__all__ = [
    "CombinedReward",
    "NonFiniteRewardError",
    "RewardAnswer",
    "RewardCombiner",
    "RewardModel",
    "RewardOutput",
    "available_rewards",
    "build_reward",
    "register_reward",
    "rewards_from_app_config",
]
