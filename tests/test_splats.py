import math

import pytest
import torch

from r2d3ray.render.cameras import default_rig, jittered_rig
from r2d3ray.splats import Splats, decode_splatter_images, encode_splatter_images


def random_splats(B=2, N=7, seed=0) -> Splats:
    g = torch.Generator().manual_seed(seed)
    return Splats(
        means=torch.randn(B, N, 3, generator=g),
        quats=torch.randn(B, N, 4, generator=g),
        scales=torch.rand(B, N, 3, generator=g) * 0.02 + 1e-3,
        opacities=torch.rand(B, N, generator=g),
        colors=torch.rand(B, N, 3, generator=g),
    )


def random_maps(B, V, h, w, seed=0):
    """Per-pixel Gaussian attributes in the ranges the splatter layout can represent."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        colors=torch.rand(B, V, 3, h, w, generator=g),
        scales=5e-4 + torch.rand(B, V, 3, h, w, generator=g) * (2e-2 - 5e-4),
        quats=torch.nn.functional.normalize(torch.randn(B, V, 4, h, w, generator=g), dim=2),
        opacities=torch.rand(B, V, 1, h, w, generator=g),
    )


def test_splats_batch_methods():
    s = random_splats()
    assert s.validate() is s and (s.batch_size, s.num_gaussians) == (2, 7)
    one = s[-1]
    assert one.batch_size == 1 and torch.equal(one.colors[0], s.colors[1])
    with pytest.raises(IndexError):
        s[2]
    half = s.to(torch.float64)
    assert half.means.dtype == torch.float64 and torch.allclose(half.means.float(), s.means)
    s.means.requires_grad_(True)
    assert not s.detach().means.requires_grad


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("means", torch.zeros(2, 7), r"Splats.means.*\(B, N, 3\)"),
        ("quats", torch.zeros(2, 7, 3), r"Splats.quats.*\(B, N, 4\) = \(2, 7, 4\)"),
        ("opacities", torch.zeros(2, 7, 1), r"Splats.opacities.*\(B, N\) = \(2, 7\)"),
        ("colors", torch.zeros(1, 7, 3), r"Splats.colors.*\(B, N, 3\)"),
        ("scales", torch.full((2, 7, 3), math.inf), r"Splats.scales.*non-finite"),
    ],
)
def test_splats_validate_names_the_field(field, value, expected):
    s = random_splats()
    setattr(s, field, value)
    with pytest.raises(ValueError, match=expected):
        s.validate()


def test_decode_channel_mapping():
    B, V, h, w = 1, 4, 3, 5
    splatter = torch.zeros(B, V, 12, h, w)
    splatter[:, :, 0] = -1.0  # red 0
    splatter[:, :, 2] = 1.0  # blue 1
    splatter[:, :, 3] = -1.0  # largest scale
    splatter[:, :, 4] = 1.0  # smallest scale
    splatter[:, :, 6:10] = torch.tensor([0.5, -0.5, 0.25, 0.0])[:, None, None]
    splatter[:, :, 10] = 0.6
    splatter[:, :, 11] = -0.4  # z-depth 1.0
    s = decode_splatter_images(splatter, default_rig().c2w)
    assert s.means.shape == (1, V * h * w, 3) and s.validate().means.dtype == torch.float32
    assert torch.allclose(s.colors, torch.tensor([0.0, 0.5, 1.0]).expand(1, V * h * w, 3))
    assert torch.allclose(s.scales, torch.tensor([0.02, 5e-4, 0.5 * (0.02 + 5e-4)]).expand(1, V * h * w, 3))
    assert torch.allclose(s.quats, torch.tensor([0.5, -0.5, 0.25, 0.0]).expand(1, V * h * w, 4))
    assert torch.allclose(s.opacities, torch.full((1, V * h * w), 0.8))
    # (view, row, column) order; the centre pixel of each view (odd w, h) lies on its optical axis
    centres = s.means.reshape(V, h, w, 3)[:, 1, 2]
    cam_pos = default_rig().c2w[:, :3, 3]
    assert torch.allclose(centres, cam_pos * (1 - 1.0 / 1.4), atol=1e-5)


def sphere_depths(cameras, h, w, radius=0.5):
    """Z-depth of a sphere at the origin, ray-cast with DiffSplat's x/(W-1) pixel convention."""
    u = torch.arange(w) / (w - 1) * cameras.width  # pixel coordinates of the ray through column j
    v = torch.arange(h) / (h - 1) * cameras.height
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    pix = torch.stack([uu, vv, torch.ones_like(uu)], dim=-1)  # (h, w, 3)
    d_cam = torch.einsum("vij,hwj->vhwi", torch.linalg.inv(cameras.Ks), pix)  # z = 1: t is z-depth
    c2w = cameras.c2w
    d = torch.einsum("vij,vhwj->vhwi", c2w[:, :3, :3], d_cam)
    o = c2w[:, None, None, :3, 3]
    # |o + t d|^2 = r^2, nearest root
    a, b, c = (d * d).sum(-1), 2 * (o * d).sum(-1), (o * o).sum(-1) - radius**2
    disc = b * b - 4 * a * c
    hit = disc > 0
    t = (-b - disc.clamp_min(0).sqrt()) / (2 * a)
    return torch.where(hit, t, torch.full_like(t, 2.4)), hit  # (V, h, w) each


