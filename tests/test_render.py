"""The torch splat renderer against analytic cases, a brute-force reference and gradcheck."""

import numpy as np
import pytest
import torch
from PIL import Image

from r2d3ray.models.pipeline import SplatPipeline, render_views
from r2d3ray.models.tiny import TinySplatGenerator
from r2d3ray.render import (
    Cameras,
    RenderOutput,
    default_rig,
    rasterization,
    render_splats,
    save_grid_png,
    save_turntable_gif,
)
from r2d3ray.render.rasterize import gaussian_covariances, raw_quat_to_rotmat
from r2d3ray.splats import Splats


def pinhole(width=32, height=32, focal=40.0, num_views=1, dtype=torch.float64):
    """Cameras at the origin looking down +z (identity world-to-camera): (V, 4, 4), (V, 3, 3)."""
    viewmats = torch.eye(4, dtype=dtype).repeat(num_views, 1, 1)
    K = torch.tensor([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]], dtype=dtype)
    return viewmats, K.repeat(num_views, 1, 1)


def isotropic(means, scale, opacity, colors, dtype=torch.float64):
    """N isotropic Gaussians: (means, quats, scales, opacities, colors) with a leading batch dim 1."""
    means = torch.as_tensor(means, dtype=dtype).reshape(1, -1, 3)
    N = means.shape[1]
    quats = torch.tensor([1.0, 0, 0, 0], dtype=dtype).repeat(1, N, 1)
    scales = torch.full((1, N, 3), scale, dtype=dtype)
    opacities = torch.as_tensor(opacity, dtype=dtype).expand(1, N).clone()
    colors = torch.as_tensor(colors, dtype=dtype).reshape(1, N, -1)
    return means, quats, scales, opacities, colors


def random_scene(N, B=1, seed=0, dtype=torch.float64, scale=(0.02, 0.12)):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(B, N, 3, generator=g, dtype=dtype) * 0.3
    quats = torch.randn(B, N, 4, generator=g, dtype=dtype)
    scales = torch.empty(B, N, 3, dtype=dtype).uniform_(*scale, generator=g)
    opacities = torch.empty(B, N, dtype=dtype).uniform_(0.3, 0.99, generator=g)
    colors = torch.rand(B, N, 3, generator=g, dtype=dtype)
    return means, quats, scales, opacities, colors


def rade_gs_covariances(quats, scales):
    """RaDe-GS's ``computeCov3D`` (forward.cu, DiffSplat's renderer) transcribed line by line, glm's
    column-major storage included: q used as given (its normalisation is commented out there),
    ``M = S * R``, ``Sigma = transpose(M) * M``. Independent of the project's code. (..., 3, 3)."""
    out = np.empty((*quats.shape[:-1], 3, 3))
    for index in np.ndindex(*quats.shape[:-1]):
        r, x, y, z = quats[index].tolist()
        # glm::mat3(a0..a8) fills columns: column k is (a_3k, a_3k+1, a_3k+2)
        entries = [1 - 2 * (y * y + z * z), 2 * (x * y - r * z), 2 * (x * z + r * y),
                   2 * (x * y + r * z), 1 - 2 * (x * x + z * z), 2 * (y * z - r * x),
                   2 * (x * z - r * y), 2 * (y * z + r * x), 1 - 2 * (x * x + y * y)]
        R = np.array(entries).reshape(3, 3).T  # rows of the numpy array = glm rows
        S = np.diag(scales[index].tolist())
        M = S @ R
        out[index] = M.T @ M
    return torch.from_numpy(out).to(quats.dtype)


