"""Weight-free rewards of the embedded default (the tiny prior's procedural world).

They stand in for the learned critics (HPSv2, the LAION aesthetic head): like those they are
smooth, bounded functions of the rendered image alone (no alphas, no depth), with a dense gradient
field over the pixels, so the same code path (renderer -> image gradient -> policy) is exercised.

- ``color_match`` (prompt-aware, the HPS stand-in): how closely the visible object's colour matches
  the colour the prompt asks for.
- ``colorfulness`` (prompt-free, the aesthetic stand-in): the Hasler–Süsstrunk colourfulness of
  the view, which a prior trained to reproduce the world's flat palette colours does not maximise.
"""

from __future__ import annotations

import torch

from r2d3ray.models.world import COLORS, parse_prompt
from r2d3ray.rewards.base import RewardModel
from r2d3ray.rewards.registry import register_reward


@register_reward("color_match")
class ColorAgreementReward(RewardModel):
    """How closely the object's pixels match the colour the prompt asks for, in [0, 1).

    Per pixel, ``similarity = exp(-|c - target|² / (2 sigma²))`` to the prompted ``COLORS`` entry,
    and ``foreground = 1 - exp(-|c - white|² / background_temperature)`` (0 on the white background,
    ~1 on any palette colour). The view's score is the foreground-weighted mean similarity

        sum_pixels foreground · similarity / (sum_pixels foreground + min_coverage · H · W)

    It is maximal exactly at the prompted colour (no overshoot to exploit), and the broad kernel
    (sigma 0.5 in RGB) keeps a useful gradient even from a far-off colour, unlike a sharp palette
    classifier whose softmax saturates. ``min_coverage`` keeps an empty or single-dot render from
    scoring high: an object covering fraction f of the view scores at most f / (f + min_coverage).
    """

    name = "color_match"

    def __init__(self, sigma: float = 0.5, background_temperature: float = 0.01, min_coverage: float = 0.005):
        super().__init__()
        for arg, value in (("sigma", sigma), ("background_temperature", background_temperature),
                           ("min_coverage", min_coverage)):
            if not value > 0:
                raise ValueError(f"color_match: {arg}={value!r}; expected a float > 0")
        self.sigma = sigma
        self.background_temperature = background_temperature
        self.min_coverage = min_coverage
        self.color_names = list(COLORS)
        self.register_buffer("palette", torch.tensor(list(COLORS.values())), persistent=False)  # (K, 3)

    def forward(self, images, prompts, extras):
        B, V, _, H, W = images.shape
        try:
            target = [self.color_names.index(parse_prompt(p).color) for p in prompts]
        except ValueError as err:
            raise ValueError(f"color_match: {err}") from None
        target = self.palette.to(images.dtype)[target]  # (B, 3)
        dist2 = ((images - target[:, None, :, None, None]) ** 2).sum(2)  # (B, V, H, W)
        similarity = torch.exp(-dist2 / (2 * self.sigma**2))
        foreground = 1 - torch.exp(-((1 - images) ** 2).sum(2) / self.background_temperature)  # (B, V, H, W)
        mass = foreground.sum((-2, -1)) + self.min_coverage * H * W  # (B, V)
        return (foreground * similarity).sum((-2, -1)) / mass


@register_reward("colorfulness")
class ColorfulnessReward(RewardModel):
    """Hasler–Süsstrunk colourfulness of the whole view (white background included), in [0, ~1.9].

    With opponent channels ``rg = R - G`` and ``yb = (R + G) / 2 - B`` over all pixels,

        M = sqrt(std(rg)² + std(yb)²) + 0.3 · sqrt(mean(rg)² + mean(yb)²)

    Vivid, saturated and larger objects score higher; gray, black or empty views score ~0. It is a
    classic image-aesthetics feature and a fair stand-in for a learned aesthetic critic: smooth,
    bounded (pixels are in [0, 1]), prompt-free, and not already maximised by a prior that copies
    the world's flat, moderately saturated palette, so alignment has room to move. It pulls against
    ``color_match`` (saturating a colour can leave its palette class), which keeps combined runs honest.
    """

    name = "colorfulness"
    # Keeps the square roots differentiable on a colourless (all-gray or empty) view.
    EPS = 1e-6

    def forward(self, images, prompts, extras):
        r, g, b = images.unbind(2)  # each (B, V, H, W)
        rg = (r - g).flatten(2)  # (B, V, H·W)
        yb = (0.5 * (r + g) - b).flatten(2)
        spread = (rg.var(-1, unbiased=False) + yb.var(-1, unbiased=False) + self.EPS).sqrt()
        offset = (rg.mean(-1) ** 2 + yb.mean(-1) ** 2 + self.EPS).sqrt()
        return spread + 0.3 * offset