def test_sphere_encode_decode_lands_on_sphere():
    cams = default_rig(size=256)
    B, V, h, w = 1, 4, 24, 24
    depth, hit = sphere_depths(cams, h, w)
    assert hit.float().mean() > 0.2
    maps = random_maps(B, V, h, w)
    splatter = encode_splatter_images(**maps, depths=depth[None, :, None])
    assert splatter.shape == (B, V, 12, h, w) and splatter.abs().max() <= 1.0
    s = decode_splatter_images(splatter, cams.c2w)
    radii = s.means[0].norm(dim=-1)[hit.reshape(-1)]
    assert torch.allclose(radii, torch.full_like(radii, 0.5), atol=1e-4)
    # the other attributes come back unchanged
    def flat(t):
        return t.permute(0, 1, 3, 4, 2).reshape(B, V * h * w, -1)

    assert torch.allclose(s.colors, flat(maps["colors"]), atol=1e-6)
    assert torch.allclose(s.scales, flat(maps["scales"]), atol=1e-7)
    assert torch.allclose(s.quats, flat(maps["quats"]), atol=1e-6)
    assert torch.allclose(s.opacities, flat(maps["opacities"])[..., 0], atol=1e-6)


def test_encode_inverts_decode_with_batched_cameras():
    B, V, h, w = 2, 4, 6, 5
    cams = jittered_rig(generator=torch.Generator().manual_seed(0), batch_size=B)
    maps = random_maps(B, V, h, w, seed=1)
    g = torch.Generator().manual_seed(2)
    splatter = encode_splatter_images(**maps, depths=0.4 + 2 * torch.rand(B, V, 1, h, w, generator=g))
    splatter.requires_grad_(True)
    s = decode_splatter_images(splatter, cams.c2w)
    s.means.sum().backward()  # differentiable all the way to the splatter image
    assert splatter.grad[:, :, 11].abs().min() > 0

    # recover each Gaussian's z-depth in its own view, then re-encode
    means = s.means.detach().reshape(B, V, h * w, 3)
    z = (means @ cams.viewmats[..., 2:3, :3].transpose(-1, -2) + cams.viewmats[..., None, 2:3, 3])[..., 0]
    def unflat(t):  # (B, V·h·w, C) -> (B, V, C, h, w)
        return t.detach().reshape(B, V, h, w, -1).permute(0, 1, 4, 2, 3)

    again = encode_splatter_images(
        unflat(s.colors), unflat(s.scales), unflat(s.quats), unflat(s.opacities[..., None]), z.reshape(B, V, 1, h, w)
    )
    assert torch.allclose(again, splatter.detach(), atol=1e-5)
    # unbatched cameras give different points than the per-object jittered ones
    assert not torch.allclose(decode_splatter_images(splatter.detach(), default_rig().c2w).means, s.means)


def test_splatter_bad_shapes():
    c2w = default_rig().c2w
    with pytest.raises(ValueError, match=r"splatter.*\(B, V, 12, h, w\)"):
        decode_splatter_images(torch.zeros(1, 4, 11, 8, 8), c2w)
    with pytest.raises(ValueError, match=r"c2w.*\(V, 4, 4\) or \(B, V, 4, 4\)"):
        decode_splatter_images(torch.zeros(1, 4, 12, 8, 8), c2w[:3])
    maps = random_maps(1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"depths.*\(B, V, 1, h, w\)"):
        encode_splatter_images(**maps, depths=torch.ones(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"depths.*\(1, 4, 8, 8\)"):
        encode_splatter_images(**maps, depths=torch.ones(1, 4, 1, 8, 7))
