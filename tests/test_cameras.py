import math

import pytest
import torch

from r2d3ray.config import RenderConfig
from r2d3ray.render.cameras import (Cameras, default_rig, jittered_rig, orbit_cameras, pixel_rays, plucker_rays,
                                     random_rig, render_rig)


def project(cameras: Cameras, points: torch.Tensor) -> torch.Tensor:
    """World points (..., V, P, 3) -> pixel coordinates (..., V, P, 2) through viewmats and Ks."""
    homo = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)
    cam = (homo @ cameras.viewmats.transpose(-1, -2))[..., :3]
    pix = cam @ cameras.Ks.transpose(-1, -2)
    return pix[..., :2] / pix[..., 2:]


def test_origin_projects_to_image_centre_from_every_default_view():
    for size in (256, 64):
        cams = default_rig(size=size)
        origin = torch.zeros(4, 1, 3)
        assert torch.allclose(project(cams, origin), torch.full((4, 1, 2), size / 2), atol=1e-4)
        # in front of every camera (OpenCV: positive z)
        assert (cams.viewmats[:, 2, 3] > 0).all()


def test_default_rig_matches_diffsplat():
    cams = default_rig()
    assert cams.viewmats.shape == (4, 4, 4) and cams.Ks.shape == (4, 3, 3)
    assert (cams.width, cams.height) == (256, 256)
    fov = 2 * torch.atan(0.5 * cams.width / cams.Ks[:, 0, 0])
    assert torch.allclose(fov.rad2deg(), torch.full((4,), 39.6), atol=0.05)
    centres = cams.c2w[:, :3, 3]
    assert torch.allclose(centres.norm(dim=-1), torch.full((4,), 1.4), atol=1e-5)
    assert (centres[:, 1] > 0).all()  # above the xz-plane (y up)
    elevation = torch.asin(centres[:, 1] / centres.norm(dim=-1)).rad2deg()
    assert torch.allclose(elevation, torch.full((4,), 10.0), atol=1e-3)
    azimuth = torch.atan2(centres[:, 0], centres[:, 2]).rad2deg() % 360
    assert torch.allclose(azimuth, torch.tensor([0.0, 90.0, 180.0, 270.0]), atol=1e-3)
    # rigid, right-handed rotations; camera x axis horizontal, y axis pointing (mostly) down
    rot = cams.viewmats[:, :3, :3]
    assert torch.allclose(rot @ rot.transpose(-1, -2), torch.eye(3).expand(4, 3, 3), atol=1e-5)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(4), atol=1e-5)
    assert torch.allclose(cams.c2w[:, 1, 0], torch.zeros(4), atol=1e-6)
    assert (cams.c2w[:, 1, 1] < -0.9).all()


def test_any_number_of_views_evenly_spaced():
    cams = default_rig(num_views=6, size=32, elevation_deg=-20.0)
    centres = cams.c2w[:, :3, 3]
    azimuth = torch.atan2(centres[:, 0], centres[:, 2]).rad2deg() % 360
    assert torch.allclose(azimuth, torch.arange(6) * 60.0, atol=1e-3)
    assert (centres[:, 1] < 0).all()


def test_jitter_bounds_seed_and_shared_offset():
    def rig(seed, **kw):
        return jittered_rig(generator=torch.Generator().manual_seed(seed), **kw)

    a, b, c = rig(0, batch_size=64), rig(0, batch_size=64), rig(1, batch_size=64)
    assert a.viewmats.shape == (64, 4, 4, 4) and a.Ks.shape == (64, 4, 3, 3)
    assert torch.equal(a.viewmats, b.viewmats) and not torch.equal(a.viewmats, c.viewmats)

    centres = a.c2w[..., :3, 3]  # (B, V, 3)
    elevation = torch.asin(centres[..., 1] / centres.norm(dim=-1)).rad2deg()
    azimuth = torch.atan2(centres[..., 0], centres[..., 2]).rad2deg()
    offset = (azimuth - torch.tensor([0.0, 90.0, 180.0, -90.0]) + 180) % 360 - 180
    assert offset.abs().max() <= 10.0 + 1e-3 and elevation.abs().max() <= 5.0 + 1e-3
    # one offset per object, shared by its views; objects differ
    assert torch.allclose(offset, offset[:, :1].expand(-1, 4), atol=1e-3)
    assert torch.allclose(elevation, elevation[:, :1].expand(-1, 4), atol=1e-3)
    assert offset[:, 0].std() > 2.0 and elevation[:, 0].std() > 1.0

    single = rig(3, num_views=2, size=64, elevation_deg=10.0, elev_delta_deg=0.0)
    assert single.viewmats.shape == (2, 4, 4) and single.width == 64
    elev = torch.asin(single.c2w[:, 1, 3] / 1.4).rad2deg()
    assert torch.allclose(elev, torch.full((2,), 10.0), atol=1e-3)


