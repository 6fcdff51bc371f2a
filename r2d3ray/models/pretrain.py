"""Pretraining of the tiny prior (``TinySplatGenerator``) on the procedural world.

Data: the exact ground-truth splatter images of every train-split prompt (``world.render_ground_truth``
from the generator's own rig at its latent resolution), computed once before the first step; the
world is deterministic, so there is nothing to augment. Objective: DiffSplat's, the standard
ε-prediction DDPM loss ``‖ε_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t, prompt) − ε‖²`` with t ~ U{0..999} under the
generator's own noise schedule (diffusers' ``DDPMScheduler`` built from ``scheduler_config``, as
DiffSplat trains), weighted per sample by min-SNR-γ (``snr_gamma``; see ``models/tiny.py`` for why
the tiny prior needs it), and the prompt replaced by "" with probability ``cfg_dropout`` so that the
same network serves as the unconditional branch of classifier-free guidance.

The YAML the CLI reads (``r2d3ray pretrain --config configs/tiny_prior.yaml --out DIR``) holds the
fields of :class:`PretrainConfig`, ``model`` being overrides of ``tiny.TINY_DEFAULT_CONFIG``::

    seed: 0
    steps: 4800
    batch_size: 16
    lr: 2.0e-3
    ...
    model: {}

Progress: a tqdm bar (rate, ETA, loss). Tracking: one MLflow run (params, ``train/loss``,
``train/lr``) in ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<out_dir>/mlflow.db``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler
from diffusers.optimization import SchedulerType, get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from pydantic import Field, field_validator
from tqdm.auto import tqdm

from r2d3ray.config import Section, validate_options
from r2d3ray.models.tiny import TINY_DEFAULT_CONFIG, TinySplatGenerator
from r2d3ray.models.world import render_ground_truth, split_prompts
from r2d3ray.tracking import Tracker, resolve_tracking_uri

CONFIG_NAME = "pretrain_config.json"


class PretrainConfig(Section):
    """Options of :func:`pretrain`, checked like a run config's sections (unknown keys, types and
    ranges are refused). The committed checkpoint's values are configs/tiny_prior.yaml's (also
    saved beside it as pretrain_config.json), not these defaults."""

    seed: int = 0
    steps: int = Field(3000, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_steps: int = Field(100, ge=0)
    lr_schedule: SchedulerType = SchedulerType.COSINE  # a name diffusers.optimization.get_scheduler knows
    cfg_dropout: float = Field(0.1, ge=0.0, lt=1.0)  # probability of training on the "" prompt
    grad_clip: float = Field(1.0, gt=0.0)
    # > 0: save an exponential moving average of the weights (diffusers' EMAModel); 0 = no EMA
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0)
    snr_gamma: float = Field(5.0, ge=0.0)  # min-SNR-γ loss weighting (Hang et al. 2023); 0 = the plain ε loss
    log_every: int = Field(20, ge=1)  # MLflow logging interval, steps
    num_threads: int | None = Field(None, ge=1)  # torch.set_num_threads; None leaves torch's default
    experiment: str = "tiny_prior"  # MLflow experiment name
    model: dict[str, Any] = Field(default_factory=dict)  # overrides of tiny.TINY_DEFAULT_CONFIG

    @field_validator("model")
    @classmethod
    def _model_keys_known(cls, model: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(model) - set(TINY_DEFAULT_CONFIG))
        if unknown:
            raise ValueError(f"unknown keys {unknown}; the tiny prior's are {sorted(TINY_DEFAULT_CONFIG)}")
        return model


def loss_weights(noise_schedule: DDPMScheduler, t: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """(B,) weights of the per-sample ε losses: min(SNR_t, γ)/SNR_t (min-SNR-γ, as diffusers'
    training scripts compute it), which caps the weight low-noise steps get in x̂0 terms; all ones
    for γ = 0."""
    if snr_gamma == 0:
        return torch.ones(t.shape)
    snr = compute_snr(noise_schedule, t)  # (B,) ᾱ/(1−ᾱ)
    return snr.clamp(max=snr_gamma) / snr


def pretrain(config: PretrainConfig | dict, out_dir: str | Path) -> Path:
    """Train a tiny prior from scratch and ``save_pretrained`` it into ``out_dir``; returns ``out_dir``.

    ``out_dir`` also receives ``pretrain_config.json`` (the resolved config) and, unless
    ``MLFLOW_TRACKING_URI`` is set, the MLflow store ``mlflow.db``.
    """
    config = validate_options(PretrainConfig, config, "pretrain config")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    rng = torch.Generator().manual_seed(config.seed)  # batches, timesteps, noise, CFG dropout

    generator = TinySplatGenerator.from_config(config.model)
    V, C, h, w = generator.latent_shape
    prompts = split_prompts("train")
    started = time.perf_counter()
    data = render_ground_truth(prompts, generator.rig, h)  # (P, V, 12, h, w), a few seconds
    noise_schedule = DDPMScheduler.from_config(generator.scheduler_config)
    num_train_timesteps = noise_schedule.config.num_train_timesteps

    optimizer = torch.optim.AdamW(generator.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    lr_schedule = get_scheduler(
        config.lr_schedule, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.steps
    )
    ema = EMAModel(generator.parameters(), decay=config.ema_decay) if config.ema_decay > 0 else None
    tracker = Tracker(resolve_tracking_uri("", out_dir), config.experiment)
    tracker.start(run_name=f"pretrain-seed{config.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    tracker.log_params({**config.model_dump(mode="json"), "num_train_prompts": len(prompts), "out_dir": str(out_dir)})

    generator.train()
    progress = tqdm(range(1, config.steps + 1), desc="pretrain", unit="step")
    try:
        for step in progress:
            index = torch.randint(len(prompts), (config.batch_size,), generator=rng)
            dropped = torch.rand(config.batch_size, generator=rng) < config.cfg_dropout
            batch_prompts = ["" if drop else prompts[i] for i, drop in zip(index.tolist(), dropped.tolist())]
            x0 = data[index]  # (B, V, 12, h, w)
            noise = torch.randn(x0.shape, generator=rng)
            t = torch.randint(num_train_timesteps, (config.batch_size,), generator=rng)
            x_t = noise_schedule.add_noise(x0, noise, t)

            raw = generator.predict(x_t, t, generator.encode_prompts(batch_prompts))
            loss = torch.nn.functional.mse_loss(generator.eps_from_output(raw), noise, reduction="none")
            loss = (loss.mean(dim=(1, 2, 3, 4)) * loss_weights(noise_schedule, t, config.snr_gamma)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(generator.parameters(), config.grad_clip)
            optimizer.step()
            lr_schedule.step()
            if ema is not None:
                ema.step(generator.parameters())

            progress.set_postfix(loss=f"{loss.item():.4f}")
            if step % config.log_every == 0 or step == config.steps:
                tracker.log_metrics({"train/loss": loss.item(), "train/lr": lr_schedule.get_last_lr()[0]}, step=step)
        if ema is not None:
            ema.copy_to(generator.parameters())
        generator.eval()
        generator.save_pretrained(out_dir)
        wall = time.perf_counter() - started
        (out_dir / CONFIG_NAME).write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
        tracker.log_metrics({"train/wall_time_s": wall}, step=config.steps)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
    return out_dir
