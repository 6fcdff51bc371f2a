"""GRPO's pieces (r2d3ray/algorithms/grpo.py) against values computed by hand."""

import math

import pytest
import torch

from r2d3ray.algorithms.grpo import GRPO, group_advantages, transition_log_prob
from r2d3ray.config import GRPOConfig


def test_advantages_are_standardised_within_each_prompts_group_and_clipped():
    advantages = group_advantages(torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0]), ["a", "a", "a", "b", "b"])
    # Group a: mean 2, population std √(2/3); group b: std 0, so (R − mean)/(0 + 1e-4) = 0.
    scale = math.sqrt(2 / 3) + 1e-4
    torch.testing.assert_close(advantages, torch.tensor([-1 / scale, 0.0, 1 / scale, 0.0, 0.0]))
    # Mean 0.25, std √0.1875 = 0.433: the odd one out is 1.732 before the clip at 1.5.
    clipped = group_advantages(torch.tensor([0.0, 0.0, 0.0, 1.0]), ["p"] * 4, adv_clip_max=1.5)
    torch.testing.assert_close(clipped, torch.tensor([-0.25 / (0.1875**0.5 + 1e-4)] * 3 + [1.5]))
    with pytest.raises(ValueError, match="one per reward"):
        group_advantages(torch.zeros(3), ["a", "b"])


def test_log_prob_is_the_gaussian_density_averaged_over_dimensions():
    log_prob = transition_log_prob(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2), torch.ones(1, 1))
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(log_prob, torch.tensor([((-0.5 - half_log_2pi) + (-2.0 - half_log_2pi)) / 2]))
    # A wider Gaussian: −(x − μ)²/(2σ²) − log σ − ½log 2π with σ = 2.
    wide = transition_log_prob(torch.tensor([[2.0]]), torch.zeros(1, 1), torch.full((1, 1), 2.0))
    torch.testing.assert_close(wide, torch.tensor([-0.5 - math.log(2) - half_log_2pi]))


def test_loss_clips_the_ratio_where_ppo_does_and_adds_the_kl_to_the_reference():
    algo = GRPO(GRPOConfig(clip_range=0.2, kl_coef=0.1))
    old = torch.zeros(2)
    log_prob = torch.log(torch.tensor([1.1, 0.5])).requires_grad_(True)  # ratios 1.1 and 0.5
    advantages = torch.tensor([1.0, -1.0])
    mean_policy = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    std = torch.ones(2, 1)
    loss, terms = algo.loss(log_prob, old, advantages, mean_policy, torch.zeros(2, 2), std)
    # Sample 0: inside the clip, −A·ρ = −1.1. Sample 1: A < 0 and ρ = 0.5 < 0.8, so max(0.5, 0.8) = 0.8.
    # KL per dimension (μ − μ_ref)²/(2σ²): sample 0 mean(0.5, 0.5) = 0.5, sample 1 mean(0, 2) = 1.
    torch.testing.assert_close(loss, torch.tensor(-0.15 + 0.1 * 0.75))
    assert terms["policy_loss"] == pytest.approx(-0.15) and terms["kl"] == pytest.approx(0.75)
    assert terms["clip_fraction"] == pytest.approx(0.5)  # |ρ − 1| = 0.1 and 0.5: one of two beyond 0.2
    (grad,) = torch.autograd.grad(loss, log_prob)
    # ∂/∂log ρ of −A·ρ/B is −A·ρ/2 = −0.55 for the unclipped sample; the clipped one passes no gradient.
    torch.testing.assert_close(grad, torch.tensor([-0.55, 0.0]))


def test_a_weight_of_zero_leaves_a_sample_out_of_the_loss():
    algo = GRPO(GRPOConfig(clip_range=0.2, kl_coef=0.0))
    log_prob = torch.zeros(2, requires_grad=True)
    loss, _ = algo.loss(log_prob, torch.zeros(2), torch.tensor([1.0, float("nan")]).nan_to_num(), torch.zeros(2, 1),
                        None, torch.ones(2, 1), weight=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(loss, torch.tensor(-0.5))  # (−1·1 + 0)/2
