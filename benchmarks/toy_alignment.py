"""Alignment algorithms on a toy with a known answer.

The prior is a 2-D mixture of ``NUM_MODES`` isotropic Gaussians on a circle. Under the VP forward
process x_t = √ᾱ·x0 + √(1−ᾱ)·ε each component stays Gaussian, N(√ᾱ·μ_k, (ᾱ·s² + 1 − ᾱ)·I), so the
prior's ε-prediction is exact in closed form: ε*(x, t) = −√(1−ᾱ)·∇ log p_t(x). The reward is a smooth
quadratic bump R(x) = −‖x − c‖²/(2ℓ²) centred on the +x mode, bounded above by 0 so reward hacking
has a visible end (collapse onto c). The target of KL-regularised alignment, p*(x) ∝ p(x)·exp(β·R(x)),
is again a Gaussian mixture (a product of Gaussians per component, reweighted by how close the
component sits to c), so its bin masses are exact: mode weights go from 1/6 each to 5%…35%.

The policy is ε_θ(x, t) = ε*(x, t) + a small residual MLP (one per sampler timestep, see
:class:`StepwiseMLP`) whose output layer starts at zero (LoRA's B = 0 init); "disabling the adapter"
switches the residual off and gives the prior back. All methods share the sampler
(``r2d3ray.models.schedulers``: SDE-DPM-Solver++; ODE DPM-Solver++ for NFT's data), the
parameterisation, Adam (lr 3e-3, grad-norm clip 1.0, one step per epoch of 128 samples) and an
identity renderer (images = x̂0), so the algorithms' own loss code runs unchanged:

- ``nabla``: Nabla-R2D3 as shipped (forward residual ∇-DB, forward-looking reward gradient with the
  ×ᾱ weighting, stale trajectories), β = β_target.
- ``nabla_gfn``: the full ∇-GFlowNet (learned residual flow gradient, reverse and terminal losses).
- ``nft``: DiffusionNFT (reference defaults) on ODE samples of the old policy.
- ``reward_backprop``: DRaFT-K with K = 1, reported as is (it has no prior-preserving term; with
  per-step adapters only the last step's adapter learns).

The sampler takes 50 steps, not the reference's 20: with 20 first-order SDE steps the sampled prior
itself is visibly sharper than p (KL(p ‖ base) ≈ 0.13 against ≈ 0.04 with 50 steps), which would
hide how close a method gets to p*.

Each row reports the mean reward, KL(p* ‖ q) on a grid (q: the smoothed histogram of the method's
samples, so a lost mode costs a lot), and how many prior modes keep at least 2% of the samples
(nearest-mode assignment). ``base`` is the untouched prior through the same sampler; ``target_exact``
is exact samples of p*, i.e. the metric's noise floor.

What to expect (full run): both Nabla variants move towards p* (KL about 0.25 → 0.15, floor 0.02)
and keep all six modes; the ×ᾱ weighting under-tilts the early, mode-choosing steps, so they stop
short of p* (``reward_adaptive_scaling="off"`` gets closer on this toy). NFT and reward backprop have
no fixed point at p*: they push the reward towards its maximum and collapse onto c.

Usage: ``python benchmarks/toy_alignment.py --out DIR [--quick]``; or ``run(out_dir, quick=False)``.
Writes ``toy_alignment.json`` and ``toy_alignment.png`` to DIR.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from r2d3ray.algorithms.nabla import (FlowTerms, NablaConfig, NablaR2D3, forward_looking_reward_grad,
                                      reverse_score, transition_scores)
from r2d3ray.algorithms.nft import DiffusionNFT, NFTConfig, old_policy_decay, optimality_probability, soft_update_
from r2d3ray.algorithms.reward_backprop import RewardBackprop, RewardBackpropConfig
from r2d3ray.models.schedulers import SDEDPMSolver, ode_sample, predict_x0, sample_trajectory

NUM_MODES = 6
MODE_RADIUS = 2.0
MODE_STD = 0.35
REWARD_CENTER = (2.0, 0.0)      # c, on the +x mode
REWARD_LENGTH = 2.0             # ℓ: R(x) = −‖x − c‖²/(2ℓ²)
BETA_TARGET = 1.0               # p* ∝ p·exp(β R): mode weights ∝ exp(0.97·cos θ_k), 35% down to 5%
NUM_STEPS = 50
GRID_HALF_WIDTH = 4.5
GRID_BINS = 36
MODE_KEPT_FRACTION = 0.02
HISTOGRAM_SMOOTHING = 0.5       # pseudo-count per bin, so KL(p*‖q) stays finite
BATCH = 128                     # trajectories (or samples) per epoch; one optimizer step per epoch
LR = 3e-3                       # Adam, every method


@dataclass
class GaussianMixture2D:
    """Σ_k w_k N(μ_k, s²I) in 2-D. ``means`` (K, 2), ``weights`` (K,) summing to 1, ``std`` s."""

    means: torch.Tensor
    weights: torch.Tensor
    std: float

    def eps(self, x: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """The exact ε-prediction at x_t (B, 2) for ᾱ (B,): −√(1−ᾱ)·∇ log p_t(x_t). Differentiable in x."""
        ab = alpha_bar.reshape(-1, 1, 1).to(x.dtype)                          # (B, 1, 1)
        var = ab * self.std**2 + 1 - ab                                       # (B, 1, 1)
        diff = x[:, None, :] - ab.sqrt() * self.means[None].to(x.dtype)       # (B, K, 2)
        logits = self.weights.log().to(x.dtype) - (diff**2).sum(-1) / (2 * var[:, :, 0])
        resp = logits.softmax(dim=1)                                          # (B, K)
        score = -(resp[..., None] * diff).sum(1) / var[:, 0]                  # (B, 2)
        return -(1 - ab[:, 0]).sqrt() * score

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return self.means[comp] + self.std * torch.randn(n, 2, generator=generator)

    def tilted(self, beta: float, center: torch.Tensor, length: float) -> GaussianMixture2D:
        """p·exp(−β‖x − c‖²/(2ℓ²)), normalised. Per component, a product of Gaussians: precision
        1/s² + β/ℓ², mean pulled towards c, weight × N(μ_k; c, (s² + ℓ²/β)·I)."""
        precision = 1 / self.std**2 + beta / length**2
        means = (self.means / self.std**2 + beta * center / length**2) / precision
        logw = self.weights.log() - ((self.means - center) ** 2).sum(1) / (2 * (self.std**2 + length**2 / beta))
        return GaussianMixture2D(means, logw.softmax(0), precision**-0.5)

    def bin_masses(self, edges: torch.Tensor) -> torch.Tensor:
        """Exact probability of each cell of the square grid with 1-D ``edges`` (n+1,): (n, n), [x-bin, y-bin]."""
        cdf = torch.special.ndtr((edges[None, :, None] - self.means[:, None, :]) / self.std)  # (K, n+1, 2)
        mass = cdf[:, 1:] - cdf[:, :-1]                                                     # (K, n, 2)
        return torch.einsum("k,ki,kj->ij", self.weights, mass[..., 0], mass[..., 1])


def ring_prior() -> GaussianMixture2D:
    angles = torch.arange(NUM_MODES) * (2 * math.pi / NUM_MODES)
    means = MODE_RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture2D(means, torch.full((NUM_MODES,), 1.0 / NUM_MODES), MODE_STD)


def reward(x: torch.Tensor) -> torch.Tensor:
    center = torch.tensor(REWARD_CENTER, dtype=x.dtype)
    return -((x - center) ** 2).sum(-1) / (2 * REWARD_LENGTH**2)  # (B,)


def reward_grad(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The toy's stand-in for the reward plane: (values (B,), ∂Σ values/∂images)."""
    images = images.detach().requires_grad_(True)
    with torch.enable_grad():
        values = reward(images)
        (grad,) = torch.autograd.grad(values.sum(), images)
    return values.detach(), grad