def brute_force(means, quats, scales, opacities, colors, viewmats, Ks, width, height, background, near_plane,
                gaussian_convention="gsplat"):
    """gsplat's kernel written as plainly as possible: every Gaussian at every pixel of one image,
    a Python loop front to back. One object (N,) and (C,) cameras; per-view colours allowed.
    "diffsplat": RaDe-GS's covariances (:func:`rade_gs_covariances`) and no 2D dilation."""
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    if gaussian_convention == "gsplat":
        covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)
        eps2d = 0.3
    else:
        covars, eps2d = rade_gs_covariances(quats, scales), 0.0
    images, alphas = [], []
    for c in range(viewmats.shape[0]):
        _, means2d, depths, conics, _ = _fully_fused_projection(
            means, covars, viewmats[c : c + 1], Ks[c : c + 1], width, height, eps2d=eps2d, near_plane=near_plane
        )
        means2d, depths, conics = means2d[0], depths[0], conics[0]
        view_colors = colors[c] if colors.ndim == 3 else colors
        ys, xs = torch.meshgrid(
            torch.arange(height, dtype=means.dtype) + 0.5, torch.arange(width, dtype=means.dtype) + 0.5, indexing="ij"
        )
        T = torch.ones(height, width, dtype=means.dtype)
        done = torch.zeros(height, width, dtype=torch.bool)
        out = torch.zeros(height, width, view_colors.shape[-1] + 1, dtype=means.dtype)
        for g in torch.argsort(depths).tolist():
            if not near_plane <= depths[g]:
                continue
            dx, dy = means2d[g, 0] - xs, means2d[g, 1] - ys
            a, b, cc = conics[g]
            sigma = 0.5 * (a * dx * dx + cc * dy * dy) + b * dx * dy
            alpha = (opacities[g] * torch.exp(-sigma)).clamp(max=0.999)
            used = (sigma >= 0) & (alpha >= 1 / 255) & ~done
            next_T = T * (1 - alpha)
            stop = used & (next_T <= 1e-4)
            done, used = done | stop, used & ~stop
            out += torch.where(used, alpha * T, 0.0)[..., None] * torch.cat([view_colors[g], depths[g : g + 1]])
            T = torch.where(used, next_T, T)
        rgb = out[..., :-1] + T[..., None] * background[c]
        expected_depth = out[..., -1:] / (1 - T[..., None]).clamp(min=1e-10)
        images.append(torch.cat([rgb, expected_depth], dim=-1))
        alphas.append(1 - T[..., None])
    return torch.stack(images), torch.stack(alphas)


