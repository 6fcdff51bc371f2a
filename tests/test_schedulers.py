import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from r2d3ray.models.schedulers import (
    PIXART_SIGMA_SCHEDULER_CONFIG,
    SDEDPMSolver,
    eps_from_output,
    ode_sample,
    predict_x0,
    sample_trajectory,
)

@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


ZERO_SNR = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing")  # DiffSplat's "common tricks"

# 2-D Gaussian data N(m, diag(s²)) and its exact ε-prediction:
# ε*(x_t, t) = E[ε | x_t] = (x_t − √ᾱ m)·√(1−ᾱ) / (ᾱ s² + 1 − ᾱ).
DATA_MEAN = torch.tensor([1.0, -0.5])
DATA_STD = torch.tensor([0.5, 1.5])


def gaussian_oracle(alphas_cumprod):
    def denoise(x, t):
        alpha_bar = alphas_cumprod[t]
        return (x - alpha_bar.sqrt() * DATA_MEAN) * (1 - alpha_bar).sqrt() / (alpha_bar * DATA_STD**2 + 1 - alpha_bar)
    return denoise


class TinyLearnedSigmaNet(torch.nn.Module):
    """Stand-in network with PixArt's output layout: ε and a variance, 2C channels (bounded, so that
    untrained weights give a stable trajectory)."""

    def __init__(self, channels=4):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, 2 * channels, 3, padding=1)

    def forward(self, x, t):
        return torch.tanh(self.conv(x) + t.float() / 1000)


# x̂0 clipped to [-1, 1] by diffusers' thresholding (the tiny prior's setting)
CLIP_X0 = dict(thresholding=True, sample_max_value=1.0)


@pytest.mark.parametrize("config", [{}, CLIP_X0], ids=["plain", "clip_x0"])
def test_step_matches_diffusers_sde_and_ode_first_order(config):
    x_T, net = torch.randn(2, 4, 8, 8), TinyLearnedSigmaNet()
    for eta, algorithm in [(1.0, "sde-dpmsolver++"), (0.0, "dpmsolver++")]:
        sampler = SDEDPMSolver(20, eta=eta, **config)
        ours = sample_trajectory(net, x_T, sampler, generator=torch.Generator().manual_seed(1))

        reference = DPMSolverMultistepScheduler(**PIXART_SIGMA_SCHEDULER_CONFIG, **config, algorithm_type=algorithm,
                                                solver_order=1, final_sigmas_type="sigma_min")
        reference.set_timesteps(20)
        assert torch.equal(reference.timesteps, sampler.timesteps)
        generator = torch.Generator().manual_seed(1)  # the same noise stream, step by step
        for i, t in enumerate(reference.timesteps):
            eps = ours.model_outputs[i][:, :4]
            expected = reference.step(eps, t, ours.latents[i], generator=generator).prev_sample
            # diffusers rounds the step coefficients in float32, we in float64: agree to float32 ulps.
            torch.testing.assert_close(ours.latents[i + 1], expected, rtol=1e-5, atol=1e-6 * expected.abs().max())


def test_score_is_gradient_of_gaussian_log_prob_and_reaches_eps_only_through_mean():
    sampler = SDEDPMSolver(20)
    x_t = torch.randn(3, 4, 8, 8)
    for i in (0, 10, 19):
        eps = torch.randn(3, 4, 8, 8, requires_grad=True)
        prev = sampler.step_with_score(eps, i, x_t, generator=torch.Generator().manual_seed(i)).prev_sample
        prev = prev.clone().requires_grad_()
        out = sampler.step_with_score(eps, i, x_t, prev_sample=prev)

        log_prob = torch.distributions.Normal(out.prev_sample_mean.detach(), out.std).log_prob(prev).sum()
        (autograd_score,) = torch.autograd.grad(log_prob, prev)
        torch.testing.assert_close(out.score, autograd_score, rtol=1e-4, atol=1e-3)

        # x_{t-1} is detached inside the score; ε's gradient is the mean's divided by std².
        assert torch.autograd.grad(out.score.sum(), prev, retain_graph=True, allow_unused=True)[0] is None
        (grad_score,) = torch.autograd.grad(out.score.sum(), eps, retain_graph=True)
        (grad_mean,) = torch.autograd.grad(out.prev_sample_mean.sum(), eps)
        torch.testing.assert_close(grad_score, grad_mean / out.std**2)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_eta_family_mean_is_ddim_form_with_the_reported_std(eta):
    # μ = √ᾱ_{t-1} x̂0 + √(1 − ᾱ_{t-1} − std²) ε, std = η·(the SDE-DPM-Solver++ std): for every η the step
    # puts x_{t-1} on the forward marginal of x̂0, and η only trades deterministic ε for fresh noise.
    sampler, full_noise = SDEDPMSolver(20, eta=eta), SDEDPMSolver(20, eta=1.0)
    x_t, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for i in (0, 9, 19):
        out = sampler.step_with_score(eps, i, x_t, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out.std, eta * full_noise.step_with_score(eps, i, x_t).std)
        alpha_bar_prev = sampler.alphas_cumprod_at(sampler.prev_timesteps[i])
        x0_hat = predict_x0(eps, x_t, sampler.timesteps[i], sampler.alphas_cumprod)
        expected = alpha_bar_prev.sqrt() * x0_hat + (1 - alpha_bar_prev - out.std**2).sqrt() * eps
        torch.testing.assert_close(out.prev_sample_mean, expected, rtol=1e-4, atol=1e-4)
        assert (out.score is None) == (eta == 0.0)


