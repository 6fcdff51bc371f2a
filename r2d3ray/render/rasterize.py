"""Differentiable Gaussian-splat rasterisation: gsplat on CUDA, our own torch renderer elsewhere.

``rasterization`` keeps gsplat 1.5.3's call (argument order, shapes with leading batch dims
``...``, ``render_mode``, outputs). CUDA tensors go to ``gsplat.rasterization``. gsplat has no CPU
rasteriser (its ``_torch_impl`` covers projection only; the pixel stage needs CUDA), so CPU tensors
(or ``backend="torch"``) go to the renderer below, which follows gsplat's kernel
(``RasterizeToPixels3DGSFwd.cu``, ``ProjectionEWA3DGSFused.cu``) so the two agree:

* projection with gsplat's pure-torch helpers (EWA, Jacobian clamped to 1.3x the FoV), covariance
  dilated by ``eps2d`` (0.3 px²; 0 in the "diffsplat" convention below), Gaussians culled when
  their depth is outside ``[near_plane, far_plane]``, their opacity is below 1/255 or their box
  misses the image;
* pixel (row i, column j) is sampled at ``(j + 0.5, i + 0.5)``;
  ``alpha = min(0.999, opacity·exp(−σ))``, pairs with ``alpha < 1/255`` are skipped;
* front-to-back compositing in depth order; a pixel stops *before* the first Gaussian whose
  ``next_T = T·(1 − alpha) ≤ 1e-4`` (that Gaussian is not added, exactly as the kernel);
* ``render_alphas = 1 − T``; background added as ``T·background``; "ED" = Σwz / Σw.

How the torch renderer works (memory bounded, vectorised):

1. Each visible Gaussian gets gsplat's opacity-aware box, ``ceil(min(3.33, sqrt(2·ln(255·o)))·σ)``
   pixels. Outside that box its alpha is provably below 1/255 (opacities <= 1), so enumerating its pixels
   finds every (pixel, Gaussian) pair that contributes: culling loses nothing.
2. Rows of all B·C images are laid end to end and cut into *chunks* of whole rows holding at most
   ``pairs_per_chunk`` box pairs (counted exactly, with a difference array over rows).
3. Per chunk (``_composite_rows``), without autograd: enumerate, per box row, the span of columns
   where alpha >= 1/255 (an interval of the quadratic σ); stable-sort the pairs by pixel
   (candidates are already in depth order, so each pixel's run is front-to-back); evaluate alpha
   and ``log T`` (a segmented exclusive cumsum of ``log(1 − α)`` in float64) and keep only the
   pairs that contribute (alpha >= 1/255, before the 1e-4 stop). Then, with autograd, recompute
   alpha and T for the kept pairs only (in dense scenes most pairs lie behind opaque surfaces) and
   sum ``w = α·T`` per pixel with ``segment_reduce``. Everything is plain torch autograd.
4. With more than one chunk and gradients wanted, each chunk runs under
   ``torch.utils.checkpoint``: the forward keeps only the chunk's output, and the backward
   recomputes one chunk at a time. Peak memory is therefore set by ``pairs_per_chunk``, not by
   the image or scene size: 4 views at 256² of 65,536 Gaussians, forward + backward, peak at
   about 0.9 GiB above the process baseline on CPU (benchmarks/bench_render.py measures it).

``render_splats`` is the convenience the rest of the project uses: (B objects × V views) renders
over a white background, images/alphas/depths as (B, V, C, H, W).

Gaussian conventions (``gaussian_convention``): how (quaternion, scales) become a 3D covariance and
whether the 2D covariance is dilated. Both backends implement both.

* ``"gsplat"`` (default): gsplat's own. The quaternion is normalised, ``R = R(q/|q|)``, and each
  2D covariance is dilated by ``eps2d = 0.3`` px² (gsplat's ``add_blur``).
* ``"diffsplat"``: what DiffSplat's renderer computes. DiffSplat renders with RaDe-GS's fork of
  ``diff_gaussian_rasterization`` and hands it the decoded quaternion channels as they are
  (``gs_util.render``: ``rotations=pc.rotation``, ``kernel_size=0``). RaDe-GS's ``computeCov3D``
  (``cuda_rasterizer/forward.cu``) has the original 3DGS normalisation commented out
  (``glm::vec4 q = rot;// / glm::length(rot);``), so it evaluates the 3DGS unit-quaternion
  formula on the raw q = (w, x, y, z)::

      R_raw(q) = [[1 − 2(y²+z²), 2(xy − wz),   2(xz + wy)  ],
                  [2(xy + wz),   1 − 2(x²+z²), 2(yz − wx)  ],
                  [2(xz − wy),   2(yz + wx),   1 − 2(x²+y²)]],     Σ = R_raw·S²·R_rawᵀ.

  For |q| ≠ 1 this is not a rotation: R_raw(q) = |q|²·R(q/|q|) + (1 − |q|²)·I, so the covariance
  changes with the quaternion's length, and is not just scaled (q = (c, 0, 0, 0) gives I for every
  c; q = (0, c, 0, 0) gives diag(1, 1 − 2c², 1 − 2c²)). (3DGS's Python side normalises before the
  kernel, ``build_rotation``/``rotation_activation``; DiffSplat's decoder path does not.) Its 2D
  covariance gets ``kernel_size = 0``: no dilation, ``eps2d = 0``. On CUDA the covariances are built
  here and passed to gsplat as ``covars`` (gsplat then ignores quats/scales).

  What the convention does *not* change (RaDe-GS's kernel differs from gsplat's there too; these
  stay gsplat's): RaDe-GS multiplies the opacity by ``sqrt(det/(det + 1e-6) + 1e-6)`` (``det``
  the 2D covariance's determinant in px⁴; 0 when ``det <= 1e-6``), which dims the smallest
  DiffSplat Gaussians at 256² by up to ~2% and drops on-screen-degenerate ones; it clamps alpha at
  0.99 (gsplat 0.999); its box is 3σ of the larger eigenvalue (gsplat's opacity-aware 3.33σ, which
  keeps every pair above 1/255); and its depth is RaDe-GS's ray-plane depth, not Σwz/Σw. Pixel
  centres agree: both put the principal point cx = W/2 between pixels W/2 − 1 and W/2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from gsplat.cuda._torch_impl import _persp_proj, _quat_scale_to_covar_preci, _world_to_cam
from torch.utils.checkpoint import checkpoint

from r2d3ray.render.cameras import Cameras
from r2d3ray.splats import Splats, describe_shape

RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")
ALPHA_THRESHOLD = 1.0 / 255.0  # gsplat's ALPHA_THRESHOLD: fainter pairs are skipped
MAX_ALPHA = 0.999  # gsplat clamps alpha so that 1 - alpha never reaches 0
TRANSMITTANCE_MIN = 1e-4  # a pixel stops before the Gaussian that would bring T to <= this
RADIUS_SIGMAS = 3.33  # gsplat's box half-size in standard deviations (before opacity-awareness)
DEFAULT_PAIRS_PER_CHUNK = 1 << 22  # ~4M (pixel, Gaussian) box pairs: < 1 GB peak, and one chunk for 64² renders
GAUSSIAN_CONVENTIONS = ("gsplat", "diffsplat")  # see the module docstring
# The screen-space dilation (px²) each convention adds to 2D covariances when eps2d is not given.
DEFAULT_EPS2D = {"gsplat": 0.3, "diffsplat": 0.0}


def raw_quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """R_raw(q) (..., 3, 3): the 3DGS quaternion formula on q (..., 4) wxyz *without* normalising q,
    as RaDe-GS's ``computeCov3D`` evaluates it (DiffSplat's renderer). Equals R(q/|q|) for unit q."""
    w, x, y, z = quats.unbind(-1)
    rows = (
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    )  # fmt: skip
    return torch.stack(rows, dim=-1).unflatten(-1, (3, 3))


def gaussian_covariances(quats: torch.Tensor, scales: torch.Tensor, gaussian_convention: str = "gsplat") -> torch.Tensor:
    """World-space 3D covariances (..., N, 3, 3) from quats (..., N, 4) wxyz and scales (..., N, 3).

    "gsplat": gsplat's ``_quat_scale_to_covar_preci`` (q normalised); "diffsplat": (R_raw·S)(R_raw·S)ᵀ
    with :func:`raw_quat_to_rotmat` (q as it is).
    """
    if gaussian_convention == "gsplat":
        covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)
        return covars
    if gaussian_convention == "diffsplat":
        M = raw_quat_to_rotmat(quats) * scales[..., None, :]  # R·S: column k of R scaled by scales[k]
        return M @ M.transpose(-1, -2)
    raise ValueError(f"gaussian_convention must be one of {GAUSSIAN_CONVENTIONS}, got {gaussian_convention!r}")


def rasterization(
    means: torch.Tensor,  # [..., N, 3]
    quats: torch.Tensor,  # [..., N, 4] wxyz, need not be unit
    scales: torch.Tensor,  # [..., N, 3] post-activation
    opacities: torch.Tensor,  # [..., N] in [0, 1]
    colors: torch.Tensor,  # [..., N, D] or [..., C, N, D]
    viewmats: torch.Tensor,  # [..., C, 4, 4] world-to-camera, OpenCV
    Ks: torch.Tensor,  # [..., C, 3, 3] pixels
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float | None = None,
    backgrounds: torch.Tensor | None = None,  # [..., C, D]
    render_mode: str = "RGB+ED",
    *,
    backend: str = "auto",
    pairs_per_chunk: int = DEFAULT_PAIRS_PER_CHUNK,
    gaussian_convention: str = "gsplat",
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Render Gaussians into C cameras per batch element, as ``gsplat.rasterization``.

    Returns ``render_colors [..., C, H, W, X]`` (X = D for "RGB", 1 for "D"/"ED", D+1 for
    "RGB+D"/"RGB+ED" with depth last), ``render_alphas [..., C, H, W, 1]`` and ``meta``.
    ``backend``: "auto" (gsplat for CUDA tensors, torch otherwise), "gsplat" or "torch" (any
    device; used for parity checks). ``pairs_per_chunk`` bounds the torch renderer's memory.
    ``gaussian_convention``: "gsplat" (normalised quaternions) or "diffsplat" (raw quaternions, as
    DiffSplat's RaDe-GS renderer; module docstring). ``eps2d`` (px²) defaults to the convention's
    dilation, 0.3 for "gsplat" and 0 for "diffsplat".
    """
    if gaussian_convention not in GAUSSIAN_CONVENTIONS:
        raise ValueError(f"rasterization: gaussian_convention must be one of {GAUSSIAN_CONVENTIONS}, "
                         f"got {gaussian_convention!r}")
    eps2d = DEFAULT_EPS2D[gaussian_convention] if eps2d is None else eps2d
    _check_inputs(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                  near_plane, far_plane, eps2d, backgrounds, render_mode, backend, pairs_per_chunk)
    if backend == "gsplat" or (backend == "auto" and means.is_cuda):
        import gsplat  # JIT-compiles its CUDA kernels on first use; never reached with CPU tensors

        # gsplat builds normalised-quaternion covariances itself (faster); any other convention's go in
        # as covars [..., N, 3, 3], and gsplat ignores quats and scales.
        covars = None if gaussian_convention == "gsplat" else gaussian_covariances(quats, scales, gaussian_convention)
        return gsplat.rasterization(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height,
            near_plane=near_plane, far_plane=far_plane, eps2d=eps2d, packed=False,
            backgrounds=backgrounds, render_mode=render_mode, covars=covars,
        )
    return _torch_rasterization(
        means, gaussian_covariances(quats, scales, gaussian_convention), opacities, colors, viewmats, Ks,
        width, height, near_plane, far_plane, eps2d, backgrounds, render_mode, pairs_per_chunk,
    )


