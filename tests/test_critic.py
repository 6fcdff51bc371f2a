"""The tiny critic: the ``tiny_critic`` reward's contract and gradient, its prompt sensitivity, the
committed weights' ranking on held-out prompts, and deterministic training."""

import json
from pathlib import Path

import pytest
import torch

from r2d3ray.config import ConfigError, read_options
from r2d3ray.models.world import ObjectSpec, cast_rays, parse_prompt, split_prompts
from r2d3ray.render.cameras import orbit_cameras, pixel_rays
from r2d3ray.rewards import build_reward
from r2d3ray.rewards.critic import TINY_CRITIC_DIR, TinyCritic, TinyCriticReward, prompt_indices
from r2d3ray.rewards.critic_data import FAMILIES, RenderBank, compose, geometries, negatives, positives
from r2d3ray.rewards.critic_train import CriticTrainConfig, train_critic
from test_rewards_learned import check_directional_derivatives

REPO = Path(__file__).resolve().parents[1]
# Tiny settings for the training test: a bank of 2 views per kind, 3 steps of 4 pairs.
TINY_TRAINING = dict(steps=3, batch_size=4, splat_views=2, exact_views=1, jitter_views=2, warmup_steps=1,
                     widths=[8, 8], embed_dim=8, num_threads=None, gradient_penalty=10.0)


@pytest.fixture(scope="module")
def reward():
    return build_reward("tiny_critic")


@pytest.fixture(scope="module")
def held_out_bank():
    """Ground-truth-like alpha maps from exact silhouettes of two views per geometry, cheap to make:
    the bank's "splat" kind reuses them (the committed critic accepts both kinds as ground truth)."""
    cameras = orbit_cameras([35.0, 200.0], [5.0, 12.0], width=64, height=64)
    origins, dirs = pixel_rays(cameras)
    hit = cast_rays(geometries(), origins, dirs)[0].float().unsqueeze(2)  # (G, 2, 1, 64, 64)
    return RenderBank(geometries(), hit, hit, hit, torch.zeros(*hit.shape[:2], 3, 64, 64))


def test_scores_have_the_reward_shape_and_dtype(reward):
    assert isinstance(reward, TinyCriticReward) and reward.name == "tiny_critic"
    images = torch.rand(3, 2, 3, 48, 48)  # not the critic's 64²: resized inside
    out = reward.score(images, ["a red cube", "a small blue sphere", "a large tall green cylinder"], with_grad=True)
    assert out.values.shape == (3, 2) and out.values.dtype == torch.float32
    assert out.grads.shape == images.shape and torch.isfinite(out.grads).all() and out.grads.abs().sum() > 0
    assert all(not p.requires_grad for p in reward.parameters())


def test_each_view_is_scored_on_its_own(reward):
    images = torch.rand(2, 3, 3, 64, 64)
    together = reward.score(images, ["a red cube", "a flat purple torus"]).values
    alone = reward.score(images[1:, 2:], ["a flat purple torus"]).values
    torch.testing.assert_close(together[1:, 2:], alone, rtol=1e-5, atol=1e-5)


def test_gradient_matches_finite_differences():
    reward = TinyCriticReward().double()
    x = (0.2 + 0.6 * torch.rand(1, 2, 3, 24, 24, generator=torch.Generator().manual_seed(0))).double()
    out = reward.score(x, ["a small red cube"], with_grad=True)
    check_directional_derivatives(lambda y: reward.score(y, ["a small red cube"]).values.sum(), x, out.grads)


def test_unknown_prompt_words_are_refused(reward):
    with pytest.raises(ValueError, match="tiny_critic: .*unknown word 'teapot'"):
        reward.score(torch.rand(1, 1, 3, 64, 64), ["a red teapot"])


def test_the_prompt_decides_the_score(reward, held_out_bank):
    # A red cube's ground-truth render: "a red cube" fits it, "a blue sphere" does not.
    cube = held_out_bank.exact_alphas[held_out_bank.index(ObjectSpec("red", "cube"))]  # (2, 1, 64, 64)
    images = compose(cube, torch.tensor([[0.85, 0.12, 0.12]]).expand(2, 3))[None]  # (1, 2, 3, 64, 64)
    right = reward.score(images, ["a red cube"]).values
    for wrong in ("a blue sphere", "a blue cube", "a red sphere"):
        assert (right > reward.score(images, [wrong]).values).all(), wrong


def test_committed_weights_rank_ground_truth_over_negatives_on_held_out_prompts(held_out_bank):
    critic = TinyCritic.load(TINY_CRITIC_DIR).eval()
    prompts = split_prompts("held_out")[::8]  # 8 held-out prompts
    specs = [parse_prompt(p) for p in prompts]
    generator = torch.Generator().manual_seed(0)
    words = prompt_indices(specs)
    with torch.no_grad():
        truth = critic(positives(held_out_bank, specs, generator), words)
        for family in ("wrong_shape", "wrong_color", "blur", "haze", "scaled", "fragmented", "mixed"):
            fake = critic(negatives(held_out_bank, specs, [family] * len(specs), generator), words)
            assert (truth > fake).float().mean() >= 0.75, family


