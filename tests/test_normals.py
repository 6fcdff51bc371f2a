"""Normals from depth and from Gaussian axes, and their depth-normal consistency."""
import math

import pytest
import torch
import torch.nn.functional as F

from r2d3ray.render import (
    Cameras,
    default_rig,
    depth_normal_consistency,
    depth_to_normals,
    gaussian_normals,
    orbit_cameras,
    render_splats,
    rendered_normals,
)
from r2d3ray.splats import Splats


def plane_depth(normal, offset, cameras):
    """Exact z-depth (V, 1, H, W) of the camera-space plane n·p = offset seen through each pixel centre."""
    H, W = cameras.height, cameras.width
    rows, cols = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    K = cameras.Ks[0]
    rays = torch.stack([(cols - K[0, 2]) / K[0, 0], (rows - K[1, 2]) / K[1, 1], torch.ones_like(cols)], -1)  # z = 1
    return (offset / (rays @ torch.as_tensor(normal, dtype=torch.float32)))[None, None].expand(len(cameras.Ks), 1, H, W)


def plane_of_discs(size=0.8, count=48, thickness=1e-4):
    """A square of flat Gaussians in the world plane z = 0 (normal ±z), dense enough to be opaque."""
    ticks = torch.linspace(-size / 2, size / 2, count)
    xs, ys = torch.meshgrid(ticks, ticks, indexing="xy")
    N = count * count
    means = torch.stack([xs.reshape(-1), ys.reshape(-1), torch.zeros(N)], -1)[None]
    spacing = size / (count - 1)
    scales = torch.tensor([spacing, spacing, thickness]).expand(1, N, 3).clone()
    quats = torch.tensor([1.0, 0, 0, 0]).expand(1, N, 4).clone()
    return Splats(means, quats, scales, torch.full((1, N), 0.95), torch.full((1, N, 3), 0.5))