# ----------------------------------------------------------------------------- input checks


def _check_inputs(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                  near_plane, far_plane, eps2d, backgrounds, render_mode, backend, pairs_per_chunk):
    if render_mode not in RENDER_MODES:
        raise ValueError(f"rasterization: render_mode must be one of {RENDER_MODES}, got {render_mode!r}")
    if backend not in ("auto", "gsplat", "torch"):
        raise ValueError(f"rasterization: backend must be 'auto', 'gsplat' or 'torch', got {backend!r}")
    for name, value in (("width", width), ("height", height), ("pairs_per_chunk", pairs_per_chunk)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"rasterization: {name} must be a positive int, got {value!r}")
    if not (0 <= near_plane < far_plane) or not eps2d >= 0:
        raise ValueError(
            f"rasterization: need 0 <= near_plane < far_plane and eps2d >= 0, "
            f"got near_plane={near_plane}, far_plane={far_plane}, eps2d={eps2d}"
        )
    if not isinstance(means, torch.Tensor) or means.ndim < 2 or means.shape[-1] != 3:
        raise ValueError(f"rasterization: means expected shape [..., N, 3], got {describe_shape(means)}")
    batch, N = tuple(means.shape[:-2]), means.shape[-2]
    if not isinstance(viewmats, torch.Tensor) or viewmats.ndim != len(batch) + 3:
        raise ValueError(f"rasterization: viewmats expected shape {(*batch, 'C', 4, 4)}, got {describe_shape(viewmats)}")
    C = viewmats.shape[-3]
    expected = {
        "quats": (*batch, N, 4), "scales": (*batch, N, 3), "opacities": (*batch, N),
        "viewmats": (*batch, C, 4, 4), "Ks": (*batch, C, 3, 3),
    }
    tensors = {"means": means, "quats": quats, "scales": scales, "opacities": opacities,
               "colors": colors, "viewmats": viewmats, "Ks": Ks}
    for name, shape in expected.items():
        value = tensors[name]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            raise ValueError(f"rasterization: {name} expected shape {shape}, got {describe_shape(value)}")
    if not isinstance(colors, torch.Tensor) or colors.ndim < 2 or (
        tuple(colors.shape[:-1]) not in ((*batch, N), (*batch, C, N))
    ):
        raise ValueError(
            f"rasterization: colors expected shape {(*batch, N, 'D')} or {(*batch, C, N, 'D')}, got {describe_shape(colors)}"
        )
    if backgrounds is not None:
        tensors["backgrounds"] = backgrounds
        shape = (*batch, C, colors.shape[-1])
        if not isinstance(backgrounds, torch.Tensor) or tuple(backgrounds.shape) != shape:
            raise ValueError(f"rasterization: backgrounds expected shape {shape}, got {describe_shape(backgrounds)}")
    for name, value in tensors.items():
        if not value.is_floating_point():
            raise ValueError(f"rasterization: {name} must be a floating-point tensor, got {value.dtype}")
        if value.device != means.device:
            raise ValueError(f"rasterization: {name} is on {value.device}, means on {means.device}")
        if not torch.isfinite(value).all():
            raise ValueError(f"rasterization: {name} contains non-finite values")
    # A singular world-to-camera matrix cannot come from a real camera; its projection is garbage.
    if C > 0 and (torch.linalg.det(viewmats.detach().double()).abs() < 1e-9).any():
        raise ValueError("rasterization: viewmats contains non-invertible 4x4 matrices")
    if C > 0 and not ((Ks[..., 0, 0] > 0) & (Ks[..., 1, 1] > 0)).all():
        raise ValueError("rasterization: Ks must have positive focal lengths fx = K[0,0], fy = K[1,1]")


