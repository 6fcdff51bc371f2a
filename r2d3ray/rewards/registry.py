"""Reward names -> classes, and the weighted combination the trainers optimise.

``build_reward("dnc", reward_context="inference")`` builds one reward by name.
``CombinedReward`` turns several of them into one per-object objective:

    R_b = aggregate_v  sum_i w_i r_i(b, v)        aggregate = mean (the reference) or max over views

with each reward's own per-view values kept for logging. Like Nabla-R2D3 it can score only k random
views per object (``views_per_sample``; the reference's ``memo_efficient_mode`` scores 2 of 4)
and add N(0, noise_std²) noise to the images before scoring (the reference adds 2e-3·N(0, 1) in
training); the noise is additive, so the gradient w.r.t. the noisy images is the gradient w.r.t.
the clean ones. Its arguments mirror ``RewardsConfig`` (terms, aggregate, views_per_sample,
noise_std): ``CombinedReward.from_terms`` builds it from the config's terms.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from r2d3ray.rewards.base import RANGE_TOLERANCE, NonFiniteRewardError, RewardModel, RewardOutput, validate_inputs

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
}


def register_reward(name: str):
    """Class/factory decorator: ``@register_reward("hps")`` makes ``build_reward("hps", ...)`` call it."""

    def decorator(factory):
        if _REGISTRY.get(name, factory) is not factory:
            raise ValueError(f"reward name {name!r} is already registered to {_REGISTRY[name]!r}")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_rewards() -> list[str]:
    """Every reward name ``build_reward`` accepts."""
    return sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))


def build_reward(name: str, **kwargs) -> RewardModel:
    """Build the reward registered as ``name`` with the factory's keyword arguments."""
    return reward_class(name)(**kwargs)


@dataclass
class CombinedRewardOutput:
    """Result of ``CombinedReward.score`` for B objects × V views.

    rewards: (B,) the per-object objective, weighted and aggregated over the scored views.
    grads: (B, V, 3, H, W) d(rewards.sum())/d images, or None; zero on views not scored.
    extra_grads: {extra: d(rewards.sum())/d extra} for the extras some reward differentiates.
    view_rewards: (B, V) weighted per-view sums, NaN on views not scored.
    components: {reward name: (B, V) that reward's own values}, NaN on views not scored.
    scored: (B, V) bool, the views that were scored.
    """

    rewards: torch.Tensor
    grads: torch.Tensor | None
    extra_grads: dict[str, torch.Tensor]
    view_rewards: torch.Tensor
    components: dict[str, torch.Tensor]
    scored: torch.Tensor
    finite: torch.Tensor = field(init=False)

    def __post_init__(self):
        # (B,) True where the objective and all of that object's gradients are finite.
        ok = torch.isfinite(self.rewards)
        for g in [self.grads, *self.extra_grads.values()]:
            if g is not None:
                ok = ok & torch.isfinite(g).flatten(1).all(-1)
        self.finite = ok

    def check_finite(self) -> CombinedRewardOutput:
        """Return self, or raise NonFiniteRewardError naming the objects and components at fault."""
        bad = (~self.finite).nonzero().flatten().tolist()
        if bad:
            scored = self.scored[bad]
            culprits = [n for n, v in self.components.items() if not torch.isfinite(v[bad][scored]).all()]
            raise NonFiniteRewardError(
                f"combined reward is non-finite for objects {bad} of {self.rewards.numel()}; "
                f"non-finite components: {culprits or 'none (a gradient)'}"
            )
        return self


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


@dataclass
class ViewSelection:
    """The views of B objects that go to the rewards: (B, k) indices into V, and those views."""

    views: torch.Tensor  # (B, k) long
    num_views: int  # V
    images: torch.Tensor  # (B, k, 3, H, W), noise added
    extras: dict[str, torch.Tensor]  # each (B, k, C, H, W)