def test_sampled_transitions_follow_the_reported_gaussian():
    sampler = SDEDPMSolver(20)
    x_t, eps = torch.randn(8, 4, 16, 16), torch.randn(8, 4, 16, 16)
    for i in (0, 19):
        out = sampler.step_with_score(eps, i, x_t, generator=torch.Generator().manual_seed(3))
        z = (out.prev_sample - out.prev_sample_mean) / out.std  # the standard normal draw, recovered
        torch.testing.assert_close(z, torch.randn(x_t.shape, generator=torch.Generator().manual_seed(3)),
                                   rtol=0, atol=1e-4)


@pytest.mark.parametrize("config", [{}, ZERO_SNR])
def test_predict_x0_recovers_noised_x0(config):
    sampler = SDEDPMSolver(20, **config)
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 50, 500, 999])
    x_t = sampler.add_noise(x0, noise, t)
    eps = noise.clone().requires_grad_()
    x0_hat = predict_x0(eps, x_t, t, sampler.alphas_cumprod)
    assert x0_hat.grad_fn is not None  # the caller's network Jacobian stays in the graph
    torch.testing.assert_close(x0_hat[:3], x0[:3], rtol=0, atol=1e-4)
    # At t = 999, x0's share of x_t is √ᾱ (1/157, or 2**-12 with zero SNR): float32 ulps of x_t are amplified.
    torch.testing.assert_close(x0_hat[3], x0[3], rtol=0, atol=1e-2 if config else 1e-3)

    # The reference's DPM quirk reads ᾱ one solver step cleaner (clamped at 1).
    shifted = predict_x0(noise, x_t, t, sampler.alphas_cumprod, timestep_shift=sampler.dt)
    torch.testing.assert_close(shifted, predict_x0(noise, x_t, (t - sampler.dt).clamp(min=1), sampler.alphas_cumprod))


def test_rollout_records_reproduce_the_trajectory():
    net, sampler = TinyLearnedSigmaNet(), SDEDPMSolver(7)
    x_T = torch.randn(2, 4, 8, 8)
    traj = sample_trajectory(net, x_T, sampler, generator=torch.Generator().manual_seed(5))
    assert traj.latents.shape == (8, 2, 4, 8, 8) and traj.model_outputs.shape == (7, 2, 8, 8, 8)
    assert torch.equal(traj.timesteps, sampler.timesteps) and torch.equal(traj.latents[0], x_T)

    generator = torch.Generator().manual_seed(5)
    for i in range(7):
        x_t = traj.latents[i]
        with torch.no_grad():
            assert torch.equal(net(x_t, traj.timesteps[i]), traj.model_outputs[i])
        eps = eps_from_output(traj.model_outputs[i], x_t)
        replay = sampler.step_with_score(eps, i, x_t, generator=generator)  # same noise stream
        assert torch.equal(replay.prev_sample, traj.latents[i + 1])
        scored = sampler.step_with_score(eps, i, x_t, prev_sample=traj.latents[i + 1])
        assert torch.equal(scored.prev_sample_mean, replay.prev_sample_mean)
        assert scored.score.abs().max() < 10 / scored.std  # |z| < 10: the recorded noise is plausible


