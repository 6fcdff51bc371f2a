"""The plumbing under the train loop: model, DeepSpeed engine, reward plane, MLflow, checkpoints.

`TrainingRun` is what `train_loop_per_worker` and the algorithms (r2d3ray/train/updates.py) talk to,
so the loop itself reads like the algorithm. One instance per Ray Train worker; rank 0 alone writes
MLflow. `TrainingRun.start` builds a worker's collaborators (generator on Ray Train's device, LoRA
adapters, reward plane, DeepSpeed engine, MLflow tracker) and restores the checkpoint Ray Train hands
the worker (a restarted worker, or a re-run under the same run name: r2d3ray/train/checkpoint.py).
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import yaml

from r2d3ray.config import R2D3Config, load_reward_app_config
from r2d3ray.eval.prompts import training_prompts
from r2d3ray.infer import write_outputs
from r2d3ray.models.loading import check_on_device, load_generator
from r2d3ray.models.lora import save_lora
from r2d3ray.models.pipeline import Rollout, SplatPipeline
from r2d3ray.render.cameras import default_rig, render_rig
from r2d3ray.render.pictures import grid_image
from r2d3ray.tracking import Tracker, git_commit, resolve_tracking_uri
from r2d3ray.train.adapters import add_adapters, deployed_adapter
from r2d3ray.train.checkpoint import restore_checkpoint, save_checkpoint

EVAL_SEED = 0  # the evaluation pictures' noise: the same at every step, so they compare
NUM_DEFAULT_EVAL_PROMPTS = 4  # without tracking.eval_prompts, the first training prompts


def reward_needs(cfg: R2D3Config) -> frozenset[str]:
    """Extra render channels the configured rewards read (alphas, depths, normals)."""
    from r2d3ray.rewards.registry import reward_class

    app = load_reward_app_config(cfg.rewards.app_config)
    models = {d.name: d.reward for d in app.deployments}
    return frozenset().union(*(reward_class(models[t.name]).needs for t in cfg.rewards.terms))


def connect_rewards(cfg: R2D3Config, needs: frozenset[str], rank: int, served: bool):
    """The reward plane: the Serve app's deployments (or the same rewards in-process)."""
    from r2d3ray.rewards.combiner import CombinedReward, RewardCombiner
    from r2d3ray.rewards.registry import rewards_from_app_config
    from r2d3ray.serve.client import LocalRewards, ServedRewards

    r = cfg.rewards
    weights = {t.name: t.weight for t in r.terms}
    combining = {"aggregate": r.aggregate, "views_per_sample": r.views_per_sample, "noise_std": r.noise_std,
                 "seed": cfg.training.seed * 1000 + rank}
    if served:
        return ServedRewards(r.app_name, RewardCombiner(weights, needs=needs, **combining),
                             timeout_s=r.request_timeout_s, retry_budget_s=r.retry_budget_s, grad_dtype=r.grad_dtype)
    return LocalRewards(CombinedReward(rewards_from_app_config(r.app_config, weights), weights, **combining))


