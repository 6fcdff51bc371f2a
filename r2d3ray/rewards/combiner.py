"""Several rewards' per-view scores -> one objective per object, and its gradient.

    R_b = aggregate_v  sum_i w_i r_i(b, v)        aggregate = mean (the reference) or max over views

with each reward's own per-view values kept for logging. Like Nabla-R2D3 it can score only k random
views per object (``views_per_sample``; the reference's ``memo_efficient_mode`` scores 2 of 4)
and add N(0, noise_std²) noise to the images before scoring (the reference adds 2e-3·N(0, 1) in
training); the noise is additive, so the gradient w.r.t. the noisy images is the gradient w.r.t.
the clean ones. The arguments mirror ``RewardsConfig`` (terms, aggregate, views_per_sample,
noise_std).

``RewardCombiner`` does it in two halves, ``select`` (the views to score, noise added) and
``combine`` (weights, aggregation, gradients scattered back to all V views, the finite check), so
that the scoring in between can happen anywhere: in this process (``CombinedReward``) or on the
Serve reward plane (r2d3ray/serve/client.py). Either way the answer is a ``RewardAnswer``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from r2d3ray.rewards.base import RANGE_TOLERANCE, NonFiniteRewardError, RewardModel, RewardOutput, validate_inputs
from r2d3ray.rewards.registry import build_reward


@dataclass
class RewardAnswer:
    """The rewards of B objects x V views, weighted and aggregated: what a trainer reads.

    rewards: (B,) the per-object objective over the scored views.
    finite: (B,) bool, True where the objective and every value and gradient the rewards gave for
        that object's scored views are finite; a False object has zero gradient and must not be
        trained on.
    components: {reward name: (B, V) that reward's own values}, NaN on views not scored.
    grads: (B, V, 3, H, W) d(rewards.sum())/d images, or None; zero on views not scored.
    extra_grads: {extra: d(rewards.sum())/d extra} for the extras some reward differentiates.
    view_rewards: (B, V) weighted per-view sums, NaN on views not scored.
    scored: (B, V) bool, the views that were scored.
    """

    rewards: torch.Tensor
    finite: torch.Tensor
    components: dict[str, torch.Tensor]
    grads: torch.Tensor | None
    extra_grads: dict[str, torch.Tensor]
    view_rewards: torch.Tensor
    scored: torch.Tensor

    def check_finite(self) -> RewardAnswer:
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


@dataclass
class ViewSelection:
    """The views of B objects that go to the rewards: (B, k) indices into V, and those views."""

    views: torch.Tensor  # (B, k) long
    num_views: int  # V
    images: torch.Tensor  # (B, k, 3, H, W), noise added; the caller's own tensor when k = V without noise
    extras: dict[str, torch.Tensor]  # each (B, k, C, H, W)

    @property
    def all_views(self) -> bool:
        return self.views.shape[1] == self.num_views


class RewardCombiner:
    """Turns per-reward, per-view outputs into one objective per object (see the module docstring).

    weights: {reward name: weight}; aggregate: "mean" | "max"; views_per_sample: score only this
    many random views per object (0 or None = all views); noise_std: std of the Gaussian noise added
    to the images before scoring; seed: seeds ``self.generator``, which draws the views and the
    noise (save its state to resume); needs: the extras the rewards read.
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
        if k == V and self.noise_std == 0:
            # Every view as it is: the tensors themselves, not a gathered copy of them.
            views = torch.arange(V, device=images.device).expand(B, V)
            return ViewSelection(views, V, images, {key: extras[key] for key in self.needs})
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

    def combine(self, selection: ViewSelection, outputs: Mapping[str, RewardOutput], with_grad: bool) -> RewardAnswer:
        """The rewards' answers on the selected views -> the objective. The outputs are only read
        (a served reward's gradient may be a view of a read-only receive buffer)."""
        views, V = selection.views, selection.num_views
        B, k = views.shape
        device = views.device
        rows = torch.arange(B, device=device)[:, None]
        values = {name: out.values.to(device) for name, out in outputs.items()}  # each (B, k)
        view_rewards = sum(self.weights[name] * v for name, v in values.items())  # (B, k)
        if self.aggregate == "mean":
            rewards = view_rewards.mean(1)
            coeff = torch.full_like(view_rewards, 1.0 / k)  # dR_b / d view_reward_(b, j)
        else:
            rewards, best = view_rewards.max(1)
            coeff = nn.functional.one_hot(best, k).to(view_rewards.dtype)
        # An object is trusted only if its objective and every reward's values and gradients on its
        # scored views are finite (a reward zeroes the gradient of a bad view, but flags it).
        finite = torch.isfinite(rewards)
        for out in outputs.values():
            finite = finite & out.finite.to(device).all(1)

        def scatter(per_view: torch.Tensor, fill: float) -> torch.Tensor:
            # (B, k, ...) on the picked views -> (B, V, ...) with ``fill`` on the others.
            if selection.all_views:
                return per_view
            full = per_view.new_full((B, V, *per_view.shape[2:]), fill)
            full[rows, views] = per_view
            return full

        grads, extra_grads = None, {}
        if with_grad:
            # No gradient at all for an object that is not finite; it must not be trained on.
            coeff = (coeff * finite[:, None])[..., None, None, None]  # (B, k, 1, 1, 1)
            grads = scatter(self._weighted_sum(coeff, {n: out.grads for n, out in outputs.items()}), 0.0)
            for key in sorted({key for out in outputs.values() for key in out.extra_grads}):
                terms = {n: out.extra_grads[key] for n, out in outputs.items() if key in out.extra_grads}
                extra_grads[key] = scatter(self._weighted_sum(coeff, terms), 0.0)
        return RewardAnswer(
            rewards=rewards,
            finite=finite,
            components={name: scatter(v, float("nan")) for name, v in values.items()},
            grads=grads,
            extra_grads=extra_grads,
            view_rewards=scatter(view_rewards, float("nan")),
            scored=scatter(torch.ones_like(view_rewards, dtype=torch.bool), False),
        )

    def _weighted_sum(self, coeff: torch.Tensor, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """sum_i w_i · coeff · g_i, each (B, k, C, H, W), in one pass per reward: the first product
        is the result's memory (``sum()`` would add it to 0, one more pass)."""
        total = None
        for name, grad in grads.items():
            scale = self.weights[name] * coeff  # (B, k, 1, 1, 1)
            grad = grad.to(coeff.device)
            total = scale * grad if total is None else total.addcmul_(scale, grad)
        return total


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

    def score_selection(self, selection: ViewSelection, prompts: list[str], with_grad: bool) -> dict[str, RewardOutput]:
        """Every reward's own answer on the selected views."""
        return {name: reward.score(selection.images, prompts, selection.extras, with_grad)
                for name, reward in self.rewards.items()}

    def score(
        self,
        images: torch.Tensor,
        prompts: list[str],
        extras: dict[str, torch.Tensor] | None = None,
        with_grad: bool = False,
    ) -> RewardAnswer:
        """images (B, V, 3, H, W) in [0, 1] -> per-object rewards (B,) and, if asked, their gradients."""
        selection = self.combiner.select(images, prompts, extras)
        return self.combiner.combine(selection, self.score_selection(selection, prompts, with_grad), with_grad)
