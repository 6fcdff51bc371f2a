"""Reward names -> classes, and building rewards in this process.

``build_reward("dnc", reward_context="inference")`` builds one reward by name;
``rewards_from_app_config`` builds a reward app config's rewards (what its Serve deployments
serve) in this process. Weighting several of them into one objective is r2d3ray/rewards/combiner.py's.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from r2d3ray.config import ConfigError, RewardAppConfig, load_reward_app_config
from r2d3ray.rewards.base import RewardModel

_REGISTRY: dict[str, Callable[..., RewardModel]] = {}
# Built-in rewards by the module that registers them, imported only when the name is asked for:
# the learned ones pull in open_clip/diffusers, which a toy run should not pay for.
_BUILTIN_MODULES: dict[str, str] = {
    "color_match": "r2d3ray.rewards.toy",
    "colorfulness": "r2d3ray.rewards.toy",
    "dnc": "r2d3ray.rewards.dnc",
    "hps": "r2d3ray.rewards.hps",
    "aesthetic": "r2d3ray.rewards.aesthetic",
    "pickscore": "r2d3ray.rewards.pickscore",
    "imagereward": "r2d3ray.rewards.imagereward",
    "clipscore": "r2d3ray.rewards.clipscore",
    "normal": "r2d3ray.rewards.normal",
    "tiny_critic": "r2d3ray.rewards.critic",
    "external_scorer": "r2d3ray.rewards.external",
    "external_judge": "r2d3ray.rewards.external",
}


def register_reward(name: str):
    """Class/factory decorator: ``@register_reward("hps")`` makes ``build_reward("hps", ...)`` call it."""

    def decorator(factory):
        if not _same_definition(_REGISTRY.get(name, factory), factory):
            raise ValueError(f"reward name {name!r} is already registered to {_REGISTRY[name]!r}")
        _REGISTRY[name] = factory
        return factory

    return decorator


def _same_definition(a: Callable, b: Callable) -> bool:
    """One definition seen twice: a script run as `__main__` that is also imported under its own
    module name (a benchmark whose replica imports it by `file:reward`) defines its class twice."""
    if a is b:
        return True
    try:
        return a.__qualname__ == b.__qualname__ and inspect.getsourcefile(a) == inspect.getsourcefile(b)
    except (AttributeError, TypeError):  # builtins and objects without a source file
        return False


def available_rewards() -> list[str]:
    """Every reward name ``build_reward`` accepts."""
    return sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))


def build_reward(name: str, **kwargs) -> RewardModel:
    """Build the reward registered as ``name`` with the factory's keyword arguments."""
    return reward_class(name)(**kwargs)


def reward_class(name: str):
    """The factory registered as ``name`` (its ``needs`` tell a trainer which render channels to send,
    its ``differentiable`` whether a gradient-based algorithm can train on it).

    ``package.module:name`` names a reward registered outside r2d3ray: the module is imported first
    (its ``@register_reward`` runs), then ``name`` is looked up."""
    module, _, name = name.rpartition(":")
    if module:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"reward {module}:{name}: cannot import module {module!r} ({err}); it must be "
                             "importable where the reward runs (installed, or on PYTHONPATH)") from None
    if name not in _REGISTRY and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(available_rewards())}")
    return _REGISTRY[name]


def rewards_from_app_config(app_config: RewardAppConfig | str | Path, names: Iterable[str] | None = None,
                            device: torch.device | str | None = None) -> dict[str, RewardModel]:
    """A reward app's rewards built in this process, as its Serve replicas build them: {deployment
    name: its registered reward with its kwargs, in eval mode}, for ``names`` (default: every
    deployment), on ``device`` (default: the CPU). ``app_config`` is the config or its file."""
    source = app_config if isinstance(app_config, RewardAppConfig) else load_reward_app_config(app_config)
    where = "the reward app" if isinstance(app_config, RewardAppConfig) else f"the reward app {str(app_config)!r}"
    deployments = {d.name: d for d in source.deployments}
    names = list(deployments) if names is None else list(names)
    missing = [name for name in names if name not in deployments]
    if missing:
        raise ConfigError(f"rewards.terms name {missing}, which {where} does not define (it has: "
                          f"{', '.join(sorted(deployments))}); fix one of the two files")
    rewards = {name: build_reward(deployments[name].reward, **deployments[name].kwargs).eval() for name in names}
    return {name: reward.to(device) for name, reward in rewards.items()} if device is not None else rewards
