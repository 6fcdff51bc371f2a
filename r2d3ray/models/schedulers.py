"""Samplers for ε-prediction (DDPM/VP) diffusion models: SDE-DPM-Solver++ with policy scores, an ODE
DPM-Solver++ (2nd order), x̂0 prediction and forward noising.

Conventions (as in Nabla-R2D3's `diffusers_patch/step_with_score.py`):
- Sampling runs from noise to clean. Step i maps ``x_t`` ("sample", at ``timesteps[i]``) to ``x_{t-1}``
  ("prev_sample", at ``prev_timesteps[i]``); the last step targets timestep 0 because the final sigma is
  diffusers' ``"sigma_min"`` (= the noise level of ᾱ[0]), so every state of a trajectory has a finite SNR.
- VP notation: α_t = √ᾱ_t, σ_t = √(1−ᾱ_t), λ_t = log α_t − log σ_t, x_t = α_t x0 + σ_t ε.
- Latents may have any shape ``(N, C, ...)``; all samples of a batch share the step. Network outputs carry
  channels on dim 1 and are either ε-shaped or ε plus learned variance (2C channels, PixArt); see
  :func:`eps_from_output`.

The noise schedule (betas, ᾱ, timesteps, sigmas) comes from diffusers' ``DPMSolverMultistepScheduler``;
only the SDE step with its Gaussian score is written here, because diffusers' ``step`` neither returns
the mean/std nor scores a given ``prev_sample``.

Terminal-ᾱ trap: with ``rescale_betas_zero_snr=True`` the schedule has
ᾱ_999 = 0 and ε-prediction divides by √ᾱ. We always use the scheduler's ``alphas_cumprod``, in which
diffusers' DPM-Solver replaces ᾱ_999 by 2**-24 (√ = 2**-12), so x̂0 at t = 999 is finite (ε's error is
amplified 4096× there; the step scales x̂0 back by α_{t-1}) and nothing divides by zero. DiffSplat's
PixArt-Σ schedule (the default) has no zero SNR: ᾱ_999 ≈ 4e-5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

# DiffSplat's PixArt-Σ scheduler (PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers' scheduler config). `steps_offset` only affects "leading".
PIXART_SIGMA_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=1e-4,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
    timestep_spacing="linspace",
    steps_offset=1,
)

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t 0-d int64) -> raw model output


def _make_scheduler(num_inference_steps: int, config: dict, **forced) -> DPMSolverMultistepScheduler:
    # `forced` goes as kwargs: in a config dict, keys listed in a saved `_use_default_values` are dropped.
    scheduler = DPMSolverMultistepScheduler.from_config({**PIXART_SIGMA_SCHEDULER_CONFIG, **config}, **forced)
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"prediction_type={scheduler.config.prediction_type!r}: only 'epsilon' is supported")
    n_train = scheduler.config.num_train_timesteps
    if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= n_train:
        raise ValueError(f"num_inference_steps={num_inference_steps!r}: expected an int in [1, {n_train}]")
    scheduler.set_timesteps(num_inference_steps)
    # Repeated timesteps (≈ as many steps as training timesteps) make a step of zero length (h = 0).
    if (scheduler.timesteps[1:] >= scheduler.timesteps[:-1]).any():
        raise ValueError(f"num_inference_steps={num_inference_steps}: the {scheduler.config.timestep_spacing!r} "
                         "spacing repeats timesteps; use fewer steps")
    return scheduler


def _alpha_bar(alphas_cumprod: torch.Tensor, t, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t as float32 on ``like``'s device, shaped to broadcast against ``like`` (t: int, 0-d or (N,))."""
    t = torch.as_tensor(t, device=like.device)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != like.shape[0]):
        raise ValueError(f"t has shape {tuple(t.shape)}: expected a scalar or ({like.shape[0]},) for "
                         f"a tensor of shape {tuple(like.shape)}")
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise ValueError(f"t={t.tolist()}: expected integer training timesteps")
    t = t.long()
    if t.min() < 0 or t.max() >= alphas_cumprod.shape[0]:
        raise ValueError(f"t={t.tolist()}: expected timesteps in [0, {alphas_cumprod.shape[0] - 1}]")
    alpha_bar = alphas_cumprod.to(device=like.device, dtype=torch.float32)[t]
    return alpha_bar.reshape(alpha_bar.shape + (1,) * (like.ndim - alpha_bar.ndim))