# ----------------------------------------------------------------------------- torch renderer


class _Boxes(NamedTuple):
    """Visible (image, Gaussian) candidates in (image, depth) order, with pixel boxes. No grad."""

    flat: torch.Tensor  # (K,) index image·N + gaussian into the (I·N) projected arrays
    x0: torch.Tensor  # (K,) first pixel column of the box (inclusive)
    x1: torch.Tensor  # (K,) last pixel column (inclusive)
    row0: torch.Tensor  # (K,) first row of the box in the stacked rows of all images (image·H + y)
    row1: torch.Tensor  # (K,) last stacked row (inclusive)


def _torch_rasterization(means, covars, opacities, colors, viewmats, Ks, width, height,
                         near_plane, far_plane, eps2d, backgrounds, render_mode, pairs_per_chunk):
    dtype = means.dtype
    batch, N, C = tuple(means.shape[:-2]), means.shape[-2], viewmats.shape[-3]
    B = math.prod(batch)
    I = B * C  # number of images
    means, covars = means.reshape(B, N, 3), covars.reshape(B, N, 3, 3)  # world-space 3D covariances
    viewmats, Ks = viewmats.reshape(B, C, 4, 4).to(dtype), Ks.reshape(B, C, 3, 3).to(dtype)

    # --- projection (gsplat's torch helpers) ---
    means_c, covars_c = _world_to_cam(means, covars, viewmats)  # (B, C, N, 3), (B, C, N, 3, 3)
    depths = means_c[..., 2]  # (B, C, N)
    visible = (depths >= near_plane) & (depths <= far_plane)
    # Culled Gaussians may sit at z = 0; project a harmless point instead so no inf/NaN leaks into grads.
    safe_means_c = torch.where(visible[..., None], means_c, means_c.new_tensor([0.0, 0.0, 1.0]))
    means2d, covars2d = _persp_proj(safe_means_c, covars_c, Ks, width, height)  # (B,C,N,2), (B,C,N,2,2)
    cov_xx = covars2d[..., 0, 0] + eps2d  # low-pass dilation, as gsplat's add_blur (0 for "diffsplat")
    cov_yy = covars2d[..., 1, 1] + eps2d
    cov_xy = 0.5 * (covars2d[..., 0, 1] + covars2d[..., 1, 0])
    det = cov_xx * cov_yy - cov_xy**2
    visible = visible & (det > 0)
    det = torch.where(visible, det, torch.ones_like(det))
    conics = torch.stack([cov_yy / det, -cov_xy / det, cov_xx / det], dim=-1)  # (B, C, N, 3)
    opac = opacities.reshape(B, 1, N).expand(B, C, N)

    with torch.no_grad():  # opacity-aware box (gsplat >= 1.5), integer pixels
        extend = torch.sqrt(2.0 * torch.log((opac / ALPHA_THRESHOLD).clamp(min=1.0))).clamp(max=RADIUS_SIGMAS)
        radii = torch.stack([torch.ceil(extend * cov_xx.sqrt()), torch.ceil(extend * cov_yy.sqrt())], dim=-1)
        visible = visible & (opac >= ALPHA_THRESHOLD) & (means2d + radii > 0).all(-1) & (
            means2d[..., 0] - radii[..., 0] < width) & (means2d[..., 1] - radii[..., 1] < height)
        radii = torch.where(visible[..., None], radii, torch.zeros_like(radii))
        boxes = _visible_boxes(means2d.detach(), radii, depths.detach(), visible, width, height)

    # per-image features: colours, depth, or both (depth last, as gsplat)
    if render_mode in ("D", "ED"):
        feats = depths[..., None]
    else:
        if colors.ndim == len(batch) + 2:  # shared by all cameras
            feats = colors.reshape(B, 1, N, -1).expand(B, C, N, colors.shape[-1]).to(dtype)
        else:
            feats = colors.reshape(B, C, N, -1).to(dtype)
        if render_mode in ("RGB+D", "RGB+ED"):
            feats = torch.cat([feats, depths[..., None]], dim=-1)
    D = feats.shape[-1]
    # differentiable per-candidate parameters, gathered once: 6 x (K,) and (K, D). Six 1-D tensors, not
    # one (K, 6): per-pair gathers of columns would cost a (M, 6) stack in the backward.
    params = tuple(
        p.reshape(I * N).index_select(0, boxes.flat)
        for p in (means2d[..., 0], means2d[..., 1], conics[..., 0], conics[..., 1], conics[..., 2], opac)
    )
    cand_feats = feats.reshape(I * N, D).index_select(0, boxes.flat)

    chunks = _row_chunks(boxes, I * height, pairs_per_chunk)
    use_checkpoint = len(chunks) > 1 and torch.is_grad_enabled() and any(
        t.requires_grad for t in (*params, cand_feats))
    rendered, alphas = [], []
    for row_start, row_end in chunks:
        if use_checkpoint:
            out = checkpoint(_composite_rows, row_start, row_end, width, height, boxes, *params, cand_feats,
                             use_reentrant=False, preserve_rng_state=False)
        else:
            out = _composite_rows(row_start, row_end, width, height, boxes, *params, cand_feats)
        rendered.append(out[0])
        alphas.append(out[1])
    render_colors = torch.cat(rendered).reshape(B, C, height, width, D)
    render_alphas = torch.cat(alphas).reshape(B, C, height, width, 1)

    if backgrounds is not None:
        bg = backgrounds.reshape(B, C, -1).to(dtype)
        if render_mode in ("D", "ED"):
            bg = torch.zeros_like(bg[..., :1])
        elif render_mode in ("RGB+D", "RGB+ED"):
            bg = torch.cat([bg, torch.zeros_like(bg[..., :1])], dim=-1)  # no background depth
        render_colors = render_colors + (1.0 - render_alphas) * bg[:, :, None, None, :]
    if render_mode in ("ED", "RGB+ED"):
        expected_depth = render_colors[..., -1:] / render_alphas.clamp(min=1e-10)
        render_colors = torch.cat([render_colors[..., :-1], expected_depth], dim=-1)

    meta = {
        "backend": "torch",
        "radii": radii.to(torch.int32).reshape(*batch, C, N, 2),
        "means2d": means2d.reshape(*batch, C, N, 2),
        "depths": depths.reshape(*batch, C, N),
        "conics": conics.reshape(*batch, C, N, 3),
        "num_chunks": len(chunks),
        "width": width,
        "height": height,
    }
    return (
        render_colors.reshape(*batch, C, height, width, D),
        render_alphas.reshape(*batch, C, height, width, 1),
        meta,
    )


