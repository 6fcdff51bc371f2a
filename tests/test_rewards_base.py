"""The reward interface (validation, float32, gradients, non-finite handling), the registry, building
an app config's rewards, and the combiner (weights, aggregation, memory-efficient views, noise)."""

import os
import subprocess
import sys

import pytest
import torch

from r2d3ray.config import ConfigError, load_reward_app_config
from r2d3ray.rewards import (
    CombinedReward,
    NonFiniteRewardError,
    RewardCombiner,
    RewardModel,
    available_rewards,
    build_reward,
    register_reward,
    rewards_from_app_config,
)


class Contrast(RewardModel):
    """A small nonlinear per-view reward: weighted mean of (pixel - 0.3)², prompt length as a scale."""

    name = "contrast"

    def __init__(self):
        super().__init__()
        self.seen_dtype = None

    def forward(self, images, prompts, extras):
        self.seen_dtype = images.dtype
        scale = torch.tensor([len(p) for p in prompts], dtype=images.dtype, device=images.device)
        ramp = torch.linspace(0.5, 1.5, images.shape[-1], dtype=images.dtype)
        return ((images - 0.3) ** 2 * ramp).mean((2, 3, 4)) * scale[:, None]


class DepthWeighted(RewardModel):
    """Reads alphas and depths and is differentiated w.r.t. depths (like a geometry reward)."""

    name = "depth_weighted"
    needs = frozenset({"alphas", "depths"})
    grad_extras = frozenset({"depths"})

    def forward(self, images, prompts, extras):
        return (images.mean(2, keepdim=True) * extras["alphas"] * extras["depths"].sin()).mean((2, 3, 4))


class Brightness(RewardModel):
    """Linear in the images: its gradient does not depend on where it is evaluated."""

    name = "brightness"

    def forward(self, images, prompts, extras):
        return images.mean((2, 3, 4))


class LogDarkness(RewardModel):
    """log(0.5 - mean): NaN for views brighter than 0.5, to exercise non-finite handling."""

    name = "log_darkness"

    def forward(self, images, prompts, extras):
        return torch.log(0.5 - images.mean((2, 3, 4)))


def directional_fd(fn, x, direction, eps=1e-6):
    """Central finite difference of sum(fn(x)) along ``direction`` (float64)."""
    return (fn(x + eps * direction).sum() - fn(x - eps * direction).sum()) / (2 * eps)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def test_score_shapes_and_gradient_match_finite_differences(gen):
    images = torch.rand(2, 3, 3, 6, 5, generator=gen, dtype=torch.float64)
    prompts = ["a red cube", "a cone"]
    reward = Contrast()
    out = reward.score(images, prompts, with_grad=True)
    assert out.values.shape == (2, 3) and out.grads.shape == images.shape
    assert not images.requires_grad
    for _ in range(3):
        d = torch.randn(images.shape, generator=gen, dtype=torch.float64)
        fd = directional_fd(lambda x: reward.score(x, prompts).values, images, d)
        assert torch.allclose((out.grads * d).sum(), fd, rtol=1e-6, atol=1e-9)
    # Without with_grad: no gradient, same values.
    plain = reward.score(images, prompts)
    assert plain.grads is None and plain.extra_grads == {}
    assert torch.allclose(plain.values, out.values)


def test_extra_gradients_match_finite_differences(gen):
    B, V, H, W = 1, 2, 4, 4
    images = torch.rand(B, V, 3, H, W, generator=gen, dtype=torch.float64)
    extras = {
        "alphas": torch.rand(B, V, 1, H, W, generator=gen, dtype=torch.float64),
        "depths": 1 + torch.rand(B, V, 1, H, W, generator=gen, dtype=torch.float64),
        "normals": torch.zeros(B, V, 3, H, W, dtype=torch.float64),  # not needed: ignored
    }
    reward = DepthWeighted()
    out = reward.score(images, ["p"], extras, with_grad=True)
    assert set(out.extra_grads) == {"depths"}
    assert out.extra_grads["depths"].shape == extras["depths"].shape
    d = torch.randn(extras["depths"].shape, generator=gen, dtype=torch.float64)
    fd = directional_fd(lambda z: reward.score(images, ["p"], {**extras, "depths": z}).values, extras["depths"], d)
    assert torch.allclose((out.extra_grads["depths"] * d).sum(), fd, rtol=1e-6)
    d = torch.randn(images.shape, generator=gen, dtype=torch.float64)
    fd = directional_fd(lambda x: reward.score(x, ["p"], extras).values, images, d)
    assert torch.allclose((out.grads * d).sum(), fd, rtol=1e-6)


