"""Interactive 3D views of the evaluated splats in the report: base and fine-tuned side by side.

The report folder has to work opened from disk with no network. Chromium lets a file:// page load
neither ES modules nor local files through ``fetch()``, but a classic ``<script src>`` works, so
each prompt's objects go into ``viewer/splats_<i>.js``, a script that assigns a global, beside a
copy of the viewer (``r2d3ray/assets/viewer/splat-viewer.js``, a dependency-free WebGL2 splat
renderer; its header says why it is not a packaged viewer) and its LICENSE.

One object's payload (what the viewer script reads):

    count    Gaussians drawn: the visible ones, or ``max_gaussians`` of them (see ``pack_splats``)
    visible  Gaussians at or above the renderers' 1/255 opacity threshold (fainter ones are never drawn)
    total    Gaussians in the object
    center   (3,) the point the camera orbits: the opacity-weighted mean of the drawn Gaussians
    radius   how far they reach from it (99th percentile): the initial view frames this sphere
    bounds   (6,) the drawn means' lowest then highest x, y, z
    covariance_scale  the largest magnitude in the drawn covariances
    data     base64 of, little-endian, 22 bytes a Gaussian: uint16 means (count, 3), each axis
             quantised over its bounds (steps of 1/65,535 of the object's extent, far below a
             Gaussian's size); float16 world covariances divided by ``covariance_scale`` (count, 6:
             xx xy xz yy yz zz) in the pipeline's Gaussian convention (DiffSplat's scales span 5e-4 to
             2e-2, so every variance stays a normal float16, ~3 significant digits); uint8 RGBA
             (count, 4) with A the opacity
"""

from __future__ import annotations

import base64
import html
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from r2d3ray.render.rasterize import ALPHA_THRESHOLD, gaussian_covariances
from r2d3ray.splats import Splats

VIEWER_ASSETS = Path(__file__).resolve().parents[1] / "assets" / "viewer"
VIEWER_SCRIPT = "splat-viewer.js"
# 65,536 Gaussians are 1.4 MB of data (1.9 MB as base64) per object. The tiny prior's objects are far
# smaller; a DiffSplat object has 4 x 256² = 262,144 Gaussians, of which the tiny world's ground truth
# at that size has 48,000 (a sphere) to 92,000 (a cube) visible: the transparent background is dropped.
DEFAULT_MAX_GAUSSIANS = 65536
MAX_GAUSSIANS = 1 << 20  # the viewer's data texture: 512 Gaussians a row, 2048 rows (WebGL2's minimum size)
STYLE = (".splat-row{display:flex;gap:8px;margin:0 0 2em}.splat-view{flex:1;margin:0;max-width:400px}"
         ".splat-viewer{width:100%;aspect-ratio:1;display:block;border:1px solid #ccc}"
         ".splat-view figcaption{font-size:13px;text-align:center}.splat-viewer-error{color:#a00}")
HELP = ("Under each grid, the same objects as interactive 3D Gaussian splats, one per run side by side: drag "
        "to orbit, scroll to zoom, double-click to reset; the views of one prompt turn together.")
SCRIPT_TAG = f"<script src='viewer/{VIEWER_SCRIPT}'></script>"  # after the canvases and their data scripts


