"""Training of the tiny critic (``rewards/critic.py``) on 2D renders of the world, reproducibly.

Data (``rewards/critic_data.py``): a render bank of every geometry from random views, rendered once
before the first step (about 20 s); each step draws ``batch_size`` train-split prompts and, for each,
one ground-truth render and one negative of a uniformly drawn family, composed from the bank. Only
train-split objects are ever shown, as positives or as "another object", so the held-out prompts'
objects stay unseen. Objective: binary cross-entropy (ground truth 1, negatives 0), which anchors the
score's zero, plus the Bradley–Terry loss ``log(1 + exp(−(s⁺ − s⁻)))`` of each prompt's pair, the
preference loss learned rewards such as HPSv2 are trained with, plus (``gradient_penalty``) the squared
norm of the critic's pixel gradient at random points between each pair: a reward is used through its
gradient, and without the penalty this critic ranked well while its gradients on different samples
were nearly orthogonal (``r2d3ray/assets/tiny_critic/README.md``). AdamW, linear warmup then cosine decay.

Reproducible: one seed drives the initial weights and a CPU ``torch.Generator`` every draw, and the
number of threads is fixed, so two runs write identical weights. At the end the critic is scored on
the held-out prompts (``eval.critic.pairwise_accuracy``, a bank of fresh views) and the numbers are
written to ``config.json`` beside ``model.safetensors``.

The YAML the CLI reads (``r2d3ray train-critic --config configs/tiny_critic.yaml --out DIR``) holds the
fields of :class:`CriticTrainConfig`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.optimization import SchedulerType, get_scheduler
from pydantic import Field, field_validator
from tqdm.auto import tqdm

from r2d3ray.config import Section, validate_options
from r2d3ray.eval.critic import held_out_pairwise
from r2d3ray.models.world import parse_prompt, sample_prompts, split_prompts
from r2d3ray.rewards.critic import TinyCritic, prompt_indices
from r2d3ray.rewards.critic_data import FAMILIES, add_pixel_noise, build_bank, negatives, positives


class CriticTrainConfig(Section):
    """Options of :func:`train_critic`, checked like a run config's sections (unknown keys, types and
    ranges are refused); every field has the value the committed critic used."""

    seed: int = 0
    steps: int = Field(500, ge=1)
    batch_size: int = Field(64, ge=1)  # prompts per step, each with one ground truth and one negative
    lr: float = Field(2e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    warmup_steps: int = Field(50, ge=0)
    lr_schedule: SchedulerType = SchedulerType.COSINE  # a name diffusers.optimization.get_scheduler knows
    grad_clip: float = Field(1.0, gt=0.0)
    pairwise_weight: float = Field(1.0, ge=0.0)  # weight of the Bradley–Terry pair loss beside the cross-entropy
    # Weight of the zero-centred gradient penalty on images between each pair (0: none; see critic_loss).
    gradient_penalty: float = Field(0.0, ge=0.0)
    image_size: int = Field(64, ge=1)  # the critic's input; configs/toy.yaml renders at 64
    splat_views: int = Field(24, ge=1)  # bank views per geometry, per kind (see critic_data)
    exact_views: int = Field(6, ge=1)
    jitter_views: int = Field(24, ge=1)
    widths: list[int] = Field(default_factory=lambda: [32, 64, 128], min_length=1)
    embed_dim: int = Field(64, ge=1)
    eval_seed: int = 1  # the held-out bank's views and pairs
    eval_pairs_per_prompt: int = Field(8, ge=1)
    num_threads: int | None = Field(2, ge=1)  # torch.set_num_threads; fixed for bitwise-reproducible weights

    @field_validator("widths")
    @classmethod
    def _group_norm_widths(cls, widths: list[int]) -> list[int]:
        if any(w < 8 or w % 8 for w in widths):
            raise ValueError("every width must be a multiple of 8 (each block has a GroupNorm(8))")
        return widths


def critic_loss(truth: torch.Tensor, fake: torch.Tensor, pairwise_weight: float) -> torch.Tensor:
    """Cross-entropy of both logits (N,) plus the Bradley–Terry loss of the pairs (truth[i], fake[i])."""
    cross_entropy = 0.5 * (F.binary_cross_entropy_with_logits(truth, torch.ones_like(truth))
                           + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
    return cross_entropy + pairwise_weight * F.softplus(fake - truth).mean()


def interpolate_gradient_penalty(critic: TinyCritic, truth_images: torch.Tensor, fake_images: torch.Tensor,
                                 words: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mean squared norm of the critic's pixel gradient at random points between each (ground truth,
    negative) pair (N, 3, H, W): the zero-centred penalty of Thanh-Tung et al. (2019). It keeps the
    score smooth along the paths from the prior's failures to the truth, so its gradient there points
    toward the truth instead of into pixel patterns that only this critic rewards."""
    mix = torch.rand(truth_images.shape[0], 1, 1, 1, generator=generator)
    between = (mix * truth_images + (1 - mix) * fake_images).requires_grad_(True)
    grad, = torch.autograd.grad(critic(between, words).sum(), between, create_graph=True)
    return grad.square().sum(dim=(1, 2, 3)).mean()