def test_fronto_parallel_plane_faces_the_camera_with_a_zero_border():
    cameras = default_rig(num_views=2, size=16)
    depths = torch.full((2, 1, 16, 16), 1.3)
    normals = depth_to_normals(depths, cameras)
    assert normals.shape == (2, 3, 16, 16)
    interior = normals[..., 1:-1, 1:-1]
    torch.testing.assert_close(interior, torch.tensor([0.0, 0, -1])[None, :, None, None].expand_as(interior))
    border = torch.ones(16, 16, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    assert (normals[..., border] == 0).all()


@pytest.mark.parametrize("normal", [(0.3, -0.2, -0.93), (-0.5, 0.4, -0.77)])
def test_tilted_plane_normal_recovered_from_depth(normal):
    cameras = default_rig(num_views=1, size=24)
    n = F.normalize(torch.tensor(normal), dim=0)
    depths = plane_depth(n, -1.2, cameras)  # plane in front of the camera, facing it (n·p = -1.2 < 0)
    assert (depths > 0).all()
    normals = depth_to_normals(depths[None], cameras)[0, 0]  # (3, H, W)
    torch.testing.assert_close(normals[:, 1:-1, 1:-1], n[:, None, None].expand(3, 22, 22), atol=1e-4, rtol=0)
    # the same plane seen from behind (normal flipped) still gets a normal facing the camera
    torch.testing.assert_close(depth_to_normals(plane_depth(-n, 1.2, cameras)[None], cameras)[0, 0], normals)


def test_depth_normals_vanish_next_to_background_and_are_differentiable():
    cameras = default_rig(num_views=1, size=12)
    depths = torch.full((1, 1, 12, 12), 1.4)
    depths[..., :, 6:] = 0.0  # right half is background
    depths.requires_grad_()
    normals = depth_to_normals(depths, cameras)
    assert (normals[0, :, 1:-1, 1:5].norm(dim=0) > 0.99).all()
    assert (normals[0, :, :, 5:] == 0).all()  # pixels touching the background have no normal
    normals[..., 1:-1, 1:5].sum().backward()
    assert torch.isfinite(depths.grad).all()


def test_gaussian_normals_are_the_shortest_axis_facing_each_camera():
    splats = plane_of_discs(count=4)
    front_and_back = orbit_cameras([0.0, 180.0], [0.0, 0.0])  # cameras on +z and −z
    normals = gaussian_normals(splats, front_and_back)  # (1, 2, N, 3)
    assert normals.shape == (1, 2, 16, 3)
    torch.testing.assert_close(normals, torch.tensor([0.0, 0, -1]).expand(1, 2, 16, 3), atol=1e-6, rtol=0)
    # rotate every disc 90° about y: its normal becomes ±x in the world, x in the camera at 90°
    half = math.sqrt(0.5)
    rotated = Splats(splats.means, torch.tensor([half, 0, half, 0]).expand(1, 16, 4), splats.scales,
                     splats.opacities, splats.colors)
    side = gaussian_normals(rotated, orbit_cameras([90.0], [0.0]))
    torch.testing.assert_close(side, torch.tensor([0.0, 0, -1]).expand(1, 1, 16, 3), atol=1e-6, rtol=0)


def test_rendered_plane_normals_agree_and_dnc_is_one():
    splats = plane_of_discs()
    cameras = orbit_cameras([0.0, 20.0, 180.0], [0.0, 25.0, -10.0], width=32, height=32)
    out = render_splats(splats, cameras, extra_features=gaussian_normals(splats, cameras))
    from_gaussians = rendered_normals(out.features, out.alphas)  # (1, V, 3, H, W)
    from_depth = depth_to_normals(out.depths, cameras)
    solid = out.alphas > 0.9
    assert solid.sum() > 3 * 100
    # the world normal ±z seen in each camera, oriented towards it
    world_to_cam = cameras.viewmats[:, :3, :3]
    expected = torch.sign(cameras.c2w[:, 2, 3])[:, None] * world_to_cam[:, :, 2]  # (V, 3)
    expected = expected[None, :, :, None, None].expand_as(from_gaussians)
    mask = solid.expand_as(from_gaussians)
    torch.testing.assert_close(from_gaussians[mask], expected[mask], atol=1e-3, rtol=0)
    dnc = depth_normal_consistency(from_depth, from_gaussians, out.alphas)
    assert dnc.shape == (1, 3)
    assert (dnc > 0.98).all()


def test_depth_normal_consistency_masks_and_extremes():
    normals = F.normalize(torch.randn(2, 3, 3, 8, 8), dim=2)
    alphas = torch.ones(2, 3, 1, 8, 8)
    torch.testing.assert_close(depth_normal_consistency(normals, normals, alphas), torch.ones(2, 3))
    torch.testing.assert_close(depth_normal_consistency(normals, -normals, alphas), -torch.ones(2, 3))
    torch.testing.assert_close(depth_normal_consistency(normals, 3 * normals, alphas), torch.ones(2, 3))
    transparent = alphas.clone()
    transparent[0, 1] = 0.2  # below the threshold: no pixel counts
    assert depth_normal_consistency(normals, normals, transparent)[0, 1] == 0
    zero_border = normals.clone()
    zero_border[..., 0, :] = 0  # undefined normals do not count
    other = normals.clone()
    other[..., 0, :] = -normals[..., 0, :]
    torch.testing.assert_close(depth_normal_consistency(zero_border, other, alphas), torch.ones(2, 3))


def test_bad_shapes_raise_value_error():
    cameras = default_rig(num_views=2, size=8)
    with pytest.raises(ValueError, match=r"depths expected shape \(\.\.\., V, 1, H, W\)"):
        depth_to_normals(torch.ones(2, 3, 8, 8), cameras)
    with pytest.raises(ValueError, match="depths are 6x8 but cameras are 8x8"):
        depth_to_normals(torch.ones(2, 1, 6, 8), cameras)
    with pytest.raises(ValueError, match="alphas expected shape"):
        depth_normal_consistency(torch.ones(1, 2, 3, 8, 8), torch.ones(1, 2, 3, 8, 8), torch.ones(1, 2, 8, 8))
    with pytest.raises(ValueError, match="normals_a and normals_b"):
        depth_normal_consistency(torch.ones(1, 2, 3, 8, 8), torch.ones(1, 2, 3, 8, 7), torch.ones(1, 2, 1, 8, 8))
    with pytest.raises(ValueError, match="features"):
        rendered_normals(torch.ones(1, 2, 4, 8, 8), torch.ones(1, 2, 1, 8, 8))
    with pytest.raises(ValueError, match="cameras.viewmats"):
        gaussian_normals(plane_of_discs(count=2), Cameras(cameras.viewmats.expand(3, 2, 4, 4),
                                                          cameras.Ks.expand(3, 2, 3, 3), 8, 8))
