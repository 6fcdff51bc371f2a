"""3D Gaussian splats: the batch type, DiffSplat's splatter images, and 3DGS PLY files.

Splatter images (DiffSplat's GSVAE output, its `gsvae.decode_gslatents`). Each view's 12-channel
image in [-1, 1] holds one Gaussian per pixel:

=========  ==========  =====================================================================
channels   attribute   decoded value
=========  ==========  =====================================================================
0:3        rgb         ``x·0.5 + 0.5`` in [0, 1] (SH degree 0, used directly as colour)
3:6        scale       ``s = x·0.5 + 0.5``; ``scale = scale_min·s + scale_max·(1 − s)``
                       (inverted: x = −1 is the largest scale, 0.02; x = 1 the smallest, 5e-4)
6:10       quaternion  wxyz, passed on as is (not normalised; renderers normalise)
10         opacity     ``x·0.5 + 0.5`` in [0, 1]
11         depth       camera z-depth ``z = x + cam_distance`` (1.4), so z in [0.4, 2.4]
=========  ==========  =====================================================================

Unprojection copies DiffSplat's ``unproject_depth``: pixel (row i, column j) of an h x w image
sits at the normalised coordinate ``(j/(w−1), i/(h−1))`` (the corner pixels lie *on* the image
border, unlike the ``(j+0.5)/w`` convention of rasterisers; DiffSplat's checkpoints were trained
this way), so its camera-space point is ``z·((j/(w−1) − 0.5)/fxfy, (i/(h−1) − 0.5)/fxfy, 1)``,
then mapped to the world by the view's OpenCV camera-to-world matrix. Gaussians are flattened in
(view, row, column) order, N = V·h·w.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, fields

import numpy as np
import torch

# DiffSplat's cameras, which define where a splatter image's pixels lie (its unprojection): the
# normalised focal length (1.3889, a 39.6° field of view) and the orbit radius. The rig in
# render/cameras.py uses the same two numbers.
DIFFSPLAT_FXFY = 1422.222 / 1024
DIFFSPLAT_RADIUS = 1.4

SH_C0 = 0.28209479177387814  # zeroth spherical-harmonic basis constant, 1 / (2·sqrt(pi))
OPACITY_EPS = 1e-6  # opacities are clamped to [eps, 1 − eps] before the PLY logit


@dataclass
class Splats:
    """A batch of B objects with N Gaussians each (SH degree 0).

    ``means (B,N,3)``, ``quats (B,N,4)`` wxyz (need not be unit), ``scales (B,N,3)`` after
    activation (positive), ``opacities (B,N)`` in [0,1], ``colors (B,N,3)`` in [0,1].
    """

    means: torch.Tensor  # (B, N, 3)
    quats: torch.Tensor  # (B, N, 4)
    scales: torch.Tensor  # (B, N, 3)
    opacities: torch.Tensor  # (B, N)
    colors: torch.Tensor  # (B, N, 3)

    @property
    def batch_size(self) -> int:
        return self.means.shape[0]

    @property
    def num_gaussians(self) -> int:
        return self.means.shape[1]

    def _map(self, fn) -> "Splats":
        return Splats(*(fn(getattr(self, f.name)) for f in fields(self)))

    def to(self, *args, **kwargs) -> "Splats":
        """Like ``Tensor.to`` (device and/or dtype) for every field."""
        return self._map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> "Splats":
        return self._map(torch.Tensor.detach)

    def __getitem__(self, index: int) -> "Splats":
        """Object ``index`` as a batch of one (B=1)."""
        if not -self.batch_size <= index < self.batch_size:
            raise IndexError(f"Splats index {index} out of range for batch size {self.batch_size}")
        index %= self.batch_size
        return self._map(lambda t: t[index : index + 1])

    def first(self, n: int) -> "Splats":
        """The first ``n`` objects (all when there are fewer)."""
        return self._map(lambda t: t[:n])

    @staticmethod
    def cat(items: list["Splats"]) -> "Splats":
        """The objects of every item, in order (each field concatenated along B)."""
        return Splats(*(torch.cat([getattr(item, f.name) for item in items]) for f in fields(Splats)))

    def validate(self) -> "Splats":
        """Check shapes and finiteness; raises ValueError naming the field. Returns self."""
        if not isinstance(self.means, torch.Tensor) or self.means.ndim != 3:
            raise ValueError(f"Splats.means: expected a tensor of shape (B, N, 3), got {describe_shape(self.means)}")
        B, N = self.means.shape[:2]
        for name, tail in (("means", (3,)), ("quats", (4,)), ("scales", (3,)), ("opacities", ()), ("colors", (3,))):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != (B, N, *tail):
                expected = ", ".join(["B", "N", *map(str, tail)])
                raise ValueError(
                    f"Splats.{name}: expected shape ({expected}) = {(B, N, *tail)}, got {describe_shape(value)}"
                )
            if not torch.isfinite(value).all():
                raise ValueError(f"Splats.{name}: contains non-finite values")
        return self


def describe_shape(value) -> str:
    """A tensor's shape (or a non-tensor's type name) for error messages."""
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


# ----------------------------------------------------------------------------- splatter images


def _check_splatter_shape(name: str, value: torch.Tensor, channels: int, like: tuple | None = None):
    """(B, V, channels, h, w), and matching ``like`` = (B, V, h, w) when given."""
    if not isinstance(value, torch.Tensor) or value.ndim != 5 or value.shape[2] != channels:
        raise ValueError(f"{name}: expected shape (B, V, {channels}, h, w), got {describe_shape(value)}")
    if like is not None and (*value.shape[:2], *value.shape[3:]) != like:
        raise ValueError(f"{name}: expected (B, V, h, w) = {like} like the other maps, got {describe_shape(value)}")


def decode_splatter_images(
    splatter: torch.Tensor,
    c2w: torch.Tensor,
    fxfy: float = DIFFSPLAT_FXFY,
    cam_distance: float = DIFFSPLAT_RADIUS,
    scale_min: float = 5e-4,
    scale_max: float = 2e-2,
) -> Splats:
    """Splatter images (B, V, 12, h, w) in [-1, 1] → Splats with N = V·h·w (float32).

    ``c2w`` is (V, 4, 4) or (B, V, 4, 4), OpenCV camera-to-world of the views the images were
    generated for (``default_rig().c2w``). Differentiable; see the module docstring for the map.
    """
    _check_splatter_shape("decode_splatter_images: splatter", splatter, 12)
    B, V, _, h, w = splatter.shape
    if not isinstance(c2w, torch.Tensor) or c2w.shape not in ((V, 4, 4), (B, V, 4, 4)):
        raise ValueError(
            f"decode_splatter_images: c2w expected shape (V, 4, 4) or (B, V, 4, 4) = {(B, V, 4, 4)}, got {describe_shape(c2w)}"
        )
    if h < 2 or w < 2:
        raise ValueError(f"decode_splatter_images: splatter images must be at least 2x2 (x/(w-1) pixels), got {h}x{w}")
    x = splatter.float().permute(0, 1, 3, 4, 2)  # (B, V, h, w, 12)
    colors = x[..., 0:3] * 0.5 + 0.5
    s = x[..., 3:6] * 0.5 + 0.5
    scales = scale_min * s + scale_max * (1.0 - s)
    quats = x[..., 6:10]
    opacities = x[..., 10] * 0.5 + 0.5
    depth = x[..., 11:12] + cam_distance  # (B, V, h, w, 1)

    # DiffSplat's unproject_depth: z · K⁻¹·[j/(w−1), i/(h−1), 1] with the normalised K (cx = cy = 0.5)
    rows = torch.arange(h, dtype=torch.float32, device=splatter.device) / (h - 1)
    cols = torch.arange(w, dtype=torch.float32, device=splatter.device) / (w - 1)
    v, u = torch.meshgrid(rows, cols, indexing="ij")
    dirs_cam = torch.stack([(u - 0.5) / fxfy, (v - 0.5) / fxfy, torch.ones_like(u)], dim=-1)  # (h, w, 3)
    points_cam = depth * dirs_cam  # (B, V, h, w, 3)
    c2w = c2w.to(splatter.device, torch.float32).expand(B, V, 4, 4)[:, :, None, None]  # (B, V, 1, 1, 4, 4)
    means = (c2w[..., :3, :3] @ points_cam.unsqueeze(-1)).squeeze(-1) + c2w[..., :3, 3]

    def flat(t):  # (B, V, h, w, ...) -> (B, V·h·w, ...)
        return t.reshape(B, V * h * w, *t.shape[4:])

    return Splats(flat(means), flat(quats), flat(scales), flat(opacities), flat(colors))


def encode_splatter_images(
    colors: torch.Tensor,
    scales: torch.Tensor,
    quats: torch.Tensor,
    opacities: torch.Tensor,
    depths: torch.Tensor,
    cam_distance: float = DIFFSPLAT_RADIUS,
    scale_min: float = 5e-4,
    scale_max: float = 2e-2,
) -> torch.Tensor:
    """Per-pixel Gaussian maps → splatter images (B, V, 12, h, w), clamped to [-1, 1].

    The inverse of ``decode_splatter_images`` for ground truth in the same layout:
    ``colors (B,V,3,h,w)`` in [0,1], ``scales (B,V,3,h,w)`` in [scale_min, scale_max],
    ``quats (B,V,4,h,w)`` wxyz (L2-normalised here, as DiffSplat's GSRecon targets were),
    ``opacities (B,V,1,h,w)`` in [0,1], ``depths (B,V,1,h,w)`` camera z-depth of each pixel's
    Gaussian in that view (the decoder unprojects it along the x/(w−1) pixel ray).
    Values outside those ranges are clamped, so they do not round-trip.
    """
    _check_splatter_shape("encode_splatter_images: colors", colors, 3)
    like = (*colors.shape[:2], *colors.shape[3:])
    maps = {"scales": (scales, 3), "quats": (quats, 4), "opacities": (opacities, 1), "depths": (depths, 1)}
    for name, (value, channels) in maps.items():
        _check_splatter_shape(f"encode_splatter_images: {name}", value, channels, like)
    s = (scale_max - scales) / (scale_max - scale_min)  # inverse of scale = min·s + max·(1−s)
    quats = torch.nn.functional.normalize(quats, dim=2)
    splatter = torch.cat(
        [colors * 2 - 1, s * 2 - 1, quats, opacities * 2 - 1, depths - cam_distance], dim=2
    )  # (B, V, 12, h, w)
    return splatter.clamp(-1.0, 1.0)


# ----------------------------------------------------------------------------- PLY

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip
_PLY_PROPERTIES = (
    ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"]
    + ["scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
)
_PLY_REQUIRED = [p for p in _PLY_PROPERTIES if p not in ("nx", "ny", "nz")]
_PLY_EXPECTED = (
    "expected a 3D Gaussian Splatting PLY: 'ply', 'format binary_little_endian 1.0', one "
    "'element vertex N' with scalar properties " + " ".join(_PLY_PROPERTIES) + ", 'end_header', "
    "then N binary records"
)


def save_ply(path: str | os.PathLike, splats: Splats) -> None:
    """Write one object (B=1) as a standard 3DGS binary little-endian PLY (float32).

    Stored as the 3DGS trainers do: ``f_dc = (rgb − 0.5)/C0``, ``opacity = logit(o)`` with o
    clamped to [1e-6, 1 − 1e-6] first (so exact 0/1 come back as 1e-6 / 1 − 1e-6),
    ``scale = log(s)``, ``rot`` = wxyz quaternion as is, normals zero.
    """
    splats.validate()
    if splats.batch_size != 1:
        raise ValueError(f"save_ply: splats must hold one object (B=1), got B={splats.batch_size}; index it first")
    if (splats.scales <= 0).any():
        raise ValueError("save_ply: splats.scales must be positive (they are stored as log)")
    s = splats.detach().to(device="cpu", dtype=torch.float64)
    opacity = s.opacities.clamp(OPACITY_EPS, 1 - OPACITY_EPS)
    columns = torch.cat(
        [
            s.means,
            torch.zeros_like(s.means),
            (s.colors - 0.5) / SH_C0,
            torch.logit(opacity)[..., None],
            s.scales.log(),
            s.quats,
        ],
        dim=-1,
    )[0].numpy()  # (N, 17) in _PLY_PROPERTIES order
    records = np.empty(len(columns), dtype=[(name, "<f4") for name in _PLY_PROPERTIES])
    for k, name in enumerate(_PLY_PROPERTIES):
        records[name] = columns[:, k]
    header = "\n".join(
        ["ply", "format binary_little_endian 1.0", f"element vertex {len(records)}"]
        + [f"property float {name}" for name in _PLY_PROPERTIES]
        + ["end_header", ""]
    )
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(records.tobytes())


def load_ply(path: str | os.PathLike) -> Splats:
    """Read a 3DGS binary little-endian PLY into Splats (B=1, float32, CPU).

    Inverts ``save_ply``'s maps (``rgb = 0.5 + C0·f_dc``, not clamped; sigmoid; exp). Extra
    properties are ignored; higher SH bands (``f_rest_*``) are dropped with a warning, since
    Splats holds SH degree 0 only. A malformed file raises ValueError naming the problem.
    """
    with open(path, "rb") as f:
        data = f.read()
    end = data.find(b"end_header")
    newline = data.find(b"\n", end)
    if not data.startswith(b"ply") or end < 0 or newline < 0:
        raise ValueError(f"load_ply({path}): no 'ply' ... 'end_header' header; {_PLY_EXPECTED}")
    try:
        lines = [line.strip().split() for line in data[:end].decode("ascii").splitlines()]
    except UnicodeDecodeError:
        raise ValueError(f"load_ply({path}): header is not ASCII; {_PLY_EXPECTED}") from None

    fmt, count, props = None, None, []
    for words in lines[1:]:
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format":
            fmt = words[1:]
        elif words[0] == "element":
            if count is not None or words[1:2] != ["vertex"] or len(words) != 3 or not words[2].isdigit():
                raise ValueError(f"load_ply({path}): unsupported element {' '.join(words)!r}; {_PLY_EXPECTED}")
            count = int(words[2])
        elif words[0] == "property":
            if count is None or len(words) != 3 or words[1] not in _PLY_TYPES:
                raise ValueError(f"load_ply({path}): unsupported property {' '.join(words)!r}; {_PLY_EXPECTED}")
            props.append((words[2], "<" + _PLY_TYPES[words[1]]))
        else:
            raise ValueError(f"load_ply({path}): unknown header line {' '.join(words)!r}; {_PLY_EXPECTED}")
    if fmt != ["binary_little_endian", "1.0"]:
        raise ValueError(f"load_ply({path}): format {' '.join(fmt or ['missing'])!r} is not supported; {_PLY_EXPECTED}")
    if count is None:
        raise ValueError(f"load_ply({path}): no 'element vertex N' line; {_PLY_EXPECTED}")
    names = [name for name, _ in props]
    missing = [p for p in _PLY_REQUIRED if p not in names]
    if missing or len(set(names)) != len(names):
        raise ValueError(f"load_ply({path}): missing or repeated properties {missing or names}; {_PLY_EXPECTED}")
    if any(name.startswith("f_rest_") for name in names):
        warnings.warn(f"load_ply({path}): ignoring higher SH bands (f_rest_*); Splats keeps SH degree 0 only")

    dtype = np.dtype(props)
    body = data[newline + 1 :]
    if len(body) != count * dtype.itemsize:
        raise ValueError(
            f"load_ply({path}): body has {len(body)} bytes, expected {count} vertices x {dtype.itemsize} "
            f"bytes = {count * dtype.itemsize} (truncated or wrong header); {_PLY_EXPECTED}"
        )
    records = np.frombuffer(body, dtype=dtype, count=count)

    def column(*keys) -> torch.Tensor:  # (1, N, len(keys)) float64
        return torch.from_numpy(np.stack([records[k].astype(np.float64) for k in keys], axis=-1))[None]

    splats = Splats(
        means=column("x", "y", "z"),
        quats=column("rot_0", "rot_1", "rot_2", "rot_3"),
        scales=column("scale_0", "scale_1", "scale_2").exp(),
        opacities=torch.sigmoid(column("opacity"))[..., 0],
        colors=0.5 + SH_C0 * column("f_dc_0", "f_dc_1", "f_dc_2"),
    ).to(torch.float32)
    try:
        return splats.validate()
    except ValueError as err:
        raise ValueError(f"load_ply({path}): {err}") from None