class TrainingRun:
    """One worker's run, built from its collaborators: ``pipeline`` (generator with its adapters, and
    sampler), ``rewards`` (the reward plane), ``engine`` (DeepSpeed's, or ``engine.LocalEngine``),
    ``tracker`` (MLflow; inactive off rank 0) and the ``prompt_pool`` it draws training prompts from."""

    def __init__(self, cfg: R2D3Config, pipeline: SplatPipeline, rewards, engine, tracker: Tracker,
                 prompt_pool: list[str], needs: frozenset[str] = frozenset(), rank: int = 0, world_size: int = 1):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.pipeline, self.rewards, self.engine, self.tracker = pipeline, rewards, engine, tracker
        self.prompt_pool, self.needs = prompt_pool, needs
        self.epoch, self.global_step = 0, 0
        self.stale: Rollout | None = None  # the previous epoch's trajectories (Nabla's "stale" mode)
        self.times: dict[str, float] = {}
        self.metric_sums: dict[str, list[float]] = {}
        self.started = time.monotonic()
        self.rng = torch.Generator().manual_seed(cfg.training.seed * 1000 + rank)
        self.eval_prompts = cfg.tracking.eval_prompts or prompt_pool[:NUM_DEFAULT_EVAL_PROMPTS]
        self._first_epoch = 0

    @classmethod
    def start(cls, cfg: R2D3Config, micro_steps_per_update: int, served: bool = True) -> TrainingRun:
        """Set up this Ray Train worker; ``micro_steps_per_update`` is DeepSpeed's accumulation count."""
        import random

        import ray.train
        import ray.train.torch

        from r2d3ray.train.engine import deepspeed_engine

        ctx = ray.train.get_context()
        rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
        random.seed(cfg.training.seed + rank)
        np.random.seed(cfg.training.seed + rank)
        torch.manual_seed(cfg.training.seed + rank)

        # Every tensor of the run lives on the device Ray Train gives this worker.
        device = ray.train.torch.get_device()
        generator = load_generator(cfg, device)
        add_adapters(generator, cfg)
        check_on_device(generator, device)
        pipeline = SplatPipeline(generator, cfg.sampling.num_steps, cfg.sampling.eta, cfg.sampling.guidance_scale,
                                 cfg.render.gaussian_convention)
        needs = reward_needs(cfg)
        tracker = Tracker(resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.output_dir), cfg.tracking.experiment,
                          active=rank == 0)
        run = cls(cfg, pipeline, connect_rewards(cfg, needs, rank, served),
                  deepspeed_engine(cfg, generator.denoiser, micro_steps_per_update), tracker, training_prompts(cfg),
                  needs, rank, world_size)

        checkpoint = ray.train.get_checkpoint()
        run_id = None
        if checkpoint is not None:
            with checkpoint.as_directory() as path:
                run_id = restore_checkpoint(run, Path(path))
        run.open_tracking(run_id)
        return run

    def open_tracking(self, run_id: str | None) -> None:
        """Open (or, resumed, continue) the MLflow run; a fresh run's step 0 shows the base model beside
        the untrained policy."""
        cfg = self.cfg
        self.tracker.start(cfg.name, run_id=run_id, system_metrics=cfg.tracking.system_metrics,
                           tags={"algorithm": cfg.algorithm.name, "rewards": ",".join(t.name for t in cfg.rewards.terms)})
        self.tracker.log_params({**cfg.flat(), "git_commit": git_commit(Path(__file__).parent)})
        self.base_views = self.eval_views(self.eval_latents(base=True))
        if run_id is None:
            self.log_pictures(step=0)

    # ------------------------------------------------------------------ what the loop calls

    def remaining_epochs(self, sampling_only_first: bool = False) -> range:
        """Indices of the trained epochs still to run, from ``self.epoch`` (trained epochs done); with
        ``sampling_only_first`` and no trajectories yet, first −1 (or one before ``self.epoch``): an epoch
        that only samples, which ``end_epoch`` neither counts nor checkpoints."""
        first = self.epoch - 1 if sampling_only_first and self.stale is None else self.epoch
        self._first_epoch = first
        return range(first, self.cfg.training.epochs)

    def next_prompts(self, n: int) -> list[str]:
        """n training prompts for this worker, drawn with replacement from the run's seeded generator."""
        return [self.prompt_pool[i] for i in torch.randint(len(self.prompt_pool), (n,), generator=self.rng).tolist()]

    def reward_cameras(self, batch_size: int):
        """The views rewards see: random-view jitter (the reference's random_view) or the default rig."""
        return render_rig(self.cfg.render, generator=self.rng, batch_size=batch_size).to(self.pipeline.generator.device)

    @contextmanager
    def timer(self, name: str):
        """Adds the block's time to `name`, less the time it spent blocked on the reward plane,
        which goes to "reward_wait" (the split sample / reward wait / train)."""
        start, waited = time.perf_counter(), self.rewards.wait_seconds
        try:
            yield
        finally:
            wait = self.rewards.wait_seconds - waited
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start - wait
            self.times["reward_wait"] = self.times.get("reward_wait", 0.0) + wait

    def record(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.metric_sums.setdefault(key, []).append(float(value))

    def step(self, loss: torch.Tensor) -> bool:
        """One micro-step: DeepSpeed accumulates and steps the optimizer at the boundary; True when it did."""
        self.engine.backward(loss)
        # Asked before engine.step(), which advances the micro-step count the answer is about.
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if boundary:
            self.global_step += 1
        return boundary

    def end_epoch(self, epoch: int, samples: int) -> dict[str, float]:
        """After epoch ``epoch`` (−1: the sampling-only one): report to Ray Train, with a checkpoint every
        `checkpoint_every` trained epochs and after the last; log to MLflow at step = optimizer steps done,
        with the epoch as a metric (so the sampling-only epoch's rewards sit at step 0 with the pictures
        before training); print progress."""
        import ray.train
        from ray.train import Checkpoint

        trained, epochs = epoch >= 0, self.cfg.training.epochs
        self.epoch = epoch + 1  # trained epochs done
        metrics = {k: float(np.mean(v)) for k, v in self.metric_sums.items()}
        elapsed = sum(self.times.values())
        metrics.update({f"time/{k}": v for k, v in self.times.items()})
        metrics.update({"epoch": self.epoch, "global_step": self.global_step, "samples_per_second": samples / max(elapsed, 1e-9),
                        "lr": self.engine.get_lr()[0]})
        if self.engine.get_global_grad_norm() is not None:
            metrics["grad_norm"] = float(self.engine.get_global_grad_norm())
        self.metric_sums, self.times = {}, {}

        if trained and (self.epoch % self.cfg.training.checkpoint_every == 0 or self.epoch == epochs):
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(self, Path(tmp))
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
        # Logged after the checkpoint: a worker killed in between redoes the epoch without a duplicate step.
        # Only rank 0 knows what MLflow holds, and pictures sample on every rank (a collective under
        # ZeRO-3), so all ranks follow rank 0's answer: an epoch redone after a restart logs no duplicate.
        first_time = self.rank0_decides(self.global_step > self.tracker.last_logged_step)
        self.tracker.log_metrics(metrics, step=self.global_step)
        if trained and first_time and (self.epoch % self.cfg.tracking.log_images_every == 0 or self.epoch == epochs):
            self.log_pictures(step=self.global_step)
        if self.rank == 0:
            per_epoch = (time.monotonic() - self.started) / max(self.epoch - self._first_epoch, 1)
            left = per_epoch * (epochs - self.epoch)
            loss = f"loss {metrics['loss']:.4g}" if "loss" in metrics else "no training"
            which = (f"epoch {self.epoch}/{epochs}" if trained
                     else f"epoch 0/{epochs} (sampling only: epoch 1 trains on its trajectories)")
            print(f"[r2d3ray] {which} reward {metrics.get('reward/mean', float('nan')):.4f} "
                  f"{loss} | {per_epoch:.1f} s/epoch, ETA {left:.0f} s", flush=True)
        return metrics

    def rank0_decides(self, answer: bool) -> bool:
        """Rank 0's ``answer`` on every rank, for branches that must go the same way on all ranks."""
        if self.world_size == 1:
            return answer
        import torch.distributed as dist

        agreed = [answer]
        dist.broadcast_object_list(agreed, src=0, device=self.pipeline.generator.device)
        return agreed[0]

    @torch.no_grad()
    def eval_latents(self, base: bool = False) -> torch.Tensor:
        """Clean latents (B, V, C, h, w) of the evaluation prompts from fixed noise, by the deployed
        adapter (the policy, or DiffusionNFT's EMA of it) or (``base``) the frozen base model. Every rank
        runs it: under ZeRO-3 a forward gathers the parameters collectively."""
        policy = self.pipeline.generator
        with policy.adapters_disabled() if base else policy.use_adapter(deployed_adapter(self.cfg)):
            return self.pipeline.sample(self.eval_prompts, torch.Generator().manual_seed(EVAL_SEED)).final

    def eval_views(self, latents: torch.Tensor) -> torch.Tensor:
        """Default-rig renders (B, V, 3, H, W) of ``latents`` at the render size."""
        cameras = default_rig(self.pipeline.generator.num_views, self.cfg.render.size).to(self.pipeline.generator.device)
        return self.pipeline.render(latents, cameras)["images"]

    def log_pictures(self, step: int) -> None:
        """MLflow image ``eval/base_vs_policy`` at ``step`` (optimizer steps done): one row per evaluation
        prompt, the base model's views on the left, the policy's (its EMA when kept) on the right, same noise."""
        policy_views = self.eval_views(self.eval_latents())  # (B, V, 3, H, W)
        rows = torch.cat([self.base_views, policy_views], dim=1)  # (B, 2V, 3, H, W)
        self.tracker.log_image(grid_image(rows), "eval/base_vs_policy", step=step)

    def finish(self) -> None:
        """Artifacts of the finished run: the evaluation prompts' PLY files and pictures by the final
        policy (its EMA when kept), that LoRA (diffusers format) and the resolved config."""
        latents = self.eval_latents()
        if self.tracker.active:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp)
                write_outputs(self.pipeline, self.eval_prompts, latents, out / "eval", size=self.cfg.render.size)
                save_lora(self.pipeline.generator.denoiser, out / "lora", adapter=deployed_adapter(self.cfg))
                (out / "config.yaml").write_text(yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False))
                self.tracker.log_artifact(out)
        self.tracker.end()


def local_rank_env() -> None:
    """DeepSpeed on CPU needs its accelerator named before import."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
