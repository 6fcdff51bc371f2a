"""The weight-free rewards: color_match, colorfulness (embedded default) and DNC."""

import math

import pytest
import torch

from r2d3ray.models.world import COLORS
from r2d3ray.render.cameras import default_rig, orbit_cameras
from r2d3ray.render.normals import gaussian_normals, rendered_normals
from r2d3ray.render.rasterize import render_splats
from r2d3ray.rewards import build_reward
from r2d3ray.splats import Splats


def directional_fd(fn, x, direction, eps=1e-6):
    """Central finite difference of sum(fn(x)) along ``direction`` (float64)."""
    return (fn(x + eps * direction).sum() - fn(x - eps * direction).sum()) / (2 * eps)


def squares(colors, size=16, lo=4, hi=12):
    """(len(colors), 1, 3, size, size) flat-coloured squares on a white background."""
    images = torch.ones(len(colors), 1, 3, size, size, dtype=torch.float64)
    for i, c in enumerate(colors):
        images[i, :, :, lo:hi, lo:hi] = torch.tensor(c, dtype=torch.float64)[:, None, None]
    return images


def soft_blob(gen, B=2, V=2, size=12):
    """Smooth coloured blobs fading into white with a little noise, strictly inside (0, 1), float64."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    alpha = torch.exp(-(xs**2 + ys**2) / 0.3).to(torch.float64)  # (H, W)
    color = 0.1 + 0.8 * torch.rand(B, V, 3, 1, 1, generator=gen, dtype=torch.float64)
    images = alpha * color + (1 - alpha) * 1.0
    return (images - 0.02 * torch.rand(images.shape, generator=gen, dtype=torch.float64)).clamp(0.01, 0.99)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("name", ["color_match", "colorfulness"])
def test_toy_reward_gradients_match_finite_differences(name, gen):
    reward = build_reward(name)
    images = soft_blob(gen)
    prompts = ["a red cube", "a small blue sphere"]
    out = reward.score(images, prompts, with_grad=True)
    assert out.grads.shape == images.shape and out.grads.abs().max() > 0
    for _ in range(3):
        d = torch.randn(images.shape, generator=gen, dtype=torch.float64)
        fd = directional_fd(lambda x: reward.score(x, prompts).values, images, d)
        assert torch.allclose((out.grads * d).sum(), fd, rtol=1e-5, atol=1e-10)


def test_color_reward_prefers_the_prompted_colour_over_every_other():
    reward = build_reward("color_match")
    names = list(COLORS)
    images = squares([COLORS[n] for n in names])  # object i has colour names[i]
    for asked in names:
        values = reward.score(images, [f"a {asked} cone"] * len(names)).values[:, 0]  # (K,)
        right = values[names.index(asked)]
        wrong = torch.cat([values[: names.index(asked)], values[names.index(asked) + 1 :]])
        assert right > 0.9 and (right - wrong).min() > 0.15, (asked, values)


def test_color_reward_is_bounded_and_low_for_empty_or_tiny_renders():
    reward = build_reward("color_match")
    red = COLORS["red"]
    empty = torch.ones(1, 1, 3, 16, 16, dtype=torch.float64)
    dot = squares([red], size=64, lo=30, hi=32)  # 4 pixels of the right colour in 64²
    full = squares([red], lo=0, hi=16)
    values = [reward.score(x, ["a red torus"]).values.item() for x in (empty, dot, full)]
    assert values[0] < 1e-6 and values[1] < 0.3 and 0.99 < values[2] < 1.0
    with pytest.raises(ValueError, match="color_match: prompt 'a red teapot': unknown word 'teapot'"):
        reward.score(full, ["a red teapot"])
    with pytest.raises(ValueError, match="sigma=0"):
        build_reward("color_match", sigma=0)


def test_color_reward_gradient_recolours_a_wrong_object_towards_the_prompt():
    # Gradient ascent on the pixels of a blue square asked to be red moves it towards red.
    reward = build_reward("color_match")
    images = squares([COLORS["blue"]])
    before = reward.score(images, ["a red cube"], with_grad=True)
    stepped = (images + 0.05 * before.grads / before.grads.abs().max()).clamp(0, 1)
    assert reward.score(stepped, ["a red cube"]).values > before.values
    inside = before.grads[0, 0, :, 8, 8]
    assert inside[0] > 0 and inside[2] < 0  # more red, less blue


def test_colorfulness_has_room_above_the_palette_and_is_bounded(gen):
    reward = build_reward("colorfulness")
    gray, red, pure_red = COLORS["gray"], COLORS["red"], (1.0, 0.0, 0.0)
    values = reward.score(squares([gray, red, pure_red]), ["", "", ""]).values[:, 0]
    assert values[0] < 0.01 < values[1] < values[2]  # gray ~ nothing; saturating beats the palette
    bigger = reward.score(squares([red], lo=2, hi=14), [""]).values.item()
    assert bigger > values[1]
    worst_case = torch.zeros(1, 1, 3, 16, 16)
    worst_case[..., ::2, 0] = 1
    worst_case[..., 1::2, 2] = 1  # alternating pure red / pure blue rows
    random = torch.rand(4, 2, 3, 16, 16, generator=gen)
    assert reward.score(torch.cat([worst_case.expand(4, 2, -1, -1, -1), random]), [""] * 8).values.max() < 1.9


@pytest.mark.parametrize("name", ["color_match", "colorfulness"])
def test_toy_reward_gradient_reaches_the_splats_through_the_renderer(name, gen):
    # A dull reddish ball of Gaussians asked to be red: one gradient step on the colours, taken
    # through the renderer with the image gradient the reward returns, raises the reward of the new
    # render. (Exact gray would be a stationary point of colourfulness, hence the tint.)
    N = 64
    directions = torch.nn.functional.normalize(torch.randn(1, N, 3, generator=gen), dim=-1)
    splats = Splats(
        means=0.15 * directions,
        quats=torch.tensor([1.0, 0, 0, 0]).expand(1, N, 4).contiguous(),
        scales=torch.full((1, N, 3), 0.06),
        opacities=torch.full((1, N), 0.9),
        colors=torch.tensor([0.5, 0.4, 0.4]).repeat(1, N, 1).requires_grad_(True),
    )
    cameras = default_rig(num_views=2, size=24)
    reward = build_reward(name)
    render = render_splats(splats, cameras)
    before = reward.score(render.images, ["a red sphere"], with_grad=True)
    torch.autograd.backward(render.images, before.grads)
    grad = splats.colors.grad
    assert grad.abs().max() > 0
    splats.colors = (splats.colors + 0.1 * grad / grad.abs().max()).clamp(0, 1).detach()
    after = reward.score(render_splats(splats, cameras).images, ["a red sphere"])
    assert after.values.sum() > before.values.sum()


def plane_depths(tilt_deg, fxfy, size=10, distance=2.0):
    """(1, 1, 1, size, size) z-depth of a plane through (0, 0, distance) whose camera-facing normal
    is (sin t, 0, -cos t), seen by a camera with normalised focal ``fxfy``; and that normal."""
    t = math.radians(tilt_deg)
    normal = torch.tensor([math.sin(t), 0.0, -math.cos(t)], dtype=torch.float64)
    ray_x = (torch.arange(size, dtype=torch.float64) + 0.5 - size / 2) / (fxfy * size)  # (W,)
    # On the ray (x, y, 1)·z: normal·(z·ray − p0) = 0  =>  z = normal·p0 / normal·ray
    z = (-distance * math.cos(t)) / (normal[0] * ray_x - math.cos(t))  # (W,)
    return z.expand(size, size)[None, None, None].clone(), normal


def dnc_inputs(gen, B=1, V=2, size=8):
    """Bumpy depth maps, camera-facing noisy normals and a partial alpha mask, float64."""
    depths = 2 + 0.1 * torch.rand(B, V, 1, size, size, generator=gen, dtype=torch.float64)
    towards_camera = torch.tensor([0.0, 0.0, -2.0], dtype=torch.float64)[:, None, None]
    normals = torch.randn(B, V, 3, size, size, generator=gen, dtype=torch.float64) + towards_camera
    alphas = torch.rand(B, V, 1, size, size, generator=gen, dtype=torch.float64)
    return {"alphas": alphas, "depths": depths, "normals": torch.nn.functional.normalize(normals, dim=2)}


def test_dnc_is_one_for_a_consistent_plane_and_minus_one_for_flipped_normals():
    dnc = build_reward("dnc", fxfy=1.3889)
    depths, normal = plane_depths(30.0, fxfy=1.3889)
    normals = normal[:, None, None].expand(1, 1, 3, 10, 10)
    images = torch.ones(1, 1, 3, 10, 10, dtype=torch.float64)
    extras = {"alphas": torch.ones_like(depths), "depths": depths, "normals": normals}
    assert dnc.score(images, ["x"], extras).values.item() == pytest.approx(1.0, abs=1e-9)
    flipped = dnc.score(images, ["x"], {**extras, "normals": -normals}).values.item()
    assert flipped == pytest.approx(-1.0, abs=1e-9)
    # A different focal length back-projects the same depths to another surface: less consistent.
    assert build_reward("dnc", fxfy=0.5).score(images, ["x"], extras).values.item() < 0.999


@pytest.mark.parametrize("context", ["train", "inference"])
def test_dnc_gradients_match_finite_differences(context, gen):
    dnc = build_reward("dnc", reward_context=context)
    extras = dnc_inputs(gen)
    images = torch.ones(1, 2, 3, 8, 8, dtype=torch.float64)
    out = dnc.score(images, ["x"], extras, with_grad=True)
    assert (out.grads == 0).all()  # DNC does not look at colours
    assert set(out.extra_grads) == {"depths", "normals"}
    for key in ("depths", "normals"):
        d = torch.randn(extras[key].shape, generator=gen, dtype=torch.float64)
        analytic = (out.extra_grads[key] * d).sum()
        if context == "inference" and key == "depths":
            assert (out.extra_grads[key] == 0).all()  # the depth normals are a fixed target
            continue
        fd = directional_fd(lambda z: dnc.score(images, ["x"], {**extras, key: z}).values, extras[key], d)
        assert analytic.abs() > 1e-6 and torch.allclose(analytic, fd, rtol=1e-5)
    # Both contexts score the same; they differ only in what the gradient flows through.
    other = build_reward("dnc", reward_context="train" if context == "inference" else "inference")
    assert torch.equal(other.score(images, ["x"], extras).values, out.values)


def test_dnc_angle_mask_drops_grazing_pixels(gen):
    # A plane tilted 50° seen through a narrow lens: every pixel's normal is 50 ± 3° off the view ray.
    depths, normal = plane_depths(50.0, fxfy=8.0)
    normals = torch.nn.functional.normalize(
        normal[:, None, None] + 0.3 * torch.randn(1, 1, 3, 10, 10, generator=gen, dtype=torch.float64), dim=2
    )
    images = torch.ones(1, 1, 3, 10, 10, dtype=torch.float64)
    extras = {"alphas": torch.ones_like(depths), "depths": depths, "normals": normals}
    unmasked = build_reward("dnc", fxfy=8.0).score(images, ["x"], extras).values
    assert 0.5 < unmasked.item() < 0.99
    assert torch.equal(build_reward("dnc", fxfy=8.0, max_angle_deg=60).score(images, ["x"], extras).values, unmasked)
    assert build_reward("dnc", fxfy=8.0, max_angle_deg=40).score(images, ["x"], extras).values.item() == 0.0


def test_dnc_needs_its_extras_and_checks_arguments():
    images = torch.ones(1, 1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"dnc: extras is missing \['alphas', 'depths', 'normals'\]"):
        build_reward("dnc").score(images, ["x"])
    with pytest.raises(ValueError, match="reward_context='eval'"):
        build_reward("dnc", reward_context="eval")
    with pytest.raises(ValueError, match="max_angle_deg=120"):
        build_reward("dnc", max_angle_deg=120)


def test_dnc_through_the_renderer_prefers_splats_lying_on_their_surface(gen):
    # Flat Gaussians tiling the world plane z = 0, seen by the camera at azimuth 0 (on +z): aligned
    # discs (identity rotation, thin along z) agree with the rendered depth; randomly rotated ones do
    # not. The depth and normal gradients DNC returns reach the Gaussians' means and rotations.
    side = 10
    grid = torch.linspace(-0.3, 0.3, side)
    xy = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(1, -1, 2)
    N = xy.shape[1]
    means = torch.cat([xy, torch.zeros(1, N, 1)], -1)
    aligned = torch.tensor([1.0, 0, 0, 0]).expand(1, N, 4)
    tumbled = torch.nn.functional.normalize(torch.randn(1, N, 4, generator=gen), dim=-1)
    cameras = orbit_cameras([0.0], [0.0], width=24, height=24)
    dnc = build_reward("dnc")
    values = {}
    for name, quats in (("aligned", aligned), ("tumbled", tumbled)):
        splats = Splats(
            means=means.clone().requires_grad_(True),
            quats=quats.clone().requires_grad_(True),
            scales=torch.tensor([0.05, 0.05, 0.002]).expand(1, N, 3),
            opacities=torch.full((1, N), 0.95),
            colors=torch.full((1, N, 3), 0.5),
        )
        render = render_splats(splats, cameras, extra_features=gaussian_normals(splats, cameras))
        extras = {"alphas": render.alphas, "depths": render.depths,
                  "normals": rendered_normals(render.features, render.alphas)}
        out = dnc.score(render.images, ["x"], extras, with_grad=True)
        values[name] = out.values.item()
        if name == "tumbled":
            torch.autograd.backward([extras["depths"], extras["normals"]],
                                    [out.extra_grads["depths"], out.extra_grads["normals"]])
            assert splats.quats.grad.abs().max() > 0 and splats.means.grad.abs().max() > 0
    assert values["aligned"] > 0.99 and values["tumbled"] < values["aligned"] - 0.1
