"""The alignment losses against hand-computed values, their signs, and their bookkeeping."""

import math

import pytest
import torch

from r2d3ray.algorithms.nabla import (FlowTerms, NablaConfig, NablaR2D3, forward_looking_reward_grad,
                                      reverse_score, transition_scores)
from r2d3ray.algorithms.nft import (DiffusionNFT, NFTConfig, ema_decay_at, old_policy_decay,
                                    optimality_probability, soft_update_)
from r2d3ray.algorithms.reward_backprop import RewardBackprop, RewardBackpropConfig
from r2d3ray.algorithms.subsampling import num_train_steps, random_steps, stratified_steps
from r2d3ray.models.schedulers import SDEDPMSolver


# ---------------------------------------------------------------- transition subsampling

@pytest.mark.parametrize("num_steps", [7, 20, 50])
@pytest.mark.parametrize("fraction", [0.05, 0.4, 0.99, 1.0])
def test_stratified_steps_cover_every_stratum_once_final_first(num_steps, fraction):
    n = num_train_steps(num_steps, fraction)
    steps = stratified_steps(64, num_steps, n, torch.Generator().manual_seed(0))
    assert steps.shape == (64, n) and steps.dtype == torch.long
    assert (steps[:, 0] == num_steps - 1).all()
    for row in steps.tolist():
        assert len(set(row)) == n                              # no duplicates
    if n > 1:
        picks = steps[:, 1:]
        # Strata partition 0..T-2 into n-1 contiguous runs: pick k lies in run k, runs are disjoint.
        bounds = [k * (num_steps - 1) // (n - 1) for k in range(n)]
        for k in range(n - 1):
            assert ((picks[:, k] >= bounds[k]) & (picks[:, k] < bounds[k + 1])).all()
        assert bounds[0] == 0 and bounds[-1] == num_steps - 1


@pytest.mark.parametrize("num_steps", [7, 20, 50])
def test_stratified_steps_reach_every_step_and_differ_per_sample(num_steps):
    n = num_train_steps(num_steps, 0.4)
    steps = stratified_steps(2000, num_steps, n, torch.Generator().manual_seed(1))
    assert set(steps.flatten().tolist()) == set(range(num_steps))  # uniform inside each stratum
    bounds = [k * (num_steps - 1) // (n - 1) for k in range(n)]
    combinations = math.prod(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    assert len({tuple(r) for r in steps.tolist()}) >= min(100, combinations)  # each sample draws its own


def test_stratified_steps_all_steps_when_fraction_is_one():
    steps = stratified_steps(3, 7, 7)
    assert steps.tolist() == [[6, 0, 1, 2, 3, 4, 5]] * 3


def test_random_steps_are_per_sample_permutations():
    steps = random_steps(50, 10, 9, generator=torch.Generator().manual_seed(0))
    assert steps.shape == (50, 9)
    assert all(len(set(r)) == 9 for r in steps.tolist())
    assert len({tuple(r) for r in steps.tolist()}) > 40
    final_first = random_steps(50, 10, 4, include_final=True, generator=torch.Generator().manual_seed(0))
    assert (final_first[:, 0] == 9).all() and all(len(set(r)) == 4 for r in final_first.tolist())


def test_num_train_steps_matches_references_and_rejects_bad_input():
    assert num_train_steps(20, 0.4) == 8      # Nabla-R2D3
    assert num_train_steps(10, 0.99) == 9     # DiffusionNFT
    assert num_train_steps(20, 0.01) == 1
    with pytest.raises(ValueError, match="timestep_fraction"):
        num_train_steps(20, 0.0)
    with pytest.raises(ValueError, match="num_train"):
        stratified_steps(2, 5, 6)


# ---------------------------------------------------------------- Nabla-R2D3

def _nabla(**kw):
    return NablaR2D3(NablaConfig(**{"unet_reg_scale": 0.0, **kw}))


@pytest.mark.parametrize("mode,expected", [("squared", 4.5), ("sqrt", 4.625), ("off", 5.625)])
def test_nabla_forward_loss_hand_computed(mode, expected):
    # target = s_ref + β·w(ᾱ)·∇R with β = 2, ᾱ = 0.25, ∇R = (1, 0):
    # squared w = .25 → target (1, -1), diff (0, 3) → 4.5; sqrt w = .5 → diff (-.5, 3) → 4.625;
    # off w = 1 → diff (-1.5, 3) → 5.625.
    algo = _nabla(reward_scale=2.0, reward_adaptive_scaling=mode)
    loss, terms = algo.loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]]), torch.tensor([[1.0, 0.0]]),
                            torch.tensor([0.25]))
    assert loss.item() == pytest.approx(expected)
    assert terms["loss_forward"].item() == pytest.approx(expected)


