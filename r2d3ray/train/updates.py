"""One class per alignment algorithm: how it collects data, batches it, and updates the policy.

The trainer (r2d3ray/train/loop.py) and the toy benchmark (benchmarks/toy_alignment.py) drive these
same classes; each binds an algorithm's loss (r2d3ray/algorithms) to what a run provides:

- a **policy**, ``run.pipeline.generator``: ``encode_prompts``, ``predict(x, t, cond, guidance_scale)``
  (raw output), ``eps_from_output``, and its adapters: ``use_adapter(name)``, ``adapters_disabled()``
  (the frozen reference), ``adapter_parameters(name)``;
- a **sampler**, ``run.pipeline``: ``sample`` (SDE rollouts), ``sample_ode``, ``initial_noise``,
  ``render`` (latents to the views rewards read) and ``sampler`` (SDE-DPM-Solver++ with scores);
- a **reward plane**, ``run.rewards.submit(views, prompts, with_grad)``, whose ``.result()`` is the
  per-object objective ``rewards`` (B,), ``finite`` (B,), ``components`` and, with grad, the image
  gradients ``grads``/``extra_grads`` (the loss code never sees Ray);
- the optimizer, ``run.step(loss)`` (True when it stepped), and ``run.record``, ``run.rng``,
  ``run.next_prompts``, ``run.reward_cameras``, ``run.needs``, ``run.global_step``, ``run.rank``,
  ``run.cfg``.

Every algorithm collects a :class:`Batch` and trains it in shuffled micro-batches of
``training.micro_batch_size``; the optimizer steps once per ``gradient_accumulation_steps``
trajectories, so it accumulates (gradient_accumulation_steps / micro_batch_size) micro-batches times
the transitions each trajectory trains (``micro_steps_per_update``), as the references do.

Reward requests overlap with compute: Nabla keeps the next transition's request in flight
(:class:`RequestAhead`) while it computes the current one's backward; NFT and GRPO send each sampling
batch's renders and sample the next batch meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable

import torch

from r2d3ray.algorithms.grpo import GRPO, group_advantages, transition_log_prob
from r2d3ray.algorithms.nabla import NablaR2D3, pull_back, render_at_x0, transition_scores
from r2d3ray.algorithms.nft import DiffusionNFT, ema_decay_at, old_policy_decay, optimality_probability, soft_update_
from r2d3ray.algorithms.reward_backprop import RewardBackprop
from r2d3ray.algorithms.subsampling import num_train_steps
from r2d3ray.config import R2D3Config
from r2d3ray.models.pipeline import Rollout
from r2d3ray.models.schedulers import predict_x0


@dataclass
class Batch:
    """What an algorithm trains on: B prompts and what it collected for them (an epoch's worth from
    ``collect``, a micro-batch from ``batches``). Unused fields stay None.

    trajectories: SDE rollouts (Nabla-R2D3, GRPO); clean: (B, V, C, h, w) ODE samples (DiffusionNFT);
    targets: (B,) DiffusionNFT's optimality r or GRPO's advantages; weight: (B,) 1 trained, 0 left out
    (a non-finite reward: kept so every rank makes the same backward calls); old_log_probs: (B, T) the
    sampling policy's transition log-probabilities (GRPO).
    """

    prompts: list[str]
    trajectories: Rollout | None = None
    clean: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    old_log_probs: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index: torch.Tensor) -> Batch:
        picked = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in picked.items():
            if isinstance(value, (torch.Tensor, Rollout)):
                picked[name] = value.select(index) if isinstance(value, Rollout) else value[index.to(value.device)]
        return replace(self, **{**picked, "prompts": [self.prompts[i] for i in index.tolist()]})


class RequestAhead:
    """One reward request in flight ahead of the one being used: ``request(k)`` sends request k and
    returns its handle; the first is sent on construction, the next by ``send_next``."""

    def __init__(self, request: Callable[[int], object], count: int):
        self._request, self._count, self._sent = request, count, 0
        self._queued = None
        self.send_next()

    def send_next(self) -> None:
        if self._sent < self._count:
            self._queued, self._sent = self._request(self._sent), self._sent + 1

    def take(self):
        taken, self._queued = self._queued, None
        return taken


def log_rewards(run, answer, prefix: str = "reward") -> None:
    run.record({f"{prefix}/mean": answer.rewards.nanmean(), f"{prefix}/std": answer.rewards.std(unbiased=False)})
    for name, per_view in answer.components.items():
        run.record({f"{prefix}/{name}": per_view.nanmean()})


def blend_adapter_(policy, target: str, source: str, decay: float) -> None:
    """Adapter ``target`` ← decay·target + (1 − decay)·source, weights paired by name; decay 0 copies."""
    targets, sources = policy.adapter_parameters(target), policy.adapter_parameters(source)
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


def per_prompt_statistic(statistic: Callable[[torch.Tensor, list[str]], torch.Tensor], rewards: torch.Tensor,
                         prompts: list[str], all_gather: Callable[[object], list] | None = None,
                         rank: int = 0) -> torch.Tensor:
    """``statistic(rewards, prompts)`` (N,) → (N,) for this worker's N samples. Rewards may be NaN/Inf:
    they count as the mean of the finite ones. With ``all_gather`` (every worker's object in rank order)
    it is computed over all workers' samples, as the references gather them before their stat tracker,
    and this worker (``rank``) takes its own rows; without, over this worker's samples alone."""
    mine = (rewards.tolist(), list(prompts))
    gathered, rank = (all_gather(mine), rank) if all_gather else ([mine], 0)  # [(rewards, prompts) of each rank]
    everyone = torch.tensor([v for values, _ in gathered for v in values], dtype=torch.float64)  # (sum of N,)
    finite = torch.isfinite(everyone)
    fill = everyone[finite].mean() if finite.any() else torch.tensor(0.0, dtype=torch.float64)
    values = statistic(torch.where(finite, everyone, fill), [p for _, names in gathered for p in names])
    start = sum(len(values) for values, _ in gathered[:rank])
    return values[start:start + len(prompts)]


def worker_optimality(rewards: torch.Tensor, prompts: list[str], adv_clip_max: float,
                      all_gather: Callable[[object], list] | None = None, rank: int = 0) -> torch.Tensor:
    """DiffusionNFT's r (N,) for this worker's N samples (see `per_prompt_statistic`)."""
    return per_prompt_statistic(lambda r, p: optimality_probability(r, p, adv_clip_max)[0], rewards, prompts,
                                all_gather, rank)


def grouped_prompts(run, group_size: int) -> list[str]:
    """One sampling batch's prompts for a group-relative algorithm: batch_size // group_size prompts
    (at least one), each repeated group_size times (R2D3Config.samples_per_epoch counts the same)."""
    per_batch = max(run.cfg.sampling.batch_size // group_size, 1)
    return [p for p in run.next_prompts(per_batch) for _ in range(group_size)]


def micro_batches_per_update(cfg: R2D3Config) -> int:
    return cfg.training.gradient_accumulation_steps // cfg.training.micro_batch_size  # the config checks it divides


class Algorithm:
    """What the train loop calls: collect → batches → update per micro-batch → end_epoch."""

    trains_on_previous_samples = False  # True: a sampling-only epoch comes first

    def __init__(self, run):
        self.run = run

    @staticmethod
    def micro_steps_per_update(cfg: R2D3Config) -> int:
        """``run.step`` calls per optimizer step (DeepSpeed's gradient accumulation count)."""
        raise NotImplementedError

    def collect(self) -> Batch | None:
        raise NotImplementedError

    def batches(self, data: Batch):
        """Shuffled micro-batches of ``training.micro_batch_size``, drawn with the run's generator."""
        order = torch.randperm(len(data), generator=self.run.rng)
        size = self.run.cfg.training.micro_batch_size
        for start in range(0, len(data), size):
            yield data.select(order[start:start + size])

    def update(self, batch: Batch) -> None:
        raise NotImplementedError

    def end_epoch(self) -> None:
        pass


def train_epoch(run, algorithm: Algorithm) -> int:
    """One epoch: sample, then train every micro-batch; returns the samples trained (0 when the epoch
    only samples)."""
    with run.timer("sample"):
        data = algorithm.collect()                 # 1 sample with the current (NFT: old) policy
    samples = 0
    if data is not None:                           #   (None in a sampling-only epoch)
        for batch in algorithm.batches(data):      # 2 micro-batches of transitions / re-noised samples
            with run.timer("train"):
                algorithm.update(batch)            #   loss -> run.step (backward, optimizer at the boundary)
            samples += len(batch)
    with run.timer("train"):
        algorithm.end_epoch()                      #   (NFT: the old policy follows; Nabla: log sample rewards)
    return samples


class NablaUpdates(Algorithm):
    """Nabla-R2D3: residual ∇-DB on sampled transitions with the forward-looking reward gradient."""

    def __init__(self, run):
        super().__init__(run)
        self.cfg = run.cfg.algorithm.nabla
        self.algo = NablaR2D3(self.cfg)
        self.n_transitions = num_train_steps(run.cfg.sampling.num_steps, self.cfg.timestep_fraction)
        # Stale trajectories: epoch e trains on epoch e−1's samples, so a sampling-only epoch comes first.
        self.trains_on_previous_samples = self.cfg.trajectories == "stale"
        # The reference's x̂0 at x_{t-1} reads ᾱ at t_prev − Δt (clipped at 1) while its network sees t_prev.
        self.x0_timestep_shift = run.pipeline.sampler.dt if self.cfg.x0_alpha_one_step_ahead else 0

    @staticmethod
    def micro_steps_per_update(cfg: R2D3Config) -> int:
        return micro_batches_per_update(cfg) * num_train_steps(cfg.sampling.num_steps,
                                                               cfg.algorithm.nabla.timestep_fraction)

    def collect(self) -> Batch | None:
        """This epoch's trajectories from the current policy; returns those to train on (stale or fresh)."""
        run, s = self.run, self.run.cfg.sampling
        rollout = Rollout.cat([run.pipeline.sample(run.next_prompts(s.batch_size), run.rng)
                               for _ in range(s.num_batches_per_epoch)])
        with torch.no_grad():
            views = run.pipeline.render(rollout.final, run.reward_cameras(len(rollout)), run.needs)
        # Scored for the log only: read at the end of the epoch, so training does not wait for it.
        self.sample_scores = run.rewards.submit(views, rollout.prompts, with_grad=False)
        if self.cfg.trajectories == "stale":
            rollout, run.stale = run.stale, rollout
            if rollout is None:
                return None  # the first epoch: the reference's epoch −1 only samples
        return Batch(rollout.prompts, trajectories=rollout)

    def update(self, batch: Batch) -> None:
        run, pipe, trajectories = self.run, self.run.pipeline, batch.trajectories
        policy, sampler = pipe.generator, pipe.sampler
        cond = policy.encode_prompts(batch.prompts)
        guidance = run.cfg.sampling.guidance_scale
        B = len(batch)
        steps = self.algo.transition_steps(B, sampler.num_inference_steps, run.rng)  # (B, n), final step first
        rows = torch.arange(B)

        def transition(k: int):
            """Column k of `steps`: (step index (B,), x_t, x_{t-1} (B, V, C, h, w), t, t_prev (B,))."""
            idx = steps[:, k]
            return (idx, trajectories.latents[rows, idx], trajectories.latents[rows, idx + 1],
                    trajectories.timesteps[idx], sampler.prev_timesteps[idx])

        def request_reward_grad(k: int) -> _RewardAtX0:
            """Render x̂0_θ(x_{t-1}) of transition k and send it to the reward plane."""
            _, _, x_prev, _, t_prev = transition(k)
            x_leaf, views = render_at_x0(x_prev, lambda x: self.policy_x0(x, t_prev, cond),
                                         lambda x0: pipe.render(x0, run.reward_cameras(B), run.needs))
            if self.cfg.reward_context == "inference" and "depths" in views:
                views["depths"] = views["depths"].detach()  # depth-derived normals: a stop-gradient target
            pending = run.rewards.submit({k: v.detach() for k, v in views.items()}, batch.prompts, with_grad=True)
            return _RewardAtX0(x_leaf, views, pending)

        # Sending transition k+1's request before k's backward is exact: the optimizer steps only at the
        # end of a batch, so θ is the same. Render graphs are held one at a time. The first request has
        # no backward to hide behind: the reference scores, which need no graph, are computed meanwhile.
        rewards = RequestAhead(request_reward_grad, steps.shape[1])
        scores_ref = [self.reference_score(*transition(k)[:4], cond) for k in range(steps.shape[1])]
        for k in range(steps.shape[1]):
            idx, x_t, x_prev, t, t_prev = transition(k)
            # 1. The policy's score of the sampled transition (with grad), beside the reference's.
            out_policy = policy.predict(x_t, t, cond, guidance)
            policy_step = transition_scores(sampler, policy.eps_from_output(out_policy), idx, x_t, x_prev)
            # 2. The forward-looking reward gradient at x_{t-1}, pulled back through renderer and x̂0.
            reward_grad = rewards.take().gradient_at_x_prev()
            rewards.send_next()  # transition k+1's reward is computed during this backward
            # 3. Residual ∇-DB with the output regulariser.
            loss, terms = self.algo.loss(policy_step.score, scores_ref[k], reward_grad, sampler.alphas_cumprod_at(t_prev),
                                         out_policy, trajectories.outputs[rows, idx], std=policy_step.std)
            run.step(loss)
            run.record(terms)

    def reference_score(self, idx, x_t, x_prev, t, cond) -> torch.Tensor:
        """The frozen reference's (adapters off) score of a transition, (B, V, C, h, w), no graph."""
        policy = self.run.pipeline.generator
        with torch.no_grad(), policy.adapters_disabled():
            eps_ref = policy.eps_from_output(policy.predict(x_t, t, cond, self.run.cfg.sampling.guidance_scale))
            return transition_scores(self.run.pipeline.sampler, eps_ref, idx, x_t, x_prev).score

    def policy_x0(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """x̂0_θ(x) (B, V, C, h, w) of states x at timesteps t (B,): adapters on, the network's Jacobian
        kept (as the reference); with x0_alpha_one_step_ahead ᾱ is read at t − Δt (clipped at 1)."""
        policy = self.run.pipeline.generator
        eps = policy.eps_from_output(policy.predict(x, t, cond, self.run.cfg.sampling.guidance_scale))
        return predict_x0(eps, x, t, self.run.pipeline.sampler.alphas_cumprod, timestep_shift=self.x0_timestep_shift)

    def end_epoch(self) -> None:
        log_rewards(self.run, self.sample_scores.result())


@dataclass
class _RewardAtX0:
    """A render of x̂0_θ(x_{t-1}) whose reward request is in flight."""

    x_leaf: torch.Tensor  # (B, V, C, h, w) x_{t-1} as a grad leaf
    views: dict           # the render of x̂0_θ(x_{t-1}), with graph back to x_leaf
    pending: object       # its reward request (values and image gradients)

    def gradient_at_x_prev(self) -> torch.Tensor:
        """∇_{x_{t-1}} R(render(x̂0_θ(x_{t-1}))) (B, V, C, h, w); zero for objects whose reward was NaN/Inf."""
        answer = self.pending.result()
        grads = {"images": answer.grads, **answer.extra_grads}
        differentiable = [key for key in grads if self.views[key].requires_grad]
        grad = pull_back(self.x_leaf, [self.views[key] for key in differentiable], [grads[key] for key in differentiable])
        trusted = answer.finite.to(grad.dtype)  # NaN/Inf rewards are never trained on
        return grad * trusted.view(-1, *[1] * (grad.ndim - 1))


class NFTUpdates(Algorithm):
    """DiffusionNFT: CFG-free ODE samples from the old policy, negative-aware loss on re-noised samples."""

    def __init__(self, run):
        super().__init__(run)
        self.cfg = run.cfg.algorithm.nft
        self.algo = DiffusionNFT(self.cfg)

    @staticmethod
    def micro_steps_per_update(cfg: R2D3Config) -> int:
        return micro_batches_per_update(cfg) * num_train_steps(cfg.sampling.num_steps, cfg.algorithm.nft.timestep_fraction)

    def collect(self) -> Batch:
        """Groups of G samples per prompt from the old policy; rewards requested while the next batch samples."""
        run = self.run
        clean, prompts, pendings = [], [], []
        with run.pipeline.generator.use_adapter("old"):
            for _ in range(run.cfg.sampling.num_batches_per_epoch):
                group_prompts = grouped_prompts(run, self.cfg.group_size)
                x0 = run.pipeline.sample_ode(group_prompts, run.rng, guidance_scale=1.0)  # CFG-free
                with torch.no_grad():
                    views = run.pipeline.render(x0, run.reward_cameras(len(x0)), run.needs)
                pendings.append(run.rewards.submit(views, group_prompts, with_grad=False))
                clean.append(x0)
                prompts += group_prompts
        rewards, finite = _epoch_rewards(run, pendings)
        gather = all_gather_objects if self.cfg.reward_stats == "all_workers" else None
        r_opt = worker_optimality(torch.where(finite, rewards, torch.nan), prompts, self.cfg.adv_clip_max,
                                  gather, run.rank)
        # NaN/Inf rewards are never trained on: weight 0, kept so every epoch has the same micro-steps.
        return Batch(prompts, clean=torch.cat(clean), targets=r_opt, weight=finite.float())

    def update(self, batch: Batch) -> None:
        run = self.run
        policy, sampler = run.pipeline.generator, run.pipeline.sampler
        cond = policy.encode_prompts(batch.prompts)
        x0 = batch.clean
        steps = self.algo.transition_steps(len(x0), sampler.num_inference_steps, run.rng)  # (B, n)
        for k in range(steps.shape[1]):
            t = sampler.timesteps[steps[:, k]]
            # Drawn by the run's seeded CPU generator, then moved: the same noise on any device.
            noise = torch.randn(x0.shape, generator=run.rng).to(x0.device)
            x_t = sampler.add_noise(x0, noise, t)
            with torch.no_grad():
                with policy.use_adapter("old"):
                    eps_old = policy.eps_from_output(policy.predict(x_t, t, cond))
                with policy.adapters_disabled():
                    eps_ref = policy.eps_from_output(policy.predict(x_t, t, cond)) if self.cfg.kl_coef > 0 else None
            eps_policy = policy.eps_from_output(policy.predict(x_t, t, cond))
            loss, terms = self.algo.loss(eps_policy, eps_old, eps_ref, x_t, x0, sampler.alphas_cumprod_at(t),
                                         batch.targets, batch.weight)
            self.record_output_grad_norms(loss, eps_policy, steps[:, k], batch.weight)
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
        blend_adapter_(self.run.pipeline.generator, "ema", "policy", decay)
        self.run.record({"ema_decay": decay})

    def end_epoch(self) -> None:
        """The old (behaviour) policy follows the trained one with the reference's decay schedule."""
        decay = old_policy_decay(self.run.global_step, self.cfg.decay_type)
        blend_adapter_(self.run.pipeline.generator, "old", "policy", decay)
        self.run.record({"old_policy_decay": decay})


def _epoch_rewards(run, pendings: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The answers of an epoch's reward requests: rewards (N,) and finite (N,), logged."""
    answers = [p.result() for p in pendings]
    for answer in answers:
        log_rewards(run, answer)
    return torch.cat([a.rewards for a in answers]), torch.cat([a.finite for a in answers])


class GRPOUpdates(Algorithm):
    """GRPO (Flow-GRPO, DDPO): groups of SDE samples per prompt, group-relative advantages, the clipped
    importance ratio on transition log-probabilities, a KL to the reference."""

    def __init__(self, run):
        super().__init__(run)
        self.cfg = run.cfg.algorithm.grpo
        self.algo = GRPO(self.cfg)

    @staticmethod
    def micro_steps_per_update(cfg: R2D3Config) -> int:
        return micro_batches_per_update(cfg) * num_train_steps(cfg.sampling.num_steps, cfg.algorithm.grpo.timestep_fraction)

    def collect(self) -> Batch:
        """Groups of G trajectories per prompt from the current policy with their transition
        log-probabilities; rewards requested while the next batch samples."""
        run = self.run
        rollouts, pendings = [], []
        for _ in range(run.cfg.sampling.num_batches_per_epoch):
            prompts = grouped_prompts(run, self.cfg.group_size)
            rollout = run.pipeline.sample(prompts, run.rng)
            with torch.no_grad():
                views = run.pipeline.render(rollout.final, run.reward_cameras(len(rollout)), run.needs)
            pendings.append(run.rewards.submit(views, prompts, with_grad=False))
            rollouts.append(rollout)
        rollout = Rollout.cat(rollouts)
        rewards, finite = _epoch_rewards(run, pendings)
        gather = all_gather_objects if self.cfg.reward_stats == "all_workers" else None
        advantages = per_prompt_statistic(lambda r, p: group_advantages(r, p, self.cfg.adv_clip_max),
                                          torch.where(finite, rewards, torch.nan), rollout.prompts, gather, run.rank)
        return Batch(rollout.prompts, trajectories=rollout, targets=advantages, weight=finite.float(),
                     old_log_probs=self.sampling_log_probs(rollout))

    @torch.no_grad()
    def sampling_log_probs(self, rollout: Rollout) -> torch.Tensor:
        """(B, T) log p_old(x_{t-1}|x_t) of every sampled transition, from the outputs the rollout recorded."""
        policy, sampler = self.run.pipeline.generator, self.run.pipeline.sampler
        B, T = len(rollout), len(rollout.timesteps)
        columns = []
        for i in range(T):
            x_t, x_prev = rollout.latents[:, i], rollout.latents[:, i + 1]
            scores = transition_scores(sampler, policy.eps_from_output(rollout.outputs[:, i]),
                                       torch.full((B,), i), x_t, x_prev)
            columns.append(transition_log_prob(x_prev, scores.mean, scores.std))
        return torch.stack(columns, dim=1)

    def update(self, batch: Batch) -> None:
        run, trajectories = self.run, batch.trajectories
        policy, sampler = run.pipeline.generator, run.pipeline.sampler
        cond = policy.encode_prompts(batch.prompts)
        guidance = run.cfg.sampling.guidance_scale
        B = len(batch)
        steps = self.algo.transition_steps(B, sampler.num_inference_steps, run.rng)  # (B, n)
        rows = torch.arange(B)
        for k in range(steps.shape[1]):
            idx = steps[:, k]
            x_t, x_prev, t = trajectories.latents[rows, idx], trajectories.latents[rows, idx + 1], trajectories.timesteps[idx]
            with torch.no_grad(), policy.adapters_disabled():
                mean_ref = (transition_scores(sampler, policy.eps_from_output(policy.predict(x_t, t, cond, guidance)),
                                              idx, x_t, x_prev).mean if self.cfg.kl_coef > 0 else None)
            scores = transition_scores(sampler, policy.eps_from_output(policy.predict(x_t, t, cond, guidance)),
                                       idx, x_t, x_prev)
            loss, terms = self.algo.loss(transition_log_prob(x_prev, scores.mean, scores.std),
                                         batch.old_log_probs[rows, idx], batch.targets, scores.mean, mean_ref,
                                         scores.std, batch.weight)
            run.step(loss)
            run.record(terms)


class RewardBackpropUpdates(Algorithm):
    """ReFL / DRaFT-K: the reward gradient through the last K sampling steps."""

    def __init__(self, run):
        super().__init__(run)
        self.cfg = run.cfg.algorithm.reward_backprop
        self.algo = RewardBackprop(self.cfg)

    @staticmethod
    def micro_steps_per_update(cfg: R2D3Config) -> int:
        return micro_batches_per_update(cfg)

    def collect(self) -> Batch:
        """The epoch's prompts; each is sampled with grad in its training micro-batch."""
        s = self.run.cfg.sampling
        return Batch([p for _ in range(s.num_batches_per_epoch) for p in self.run.next_prompts(s.batch_size)])

    def update(self, batch: Batch) -> None:
        run, pipe = self.run, self.run.pipeline
        policy, sampler = pipe.generator, pipe.sampler
        cond = policy.encode_prompts(batch.prompts)
        x = pipe.initial_noise(len(batch), run.rng)
        T = sampler.num_inference_steps
        for i, t in enumerate(sampler.timesteps):
            with torch.set_grad_enabled(self.algo.grad_enabled(i, T)):
                eps = policy.eps_from_output(policy.predict(x, t, cond, run.cfg.sampling.guidance_scale))
                x = self.algo.step(sampler, eps, i, x, run.rng)
        views = pipe.render(x, run.reward_cameras(len(batch)), run.needs)
        answer = run.rewards.submit({k: v.detach() for k, v in views.items()}, batch.prompts, with_grad=True).result()
        log_rewards(run, answer)
        keys = ["images", *sorted(answer.extra_grads)]
        trusted = answer.finite.to(answer.grads.dtype).view(-1, *[1] * (answer.grads.ndim - 1))  # NaN/Inf: not trained on
        grads = {"images": answer.grads, **answer.extra_grads}
        loss, terms = self.algo.loss(_stack_views(views, keys), torch.nan_to_num(answer.rewards),
                                     _stack_views(grads, keys) * trusted)
        run.step(loss)
        run.record(terms)


def _stack_views(views: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    if len(keys) == 1:
        return views[keys[0]]
    return torch.cat([views[k] for k in keys], dim=2)  # (B, V, sum of channels, H, W)


ALGORITHMS: dict[str, type[Algorithm]] = {"nabla": NablaUpdates, "nft": NFTUpdates, "grpo": GRPOUpdates,
                                          "reward_backprop": RewardBackpropUpdates}
