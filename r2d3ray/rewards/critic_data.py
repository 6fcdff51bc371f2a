"""What the tiny critic learns from: 2D renders of the world's objects, faithful and not.

The world's colours are flat, so a render of an object on white is ``1 − α·(1 − colour)``: one alpha
map per *geometry* (shape × size × attribute, 45 of them) serves all eight colours. A
:class:`RenderBank` holds, per geometry, alpha maps from random views of three kinds:

* ``splat``: the world's ground-truth splatter images (``world.render_ground_truth`` on the tiny
  prior's rig and latent resolution, exactly what the prior is trained to produce) rendered by
  ``render_splats``: the best a 4096-Gaussian prior can draw, soft edges and all;
* ``exact``: the exact ray-cast silhouette (``world.cast_rays``, as ``eval/prior.py`` scores
  silhouettes), crisp edges;
* ``jitter``: the ground-truth splats perturbed the way the tiny prior fails (scattered means,
  uneven and leaking opacities around the silhouette, uneven sizes and colours), rendered with a
  per-pixel colour offset so that they too can be recoloured.

Positives for a prompt are its object's ``splat`` or ``exact`` views. Negatives (``FAMILIES``) are
renders of another object (one word changed: shape, colour, size or attribute) or the prompted object
degraded: blurred, hazy, scaled, fragmented (holes and specks), jittered splats, or the prior's usual
mixture (too large, hazy and ragged). Views are random (azimuth uniform, elevation in
``ELEVATION_RANGE_DEG``); every draw comes from a seeded ``torch.Generator``, so a bank and a batch are
the same on every run.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from r2d3ray.models.tiny import TINY_DEFAULT_CONFIG
from r2d3ray.models.world import ATTRIBUTES, COLORS, SHAPES, SIZES, ObjectSpec, cast_rays, prompt_for, render_ground_truth
from r2d3ray.render.cameras import default_rig, pixel_rays, random_rig
from r2d3ray.render.rasterize import render_splats
from r2d3ray.splats import Splats, decode_splatter_images

# Covers the reward's renders (a jittered rig at 0 ± 5°) and the prior's own rig (10°).
ELEVATION_RANGE_DEG = (-8.0, 18.0)
FAMILIES: tuple[str, ...] = (
    "wrong_shape", "wrong_color", "wrong_size", "wrong_attribute",  # another object
    "blur", "haze", "scaled", "fragmented", "jitter", "mixed",  # the prompted object, degraded
)
# Word role a "wrong_*" family changes.
_CHANGED_ROLE = {"wrong_shape": "shape", "wrong_color": "color", "wrong_size": "size", "wrong_attribute": "attribute"}
_ROLE_WORDS = {"shape": SHAPES, "color": tuple(COLORS), "size": tuple(SIZES), "attribute": tuple(ATTRIBUTES)}
# Share of positives drawn from the exact silhouettes (the rest from the splat renders): the critic
# must accept both crisp and splat-soft edges as the object.
EXACT_SHARE = 0.25
PIXEL_NOISE_STD = 2e-3  # added to every training image, like the reward noise of Nabla-R2D3's training


def geometries() -> list[ObjectSpec]:
    """The world's 45 geometries (colour fixed to gray: the colour is applied when composing)."""
    return [ObjectSpec("gray", shape, size, attribute) for shape, size, attribute in itertools.product(SHAPES, SIZES, ATTRIBUTES)]


def geometry_key(spec: ObjectSpec) -> tuple[str, str, str]:
    return spec.shape, spec.size, spec.attribute


@dataclass
class RenderBank:
    """Alpha maps of every geometry from random views; see the module docstring for the kinds."""

    geometries: list[ObjectSpec]
    splat_alphas: torch.Tensor  # (G, Vs, 1, H, W)
    exact_alphas: torch.Tensor  # (G, Ve, 1, H, W)
    jitter_alphas: torch.Tensor  # (G, Vj, 1, H, W)
    jitter_shades: torch.Tensor  # (G, Vj, 3, H, W) Σ w·(colour offset), added to the composite

    def index(self, spec: ObjectSpec) -> int:
        return [geometry_key(g) for g in self.geometries].index(geometry_key(spec))