def test_nabla_mean_space_residual_hand_computed():
    # The "squared" case above, two samples with std 0.5 and 2: each score residual (0, 3) times std²:
    # (0, 0.75) → 0.28125 and (0, 12) → 72, mean 36.140625. The same zero: s_θ on target gives 0.
    algo = _nabla(reward_scale=2.0, residual_space="mean")
    score_policy, score_ref = torch.tensor([[1.0, 2.0]] * 2), torch.tensor([[0.5, -1.0]] * 2)
    reward_grad, alpha_bar = torch.tensor([[1.0, 0.0]] * 2), torch.tensor([0.25, 0.25])
    std = torch.tensor([[0.5], [2.0]])  # (B, 1), as TransitionScores.std
    loss, terms = algo.loss(score_policy, score_ref, reward_grad, alpha_bar, std=std)
    assert loss.item() == pytest.approx(36.140625)
    on_target = torch.tensor([[1.0, -1.0]] * 2)
    assert algo.loss(on_target, score_ref, reward_grad, alpha_bar, std=std)[0].item() == 0.0
    with pytest.raises(ValueError, match="std"):
        algo.loss(score_policy, score_ref, reward_grad, alpha_bar)


def test_nabla_output_regulariser_and_norm_clip_hand_computed():
    # ‖β∇R‖ = ‖(3, 4)‖ = 5 clipped to 1 → (0.6, 0.8), × ᾱ = 0.5 → (0.3, 0.4); s_ref = 0, s_θ = 0:
    # forward = (0.09 + 0.16)/2 = 0.125. Output regulariser: mean((1,1) − (0,1))² = 0.5, × 10 = 5.
    algo = NablaR2D3(NablaConfig(reward_scale=1.0, reward_norm_clip=True, reward_norm_value=1.0, unet_reg_scale=10.0))
    zeros = torch.zeros(1, 2)
    loss, terms = algo.loss(zeros, zeros, torch.tensor([[3.0, 4.0]]), torch.tensor([0.5]),
                            torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 1.0]]))
    assert terms["loss_forward"].item() == pytest.approx(0.125)
    assert terms["unet_reg"].item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx(5.125)


def test_nabla_flow_losses_hand_computed():
    # Not final: forward target = s_ref + g(x_{t-1}) + β∇R' = 0 + 1 + 1 = 2 vs s_θ = 0 → 4.
    # Reverse target = s_ref_rev − g(x_t) − β∇R = 1 − 0.5 − 1 = -0.5 vs s_θ_rev = 0 → 0.25, × scale 2.
    # Terminal loss only for final samples. Final: forward target has no flow term: (0 − 1)² = 1;
    # reverse target is zero: (0 − 0)² = 0; terminal = g(x_0)² = 1.
    algo = _nabla(reward_scale=1.0, reward_adaptive_scaling="off", learned_flow=True, reverse_loss_scale=2.0)
    ones, zeros = torch.ones(1, 1), torch.zeros(1, 1)
    flow = lambda final: FlowTerms(flow_prev=ones, flow_cur=0.5 * ones, reverse_score_policy=zeros,
                                   reverse_score_ref=ones, reward_grad_cur=ones, alpha_bar_cur=torch.ones(1),
                                   is_final=torch.tensor([final]))
    loss, terms = algo.loss(zeros, zeros, ones, torch.ones(1), flow=flow(False))
    assert (terms["loss_forward"].item(), terms["loss_reverse"].item(), terms["loss_terminal"].item()) == \
        pytest.approx((4.0, 0.25, 0.0))
    assert loss.item() == pytest.approx(4.5)
    loss, terms = algo.loss(zeros, zeros, ones, torch.ones(1), flow=flow(True))
    assert (terms["loss_forward"].item(), terms["loss_reverse"].item(), terms["loss_terminal"].item()) == \
        pytest.approx((1.0, 0.0, 1.0))
    assert loss.item() == pytest.approx(2.0)


