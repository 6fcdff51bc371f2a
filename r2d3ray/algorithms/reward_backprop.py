"""Reward backpropagation baseline (ReFL / DRaFT-K style): maximise R(x_0) by differentiating through
the last K sampling steps.

The trainer samples as usual but keeps the autograd graph for the last ``grad_steps`` (K) steps only;
earlier steps run under no_grad, so the gradient is the truncated one of DRaFT-K (K = 1 is ReFL-like:
one differentiable denoising step). The reward gradient arrives as a tensor for the rendered images,
exactly as for Nabla, and is pushed back through renderer, decoder and the last K policy calls::

    x = x_T
    for i, t in enumerate(sampler.timesteps):
        with torch.set_grad_enabled(algo.grad_enabled(i, T)):
            x = algo.step(sampler, eps(policy(x, t)), i, x, generator)
    images = render(x)                                  # graph back to the last K policy calls
    values, grad = reward_grad(images.detach())         # reward plane: (B,), ∂Σ values/∂images
    loss, terms = algo.loss(images, values, grad)

What a rollout must record (``rollout_fields``): nothing — the graph of the sample itself, within one
iteration. Same LoRA parameters and optimizer as the other algorithms; no reference model, no KL.
"""

from __future__ import annotations


import torch

from r2d3ray.config import RewardBackpropConfig

from r2d3ray.models.schedulers import SDEDPMSolver


class RewardBackprop:
    """The reward-backprop loss and the sampling hooks it needs. See the module docstring."""

    rollout_fields = ()

    def __init__(self, config: RewardBackpropConfig | None = None):
        self.config = config or RewardBackpropConfig()

    def grad_enabled(self, step_index: int, num_steps: int) -> bool:
        """Whether sampling step ``step_index`` of ``num_steps`` runs with autograd (the last K do)."""
        return step_index >= num_steps - self.config.grad_steps

    @staticmethod
    def step(sampler: SDEDPMSolver, eps: torch.Tensor, step_index: int, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """x_{t-1} = μ(x_t, ε) + std·z with μ's graph kept (the reparameterised draw).

        ``step_with_score`` returns its draw detached (it scores recorded transitions); adding the
        detached noise part back onto μ gives the same value with the gradient through μ, z fixed.
        """
        out = sampler.step_with_score(eps, step_index, sample, generator=generator)
        mean = out.prev_sample_mean
        return mean + (out.prev_sample.float() - mean).detach()

    def loss(self, images: torch.Tensor, reward_values: torch.Tensor,
             reward_grad: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """−scale·mean_b R_b, differentiable through ``images``.

        images: (B, ...) rendered from the sample, with graph. reward_values: (B,). reward_grad:
        ∂Σ_b R_b/∂images, the images' shape. The surrogate ⟨images, grad⟩ carries the gradient (a
        first-order Taylor model of R around these images); its value is swapped for the true reward
        so the logged loss means something.
        """
        if reward_grad.shape != images.shape:
            raise ValueError(f"reward_grad has shape {tuple(reward_grad.shape)}: expected the images' shape "
                             f"{tuple(images.shape)}")
        values = torch.as_tensor(reward_values, dtype=torch.float32, device=images.device).reshape(-1)
        if values.shape[0] != images.shape[0]:
            raise ValueError(f"reward_values has {values.shape[0]} entries: expected one per image batch "
                             f"entry ({images.shape[0]})")
        surrogate = (images.float() * reward_grad.detach().float()).sum()
        batch = images.shape[0]
        loss = -self.config.reward_scale / batch * (surrogate - surrogate.detach() + values.sum())
        return loss, {"loss": loss.detach(), "reward_mean": values.mean().detach()}