class RewardCombiner:
    """Turns per-term, per-view reward outputs into one per-object objective.

    The two halves of ``CombinedReward.score``, apart so the scoring in between can happen anywhere:
    in this process (``CombinedReward``) or on the Serve reward plane (``serve.client.RewardPlane``).
    ``select`` picks the views to score (all, or k random per object) and adds the scoring noise;
    ``combine`` weights, aggregates over views and scatters gradients back to all V views.
    """

    def __init__(self, weights: Mapping[str, float], aggregate: str = "mean", views_per_sample: int | None = None,
                 noise_std: float = 0.0, seed: int = 0, needs: frozenset[str] = frozenset(),
                 name: str = "combined reward"):
        if not weights:
            raise ValueError("rewards is empty; give at least one reward")
        if aggregate not in ("mean", "max"):
            raise ValueError(f"aggregate={aggregate!r}; expected 'mean' or 'max'")
        if views_per_sample is not None and (not isinstance(views_per_sample, int) or views_per_sample < 0):
            raise ValueError(f"views_per_sample={views_per_sample!r}; expected an int >= 0 (0 = all)")
        if not noise_std >= 0:
            raise ValueError(f"noise_std={noise_std!r}; expected a float >= 0")
        self.weights = {name: float(w) for name, w in weights.items()}
        self.aggregate = aggregate
        self.views_per_sample = views_per_sample or None
        self.noise_std = float(noise_std)
        self.generator = torch.Generator().manual_seed(seed)
        self.needs = frozenset(needs)
        self.name = name

    def select(self, images: torch.Tensor, prompts: list[str], extras: dict[str, torch.Tensor] | None) -> ViewSelection:
        extras = validate_inputs(images, prompts, extras, self.needs, self.name)
        B, V = images.shape[:2]
        k = V if self.views_per_sample is None else min(self.views_per_sample, V)
        # (B, k) view indices per object: all views, or k drawn without replacement per object.
        if k == V:
            views = torch.arange(V).expand(B, V)
        else:
            views = torch.stack([torch.randperm(V, generator=self.generator)[:k] for _ in range(B)])
        views = views.to(images.device)
        rows = torch.arange(B, device=images.device)[:, None]  # (B, 1), pairs with views for indexing
        picked = images[rows, views]  # (B, k, 3, H, W)
        if self.noise_std > 0:
            noise = torch.randn(picked.shape, generator=self.generator, dtype=picked.dtype)
            # The clamp only bites for noise far beyond the reference's (10 sigma at 2e-3) and keeps
            # the noisy images inside what the rewards accept.
            picked = (picked + self.noise_std * noise.to(picked.device)).clamp(-RANGE_TOLERANCE, 1 + RANGE_TOLERANCE)
        return ViewSelection(views, V, picked, {key: extras[key][rows, views] for key in self.needs})

    def combine(self, selection: ViewSelection, outputs: Mapping[str, RewardOutput], with_grad: bool) -> CombinedRewardOutput:
        views, V = selection.views, selection.num_views
        B, k = views.shape
        rows = torch.arange(B, device=views.device)[:, None]
        view_rewards = sum(self.weights[name] * out.values.to(views.device) for name, out in outputs.items())  # (B, k)
        if self.aggregate == "mean":
            rewards = view_rewards.mean(1)
            coeff = torch.full_like(view_rewards, 1.0 / k)  # dR_b / d view_reward_(b, j)
        else:
            rewards, best = view_rewards.max(1)
            coeff = nn.functional.one_hot(best, k).to(view_rewards.dtype)

        def scatter(per_view: torch.Tensor, fill: float) -> torch.Tensor:
            # (B, k, ...) on the picked views -> (B, V, ...) with ``fill`` on the others.
            full = per_view.new_full((B, V, *per_view.shape[2:]), fill)
            full[rows, views] = per_view
            return full

        grads, extra_grads = None, {}
        if with_grad:
            # No gradient at all for an object whose objective is non-finite; it must not be trained on.
            coeff = (coeff * torch.isfinite(rewards)[:, None])[..., None, None, None]  # (B, k, 1, 1, 1)
            grads = scatter(sum(self.weights[n] * coeff * out.grads.to(coeff.device) for n, out in outputs.items()), 0.0)
            for key in sorted({key for out in outputs.values() for key in out.extra_grads}):
                per_view = [
                    self.weights[n] * coeff * out.extra_grads[key].to(coeff.device)
                    for n, out in outputs.items()
                    if key in out.extra_grads
                ]
                extra_grads[key] = scatter(sum(per_view), 0.0)
        return CombinedRewardOutput(
            rewards=rewards,
            grads=grads,
            extra_grads=extra_grads,
            view_rewards=scatter(view_rewards, float("nan")),
            components={name: scatter(out.values.to(views.device), float("nan")) for name, out in outputs.items()},
            scored=scatter(torch.ones_like(view_rewards, dtype=torch.bool), False),
        )