def _random_flow_terms(g, batch, is_final):
    r = lambda: torch.randn(batch, 3, 4, generator=g)
    return FlowTerms(r(), r(), r(), r(), r(), torch.rand(batch, generator=g), torch.tensor(is_final))


def test_nabla_batch_of_two_is_the_mean_of_two_single_losses():
    g = torch.Generator().manual_seed(0)
    algo = NablaR2D3(NablaConfig(reward_scale=3.0, unet_reg_scale=7.0, reward_norm_clip=True, reward_norm_value=2.0,
                                 learned_flow=True, reverse_loss_scale=0.5))
    tensors = [torch.randn(2, 3, 4, generator=g) for _ in range(5)]
    alpha_bar = torch.rand(2, generator=g)
    flow = _random_flow_terms(g, 2, [True, False])
    pair, _ = algo.loss(*tensors[:3], alpha_bar, *tensors[3:], flow=flow)
    singles = []
    for i in range(2):
        one = FlowTerms(*(getattr(flow, f.name)[i:i + 1] for f in flow.__dataclass_fields__.values()))
        singles.append(algo.loss(*(t[i:i + 1] for t in tensors[:3]), alpha_bar[i:i + 1],
                                 *(t[i:i + 1] for t in tensors[3:]), flow=one)[0])
    assert pair.item() == pytest.approx((singles[0].item() + singles[1].item()) / 2, rel=1e-6)


def test_nabla_step_moves_a_gaussian_policy_towards_higher_reward():
    # A 1-D ε-model ε_θ = θ on the real SDE-DPM++ step; the reward R(x) = x grows along +x. With s_ref taken
    # at θ = 0, one SGD step on the Nabla loss must raise the policy mean μ_θ(x_t).
    sampler = SDEDPMSolver(10)
    theta = torch.zeros(1, requires_grad=True)
    x_t = torch.randn(16, 1, generator=torch.Generator().manual_seed(0))
    step = 6
    ref = sampler.step_with_score(torch.zeros_like(x_t), step, x_t, generator=torch.Generator().manual_seed(1))
    x_prev = ref.prev_sample
    grad_r, values = forward_looking_reward_grad(
        x_prev, lambda x: x, lambda x0: x0, lambda images: (images[:, 0], torch.ones_like(images)))
    assert torch.equal(grad_r, torch.ones_like(x_prev)) and torch.equal(values, x_prev[:, 0])
    algo = _nabla(reward_scale=1.0)
    t_prev = sampler.prev_timesteps[step]
    pol = sampler.step_with_score(theta.expand_as(x_t), step, x_t, prev_sample=x_prev)
    loss, _ = algo.loss(pol.score, ref.score, grad_r, sampler.alphas_cumprod_at(t_prev).expand(16))
    loss.backward()
    with torch.no_grad():
        theta -= 1e-3 * theta.grad
    new_mean = sampler.step_with_score(theta.detach().expand_as(x_t), step, x_t, prev_sample=x_prev).prev_sample_mean
    assert (new_mean > ref.prev_sample_mean).all()


def test_forward_looking_reward_grad_pulls_back_through_render_without_parameter_grads():
    x0_model = torch.nn.Linear(2, 2)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    render = lambda x0: x0**2                                   # images (3, 2)

    def reward_grad(images):
        assert not images.requires_grad                          # the reward plane only sees detached images
        return images.sum(1), torch.ones_like(images)             # R = Σ images

    grad, values = forward_looking_reward_grad(x, x0_model, render, reward_grad)
    x0 = x0_model(x).detach()
    # ∂/∂x Σ (Wx + b)² = 2 Wᵀ(Wx + b)
    assert torch.allclose(grad, 2 * x0 @ x0_model.weight.detach(), atol=1e-6)
    assert torch.allclose(values, (x0**2).sum(1))
    assert all(p.grad is None for p in x0_model.parameters())
    with pytest.raises(ValueError, match="images' shape"):
        forward_looking_reward_grad(x, x0_model, render, lambda im: (im.sum(1), torch.ones(3)))


