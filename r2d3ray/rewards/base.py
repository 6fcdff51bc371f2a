"""The reward interface: rendered views in, per-view scores and their gradients out.

Conventions (see docs/contracts.md):

- ``images``: (B, V, 3, H, W) float in [0, 1] (± ``RANGE_TOLERANCE``), white background; B objects,
  V views each.
- ``prompts``: list of B strings, one per object (every view of an object shares it).
- ``extras``: render channels a reward may ask for through ``needs``:
  ``alphas`` (B, V, 1, H, W), ``depths`` (B, V, 1, H, W) expected depth, ``normals`` (B, V, 3, H, W)
  camera-space rendered normals. Keys a reward does not need are ignored.
- Output values are (B, V), one score per view. ``grads`` is the gradient of ``values.sum()`` with
  respect to ``images`` (views are scored independently, so it is each view's own gradient);
  ``extra_grads[k]`` likewise for each extra ``k`` in ``grad_extras``.
- Reward math runs in float32 with autocast off whatever the caller's precision (float64 input
  stays float64, which is what the finite-difference tests use).

Non-finite scores: a view whose value or gradient is NaN/inf is never trained on. ``score`` keeps
the raw value (so it shows up in logs), zeroes that view's gradients, warns, and marks it False in
``RewardOutput.finite``. Callers either drop those views with the mask or call
``RewardOutput.check_finite()``, which raises ``NonFiniteRewardError`` naming them.

Writing a reward: subclass ``RewardModel``, set ``name`` / ``needs`` / ``grad_extras`` (and
``differentiable = False`` for a reward that has values only), implement
``forward(images, prompts, extras) -> (B, V)`` with differentiable torch ops that score every view
on its own (no statistics across the batch), and register it with
``r2d3ray.rewards.registry.register_reward``. The base class does validation, dtype, device and
gradients. Frozen weights should have ``requires_grad=False`` (gradients are taken with respect
to the inputs only).
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

EXTRA_CHANNELS: dict[str, int] = {"alphas": 1, "depths": 1, "normals": 3}
# Renders are composites of colours in [0, 1]. Allow float round-off and the reference's scoring
# noise (2e-3·N(0, 1), so this is 10 sigma); reject the real mistakes, images in [-1, 1] or [0, 255].
RANGE_TOLERANCE = 2e-2


class NonFiniteRewardError(RuntimeError):
    """A reward produced NaN/inf values or gradients for some views."""


@dataclass
class RewardOutput:
    """Scores of B objects × V views.

    values: (B, V) float32 scores (raw, possibly NaN where ``finite`` is False).
    grads: (B, V, 3, H, W) d(values.sum())/d images, or None when not asked for. Zero on
        non-finite views.
    extra_grads: {extra name: gradient with that extra's shape} for the reward's ``grad_extras``.
    """

    values: torch.Tensor
    grads: torch.Tensor | None = None
    extra_grads: dict[str, torch.Tensor] = field(default_factory=dict)

    # (B, V) bool: True where the value and every gradient of that view are finite. Computed once
    # here, before a reward zeroes the gradients of bad views (which would make them look finite).
    finite: torch.Tensor | None = None

    def __post_init__(self):
        if self.finite is None:
            ok = torch.isfinite(self.values)
            for g in [self.grads, *self.extra_grads.values()]:
                if g is not None:
                    # A view's sum is NaN/inf iff one of its elements is (or, never in practice, the
                    # sum overflows: then the view is flagged too). One read of the gradient, where
                    # isfinite(g).all() writes a mask as large and is 50x slower on a CPU.
                    ok = ok & torch.isfinite(g.flatten(2).sum(-1))
            self.finite = ok

    def check_finite(self, name: str = "reward") -> RewardOutput:
        """Return self, or raise NonFiniteRewardError listing the (object, view) pairs that failed."""
        bad = (~self.finite).nonzero().tolist()
        if bad:
            raise NonFiniteRewardError(
                f"{name} is non-finite for {len(bad)} of {self.values.numel()} views "
                f"(object, view): {bad[:10]}{' ...' if len(bad) > 10 else ''}"
            )
        return self


class RewardModel(nn.Module):
    """Base class of every reward. Subclasses implement ``forward``; callers use ``score``."""

    name: str = "reward"
    # Extra render channels the reward reads, a subset of EXTRA_CHANNELS.
    needs: frozenset[str] = frozenset()
    # Extras the reward is differentiated with respect to (a subset of ``needs``).
    grad_extras: frozenset[str] = frozenset()
    # Whether ``score(..., with_grad=True)`` gives a meaningful gradient. Nabla-R2D3 and reward
    # backprop train on it, so a run of theirs refuses a value-only reward before it starts
    # (r2d3ray/train/launch.py); DiffusionNFT uses values only and takes every reward.
    differentiable: bool = True

    def forward(
        self, images: torch.Tensor, prompts: list[str], extras: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """images (B, V, 3, H, W) float32 in [0, 1] -> scores (B, V), differentiable."""
        raise NotImplementedError

    def score(
        self,
        images: torch.Tensor,
        prompts: list[str],
        extras: dict[str, torch.Tensor] | None = None,
        with_grad: bool = False,
    ) -> RewardOutput:
        """Validate, then score every view; with ``with_grad`` also return d(sum of values)/d inputs.

        Inputs are not modified and need not require grad; outputs live on ``images.device``.
        """
        extras = validate_inputs(images, prompts, extras, self.needs, self.name)
        if with_grad and not self.differentiable:
            raise ValueError(f"{self.name} has values only (differentiable = False); score it with with_grad=False")
        out_device = images.device
        device = next(itertools.chain(self.parameters(), self.buffers()), images).device
        dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
        images = images.detach().to(device, dtype).requires_grad_(with_grad)
        extras = {
            k: extras[k].detach().to(device, dtype).requires_grad_(with_grad and k in self.grad_extras)
            for k in self.needs
        }
        with torch.autocast(device.type, enabled=False), torch.set_grad_enabled(with_grad):
            values = self(images, prompts, extras)  # (B, V)
            if values.shape != images.shape[:2]:
                raise RuntimeError(
                    f"{type(self).__name__}.forward returned shape {tuple(values.shape)}; "
                    f"expected (B, V) = {tuple(images.shape[:2])}"
                )
            values = values.to(dtype)
            grads, extra_grads = None, {}
            if with_grad:
                wrt = [images] + [extras[k] for k in sorted(self.grad_extras)]
                if values.requires_grad:
                    found = torch.autograd.grad(values.sum(), wrt, allow_unused=True)
                else:  # the score does not depend on any input (a constant reward)
                    found = [None] * len(wrt)
                found = [torch.zeros_like(x) if g is None else g for x, g in zip(wrt, found)]
                grads = found[0]
                extra_grads = dict(zip(sorted(self.grad_extras), found[1:]))
        out = RewardOutput(values.detach(), grads, extra_grads)
        finite = out.finite
        if not finite.all():
            warnings.warn(
                f"{self.name}: {int((~finite).sum())} of {finite.numel()} views gave non-finite "
                "rewards or gradients; their gradients are zeroed and RewardOutput.finite marks them",
                RuntimeWarning,
                stacklevel=2,
            )
            keep = finite[:, :, None, None, None]
            for g in [out.grads, *out.extra_grads.values()]:
                if g is not None:
                    g.masked_fill_(~keep, 0.0)
        out.values, out.finite = out.values.to(out_device), out.finite.to(out_device)
        if out.grads is not None:
            out.grads = out.grads.to(out_device)
        out.extra_grads = {k: g.to(out_device) for k, g in out.extra_grads.items()}
        return out


def validate_inputs(
    images: torch.Tensor,
    prompts: list[str],
    extras: dict[str, torch.Tensor] | None,
    needs: frozenset[str],
    name: str,
) -> dict[str, torch.Tensor]:
    """Check the reward inputs against the contract; return ``extras`` (an empty dict for None).

    Raises ValueError naming the argument, what was wrong and what is expected.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 5 or images.shape[2] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name}: images must be a (B, V, 3, H, W) tensor, got {got}")
    if not images.is_floating_point():
        raise ValueError(f"{name}: images must be float in [0, 1], got dtype {images.dtype}")
    if images.numel() == 0:
        raise ValueError(f"{name}: images is empty, shape {tuple(images.shape)}")
    # One pass for both checks: NaN propagates into min and max, inf shows in one of them.
    lo, hi = (bound.item() for bound in torch.aminmax(images.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name}: images contain NaN/inf; expected finite values in [0, 1]")
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise ValueError(
            f"{name}: images must have values in [0, 1] (white background), got min {lo:.4g}, max {hi:.4g}"
        )
    B, V, _, H, W = images.shape
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise ValueError(f"{name}: prompts must be a list of {B} strings, got {type(prompts).__name__}")
    if len(prompts) != B or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name}: prompts must be a list of B={B} strings (one per object), got {prompts!r}")
    extras = {} if extras is None else extras
    unknown = set(needs) - set(EXTRA_CHANNELS)
    if unknown:
        raise ValueError(
            f"{name}: needs {sorted(unknown)} which are not render extras; known: {sorted(EXTRA_CHANNELS)}"
        )
    missing = sorted(set(needs) - set(extras))
    if missing:
        raise ValueError(
            f"{name}: extras is missing {missing}; this reward needs {sorted(needs)} "
            f"(render them beside the images, e.g. RenderOutput.alphas/depths)"
        )
    for key in sorted(needs):
        value = extras[key]
        expected = (B, V, EXTRA_CHANNELS[key], H, W)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != expected:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name}: extras[{key!r}] must have shape {expected}, got {got}")
        if not value.is_floating_point():
            raise ValueError(f"{name}: extras[{key!r}] must be float, got dtype {value.dtype}")
    return extras