def centres_deg(cameras: Cameras) -> tuple[torch.Tensor, torch.Tensor]:
    """Azimuth in [0, 360) and elevation, in degrees, of every camera centre (..., V)."""
    centres = cameras.c2w[..., :3, 3]
    elevation = torch.asin(centres[..., 1] / centres.norm(dim=-1)).rad2deg()
    return torch.atan2(centres[..., 0], centres[..., 2]).rad2deg() % 360, elevation


def test_render_rig_is_the_configs_rig_with_or_without_jitter():
    render = RenderConfig(size=48, num_views=3, random_view=True, azi_delta_deg=30.0, elevation_deg=5.0,
                          elevation_delta_deg=4.0)
    # The jittered views: jittered_rig with the section's settings, drawn from the caller's generator.
    jittered = render_rig(render, generator=torch.Generator().manual_seed(7), batch_size=5)
    same = jittered_rig(3, 48, 30.0, 5.0, 4.0, generator=torch.Generator().manual_seed(7), batch_size=5)
    assert torch.equal(jittered.viewmats, same.viewmats) and torch.equal(jittered.Ks, same.Ks)
    assert jittered.viewmats.shape == (5, 3, 4, 4) and jittered.width == 48
    _, elevation = centres_deg(jittered)
    assert ((elevation - 5.0).abs() <= 2.0 + 1e-3).all()

    # Without the jitter (evaluation; training with random_view false): evenly spaced at the base elevation.
    fixed = render_rig(render, jitter=False, size=32)
    azimuth, elevation = centres_deg(fixed)
    assert fixed.viewmats.shape == (3, 4, 4) and fixed.width == 32
    assert torch.allclose(azimuth, torch.tensor([0.0, 120.0, 240.0]), atol=1e-3)
    assert torch.allclose(elevation, torch.full((3,), 5.0), atol=1e-3)
    off = render_rig(render.model_copy(update={"random_view": False}))
    assert torch.equal(off.viewmats, default_rig(3, 48, elevation_deg=5.0).viewmats)


def test_random_rig_draws_independent_views_in_range():
    a = random_rig(6, 16, (-8.0, 18.0), torch.Generator().manual_seed(0), batch_size=40)
    b = random_rig(6, 16, (-8.0, 18.0), torch.Generator().manual_seed(0), batch_size=40)
    assert a.viewmats.shape == (40, 6, 4, 4) and torch.equal(a.viewmats, b.viewmats)
    azimuth, elevation = centres_deg(a)
    assert elevation.min() >= -8.0 - 1e-3 and elevation.max() <= 18.0 + 1e-3
    assert azimuth.max() - azimuth.min() > 300  # all around the object
    assert elevation.std(dim=1).min() > 0  # each view its own elevation, unlike jittered_rig
    assert random_rig(2, 16, (0.0, 10.0)).viewmats.shape == (2, 4, 4)
    with pytest.raises(ValueError, match="elevation_range_deg"):
        random_rig(2, 16, (10.0, 0.0))


def test_indexing_and_rescaling_a_rig():
    rigs = jittered_rig(generator=torch.Generator().manual_seed(0), batch_size=3)  # (3, 4, ...)
    one = rigs[1]
    assert one.viewmats.shape == (4, 4, 4) and torch.equal(one.Ks, rigs.Ks[1])
    assert rigs[0][1:3].viewmats.shape == (2, 4, 4)
    big = one.rescaled(512)
    assert (big.width, big.height) == (512, 512) and torch.equal(big.viewmats, one.viewmats)
    assert torch.allclose(big.Ks, default_rig(size=512).Ks)  # the field of view is kept
    with pytest.raises(ValueError, match="viewmats"):
        one[0]  # a single 4x4 matrix is no rig