def _visible_boxes(means2d, radii, depths, visible, width, height) -> _Boxes:
    """Candidates sorted by (image, depth), with their boxes clipped to the image."""
    I_shape = depths.shape  # (B, C, N)
    N = I_shape[-1]
    depths = depths.reshape(-1, N)
    order = torch.argsort(torch.where(visible.reshape(-1, N), depths, torch.inf), dim=-1, stable=True)
    image, rank = visible.reshape(-1, N).gather(1, order).nonzero(as_tuple=True)  # image-major, depth order
    flat = image * N + order[image, rank]
    m2d, rad = means2d.reshape(-1, 2)[flat], radii.reshape(-1, 2)[flat]
    # pixel j is sampled at j + 0.5: the box [m - r, m + r] covers j in [ceil(m-r-0.5), floor(m+r-0.5)]
    lo = torch.ceil(m2d - rad - 0.5).clamp(min=0)
    hi = torch.floor(m2d + rad - 0.5)
    hi = torch.minimum(hi, hi.new_tensor([width - 1, height - 1]))
    keep = (hi >= lo).all(-1)
    lo, hi, flat, image = lo[keep].long(), hi[keep].long(), flat[keep], image[keep]
    return _Boxes(flat, lo[:, 0], hi[:, 0], image * height + lo[:, 1], image * height + hi[:, 1])


