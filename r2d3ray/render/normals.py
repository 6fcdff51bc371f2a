"""Surface normals of rendered splats, in camera space, and their depth-normal consistency.

Conventions: normals are unit vectors in the OpenCV camera frame of each view (x right, y down,
z forward) and *face the camera* (n · p < 0 for the surface point p), so a fronto-parallel plane
has normal (0, 0, −1). Where no normal is defined the vector is zero. Channels-first maps
(..., V, 3, H, W), like images.

Two independent estimates, which the DNC reward compares:

* ``depth_to_normals``: from the rendered expected depth, back-projected with K (gsplat's
  ``depth_to_points``, pixel centres at +0.5) and crossed central differences of the neighbours.
* ``gaussian_normals`` → rendered as extra feature channels by ``render_splats`` →
  ``rendered_normals``: each Gaussian's shortest axis (the normal of the flat disc it approximates),
  alpha-blended like a colour and divided by the accumulated alpha.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from gsplat.cuda._torch_impl import _quat_to_rotmat
from gsplat.utils import depth_to_points

from r2d3ray.render.cameras import Cameras
from r2d3ray.splats import Splats, describe_shape


def depth_to_normals(depths: torch.Tensor, cameras: Cameras) -> torch.Tensor:
    """Camera-space normals (..., V, 3, H, W) from z-depth maps (..., V, 1, H, W).

    ``cameras`` are the ones the depths were rendered with (Ks for H x W). The normal of pixel p
    is ``normalize((P[p+down] − P[p−down]) × (P[p+right] − P[p−right]))`` oriented towards the
    camera; it is zero on the 1-px border and wherever the pixel or one of its four neighbours
    has no depth (≤ 0, i.e. background), so silhouettes do not produce spurious normals.
    Differentiable with respect to ``depths``.
    """
    if not isinstance(depths, torch.Tensor) or depths.ndim < 4 or depths.shape[-3] != 1:
        raise ValueError(f"depth_to_normals: depths expected shape (..., V, 1, H, W), got {describe_shape(depths)}")
    H, W = depths.shape[-2:]
    if (W, H) != (cameras.width, cameras.height):
        raise ValueError(f"depth_to_normals: depths are {H}x{W} but cameras are {cameras.height}x{cameras.width}")
    lead = depths.shape[:-3]  # (..., V)
    try:
        Ks = cameras.Ks.to(device=depths.device, dtype=depths.dtype).expand(*lead, 3, 3)
    except RuntimeError:
        raise ValueError(
            f"depth_to_normals: cameras.Ks {tuple(cameras.Ks.shape)} does not broadcast to depths' (..., V) = {tuple(lead)}"
        ) from None
    identity = torch.eye(4, device=depths.device, dtype=depths.dtype).expand(*lead, 4, 4)
    # camera-to-world = identity: points stay in camera space
    points = depth_to_points(depths.movedim(-3, -1), identity, Ks)  # (..., V, H, W, 3)
    d_down = points[..., 2:, 1:-1, :] - points[..., :-2, 1:-1, :]  # (..., V, H-2, W-2, 3)
    d_right = points[..., 1:-1, 2:, :] - points[..., 1:-1, :-2, :]
    normals = F.normalize(torch.linalg.cross(d_down, d_right, dim=-1), dim=-1)
    centre = points[..., 1:-1, 1:-1, :]
    normals = torch.where((normals * centre).sum(-1, keepdim=True) > 0, -normals, normals)  # face the camera

    has_depth = depths[..., 0, :, :] > 0  # (..., V, H, W)
    defined = (
        has_depth[..., 1:-1, 1:-1] & has_depth[..., :-2, 1:-1] & has_depth[..., 2:, 1:-1]
        & has_depth[..., 1:-1, :-2] & has_depth[..., 1:-1, 2:]
    )
    normals = normals * defined[..., None]
    return F.pad(normals.movedim(-1, -3), (1, 1, 1, 1))  # (..., V, 3, H, W), zero border


def gaussian_normals(splats: "Splats", cameras: Cameras) -> torch.Tensor:
    """Per-Gaussian normals (B, V, N, 3) in each view's camera space, for ``render_splats``'s
    ``extra_features``: the rotation axis of the smallest scale, flipped to face the camera.
    Differentiable with respect to quats (the choice of axis is not)."""
    B = splats.means.shape[0]
    viewmats = cameras.viewmats.to(device=splats.means.device, dtype=splats.means.dtype)
    if viewmats.ndim not in (3, 4) or (viewmats.ndim == 4 and viewmats.shape[0] != B):
        raise ValueError(
            f"gaussian_normals: cameras.viewmats expected (V, 4, 4) or (B={B}, V, 4, 4), got {tuple(viewmats.shape)}"
        )
    viewmats = viewmats.expand(B, *viewmats.shape[-3:])  # (B, V, 4, 4)
    rotations = _quat_to_rotmat(splats.quats)  # (B, N, 3, 3), columns are the Gaussian's axes
    shortest = splats.scales.abs().argmin(dim=-1)  # (B, N)
    axis = rotations.gather(-1, shortest[..., None, None].expand(*shortest.shape, 3, 1)).squeeze(-1)  # (B, N, 3)
    rot, trans = viewmats[..., :3, :3], viewmats[..., :3, 3]  # (B, V, 3, 3), (B, V, 3)
    normals = torch.einsum("bvij,bnj->bvni", rot, axis)  # (B, V, N, 3)
    means_cam = torch.einsum("bvij,bnj->bvni", rot, splats.means) + trans[:, :, None]
    return torch.where((normals * means_cam).sum(-1, keepdim=True) > 0, -normals, normals)


def rendered_normals(features: torch.Tensor, alphas: torch.Tensor, min_alpha: float = 1e-4) -> torch.Tensor:
    """Alpha-normalised render of ``gaussian_normals``: ``Σ w·n / Σ w`` (..., 3, H, W).

    ``features`` are ``render_splats(..., extra_features=gaussian_normals(...)).features``
    (rendered over a zero background), ``alphas`` (..., 1, H, W). Zero where alpha < min_alpha.
    Not re-normalised: its length < 1 shows how much the blended Gaussians disagree.
    """
    if features.shape[-3] != 3 or alphas.shape[-3] != 1 or features.shape[:-3] + features.shape[-2:] != (
        alphas.shape[:-3] + alphas.shape[-2:]
    ):
        raise ValueError(
            f"rendered_normals: expected features (..., 3, H, W) and alphas (..., 1, H, W), "
            f"got {describe_shape(features)} and {describe_shape(alphas)}"
        )
    return torch.where(alphas >= min_alpha, features / alphas.clamp(min=min_alpha), 0.0)


def depth_normal_consistency(
    normals_a: torch.Tensor, normals_b: torch.Tensor, alphas: torch.Tensor, threshold: float = 0.5
) -> torch.Tensor:
    """Mean cosine between two normal maps (B, V, 3, H, W) over pixels with alpha > threshold
    where both normals are defined (non-zero): (B, V), in [−1, 1]; 0 where no pixel qualifies.
    Differentiable with respect to both maps (the mask is not)."""
    if normals_a.ndim != 5 or normals_a.shape[2] != 3 or normals_b.shape != normals_a.shape:
        raise ValueError(
            f"depth_normal_consistency: normals_a and normals_b expected the same shape (B, V, 3, H, W), "
            f"got {describe_shape(normals_a)} and {describe_shape(normals_b)}"
        )
    B, V, _, H, W = normals_a.shape
    if alphas.shape != (B, V, 1, H, W):
        raise ValueError(f"depth_normal_consistency: alphas expected shape {(B, V, 1, H, W)}, got {describe_shape(alphas)}")
    norm_a, norm_b = normals_a.norm(dim=2), normals_b.norm(dim=2)  # (B, V, H, W)
    mask = (alphas[:, :, 0] > threshold) & (norm_a > 1e-6) & (norm_b > 1e-6)
    cosine = (normals_a * normals_b).sum(2) / (norm_a * norm_b).clamp(min=1e-12)
    return (cosine * mask).sum((-1, -2)) / mask.sum((-1, -2)).clamp(min=1)