def train_critic(config: CriticTrainConfig | dict, out_dir: str | Path, evaluate: bool = True) -> dict:
    """Train a critic from scratch and save it into ``out_dir``; returns what ``config.json`` records
    (``training``: the config, ``wall_time_s``, ``held_out``: the pairwise accuracies if ``evaluate``)."""
    config = validate_options(CriticTrainConfig, config, "critic config")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    rng = torch.Generator().manual_seed(config.seed)  # bank views, prompts, families, degradations

    critic = TinyCritic(tuple(config.widths), config.embed_dim, config.image_size)
    bank = build_bank(config.image_size, config.splat_views, config.exact_views, config.jitter_views, rng)
    train_prompts = set(split_prompts("train"))
    optimizer = torch.optim.AdamW(critic.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    lr_schedule = get_scheduler(config.lr_schedule, optimizer, num_warmup_steps=config.warmup_steps,
                                num_training_steps=config.steps)

    critic.train()
    progress = tqdm(range(1, config.steps + 1), desc="train-critic", unit="step")
    for _ in progress:
        specs = [parse_prompt(p) for p in sample_prompts(config.batch_size, rng, "train")]
        families = [FAMILIES[i] for i in torch.randint(len(FAMILIES), (config.batch_size,), generator=rng).tolist()]
        truth_images = add_pixel_noise(positives(bank, specs, rng), rng)  # (N, 3, H, W)
        fake_images = add_pixel_noise(negatives(bank, specs, families, rng, allowed=train_prompts), rng)
        words = prompt_indices(specs)  # (N, 4)
        logits = critic(torch.cat([truth_images, fake_images]), torch.cat([words, words]))  # (2N,)
        truth, fake = logits.chunk(2)
        loss = critic_loss(truth, fake, config.pairwise_weight)
        if config.gradient_penalty:
            loss = loss + config.gradient_penalty * interpolate_gradient_penalty(
                critic, truth_images, fake_images, words, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(critic.parameters(), config.grad_clip)
        optimizer.step()
        lr_schedule.step()
        progress.set_postfix(loss=f"{loss.item():.4f}", pair_acc=f"{(truth > fake).float().mean().item():.2f}")
    critic.eval()
    train_time = time.perf_counter() - started

    record = dict(training=config.model_dump(mode="json"), train_time_s=round(train_time, 1))
    if evaluate:
        record["held_out"] = held_out_pairwise(critic, config.eval_seed, config.eval_pairs_per_prompt)
    record["wall_time_s"] = round(time.perf_counter() - started, 1)
    critic.save(out_dir, record)
    return record