def _row_chunks(boxes: _Boxes, total_rows: int, pairs_per_chunk: int) -> list[tuple[int, int]]:
    """Cut the stacked rows into [start, end) ranges holding <= pairs_per_chunk box pairs each
    (a single row heavier than that is its own chunk)."""
    widths = boxes.x1 - boxes.x0 + 1
    diff = torch.zeros(total_rows + 1, dtype=torch.long, device=widths.device)
    diff.index_add_(0, boxes.row0, widths).index_add_(0, boxes.row1 + 1, -widths)
    pairs_per_row = diff[:-1].cumsum(0)  # (I·H,)
    before = pairs_per_row.cumsum(0) - pairs_per_row
    chunk_of_row = torch.div(before, pairs_per_chunk, rounding_mode="floor")
    _, rows_per_chunk = torch.unique_consecutive(chunk_of_row, return_counts=True)
    ends = rows_per_chunk.cumsum(0).tolist()
    return list(zip([0] + ends[:-1], ends))


def _composite_rows(row_start: int, row_end: int, width: int, height: int, boxes: _Boxes,
                    mx, my, conic_a, conic_b, conic_c, opacity, cand_feats):
    """Composite stacked rows [row_start, row_end) of all images: ((P, D) colours, (P,) alphas),
    P = (row_end − row_start)·width. A pure function of its inputs (checkpoint recomputes it)."""
    P = (row_end - row_start) * width
    device, dtype = mx.device, mx.dtype
    with torch.no_grad():
        # 1. (candidate, row) spans: the columns of one box row where alpha >= 1/255, i.e.
        #    σ <= ln(255·o), an interval of the quadratic σ(dx). Computed in float64 and widened by
        #    1e-3 px so that rounding never loses a pair; the exact test below drops the extras.
        cand = ((boxes.row1 >= row_start) & (boxes.row0 < row_end)).nonzero().squeeze(1)  # (Kc,)
        row0 = boxes.row0[cand].clamp(min=row_start)
        rows_per_cand = boxes.row1[cand].clamp(max=row_end - 1) - row0 + 1
        span_cand = torch.repeat_interleave(rows_per_cand)  # (S,) chunk-local candidate
        span_row = row0[span_cand] + (
            torch.arange(span_cand.numel(), device=device) - (rows_per_cand.cumsum(0) - rows_per_cand)[span_cand]
        )
        span_cand = cand[span_cand]  # global candidate index
        s_mx, s_my, s_a, s_b, s_c, s_o = (t.detach().double().index_select(0, span_cand)
                                           for t in (mx, my, conic_a, conic_b, conic_c, opacity))
        dy = s_my - ((span_row % height).double() + 0.5)
        sigma_max = torch.log(255.0 * s_o)
        half = (2.0 * s_a * sigma_max - dy * dy * (s_a * s_c - s_b**2)).clamp(min=0.0).sqrt() / s_a
        centre = s_mx + s_b * dy / s_a  # px where σ is smallest on this row
        col0 = torch.maximum(torch.ceil(centre - half - 0.5 - 1e-3).long(), boxes.x0[span_cand])
        col1 = torch.minimum(torch.floor(centre + half - 0.5 + 1e-3).long(), boxes.x1[span_cand])
        span_w = (col1 - col0 + 1).clamp(min=0)
        del s_mx, s_my, s_a, s_b, s_c, s_o, dy, sigma_max, half, centre

        # 2. pairs, stable-sorted by pixel: spans come in (image, depth) order, so each pixel's run
        #    is front-to-back.
        pair_span = torch.repeat_interleave(span_w)  # (M,)
        offset = torch.arange(pair_span.numel(), device=device) - (span_w.cumsum(0) - span_w)[pair_span]
        pixel = ((span_row - row_start) * width + col0).index_select(0, pair_span) + offset
        pixel, order = torch.sort(pixel.to(torch.int32), stable=True)
        pair = span_cand.index_select(0, pair_span.index_select(0, order))  # (M,) candidate of each pair
        del pair_span, offset, order, span_cand, span_row, col0, col1, span_w
        pixel = pixel.long()
        px = (pixel % width).to(dtype) + 0.5
        py = ((torch.div(pixel, width, rounding_mode="floor") + row_start) % height).to(dtype) + 0.5
        counts_per_pixel = torch.bincount(pixel, minlength=P)
        first_of_pixel = (counts_per_pixel.cumsum(0) - counts_per_pixel).index_select(0, pixel)  # (M,)

        # 3. the pairs that contribute: alpha >= 1/255 and the pixel not yet stopped. Found without
        #    autograd, so only they enter the graph: in dense scenes most pairs lie behind opaque
        #    surfaces. Unused pairs do not change T, so dropping them keeps every T exact.
        sigma, alpha = _pair_alphas(mx, my, conic_a, conic_b, conic_c, opacity, pair, px, py)
        used = (sigma >= 0) & (alpha >= ALPHA_THRESHOLD)  # the kernel skips the rest
        log_1m = torch.where(used, torch.log1p(-alpha), 0.0).double()
        log_T = _exclusive_segment_cumsum(log_1m, first_of_pixel)
        alive = (used & ((log_T + log_1m) > math.log(TRANSMITTANCE_MIN))).nonzero().squeeze(1)
        del sigma, alpha, used, log_1m, log_T, first_of_pixel
        pair, px, py, pixel = (t.index_select(0, alive) for t in (pair, px, py, pixel))
        pairs_per_pixel = torch.bincount(pixel, minlength=P)
        first_of_pixel = (pairs_per_pixel.cumsum(0) - pairs_per_pixel).index_select(0, pixel)

    # 4. differentiable compositing of all contributing pairs at once: w = α·T
    _, alpha = _pair_alphas(mx, my, conic_a, conic_b, conic_c, opacity, pair, px, py)
    weight = alpha * torch.exp(_exclusive_segment_cumsum(torch.log1p(-alpha).double(), first_of_pixel)).to(dtype)
    # pairs are grouped by pixel, so per-pixel sums are segment sums (much faster than index_add)
    feats = cand_feats.index_select(0, pair)  # (M', D)
    colors = torch.segment_reduce(weight[:, None] * feats, "sum", lengths=pairs_per_pixel, unsafe=True)
    alphas = torch.segment_reduce(weight, "sum", lengths=pairs_per_pixel, unsafe=True)
    return colors, alphas  # (P, D), (P,)


