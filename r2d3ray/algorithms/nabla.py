"""Nabla-R2D3: the residual ∇-GFlowNet loss with the forward-looking reward gradient.

What it learns (Nabla-R2D3's `src/train_nabla_r2d3_diffsplat_pas.py`; nabla-gfn's `train_nablagfn.py`). The policy is the SDE-DPM-Solver++ Gaussian
p_θ(x_{t-1}|x_t) = N(μ_θ(x_t), std²I); its forward score is s_θ = ∇_{x_{t-1}} log p_θ(x_{t-1}|x_t).
Residual ∇-DB asks, on every sampled transition x_t → x_{t-1},

    s_θ − s_ref = ∇_{x_{t-1}} log F̃(x_{t-1}),     F̃ the residual flow, F̃(x_0) = exp(β·R(x_0)),

whose fixed point is p_θ(x_0) ∝ p_ref(x_0)·exp(β·R(x_0)). The forward-looking (FL) guess is
∇ log F̃(x) ≈ β·w(ᾱ)·∇_x R(x̂0_θ(x)) (+ g_φ(x) when the flow gradient is learned), with w(ᾱ) = ᾱ
("squared"), √ᾱ ("sqrt") or 1 ("off"). Nabla-R2D3 as shipped trains only

    L = mean‖s_θ − s_ref − β·w(ᾱ_{t-1})·∇_{x_{t-1}} R(x̂0_θ(x_{t-1}))‖² + λ_reg·mean‖out_θ(x_t) − out_sampled‖²

(``learned_flow=False``). ``learned_flow=True`` is the full ∇-GFlowNet of nabla-gfn: a residual
flow-gradient network g_φ in the forward target, the reverse loss and the terminal loss (§1.4).

What a rollout must record, per sample (``rollout_fields``; ``schedulers.Trajectory`` has them):
every state x_T … x_0 of the SDE sampler (eta = 1, so each transition has a density), the timesteps,
and the raw network output of every step (the anchor of the output regulariser). Rewards are needed
only as gradients of the rendered images, at x̂0 of the chosen states.

One transition in the train loop (B samples, each at its own step ``steps[:, k]``, with
``t = sampler.timesteps[steps[:, k]]``, ``t_prev = sampler.prev_timesteps[steps[:, k]]``, and
``eps(out, x) = schedulers.eps_from_output(out, x)``)::

    with policy.disable_adapter(), torch.no_grad():
        eps_ref = eps(policy(x_t, t), x_t)                                # reference: adapters off
    out_pol = policy(x_t, t); eps_pol = eps(out_pol, x_t)                 # grad to θ
    s_ref = transition_scores(sampler, eps_ref, steps[:, k], x_t, x_prev).score
    s_pol = transition_scores(sampler, eps_pol, steps[:, k], x_t, x_prev).score
    x0_fn = lambda x: predict_x0(eps(policy(x, t_prev), x), x, t_prev, sampler.alphas_cumprod)
    grad_r, r = forward_looking_reward_grad(x_prev, x0_fn, render_from_x0, reward_grad)
    loss, terms = algo.loss(s_pol, s_ref, grad_r, sampler.alphas_cumprod_at(t_prev), out_pol, out_sampled)
    (loss / (grad_accum * n)).backward()        # after all n columns: clip LoRA grads to 1.0, step

With ``learned_flow`` the loop also makes x_t require grad before both ε calls (the reference one
with grad enabled), takes ``reverse_score`` of both policies, ∇_{x_t} R(x̂0_θ(x_t)) with the same
``forward_looking_reward_grad``, and g_φ at both states; see :class:`FlowTerms` (no training loop
drives it yet: the trainer, r2d3ray/train/updates.py, rejects ``learned_flow``). The reference's small image noise (2e-3·N(0, 1)) before the reward is
``reward_grad``'s business.

Departures from the reference, on purpose:
- Training batches larger than 1: every tensor is per sample (per-sample steps, ᾱ and masks), and the
  loss is the mean over samples of each sample's loss, so a batch of B equals the mean of B size-1
  batches (R2D3 supports batch 1 only, §7.1).
- Stratified transition picking works for any number of steps (see ``subsampling.stratified_steps``).
- The FL x̂0 uses, by default, the ᾱ of the timestep the network saw; R2D3 reads ᾱ one solver step
  later (§1.1 item 3), which ``x0_alpha_one_step_ahead`` reproduces in the trainer
  (``predict_x0(..., timestep_shift=sampler.dt)`` in ``x0_fn``; on in the DiffSplat configs).
- The terminal loss is averaged over the batch (zero for non-final samples), not over the final
  samples only; the two agree whenever a batch column is all-final or all-not, which the stratified
  pick guarantees (the final step is every sample's column 0).
- The reward gradient of the reverse loss gets the same norm clip as the forward one (nabla-gfn has
  no clip, R2D3 no reverse loss).
- ``residual_space="mean"`` (off by default) measures the forward residual in the transition's mean,
  ‖μ_θ − μ_ref − std²·β·w(ᾱ)·∇R‖², i.e. each transition's score residual weighted by std⁴. The fixed
  point is the same; what changes is which transitions drive the gradient. In score space a change
  Δε of the network moves the score by (∂μ/∂ε)/std² · Δε, which on the 20-step SDE-DPM-Solver++
  schedule is 1.3–7 for the first 19 steps and 265 for the last, near-noiseless one: that transition
  outweighs all others by about 1000x in the squared loss, though what it can change in a sample is
  small. In mean space every step weighs 0.2–0.6 per unit Δε.
- ``reward_adaptive_scaling`` merges the reference's bool and mode into one field; only the L2 loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from r2d3ray.config import NablaConfig

from r2d3ray.algorithms.subsampling import num_train_steps, random_steps, stratified_steps

# (images) -> (values (B,), d(Σ_b values_b)/d images, images' shape); both may be detached.
RewardGradFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class FlowTerms:
    """The learned-flow inputs for one batch of transitions x_t → x_{t-1} (``learned_flow=True``).

    ``reverse_score_*`` are ∇_{x_t} log p(x_{t-1}|x_t) from :func:`reverse_score`. As in nabla-gfn the
    policy's is a constant (no second-order graph), so the reverse loss trains g_φ only.
    """

    flow_prev: torch.Tensor             # g_φ(x_{t-1}, t_prev), x's shape, graph to φ
    flow_cur: torch.Tensor              # g_φ(x_t, t), graph to φ
    reverse_score_policy: torch.Tensor  # (B, ...) policy, adapters on
    reverse_score_ref: torch.Tensor     # (B, ...) reference, adapters off
    reward_grad_cur: torch.Tensor       # ∇_{x_t} R(x̂0_θ(x_t)), raw (β and w applied in the loss)
    alpha_bar_cur: torch.Tensor         # (B,) ᾱ_t
    is_final: torch.Tensor              # (B,) bool: x_{t-1} is the clean sample x_0


@dataclass
class TransitionScores:
    score: torch.Tensor  # (B, ...) ∇_{x_{t-1}} log p(x_{t-1}|x_t), float32, graph through μ only
    mean: torch.Tensor   # (B, ...) μ(x_t, ε), float32, graph to ε and x_t
    std: torch.Tensor    # (B, 1, ...) float32, broadcastable against x


def transition_scores(sampler, eps: torch.Tensor, step_indices: torch.Tensor, sample: torch.Tensor,
                      prev_sample: torch.Tensor) -> TransitionScores:
    """``sampler.step_with_score`` for a batch whose samples sit at different steps.

    ``step_indices`` (B,) int. The step coefficients depend only on the step, so the batch is split by
    step and each group scored with one call; ``eps`` is computed once for the whole batch by the caller.
    """
    step_indices = torch.as_tensor(step_indices).reshape(-1)
    if step_indices.shape[0] != sample.shape[0]:
        raise ValueError(f"step_indices has {step_indices.shape[0]} entries: expected one per sample "
                         f"({sample.shape[0]})")
    score = torch.empty(sample.shape, dtype=torch.float32, device=sample.device)
    mean = torch.empty(sample.shape, dtype=torch.float32, device=sample.device)
    std = torch.empty((sample.shape[0],) + (1,) * (sample.ndim - 1), dtype=torch.float32, device=sample.device)
    for step in torch.unique(step_indices).tolist():
        rows = (step_indices == step).nonzero().squeeze(1).to(sample.device)
        out = sampler.step_with_score(eps[rows], int(step), sample[rows], prev_sample=prev_sample[rows])
        # index_put keeps the graph of every group (the empty tensors become views of the results).
        score = score.index_put((rows,), out.score)
        mean = mean.index_put((rows,), out.prev_sample_mean)
        std = std.index_put((rows,), out.std.expand(len(rows), *std.shape[1:]))
    return TransitionScores(score, mean, std)


def reverse_score(sample: torch.Tensor, prev_sample: torch.Tensor, prev_sample_mean: torch.Tensor,
                  std: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """∇_{x_t} log N(x_{t-1}; μ(x_t), std²I) for a recorded x_{t-1}, per sample.

    ``sample`` (x_t) must require grad and ``prev_sample_mean`` must be computed from it (ε evaluated
    at that x_t with grad enabled). The graph is kept for the caller's later backward through μ;
    ``create_graph=True`` would also let the reverse loss train θ (nabla-gfn does not: ``allow_2nd=False``).
    """
    if not sample.requires_grad:
        raise ValueError("sample (x_t) must require grad: evaluate eps at x_t.requires_grad_() first")
    log_prob = -0.5 * ((prev_sample.detach().float() - prev_sample_mean) ** 2 / std**2).sum()
    (grad,) = torch.autograd.grad(log_prob, sample, retain_graph=True, create_graph=create_graph)
    return grad if create_graph else grad.detach()


def forward_looking_reward_grad(x: torch.Tensor, x0_fn: Callable[[torch.Tensor], torch.Tensor],
                                render_from_x0: Callable[[torch.Tensor], torch.Tensor],
                                reward_grad: RewardGradFn) -> tuple[torch.Tensor, torch.Tensor]:
    """∇_x R(render(x̂0_θ(x))) and R, per sample, without touching any parameter's ``.grad``.

    ``x0_fn(x)`` is x̂0 of the current policy (adapters on, Jacobian included, as in the reference);
    ``render_from_x0`` maps x̂0 to images (decoder + splats + rasterizer; identity on a toy);
    ``reward_grad(images)`` returns (values (B,), ∂Σ_b values_b / ∂images) — in the trainer it calls the
    reward plane, which sees only detached images. The image gradient is pulled back to x locally with
    ``autograd.grad(images, x, grad_outputs=g)``: only x's gradient is formed, and the graph is freed.
    Aggregating views (the reference's mean over 4 views) is ``reward_grad``'s job.
    """
    x, images = render_at_x0(x, x0_fn, render_from_x0)
    values, grad_images = reward_grad(images.detach())
    return pull_back(x, images, grad_images), values.detach()


def render_at_x0(x: torch.Tensor, x0_fn: Callable, render_from_x0: Callable):
    """First half of :func:`forward_looking_reward_grad`: (x as a grad leaf, render(x̂0_θ(x)) with graph).

    The trainer sends the detached render to the reward plane and keeps computing (the reference
    and policy scores) while the reward is in flight, then calls :func:`pull_back`.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        return x, render_from_x0(x0_fn(x))


def pull_back(x: torch.Tensor, outputs, grad_outputs) -> torch.Tensor:
    """Second half: d(reward)/dx from the reward's gradient w.r.t. the render (a tensor, or matching
    sequences of tensors such as images, depths and normals), without touching any parameter's .grad."""
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    grad_outputs = [grad_outputs] if isinstance(grad_outputs, torch.Tensor) else list(grad_outputs)
    for out, grad in zip(outputs, grad_outputs, strict=True):
        if grad.shape != out.shape:
            raise ValueError(f"reward_grad returned a gradient of shape {tuple(grad.shape)}: expected the "
                             f"images' shape {tuple(out.shape)}")
    (grad_x,) = torch.autograd.grad(outputs, x, grad_outputs=[g.to(o.dtype) for o, g in zip(outputs, grad_outputs)])
    return grad_x.detach()


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)  # (B,)


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B,) tensor shaped to broadcast against ``like`` (B, ...)."""
    v = torch.as_tensor(v, device=like.device, dtype=torch.float32).reshape(-1)
    if v.shape[0] != like.shape[0]:
        raise ValueError(f"got {v.shape[0]} per-sample values for a batch of {like.shape[0]}")
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


class NablaR2D3:
    """The Nabla-R2D3 / ∇-GFlowNet objective. See the module docstring for the loop around it."""

    rollout_fields = ("latents", "timesteps", "model_outputs")

    def __init__(self, config: NablaConfig | None = None):
        self.config = config or NablaConfig()

    def transition_steps(self, batch_size: int, num_steps: int,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, n) step indices to train on, final step in column 0; n = int(T·timestep_fraction)."""
        n = num_train_steps(num_steps, self.config.timestep_fraction)
        if self.config.low_var_subsampling:
            return stratified_steps(batch_size, num_steps, n, generator)
        return random_steps(batch_size, num_steps, n, include_final=True, generator=generator)

    def reward_term(self, reward_grad: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """β·w(ᾱ)·∇R (the FL flow-score guess), with the optional per-sample norm clip applied to β∇R
        before the time weight, as the reference does. ``alpha_bar`` (B,). Detached."""
        cfg = self.config
        term = cfg.reward_scale * reward_grad.detach().float()
        if cfg.reward_norm_clip:
            norm = term.flatten(1).norm(dim=1).clamp_min(torch.finfo(term.dtype).tiny)
            term = term * _per_sample(norm.clamp(max=cfg.reward_norm_value) / norm, term)
        if cfg.reward_adaptive_scaling == "squared":
            term = term * _per_sample(alpha_bar, term)
        elif cfg.reward_adaptive_scaling == "sqrt":
            term = term * _per_sample(alpha_bar, term).sqrt()
        return term

    def loss(self, score_policy: torch.Tensor, score_ref: torch.Tensor, reward_grad_prev: torch.Tensor,
             alpha_bar_prev: torch.Tensor, model_output: torch.Tensor | None = None,
             model_output_sampled: torch.Tensor | None = None,
             flow: FlowTerms | None = None, std: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one batch of transitions x_t → x_{t-1}, and its named terms (detached scalars).

        score_policy: (B, ...) s_θ(x_{t-1}|x_t), graph to θ.
        score_ref: (B, ...) s_ref(x_{t-1}|x_t) of the frozen model (adapters off); treated as constant.
        reward_grad_prev: (B, ...) ∇_{x_{t-1}} R(x̂0_θ(x_{t-1})) from :func:`forward_looking_reward_grad`.
        alpha_bar_prev: (B,) ᾱ at x_{t-1}'s timestep.
        model_output / model_output_sampled: (B, ...) raw network output at x_t now (graph to θ) and as
            recorded while sampling; both None when ``unet_reg_scale == 0``.
        flow: the learned-flow inputs, required iff ``config.learned_flow``.
        std: (B,) or (B, 1, ...) the transitions' noise scale (``TransitionScores.std``), required when
            ``config.residual_space == "mean"``.

        Returns the mean over samples of the per-sample loss (elementwise means inside), so the caller
        divides by its accumulation count only.
        """
        cfg = self.config
        if score_policy.shape != score_ref.shape or reward_grad_prev.shape != score_ref.shape:
            raise ValueError(f"score_policy {tuple(score_policy.shape)}, score_ref {tuple(score_ref.shape)} and "
                             f"reward_grad_prev {tuple(reward_grad_prev.shape)} must have the same shape")
        if (flow is not None) != cfg.learned_flow:
            raise ValueError(f"flow terms {'given' if flow is not None else 'missing'} but "
                             f"config.learned_flow={cfg.learned_flow}")
        reward_prev = self.reward_term(reward_grad_prev, alpha_bar_prev)
        target = score_ref.detach().float() + reward_prev
        if flow is not None:
            # At the terminal state the residual flow is exactly βR, so no learned correction there.
            not_final = _per_sample(~flow.is_final, target)
            target = target + not_final * flow.flow_prev
        forward_residual = score_policy.float() - target
        if cfg.residual_space == "mean":
            if std is None:
                raise ValueError("std (the transitions' noise scale) is required when residual_space='mean'")
            # (μ_θ − μ_ref) − std²·β·w·∇R, since s_θ − s_ref = (μ_θ − μ_ref)/std²
            forward_residual = forward_residual * _per_sample(std, forward_residual) ** 2
        per_sample = _per_sample_mean(forward_residual**2)
        terms = {"loss_forward": per_sample.mean()}

        if cfg.unet_reg_scale > 0:
            if model_output is None or model_output_sampled is None:
                raise ValueError("model_output and model_output_sampled are required when unet_reg_scale > 0")
            unet_reg = _per_sample_mean((model_output.float() - model_output_sampled.detach().float()) ** 2)
            per_sample = per_sample + cfg.unet_reg_scale * unet_reg
            terms["unet_reg"] = unet_reg.mean()

        if flow is not None:
            reward_cur = self.reward_term(flow.reward_grad_cur, flow.alpha_bar_cur)
            reverse_target = flow.reverse_score_ref.detach().float() - flow.flow_cur - reward_cur
            # nabla-gfn sets the whole reverse target to zero on the final transition (end_mask).
            reverse_target = reverse_target * _per_sample(~flow.is_final, reverse_target)
            reverse = _per_sample_mean((flow.reverse_score_policy.float() - reverse_target) ** 2)
            terminal = flow.is_final.to(per_sample.dtype) * _per_sample_mean(flow.flow_prev.float() ** 2)
            per_sample = per_sample + cfg.reverse_loss_scale * reverse + terminal
            terms["loss_reverse"] = reverse.mean()
            terms["loss_terminal"] = terminal.mean()

        loss = per_sample.mean()
        terms = {k: v.detach() for k, v in terms.items()}
        terms["loss"] = loss.detach()
        terms["reward_term_norm"] = reward_prev.flatten(1).norm(dim=1).mean()
        residual = score_policy.detach().float() - score_ref.detach().float()  # (s_θ − s_ref) = (μ_θ − μ_ref)/std²
        terms["residual_score_norm"] = residual.flatten(1).norm(dim=1).mean()
        return loss, terms