def gaussian_start(n, sampler_alphas_cumprod, t):
    """x_T from the exact marginal of the Gaussian data at timestep t."""
    alpha_bar = sampler_alphas_cumprod[t]
    std = (alpha_bar * DATA_STD**2 + 1 - alpha_bar).sqrt()
    return alpha_bar.sqrt() * DATA_MEAN + std * torch.randn(n, 2, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("num_steps, std_tol", [(20, 0.08), (100, 0.02)])
def test_ode_sampler_reproduces_gaussian_data(num_steps, std_tol):
    alphas_cumprod = SDEDPMSolver().alphas_cumprod
    x_T = gaussian_start(8000, alphas_cumprod, 999)
    x0 = ode_sample(gaussian_oracle(alphas_cumprod), x_T, num_steps).latents[-1]
    torch.testing.assert_close(x0.mean(0), DATA_MEAN, rtol=0, atol=0.05)
    torch.testing.assert_close(x0.std(0), DATA_STD, rtol=std_tol, atol=0)


def test_sde_sampler_reproduces_gaussian_data():
    # First-order SDE-DPM-Solver++ under-disperses on coarse grids (~20% at 20 steps on this data),
    # so the distribution check uses a fine grid; the 20-step math is pinned against diffusers above.
    sampler = SDEDPMSolver(999)
    x_T = gaussian_start(8000, sampler.alphas_cumprod, 999)
    traj = sample_trajectory(gaussian_oracle(sampler.alphas_cumprod), x_T, sampler,
                             generator=torch.Generator().manual_seed(1))
    x0 = traj.latents[-1]
    torch.testing.assert_close(x0.mean(0), DATA_MEAN, rtol=0, atol=0.05)
    torch.testing.assert_close(x0.std(0), DATA_STD, rtol=0.03, atol=0)


@pytest.mark.parametrize("config", [{}, ZERO_SNR])
@pytest.mark.parametrize("num_steps", [1, 7, 20])
def test_first_and_last_steps_are_finite(config, num_steps):
    sampler = SDEDPMSolver(num_steps, **config)
    assert sampler.timesteps.shape == (num_steps,) and sampler.alphas_cumprod.shape == (1000,)
    assert sampler.prev_timesteps[-1] == 0 and (sampler.prev_timesteps < sampler.timesteps).all()
    # The ᾱ of each step's target is the one the step uses (the final sigma_min is ᾱ[0]'s).
    sigmas = sampler.scheduler.sigmas[1:]
    torch.testing.assert_close(sampler.alphas_cumprod_at(sampler.prev_timesteps), 1 / (1 + sigmas**2))

    x = torch.randn(2, 4, 8, 8)
    for i in sorted({0, num_steps - 1}):
        out = sampler.step_with_score(torch.randn(2, 4, 8, 8), i, x, generator=torch.Generator().manual_seed(0))
        for tensor in (out.prev_sample, out.prev_sample_mean, out.score, out.std):
            assert torch.isfinite(tensor).all()
        assert out.std > 0
        x0_hat = predict_x0(torch.randn(2, 4, 8, 8), x, sampler.timesteps[i], sampler.alphas_cumprod)
        assert torch.isfinite(x0_hat).all()
    traj = ode_sample(lambda x, t: torch.randn_like(x), x, num_steps, **config)
    assert torch.isfinite(traj.latents).all()


def test_accessors_match_the_reference_schedule():
    sampler = SDEDPMSolver(20)
    assert sampler.timesteps[0] == 999 and sampler.timesteps[-1] == 50 and sampler.dt == 50
    # A config saved by diffusers (another algorithm/order) is accepted; the sampler's own choices win.
    saved = dict(DPMSolverMultistepScheduler(**PIXART_SIGMA_SCHEDULER_CONFIG).config)
    forced = SDEDPMSolver(20, **saved).scheduler.config
    assert (forced.algorithm_type, forced.solver_order, forced.final_sigmas_type) == ("sde-dpmsolver++", 1, "sigma_min")


def test_bad_inputs_raise_value_errors_naming_the_argument():
    sampler = SDEDPMSolver(20)
    x = torch.randn(2, 4, 8, 8)
    cases = [
        (lambda: SDEDPMSolver(0), "num_inference_steps"),
        (lambda: SDEDPMSolver(1000), "num_inference_steps"),
        (lambda: SDEDPMSolver(eta=1.5), "eta"),
        (lambda: SDEDPMSolver(prediction_type="v_prediction"), "prediction_type"),
        (lambda: sampler.step_with_score(x, 20, x), "step_index"),
        (lambda: sampler.step_with_score(x[:, :2], 0, x), "eps"),
        (lambda: sampler.step_with_score(x, 0, x, prev_sample=x[:1]), "prev_sample"),
        (lambda: SDEDPMSolver(eta=0.0).step_with_score(x, 0, x, prev_sample=x), "prev_sample"),
        (lambda: predict_x0(x, x, torch.tensor([1, 2, 3]), sampler.alphas_cumprod), "t"),
        (lambda: predict_x0(x, x, 1000, sampler.alphas_cumprod), "t"),
        (lambda: sampler.add_noise(x, x[:1], 5), "noise"),
        (lambda: eps_from_output(torch.randn(2, 6, 8, 8), x), "model output"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()
