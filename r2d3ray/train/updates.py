"""One class per alignment algorithm: how it collects data, batches it, and updates the policy.

Each class binds an algorithm's loss (r2d3ray/algorithms) to the generator, sampler, renderer
and reward plane of a `TrainingRun`. The loss code never sees Ray: rewards and their image
gradients come back from `run.rewards` as tensors, and pushing a gradient back through renderer,
decoder and policy is a local `torch.autograd.grad`.

Reward requests overlap with compute: Nabla sends the render of x̂0(x_{t-1}) of the next
transition before the current one's backward, and computes that backward and the next transition's
policy score while the reward is in flight (behind a batch's first request: its reference scores);
NFT sends each sampling batch's renders and samples the next batch meanwhile.

Batching as the reference: each epoch's trajectories are trained in shuffled micro-batches of
``training.micro_batch_size``, and the optimizer steps once per ``gradient_accumulation_steps``
trajectories, so DeepSpeed accumulates (gradient_accumulation_steps / micro_batch_size) micro-batches
times the transitions each trajectory trains (``micro_steps_per_update``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from r2d3ray.algorithms.nabla import NablaR2D3, pull_back, render_at_x0, transition_scores
from r2d3ray.algorithms.nft import DiffusionNFT, ema_decay_at, old_policy_decay, optimality_probability, soft_update_
from r2d3ray.algorithms.reward_backprop import RewardBackprop
from r2d3ray.algorithms.subsampling import num_train_steps
from r2d3ray.models.lora import adapter_parameters, adapters_disabled, use_adapter
from r2d3ray.models.pipeline import Rollout
from r2d3ray.models.schedulers import predict_x0
from r2d3ray.serve.client import PendingObjective


def _log_rewards(run, out, prefix: str = "reward") -> None:
    run.record({f"{prefix}/mean": out.rewards.mean(), f"{prefix}/std": out.rewards.std(unbiased=False)})
    for name, per_view in out.components.items():
        run.record({f"{prefix}/{name}": per_view.nanmean()})


def _stack_views(views: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    return torch.cat([views[k] for k in keys], dim=2)  # (B, V, sum of channels, H, W)


def micro_batches_per_update(run) -> int:
    t = run.cfg.training
    return t.gradient_accumulation_steps // t.micro_batch_size  # the config checks it divides


def shuffled_micro_batches(run, count: int):
    """Index tensors (micro_batch_size,) into ``count`` trajectories, shuffled with the run's generator."""
    order = torch.randperm(count, generator=run.rng)
    size = run.cfg.training.micro_batch_size
    return [order[start:start + size] for start in range(0, count, size)]


def blend_adapter_(denoiser, target: str, source: str, decay: float) -> None:
    """Adapter ``target`` ← decay·target + (1 − decay)·source, weights paired by name; decay 0 copies."""
    targets, sources = adapter_parameters(denoiser, target), adapter_parameters(denoiser, source)
    soft_update_([targets[k] for k in sources], list(sources.values()), decay)