def test_transition_scores_with_per_sample_steps_match_single_step_calls():
    sampler = SDEDPMSolver(20)
    g = torch.Generator().manual_seed(0)
    x_t, x_prev = torch.randn(4, 2, 3, generator=g), torch.randn(4, 2, 3, generator=g)
    eps = torch.randn(4, 2, 3, generator=g, requires_grad=True)
    steps = torch.tensor([19, 3, 19, 7])
    out = transition_scores(sampler, eps, steps, x_t, x_prev)
    for i, s in enumerate(steps.tolist()):
        ref = sampler.step_with_score(eps[i:i + 1], s, x_t[i:i + 1], prev_sample=x_prev[i:i + 1])
        assert torch.allclose(out.score[i:i + 1], ref.score)
        assert torch.allclose(out.mean[i:i + 1], ref.prev_sample_mean)
        assert out.std[i].item() == pytest.approx(ref.std.item())
    out.score.sum().backward()
    assert eps.grad is not None and (eps.grad.abs() > 0).all()


def test_reverse_score_matches_the_gaussian_formula():
    # μ(x_t) = a·x_t, so ∇_{x_t} log N(x_prev; a x_t, s²) = a (x_prev − a x_t) / s².
    a, s = 0.7, 0.3
    x_t = torch.tensor([[0.5, -1.0]], requires_grad=True)
    x_prev = torch.tensor([[0.2, 0.4]])
    got = reverse_score(x_t, x_prev, a * x_t, torch.tensor(s))
    assert torch.allclose(got, a * (x_prev - a * x_t.detach()) / s**2)
    with pytest.raises(ValueError, match="require grad"):
        reverse_score(x_t.detach(), x_prev, a * x_t, torch.tensor(s))


def test_nabla_config_and_inputs_are_validated():
    with pytest.raises(ValueError, match="reward_adaptive_scaling"):
        NablaConfig(reward_adaptive_scaling="cubic")
    with pytest.raises(ValueError, match="trajectories"):
        NablaConfig(trajectories="old")
    with pytest.raises(ValueError, match="residual_space"):
        NablaConfig(residual_space="noise")
    with pytest.raises(ValueError, match="reward_norm_value"):
        NablaConfig(reward_norm_clip=True, reward_norm_value=-1.0)
    with pytest.raises(ValueError, match="learned_flow"):
        _nabla(learned_flow=True).loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1))
    with pytest.raises(ValueError, match="model_output"):
        NablaR2D3().loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1))
    steps = _nabla(timestep_fraction=0.4).transition_steps(3, 20)
    assert steps.shape == (3, 8) and (steps[:, 0] == 19).all()


# ---------------------------------------------------------------- DiffusionNFT

def test_optimality_probability_per_prompt_mean_global_std():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0])
    r, adv = optimality_probability(rewards, ["a", "a", "b", "b"], adv_clip_max=5.0)
    std = math.sqrt(1.25) + 1e-4                               # population std of all four, + 1e-4
    assert adv.tolist() == pytest.approx([-0.5 / std, 0.5 / std, -0.5 / std, 0.5 / std])
    assert r.tolist() == pytest.approx([0.5 + 0.5 * a / 5.0 for a in adv.tolist()])
    r, adv = optimality_probability(torch.tensor([0.0] * 99 + [1000.0]), torch.zeros(100), adv_clip_max=5.0)
    assert r[-1].item() == 1.0 and adv[-1].item() > 5.0        # clipped at adv_clip_max
    with pytest.raises(ValueError, match="prompt_ids"):
        optimality_probability(rewards, ["a"])


def _nft_inputs():
    # ᾱ = 0.64 (α = 0.8, σ = 0.6); x0 = (1, 0); noise (1, 1) → x_t = (1.4, 0.6).
    return dict(noisy=torch.tensor([[1.4, 0.6]]), clean=torch.tensor([[1.0, 0.0]]), alpha_bar=torch.tensor([0.64]))


