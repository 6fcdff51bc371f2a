"""The plumbing under the train loop: model, DeepSpeed engine, reward plane, MLflow, checkpoints.

`TrainingRun` is what `train_loop_per_worker` talks to, so the loop itself reads like the
algorithm. One instance per Ray Train worker; rank 0 alone writes MLflow. Everything a resume needs
(LoRA adapters, DeepSpeed state, the stale trajectories, RNG states, prompt position, MLflow run
id) goes into every checkpoint (`save_checkpoint`), and `TrainingRun.start` restores it when Ray
Train hands the worker a checkpoint (a restarted worker, or a re-run under the same run name).
"""

from __future__ import annotations

import json
import os
import random
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
from r2d3ray.models.lora import adapters_disabled, add_lora_adapter, load_lora, save_lora, use_adapter
from r2d3ray.models.pipeline import Rollout, SplatPipeline
from r2d3ray.render.cameras import default_rig, jittered_rig
from r2d3ray.render.pictures import grid_image
from r2d3ray.tracking import Tracker, git_commit, resolve_tracking_uri
from r2d3ray.train.updates import blend_adapter_

EVAL_SEED = 0  # the evaluation pictures' noise: the same at every step, so they compare
NUM_DEFAULT_EVAL_PROMPTS = 4  # without tracking.eval_prompts, the first training prompts


def reward_needs(cfg: R2D3Config) -> frozenset[str]:
    """Extra render channels the configured rewards read (alphas, depths, normals)."""
    from r2d3ray.rewards.registry import reward_class

    app = load_reward_app_config(cfg.rewards.app_config)
    models = {d.name: d.reward for d in app.deployments}
    return frozenset().union(*(reward_class(models[t.name]).needs for t in cfg.rewards.terms))


