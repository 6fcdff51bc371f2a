"""The toy alignment benchmark (quick budget): Nabla moves towards p* keeping every mode, NFT raises
the reward, and the report files are written."""

import json

import torch

from scripts import load_script


def test_exact_mixture_eps_is_the_noised_prior_score():
    toy = load_script("benchmarks/toy_alignment.py", "toy_alignment")
    prior = toy.ring_prior()
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    alpha_bar = torch.full((5,), 0.3, dtype=torch.float64)
    # log p_t(x) of the noised mixture, written out independently.
    var = 0.3 * prior.std**2 + 0.7
    diff = x[:, None, :] - 0.3**0.5 * prior.means.double()[None]
    log_p = torch.logsumexp(prior.weights.double().log() - (diff**2).sum(-1) / (2 * var), dim=1)
    (score,) = torch.autograd.grad(log_p.sum(), x)
    assert torch.allclose(prior.eps(x.detach(), alpha_bar), -(0.7**0.5) * score)


def test_tilted_mixture_matches_reweighted_prior_on_a_grid():
    toy = load_script("benchmarks/toy_alignment.py", "toy_alignment")
    prior = toy.ring_prior()
    target = prior.tilted(toy.BETA_TARGET, torch.tensor(toy.REWARD_CENTER), toy.REWARD_LENGTH)
    edges = torch.linspace(-4.5, 4.5, 301, dtype=torch.float64)
    centers = (edges[1:] + edges[:-1]) / 2
    grid = torch.stack(torch.meshgrid(centers, centers, indexing="ij"), dim=-1).reshape(-1, 2)
    prior64 = toy.GaussianMixture2D(prior.means.double(), prior.weights.double(), prior.std)
    tilted = prior64.bin_masses(edges).reshape(-1) * torch.exp(toy.BETA_TARGET * toy.reward(grid))
    tilted = tilted / tilted.sum()
    exact = toy.GaussianMixture2D(target.means.double(), target.weights.double(), target.std).bin_masses(edges)
    assert (tilted - exact.reshape(-1)).abs().sum() < 1e-3


def test_quick_run_nabla_approaches_target_keeping_modes_and_nft_raises_reward(tmp_path):
    toy = load_script("benchmarks/toy_alignment.py", "toy_alignment")
    results = toy.run(tmp_path, quick=True)
    base, nabla, nft = results["base"], results["nabla"], results["nft"]
    assert nabla["kl_to_target"] < base["kl_to_target"]
    assert nabla["modes_kept"] == nabla["modes_total"] == base["modes_total"]
    assert nft["reward_mean"] > base["reward_mean"]
    assert results["grpo"]["reward_mean"] > base["reward_mean"]
    saved = json.loads((tmp_path / "toy_alignment.json").read_text())
    assert set(saved) == {"base", "target_exact", "nabla", "nabla_no_alpha_weighting", "nft", "grpo", "reward_backprop"}
    assert {"reward_mean", "reward_mean_se", "kl_to_target", "modes_kept", "per_seed", "curve"} <= set(saved["nabla"])
    assert [point["epoch"] for point in saved["nabla"]["curve"]] == [5, 10, 15, 20]
    assert (tmp_path / "toy_alignment.png").stat().st_size > 1000
    assert (tmp_path / "toy_alignment_curves.png").stat().st_size > 1000


def test_the_toy_trains_with_the_trainers_algorithm_classes():
    from r2d3ray.train import updates

    toy = load_script("benchmarks/toy_alignment.py", "toy_alignment")
    assert toy.ALGORITHMS is updates.ALGORITHMS and toy.train_epoch is updates.train_epoch
    assert {cfg(0).algorithm.name for _, cfg in toy.methods(quick=True).values()} == set(updates.ALGORITHMS)
