"""DiffusionNFT: negative-aware fine-tuning on the forward process, for ε-prediction (VP) models.

The reference (DiffusionNFT's `scripts/train_nft_sd3.py`) trains a rectified-flow velocity model v. Per
sample it keeps only the clean sample x0 (drawn by the behaviour policy θ_old with any solver, CFG
off) and an optimality probability r ∈ [0, 1] from its reward; then for a few of the sampler's
timesteps it re-noises x0 and fits two implicit policies, mixed with strength β_mix (``nft_mix_beta``):

    v⁺ = (1 − β_mix)·v_old + β_mix·v_θ          v⁻ = (1 + β_mix)·v_old − β_mix·v_θ
    L  = (adv_clip_max / β_mix)·[ r·ℓ(x̂0⁺) + (1 − r)·ℓ(x̂0⁻) ] + kl_coef·mean‖v_θ − v_ref‖²
    ℓ(x̂0) = mean‖x̂0 − x0‖² / sg(max(mean|x̂0 − x0|, 1e-5)),   x̂0± = x_t − t·v±

ε-prediction form (this module). Under x_t = √ᾱ·x0 + √(1−ᾱ)·ε the model's clean estimate is affine in
its output for a fixed (x_t, t):  x̂0(ε̂) = (x_t − √(1−ᾱ)·ε̂)/√ᾱ,  just as x̂0(v̂) = x_t − t·v̂ is for a flow
model. Both mixes have weights summing to one ((1−β)+β = 1, (1+β)−β = 1), and an affine map commutes
with such a mix, so mixing outputs in either parameterisation is mixing the x̂0's:

    ε⁺ = (1 − β_mix)·ε_old + β_mix·ε_θ,   ε⁻ = (1 + β_mix)·ε_old − β_mix·ε_θ,
    x̂0± = (x_t − √(1−ᾱ)·ε±)/√ᾱ = the same mix of x̂0_old and x̂0_θ,   x̂0± − x0 = √(1−ᾱ)/√ᾱ·(ε − ε±).

x̂0 is the model's posterior-mean estimate of x0, which does not depend on how the network is
parameterised, so ℓ above — hence L's policy part — is exactly the reference's loss as a function of
the denoiser; only the noise levels it is evaluated at come from our sampler's grid (VP timesteps
instead of SD3's shifted flow sigmas). The KL part is, like the reference's, an MSE in the network's
own output space (ε here, v there).

On-policy (θ = θ_old) ε⁺ = ε⁻ = ε_old, so the loss value does not depend on r, while its gradient
w.r.t. ε_θ is adv_clip_max·(2r − 1)·∇ℓ(ε_old): a signed, advantage-weighted denoising regression that
vanishes at r = ½. Tests check both.

The two betas: ``nft_mix_beta`` is the reference's ``config.beta`` (1.0 default; 0.1 for OCR and the
multi-reward run); ``kl_coef`` is ``config.train.beta`` (1e-4).

What a rollout must record (``rollout_fields``): the clean sample x0 of each sample (any solver — the
reference uses deterministic 2nd-order DPM-Solver, here ``schedulers.ode_sample``), its reward, its
prompt key (groups of G samples per prompt) and the sampler's timesteps. One training step::

    r, _ = optimality_probability(rewards, prompt_ids, cfg.adv_clip_max)        # once per epoch
    steps = algo.transition_steps(B, T)                                         # (B, n)
    for k in range(n):
        t = timesteps[steps[:, k]]; x_t = sampler.add_noise(x0, noise, t)       # fresh noise
        eps_old = old_policy(x_t, t) [no grad]; eps_ref = base(x_t, t) [no grad]; eps_pol = policy(x_t, t)
        loss, terms = algo.loss(eps_pol, eps_old, eps_ref, x_t, x0, sampler.alphas_cumprod_at(t), r)
    after each optimizer step (ema_decay > 0): soft_update_(ema_params, params, ema_decay_at(global_step, cfg.ema_decay))
    after each epoch: soft_update_(old_params, params, old_policy_decay(global_step, cfg.decay_type))

θ_old and the evaluation EMA start as exact copies of θ (the reference copies its "default" adapter into "old").

CFG-free: sampling and all three ε calls use the conditional input only (the reference samples and
trains at guidance 1.0; its CFG branch is dead code, §1.8).

Departures: ``timestep_fraction`` counts the VP sampler's steps; groups are keyed by whatever hashable
prompt id the caller passes (the reference re-decodes token ids).
"""