def test_reward_math_runs_in_float32_under_autocast(gen):
    images = torch.rand(1, 2, 3, 4, 4, generator=gen).to(torch.bfloat16)
    reward = Contrast()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = reward.score(images, ["abc"], with_grad=True)
    assert reward.seen_dtype == torch.float32
    assert out.values.dtype == torch.float32 and out.grads.dtype == torch.float32


@pytest.mark.parametrize(
    "images, prompts, extras, match",
    [
        (torch.rand(2, 3, 8, 8), ["a", "b"], None, r"\(B, V, 3, H, W\)"),
        (torch.rand(2, 1, 4, 8, 8), ["a", "b"], None, r"\(B, V, 3, H, W\)"),
        (torch.randint(0, 255, (2, 1, 3, 8, 8)), ["a", "b"], None, "float"),
        (torch.rand(2, 1, 3, 8, 8) * 255, ["a", "b"], None, r"\[0, 1\].*max"),
        (torch.rand(2, 1, 3, 8, 8) * 2 - 1, ["a", "b"], None, r"\[0, 1\].*min"),
        (torch.full((2, 1, 3, 8, 8), float("nan")), ["a", "b"], None, "NaN"),
        (torch.rand(2, 1, 3, 8, 8), ["a"], None, "B=2"),
        (torch.rand(2, 1, 3, 8, 8), "a b", None, "list of 2 strings"),
        (torch.rand(2, 1, 3, 8, 8), ["a", "b"], None, r"missing \['alphas', 'depths'\]"),
        (torch.rand(2, 1, 3, 8, 8), ["a", "b"], {"alphas": torch.rand(2, 1, 1, 8, 8)}, r"missing \['depths'\]"),
        (
            torch.rand(2, 1, 3, 8, 8),
            ["a", "b"],
            {"alphas": torch.rand(2, 1, 1, 8, 8), "depths": torch.rand(2, 1, 8, 8)},
            r"extras\['depths'\] must have shape \(2, 1, 1, 8, 8\)",
        ),
    ],
)
def test_bad_inputs_raise_value_errors(images, prompts, extras, match):
    with pytest.raises(ValueError, match=match):
        DepthWeighted().score(images, prompts, extras)


def test_tiny_range_excursions_are_tolerated():
    images = torch.ones(1, 1, 3, 4, 4)
    images[0, 0, 0, 0, 0] = 1 + 1e-2  # e.g. the 2e-3 scoring noise at 5 sigma
    images[0, 0, 1, 0, 0] = -1e-2
    assert Brightness().score(images, ["x"]).values.shape == (1, 1)


def test_non_finite_views_are_flagged_zeroed_and_raise_on_check():
    images = torch.full((2, 2, 3, 4, 4), 0.2)
    images[1, 0] = 0.9  # mean > 0.5: log of a negative number
    with pytest.warns(RuntimeWarning, match="1 of 4 views"):
        out = LogDarkness().score(images, ["a", "b"], with_grad=True)
    assert out.finite.tolist() == [[True, True], [False, True]]
    assert torch.isnan(out.values[1, 0])  # the raw value is kept for the logs
    assert (out.grads[1, 0] == 0).all() and (out.grads[0, 0] != 0).all()
    with pytest.raises(NonFiniteRewardError, match=r"\[\[1, 0\]\]"):
        out.check_finite("log_darkness")
    fine = LogDarkness().score(images[:1], ["a"], with_grad=True)
    assert fine.check_finite() is fine


def test_forward_with_wrong_output_shape_is_reported():
    class PerObject(RewardModel):
        def forward(self, images, prompts, extras):
            return images.mean((1, 2, 3, 4))

    with pytest.raises(RuntimeError, match=r"expected \(B, V\) = \(1, 2\)"):
        PerObject().score(torch.rand(1, 2, 3, 4, 4), ["x"])