class CombinedReward(nn.Module):
    """A weighted sum of rewards, aggregated over views into one score per object, all in this process.

    rewards: {name: RewardModel}; weights: {name: float}, default 1 each; aggregate: "mean" | "max";
    views_per_sample: score only this many random views per object (0 or None = all views);
    noise_std: std of the Gaussian noise added to the images before scoring;
    seed: seeds ``self.generator``, which draws the views and the noise (save its state to resume).
    """

    def __init__(
        self,
        rewards: Mapping[str, RewardModel],
        weights: Mapping[str, float] | None = None,
        aggregate: str = "mean",
        views_per_sample: int | None = None,
        noise_std: float = 0.0,
        seed: int = 0,
    ):
        super().__init__()
        if not rewards:
            raise ValueError("CombinedReward: rewards is empty; give at least one {name: RewardModel}")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(rewards))
        if unknown:
            raise ValueError(f"CombinedReward: weights name {unknown}, not among the rewards {sorted(rewards)}")
        self.rewards = nn.ModuleDict(rewards)
        self.needs = frozenset().union(*(r.needs for r in self.rewards.values()))
        self.grad_extras = frozenset().union(*(r.grad_extras for r in self.rewards.values()))
        try:
            self.combiner = RewardCombiner({name: weights.get(name, 1.0) for name in rewards}, aggregate,
                                           views_per_sample, noise_std, seed, self.needs, "CombinedReward")
        except ValueError as err:
            raise ValueError(f"CombinedReward: {err}") from None

    @property
    def generator(self) -> torch.Generator:
        return self.combiner.generator

    @property
    def weights(self) -> dict[str, float]:
        return self.combiner.weights

    @property
    def aggregate(self) -> str:
        return self.combiner.aggregate

    @classmethod
    def from_terms(cls, terms: list[Mapping], **kwargs) -> CombinedReward:
        """Build from ``RewardsConfig.terms``-like dicts ``{"name", "weight" = 1, "kwargs" = {}}``
        (registry names, each at most once); ``kwargs`` go to ``CombinedReward``."""
        names = [term["name"] for term in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"CombinedReward: reward terms must name each reward once, got {names}")
        rewards = {term["name"]: build_reward(term["name"], **term.get("kwargs", {})) for term in terms}
        weights = {term["name"]: term.get("weight", 1.0) for term in terms}
        return cls(rewards, weights, **kwargs)

    def score(
        self,
        images: torch.Tensor,
        prompts: list[str],
        extras: dict[str, torch.Tensor] | None = None,
        with_grad: bool = False,
    ) -> CombinedRewardOutput:
        """images (B, V, 3, H, W) in [0, 1] -> per-object rewards (B,) and, if asked, their gradients."""
        selection = self.combiner.select(images, prompts, extras)
        outputs = {name: reward.score(selection.images, prompts, selection.extras, with_grad)
                   for name, reward in self.rewards.items()}
        return self.combiner.combine(selection, outputs, with_grad)