def identity_render(x0: torch.Tensor) -> torch.Tensor:
    return x0


class StepwiseMLP(nn.Module):
    """(x (B, D), diffusers timestep t) → (B, D): one small MLP per timestep of the sampler's grid.

    The toy's stand-in for a strongly time-conditioned network. A single MLP shared over time learns
    almost nothing here: the last transition's score is ~1/std² ≈ 10⁴ times more sensitive to ε than
    the early ones, so its gradient drowns every other step's in the shared weights. The per-step
    weights are stacked (S, ·, ·) and gathered per sample. Output layers start at zero, so the module
    starts as the zero map (LoRA's B = 0).
    """

    def __init__(self, timesteps: torch.Tensor, dim: int = 2, hidden: int = 32, num_train_timesteps: int = 1000):
        super().__init__()
        grid = torch.unique(torch.as_tensor(timesteps).long())
        slot_of = torch.full((num_train_timesteps,), -1, dtype=torch.long)
        slot_of[grid] = torch.arange(len(grid))
        self.register_buffer("slot_of", slot_of)
        sizes = [(dim, hidden), (hidden, hidden), (hidden, dim)]
        # nn.Linear's default init, per step; the last layer zero.
        self.weights = nn.ParameterList(
            nn.Parameter((torch.rand(len(grid), i, o) * 2 - 1) / i**0.5) for i, o in sizes[:-1])
        self.weights.append(nn.Parameter(torch.zeros(len(grid), hidden, dim)))
        self.biases = nn.ParameterList(
            nn.Parameter((torch.rand(len(grid), o) * 2 - 1) / i**0.5) for i, o in sizes[:-1])
        self.biases.append(nn.Parameter(torch.zeros(len(grid), dim)))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        slot = self.slot_of[torch.as_tensor(t, device=x.device).long().reshape(-1).expand(x.shape[0])]  # (B,)
        if (slot < 0).any():
            raise ValueError(f"timesteps {sorted(set(torch.as_tensor(t).reshape(-1).tolist()))} are not all on "
                             "the grid this module was built for")
        shared = bool((slot == slot[0]).all())  # sampling: one step for all, no per-sample gather needed
        h = x
        for layer, (w, b) in enumerate(zip(self.weights, self.biases)):
            if shared:
                h = h @ w[slot[0]] + b[slot[0]]
            else:
                h = torch.einsum("bi,bio->bo", h, w[slot]) + b[slot]
            if layer < len(self.weights) - 1:
                h = nn.functional.silu(h)
        return h