class TrainingRun:
    def __init__(self, cfg: R2D3Config, rank: int, world_size: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.epoch, self.global_step = 0, 0
        self.stale: Rollout | None = None  # the previous epoch's trajectories (Nabla's "stale" mode)
        self.times: dict[str, float] = {}
        self.metric_sums: dict[str, list[float]] = {}
        self.started = time.monotonic()
        self.rng = torch.Generator().manual_seed(cfg.training.seed * 1000 + rank)

    # ------------------------------------------------------------------ setup

    @classmethod
    def start(cls, cfg: R2D3Config, micro_steps_per_update, served: bool = True) -> TrainingRun:
        """Set up this worker; `micro_steps_per_update(run)` gives DeepSpeed's accumulation count."""
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        run = cls(cfg, ctx.get_world_rank(), ctx.get_world_size())
        random.seed(cfg.training.seed + run.rank)
        np.random.seed(cfg.training.seed + run.rank)
        torch.manual_seed(cfg.training.seed + run.rank)

        # Every tensor of the run lives on the device Ray Train gives this worker.
        device = ray.train.torch.get_device()
        generator = load_generator(cfg, device)
        add_adapters(generator.denoiser, cfg)
        check_on_device(generator, device)
        run.prompt_pool = training_prompts(cfg)
        run.pipeline = SplatPipeline(generator, cfg.sampling.num_steps, cfg.sampling.eta, cfg.sampling.guidance_scale, cfg.render.gaussian_convention)
        run.needs = reward_needs(cfg)
        run.rewards = run._connect_rewards(served)
        run.engine = run._deepspeed_engine(micro_steps_per_update(run))

        run.tracker = Tracker(resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.output_dir),
                              cfg.tracking.experiment, active=run.rank == 0)
        checkpoint = ray.train.get_checkpoint()
        run_id = None
        if checkpoint is not None:
            with checkpoint.as_directory() as path:
                run_id = run._restore(Path(path))
        run.tracker.start(cfg.name, run_id=run_id, system_metrics=cfg.tracking.system_metrics, tags={"algorithm": cfg.algorithm.name,
                                                          "rewards": ",".join(t.name for t in cfg.rewards.terms)})
        run.tracker.log_params({**cfg.flat(), "git_commit": git_commit(Path(__file__).parent)})
        run.eval_prompts = cfg.tracking.eval_prompts or run.prompt_pool[:NUM_DEFAULT_EVAL_PROMPTS]
        run.base_views = run.eval_views(run.eval_latents(base=True))
        if run_id is None:  # a fresh run: step 0 shows the base model beside the untrained policy
            run.log_pictures(step=0)
        return run

    def _connect_rewards(self, served: bool):
        """The reward plane: the Serve app's deployments (or the same rewards in-process)."""
        from r2d3ray.rewards.registry import RewardCombiner, build_reward
        from r2d3ray.serve.client import LocalRewards, RewardPlane, ServedRewards

        r = self.cfg.rewards
        terms = [(t.name, t.weight) for t in r.terms]
        if served:
            client = ServedRewards(r.app_name, terms, timeout_s=r.request_timeout_s, retry_budget_s=r.retry_budget_s,
                                   grad_dtype=r.grad_dtype)
        else:
            app = {d.name: d for d in load_reward_app_config(r.app_config).deployments}
            client = LocalRewards({name: (build_reward(app[name].reward, **app[name].kwargs), w) for name, w in terms})
        combiner = RewardCombiner(dict(terms), r.aggregate, r.views_per_sample, r.noise_std,
                                  seed=self.cfg.training.seed * 1000 + self.rank, needs=self.needs)
        return RewardPlane(client, combiner)

    def _deepspeed_engine(self, micro_steps_per_update: int):
        import deepspeed
        from diffusers.optimization import get_scheduler

        from r2d3ray.train.deepspeed_config import build_deepspeed_config

        t = self.cfg.training
        denoiser = self.pipeline.generator.denoiser
        params = [p for p in denoiser.parameters() if p.requires_grad]  # the policy adapter only
        optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)
        # DeepSpeed steps the schedule with the optimizer and keeps its state in its checkpoints.
        schedule = get_scheduler(t.lr_schedule if t.lr_schedule != "constant" else "constant_with_warmup", optimizer,
                                 num_warmup_steps=t.lr_warmup_steps,
                                 num_training_steps=t.epochs * self.cfg.optimizer_steps_per_epoch())
        ds_config = build_deepspeed_config(t, micro_steps_per_update)
        engine, _, _, _ = deepspeed.initialize(model=denoiser, optimizer=optimizer, model_parameters=params,
                                               lr_scheduler=schedule, config=ds_config)
        return engine

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
        r = self.cfg.render
        if r.random_view:
            cameras = jittered_rig(r.num_views, r.size, r.azi_delta_deg, r.elevation_deg, r.elevation_delta_deg,
                                   generator=self.rng, batch_size=batch_size)
        else:
            cameras = default_rig(r.num_views, r.size)
        return cameras.to(self.pipeline.generator.device)

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
        `checkpoint_every` trained epochs and after the last; log to MLflow at step = trained epochs done
        (so the sampling-only epoch's rewards sit at step 0 with the pictures before training); print progress."""
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
                self._save(Path(tmp))
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
        # Logged after the checkpoint: a worker killed in between redoes the epoch without a duplicate step.
        # Only rank 0 knows what MLflow holds, and pictures sample on every rank (a collective under
        # ZeRO-3), so all ranks follow rank 0's answer: an epoch redone after a restart logs no duplicate.
        first_time = self.rank0_decides(self.epoch > self.tracker.last_logged_step)
        self.tracker.log_metrics(metrics, step=self.epoch)
        if trained and first_time and (self.epoch % self.cfg.tracking.log_images_every == 0 or self.epoch == epochs):
            self.log_pictures(step=self.epoch)
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
        denoiser = self.pipeline.generator.denoiser
        with adapters_disabled(denoiser) if base else use_adapter(denoiser, self.deployed_adapter):
            return self.pipeline.sample(self.eval_prompts, torch.Generator().manual_seed(EVAL_SEED)).final

    def eval_views(self, latents: torch.Tensor) -> torch.Tensor:
        """Default-rig renders (B, V, 3, H, W) of ``latents`` at the render size."""
        cameras = default_rig(self.pipeline.generator.num_views, self.cfg.render.size).to(self.pipeline.generator.device)
        return self.pipeline.render(latents, cameras)["images"]

    def log_pictures(self, step: int) -> None:
        """MLflow image ``eval/base_vs_policy`` at ``step`` (epochs done): one row per evaluation
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
                save_lora(self.pipeline.generator.denoiser, out / "lora", adapter=self.deployed_adapter)
                (out / "config.yaml").write_text(yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False))
                self.tracker.log_artifact(out)
        self.tracker.end()

    # ------------------------------------------------------------------ checkpoints

    _first_epoch = 0

    def _save(self, path: Path) -> None:
        """Every rank writes its part; Ray Train merges the directories into one checkpoint."""
        denoiser = self.pipeline.generator.denoiser
        self.engine.save_checkpoint(str(path / "deepspeed"), tag="engine", exclude_frozen_parameters=True)
        torch.save({"rng": self.rng.get_state(), "torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                    "python": random.getstate(),
                    # On the CPU: a restarted worker may get another GPU index, or another node.
                    "stale": None if self.stale is None else self.stale.to("cpu")},
                   path / f"worker_state_rank{self.rank}.pt")
        if self.rank == 0:
            self.save_adapters(path)
            (path / "state.json").write_text(json.dumps({
                "epoch": self.epoch, "global_step": self.global_step, "mlflow_run_id": self.tracker.run_id,
                "config": self.cfg.model_dump(mode="json"),
            }, indent=1))
        use_adapter(denoiser, "policy")

    def _restore(self, path: Path) -> str | None:
        state = json.loads((path / "state.json").read_text())
        self.restore_adapters(path)
        self.engine.load_checkpoint(str(path / "deepspeed"), tag="engine", load_module_strict=False)
        worker = torch.load(path / f"worker_state_rank{self.rank}.pt", weights_only=False)
        self.rng.set_state(worker["rng"])
        torch.set_rng_state(worker["torch"])
        np.random.set_state(worker["numpy"])
        random.setstate(worker["python"])
        self.stale = None if worker["stale"] is None else worker["stale"].to(self.pipeline.generator.device)
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        if self.rank == 0:
            print(f"[r2d3ray] resumed from {path} after {self.epoch} trained epochs", flush=True)
        return state["mlflow_run_id"]

    @property
    def deployed_adapter(self) -> str:
        """The adapter the evaluation pictures, the final LoRA and a checkpoint's ``lora/`` come from:
        DiffusionNFT's EMA when it keeps one (as its reference evaluates and saves), else the policy."""
        return "ema" if "ema" in policy_copies(self.cfg) else "policy"

    def _lora_dir(self, adapter: str) -> str:
        """A checkpoint's folder for ``adapter``: ``lora`` for the deployed one (what eval, infer and the
        demo load, by diffusers/peft as it is), ``lora_<adapter>`` for the others (``lora_old``, and
        ``lora_policy`` when the EMA is deployed)."""
        return "lora" if adapter == self.deployed_adapter else f"lora_{adapter}"

    def save_adapters(self, path: Path) -> None:
        denoiser = self.pipeline.generator.denoiser
        for adapter in ("policy", *policy_copies(self.cfg)):
            save_lora(denoiser, path / self._lora_dir(adapter), adapter=adapter)

    def restore_adapters(self, path: Path) -> None:
        denoiser = self.pipeline.generator.denoiser
        for adapter in ("policy", *policy_copies(self.cfg)):
            load_lora(denoiser, path / self._lora_dir(adapter), adapter=adapter)
        use_adapter(denoiser, "policy")  # loading made each adapter active in turn


def policy_copies(cfg: R2D3Config) -> tuple[str, ...]:
    """Adapters beside "policy" that follow it: DiffusionNFT's behaviour policy "old" and, with
    ema_decay > 0, its evaluation EMA "ema"."""
    if cfg.algorithm.name != "nft":
        return ()
    return ("old", "ema") if cfg.algorithm.nft.ema_decay > 0 else ("old",)


def add_adapters(denoiser, cfg: R2D3Config) -> None:
    """The trained "policy" LoRA adapter and its `policy_copies`, each an exact copy of it at the start
    (as DiffusionNFT copies its adapter into "old"; a checkpoint may overwrite them); "policy" ends active."""
    for adapter in ("policy", *policy_copies(cfg)):
        add_lora_adapter(denoiser, adapter, rank=cfg.lora.rank, alpha=cfg.lora.alpha, init=cfg.lora.init,
                         target_modules=cfg.lora.target_modules)
        if adapter != "policy":
            blend_adapter_(denoiser, adapter, "policy", decay=0.0)
    use_adapter(denoiser, "policy")


def local_rank_env() -> None:
    """DeepSpeed on CPU needs its accelerator named before import."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