def test_pixel_rays_pass_through_pixel_centres():
    cams = default_rig(size=256)
    W, H = 8, 6  # a resolution other than the cameras' own: Ks are rescaled
    origins, dirs = pixel_rays(cams, W, H)
    assert origins.shape == dirs.shape == (4, H, W, 3)
    assert torch.allclose(dirs.norm(dim=-1), torch.ones(4, H, W), atol=1e-5)
    assert torch.allclose(origins, cams.c2w[:, None, None, :3, 3].expand_as(origins))
    points = (origins + 0.7 * dirs).reshape(4, H * W, 3)
    scaled = cams.rescaled(W, H)
    rows, cols = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    expected = torch.stack([cols, rows], dim=-1).reshape(1, H * W, 2).expand(4, -1, -1)
    assert torch.allclose(project(scaled, points), expected, atol=1e-3)


def test_plucker_rays():
    cams = jittered_rig(generator=torch.Generator().manual_seed(0), batch_size=2)
    plucker = plucker_rays(cams, 5, 5)
    assert plucker.shape == (2, 4, 6, 5, 5)
    moment, d = plucker[:, :, :3], plucker[:, :, 3:]
    assert torch.allclose(d.norm(dim=2), torch.ones(2, 4, 5, 5), atol=1e-5)
    assert (moment * d).sum(dim=2).abs().max() < 1e-5  # Plücker constraint m·d = 0
    # the moment is the same for every point on the ray: (o + t·d) × d = o × d
    origins = cams.c2w[..., :3, 3][:, :, :, None, None]
    for t in (0.3, 2.0):
        assert torch.allclose(torch.linalg.cross(origins + t * d, d, dim=2), moment, atol=1e-5)
    # the centre pixel of an odd-sized image looks straight at the origin
    assert moment[..., 2, 2].abs().max() < 1e-5
    assert torch.allclose(d[..., 2, 2], torch.nn.functional.normalize(-cams.c2w[..., :3, 3], dim=-1), atol=1e-5)


def test_diffsplat_plucker_convention():
    # DiffSplat's plucker_ray(bug=True): camera-space direction (j/(w-1)/f, i/(h-1)/f, 1)
    cams = default_rig(size=256)
    h, w = 4, 6
    _, dirs = pixel_rays(cams, w, h, pixel_convention="diffsplat_plucker")
    dirs_cam = torch.einsum("vij,vhwj->vhwi", cams.viewmats[:, :3, :3], dirs)
    f = cams.Ks[0, 0, 0] / 256
    i, j = torch.meshgrid(torch.arange(h) / (h - 1), torch.arange(w) / (w - 1), indexing="ij")
    expected = torch.nn.functional.normalize(torch.stack([j / f, i / f, torch.ones_like(i)], dim=-1), dim=-1)
    assert torch.allclose(dirs_cam, expected.expand(4, -1, -1, -1), atol=1e-5)
    assert plucker_rays(cams, w, h, "diffsplat_plucker").shape == (4, 6, h, w)


def test_bad_inputs_raise_value_error():
    good = default_rig(size=16)
    with pytest.raises(ValueError, match=r"viewmats.*\(\.\.\., V, 4, 4\)"):
        Cameras(good.viewmats[:, :3], good.Ks, 16, 16)
    with pytest.raises(ValueError, match=r"Ks.*\(\.\.\., V, 3, 3\)"):
        Cameras(good.viewmats, good.Ks[0, 0], 16, 16)
    nan = good.viewmats.clone()
    nan[0, 0, 3] = math.nan
    with pytest.raises(ValueError, match="viewmats.*non-finite"):
        Cameras(nan, good.Ks, 16, 16)
    with pytest.raises(ValueError, match="Ks.*not invertible"):
        Cameras(good.viewmats, torch.zeros_like(good.Ks), 16, 16)
    with pytest.raises(ValueError, match="leading"):
        Cameras(good.viewmats[:3], good.Ks, 16, 16)
    with pytest.raises(ValueError, match="width"):
        Cameras(good.viewmats, good.Ks, 0, 16)
    with pytest.raises(ValueError, match="same shape"):
        orbit_cameras([0.0, 90.0], [10.0])
    with pytest.raises(ValueError, match=r"elevations_deg.*\(-90, 90\)"):
        orbit_cameras([0.0], [90.0])  # looking straight down: no horizontal right axis
    with pytest.raises(ValueError, match="pixel_convention"):
        pixel_rays(good, pixel_convention="corner")


def test_to_device_keeps_everything():
    cams = default_rig(size=32).to("cpu")
    assert cams.num_views == 4 and (cams.width, cams.height) == (32, 32)
