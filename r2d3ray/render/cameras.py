"""Cameras: orbit rigs around the origin, ray maps and Plücker embeddings.

Conventions (the same as DiffSplat's `src/utils/geo_util.py`):

* World frame: y up (DiffSplat's OpenGL world). Azimuth 0° puts the camera on +z, 90° on +x.
  Elevation > 0 puts the camera *above* the xz-plane (DiffSplat passes ``-elevation`` to an orbit
  function whose y is ``-r·sin(elev)``; the resulting positions are identical). Every camera looks
  at the origin.
* Camera frame: OpenCV (x right, y down, z forward), which is what gsplat takes.
  ``viewmats`` are world-to-camera 4x4, ``c2w`` their inverse.
* Intrinsics ``Ks`` are 3x3 in pixels for ``width`` x ``height`` images:
  ``fx = fxfy·width, fy = fxfy·height, cx = width/2, cy = height/2``. DiffSplat's normalised focal
  ``fxfy = 1422.222/1024 = 1.3889`` gives a field of view of 2·atan(0.5/1.3889) ≈ 39.6°.
* Pixel (row i, column j) of an image has its centre at pixel coordinate ``(j + 0.5, i + 0.5)``,
  so ``(0, 0)`` is the top-left corner of the image (gsplat's convention). Ray maps asked for at a
  resolution other than the cameras' own use ``Ks`` rescaled to that resolution.
* ``pixel_convention="diffsplat_plucker"`` reproduces DiffSplat's ``plucker_ray(bug=True)``, which
  places pixel j at ``W·(j/(W−1) + 0.5)`` (rays shifted by half an image). Its released
  transformers were trained on those rays, so the DiffSplat adapter must use it; everything else
  uses the default ``"center"``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from r2d3ray.splats import DIFFSPLAT_FXFY, DIFFSPLAT_RADIUS  # noqa: F401  (the splatter images' geometry)

if TYPE_CHECKING:
    from r2d3ray.config import RenderConfig

DIFFSPLAT_ELEVATION_DEG = 10.0
PIXEL_CONVENTIONS = ("center", "diffsplat_plucker")


@dataclass
class Cameras:
    """A rig of V pinhole cameras, optionally batched over leading dims (e.g. (B, V)).

    ``viewmats (..., V, 4, 4)`` world-to-camera (OpenCV), ``Ks (..., V, 3, 3)`` in pixels for
    ``width`` x ``height`` images. Checked on construction.
    """

    viewmats: torch.Tensor  # (..., V, 4, 4)
    Ks: torch.Tensor  # (..., V, 3, 3)
    width: int
    height: int

    def __post_init__(self):
        for name, mat, size in (("viewmats", self.viewmats, 4), ("Ks", self.Ks, 3)):
            if not isinstance(mat, torch.Tensor) or mat.ndim < 3 or mat.shape[-2:] != (size, size):
                got = tuple(mat.shape) if isinstance(mat, torch.Tensor) else type(mat).__name__
                raise ValueError(f"Cameras.{name}: expected a tensor of shape (..., V, {size}, {size}), got {got}")
            if not torch.isfinite(mat).all():
                raise ValueError(f"Cameras.{name}: contains non-finite values")
            # A camera matrix with a (near-)zero determinant has no inverse: no rays, no projection.
            if (torch.linalg.det(mat.double()).abs() < 1e-12).any():
                raise ValueError(f"Cameras.{name}: some {size}x{size} matrices are not invertible")
        if self.viewmats.shape[:-2] != self.Ks.shape[:-2]:
            raise ValueError(
                f"Cameras: viewmats {tuple(self.viewmats.shape)} and Ks {tuple(self.Ks.shape)} must share "
                "their leading (..., V) dims"
            )
        for name in ("width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Cameras.{name}: expected a positive int, got {value!r}")

    @property
    def c2w(self) -> torch.Tensor:
        """Camera-to-world (..., V, 4, 4), OpenCV camera axes."""
        return torch.linalg.inv(self.viewmats)

    @property
    def num_views(self) -> int:
        return self.viewmats.shape[-3]

    def to(self, device) -> "Cameras":
        return Cameras(self.viewmats.to(device), self.Ks.to(device), self.width, self.height)

    def __getitem__(self, index) -> "Cameras":
        """Index the leading dims: ``rigs[g]`` is object g's (V, ...) rig of a batched (B, V, ...) one,
        ``rig[2:4]`` views 2 and 3 of a (V, ...) rig. The result must still hold (..., V, 4, 4)."""
        return Cameras(self.viewmats[index], self.Ks[index], self.width, self.height)

    def rescaled(self, width: int, height: int | None = None) -> "Cameras":
        """The same poses rendering ``width`` x ``height`` images (default square); the intrinsics
        scale with the image, so the field of view is unchanged."""
        height = width if height is None else height
        scale = torch.tensor([width / self.width, height / self.height, 1.0]).to(self.Ks)
        return Cameras(self.viewmats, self.Ks * scale[:, None], width, height)


def orbit_cameras(
    azimuths_deg,
    elevations_deg,
    radius: float = DIFFSPLAT_RADIUS,
    fxfy: float = DIFFSPLAT_FXFY,
    width: int = 256,
    height: int = 256,
) -> Cameras:
    """Cameras on a sphere of ``radius`` looking at the origin.

    ``azimuths_deg`` and ``elevations_deg`` are sequences or tensors of the same shape (..., V);
    the result has that batch shape.
    """
    azim = torch.as_tensor(azimuths_deg, dtype=torch.float32)
    elev = torch.as_tensor(elevations_deg, dtype=torch.float32)
    if azim.ndim == 0 or azim.shape != elev.shape:
        raise ValueError(
            "orbit_cameras: azimuths_deg and elevations_deg must have the same shape (..., V), "
            f"got {tuple(azim.shape)} and {tuple(elev.shape)}"
        )
    if not (math.isfinite(radius) and radius > 0 and math.isfinite(fxfy) and fxfy > 0):
        raise ValueError(f"orbit_cameras: radius and fxfy must be positive and finite, got {radius}, {fxfy}")
    if not (elev.abs() < 90).all() or not torch.isfinite(azim).all():
        # at the poles the look-at has no horizontal right axis
        raise ValueError("orbit_cameras: elevations_deg must lie in (-90, 90) and azimuths_deg be finite")
    azim, elev = azim.deg2rad(), elev.deg2rad()
    position = radius * torch.stack(
        [elev.cos() * azim.sin(), elev.sin(), elev.cos() * azim.cos()], dim=-1
    )  # (..., V, 3)

    # OpenCV axes: z towards the origin, x = world-up × backward (right), y = z × x (down).
    forward = F.normalize(-position, dim=-1)
    world_up = torch.tensor([0.0, 1.0, 0.0]).expand_as(position)
    right = F.normalize(torch.linalg.cross(world_up, -forward), dim=-1)
    down = torch.linalg.cross(forward, right)
    rot_c2w = torch.stack([right, down, forward], dim=-1)  # (..., V, 3, 3), columns = camera axes

    viewmats = torch.zeros(*position.shape[:-1], 4, 4)
    viewmats[..., :3, :3] = rot_c2w.transpose(-1, -2)
    viewmats[..., :3, 3] = -(rot_c2w.transpose(-1, -2) @ position.unsqueeze(-1)).squeeze(-1)
    viewmats[..., 3, 3] = 1.0

    Ks = torch.zeros(*position.shape[:-1], 3, 3)
    Ks[..., 0, 0] = fxfy * width
    Ks[..., 1, 1] = fxfy * height
    Ks[..., 0, 2] = 0.5 * width
    Ks[..., 1, 2] = 0.5 * height
    Ks[..., 2, 2] = 1.0
    return Cameras(viewmats, Ks, width, height)


def _ring(num_views: int, size: int, azimuth_offsets: torch.Tensor, elevations: torch.Tensor,
          radius: float, fxfy: float) -> Cameras:
    """``num_views`` azimuths evenly spaced from ``azimuth_offsets`` (..., 1) at ``elevations`` (..., 1)."""
    base = torch.arange(num_views, dtype=torch.float32) * (360.0 / num_views)  # (V,)
    azimuths = base + azimuth_offsets  # (..., V)
    return orbit_cameras(azimuths, elevations.expand_as(azimuths), radius, fxfy, size, size)


def default_rig(
    num_views: int = 4,
    size: int = 256,
    elevation_deg: float = DIFFSPLAT_ELEVATION_DEG,
    radius: float = DIFFSPLAT_RADIUS,
    fxfy: float = DIFFSPLAT_FXFY,
) -> Cameras:
    """DiffSplat's input rig: ``num_views`` azimuths evenly spaced from 0° (4 → 0/90/180/270).

    Every fixed rig is this one: the generators' conditioning rig, picture grids and turntables
    (``num_views`` frames), and, at the config's elevation, evaluation renders (``render_rig``).
    """
    if num_views < 1:
        raise ValueError(f"default_rig: num_views must be >= 1, got {num_views}")
    return _ring(num_views, size, torch.zeros(1), torch.full((1,), float(elevation_deg)), radius, fxfy)


def jittered_rig(
    num_views: int = 4,
    size: int = 256,
    azi_delta_deg: float = 20.0,
    elevation_deg: float = 0.0,
    elev_delta_deg: float = 10.0,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    radius: float = DIFFSPLAT_RADIUS,
    fxfy: float = DIFFSPLAT_FXFY,
) -> Cameras:
    """Random views for reward renders, as DiffSplat's ``random_sample_cams``.

    One azimuth offset ~ U(−azi_delta/2, azi_delta/2) and one elevation offset
    ~ U(−elev_delta/2, elev_delta/2) are shared by all views of an object, so the views stay
    evenly spaced. ``elevation_deg`` is the base (0 in Nabla-R2D3's configs, which replaces
    DiffSplat's 10°). With ``batch_size`` the result is (B, V, ...) with independent offsets per
    object; without it (V, ...). Draws come from ``generator`` (CPU) for reproducibility.
    """
    if num_views < 1 or (batch_size is not None and batch_size < 1):
        raise ValueError(f"jittered_rig: num_views and batch_size must be >= 1, got {num_views}, {batch_size}")
    lead = (batch_size,) if batch_size is not None else ()
    offsets = torch.rand(*lead, 2, 1, generator=generator) - 0.5  # (..., 2, 1) in [-0.5, 0.5)
    return _ring(num_views, size, azi_delta_deg * offsets[..., 0, :],
                 elevation_deg + elev_delta_deg * offsets[..., 1, :], radius, fxfy)


def render_rig(
    render: "RenderConfig",
    size: int | None = None,
    jitter: bool | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> Cameras:
    """The views of a run config's renders (``render``: its ``render`` section), the one rig that
    training's reward renders, evaluation and ``infer --random-view`` share.

    Jittered (``jittered_rig`` with the section's deltas, drawn from ``generator``; (B, V, ...) with
    ``batch_size``) when ``jitter``, which defaults to ``render.random_view``; otherwise the same
    views without the jitter: evenly spaced from 0° at ``render.elevation_deg``. ``size``: pixels
    per side (default ``render.size``).
    """
    size = render.size if size is None else size
    jitter = render.random_view if jitter is None else jitter
    if jitter:
        return jittered_rig(render.num_views, size, render.azi_delta_deg, render.elevation_deg,
                            render.elevation_delta_deg, generator=generator, batch_size=batch_size)
    return default_rig(render.num_views, size, elevation_deg=render.elevation_deg)


def random_rig(
    num_views: int,
    size: int,
    elevation_range_deg: tuple[float, float],
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    radius: float = DIFFSPLAT_RADIUS,
    fxfy: float = DIFFSPLAT_FXFY,
) -> Cameras:
    """``num_views`` independent random views: azimuths ~ U[0°, 360°), elevations uniform in
    ``elevation_range_deg`` (low, high); (B, V, ...) with ``batch_size``, else (V, ...). Views of
    no fixed rig, for render banks that must cover every angle (the tiny critic's data)."""
    if num_views < 1 or (batch_size is not None and batch_size < 1):
        raise ValueError(f"random_rig: num_views and batch_size must be >= 1, got {num_views}, {batch_size}")
    low, high = elevation_range_deg
    if not -90 < low <= high < 90:
        raise ValueError(f"random_rig: elevation_range_deg must satisfy -90 < low <= high < 90, got {elevation_range_deg}")
    lead = (batch_size,) if batch_size is not None else ()
    azimuths = torch.rand(*lead, num_views, generator=generator) * 360.0
    elevations = low + (high - low) * torch.rand(*lead, num_views, generator=generator)
    return orbit_cameras(azimuths, elevations, radius, fxfy, size, size)


def pixel_rays(
    cameras: Cameras,
    width: int | None = None,
    height: int | None = None,
    pixel_convention: str = "center",
) -> tuple[torch.Tensor, torch.Tensor]:
    """World-space rays through every pixel: ``(origins, dirs)``, each (..., V, H, W, 3).

    ``dirs`` are unit vectors; ``origins`` are the camera centres. ``width``/``height`` default
    to the cameras' own; ``Ks`` are rescaled when they differ (see the module docstring for the
    pixel conventions).
    """
    width = cameras.width if width is None else width
    height = cameras.height if height is None else height
    if min(width, height) < 1 or (pixel_convention == "diffsplat_plucker" and min(width, height) < 2):
        raise ValueError(
            f"pixel_rays: width and height must be positive (>= 2 for diffsplat_plucker), got {width}x{height}"
        )
    device = cameras.viewmats.device
    cols = torch.arange(width, dtype=torch.float32, device=device)
    rows = torch.arange(height, dtype=torch.float32, device=device)
    if pixel_convention == "center":
        u, v = cols + 0.5, rows + 0.5
    elif pixel_convention == "diffsplat_plucker":
        u, v = width * (cols / (width - 1) + 0.5), height * (rows / (height - 1) + 0.5)
    else:
        raise ValueError(f"pixel_rays: pixel_convention must be one of {PIXEL_CONVENTIONS}, got {pixel_convention!r}")

    scale = torch.tensor([width / cameras.width, height / cameras.height, 1.0], device=device)
    Ks = cameras.Ks.float() * scale[:, None]  # (..., V, 3, 3) at the requested resolution
    grid_v, grid_u = torch.meshgrid(v, u, indexing="ij")
    pixels = torch.stack([grid_u, grid_v, torch.ones_like(grid_u)], dim=-1)  # (H, W, 3)

    c2w = cameras.c2w.float()  # (..., V, 4, 4)
    # camera-space direction K⁻¹·[u, v, 1], then rotated to world: (..., V, H, W, 3)
    rot = c2w[..., :3, :3] @ torch.linalg.inv(Ks)  # (..., V, 3, 3)
    dirs = F.normalize(torch.einsum("...ij,hwj->...hwi", rot, pixels), dim=-1)
    origins = c2w[..., None, None, :3, 3].expand_as(dirs)
    return origins, dirs


def plucker_rays(
    cameras: Cameras,
    width: int | None = None,
    height: int | None = None,
    pixel_convention: str = "center",
) -> torch.Tensor:
    """Plücker ray maps ``cat(o × d, d)``, shape (..., V, 6, H, W), with ``d`` unit-norm."""
    origins, dirs = pixel_rays(cameras, width, height, pixel_convention)
    plucker = torch.cat([torch.linalg.cross(origins, dirs, dim=-1), dirs], dim=-1)  # (..., V, H, W, 6)
    return plucker.movedim(-1, -3)