def ground_truth_splats(specs: list[ObjectSpec]) -> Splats:
    """The world's ground-truth splats of ``specs`` as the tiny prior would decode them, (G, 4096)."""
    rig = default_rig(TINY_DEFAULT_CONFIG["num_views"])
    splatter = render_ground_truth(specs, rig, TINY_DEFAULT_CONFIG["resolution"])  # (G, V, 12, r, r)
    return decode_splatter_images(splatter, rig.c2w)


def jitter_splats(splats: Splats, generator: torch.Generator) -> tuple[Splats, torch.Tensor]:
    """Each object of ``splats`` (B, N) perturbed like a poor prior sample, with its own strength.

    Returns the splats and per-Gaussian colour offsets (B, N, 3). Opaque Gaussians are scattered
    (σ 0.01–0.05 world units; a medium object's half-extent is 0.24) and thinned; transparent
    ones next to the silhouette leak opacity as specks: the haze and ragged edges of the tiny prior.
    """
    B, N = splats.opacities.shape

    def per_object(low, high):  # (B, 1) strengths drawn uniformly in [low, high)
        return low + (high - low) * torch.rand(B, 1, generator=generator)

    opaque = splats.opacities > 0.5  # (B, N)
    # A transparent Gaussian sits on its pixel's ray in the plane through the origin. Those within
    # 3 pixels of the silhouette of their splatter image are the ones a prior's leaking opacity
    # turns into haze and ragged edges; a random share of them leaks.
    r = TINY_DEFAULT_CONFIG["resolution"]
    silhouettes = opaque.float().view(B * N // (r * r), 1, r, r)  # (B·V, 1, r, r), N = V·r·r
    band = F.max_pool2d(silhouettes, 7, stride=1, padding=3).view(B, N) > 0
    leak = ~opaque & band & (torch.rand(B, N, generator=generator) < per_object(0.1, 0.5))
    means = splats.means + per_object(0.01, 0.05)[..., None] * torch.randn(B, N, 3, generator=generator)
    opacities = torch.where(opaque, splats.opacities * (0.35 + 0.65 * torch.rand(B, N, generator=generator)),
                            leak * per_object(0.1, 0.6) * torch.rand(B, N, generator=generator))
    scales = splats.scales * torch.exp(0.4 * torch.randn(B, N, 3, generator=generator))
    speck = 0.004 + 0.011 * torch.rand(B, N, 1, generator=generator)
    scales = torch.where(leak[..., None], speck.expand(B, N, 3), scales).clamp(max=0.03)
    shades = per_object(0.0, 0.12)[..., None] * torch.randn(B, N, 3, generator=generator)
    return Splats(means, splats.quats, scales, opacities, splats.colors), shades


@functools.lru_cache(maxsize=1)
def _geometry_splats() -> Splats:
    # The world is deterministic: training and its held-out evaluation share one computation (~15 s).
    return ground_truth_splats(geometries())


def build_bank(size: int, splat_views: int, exact_views: int, jitter_views: int, generator: torch.Generator) -> RenderBank:
    """Render every geometry's alpha maps at ``size``² from fresh random views of each kind."""
    specs = geometries()
    G = len(specs)
    truth = _geometry_splats()  # (G, N)
    with torch.no_grad():
        splat_alphas = render_splats(truth, random_rig(splat_views, size, ELEVATION_RANGE_DEG, generator, G)).alphas

        exact = []
        cameras = random_rig(exact_views, size, ELEVATION_RANGE_DEG, generator, G)  # (G, Ve, ...)
        for g, spec in enumerate(specs):  # cast_rays shares one rig per call
            origins, dirs = pixel_rays(cameras[g])  # (Ve, H, W, 3)
            exact.append(cast_rays(spec, origins, dirs)[0].float().unsqueeze(1))  # (Ve, 1, H, W)
        exact_alphas = torch.stack(exact)

        # One perturbed copy of the object per jittered view: (G·Vj) objects of one view each.
        copies = Splats(*(t.repeat_interleave(jitter_views, dim=0) for t in
                          (truth.means, truth.quats, truth.scales, truth.opacities, truth.colors)))
        jittered, shades = jitter_splats(copies, generator)
        cameras = random_rig(1, size, ELEVATION_RANGE_DEG, generator, G * jitter_views)
        render = render_splats(jittered, cameras, extra_features=shades)
    return RenderBank(
        geometries=specs,
        splat_alphas=splat_alphas,
        exact_alphas=exact_alphas,
        jitter_alphas=render.alphas.view(G, jitter_views, 1, size, size),
        jitter_shades=render.features.view(G, jitter_views, 3, size, size),
    )


def compose(alphas: torch.Tensor, colors: torch.Tensor, shades: torch.Tensor | None = None) -> torch.Tensor:
    """Objects of flat ``colors`` (N, 3) with coverage ``alphas`` (N, 1, H, W) over white: (N, 3, H, W)."""
    images = 1 - alphas * (1 - colors[:, :, None, None])
    if shades is not None:
        images = images + shades
    return images.clamp(0, 1)


def _palette(specs: list[ObjectSpec]) -> torch.Tensor:
    return torch.tensor([COLORS[spec.color] for spec in specs])  # (N, 3)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _pick(count: int, generator: torch.Generator) -> int:
    return int(torch.randint(count, (1,), generator=generator))


def ground_truth_alphas(bank: RenderBank, specs: list[ObjectSpec], generator: torch.Generator) -> torch.Tensor:
    """One random ground-truth view of each spec's geometry, ``splat`` or (``EXACT_SHARE``) ``exact``: (N, 1, H, W)."""
    views = []
    for spec in specs:
        source = bank.exact_alphas if float(torch.rand(1, generator=generator)) < EXACT_SHARE else bank.splat_alphas
        views.append(source[bank.index(spec), _pick(source.shape[1], generator)])
    return torch.stack(views)


def positives(bank: RenderBank, specs: list[ObjectSpec], generator: torch.Generator) -> torch.Tensor:
    """Ground-truth renders of ``specs`` from random views, (N, 3, H, W)."""
    return compose(ground_truth_alphas(bank, specs, generator), _palette(specs))


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Blur each of ``images`` (N, C, H, W) with its own Gaussian of std ``sigmas`` (N,) pixels;
    borders extend the edge pixels (white background stays white)."""
    N, C, H, W = images.shape
    radius = int(math.ceil(3 * float(sigmas.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernels = torch.exp(-0.5 * (offsets / sigmas[:, None]) ** 2)
    kernels = (kernels / kernels.sum(-1, keepdim=True)).repeat_interleave(C, dim=0)  # (N·C, k)
    x = F.pad(images.reshape(1, N * C, H, W), (radius,) * 4, mode="replicate")
    x = F.conv2d(x, kernels[:, None, None, :], groups=N * C)
    x = F.conv2d(x, kernels[:, None, :, None], groups=N * C)
    return x.view(N, C, H, W)


def haze(alphas: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A translucent halo (25–60% opacity, 2.5–6 px wide) around the object, its body thinned a little."""
    n = alphas.shape[0]
    halo = gaussian_blur(alphas, _uniform(n, 2.5, 6.0, generator)) * _uniform(n, 0.25, 0.6, generator).view(n, 1, 1, 1)
    return torch.maximum(alphas * _uniform(n, 0.7, 1.0, generator).view(n, 1, 1, 1), halo)


def rescale(alphas: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Zoom each alpha map about the image centre (the object's centre) by ``factors`` (N,)."""
    n = alphas.shape[0]
    theta = torch.zeros(n, 2, 3, dtype=alphas.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / factors
    grid = F.affine_grid(theta, list(alphas.shape), align_corners=False)
    return F.grid_sample(alphas, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def scaled(alphas: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The object 20–50% too large or 20–45% too small (half each)."""
    n = alphas.shape[0]
    larger = torch.rand(n, generator=generator) < 0.5
    factors = torch.where(larger, _uniform(n, 1.2, 1.5, generator), _uniform(n, 0.55, 0.8, generator))
    return rescale(alphas, factors)


def fragment(alphas: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Holes (random blotches of a few pixels, roughly 10–35% of the area) and loose specks next to
    the silhouette: the ragged look of a poor splat sample."""
    n, _, H, W = alphas.shape
    field = F.interpolate(torch.rand(n, 1, 16, 16, generator=generator), size=(H, W), mode="bilinear", align_corners=False)
    keep = torch.sigmoid((field - _uniform(n, 0.2, 0.4, generator).view(n, 1, 1, 1)) / 0.03)
    band = F.max_pool2d(alphas, 9, stride=1, padding=4) * (1 - alphas)  # just outside the silhouette
    specks = (torch.rand(n, 1, H, W, generator=generator) < _uniform(n, 0.05, 0.2, generator).view(n, 1, 1, 1)) * band
    return torch.maximum(alphas * keep, specks * torch.rand(n, 1, H, W, generator=generator))


def _other_object(spec: ObjectSpec, role: str, allowed: set[str] | None, generator: torch.Generator) -> ObjectSpec | None:
    """``spec`` with its ``role`` word changed to a random other word whose prompt is ``allowed``."""
    candidates = [ObjectSpec(**{**_as_dict(spec), role: word}) for word in _ROLE_WORDS[role] if word != getattr(spec, role)]
    candidates = [c for c in candidates if allowed is None or prompt_for(c) in allowed]
    return candidates[_pick(len(candidates), generator)] if candidates else None


def _as_dict(spec: ObjectSpec) -> dict:
    return dict(color=spec.color, shape=spec.shape, size=spec.size, attribute=spec.attribute)


def negatives(bank: RenderBank, specs: list[ObjectSpec], families: list[str], generator: torch.Generator,
              allowed: set[str] | None = None) -> torch.Tensor:
    """One negative image per spec, of the given family each: (N, 3, H, W).

    ``allowed``: the prompts whose objects may be drawn as "another object" (training keeps them
    to the train split, so no held-out object is ever seen); a "wrong_*" family with no allowed
    alternative changes another role instead.
    """
    images = [None] * len(specs)
    by_family: dict[str, list[int]] = {}
    for i, family in enumerate(families):
        if family not in FAMILIES:
            raise ValueError(f"negative family {family!r} is unknown; expected one of {FAMILIES}")
        by_family.setdefault(family, []).append(i)

    for family, rows in sorted(by_family.items()):
        chosen = [specs[i] for i in rows]
        if family in _CHANGED_ROLE:
            others = []
            for spec in chosen:
                roles = [_CHANGED_ROLE[family]] + [r for r in _ROLE_WORDS if r != _CHANGED_ROLE[family]]
                other = next(o for o in (_other_object(spec, r, allowed, generator) for r in roles) if o is not None)
                others.append(other)
            batch = positives(bank, others, generator)
        elif family == "jitter":
            index = [(bank.index(s), _pick(bank.jitter_alphas.shape[1], generator)) for s in chosen]
            alphas = torch.stack([bank.jitter_alphas[g, v] for g, v in index])
            shades = torch.stack([bank.jitter_shades[g, v] for g, v in index])
            batch = compose(alphas, _palette(chosen), shades)
        else:
            alphas = ground_truth_alphas(bank, chosen, generator)
            if family == "blur":
                blurred = gaussian_blur(compose(alphas, _palette(chosen)), _uniform(len(rows), 1.0, 2.5, generator))
                batch = blurred.clamp(0, 1)  # the kernel's float round-off
            elif family == "haze":
                batch = compose(haze(alphas, generator), _palette(chosen))
            elif family == "scaled":
                batch = compose(scaled(alphas, generator), _palette(chosen))
            elif family == "fragmented":
                batch = compose(fragment(alphas, generator), _palette(chosen))
            else:  # mixed: the tiny prior's usual failure, too large, hazy and ragged at once
                larger = rescale(alphas, _uniform(len(rows), 1.1, 1.4, generator))
                batch = compose(fragment(haze(larger, generator), generator), _palette(chosen))
        for i, image in zip(rows, batch):
            images[i] = image
    return torch.stack(images)


def add_pixel_noise(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return (images + PIXEL_NOISE_STD * torch.randn(images.shape, generator=generator)).clamp(0, 1)
