"""Alignment algorithms as losses over tensors: each module takes its config section from
``r2d3ray.config`` (the reference's names), lists what it needs from a rollout, and has
``loss(...) -> (loss, terms)``. Nothing here talks to Ray or to a reward model: reward gradients
arrive as tensors."""

from r2d3ray.algorithms.grpo import GRPO, group_advantages, transition_log_prob
from r2d3ray.algorithms.nabla import (FlowTerms, NablaConfig, NablaR2D3, TransitionScores,
                                      forward_looking_reward_grad, pull_back, render_at_x0, reverse_score,
                                      transition_scores)
from r2d3ray.algorithms.nft import (DiffusionNFT, NFTConfig, ema_decay_at, old_policy_decay,
                                    optimality_probability, soft_update_)
from r2d3ray.algorithms.reward_backprop import RewardBackprop, RewardBackpropConfig
from r2d3ray.algorithms.subsampling import num_train_steps, random_steps, stratified_steps

__all__ = [
    "DiffusionNFT", "FlowTerms", "GRPO", "group_advantages", "transition_log_prob", "NFTConfig", "NablaConfig", "NablaR2D3", "RewardBackprop",
    "RewardBackpropConfig", "TransitionScores", "ema_decay_at", "forward_looking_reward_grad", "num_train_steps",
    "old_policy_decay", "optimality_probability", "pull_back", "random_steps", "render_at_x0", "reverse_score",
    "soft_update_",
    "stratified_steps", "transition_scores",
]
