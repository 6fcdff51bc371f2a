"""Sampling and rendering with a SplatGenerator: what training, inference and evaluation share.

diffusers keeps model, scheduler and pipeline apart; so do we. `SplatPipeline` owns a generator
and the SDE sampler the policy is trained on, and turns prompts into rollouts (every state and raw
network output, for the algorithms) and latents into rendered views (for the rewards).

Views handed to rewards follow docs/contracts.md: images (B, V, 3, H, W) in [0, 1] on the
background, alphas and expected depths (B, V, 1, H, W), and rendered per-Gaussian normals
(B, V, 3, H, W) in camera space when a reward needs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r2d3ray.models.generator import SplatGenerator
from r2d3ray.models.schedulers import SDEDPMSolver, ode_sample, sample_trajectory
from r2d3ray.render.cameras import Cameras
from r2d3ray.render.normals import gaussian_normals, rendered_normals
from r2d3ray.render.rasterize import GAUSSIAN_CONVENTIONS, render_splats
from r2d3ray.splats import Splats


@dataclass
class Rollout:
    """B trajectories of the SDE sampler, batch-first.

    latents: (B, T+1, V, C, h, w) states x_T … x_0; timesteps: (T,) the step timesteps;
    outputs: (B, T, V, C_out, h, w) raw (CFG-combined) network outputs of every step.
    """

    prompts: list[str]
    latents: torch.Tensor
    timesteps: torch.Tensor
    outputs: torch.Tensor

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def final(self) -> torch.Tensor:
        """(B, V, C, h, w) the clean samples x_0."""
        return self.latents[:, -1]

    def to(self, device: torch.device | str) -> Rollout:
        return Rollout(self.prompts, self.latents.to(device), self.timesteps.to(device), self.outputs.to(device))

    def select(self, index: torch.Tensor | list[int]) -> Rollout:
        index = torch.as_tensor(index, dtype=torch.long)
        return Rollout([self.prompts[i] for i in index.tolist()], self.latents[index], self.timesteps, self.outputs[index])

    @staticmethod
    def cat(items: list[Rollout]) -> Rollout:
        return Rollout(
            [p for r in items for p in r.prompts],
            torch.cat([r.latents for r in items]),
            items[0].timesteps,
            torch.cat([r.outputs for r in items]),
        )


class SplatPipeline:
    """``gaussian_convention`` is how the renderer turns splats into covariances (config key
    ``render.gaussian_convention``): "gsplat", or "diffsplat" for DiffSplat's raw quaternions and
    no dilation (r2d3ray/render/rasterize.py). Every render the rewards see goes through it."""

    def __init__(self, generator: SplatGenerator, num_steps: int = 20, eta: float = 1.0, guidance_scale: float = 5.0,
                 gaussian_convention: str = "gsplat"):
        if gaussian_convention not in GAUSSIAN_CONVENTIONS:
            raise ValueError(f"SplatPipeline: gaussian_convention must be one of {GAUSSIAN_CONVENTIONS}, "
                             f"got {gaussian_convention!r}")
        self.generator = generator
        self.guidance_scale = guidance_scale
        self.gaussian_convention = gaussian_convention
        self.sampler = SDEDPMSolver(num_steps, eta, **generator.scheduler_config)

    def denoise_fn(self, prompts: list[str], guidance_scale: float | None = None):
        """(x_t, t) -> raw output, the prompts' embeddings and CFG bound in."""
        embeds = self.generator.encode_prompts(prompts)
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        return lambda x, t: self.generator.predict(x, t, embeds, guidance_scale=scale)

    def initial_noise(self, batch_size: int, generator: torch.Generator | None) -> torch.Tensor:
        shape = (batch_size, *self.generator.latent_shape)  # (B, V, C, h, w)
        noise = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu")
        return noise.to(self.generator.device)

    @torch.no_grad()
    def sample(self, prompts: list[str], generator: torch.Generator | None = None,
               guidance_scale: float | None = None) -> Rollout:
        """SDE rollouts (the policy's own distribution) recording states and outputs."""
        traj = sample_trajectory(
            self.denoise_fn(prompts, guidance_scale), self.initial_noise(len(prompts), generator), self.sampler,
            generator=generator, eps_fn=lambda output, _x: self.generator.eps_from_output(output),
        )
        return Rollout(list(prompts), traj.latents.transpose(0, 1), traj.timesteps, traj.model_outputs.transpose(0, 1))

    @torch.no_grad()
    def sample_ode(self, prompts: list[str], generator: torch.Generator | None = None,
                   guidance_scale: float | None = None) -> torch.Tensor:
        """Deterministic DPM-Solver++ (2nd order) clean samples (B, V, C, h, w): DiffusionNFT's data
        collection and inference."""
        traj = ode_sample(
            self.denoise_fn(prompts, guidance_scale), self.initial_noise(len(prompts), generator),
            self.sampler.num_inference_steps, eps_fn=lambda output, _x: self.generator.eps_from_output(output),
            **self.generator.scheduler_config,
        )
        return traj.latents[-1]

    def splats(self, latents: torch.Tensor) -> Splats:
        return self.generator.latents_to_splats(latents)

    def render(self, latents: torch.Tensor, cameras: Cameras, needs: frozenset[str] = frozenset(),
               background=(1.0, 1.0, 1.0)) -> dict[str, torch.Tensor]:
        """Latents (B, V, C, h, w) -> views for the rewards, differentiable back to the latents."""
        return self.render_splats(self.splats(latents), cameras, needs, background)

    def render_splats(self, splats: Splats, cameras: Cameras, needs: frozenset[str] = frozenset(),
                      background=(1.0, 1.0, 1.0)) -> dict[str, torch.Tensor]:
        """`render_views` in this pipeline's Gaussian convention."""
        return render_views(splats, cameras, needs, background, self.gaussian_convention)


def render_views(splats: Splats, cameras: Cameras, needs: frozenset[str] = frozenset(),
                 background=(1.0, 1.0, 1.0), gaussian_convention: str = "gsplat") -> dict[str, torch.Tensor]:
    """images, alphas, depths (+ normals when needed) of every object from every camera."""
    features = gaussian_normals(splats, cameras) if "normals" in needs else None  # (B, V, N, 3) camera space
    out = render_splats(splats, cameras, background=background, extra_features=features,
                        gaussian_convention=gaussian_convention)
    views = {"images": out.images, "alphas": out.alphas, "depths": out.depths}
    if features is not None:
        views["normals"] = rendered_normals(out.features, out.alphas)  # (B, V, 3, H, W)
    return views
