"""Pictures for people: multi-view grids (PNG) and turntables (GIF) of splats."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from r2d3ray.render.cameras import DIFFSPLAT_ELEVATION_DEG, DIFFSPLAT_RADIUS, Cameras, orbit_cameras
from r2d3ray.render.rasterize import render_splats
from r2d3ray.splats import Splats, describe_shape


def save_grid_png(images, path: str | os.PathLike, nrow: int | None = None, padding: int = 2) -> str:
    """Write images in [0, 1] as one grid PNG (see :func:`grid_image`); returns the path."""
    grid = grid_image(images, nrow, padding)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


def grid_image(images, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Images in [0, 1] as one grid, (H', W', 3) uint8.

    ``images``: (B, V, 3, H, W) (one row per object unless ``nrow`` says otherwise),
    (N, 3, H, W), or a list of (3, H, W) / (V, 3, H, W) tensors of the same H x W (one row per
    list entry). ``nrow`` = images per row. White padding, values clamped to [0, 1].
    """
    from torchvision.utils import make_grid  # torchvision is slow to import; only pictures need it

    if isinstance(images, (list, tuple)):
        if not images or not all(isinstance(t, torch.Tensor) and t.ndim in (3, 4) for t in images):
            raise ValueError("grid_image: a list of images must hold (3, H, W) or (V, 3, H, W) tensors")
        rows = [t.detach().float().cpu().reshape(-1, *t.shape[-3:]) for t in images]
        if len({r.shape[1:] for r in rows}) != 1:
            raise ValueError(f"grid_image: list entries differ in (3, H, W): {[tuple(r.shape[1:]) for r in rows]}")
        default_nrow = max(r.shape[0] for r in rows)
        images = torch.cat([torch.cat([r, r.new_ones(default_nrow - r.shape[0], *r.shape[1:])]) for r in rows])
    elif isinstance(images, torch.Tensor) and images.ndim in (4, 5):
        default_nrow = images.shape[1] if images.ndim == 5 else images.shape[0]
        images = images.detach().float().cpu().reshape(-1, *images.shape[-3:])
    else:
        raise ValueError(f"grid_image: images expected (B, V, 3, H, W), (N, 3, H, W) or a list, got {describe_shape(images)}")
    if images.shape[1] != 3:
        raise ValueError(f"grid_image: images need 3 channels (..., 3, H, W), got {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError("grid_image: images contain non-finite values")
    grid = make_grid(images.clamp(0, 1), nrow=nrow or default_nrow, padding=padding, pad_value=1.0)  # (3, H', W')
    return _to_uint8(grid)


@torch.no_grad()
def save_turntable_gif(
    splats: "Splats",
    path: str | os.PathLike,
    num_frames: int = 36,
    size: int = 256,
    elevation_deg: float = DIFFSPLAT_ELEVATION_DEG,
    radius: float = DIFFSPLAT_RADIUS,
    frame_ms: int = 80,
    background: Sequence[float] = (1.0, 1.0, 1.0),
) -> str:
    """Render one object (B = 1) from ``num_frames`` azimuths 0..360° and write a looping GIF."""
    if splats.means.ndim != 3 or splats.means.shape[0] != 1:
        raise ValueError(f"save_turntable_gif: splats must hold one object (B = 1), got means {describe_shape(splats.means)}")
    if num_frames < 1 or size < 1:
        raise ValueError(f"save_turntable_gif: num_frames and size must be >= 1, got {num_frames}, {size}")
    azimuths = torch.arange(num_frames, dtype=torch.float32) * (360.0 / num_frames)
    cameras = orbit_cameras(azimuths, torch.full_like(azimuths, elevation_deg), radius, width=size, height=size)
    frames = []
    views_per_pass = 8  # bounds memory; the renderer chunks internally too
    for start in range(0, num_frames, views_per_pass):
        views = slice(start, start + views_per_pass)
        part = Cameras(cameras.viewmats[views], cameras.Ks[views], size, size)
        images = render_splats(splats.detach(), part, background=background).images[0]  # (v, 3, H, W)
        frames += [Image.fromarray(_to_uint8(image)) for image in images]
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    return path


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] → (H, W, 3) uint8."""
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()