from __future__ import annotations

from typing import Hashable, Iterable, Sequence

import torch

from r2d3ray.config import NFTConfig

from r2d3ray.algorithms.subsampling import num_train_steps, random_steps

ADAPTIVE_WEIGHT_MIN = 1e-5  # the reference's clip(min=0.00001) on mean|x̂0 − x0|
STD_EPS = 1e-4              # PerPromptStatTracker: std + 1e-4
# Old-policy decay schedules by decay_type: (flat steps, rate per step, cap) — the reference's return_decay.
_DECAY_SCHEDULES = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}  # (flat, rate, hold)


def optimality_probability(rewards: torch.Tensor, prompt_ids: Sequence[Hashable] | torch.Tensor,
                           adv_clip_max: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards (N,) of one epoch → (r (N,), advantages (N,)).

    A = (R − mean of R over the same prompt) / (std of all N rewards + 1e-4)  (PerPromptStatTracker with
    global_std=True, population std, no history); r = ½ + ½·clip(A / adv_clip_max, −1, 1).
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
    keys = prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
    if len(keys) != rewards.shape[0]:
        raise ValueError(f"prompt_ids has {len(keys)} entries: expected one per reward ({rewards.shape[0]})")
    group_index: dict[Hashable, int] = {}
    groups = torch.tensor([group_index.setdefault(k, len(group_index)) for k in keys])
    group_sum = torch.zeros(len(group_index), dtype=torch.float64).index_add_(0, groups, rewards)
    group_count = torch.bincount(groups, minlength=len(group_index)).to(torch.float64)
    advantages = (rewards - (group_sum / group_count)[groups]) / (rewards.std(unbiased=False) + STD_EPS)
    r = 0.5 + 0.5 * (advantages / adv_clip_max).clamp(-1.0, 1.0)
    return r.float(), advantages.float()


def ema_decay_at(step: int, max_decay: float) -> float:
    """The evaluation EMA's decay after optimizer step ``step`` (1 for the first): flow_grpo's
    EMAModuleWrapper warm-up min((1 + step)/(10 + step), max_decay), so early EMAs follow θ closely."""
    return min((1 + step) / (10 + step), max_decay)


def old_policy_decay(step: int, decay_type: int) -> float:
    """The reference's ``return_decay``: the weight kept by θ_old in θ_old ← d·θ_old + (1 − d)·θ.

    0: always 0 (θ_old = θ, fully on-policy). 1 (default): min(0.001·step, 0.5).
    2 (OCR): 0 for step < 75, then min(0.0075·(step − 75), 0.999). ``step`` counts optimizer steps.
    """
    if decay_type not in _DECAY_SCHEDULES:
        raise ValueError(f"decay_type={decay_type!r}: expected one of {sorted(_DECAY_SCHEDULES)}")
    flat, rate, hold = _DECAY_SCHEDULES[decay_type]
    return 0.0 if step < flat else min((step - flat) * rate, hold)



@torch.no_grad()
def soft_update_(old_params: Iterable[torch.Tensor], params: Iterable[torch.Tensor], decay: float) -> None:
    """θ_old ← decay·θ_old + (1 − decay)·θ, in place, pairing the two parameter lists in order
    (e.g. the "old" and "default" LoRA adapters' parameters)."""
    old_params, params = list(old_params), list(params)
    if len(old_params) != len(params):
        raise ValueError(f"old_params has {len(old_params)} tensors, params {len(params)}: expected the same")
    for old, new in zip(old_params, params):
        if old.shape != new.shape:
            raise ValueError(f"parameter shapes differ: old {tuple(old.shape)} vs {tuple(new.shape)}")
        old.mul_(decay).add_(new.detach().to(old.dtype), alpha=1.0 - decay)


def _adaptive_x0_loss(x0_pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """(B,) mean‖x̂0 − x0‖² / sg(max(mean|x̂0 − x0|, 1e-5)) — the reference's self-normalised weight."""
    err = (x0_pred - x0).flatten(1)
    with torch.no_grad():
        weight = err.double().abs().mean(dim=1).clamp(min=ADAPTIVE_WEIGHT_MIN)
    return ((err**2).mean(dim=1) / weight).to(x0_pred.dtype)


class DiffusionNFT:
    """The DiffusionNFT objective for ε-prediction models. See the module docstring."""

    rollout_fields = ("clean_sample", "reward", "prompt_id", "timesteps")

    def __init__(self, config: NFTConfig | None = None):
        self.config = config or NFTConfig()

    def transition_steps(self, batch_size: int, num_steps: int,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, n) indices into the sampler's timesteps: a random permutation per sample, first n."""
        n = num_train_steps(num_steps, self.config.timestep_fraction)
        return random_steps(batch_size, num_steps, n, include_final=False, generator=generator)

    def loss(self, eps_policy: torch.Tensor, eps_old: torch.Tensor, eps_ref: torch.Tensor | None,
             noisy: torch.Tensor, clean: torch.Tensor, alpha_bar: torch.Tensor, r: torch.Tensor,
             sample_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one batch of re-noised samples, and its named terms (detached scalars).

        eps_policy: (B, ...) ε_θ(x_t), graph to θ.   eps_old: (B, ...) ε_old(x_t) (treated as constant).
        eps_ref: (B, ...) ε of the frozen base (adapters off), or None when ``kl_coef == 0``.
        noisy: (B, ...) x_t = √ᾱ·clean + √(1−ᾱ)·noise.   clean: (B, ...) x0.
        alpha_bar: (B,) ᾱ at each sample's timestep.   r: (B,) optimality probability in [0, 1].
        sample_weight: (B,) each sample's weight in the batch mean (0 leaves a sample out, e.g. one whose
            reward is not finite, while the mean still divides by B); None = all 1.
        """
        cfg = self.config
        shapes = {name: tuple(t.shape) for name, t in
                  dict(eps_policy=eps_policy, eps_old=eps_old, noisy=noisy, clean=clean).items()}
        if len(set(shapes.values())) != 1 or (eps_ref is not None and eps_ref.shape != eps_policy.shape):
            raise ValueError(f"eps_policy, eps_old, eps_ref, noisy and clean must share one shape, got {shapes}"
                             f"{'' if eps_ref is None else f', eps_ref={tuple(eps_ref.shape)}'}")
        if eps_ref is None and cfg.kl_coef > 0:
            raise ValueError("eps_ref is required when kl_coef > 0")
        batch = eps_policy.shape[0]
        bshape = (batch,) + (1,) * (eps_policy.ndim - 1)
        alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float32, device=noisy.device).reshape(-1)
        r = torch.as_tensor(r, dtype=torch.float32, device=noisy.device).reshape(-1)
        weight = (torch.ones(batch, device=noisy.device) if sample_weight is None else
                  torch.as_tensor(sample_weight, dtype=torch.float32, device=noisy.device).reshape(-1))
        if alpha_bar.shape[0] != batch or r.shape[0] != batch or weight.shape[0] != batch:
            raise ValueError(f"alpha_bar ({alpha_bar.shape[0]} values), r ({r.shape[0]} values) and sample_weight "
                             f"({weight.shape[0]} values) need one value per sample ({batch})")
        sqrt_ab, sqrt_1m_ab = alpha_bar.sqrt().reshape(bshape), (1 - alpha_bar).sqrt().reshape(bshape)

        beta = cfg.nft_mix_beta
        eps_policy, eps_old = eps_policy.float(), eps_old.detach().float()
        eps_pos = (1.0 - beta) * eps_old + beta * eps_policy
        eps_neg = (1.0 + beta) * eps_old - beta * eps_policy
        x_t, x0 = noisy.float(), clean.float()
        positive = _adaptive_x0_loss((x_t - sqrt_1m_ab * eps_pos) / sqrt_ab, x0)  # (B,)
        negative = _adaptive_x0_loss((x_t - sqrt_1m_ab * eps_neg) / sqrt_ab, x0)  # (B,)
        policy_loss = (weight * (r * positive + (1.0 - r) * negative) / beta * cfg.adv_clip_max).mean()

        loss = policy_loss
        terms = {"policy_loss": policy_loss.detach(), "positive_loss": positive.mean().detach(),
                 "negative_loss": negative.mean().detach(),
                 "old_deviation": (eps_policy.detach() - eps_old).flatten(1).pow(2).mean(1).mean()}
        if eps_ref is not None:
            kl = (weight * (eps_policy - eps_ref.detach().float()).flatten(1).pow(2).mean(dim=1)).mean()
            loss = loss + cfg.kl_coef * kl
            terms["kl_loss"] = kl.detach()
        terms["loss"] = loss.detach()
        return loss, terms