def predict_x0(eps: torch.Tensor, x_t: torch.Tensor, t, alphas_cumprod: torch.Tensor,
               timestep_shift: int = 0) -> torch.Tensor:
    """x̂0 = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t, float32, keeping the graph of ``eps`` and ``x_t``.

    ``t``: int, 0-d or (N,) training timesteps. ``timestep_shift`` > 0 reproduces Nabla-R2D3's DPM quirk
    (its `pred_orig_latent`, "hard coded for dpm solver"): ᾱ is read at ``clamp(t − timestep_shift, min=1)`` while the
    network saw ``t``; pass ``sampler.dt`` for the reference behaviour. The default 0 is the consistent x̂0.
    """
    if eps.shape != x_t.shape:
        raise ValueError(f"eps has shape {tuple(eps.shape)}: expected x_t's shape {tuple(x_t.shape)}")
    if timestep_shift:
        t = (torch.as_tensor(t) - timestep_shift).clamp(min=1)
    alpha_bar = _alpha_bar(alphas_cumprod, t, x_t)
    return (x_t.float() - (1 - alpha_bar).sqrt() * eps.float()) / alpha_bar.sqrt()


def eps_from_output(model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """The ε part of a raw network output: the output itself, or its first C channels (dim 1) when the
    network also predicts a variance (learned-sigma PixArt: 2C channels, ``chunk(2, dim=1)[0]``)."""
    if model_output.shape == sample.shape:
        return model_output
    channels = sample.shape[1] if sample.ndim > 1 else None
    if (channels is not None and model_output.shape[1] == 2 * channels
            and model_output.shape[2:] == sample.shape[2:] and model_output.shape[0] == sample.shape[0]):
        return model_output[:, :channels]
    raise ValueError(f"model output has shape {tuple(model_output.shape)}: expected the sample's shape "
                     f"{tuple(sample.shape)} or twice its channels on dim 1 (ε + learned variance)")


@dataclass
class StepOutput:
    prev_sample: torch.Tensor       # x_{t-1}, sample's dtype
    prev_sample_mean: torch.Tensor  # μ(x_t, ε), float32, carries ε's graph
    std: torch.Tensor               # 0-d float32, shared by all elements
    score: torch.Tensor | None      # ∇_{x_{t-1}} log p(x_{t-1}|x_t), float32, per element; None when eta=0


class SDEDPMSolver:
    """First-order SDE-DPM-Solver++ as a Gaussian policy p(x_{t-1}|x_t) = N(μ, std²·I).

    With h = λ_{t-1} − λ_t, x̂0 = (x_t − σ_t ε)/α_t and c = √(1 − η²(1 − e^{−2h})):
        std = η·σ_{t-1}·√(1 − e^{−2h})
        μ   = (σ_{t-1}/σ_t)·c·x_t + α_{t-1}·(1 − c·e^{−h})·x̂0      (= α_{t-1} x̂0 + √(σ_{t-1}² − std²)·ε)
    η = 1 (default) is exactly the reference's sde-dpmsolver++ step (c = e^{−h}) and diffusers' step;
    η = 0 is the deterministic first-order DPM-Solver++ (DDIM); in between, the DDIM-style family with the
    same marginals given an exact ε. ``scheduler_config`` overrides the PixArt-Σ defaults (a diffusers config
    dict is accepted); the algorithm, order 1 and ``final_sigmas_type="sigma_min"`` are always set.
    """

    def __init__(self, num_inference_steps: int = 20, eta: float = 1.0, **scheduler_config):
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta={eta!r}: expected a value in [0, 1] (1 = SDE-DPM-Solver++, 0 = ODE)")
        self.eta = float(eta)
        self.scheduler = _make_scheduler(num_inference_steps, scheduler_config, algorithm_type="sde-dpmsolver++",
                                         solver_order=1, final_sigmas_type="sigma_min")
        self.num_inference_steps = num_inference_steps
        self.timesteps = self.scheduler.timesteps                  # (T,) int64, e.g. 999, 949, …, 50
        self.alphas_cumprod = self.scheduler.alphas_cumprod        # (num_train_timesteps,) float32
        # The final "sigma_min" sigma is ᾱ[0]'s, so the last step lands on timestep 0.
        self.prev_timesteps = torch.cat([self.timesteps[1:], self.timesteps.new_zeros(1)])  # (T,)
        if self.timesteps[-1] == 0:
            raise ValueError(f"num_inference_steps={num_inference_steps}: the last step would start at timestep 0, "
                             "where the sigma_min target gives a zero-length step; use fewer steps")
        self.dt = int(self.timesteps[0] - self.prev_timesteps[0])  # the reference's `scheduler_dt`

        # Per-state α, σ, λ from the scheduler's VE sigmas (T+1,), in float64 for the step coefficients.
        sigmas = self.scheduler.sigmas.double()
        self._alpha = 1.0 / (1.0 + sigmas**2).sqrt()
        self._sigma = sigmas * self._alpha
        self._lambda = self._alpha.log() - self._sigma.log()

    def alphas_cumprod_at(self, t) -> torch.Tensor:
        """ᾱ at integer training timestep(s) ``t`` (same shape as t, float32, on t's device)."""
        t = torch.as_tensor(t)
        flat = t.reshape(-1)
        return _alpha_bar(self.alphas_cumprod, flat, flat).reshape(t.shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """Forward process x_t = √ᾱ_t x0 + √(1−ᾱ_t) noise at any training timestep(s) t (int, 0-d or (N,)).
        Written out because diffusers' DPM ``add_noise`` only accepts timesteps of its inference grid."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}: expected x0's shape {tuple(x0.shape)}")
        alpha_bar = _alpha_bar(self.alphas_cumprod, t, x0)
        return alpha_bar.sqrt() * x0.float() + (1 - alpha_bar).sqrt() * noise.float()

    def step_with_score(self, eps: torch.Tensor, step_index: int, sample: torch.Tensor,
                        prev_sample: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> StepOutput:
        """One step x_t → x_{t-1} from ε = ``eps`` (sample's shape). With ``prev_sample`` given, scores
        that recorded transition under this ε; otherwise draws it with ``generator``. The score
        −(x_{t-1}.detach() − μ)/std² reaches ε's parameters only through μ."""
        if not isinstance(step_index, int) or not 0 <= step_index < self.num_inference_steps:
            raise ValueError(f"step_index={step_index!r}: expected an int in [0, {self.num_inference_steps - 1}]")
        if eps.shape != sample.shape:
            raise ValueError(f"eps has shape {tuple(eps.shape)}: expected the sample's shape {tuple(sample.shape)}"
                             " (use eps_from_output for learned-variance outputs)")
        if prev_sample is not None and prev_sample.shape != sample.shape:
            raise ValueError(f"prev_sample has shape {tuple(prev_sample.shape)}: expected {tuple(sample.shape)}")
        if prev_sample is not None and self.eta == 0.0:
            raise ValueError("prev_sample given with eta=0: a deterministic step has no density to score")

        i = step_index
        alpha_t, sigma_t = self._alpha[i].item(), self._sigma[i].item()
        alpha_s, sigma_s = self._alpha[i + 1].item(), self._sigma[i + 1].item()
        h = (self._lambda[i + 1] - self._lambda[i]).item()
        decay = math.exp(-h)
        c = math.sqrt(1.0 - self.eta**2 * (1.0 - decay**2))

        x_t = sample.float()
        x0_pred = (x_t - sigma_t * eps.float()) / alpha_t
        if self.scheduler.config.thresholding:
            # diffusers' own x̂0 thresholding (as its DPM step applies it): with sample_max_value=1 a
            # clip to [-1, 1], where an early step's ε error would otherwise throw x̂0 far off the data.
            x0_pred = self.scheduler._threshold_sample(x0_pred)
        mean = (sigma_s / sigma_t * c) * x_t + (alpha_s * (1.0 - c * decay)) * x0_pred
        std = self.eta * sigma_s * math.sqrt(1.0 - decay**2)
        std_t = torch.tensor(std, dtype=torch.float32, device=sample.device)
        if prev_sample is None:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
            prev_sample = (mean.detach() + std * noise).to(sample.dtype)
        score = None if std == 0.0 else -(prev_sample.detach().float() - mean) / std**2
        return StepOutput(prev_sample=prev_sample, prev_sample_mean=mean, std=std_t, score=score)


@dataclass
class Trajectory:
    latents: torch.Tensor        # (T+1, *x.shape): x_T, …, x_0 (latents[i] → latents[i+1] is step i)
    timesteps: torch.Tensor      # (T,) int64, the timestep each step's network call saw
    model_outputs: torch.Tensor  # (T, *output.shape): raw network outputs (e.g. ε + learned variance)


@torch.no_grad()
def sample_trajectory(denoise_fn: DenoiseFn, x_T: torch.Tensor, sampler: SDEDPMSolver,
                      generator: torch.Generator | None = None,
                      eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = None) -> Trajectory:
    """Roll out ``sampler`` from x_T, recording every state and raw network output (no grad).

    ``denoise_fn(x_t, t)`` returns the raw output for t a 0-d int64 tensor; classifier-free guidance is
    the caller's (the generator's ``predict``). Replaying ``step_with_score`` on the recorded
    outputs with ``prev_sample=latents[i+1]`` reproduces the same transitions. ``eps_fn(output, x_t)``
    picks ε from a raw output when channels are not on dim 1 (a generator's (B, V, C, h, w) latents).
    """
    eps_fn = eps_fn or eps_from_output
    latents, outputs = [x_T], []
    for i, t in enumerate(sampler.timesteps):
        output = denoise_fn(latents[-1], t.to(x_T.device))
        step = sampler.step_with_score(eps_fn(output, latents[-1]), i, latents[-1], generator=generator)
        latents.append(step.prev_sample)
        outputs.append(output)
    return Trajectory(torch.stack(latents), sampler.timesteps.clone(), torch.stack(outputs))


@torch.no_grad()
def ode_sample(denoise_fn: DenoiseFn, x_T: torch.Tensor, num_inference_steps: int = 20,
               eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = None, **scheduler_config) -> Trajectory:
    """Deterministic DPM-Solver++ (2nd-order multistep, diffusers' own step) from x_T to a clean sample
    (``trajectory.latents[-1]``), for DiffusionNFT data collection and inference. Defaults are the
    PixArt-Σ schedule with diffusers' final sigma 0 (the last step is first order, as diffusers does)."""
    eps_fn = eps_fn or eps_from_output
    scheduler = _make_scheduler(num_inference_steps, scheduler_config, algorithm_type="dpmsolver++", solver_order=2)
    latents, outputs = [x_T], []
    for t in scheduler.timesteps:
        output = denoise_fn(latents[-1], t.to(x_T.device))
        latents.append(scheduler.step(eps_fn(output, latents[-1]), t, latents[-1]).prev_sample)
        outputs.append(output)
    return Trajectory(torch.stack(latents), scheduler.timesteps.clone(), torch.stack(outputs))