def _pair_alphas(mx, my, conic_a, conic_b, conic_c, opacity, pair, px, py):
    """σ and alpha = min(0.999, o·exp(−σ)) of (pixel, candidate) pairs, as gsplat's kernel."""
    dx, dy = mx.index_select(0, pair) - px, my.index_select(0, pair) - py
    sigma = 0.5 * (conic_a.index_select(0, pair) * dx * dx + conic_c.index_select(0, pair) * dy * dy) + (
        conic_b.index_select(0, pair) * dx * dy)
    return sigma, (opacity.index_select(0, pair) * torch.exp(-sigma)).clamp(max=MAX_ALPHA)


def _exclusive_segment_cumsum(values: torch.Tensor, first_of_segment: torch.Tensor) -> torch.Tensor:
    """Per pixel run, the sum of the values before each element: log T from log(1 − α). float64,
    because the running sum spans the whole chunk and float32 would lose T entirely."""
    excl = values.cumsum(0) - values
    return excl - excl.index_select(0, first_of_segment)


# ----------------------------------------------------------------------------- render_splats


@dataclass
class RenderOutput:
    """Renders of B objects from V views; channels-first like images everywhere else."""

    images: torch.Tensor  # (B, V, 3, H, W) in [0, 1], composited over the background
    alphas: torch.Tensor  # (B, V, 1, H, W) accumulated opacity 1 − T
    depths: torch.Tensor  # (B, V, 1, H, W) expected z-depth Σwz/Σw (0 where nothing is hit)
    features: torch.Tensor | None = None  # (B, V, F, H, W) extra_features, over a zero background