class ToyPolicy(nn.Module):
    """ε_θ(x, t) = ε*(x, t) + adapter(x, t), with peft-like named adapters that can be disabled."""

    def __init__(self, prior: GaussianMixture2D, sampler: SDEDPMSolver, adapter_names: tuple[str, ...] = ("default",)):
        super().__init__()
        self.prior = prior
        self.register_buffer("alphas_cumprod", sampler.alphas_cumprod.float().clone())
        grid = torch.cat([sampler.timesteps, sampler.prev_timesteps])
        self.adapters = nn.ModuleDict({name: StepwiseMLP(grid) for name in adapter_names})
        self.active_adapter = adapter_names[0]
        self.adapters_enabled = True

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t).long().expand(x.shape[0])
        eps = self.prior.eps(x, self.alphas_cumprod[t])
        if self.adapters_enabled:
            eps = eps + self.adapters[self.active_adapter](x, t)
        return eps

    @contextmanager
    def disable_adapter(self):
        self.adapters_enabled = False
        try:
            yield
        finally:
            self.adapters_enabled = True

    @contextmanager
    def use_adapter(self, name: str):
        previous, self.active_adapter = self.active_adapter, name
        try:
            yield
        finally:
            self.active_adapter = previous


# ----------------------------------------------------------------------------------------------
# Training loops: what the real trainer does, on the toy.
# ----------------------------------------------------------------------------------------------

