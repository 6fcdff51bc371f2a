"""GRPO for diffusion: the policy-gradient baseline beside reward backprop.

As Flow-GRPO (`scripts/train_sd3.py`, `flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`) and DDPO
before it: the SDE sampler makes every denoising step a Gaussian policy
p_θ(x_{t-1}|x_t) = N(μ_θ(x_t), σ_t²I), so a trajectory has a log-probability. Per prompt G samples are
drawn (a group); each gets the group-relative advantage

    A = clip((R − mean of its group's R) / (std of its group's R + 1e-4), −adv_clip_max, adv_clip_max)

and, for a few of its transitions, the PPO loss on the importance ratio ρ = p_θ / p_old of the sampled
x_{t-1} (p_old: the policy that sampled it, whose log-probability the rollout recorded):

    L = mean_b max(−A_b·ρ_b, −A_b·clip(ρ_b, 1 − ε, 1 + ε)) + kl_coef·mean_b ‖μ_θ − μ_ref‖² / (2σ_t²)

Log-probabilities are the Gaussian log-density averaged over the sample's dimensions, as Flow-GRPO
(so ρ stays near 1 and ``clip_range`` is 1e-4); the KL is that of two Gaussians with the same σ_t,
per dimension. Rewards are values only: no reward gradient is needed.

One training step (B samples, each at its own step ``steps[:, k]``)::

    A = group_advantages(rewards, prompts, cfg.adv_clip_max)                     # once per epoch
    old_log_prob = transition_log_prob(x_prev, μ_sampling, σ)                    # recorded at sampling
    μ_θ, σ = transition_scores(sampler, ε_θ(x_t), steps[:, k], x_t, x_prev)      # grad to θ
    μ_ref = transition_scores(sampler, ε_ref(x_t), ...).mean                      # adapters off, no grad
    loss, terms = algo.loss(transition_log_prob(x_prev, μ_θ, σ), old_log_prob, A, μ_θ, μ_ref, σ)
"""

from __future__ import annotations

import math
from typing import Hashable, Sequence

import torch

from r2d3ray.algorithms.subsampling import num_train_steps, random_steps
from r2d3ray.config import GRPOConfig

STD_EPS = 1e-4  # Flow-GRPO's PerPromptStatTracker: std + 1e-4


def group_advantages(rewards: torch.Tensor, prompt_ids: Sequence[Hashable], adv_clip_max: float = 5.0) -> torch.Tensor:
    """Rewards (N,) → advantages (N,): standardised within each prompt's group (population std), clipped."""
    rewards = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
    keys = list(prompt_ids)
    if len(keys) != rewards.shape[0]:
        raise ValueError(f"prompt_ids has {len(keys)} entries: expected one per reward ({rewards.shape[0]})")
    advantages = torch.empty_like(rewards)
    for key in dict.fromkeys(keys):
        rows = torch.tensor([i for i, k in enumerate(keys) if k == key])
        group = rewards[rows]
        advantages[rows] = (group - group.mean()) / (group.std(unbiased=False) + STD_EPS)
    return advantages.clamp(-adv_clip_max, adv_clip_max).float()


def transition_log_prob(x_prev: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x_prev; mean, std²) averaged over each sample's dimensions: (B,). ``x_prev`` is data
    (no gradient through it); the graph goes through ``mean``."""
    x_prev, mean, std = x_prev.detach().float(), mean.float(), std.float()
    log_density = -((x_prev - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
    return log_density.flatten(1).mean(dim=1)


class GRPO:
    """The clipped policy-gradient loss with a KL to the reference, per batch of transitions."""

    def __init__(self, config: GRPOConfig | None = None):
        self.config = config or GRPOConfig()

    def transition_steps(self, batch_size: int, num_steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, n) the sampler steps each sample trains, n = timestep_fraction of the steps (Flow-GRPO
        shuffles the timesteps per sample and trains the first n)."""
        n = num_train_steps(num_steps, self.config.timestep_fraction)
        return random_steps(batch_size, num_steps, n, generator=generator)

    def loss(self, log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
             mean_policy: torch.Tensor, mean_ref: torch.Tensor | None, std: torch.Tensor,
             weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """log_prob, old_log_prob, advantages, weight: (B,); means (B, ...) with std broadcastable.
        ``weight`` 0 leaves a sample out (a non-finite reward) while keeping the batch's shape."""
        c = self.config
        weight = torch.ones_like(log_prob) if weight is None else weight.to(log_prob.dtype)
        advantages = advantages.to(log_prob.dtype)
        ratio = torch.exp(log_prob - old_log_prob.detach())
        unclipped = -advantages * ratio
        clipped = -advantages * ratio.clamp(1.0 - c.clip_range, 1.0 + c.clip_range)
        policy_loss = (torch.maximum(unclipped, clipped) * weight).mean()
        loss, terms = policy_loss, {"policy_loss": float(policy_loss.detach())}
        if c.kl_coef > 0 and mean_ref is not None:
            kl = (((mean_policy.float() - mean_ref.float()) ** 2) / (2 * std.float() ** 2)).flatten(1).mean(dim=1)
            kl_loss = (kl * weight).mean()
            loss = loss + c.kl_coef * kl_loss
            terms["kl"] = float(kl_loss.detach())
        with torch.no_grad():
            terms.update({"loss": float(loss), "ratio_mean": float(ratio.mean()),
                          "clip_fraction": float(((ratio - 1).abs() > c.clip_range).float().mean())})
        return loss, terms