def test_nft_loss_hand_computed():
    # β_mix = 1: ε⁺ = ε_θ = (.5, 1) → x̂0⁺ = (1.375, 0), d = (.375, 0): ℓ⁺ = .0703125/.1875 = .375.
    # ε⁻ = 2ε_old − ε_θ = (1.5, −1) → x̂0⁻ = (.625, 1.5), d = (−.375, 1.5): ℓ⁻ = 1.1953125/.9375 = 1.275.
    # r = .75: 5·(.75·.375 + .25·1.275) = 3.0; KL: mean((.5, 1) − (1, 0))² = .625, × .1 → 3.0625.
    algo = DiffusionNFT(NFTConfig(nft_mix_beta=1.0, kl_coef=0.1, adv_clip_max=5.0))
    loss, terms = algo.loss(torch.tensor([[0.5, 1.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]),
                            r=torch.tensor([0.75]), **_nft_inputs())
    assert terms["positive_loss"].item() == pytest.approx(0.375)
    assert terms["negative_loss"].item() == pytest.approx(1.275)
    assert terms["policy_loss"].item() == pytest.approx(3.0)
    assert terms["kl_loss"].item() == pytest.approx(0.625)
    assert loss.item() == pytest.approx(3.0625)


def test_nft_sample_weight_zero_leaves_a_sample_out_of_the_batch_mean():
    # The hand-computed sample above beside a second one weighted 0: half the loss, no gradient to it.
    algo = DiffusionNFT(NFTConfig(nft_mix_beta=1.0, kl_coef=0.1, adv_clip_max=5.0))
    inputs = _nft_inputs()
    eps_policy = torch.tensor([[0.5, 1.0], [-2.0, 3.0]], requires_grad=True)
    loss, terms = algo.loss(eps_policy, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]]),
                            torch.cat([inputs["noisy"]] * 2), torch.cat([inputs["clean"]] * 2),
                            torch.cat([inputs["alpha_bar"]] * 2), r=torch.tensor([0.75, 0.1]),
                            sample_weight=torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx(3.0625 / 2)
    loss.backward()
    assert eps_policy.grad[1].abs().sum() == 0 and eps_policy.grad[0].abs().sum() > 0
    with pytest.raises(ValueError, match="sample_weight"):
        algo.loss(eps_policy, eps_policy.detach(), eps_policy.detach(), torch.zeros(2, 2), torch.zeros(2, 2),
                  torch.ones(2), torch.ones(2), sample_weight=torch.ones(3))


def test_nft_eps_mix_equals_x0_mix():
    # The module's claim: mixing ε's is mixing x̂0's, for any β_mix.
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    alpha_bar = torch.tensor([0.1, 0.5, 0.9])
    ab = alpha_bar[:, None]
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    eps_pol, eps_old = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    beta, r = 0.3, torch.tensor([0.2, 0.5, 0.9])
    x0_hat = lambda e: (x_t - (1 - ab).sqrt() * e) / ab.sqrt()
    ell = lambda xh: ((xh - x0) ** 2).mean(1) / (xh - x0).abs().mean(1)
    pos = ell((1 - beta) * x0_hat(eps_old) + beta * x0_hat(eps_pol))
    neg = ell((1 + beta) * x0_hat(eps_old) - beta * x0_hat(eps_pol))
    expected = ((r * pos + (1 - r) * neg) / beta * 5.0).mean()
    loss, _ = DiffusionNFT(NFTConfig(nft_mix_beta=beta, kl_coef=0.0)).loss(eps_pol, eps_old, None, x_t, x0,
                                                                           alpha_bar, r)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_nft_on_policy_value_ignores_r_and_gradient_scales_with_2r_minus_1():
    algo = DiffusionNFT(NFTConfig(nft_mix_beta=0.5, kl_coef=0.0))
    eps_old = torch.tensor([[0.5, 1.0]])
    values, grads = [], []
    for r in (0.0, 0.25, 0.5, 0.9, 1.0):
        eps_pol = eps_old.clone().requires_grad_(True)            # θ = θ_old
        loss, _ = algo.loss(eps_pol, eps_old, None, r=torch.tensor([r]), **_nft_inputs())
        loss.backward()
        values.append(loss.item())
        grads.append(eps_pol.grad.clone())
    assert values == pytest.approx([values[0]] * 5)
    for r, g in zip((0.0, 0.25, 0.5, 0.9, 1.0), grads):
        assert torch.allclose(g, (2 * r - 1) * grads[-1], atol=1e-6)
    assert grads[-1].abs().sum() > 0


@pytest.mark.parametrize("r,closer", [(0.9, True), (0.1, False)])
def test_nft_step_pulls_towards_a_good_sample_and_away_from_a_bad_one(r, closer):
    algo = DiffusionNFT(NFTConfig(kl_coef=0.0))
    inputs = _nft_inputs()
    eps_old = torch.tensor([[0.3, 0.2]])
    theta = torch.zeros(1, 2, requires_grad=True)               # ε_θ = ε_old + θ
    x0_err = lambda eps: ((inputs["noisy"] - 0.6 * eps) / 0.8 - inputs["clean"]).norm()
    before = x0_err(eps_old)
    loss, _ = algo.loss(eps_old + theta, eps_old, None, r=torch.tensor([r]), **inputs)
    loss.backward()
    with torch.no_grad():
        after = x0_err(eps_old + theta - 1e-3 * theta.grad)
    assert (after < before) == closer