def test_registry_builds_known_names_and_lists_them_for_unknown_ones():
    assert {"color_match", "colorfulness", "dnc", "hps", "aesthetic", "normal"} <= set(available_rewards())
    register_reward("test_contrast")(Contrast)
    assert isinstance(build_reward("test_contrast"), Contrast)
    assert type(build_reward("color_match")).__name__ == "ColorAgreementReward"  # imported on demand
    with pytest.raises(ValueError, match=r"unknown reward 'hsp'; known rewards: aesthetic, .*color_match, .*dnc, .*hps, imagereward"):
        build_reward("hsp")
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_contrast")(Brightness)


def test_a_script_run_as_main_and_imported_by_name_registers_its_reward_once(tmp_path):
    # A benchmark script defines its reward and its replicas import it as `bench_x:name`; run as a
    # script, the driver imports it a second time under its module name.
    script = tmp_path / "bench_x.py"
    script.write_text(
        "from r2d3ray.rewards.base import RewardModel\n"
        "from r2d3ray.rewards.registry import build_reward, register_reward\n"
        "@register_reward('bench_x_mean')\n"
        "class Mean(RewardModel):\n"
        "    name = 'bench_x_mean'\n"
        "    def forward(self, images, prompts, extras):\n"
        "        return images.mean((2, 3, 4))\n"
        "if __name__ == '__main__':\n"
        "    print(type(build_reward('bench_x:bench_x_mean')).__name__)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Mean"


def test_a_reward_from_another_package_is_named_module_colon_name(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "import torch\n"
        "from r2d3ray.rewards.base import RewardModel\n"
        "from r2d3ray.rewards.registry import register_reward\n"
        "@register_reward('my_mean')\n"
        "class MyMean(RewardModel):\n"
        "    name = 'my_mean'\n"
        "    def forward(self, images, prompts, extras):\n"
        "        return images.mean((2, 3, 4))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert type(build_reward("my_rewards:my_mean")).__name__ == "MyMean"
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg'"):
        build_reward("no_such_pkg:x")


def test_combined_weights_and_mean_aggregation(gen):
    images = torch.rand(2, 3, 3, 5, 5, generator=gen, dtype=torch.float64)
    prompts = ["ab", "abcd"]
    a, b = Contrast(), Brightness()
    combined = CombinedReward({"contrast": a, "brightness": b}, {"contrast": 2.0, "brightness": -0.5})
    out = combined.score(images, prompts, with_grad=True)
    ra, rb = a.score(images, prompts, with_grad=True), b.score(images, prompts, with_grad=True)
    assert torch.allclose(out.components["contrast"], ra.values)
    assert torch.allclose(out.components["brightness"], rb.values)
    assert torch.allclose(out.view_rewards, 2.0 * ra.values - 0.5 * rb.values)
    assert torch.allclose(out.rewards, (2.0 * ra.values - 0.5 * rb.values).mean(1))
    assert torch.allclose(out.grads, (2.0 * ra.grads - 0.5 * rb.grads) / 3)
    assert out.scored.all() and out.finite.all()
    d = torch.randn(images.shape, generator=gen, dtype=torch.float64)
    fd = directional_fd(lambda x: combined.score(x, prompts).rewards, images, d)
    assert torch.allclose((out.grads * d).sum(), fd, rtol=1e-6)


def test_combined_max_aggregation_takes_the_best_views_gradient(gen):
    images = torch.rand(2, 4, 3, 5, 5, generator=gen, dtype=torch.float64)
    reward = Contrast()
    out = CombinedReward({"contrast": reward}, aggregate="max").score(images, ["a", "b"], with_grad=True)
    single = reward.score(images, ["a", "b"], with_grad=True)
    best = single.values.argmax(1)
    assert torch.allclose(out.rewards, single.values.max(1).values)
    for i in range(2):
        for v in range(4):
            expected = single.grads[i, v] if v == best[i] else torch.zeros_like(single.grads[i, v])
            assert torch.equal(out.grads[i, v], expected)


def test_memory_efficient_mode_scores_k_seeded_views_and_zeroes_the_rest(gen):
    images = torch.rand(3, 4, 3, 5, 5, generator=gen, dtype=torch.float64)
    prompts = ["a", "bb", "ccc"]

    def make(seed):
        return CombinedReward({"contrast": Contrast()}, views_per_sample=2, seed=seed)

    out = make(7).score(images, prompts, with_grad=True)
    full = Contrast().score(images, prompts, with_grad=True)
    assert out.scored.sum(1).tolist() == [2, 2, 2]
    scored = out.scored[:, :, None, None, None]
    assert (out.grads.masked_select(~scored) == 0).all()
    assert torch.allclose(out.grads, torch.where(scored, full.grads / 2, 0.0))
    assert torch.isnan(out.components["contrast"][~out.scored]).all()
    assert torch.allclose(out.components["contrast"][out.scored], full.values[out.scored])
    means = torch.stack([full.values[i][out.scored[i]].mean() for i in range(3)])
    assert torch.allclose(out.rewards, means)
    # Seeded: the same seed draws the same views; the generator moves on between calls.
    assert torch.equal(make(7).score(images, prompts).scored, out.scored)
    reward = make(7)
    draws = {tuple(reward.score(images, prompts).scored.flatten().tolist()) for _ in range(6)}
    assert len(draws) > 1


def test_noise_is_seeded_keeps_the_gradient_of_the_clean_images_and_tolerates_white(gen):
    images = torch.ones(2, 2, 3, 6, 6)  # an all-white render: noise pushes it past 1
    images[:, :, :, 2:4, 2:4] = 0.3
    noisy = CombinedReward({"brightness": Brightness()}, noise_std=2e-3, seed=3)
    out = noisy.score(images, ["a", "b"], with_grad=True)
    clean = CombinedReward({"brightness": Brightness()}).score(images, ["a", "b"], with_grad=True)
    assert out.grads.shape == images.shape
    assert torch.allclose(out.grads, clean.grads)  # linear reward: the gradient ignores the noise
    assert not torch.equal(out.rewards, clean.rewards)
    assert (out.rewards - clean.rewards).abs().max() < 1e-3
    again = CombinedReward({"brightness": Brightness()}, noise_std=2e-3, seed=3).score(images, ["a", "b"])
    assert torch.equal(again.rewards, out.rewards)
    # Noise far beyond the reference's is clamped to what the rewards accept, not rejected.
    loud = CombinedReward({"brightness": Brightness()}, noise_std=0.1).score(images, ["a", "b"], with_grad=True)
    assert loud.finite.all()


def test_combined_extras_are_the_union_and_extra_grads_are_aggregated(gen):
    B, V, H, W = 1, 2, 4, 4
    images = torch.rand(B, V, 3, H, W, generator=gen, dtype=torch.float64)
    extras = {
        "alphas": torch.rand(B, V, 1, H, W, generator=gen, dtype=torch.float64),
        "depths": torch.rand(B, V, 1, H, W, generator=gen, dtype=torch.float64),
    }
    depth = DepthWeighted()
    combined = CombinedReward({"d": depth, "b": Brightness()}, {"d": 3.0})
    assert combined.needs == {"alphas", "depths"} and combined.grad_extras == {"depths"}
    out = combined.score(images, ["x"], extras, with_grad=True)
    single = depth.score(images, ["x"], extras, with_grad=True)
    assert torch.allclose(out.extra_grads["depths"], 3.0 * single.extra_grads["depths"] / V)
    with pytest.raises(ValueError, match=r"CombinedReward: extras is missing \['depths'\]"):
        combined.score(images, ["x"], {"alphas": extras["alphas"]})


def test_combined_non_finite_objects_get_no_gradient_and_are_named():
    images = torch.full((2, 2, 3, 4, 4), 0.2)
    images[1, 1] = 0.9
    combined = CombinedReward({"dark": LogDarkness(), "bright": Brightness()})
    with pytest.warns(RuntimeWarning):
        out = combined.score(images, ["a", "b"], with_grad=True)
    assert out.finite.tolist() == [True, False]
    assert (out.grads[1] == 0).all() and (out.grads[0] != 0).any()
    with pytest.raises(NonFiniteRewardError, match=r"objects \[1\].*\['dark'\]"):
        out.check_finite()


def test_combined_from_config_terms_and_bad_arguments():
    terms = [{"name": "color_match", "weight": 2.0, "kwargs": {"sigma": 0.4}}, {"name": "colorfulness"}]
    combined = CombinedReward.from_terms(terms, aggregate="max", views_per_sample=0)
    assert combined.weights == {"color_match": 2.0, "colorfulness": 1.0}
    assert combined.rewards["color_match"].sigma == 0.4 and combined.aggregate == "max"
    assert combined.combiner.views_per_sample is None  # 0 = all views, as in RewardsConfig
    with pytest.raises(ValueError, match="each reward once"):
        CombinedReward.from_terms([{"name": "colorfulness"}, {"name": "colorfulness", "weight": 2}])
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        CombinedReward.from_terms([{"name": "nope"}])
    with pytest.raises(ValueError, match="aggregate='median'"):
        CombinedReward({"b": Brightness()}, aggregate="median")
    with pytest.raises(ValueError, match=r"weights name \['c'\]"):
        CombinedReward({"b": Brightness()}, {"c": 1.0})
    with pytest.raises(ValueError, match="views_per_sample=-1"):
        CombinedReward({"b": Brightness()}, views_per_sample=-1)
    with pytest.raises(ValueError, match="rewards is empty"):
        CombinedReward({})


def test_combined_view_with_a_non_finite_gradient_makes_its_object_untrusted(gen):
    """A view whose value is finite but whose gradient is not: the reward zeroes that gradient and
    flags the view, and the combined answer trusts no part of that object."""

    class SqrtDistance(RewardModel):  # sqrt(|x - 0.5|) summed: an infinite gradient at exactly 0.5
        name = "sqrt_distance"

        def forward(self, images, prompts, extras):
            return (images - 0.5).abs().sqrt().mean((2, 3, 4))

    images = torch.rand(2, 2, 3, 4, 4, generator=gen)
    images[1, 0, 0, 0, 0] = 0.5
    with pytest.warns(RuntimeWarning):
        out = CombinedReward({"s": SqrtDistance()}).score(images, ["a", "b"], with_grad=True)
    assert torch.isfinite(out.rewards).all() and out.finite.tolist() == [True, False]
    assert (out.grads[1] == 0).all() and (out.grads[0] != 0).any()
    with pytest.raises(NonFiniteRewardError, match=r"objects \[1\].*none \(a gradient\)"):
        out.check_finite()


def test_selecting_every_view_without_noise_passes_the_tensors_themselves(gen):
    images = torch.rand(2, 3, 3, 4, 4, generator=gen)
    alphas = torch.rand(2, 3, 1, 4, 4, generator=gen)
    combiner = RewardCombiner({"a": 1.0}, needs=frozenset({"alphas"}))
    selection = combiner.select(images, ["x", "y"], {"alphas": alphas, "depths": alphas})
    assert selection.images is images and selection.extras == {"alphas": alphas}  # no copy, unread extras dropped
    assert selection.all_views and selection.views.tolist() == [[0, 1, 2]] * 2
    noisy = RewardCombiner({"a": 1.0}, noise_std=1e-3).select(images, ["x", "y"], None)
    assert noisy.images is not images and noisy.all_views


def test_rewards_from_app_config_builds_the_named_deployments(tmp_path):
    app = tmp_path / "rewards.yaml"
    app.write_text("deployments:\n"
                   "  - {name: colors, reward: color_match, kwargs: {sigma: 0.4}}\n"
                   "  - {name: vivid, reward: colorfulness}\n")
    rewards = rewards_from_app_config(app, ["colors"])
    assert list(rewards) == ["colors"] and rewards["colors"].sigma == 0.4 and not rewards["colors"].training
    assert list(rewards_from_app_config(load_reward_app_config(app), device="cpu")) == ["colors", "vivid"]
    with pytest.raises(ConfigError, match=r"rewards.terms name \['hps'\], which the reward app .* does not define "
                                          r"\(it has: colors, vivid\)"):
        rewards_from_app_config(app, ["colors", "hps"])