def pack_splats(splats: Splats, gaussian_convention: str = "gsplat",
                max_gaussians: int = DEFAULT_MAX_GAUSSIANS) -> dict:
    """One object (B=1) as the viewer's payload (see the module docstring).

    Gaussians below the renderers' 1/255 opacity threshold are dropped (never drawn). Of more than
    ``max_gaussians`` visible ones, a fixed random ``max_gaussians`` stay, their covariances scaled by
    visible / max_gaussians so that together they still cover the surface: a coarser object
    rather than one with holes (keeping the largest or most opaque ones leaves whole regions empty).
    """
    splats.validate()
    if splats.batch_size != 1:
        raise ValueError(f"pack_splats: expected one object (B=1), got B={splats.batch_size}; index the batch first")
    if not 1 <= max_gaussians <= MAX_GAUSSIANS:
        raise ValueError(f"pack_splats: max_gaussians={max_gaussians} must be between 1 and {MAX_GAUSSIANS}")
    s = splats.detach().to(device="cpu", dtype=torch.float32)
    covariances = gaussian_covariances(s.quats[0], s.scales[0], gaussian_convention)  # (N, 3, 3)
    opacities = s.opacities[0]  # (N,)
    keep = (opacities >= ALPHA_THRESHOLD).nonzero()[:, 0]  # (n,)
    visible = len(keep)
    coverage = 1.0  # the factor on the kept covariances
    if visible > max_gaussians:
        chosen = torch.randperm(visible, generator=torch.Generator().manual_seed(0))[:max_gaussians]
        keep = keep[chosen.sort().values]  # the original order: the same report writes the same files
        coverage = visible / max_gaussians
    means = s.means[0, keep]  # (n, 3)
    rows, cols = [0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2]
    upper = covariances[keep][:, rows, cols] * coverage  # (n, 6) xx xy xz yy yz zz
    rgba = torch.cat([s.colors[0, keep].clamp(0, 1), opacities[keep, None]], dim=-1)  # (n, 4)
    if len(keep):
        weights = opacities[keep]
        center = (means * weights[:, None]).sum(0) / weights.sum()
        radius = float(torch.quantile((means - center).norm(dim=-1), 0.99)) or 1.0
        low, high = means.min(0).values, means.max(0).values
    else:  # nothing visible: an empty view of the origin
        center, radius, low, high = torch.zeros(3), 1.0, torch.zeros(3), torch.zeros(3)
    step = (high - low).clamp(min=1e-12) / 65535
    covariance_scale = float(upper.abs().max()) if len(keep) else 1.0
    data = b"".join([
        ((means - low) / step).round().clamp(0, 65535).numpy().astype("<u2").tobytes(),
        (upper / covariance_scale).numpy().astype("<f2").tobytes(),
        (rgba * 255).round().numpy().astype(np.uint8).tobytes(),
    ])
    return {"count": len(keep), "visible": visible, "total": splats.num_gaussians,
            "center": [float(c) for c in center], "radius": radius, "bounds": [float(b) for b in [*low, *high]],
            "covariance_scale": covariance_scale, "data": base64.b64encode(data).decode("ascii")}


def write_viewers(out_dir: str | Path, splats: dict[str, Splats], prompts: list[str],
                  gaussian_convention: str = "gsplat", max_gaussians: int = DEFAULT_MAX_GAUSSIANS) -> list[str]:
    """Write ``out_dir/viewer/`` (the viewer script, its LICENSE, one data script per prompt) and
    return one HTML block per prompt: a canvas per run, side by side, sharing one camera.

    ``splats``: run label -> (P', N) objects of the first P' prompts (the same prompts and seed for
    every run), base first. The page must end with ``SCRIPT_TAG`` and include ``STYLE``.
    """
    out_dir = Path(out_dir)
    folder = out_dir / "viewer"
    folder.mkdir(parents=True, exist_ok=True)
    for name in (VIEWER_SCRIPT, "LICENSE"):
        shutil.copyfile(VIEWER_ASSETS / name, folder / name)
    count = min([len(prompts), *(s.batch_size for s in splats.values())])
    blocks = []
    for i in range(count):
        group = f"{i:03d}"
        payloads = {f"{group}/{r}": pack_splats(objects[i], gaussian_convention, max_gaussians)
                    for r, objects in enumerate(splats.values())}
        lines = ["window.R2D3_SPLATS = window.R2D3_SPLATS || {};"]
        lines += [f"window.R2D3_SPLATS[{json.dumps(key)}] = {json.dumps(payload)};" for key, payload in payloads.items()]
        (folder / f"splats_{group}.js").write_text("\n".join(lines) + "\n")
        cells = []
        for (key, payload), label in zip(payloads.items(), splats):
            shown = (f" ({payload['count']:,} of {payload['visible']:,} visible Gaussians, enlarged to cover)"
                     if payload["count"] < payload["visible"] else "")
            cells.append(f"<figure class='splat-view'><canvas class='splat-viewer' data-splats='{key}' "
                         f"data-group='{group}'></canvas><figcaption>{html.escape(label)}{shown}</figcaption></figure>")
        blocks.append(f"<script src='viewer/splats_{group}.js'></script>"
                      f"<div class='splat-row' title='{html.escape(prompts[i], quote=True)}'>{''.join(cells)}</div>")
    return blocks