def train_nabla(policy: ToyPolicy, sampler: SDEDPMSolver, config: NablaConfig, epochs: int, batch_size: int,
                lr: float, generator: torch.Generator) -> None:
    algo = NablaR2D3(config)
    flow = StepwiseMLP(torch.cat([sampler.timesteps, sampler.prev_timesteps])) if config.learned_flow else None
    params = list(policy.adapters["default"].parameters()) + (list(flow.parameters()) if flow else [])
    optimizer = torch.optim.Adam(params, lr=lr)
    acp, num_steps = sampler.alphas_cumprod, len(sampler.timesteps)
    rows = torch.arange(batch_size)
    previous = None
    for _ in range(epochs):
        rollout = sample_trajectory(policy, torch.randn(batch_size, 2, generator=generator), sampler, generator)
        if config.trajectories == "stale":  # train on last epoch's samples (the reference)
            rollout, previous = previous, rollout
            if rollout is None:
                continue
        steps = algo.transition_steps(batch_size, num_steps, generator)  # (B, n)
        optimizer.zero_grad()
        for k in range(steps.shape[1]):
            idx = steps[:, k]
            t, t_prev = sampler.timesteps[idx], sampler.prev_timesteps[idx]  # (B,)
            x_t = rollout.latents[idx, rows].requires_grad_(flow is not None)  # (B, 2)
            x_prev = rollout.latents[idx + 1, rows]
            with policy.disable_adapter(), torch.set_grad_enabled(flow is not None):
                eps_ref = policy(x_t, t)
            eps_pol = policy(x_t, t)
            ref = transition_scores(sampler, eps_ref, idx, x_t, x_prev)
            pol = transition_scores(sampler, eps_pol, idx, x_t, x_prev)
            grad_prev, _ = forward_looking_reward_grad(
                x_prev, lambda x: predict_x0(policy(x, t_prev), x, t_prev, acp), identity_render, reward_grad)
            flow_terms = None
            if flow is not None:
                grad_cur, _ = forward_looking_reward_grad(
                    x_t, lambda x: predict_x0(policy(x, t), x, t, acp), identity_render, reward_grad)
                flow_terms = FlowTerms(
                    flow_prev=flow(x_prev, t_prev), flow_cur=flow(x_t.detach(), t),
                    reverse_score_policy=reverse_score(x_t, x_prev, pol.mean, pol.std),
                    reverse_score_ref=reverse_score(x_t, x_prev, ref.mean, ref.std),
                    reward_grad_cur=grad_cur, alpha_bar_cur=acp[t], is_final=idx == num_steps - 1)
            loss, _ = algo.loss(pol.score, ref.score, grad_prev, acp[t_prev], eps_pol,
                                rollout.model_outputs[idx, rows], flow_terms)
            (loss / steps.shape[1]).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()


def train_nft(policy: ToyPolicy, sampler: SDEDPMSolver, config: NFTConfig, epochs: int, batch: int,
              lr: float, generator: torch.Generator) -> None:
    algo = DiffusionNFT(config)
    params, old_params = list(policy.adapters["default"].parameters()), list(policy.adapters["old"].parameters())
    soft_update_(old_params, params, 0.0)  # θ_old ← θ at start
    optimizer = torch.optim.Adam(params, lr=lr)
    acp = sampler.alphas_cumprod
    prompt_ids = torch.zeros(batch, dtype=torch.long)  # the toy is unconditional: one prompt, batch/G groups of it
    for step in range(epochs):
        with policy.use_adapter("old"):
            rollout = ode_sample(policy, torch.randn(batch, 2, generator=generator), NUM_STEPS)
        x0, timesteps = rollout.latents[-1], rollout.timesteps
        r, _ = optimality_probability(reward(x0), prompt_ids, config.adv_clip_max)
        steps = algo.transition_steps(batch, len(timesteps), generator)
        optimizer.zero_grad()
        for k in range(steps.shape[1]):
            t = timesteps[steps[:, k]]
            x_t = sampler.add_noise(x0, torch.randn(x0.shape, generator=generator), t)
            with torch.no_grad():
                with policy.use_adapter("old"):
                    eps_old = policy(x_t, t)
                with policy.disable_adapter():
                    eps_ref = policy(x_t, t)
            loss, _ = algo.loss(policy(x_t, t), eps_old, eps_ref, x_t, x0, acp[t], r)
            (loss / steps.shape[1]).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        soft_update_(old_params, params, old_policy_decay(step + 1, config.decay_type))


