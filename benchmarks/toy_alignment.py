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
switches the residual off and gives the prior back. Every method trains with the trainer's own code:
the algorithm classes of ``r2d3ray/train/updates.py`` driven by a ``TrainingRun`` over the toy policy
(:class:`ToyPolicy`), the trainer's sampler (SDE-DPM-Solver++; ODE DPM-Solver++ for NFT's data), an
identity renderer (images = x̂0), an in-process reward plane and a local optimizer engine (AdamW without
decay, lr 3e-3, grad-norm clip 1.0, one optimizer step per epoch of 128 trajectories; GRPO four):

- ``nabla``: Nabla-R2D3 as shipped (forward residual ∇-DB, forward-looking reward gradient with the
  ×ᾱ weighting, stale trajectories), β = β_target.
- ``nabla_no_alpha_weighting``: the same with ``reward_adaptive_scaling="off"`` (the ablation).
- ``nft``: DiffusionNFT (reference defaults) on ODE samples of the old policy.
- ``grpo``: GRPO (group-relative advantages, clipped ratio, KL 0.04 to the reference).
- ``reward_backprop``: DRaFT-K with K = 1, reported as is (it has no prior-preserving term; with
  per-step adapters only the last step's adapter learns).

The sampler takes 50 steps, not the reference's 20: with 20 first-order SDE steps the sampled prior
itself is visibly sharper than p (KL(p ‖ base) ≈ 0.13 against ≈ 0.04 with 50 steps), which would
hide how close a method gets to p*.

Each row reports, as mean ± standard error over seeds, the mean reward, KL(p* ‖ q) on a grid (q: the
smoothed histogram of the method's samples, so a lost mode costs a lot), and how many prior modes
keep at least 2% of the samples (nearest-mode assignment); learning curves every 20 epochs.
``base`` is the untouched prior through the same sampler; ``target_exact`` is exact samples of p*,
i.e. the metric's noise floor. Results and what they show: benchmarks/README.md.

Usage: ``python benchmarks/toy_alignment.py --out DIR [--quick] [--seeds 3]``; or ``run(out_dir, quick, seeds)``.
Writes ``toy_alignment.json``, ``toy_alignment.png`` (samples) and ``toy_alignment_curves.png`` to DIR.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from r2d3ray.config import R2D3Config
from r2d3ray.eval.stats import mean_se
from r2d3ray.models.pipeline import SplatPipeline
from r2d3ray.models.schedulers import SDEDPMSolver, sample_trajectory
from r2d3ray.rewards.combiner import RewardAnswer
from r2d3ray.train.engine import LocalEngine
from r2d3ray.train.run import TrainingRun
from r2d3ray.train.updates import ALGORITHMS, blend_adapter_, train_epoch

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
    """ε_θ(x, t) = ε*(x, t) + adapter(x, t): the policy interface the trainer's algorithms use
    (r2d3ray/train/updates.py), with named adapters that can be switched and disabled like peft's.
    Only the "policy" adapter trains; the others ("old") follow it by soft updates."""

    latent_shape = (2,)
    scheduler_config: dict = {}

    def __init__(self, prior: GaussianMixture2D, sampler: SDEDPMSolver, adapter_names: tuple[str, ...] = ("policy",)):
        super().__init__()
        self.prior = prior
        self.register_buffer("alphas_cumprod", sampler.alphas_cumprod.float().clone())
        grid = torch.cat([sampler.timesteps, sampler.prev_timesteps])
        self.adapters = nn.ModuleDict({name: StepwiseMLP(grid) for name in adapter_names})
        for name, adapter in self.adapters.items():
            adapter.requires_grad_(name == "policy")
            if name != "policy":  # copies start equal to the policy, as the trainer's add_adapters makes them
                blend_adapter_(self, name, "policy", decay=0.0)
        self.active_adapter = "policy"
        self.adapters_enabled = True

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t).long().expand(x.shape[0])
        eps = self.prior.eps(x, self.alphas_cumprod[t])
        if self.adapters_enabled:
            eps = eps + self.adapters[self.active_adapter](x, t)
        return eps

    # The policy interface: the toy is unconditional and has no guidance; its output is ε.
    def encode_prompts(self, prompts: list[str]) -> None:
        return None

    def predict(self, x: torch.Tensor, t, cond=None, guidance_scale: float = 1.0) -> torch.Tensor:
        return self(x, t)

    def eps_from_output(self, output: torch.Tensor) -> torch.Tensor:
        return output

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return dict(self.adapters[name].named_parameters())

    @contextmanager
    def adapters_disabled(self):
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


class ToyPipeline(SplatPipeline):
    """The trainer's sampler over the toy policy; rendering is the identity (images = x0 (B, 2))."""

    def render(self, latents, cameras=None, needs=frozenset(), background=None) -> dict[str, torch.Tensor]:
        return {"images": latents}


class ToyRewardPlane:
    """The reward plane in-process: R and ∂R/∂images of the toy reward, answered at once."""

    wait_seconds = 0.0

    def submit(self, views: dict[str, torch.Tensor], prompts: list[str], with_grad: bool = True):
        images = views["images"].detach().requires_grad_(with_grad)
        with torch.enable_grad():
            values = reward(images)  # (B,)
            grads = torch.autograd.grad(values.sum(), images)[0] if with_grad else None
        values = values.detach()
        scored = torch.ones(len(values), 1, dtype=torch.bool)
        answer = RewardAnswer(rewards=values, finite=torch.isfinite(values), components={"toy": values[:, None]},
                              grads=grads, extra_grads={}, view_rewards=values[:, None], scored=scored)
        return _Answered(answer)


@dataclass
class _Answered:
    answer: RewardAnswer

    def result(self) -> RewardAnswer:
        return self.answer


def toy_config(algorithm: str, epochs: int, seed: int, section: dict | None = None, micro_batch: int = BATCH) -> R2D3Config:
    """The run config the toy trains with: one sampling batch of BATCH trajectories per epoch, Adam
    (AdamW without decay) at LR, grad-norm clip 1, an optimizer step every ``micro_batch`` trajectories."""
    return R2D3Config.model_validate({
        "name": f"toy-{algorithm}",
        "sampling": {"num_steps": NUM_STEPS, "eta": 1.0, "guidance_scale": 1.0, "batch_size": BATCH,
                     "num_batches_per_epoch": 1},
        "training": {"lr": LR, "weight_decay": 0.0, "epochs": epochs, "seed": seed, "max_grad_norm": 1.0,
                     "gradient_accumulation_steps": micro_batch, "micro_batch_size": micro_batch},
        "algorithm": {"name": algorithm, **({algorithm: section} if section else {})},
    })


def train(policy: ToyPolicy, cfg: R2D3Config, on_epoch=None) -> None:
    """``cfg.training.epochs`` epochs of the trainer's algorithm code on the toy (with stale
    trajectories the first epoch only samples, as in the trainer)."""
    pipeline = ToyPipeline(policy, cfg.sampling.num_steps, cfg.sampling.eta, cfg.sampling.guidance_scale)
    Algorithm = ALGORITHMS[cfg.algorithm.name]
    engine = LocalEngine.from_config(cfg, policy, Algorithm.micro_steps_per_update(cfg))
    run = TrainingRun(cfg, pipeline, ToyRewardPlane(), engine, tracker=None, prompt_pool=[""])
    algorithm = Algorithm(run)
    for epoch in range(cfg.training.epochs):
        train_epoch(run, algorithm)
        if on_epoch is not None:
            on_epoch(epoch + 1)


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


def run(out_dir, quick: bool = False, seeds: int = 1, first_seed: int = 0) -> dict:
    """Train every method from the same prior with ``seeds`` seeds, evaluate, print a table (mean ±
    standard error over seeds), write JSON and PNGs. Returns {method: {metric: mean, metric_se: s.e.,
    "per_seed": [...], "curve": [...]}}."""
    # The tensors are tiny (B × 2): intra-op threads only add synchronisation, which on a busy machine
    # costs 10-20× in wall time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(Path(out_dir), quick, seeds, first_seed)
    finally:
        torch.set_num_threads(threads)


def methods(quick: bool) -> dict[str, tuple[tuple[str, ...], Callable[[int], R2D3Config]]]:
    """name → (adapters, seed → run config). Every method trains on BATCH trajectories per epoch for
    the same number of epochs, with the trainer's code (r2d3ray/train/updates.py)."""
    epochs = 20 if quick else 200
    # R2D3 as shipped (×ᾱ weighting, stratified 20% of the 50 steps, stale trajectories), β = β_target.
    nabla = {"reward_scale": BETA_TARGET, "reward_adaptive_scaling": "squared", "unet_reg_scale": 10.0,
             "timestep_fraction": 0.2, "trajectories": "stale"}
    return {
        "nabla": (("policy",), lambda seed: toy_config("nabla", epochs, seed, nabla)),
        # Ablation: without the ×ᾱ weighting of the forward-looking reward gradient.
        "nabla_no_alpha_weighting": (("policy",), lambda seed: toy_config(
            "nabla", epochs, seed, {**nabla, "reward_adaptive_scaling": "off"})),
        # NFT's defaults, but 20% of the 50 timesteps per sample (the reference trains 9 of its 10); no EMA.
        "nft": (("policy", "old"), lambda seed: toy_config("nft", epochs, seed, {"group_size": 32, "timestep_fraction": 0.2})),
        # GRPO: 20% of the timesteps, four optimizer steps per epoch so the ratio leaves 1 and the clip acts.
        "grpo": (("policy",), lambda seed: toy_config("grpo", epochs, seed, {"group_size": 32, "timestep_fraction": 0.2},
                                                      micro_batch=BATCH // 4)),
        "reward_backprop": (("policy",), lambda seed: toy_config("reward_backprop", epochs, seed, {"grad_steps": 1})),
    }


def _mean_se(values: list[float]) -> tuple[float, float]:
    return mean_se(torch.tensor(values, dtype=torch.float64))


def _run(out_dir: Path, quick: bool, seeds: int, first_seed: int) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    prior = ring_prior()
    target = prior.tilted(BETA_TARGET, torch.tensor(REWARD_CENTER), REWARD_LENGTH)
    sampler = SDEDPMSolver(NUM_STEPS)
    num_eval, num_curve = (6000, 1500) if quick else (30000, 3000)
    curve_every = 5 if quick else 20
    per_seed: dict[str, list[dict]] = {}
    curves: dict[str, list[list[tuple[int, float, float]]]] = {}
    seconds: dict[str, list[float]] = {}
    samples: dict[str, torch.Tensor] = {}
    for seed in range(first_seed, first_seed + seeds):
        torch.manual_seed(seed)
        eval_seed = seed + 1
        base = sample_policy(ToyPolicy(prior, sampler), sampler, num_eval, eval_seed)
        per_seed.setdefault("base", []).append(evaluate(base, prior, target))
        exact = target.sample(num_eval, torch.Generator().manual_seed(seed + 3))
        per_seed.setdefault("target_exact", []).append(evaluate(exact, prior, target))
        samples.setdefault("base", base)
        samples.setdefault("target_exact", exact)
        for name, (adapters, config_for) in methods(quick).items():
            policy, curve = ToyPolicy(prior, sampler, adapters), []

            def checkpoint(epoch: int) -> None:
                if epoch % curve_every == 0:
                    row = evaluate(sample_policy(policy, sampler, num_curve, eval_seed), prior, target)
                    curve.append((epoch, row["reward_mean"], row["kl_to_target"]))

            start = time.perf_counter()
            train(policy, config_for(seed), checkpoint)
            seconds.setdefault(name, []).append(time.perf_counter() - start)
            xs = sample_policy(policy, sampler, num_eval, eval_seed)
            per_seed.setdefault(name, []).append(evaluate(xs, prior, target))
            curves.setdefault(name, []).append(curve)
            samples.setdefault(name, xs)

    results = {}
    for name, rows in per_seed.items():
        summary = {"modes_total": rows[0]["modes_total"], "per_seed": rows}
        for key in ("reward_mean", "kl_to_target", "modes_kept"):
            summary[key], summary[f"{key}_se"] = _mean_se([r[key] for r in rows])
        if name in seconds:
            summary["train_s"] = sum(seconds[name]) / len(seconds[name])
            summary["curve"] = _mean_curve(curves[name])
        results[name] = summary

    print(f"toy alignment: {NUM_MODES}-mode ring prior, R(x) = -|x - {REWARD_CENTER}|²/(2·{REWARD_LENGTH}²), "
          f"β_target = {BETA_TARGET}, {NUM_STEPS} SDE-DPM++ steps, {num_eval} eval samples, "
          f"{seeds} seed(s), mean ± s.e.{' (quick)' if quick else ''}")
    print(f"{'method':<26} {'reward_mean':>16} {'kl_to_target':>16} {'modes_kept':>12} {'train_s':>8}")
    for name, row in results.items():
        train_s = f"{row['train_s']:8.1f}" if "train_s" in row else f"{'':>8}"
        print(f"{name:<26} {row['reward_mean']:8.3f} ± {row['reward_mean_se']:.3f} "
              f"{row['kl_to_target']:8.3f} ± {row['kl_to_target_se']:.3f} "
              f"{row['modes_kept']:6.1f}/{row['modes_total']:<5} {train_s}")
    (out_dir / "toy_alignment.json").write_text(json.dumps(results, indent=2))
    save_plot(out_dir / "toy_alignment.png", samples, target)
    save_curves(out_dir / "toy_alignment_curves.png", results)
    return results


def _mean_curve(curves: list[list[tuple[int, float, float]]]) -> list[dict]:
    """Per evaluation epoch, the mean and s.e. over seeds of the reward and KL."""
    out = []
    for points in zip(*curves):
        reward_mean, reward_se = _mean_se([p[1] for p in points])
        kl, kl_se = _mean_se([p[2] for p in points])
        out.append({"epoch": points[0][0], "reward_mean": reward_mean, "reward_mean_se": reward_se,
                    "kl_to_target": kl, "kl_to_target_se": kl_se})
    return out


def save_curves(path: Path, results: dict) -> None:
    """Learning curves (reward and KL to p* against epoch, ±1 s.e. over seeds), if matplotlib is present."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, row in results.items():
        if "curve" not in row or not row["curve"]:
            continue
        epochs = [p["epoch"] for p in row["curve"]]
        for ax, key in zip(axes, ("reward_mean", "kl_to_target")):
            mean = torch.tensor([p[key] for p in row["curve"]])
            se = torch.tensor([p[f"{key}_se"] for p in row["curve"]])
            ax.plot(epochs, mean, label=name)
            ax.fill_between(epochs, mean - se, mean + se, alpha=0.2)
    for ax, key in zip(axes, ("reward_mean", "kl_to_target")):
        ax.axhline(results["target_exact"][key], color="black", lw=0.8, ls="--", label="target_exact")
        ax.set_xlabel("epoch")
        ax.set_title(key)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for toy_alignment.json and the PNGs")
    parser.add_argument("--quick", action="store_true", help="short training runs (as the test does)")
    parser.add_argument("--seeds", type=int, default=3, help="independent seeds per method (standard errors over them)")
    parser.add_argument("--first-seed", type=int, default=0)
    args = parser.parse_args()
    run(args.out, quick=args.quick, seeds=args.seeds, first_seed=args.first_seed)


if __name__ == "__main__":
    main()