def test_old_policy_decay_schedules():
    assert [old_policy_decay(s, 0) for s in (0, 10, 10_000)] == [0.0, 0.0, 0.0]
    assert [old_policy_decay(s, 1) for s in (0, 100, 500, 2000)] == pytest.approx([0.0, 0.1, 0.5, 0.5])
    assert [old_policy_decay(s, 2) for s in (0, 74, 75, 76, 208, 1000)] == \
        pytest.approx([0.0, 0.0, 0.0, 0.0075, 0.9975, 0.999])
    with pytest.raises(ValueError, match="decay_type"):
        old_policy_decay(3, 7)
    with pytest.raises(ValueError, match="decay_type"):
        NFTConfig(decay_type=5)


def test_ema_decay_warms_up_to_its_cap():
    # flow_grpo's EMAModuleWrapper: min((1 + step)/(10 + step), decay), step = optimizer steps done.
    assert [ema_decay_at(s, 0.9) for s in (0, 1, 8, 80, 10_000)] == pytest.approx([0.1, 2 / 11, 0.5, 0.9, 0.9])
    assert [ema_decay_at(s, 0.99) for s in (50, 10_000)] == pytest.approx([51 / 60, 0.99])


def test_soft_update_blends_old_towards_policy():
    old = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    new = [torch.tensor([3.0, 6.0]), torch.tensor([[4.0]])]
    soft_update_(old, new, decay=0.25)
    assert old[0].tolist() == pytest.approx([2.5, 5.0]) and old[1].item() == pytest.approx(3.0)
    soft_update_(old, new, decay=0.0)
    assert old[0].tolist() == [3.0, 6.0]
    with pytest.raises(ValueError, match="old_params"):
        soft_update_(old, new[:1], 0.5)


def test_nft_config_names_the_two_betas_and_validates():
    cfg = NFTConfig()
    assert (cfg.nft_mix_beta, cfg.kl_coef, cfg.adv_clip_max, cfg.decay_type) == (1.0, 1e-4, 5.0, 1)
    with pytest.raises(ValueError, match="nft_mix_beta"):
        NFTConfig(nft_mix_beta=0.0)
    with pytest.raises(ValueError, match="eps_ref"):
        DiffusionNFT().loss(torch.zeros(1, 2), torch.zeros(1, 2), None, r=torch.ones(1), **_nft_inputs())
    steps = DiffusionNFT().transition_steps(5, 10)
    assert steps.shape == (5, 9) and all(len(set(r)) == 9 for r in steps.tolist())


# ---------------------------------------------------------------- reward backprop

def test_reward_backprop_loss_value_and_gradient():
    images = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    grad = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    loss, terms = RewardBackprop(RewardBackpropConfig(reward_scale=2.0)).loss(images, torch.tensor([1.0, 3.0]), grad)
    assert loss.item() == pytest.approx(-4.0)                  # −2 · mean(1, 3)
    assert terms["reward_mean"].item() == pytest.approx(2.0)
    loss.backward()
    assert torch.allclose(images.grad, -2.0 / 2 * grad)


def test_reward_backprop_differentiates_only_the_last_k_steps():
    algo = RewardBackprop(RewardBackpropConfig(grad_steps=2))
    assert [algo.grad_enabled(i, 5) for i in range(5)] == [False, False, False, True, True]
    sampler = SDEDPMSolver(5)
    theta = torch.zeros(1, requires_grad=True)                  # ε_θ = θ, a 1-D toy model
    x = torch.randn(64, 1, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    for i in range(5):
        with torch.set_grad_enabled(algo.grad_enabled(i, 5)):
            x = algo.step(sampler, theta.expand_as(x), i, x, g)
    plain = torch.randn(64, 1, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    for i in range(5):
        plain = sampler.step_with_score(torch.zeros_like(plain), i, plain, generator=g).prev_sample
    assert torch.allclose(x.detach(), plain)                    # same draw, graph kept
    loss, _ = algo.loss(x, x[:, 0].detach(), torch.ones_like(x))  # R(x) = x
    loss.backward()
    with torch.no_grad():
        theta -= 0.1 * theta.grad
    assert theta.item() < 0                                      # lower ε → higher x̂0 → higher reward