def render_splats(
    splats: "Splats",
    cameras: Cameras,
    background=(1.0, 1.0, 1.0),
    extra_features: torch.Tensor | None = None,
    gaussian_convention: str = "gsplat",
) -> RenderOutput:
    """Render every object of ``splats`` (B, N) from every camera of ``cameras``.

    ``cameras.viewmats`` is (V, 4, 4) (shared by all objects) or (B, V, 4, 4). ``background`` is
    3 floats, a (3,) tensor or (B, V, 3). ``extra_features`` (B, N, F) or per view (B, V, N, F)
    (e.g. ``normals.gaussian_normals``) are rendered alongside the colours, in the same pass.
    ``gaussian_convention``: "gsplat" or "diffsplat" (DiffSplat's raw quaternions, no dilation; see
    the module docstring).
    """
    splats.validate()
    B, N = splats.means.shape[:2]
    device, dtype = splats.means.device, splats.means.dtype
    viewmats = cameras.viewmats.to(device=device, dtype=dtype)
    Ks = cameras.Ks.to(device=device, dtype=dtype)
    if viewmats.ndim == 3:
        viewmats, Ks = viewmats.expand(B, *viewmats.shape), Ks.expand(B, *Ks.shape)
    if viewmats.ndim != 4 or viewmats.shape[0] != B:
        raise ValueError(
            f"render_splats: cameras.viewmats expected (V, 4, 4) or (B={B}, V, 4, 4), got {tuple(cameras.viewmats.shape)}"
        )
    V = viewmats.shape[1]
    colors = splats.colors.to(dtype)
    F = 0
    if extra_features is not None:
        if not isinstance(extra_features, torch.Tensor) or extra_features.shape[:-1] not in ((B, N), (B, V, N)):
            raise ValueError(
                f"render_splats: extra_features expected shape (B, N, F) = ({B}, {N}, F) or (B, V, N, F) = "
                f"({B}, {V}, {N}, F), got {describe_shape(extra_features)}"
            )
        F = extra_features.shape[-1]
        if extra_features.ndim == 4:
            colors = colors[:, None].expand(B, V, N, 3)
        colors = torch.cat([colors, extra_features.to(device=device, dtype=dtype)], dim=-1)
    bg = torch.as_tensor(background, dtype=dtype, device=device)
    if bg.shape not in ((3,), (B, V, 3)):
        raise ValueError(f"render_splats: background expected 3 values or shape (B, V, 3) = ({B}, {V}, 3), got {tuple(bg.shape)}")
    bg = torch.cat([bg.expand(B, V, 3), bg.new_zeros(B, V, F)], dim=-1)  # features over zero

    render, alphas, _ = rasterization(
        splats.means, splats.quats, splats.scales, splats.opacities, colors, viewmats, Ks,
        cameras.width, cameras.height, backgrounds=bg, render_mode="RGB+ED", gaussian_convention=gaussian_convention,
    )  # (B, V, H, W, 3+F+1), (B, V, H, W, 1)
    render = render.permute(0, 1, 4, 2, 3)  # (B, V, 3+F+1, H, W)
    return RenderOutput(
        images=render[:, :, :3].contiguous(),
        alphas=alphas.permute(0, 1, 4, 2, 3).contiguous(),
        depths=render[:, :, -1:].contiguous(),
        features=render[:, :, 3:3 + F].contiguous() if F else None,
    )