def test_single_gaussian_matches_analytic_footprint():
    width, height, focal, scale, opacity = 40, 32, 50.0, 0.03, 0.8
    viewmats, Ks = pinhole(width, height, focal)
    u, v, z = 13.5, 20.5, 1.7  # project onto a pixel centre, off-axis
    x, y = (u - width / 2) * z / focal, (v - height / 2) * z / focal
    colors, alphas, _ = rasterization(
        *isotropic([x, y, z], scale, opacity, [1.0, 1.0, 1.0]), viewmats[None], Ks[None], width, height
    )
    # EWA: cov2d = J (s² I) Jᵀ + 0.3 I with J the perspective Jacobian at the mean
    J = torch.tensor([[focal / z, 0, -focal * x / z**2], [0, focal / z, -focal * y / z**2]], dtype=torch.float64)
    cov2d = scale**2 * J @ J.T + 0.3 * torch.eye(2, dtype=torch.float64)
    rows, cols = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    d = torch.stack([cols - u, rows - v], dim=-1).double()  # (H, W, 2)
    sigma = 0.5 * torch.einsum("hwi,ij,hwj->hw", d, torch.linalg.inv(cov2d), d)
    expected = (opacity * torch.exp(-sigma)).clamp(max=0.999)
    expected = torch.where(expected >= 1 / 255, expected, 0.0)

    assert alphas.shape == (1, 1, height, width, 1) and colors.shape == (1, 1, height, width, 4)
    torch.testing.assert_close(alphas[0, 0, ..., 0], expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(colors[0, 0, ..., 0], expected, atol=1e-10, rtol=0)  # white on black
    peak = divmod(int(alphas[0, 0, ..., 0].argmax()), width)
    assert peak == (int(v), int(u)) and alphas.max().item() == pytest.approx(opacity)
    covered = expected > 0
    assert covered.sum() > 20 and (expected[~covered] == 0).all()
    torch.testing.assert_close(colors[0, 0, ..., 3][covered], torch.full_like(expected[covered], z))


def test_raw_quaternion_rotation_is_rade_gs_formula():
    """diffsplat's R_raw(q): the 3DGS formula on q as given. For unit q it is gsplat's rotation;
    otherwise R_raw(c·u) = c²·R(u) + (1 − c²)·I, not a rotation. Its covariances equal a line-by-line
    transcription of RaDe-GS's computeCov3D; gsplat's convention ignores |q|."""
    from gsplat.cuda._torch_impl import _quat_to_rotmat

    g = torch.Generator().manual_seed(11)
    unit = torch.nn.functional.normalize(torch.randn(64, 4, generator=g, dtype=torch.float64), dim=-1)
    lengths = torch.empty(64, 1, dtype=torch.float64).uniform_(0.2, 2.0, generator=g)
    scales = torch.empty(64, 3, dtype=torch.float64).uniform_(5e-4, 2e-2, generator=g)
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(raw_quat_to_rotmat(unit), _quat_to_rotmat(unit), atol=1e-12, rtol=0)
    torch.testing.assert_close(raw_quat_to_rotmat(lengths * unit),
                               lengths[..., None] ** 2 * _quat_to_rotmat(unit) + (1 - lengths[..., None] ** 2) * eye,
                               atol=1e-12, rtol=0)
    raw = lengths * unit
    torch.testing.assert_close(gaussian_covariances(raw, scales, "diffsplat"), rade_gs_covariances(raw, scales),
                               atol=1e-15, rtol=1e-12)
    torch.testing.assert_close(gaussian_covariances(raw, scales, "gsplat"), gaussian_covariances(unit, scales, "gsplat"))
    torch.testing.assert_close(gaussian_covariances(unit, scales, "diffsplat"), gaussian_covariances(unit, scales, "gsplat"))
    # q = (c, 0, 0, 0) is the identity for every c; q = (0, c, 0, 0) scales the y and z axes by (1 − 2c²)
    c = 1.5
    s = torch.tensor([[0.01, 0.02, 0.03]], dtype=torch.float64)
    torch.testing.assert_close(gaussian_covariances(torch.tensor([[c, 0.0, 0, 0]], dtype=torch.float64), s, "diffsplat"),
                               torch.diag_embed(s**2))
    stretch = torch.tensor([1.0, (1 - 2 * c**2) ** 2, (1 - 2 * c**2) ** 2], dtype=torch.float64)
    torch.testing.assert_close(gaussian_covariances(torch.tensor([[0.0, c, 0, 0]], dtype=torch.float64), s, "diffsplat"),
                               torch.diag_embed(s**2 * stretch))
    with pytest.raises(ValueError, match="gaussian_convention must be one of"):
        gaussian_covariances(unit, scales, "3dgs")


def test_diffsplat_convention_single_gaussian_matches_analytic_footprint():
    """An unnormalised quaternion q = (0, c, 0, 0) with c = 1.5 stretches the y and z axes by
    (1 − 2c²)² = 12.25 in variance, and nothing is added on screen: cov2d = J·Σ·Jᵀ exactly."""
    width, height, focal, opacity, c = 40, 32, 50.0, 0.8, 1.5
    viewmats, Ks = pinhole(width, height, focal)
    u, v, z = 13.5, 17.5, 1.7  # project onto a pixel centre, off-axis
    x, y = (u - width / 2) * z / focal, (v - height / 2) * z / focal
    scales = torch.tensor([0.03, 0.012, 0.02], dtype=torch.float64)
    means, _, _, opacities, colors = isotropic([x, y, z], 1.0, opacity, [1.0, 1.0, 1.0])
    quats = torch.tensor([[[0.0, c, 0.0, 0.0]]], dtype=torch.float64)
    colors_out, alphas, meta = rasterization(means, quats, scales.reshape(1, 1, 3), opacities, colors, viewmats[None],
                                             Ks[None], width, height, gaussian_convention="diffsplat")

    covariance = torch.diag(scales**2 * torch.tensor([1.0, (1 - 2 * c**2) ** 2, (1 - 2 * c**2) ** 2], dtype=torch.float64))
    J = torch.tensor([[focal / z, 0, -focal * x / z**2], [0, focal / z, -focal * y / z**2]], dtype=torch.float64)
    cov2d = J @ covariance @ J.T  # no + eps2d
    conic = torch.linalg.inv(cov2d)
    torch.testing.assert_close(meta["conics"][0, 0, 0], torch.stack([conic[0, 0], conic[0, 1], conic[1, 1]]),
                               atol=0, rtol=1e-12)
    rows, cols = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    d = torch.stack([cols - u, rows - v], dim=-1).double()  # (H, W, 2)
    sigma = 0.5 * torch.einsum("hwi,ij,hwj->hw", d, conic, d)
    expected = (opacity * torch.exp(-sigma)).clamp(max=0.999)
    expected = torch.where(expected >= 1 / 255, expected, 0.0)
    torch.testing.assert_close(alphas[0, 0, ..., 0], expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(colors_out[0, 0, ..., 0], expected, atol=1e-10, rtol=0)
    assert (expected > 0).sum() > 20

    # gsplat's convention on the same Gaussian: the normalised q = (0, 1, 0, 0) leaves the axes alone, + 0.3 px²
    _, _, meta_gsplat = rasterization(means, quats, scales.reshape(1, 1, 3), opacities, colors, viewmats[None],
                                      Ks[None], width, height)
    conic_gsplat = torch.linalg.inv(J @ torch.diag(scales**2) @ J.T + 0.3 * torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(meta_gsplat["conics"][0, 0, 0],
                               torch.stack([conic_gsplat[0, 0], conic_gsplat[0, 1], conic_gsplat[1, 1]]), atol=0, rtol=1e-12)


def test_diffsplat_convention_adds_no_dilation_to_a_tiny_gaussian():
    """A Gaussian of 1 mm at 1.7 m is 0.03 px wide: gsplat's 0.3 px² dilation would make it 18x wider;
    the diffsplat convention keeps its 2D covariance exactly the projected one."""
    focal, z, scale = 50.0, 1.7, 1e-3
    viewmats, Ks = pinhole(16, 16, focal)
    scene = isotropic([0.0, 0.0, z], scale, 0.9, [1.0, 1.0, 1.0])
    projected = (focal * scale / z) ** 2  # px², J·s²I·Jᵀ on the axis
    _, _, meta = rasterization(*scene, viewmats[None], Ks[None], 16, 16, gaussian_convention="diffsplat")
    torch.testing.assert_close(meta["conics"][0, 0, 0], torch.tensor([1 / projected, 0.0, 1 / projected], dtype=torch.float64),
                               atol=1e-9, rtol=1e-12)
    _, _, meta = rasterization(*scene, viewmats[None], Ks[None], 16, 16)  # gsplat's convention
    dilated = projected + 0.3
    torch.testing.assert_close(meta["conics"][0, 0, 0], torch.tensor([1 / dilated, 0.0, 1 / dilated], dtype=torch.float64),
                               atol=1e-12, rtol=1e-12)
    # an explicit eps2d still wins over the convention's default
    _, _, meta = rasterization(*scene, viewmats[None], Ks[None], 16, 16, eps2d=0.3, gaussian_convention="diffsplat")
    torch.testing.assert_close(meta["conics"][0, 0, 0, 0], torch.tensor(1 / dilated, dtype=torch.float64))
    with pytest.raises(ValueError, match="gaussian_convention must be one of"):
        rasterization(*scene, viewmats[None], Ks[None], 16, 16, gaussian_convention="rade")


def test_gradcheck_diffsplat_convention():
    """Gradients through the raw-quaternion covariances, quaternion length included."""
    means, quats, scales, _, _ = random_scene(3, seed=12, scale=(0.04, 0.08))
    opacities = torch.tensor([[0.3, 0.5, 0.4]], dtype=torch.float64)
    colors = torch.rand(1, 3, 3, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    quats = 0.8 * torch.nn.functional.normalize(quats, dim=-1)  # |q| = 0.8: the covariance shrinks but stays full rank
    cameras = default_rig(num_views=2, size=8)
    viewmats, Ks = cameras.viewmats.double()[None], cameras.Ks.double()[None]

    def render(means, quats, scales, opacities, colors):
        images, alphas, _ = rasterization(means, quats, scales, opacities, colors, viewmats, Ks, 8, 8,
                                          render_mode="RGB+ED", gaussian_convention="diffsplat")
        return images, alphas

    inputs = tuple(t.clone().requires_grad_() for t in (means, quats, scales, opacities, colors))
    _, alphas = render(*inputs)
    assert 0.05 < alphas.max() < 0.99
    assert torch.autograd.gradcheck(render, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_pipeline_renders_in_its_gaussian_convention():
    """SplatPipeline hands its convention to every render the rewards see (render and render_views)."""
    torch.manual_seed(0)
    generator = TinySplatGenerator.from_config(
        dict(num_layers=1, num_attention_heads=2, attention_head_dim=8, resolution=8, caption_channels=16))
    cameras = default_rig(num_views=4, size=16)
    latents = torch.rand(1, *generator.latent_shape) * 2 - 1  # quaternion channels in [-1, 1], not unit
    splats = generator.latents_to_splats(latents)
    renders = {}
    for convention in ("gsplat", "diffsplat"):
        pipe = SplatPipeline(generator, num_steps=2, gaussian_convention=convention)
        assert pipe.gaussian_convention == convention
        renders[convention] = pipe.render(latents, cameras)["images"]
        torch.testing.assert_close(renders[convention], render_splats(splats, cameras, gaussian_convention=convention).images)
        torch.testing.assert_close(renders[convention], render_views(splats, cameras, gaussian_convention=convention)["images"])
    assert (renders["gsplat"] - renders["diffsplat"]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="gaussian_convention must be one of"):
        SplatPipeline(generator, num_steps=2, gaussian_convention="rade-gs")


def test_compositing_follows_depth_order():
    viewmats, Ks = pinhole(16, 16, 20.0)
    red, blue = [1.0, 0, 0], [0, 0, 1.0]

    def centre_pixel(z_red, z_blue):
        scene = isotropic([[0.0, 0, z_red], [0.0, 0, z_blue]], 0.2, 0.9, [red, blue])
        colors, _, _ = rasterization(*scene, viewmats[None], Ks[None], 16, 16, render_mode="RGB")
        return colors[0, 0, 8, 8]  # centre pixel (the means project to (8, 8), a pixel corner)

    front_red, front_blue = centre_pixel(1.0, 2.0), centre_pixel(2.0, 1.0)
    assert front_red[0] > 5 * front_red[2] and front_blue[2] > 5 * front_blue[0]
    torch.testing.assert_close(front_red, front_blue.flip(0))  # swapping the depths swaps the colours


def test_point_at_origin_renders_at_image_centre_from_every_default_view():
    cameras = default_rig(num_views=4, size=32)
    scene = isotropic([0.0, 0, 0], 0.02, 0.9, [1.0, 1.0, 1.0], dtype=torch.float32)
    _, alphas, _ = rasterization(*scene, cameras.viewmats[None], cameras.Ks[None], 32, 32)
    alphas = alphas[0, ..., 0]  # (V, H, W)
    centres = torch.arange(32) + 0.5
    total = alphas.sum((1, 2))
    assert (total > 0.5).all()
    torch.testing.assert_close((alphas.sum(1) * centres).sum(1) / total, torch.full((4,), 16.0))  # column
    torch.testing.assert_close((alphas.sum(2) * centres).sum(1) / total, torch.full((4,), 16.0))  # row


@pytest.mark.parametrize("gaussian_convention", ["gsplat", "diffsplat"])
@pytest.mark.parametrize("pairs_per_chunk", [1 << 22, 40])
def test_matches_brute_force_reference(pairs_per_chunk, gaussian_convention):
    """Two objects, three views, per-view colours, termination (opaque stacks), a Gaussian behind
    the near plane and one beyond the image; small chunks exercise the row-chunking path. The
    scene's quaternions are not unit (randn), so the two conventions render differently."""
    means, quats, scales, opacities, _ = random_scene(40, B=2, seed=3)
    # |q| in [0.6, 1.3] (decoded DiffSplat quaternions are not unit): sizes change only in "diffsplat"
    lengths = torch.empty(2, 40, 1, dtype=torch.float64).uniform_(0.6, 1.3, generator=torch.Generator().manual_seed(6))
    quats = torch.nn.functional.normalize(quats, dim=-1) * lengths
    means[:, :5] = torch.tensor([0.05, -0.02, 0.0], dtype=torch.float64) + 0.01 * torch.arange(5.0)[:, None]
    opacities[:, :5] = 0.995  # an opaque stack in the middle: pixels terminate (T <= 1e-4)
    scales[:, :5] = 0.1
    cameras = default_rig(num_views=3, size=24)
    viewmats, Ks = cameras.viewmats.double(), cameras.Ks.double()
    means[:, 5] = torch.linalg.inv(viewmats[0])[:3, :3] @ torch.tensor([0.0, 0, 0.005], dtype=torch.float64) + (
        torch.linalg.inv(viewmats[0])[:3, 3]
    )  # 5 mm in front of camera 0: closer than the near plane
    means[:, 6] = torch.tensor([5.0, 0, 0])  # off screen in every view
    colors = torch.rand(2, 3, 40, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    backgrounds = torch.rand(2, 3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    viewmats, Ks = viewmats.expand(2, 3, 4, 4), Ks.expand(2, 3, 3, 3)

    images, alphas, meta = rasterization(
        means, quats, scales, opacities, colors, viewmats, Ks, 24, 20, backgrounds=backgrounds,
        pairs_per_chunk=pairs_per_chunk, gaussian_convention=gaussian_convention,
    )
    assert images.shape == (2, 3, 20, 24, 4) and alphas.shape == (2, 3, 20, 24, 1)
    assert (meta["num_chunks"] > 1) == (pairs_per_chunk == 40)
    assert (alphas > 0.9998).any() and (alphas < 1e-3).any()  # some pixels terminated, some empty
    for b in range(2):
        ref_images, ref_alphas = brute_force(
            means[b], quats[b], scales[b], opacities[b], colors[b], viewmats[b], Ks[b], 24, 20, backgrounds[b], 0.01,
            gaussian_convention,
        )
        torch.testing.assert_close(images[b], ref_images, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(alphas[b], ref_alphas, atol=1e-9, rtol=1e-9)


def test_render_modes():
    scene = random_scene(30, seed=1, dtype=torch.float32)
    cameras = default_rig(num_views=2, size=16)
    args = (*scene, cameras.viewmats[None], cameras.Ks[None], 16, 16)
    rgb_ed, alphas, _ = rasterization(*args, render_mode="RGB+ED")
    rgb_d, _, _ = rasterization(*args, render_mode="RGB+D")
    rgb, _, _ = rasterization(*args, render_mode="RGB")
    d, _, _ = rasterization(*args, render_mode="D")
    ed, _, _ = rasterization(*args, render_mode="ED")
    assert rgb.shape[-1] == 3 and d.shape[-1] == 1 and ed.shape[-1] == 1 and rgb_d.shape[-1] == 4
    torch.testing.assert_close(rgb, rgb_ed[..., :3])
    torch.testing.assert_close(ed, rgb_ed[..., 3:])
    torch.testing.assert_close(d, rgb_d[..., 3:])
    torch.testing.assert_close(d, ed * alphas, atol=1e-5, rtol=1e-5)  # ED = Σwz / Σw
    z = (cameras.viewmats[:, None, :3, :3] @ scene[0][0, :, :, None]).squeeze(-1)[..., 2] + cameras.viewmats[:, None, 2, 3]
    hit = alphas[0, ..., 0] > 0.05  # (V, H, W)
    assert hit.any()
    for view in range(2):  # expected depth is a convex combination of the Gaussians' depths
        assert z[view].min() - 1e-5 <= ed[0, view, ..., 0][hit[view]].min()
        assert ed[0, view, ..., 0][hit[view]].max() <= z[view].max() + 1e-5


def test_gradcheck_all_parameters():
    """Double precision, a small scene away from the 1/255, 0.999 and 1e-4 thresholds."""
    means, quats, scales, _, _ = random_scene(4, seed=7, scale=(0.08, 0.15))
    opacities = torch.tensor([[0.3, 0.5, 0.4, 0.6]], dtype=torch.float64)
    colors = torch.rand(1, 4, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    cameras = default_rig(num_views=2, size=8)
    viewmats, Ks = cameras.viewmats.double()[None], cameras.Ks.double()[None]
    background = torch.full((1, 2, 3), 0.5, dtype=torch.float64)

    def render(means, quats, scales, opacities, colors):
        images, alphas, _ = rasterization(means, quats, scales, opacities, colors, viewmats, Ks, 8, 8,
                                          backgrounds=background, render_mode="RGB+ED")
        return images, alphas

    inputs = tuple(t.clone().requires_grad_() for t in (means, quats, scales, opacities, colors))
    _, alphas = render(*inputs)
    assert 0.05 < alphas.max() < 0.99  # the scene is visible but no pixel is near termination
    assert torch.autograd.gradcheck(render, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_chunked_backward_matches_single_chunk():
    scene = random_scene(60, seed=2, dtype=torch.float32)
    cameras = default_rig(num_views=2, size=24)
    weights = torch.rand(1, 2, 24, 24, 4, generator=torch.Generator().manual_seed(0))
    grads = []
    for pairs_per_chunk in (1 << 22, 1500):
        inputs = [t.clone().requires_grad_() for t in scene]
        images, alphas, meta = rasterization(*inputs, cameras.viewmats[None], cameras.Ks[None], 24, 24,
                                             pairs_per_chunk=pairs_per_chunk)
        ((images * weights).sum() + alphas.sum()).backward()
        grads.append([t.grad for t in inputs])
    assert meta["num_chunks"] > 2
    for single, chunked in zip(*grads):
        torch.testing.assert_close(single, chunked, atol=1e-5, rtol=1e-4)


def test_render_splats_shapes_background_and_features():
    B, N, V = 2, 50, 3
    means, quats, scales, opacities, colors = random_scene(N, B=B, seed=4, dtype=torch.float32)
    splats = Splats(means, quats, scales, opacities, colors)
    cameras = default_rig(num_views=V, size=20)
    out = render_splats(splats, cameras, extra_features=torch.ones(B, N, 2))
    assert isinstance(out, RenderOutput)
    assert out.images.shape == (B, V, 3, 20, 20) and out.alphas.shape == (B, V, 1, 20, 20)
    assert out.depths.shape == (B, V, 1, 20, 20) and out.features.shape == (B, V, 2, 20, 20)
    torch.testing.assert_close(out.features, out.alphas.expand(-1, -1, 2, -1, -1))  # ones over a zero background
    per_view = torch.arange(V, dtype=torch.float32)[None, :, None, None].expand(B, V, N, 1)
    out_pv = render_splats(splats, cameras, extra_features=per_view)
    torch.testing.assert_close(out_pv.features, out.alphas * torch.arange(V, dtype=torch.float32)[None, :, None, None, None])
    torch.testing.assert_close(out_pv.images, out.images)

    transparent = Splats(means, quats, scales, torch.zeros(B, N), colors)
    empty = render_splats(transparent, cameras)
    assert empty.features is None
    assert (empty.images == 1).all() and (empty.alphas == 0).all() and (empty.depths == 0).all()  # white default
    black = render_splats(transparent, cameras, background=(0.0, 0.0, 0.0))
    assert (black.images == 0).all()
    rig_per_object = Cameras(cameras.viewmats.expand(B, V, 4, 4), cameras.Ks.expand(B, V, 3, 3), 20, 20)
    torch.testing.assert_close(render_splats(splats, rig_per_object).images, render_splats(splats, cameras).images)


def test_near_plane_culls_gaussians_behind_and_too_close():
    viewmats, Ks = pinhole(16, 16, 20.0)
    for z in (-1.0, 0.0, 0.005):
        _, alphas, meta = rasterization(*isotropic([0.0, 0, z], 0.01, 0.9, [1.0, 1, 1]), viewmats[None], Ks[None], 16, 16)
        assert (alphas == 0).all() and (meta["radii"] == 0).all()


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(means=torch.zeros(1, 5, 2)), r"means expected shape \[\.\.\., N, 3\]"),
        (dict(quats=torch.zeros(1, 5, 3)), r"quats expected shape \(1, 5, 4\)"),
        (dict(opacities=torch.zeros(1, 4)), r"opacities expected shape \(1, 5\)"),
        (dict(colors=torch.zeros(1, 4, 3)), r"colors expected shape"),
        (dict(viewmats=torch.zeros(1, 2, 3, 4)), r"viewmats expected shape \(1, 2, 4, 4\)"),
        (dict(Ks=torch.zeros(1, 3, 3, 3)), r"Ks expected shape \(1, 2, 3, 3\)"),
        (dict(backgrounds=torch.zeros(1, 2, 4)), r"backgrounds expected shape \(1, 2, 3\)"),
        (dict(means=torch.full((1, 5, 3), float("nan"))), r"means contains non-finite"),
        (dict(scales=torch.full((1, 5, 3), float("inf"))), r"scales contains non-finite"),
        (dict(viewmats=torch.zeros(1, 2, 4, 4)), r"viewmats contains non-invertible"),
        (dict(render_mode="RGBD"), r"render_mode must be one of"),
        (dict(width=0), r"width must be a positive int"),
    ],
)
def test_bad_input_raises_value_error(change, match):
    cameras = default_rig(num_views=2, size=8)
    args = dict(zip(("means", "quats", "scales", "opacities", "colors"), random_scene(5, dtype=torch.float32)))
    args.update(viewmats=cameras.viewmats[None], Ks=cameras.Ks[None], width=8, height=8,
                backgrounds=torch.ones(1, 2, 3))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        rasterization(**args)


def test_render_splats_rejects_mismatched_inputs():
    splats = Splats(*random_scene(10, B=2, dtype=torch.float32))
    cameras = default_rig(num_views=2, size=8)
    with pytest.raises(ValueError, match="extra_features expected shape"):
        render_splats(splats, cameras, extra_features=torch.zeros(2, 9, 3))
    with pytest.raises(ValueError, match="background expected"):
        render_splats(splats, cameras, background=(1.0, 1.0))
    with pytest.raises(ValueError, match=r"cameras.viewmats expected \(V, 4, 4\) or \(B=2"):
        render_splats(splats, Cameras(cameras.viewmats.expand(3, 2, 4, 4), cameras.Ks.expand(3, 2, 3, 3), 8, 8))


def test_pictures_write_readable_png_and_gif(tmp_path):
    splats = Splats(*random_scene(200, B=2, seed=9, dtype=torch.float32, scale=(0.02, 0.06)))
    images = render_splats(splats, default_rig(num_views=4, size=16)).images  # (2, 4, 3, 16, 16)
    path = save_grid_png(images, tmp_path / "grid.png")
    with Image.open(path) as grid:
        assert grid.size == (4 * 18 + 2, 2 * 18 + 2)  # 2-px white padding around 16-px tiles
        pixels = np.asarray(grid.convert("RGB"))
    assert pixels.min() < 200 and pixels[0, 0].tolist() == [255, 255, 255]
    listed = save_grid_png([images[0], images[1, 0]], tmp_path / "list.png")
    with Image.open(listed) as grid:
        assert grid.size == (4 * 18 + 2, 2 * 18 + 2)

    gif = save_turntable_gif(splats[0], tmp_path / "turn.gif", num_frames=10, size=24)
    with Image.open(gif) as animation:
        assert animation.n_frames == 10 and animation.size == (24, 24)
        first = np.asarray(animation.convert("RGB"))
        animation.seek(5)
        middle = np.asarray(animation.convert("RGB"))
    assert first.min() < 200 and not np.array_equal(first, middle)  # an object, seen from turning views
    with pytest.raises(ValueError, match="one object"):
        save_turntable_gif(splats, tmp_path / "two.gif")