def test_negative_families_are_what_they_say(held_out_bank):
    spec = ObjectSpec("red", "cube")
    generator = torch.Generator().manual_seed(0)
    truth = positives(held_out_bank, [spec], generator)
    for family in FAMILIES:
        fake = negatives(held_out_bank, [spec], [family], generator)
        assert fake.shape == truth.shape and fake.min() >= 0 and fake.max() <= 1
        assert (fake - truth).abs().max() > 0.1, family
    with pytest.raises(ValueError, match="family 'noise' is unknown"):
        negatives(held_out_bank, [spec], ["noise"], generator)


def test_training_is_deterministic(tmp_path):
    first = train_critic(TINY_TRAINING, tmp_path / "a", evaluate=False)
    train_critic(TINY_TRAINING, tmp_path / "b", evaluate=False)
    a, b = TinyCritic.load(tmp_path / "a"), TinyCritic.load(tmp_path / "b")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert first["training"]["steps"] == 3
    # The user's own checkpoint loads through the reward's kwarg.
    own = build_reward("tiny_critic", checkpoint=str(tmp_path / "a"))
    assert own.score(torch.rand(1, 1, 3, 64, 64), ["a red cube"]).values.shape == (1, 1)


def test_gradient_penalty_is_the_squared_pixel_gradient_between_the_pairs():
    """For a linear critic f(x) = <w, x> the gradient is w everywhere: the penalty is |w|², whatever
    the pairs and the points drawn between them; for a quadratic one, |2 x̂|² at the drawn x̂."""
    from r2d3ray.rewards.critic_train import interpolate_gradient_penalty

    w = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0))
    truth, fake = torch.rand(5, 3, 4, 4), torch.rand(5, 3, 4, 4)
    words = torch.zeros(5, 4, dtype=torch.long)
    penalty = interpolate_gradient_penalty(lambda x, _: (x * w).sum(dim=(1, 2, 3)), truth, fake, words,
                                           torch.Generator().manual_seed(1))
    torch.testing.assert_close(penalty, w.square().sum())

    mix = torch.rand(5, 1, 1, 1, generator=torch.Generator().manual_seed(2))
    between = mix * truth + (1 - mix) * fake
    penalty = interpolate_gradient_penalty(lambda x, _: x.square().sum(dim=(1, 2, 3)), truth, fake, words,
                                           torch.Generator().manual_seed(2))
    torch.testing.assert_close(penalty, (2 * between).square().sum(dim=(1, 2, 3)).mean())


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="critic config: invalid configuration:\n  unknown key 'stpes'; did you mean 'steps'"):
        train_critic({"stpes": 3}, tmp_path / "critic")
    with pytest.raises(ValueError, match="widths"):
        CriticTrainConfig(widths=[12])
    # The committed critic's training options, and the YAML that made them, still validate.
    saved = json.loads((TINY_CRITIC_DIR / "config.json").read_text())["training"]
    assert CriticTrainConfig.model_validate(saved).model_dump(mode="json") == saved
    options = read_options(REPO / "configs" / "tiny_critic.yaml", [], "critic config", "configs/tiny_critic.yaml")
    assert CriticTrainConfig.model_validate(options).model_dump(mode="json") == saved
    with pytest.raises(FileNotFoundError, match="train-critic"):
        TinyCriticReward(checkpoint=tmp_path)


def test_cli_train_critic_is_listed_and_reports_a_missing_config(tmp_path, capsys):
    from r2d3ray.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "train-critic" in capsys.readouterr().out
    assert main(["train-critic", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "configs/tiny_critic.yaml" in capsys.readouterr().err


def test_gradient_agreement_reports_pairwise_cosines_per_step():
    from r2d3ray.eval.critic import format_report, gradient_agreement

    critic = TinyCritic.load(TINY_CRITIC_DIR)
    agreement = gradient_agreement(critic, num_samples=3, steps=(19, 5))
    assert set(agreement) == {"step_19", "step_5"}
    assert gradient_agreement(critic, num_samples=3, steps=(19, 5)) == agreement  # the LoRA's init is seeded
    for cosine in agreement.values():
        assert -1.0 <= cosine["min"] <= cosine["mean"] <= cosine["max"] <= 1.0
    # The critic is frozen: measuring it leaves no gradient on it.
    assert all(p.grad is None for p in critic.parameters())
    report = format_report({"pairwise": {f: dict(accuracy=1.0, accuracy_se=0.0, negative_score=0.0) for f in FAMILIES}
                            | {"ground_truth_score": 0.0}, "gradient_agreement": agreement})
    assert "sampler step 19: mean" in report