def train_reward_backprop(policy: ToyPolicy, sampler: SDEDPMSolver, config: RewardBackpropConfig, epochs: int,
                          batch_size: int, lr: float, generator: torch.Generator) -> None:
    algo = RewardBackprop(config)
    params = list(policy.adapters["default"].parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    num_steps = len(sampler.timesteps)
    for _ in range(epochs):
        x = torch.randn(batch_size, 2, generator=generator)
        for i, t in enumerate(sampler.timesteps):
            with torch.set_grad_enabled(algo.grad_enabled(i, num_steps)):
                x = algo.step(sampler, policy(x, t), i, x, generator)
        images = identity_render(x)
        values, grad = reward_grad(images.detach())
        loss, _ = algo.loss(images, values, grad)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()


# ----------------------------------------------------------------------------------------------
# Evaluation, table, plot.
# ----------------------------------------------------------------------------------------------

def grid_edges() -> torch.Tensor:
    return torch.linspace(-GRID_HALF_WIDTH, GRID_HALF_WIDTH, GRID_BINS + 1, dtype=torch.float64)


def evaluate(samples: torch.Tensor, prior: GaussianMixture2D, target: GaussianMixture2D) -> dict:
    """Mean reward, KL(p* ‖ smoothed histogram of the samples) on the grid, and modes with ≥ 2% of samples."""
    samples = samples.double()
    edges = grid_edges()
    width = edges[1] - edges[0]
    cell = ((samples + GRID_HALF_WIDTH) / width).floor().long()                  # (M, 2)
    inside = ((cell >= 0) & (cell < GRID_BINS)).all(dim=1)
    flat = cell[inside, 0] * GRID_BINS + cell[inside, 1]
    counts = torch.bincount(flat, minlength=GRID_BINS**2).double().reshape(GRID_BINS, GRID_BINS)
    # Samples outside the grid count in the total: mass a method pushes off the grid is lost mass.
    q = (counts + HISTOGRAM_SMOOTHING) / (samples.shape[0] + HISTOGRAM_SMOOTHING * GRID_BINS**2)
    p = GaussianMixture2D(target.means.double(), target.weights.double(), target.std).bin_masses(edges)
    kl = (p * (p.clamp_min(1e-300).log() - q.log())).sum()
    nearest = torch.cdist(samples, prior.means.double()).argmin(dim=1)
    share = torch.bincount(nearest, minlength=len(prior.weights)).double() / samples.shape[0]
    return {"reward_mean": float(reward(samples).mean()), "kl_to_target": float(kl),
            "modes_kept": int((share >= MODE_KEPT_FRACTION).sum()), "modes_total": len(prior.weights)}


@torch.no_grad()
def sample_policy(policy: ToyPolicy, sampler: SDEDPMSolver, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return sample_trajectory(policy, torch.randn(n, 2, generator=generator), sampler, generator).latents[-1]


def save_plot(path: Path, samples: dict[str, torch.Tensor], target: GaussianMixture2D) -> None:
    """Scatter each method's samples over the target's bin masses (matplotlib if present, else PIL)."""
    density = target.bin_masses(grid_edges().float())  # (x-bin, y-bin)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    if plt is not None:
        fig, axes = plt.subplots(1, len(samples), figsize=(3.2 * len(samples), 3.4), squeeze=False)
        for ax, (name, xs) in zip(axes[0], samples.items()):
            ax.imshow(density.T.numpy(), origin="lower", cmap="Greys",
                      extent=[-GRID_HALF_WIDTH, GRID_HALF_WIDTH] * 2)
            xs = xs[:1500].numpy()
            ax.scatter(xs[:, 0], xs[:, 1], s=2, alpha=0.5, color="tab:red")
            ax.set_title(name, fontsize=9)
            ax.set_xticks([]), ax.set_yticks([])
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    from PIL import Image, ImageDraw
    size = 220
    canvas = Image.new("RGB", (size * len(samples), size + 16), "white")
    draw = ImageDraw.Draw(canvas)
    shade = (255 * (1 - density / density.max())).byte()
    for col, (name, xs) in enumerate(samples.items()):
        background = Image.fromarray(shade.T.flip(0).numpy(), mode="L").resize((size, size)).convert("RGB")
        canvas.paste(background, (col * size, 16))
        draw.text((col * size + 4, 2), name, fill="black")
        pix = ((xs[:1500] + GRID_HALF_WIDTH) / (2 * GRID_HALF_WIDTH) * size).long()
        for px, py in pix.tolist():
            if 0 <= px < size and 0 <= py < size:
                draw.point((col * size + px, 16 + size - 1 - py), fill=(200, 30, 30))
    canvas.save(path)


def run(out_dir, quick: bool = False, seed: int = 0) -> dict:
    """Train every method from the same prior, evaluate, print a table, write JSON and PNG. Returns the rows."""
    # The tensors are tiny (B × 2): intra-op threads only add synchronisation, which on a busy machine
    # costs 10-20× in wall time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(Path(out_dir), quick, seed)
    finally:
        torch.set_num_threads(threads)


def _run(out_dir: Path, quick: bool, seed: int) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    prior = ring_prior()
    target = prior.tilted(BETA_TARGET, torch.tensor(REWARD_CENTER), REWARD_LENGTH)
    sampler = SDEDPMSolver(NUM_STEPS)
    epochs = dict(nabla=20, nabla_gfn=15, nft=15, reward_backprop=30) if quick else \
        dict(nabla=200, nabla_gfn=200, nft=200, reward_backprop=200)
    num_eval = 6000 if quick else 30000

    def fresh_policy(adapters=("default",)) -> ToyPolicy:
        return ToyPolicy(prior, sampler, adapters)

    # R2D3 as shipped (×ᾱ weighting, stratified 20% of the 50 steps, stale trajectories), with β = β_target.
    nabla = NablaConfig(reward_scale=BETA_TARGET, reward_adaptive_scaling="squared", unet_reg_scale=10.0,
                        timestep_fraction=0.2, trajectories="stale")
    nabla_gfn = nabla.model_copy(update={"learned_flow": True})
    # NFT's defaults, but 20% of the 50 timesteps per sample (the reference trains 9 of its 10).
    nft = NFTConfig(group_size=32, timestep_fraction=0.2)
    methods = {
        "nabla": (("default",), lambda p, g: train_nabla(p, sampler, nabla, epochs["nabla"], BATCH, LR, g)),
        "nabla_gfn": (("default",), lambda p, g: train_nabla(p, sampler, nabla_gfn, epochs["nabla_gfn"], BATCH, LR, g)),
        "nft": (("default", "old"), lambda p, g: train_nft(p, sampler, nft, epochs["nft"], BATCH, LR, g)),
        "reward_backprop": (("default",), lambda p, g: train_reward_backprop(
            p, sampler, RewardBackpropConfig(grad_steps=1), epochs["reward_backprop"], BATCH, LR, g)),
    }

    results, samples, seconds = {}, {}, {}
    samples["base"] = sample_policy(fresh_policy(), sampler, num_eval, seed + 1)
    for name, (adapters, train) in methods.items():
        policy = fresh_policy(adapters)
        start = time.perf_counter()
        train(policy, torch.Generator().manual_seed(seed + 2))
        seconds[name] = time.perf_counter() - start
        samples[name] = sample_policy(policy, sampler, num_eval, seed + 1)
    samples["target_exact"] = target.sample(num_eval, torch.Generator().manual_seed(seed + 3))
    for name, xs in samples.items():
        results[name] = evaluate(xs, prior, target)

    print(f"toy alignment: {NUM_MODES}-mode ring prior, R(x) = -|x - {REWARD_CENTER}|²/(2·{REWARD_LENGTH}²), "
          f"β_target = {BETA_TARGET}, "
          f"{NUM_STEPS} SDE-DPM++ steps, {num_eval} eval samples{' (quick)' if quick else ''}")
    print(f"{'method':<16} {'reward_mean':>11} {'kl_to_target':>12} {'modes_kept':>10} {'train_s':>8}")
    for name, row in results.items():
        train_s = f"{seconds[name]:8.1f}" if name in seconds else f"{'':>8}"
        print(f"{name:<16} {row['reward_mean']:11.3f} {row['kl_to_target']:12.3f} "
              f"{row['modes_kept']:>5}/{row['modes_total']:<4} {train_s}")
    (out_dir / "toy_alignment.json").write_text(json.dumps(results, indent=2))
    save_plot(out_dir / "toy_alignment.png", samples, target)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for toy_alignment.json and toy_alignment.png")
    parser.add_argument("--quick", action="store_true", help="short training runs (as the test does)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run(args.out, quick=args.quick, seed=args.seed)


if __name__ == "__main__":
    main()