def all_gather_objects(obj) -> list:
    """``obj`` of every worker in rank order, over the torch.distributed group Ray Train sets up
    ([obj] in a single process without one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def worker_optimality(rewards: torch.Tensor, prompts: list[str], adv_clip_max: float,
                      all_gather: Callable[[object], list] | None = None, rank: int = 0) -> torch.Tensor:
    """DiffusionNFT's r (N,) for this worker's N samples. Rewards (N,) may be NaN/Inf: they count as
    the mean of the finite ones. With ``all_gather`` (every worker's object in rank order) the
    per-prompt means and the global std are those of all workers' samples, as the reference gathers
    them before its stat tracker, and this worker (``rank``) takes its own rows; without, this
    worker's samples alone."""
    mine = (rewards.tolist(), list(prompts))
    gathered, rank = (all_gather(mine), rank) if all_gather else ([mine], 0)  # [(rewards, prompts) of each rank]
    everyone = torch.tensor([v for values, _ in gathered for v in values], dtype=torch.float64)  # (sum of N,)
    finite = torch.isfinite(everyone)
    fill = everyone[finite].mean() if finite.any() else torch.tensor(0.0, dtype=torch.float64)
    r = optimality_probability(torch.where(finite, everyone, fill), [p for _, names in gathered for p in names],
                               adv_clip_max)[0]
    start = sum(len(values) for values, _ in gathered[:rank])
    return r[start:start + len(prompts)]


class NablaUpdates:
    """Nabla-R2D3: residual ∇-DB on sampled transitions with the forward-looking reward gradient."""

    def __init__(self, run):
        self.run, self.cfg = run, run.cfg.algorithm.nabla
        self.algo = NablaR2D3(self.cfg)
        self.n_transitions = num_train_steps(run.cfg.sampling.num_steps, self.cfg.timestep_fraction)
        # Stale trajectories: epoch e trains on epoch e−1's samples, so a sampling-only epoch comes first.
        self.trains_on_previous_samples = self.cfg.trajectories == "stale"
        # The reference's x̂0 at x_{t-1} reads ᾱ at t_prev − Δt (clipped at 1) while its network sees t_prev.
        self.x0_timestep_shift = run.pipeline.sampler.dt if self.cfg.x0_alpha_one_step_ahead else 0

    @staticmethod
    def micro_steps_per_update(run) -> int:
        return micro_batches_per_update(run) * num_train_steps(
            run.cfg.sampling.num_steps, run.cfg.algorithm.nabla.timestep_fraction)

    def collect(self) -> Rollout | None:
        """This epoch's trajectories from the current policy; returns those to train on (stale or fresh)."""
        run, s = self.run, self.run.cfg.sampling
        rollout = Rollout.cat([run.pipeline.sample(run.next_prompts(s.batch_size), run.rng)
                               for _ in range(s.num_batches_per_epoch)])
        with torch.no_grad():
            views = run.pipeline.render(rollout.final, run.reward_cameras(len(rollout)), run.needs)
        # Scored for the log only: read at the end of the epoch, so training does not wait for it.
        self.sample_scores = run.rewards.submit(views, rollout.prompts, with_grad=False)
        if self.cfg.trajectories == "fresh":
            return rollout
        train_on, run.stale = run.stale, rollout
        return train_on  # None in the first epoch: the reference's epoch −1 only samples

    def batches(self, rollout: Rollout):
        for index in shuffled_micro_batches(self.run, len(rollout)):
            yield rollout.select(index)

    def update(self, batch: Rollout) -> None:
        run, pipe = self.run, self.run.pipeline
        gen, sampler = pipe.generator, pipe.sampler
        embeds = gen.encode_prompts(batch.prompts)
        guidance = run.cfg.sampling.guidance_scale
        B = len(batch)
        steps = self.algo.transition_steps(B, sampler.num_inference_steps, run.rng)  # (B, n), final step first
        rows = torch.arange(B)

        def transition(k: int):
            """Column k of `steps`: (step index (B,), x_t, x_{t-1} (B, V, C, h, w), t, t_prev (B,))."""
            idx = steps[:, k]
            return (idx, batch.latents[rows, idx], batch.latents[rows, idx + 1], batch.timesteps[idx],
                    sampler.prev_timesteps[idx])

        def request_reward_grad(k: int) -> _Transition:
            """1. Forward-looking reward gradient at x_{t-1}: render x̂0_θ(x_{t-1}) and send it."""
            _, _, x_prev, _, t_prev = transition(k)
            x_leaf, views = render_at_x0(x_prev, lambda x: self.policy_x0(x, t_prev, embeds),
                                         lambda x0: pipe.render(x0, run.reward_cameras(B), run.needs))
            if self.cfg.reward_context == "inference" and "depths" in views:
                views["depths"] = views["depths"].detach()  # depth-derived normals: a stop-gradient target
            pending = run.rewards.submit({k: v.detach() for k, v in views.items()}, batch.prompts, with_grad=True)
            return _Transition(x_leaf, views, pending)

        def reference_score(k: int) -> torch.Tensor:
            """The frozen reference's (adapters off) score of transition k, (B, V, C, h, w), no graph."""
            idx, x_t, x_prev, t, _ = transition(k)
            with torch.no_grad(), adapters_disabled(gen.denoiser):
                eps_ref = gen.eps_from_output(gen.predict(x_t, t, embeds, guidance))
                return transition_scores(sampler, eps_ref, idx, x_t, x_prev).score

        # Each transition's request is in flight while the trainer computes the previous transition's
        # backward and its own policy score. Sending it early is exact: the optimizer steps only at
        # the end of a batch (micro_steps_per_update counts every transition of the batch), so θ is
        # the same. Render graphs are held one at a time (the next one is built after pull_back).
        # The first request has no backward to hide behind: all the reference scores, which need
        # no graph, are computed while it is in flight.
        upcoming = request_reward_grad(0)
        scores_ref = [reference_score(k) for k in range(steps.shape[1])]
        for k in range(steps.shape[1]):
            tr = upcoming
            idx, x_t, x_prev, t, t_prev = transition(k)

            # 2. Policy score (with grad) of the sampled transition, beside the reference's.
            score_ref = scores_ref[k]
            out_policy = gen.predict(x_t, t, embeds, guidance)
            score_policy = transition_scores(sampler, gen.eps_from_output(out_policy), idx, x_t, x_prev).score

            # 3. Pull the reward plane's image gradient back to x_{t-1} through renderer and x̂0 (local).
            result = tr.pending.result()
            grads = {"images": result.grads, **result.extra_grads}
            differentiable = [k for k in grads if tr.views[k].requires_grad]
            reward_grad = pull_back(tr.x_leaf, [tr.views[k] for k in differentiable], [grads[k] for k in differentiable])
            trusted = result.finite.to(reward_grad.dtype)  # NaN/Inf rewards are never trained on
            reward_grad = reward_grad * trusted.view(-1, *[1] * (reward_grad.ndim - 1))
            del tr  # its render graph is spent

            upcoming = request_reward_grad(k + 1) if k + 1 < steps.shape[1] else None
            loss, terms = self.algo.loss(score_policy, score_ref, reward_grad, sampler.alphas_cumprod_at(t_prev),
                                         out_policy, batch.outputs[rows, idx])
            run.step(loss)
            run.record(terms)

    def policy_x0(self, x: torch.Tensor, t: torch.Tensor, embeds) -> torch.Tensor:
        """x̂0_θ(x) (B, V, C, h, w) of states x at timesteps t (B,): adapters on, the network's Jacobian
        kept (as the reference); with x0_alpha_one_step_ahead ᾱ is read at t − Δt (clipped at 1)."""
        gen = self.run.pipeline.generator
        eps = gen.eps_from_output(gen.predict(x, t, embeds, self.run.cfg.sampling.guidance_scale))
        return predict_x0(eps, x, t, self.run.pipeline.sampler.alphas_cumprod, timestep_shift=self.x0_timestep_shift)

    def end_epoch(self) -> None:
        _log_rewards(self.run, self.sample_scores.result())


@dataclass
class _Transition:
    """A Nabla transition whose reward request is in flight."""

    x_leaf: torch.Tensor       # (B, V, C, h, w) x_{t-1} as a grad leaf
    views: dict                # the render of x̂0_θ(x_{t-1}), with graph back to x_leaf
    pending: PendingObjective  # its reward request (values and image gradients)


class NFTUpdates:
    """DiffusionNFT: CFG-free ODE samples from the old policy, negative-aware loss on re-noised samples."""

    trains_on_previous_samples = False

    def __init__(self, run):
        self.run, self.cfg = run, run.cfg.algorithm.nft
        self.algo = DiffusionNFT(self.cfg)

    @staticmethod
    def micro_steps_per_update(run) -> int:
        return micro_batches_per_update(run) * num_train_steps(
            run.cfg.sampling.num_steps, run.cfg.algorithm.nft.timestep_fraction)

    def collect(self) -> dict:
        """Groups of G samples per prompt from the old policy; rewards requested while the next batch samples."""
        run, s = self.run, self.run.cfg.sampling
        gen = run.pipeline.generator
        per_batch = max(s.batch_size // self.cfg.group_size, 1)
        clean, prompts, pendings = [], [], []
        with use_adapter(gen.denoiser, "old"):
            for _ in range(s.num_batches_per_epoch):
                group_prompts = [p for p in run.next_prompts(per_batch) for _ in range(self.cfg.group_size)]
                x0 = run.pipeline.sample_ode(group_prompts, run.rng, guidance_scale=1.0)  # CFG-free
                with torch.no_grad():
                    views = run.pipeline.render(x0, run.reward_cameras(len(x0)), run.needs)
                pendings.append(run.rewards.submit(views, group_prompts, with_grad=False))
                clean.append(x0)
                prompts += group_prompts
        results = [p.result() for p in pendings]
        rewards = torch.cat([r.rewards for r in results])
        finite = torch.cat([r.finite for r in results])
        for r in results:
            _log_rewards(run, r)
        gather = all_gather_objects if self.cfg.reward_stats == "all_workers" else None
        r_opt = worker_optimality(torch.where(finite, rewards, torch.nan), prompts, self.cfg.adv_clip_max,
                                  gather, run.rank)
        # NaN/Inf rewards are never trained on: weight 0, kept so every epoch has the same micro-steps.
        return {"clean": torch.cat(clean), "r": r_opt, "weight": finite.float(), "prompts": prompts}

    def batches(self, data: dict):
        for index in shuffled_micro_batches(self.run, len(data["prompts"])):
            yield {"clean": data["clean"][index], "r": data["r"][index], "weight": data["weight"][index],
                   "prompts": [data["prompts"][i] for i in index.tolist()]}

    def update(self, batch: dict) -> None:
        run = self.run
        gen, sampler = run.pipeline.generator, run.pipeline.sampler
        embeds = gen.encode_prompts(batch["prompts"])
        x0 = batch["clean"]
        steps = self.algo.transition_steps(len(x0), sampler.num_inference_steps, run.rng)  # (B, n)
        for k in range(steps.shape[1]):
            t = sampler.timesteps[steps[:, k]]
            # Drawn by the run's seeded CPU generator, then moved: the same noise on any device.
            noise = torch.randn(x0.shape, generator=run.rng).to(x0.device)
            x_t = sampler.add_noise(x0, noise, t)
            with torch.no_grad():
                with use_adapter(gen.denoiser, "old"):
                    eps_old = gen.eps_from_output(gen.predict(x_t, t, embeds))
                with adapters_disabled(gen.denoiser):
                    eps_ref = gen.eps_from_output(gen.predict(x_t, t, embeds)) if self.cfg.kl_coef > 0 else None
            eps_policy = gen.eps_from_output(gen.predict(x_t, t, embeds))
            loss, terms = self.algo.loss(eps_policy, eps_old, eps_ref, x_t, x0, sampler.alphas_cumprod_at(t),
                                         batch["r"], batch["weight"])
            self.record_output_grad_norms(loss, eps_policy, steps[:, k], batch["weight"])
            if run.step(loss) and self.cfg.ema_decay > 0:
                self.ema_follows_policy()
            run.record(terms)

    def record_output_grad_norms(self, loss: torch.Tensor, eps_policy: torch.Tensor, step_indices: torch.Tensor,
                                 weight: torch.Tensor) -> None:
        """Records ``grad_norm_eps/step_<i>``: for each sample b trained at sampler step i, the norm of
        ∂ℓ_b/∂ε_θ,b — the gradient of that sample's own loss ℓ_b (the micro-batch loss is the mean of the
        B samples' losses, so B·∂loss/∂ε_θ,b) w.r.t. the policy's ε prediction (V, C, h, w), before
        DeepSpeed's 1/accumulation scaling. Averaged per step index over the epoch, it shows how hard
        each noise level pulls on the network output; the parameter gradient is this pulled back through
        the network's Jacobian. Left-out samples (weight 0) are not recorded."""
        (grad,) = torch.autograd.grad(loss, eps_policy, retain_graph=True)  # (B, V, C, h, w); the graph stays for step
        norms = grad.flatten(1).float().norm(dim=1) * grad.shape[0]  # (B,)
        for index, norm, w in zip(step_indices.tolist(), norms.tolist(), weight.tolist()):
            if w > 0:
                self.run.record({f"grad_norm_eps/step_{index:02d}": norm})

    def ema_follows_policy(self) -> None:
        """The evaluation EMA ("ema" adapter) after an optimizer step, with the reference's warm-up decay."""
        decay = ema_decay_at(self.run.global_step, self.cfg.ema_decay)
        blend_adapter_(self.run.pipeline.generator.denoiser, "ema", "policy", decay)
        self.run.record({"ema_decay": decay})

    def end_epoch(self) -> None:
        """The old (behaviour) policy follows the trained one with the reference's decay schedule."""
        decay = old_policy_decay(self.run.global_step, self.cfg.decay_type)
        blend_adapter_(self.run.pipeline.generator.denoiser, "old", "policy", decay)
        self.run.record({"old_policy_decay": decay})


class RewardBackpropUpdates:
    """ReFL / DRaFT-K: the reward gradient through the last K sampling steps."""

    trains_on_previous_samples = False

    def __init__(self, run):
        self.run, self.cfg = run, run.cfg.algorithm.reward_backprop
        self.algo = RewardBackprop(self.cfg)

    @staticmethod
    def micro_steps_per_update(run) -> int:
        return micro_batches_per_update(run)

    def collect(self) -> list[str]:
        """The epoch's prompts; each is sampled with grad in its training micro-batch."""
        s = self.run.cfg.sampling
        return [p for _ in range(s.num_batches_per_epoch) for p in self.run.next_prompts(s.batch_size)]

    def batches(self, prompts: list[str]):
        size = self.run.cfg.training.micro_batch_size
        for start in range(0, len(prompts), size):
            yield prompts[start:start + size]

    def update(self, prompts: list[str]) -> None:
        run, pipe = self.run, self.run.pipeline
        gen, sampler = pipe.generator, pipe.sampler
        embeds = gen.encode_prompts(prompts)
        x = pipe.initial_noise(len(prompts), run.rng)
        T = sampler.num_inference_steps
        for i, t in enumerate(sampler.timesteps):
            with torch.set_grad_enabled(self.algo.grad_enabled(i, T)):
                eps = gen.eps_from_output(gen.predict(x, t, embeds, run.cfg.sampling.guidance_scale))
                x = self.algo.step(sampler, eps, i, x, run.rng)
        views = pipe.render(x, run.reward_cameras(len(prompts)), run.needs)
        result = run.rewards.submit({k: v.detach() for k, v in views.items()}, prompts, with_grad=True).result()
        _log_rewards(run, result)
        keys = ["images", *sorted(result.extra_grads)]
        trusted = result.finite.to(result.grads.dtype).view(-1, 1, 1, 1, 1)  # NaN/Inf: not trained on
        grads = _stack_views({"images": result.grads, **result.extra_grads}, keys) * trusted
        loss, terms = self.algo.loss(_stack_views(views, keys), torch.nan_to_num(result.rewards), grads)
        run.step(loss)
        run.record(terms)


UPDATES = {"nabla": NablaUpdates, "nft": NFTUpdates, "reward_backprop": RewardBackpropUpdates}
