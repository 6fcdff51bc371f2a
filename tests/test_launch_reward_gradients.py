"""A run whose algorithm trains on reward gradients refuses a value-only reward before it starts
(r2d3ray/train/launch.py's reward-app check, which every `r2d3ray train` and its --dry-run go through)."""
import pytest
import torch
import yaml

from r2d3ray.config import build_config
from r2d3ray.rewards.base import RewardModel
from r2d3ray.rewards.registry import available_rewards, register_reward, reward_class
from r2d3ray.train.launch import LaunchError, _check_reward_app


@register_reward("value_only_for_launch_test")
class ValueOnlyReward(RewardModel):
    """A reward with values only, as a non-differentiable scorer (an API, a detector) would be."""

    name = "value_only_for_launch_test"
    differentiable = False

    def forward(self, images, prompts, extras):
        return images.mean((2, 3, 4))


@pytest.fixture
def app_config(tmp_path):
    app = {"app_name": "rewards", "deployments": [
        {"name": "color_match", "reward": "color_match", "num_cpus": 0},
        {"name": "judge", "reward": "value_only_for_launch_test", "num_cpus": 0},
    ]}  # fmt: skip
    path = tmp_path / "rewards.yaml"
    path.write_text(yaml.safe_dump(app))
    return path


def run_config(app_config, algorithm, terms):
    return build_config({}, [f"rewards.app_config={app_config}", f"algorithm.name={algorithm}", f"rewards.terms={terms}"])


@pytest.mark.parametrize("algorithm", ["nabla", "reward_backprop"])
def test_gradient_algorithms_refuse_a_value_only_reward_naming_both(app_config, algorithm):
    with pytest.raises(LaunchError) as info:
        _check_reward_app(run_config(app_config, algorithm, "[{name: color_match}, {name: judge}]"))
    message = str(info.value)
    assert f"algorithm {algorithm!r} trains on reward gradients" in message
    assert "reward term 'judge' (reward 'value_only_for_launch_test') has values only" in message
    assert "algorithm.name=nft" in message


def test_nft_and_grpo_take_every_reward_and_gradient_algorithms_take_differentiable_ones(app_config):
    _check_reward_app(run_config(app_config, "nft", "[{name: color_match}, {name: judge}]"))
    _check_reward_app(run_config(app_config, "grpo", "[{name: color_match}, {name: judge}]"))
    _check_reward_app(run_config(app_config, "nabla", "[{name: color_match}]"))


def test_scoring_a_value_only_reward_with_gradients_is_refused():
    reward = ValueOnlyReward()
    images = torch.full((1, 1, 3, 4, 4), 0.5)
    assert reward.score(images, ["a red cube"]).values.shape == (1, 1)
    with pytest.raises(ValueError, match="has values only"):
        reward.score(images, ["a red cube"], with_grad=True)


def test_every_built_in_reward_but_the_external_servers_declares_a_gradient():
    # The shipped models are differentiable (the geometry ones with respect to their render extras);
    # rewards answered by an HTTP server are values only.
    shipped = [name for name in available_rewards() if name != "value_only_for_launch_test"]
    external = {"external_scorer", "external_judge"}
    assert {"pickscore", "imagereward", "clipscore"} | external <= set(shipped)
    assert all(reward_class(name).differentiable for name in shipped if name not in external)
    assert not any(reward_class(name).differentiable for name in external)


def test_nabla_and_a_dnc_deployment_must_agree_on_the_reward_context(tmp_path):
    app = {"app_name": "rewards", "deployments": [
        {"name": "dnc", "reward": "dnc", "num_cpus": 0, "kwargs": {"reward_context": "inference"}}]}
    path = tmp_path / "rewards.yaml"
    path.write_text(yaml.safe_dump(app))
    with pytest.raises(LaunchError, match="reward_context is 'train' but reward term 'dnc' is deployed with "
                                          "reward_context 'inference'"):
        _check_reward_app(run_config(path, "nabla", "[{name: dnc}]"))
    agreeing = build_config({}, [f"rewards.app_config={path}", "rewards.terms=[{name: dnc}]",
                                 "algorithm.nabla.reward_context=inference"])
    _check_reward_app(agreeing)
