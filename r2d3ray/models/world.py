"""The tiny prior's procedural world: a vocabulary of single objects and their exact ground truth.

A prompt names one object: ``"a [size] [attribute] <color> <shape>"``, e.g. ``"a small red cube"``,
``"a large tall blue cylinder"``, ``"a flat green torus"``. Size and attribute are optional
(no size word = medium). Every object is centred at the origin of the y-up world, yawed by
``OBJECT_YAW_DEG`` so that the default rig sees two faces of a cube, with the torus tilted towards
the cameras so that its hole is visible.

Ground truth is a DiffSplat-layout splatter image per view (see ``render_ground_truth``): one
Gaussian per pixel, placed where that pixel's ray first hits the object.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

import torch
from scipy.spatial.transform import Rotation

from r2d3ray.render.cameras import Cameras, pixel_rays
from r2d3ray.splats import encode_splatter_images

# Distinguishable in RGB and visible on the white render background (hence gray, not white).
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.12),
    "green": (0.15, 0.65, 0.2),
    "blue": (0.15, 0.3, 0.9),
    "yellow": (0.95, 0.85, 0.1),
    "orange": (0.95, 0.5, 0.05),
    "purple": (0.55, 0.15, 0.75),
    "gray": (0.5, 0.5, 0.5),
    "black": (0.08, 0.08, 0.08),
}
SHAPES: tuple[str, ...] = ("cube", "sphere", "cone", "cylinder", "torus")
# Size word -> uniform scale of the object's half-extents. "" is the default (medium).
SIZES: dict[str, float] = {"small": 0.65, "": 1.0, "large": 1.35}
# Attribute word -> stretch of the object's own (x, y, z) axes. "" is no attribute.
ATTRIBUTES: dict[str, tuple[float, float, float]] = {
    "": (1.0, 1.0, 1.0),
    "tall": (0.8, 1.5, 0.8),
    "flat": (1.2, 0.45, 1.2),
}
# Half-extent of a medium object in world units: the default rig (radius 1.4, fx 1.3889) sees
# about ±0.5 at the origin, so even a large tall object stays in frame.
BASE_HALF_EXTENT = 0.24
OBJECT_YAW_DEG = 30.0
TORUS_TILT_DEG = 50.0

_ARTICLES = ("a", "an", "the")
_SIZE_ALIASES = {"medium": ""}
NUM_HELD_OUT = 64
_SPLIT_SEED = 1234


@dataclass(frozen=True)
class ObjectSpec:
    """One object of the world. ``size``/``attribute`` are "" when the prompt gives none."""

    color: str
    shape: str
    size: str = ""
    attribute: str = ""

    def __post_init__(self):
        for field, value, known in (
            ("color", self.color, COLORS),
            ("shape", self.shape, SHAPES),
            ("size", self.size, SIZES),
            ("attribute", self.attribute, ATTRIBUTES),
        ):
            if value not in known:
                raise ValueError(f"ObjectSpec.{field}={value!r} is unknown; expected one of {sorted(known)}")

    @property
    def half_extents(self) -> tuple[float, float, float]:
        """Half-extents along the object's own x, y, z axes (world units)."""
        s = BASE_HALF_EXTENT * SIZES[self.size]
        return tuple(s * a for a in ATTRIBUTES[self.attribute])


def vocabulary() -> dict[str, list[str]]:
    """Every word ``parse_prompt`` accepts, by role."""
    return {
        "article": list(_ARTICLES),
        "size": [w for w in SIZES if w] + list(_SIZE_ALIASES),
        "attribute": [w for w in ATTRIBUTES if w],
        "color": list(COLORS),
        "shape": list(SHAPES),
    }


def parse_prompt(text: str) -> ObjectSpec:
    """Parse ``"a [size] [attribute] <color> <shape>"`` (any word order, case, punctuation).

    Raises ValueError naming the offending word and listing the known words when a word is
    outside the vocabulary, a colour or shape is missing, or a role is given twice.
    """
    if not isinstance(text, str):
        raise ValueError(f"prompt must be a str, got {type(text).__name__}")
    words = re.findall(r"[a-z]+", text.lower())
    roles = {role: [] for role in ("size", "attribute", "color", "shape")}
    for word in words:
        if word in _ARTICLES:
            continue
        if word in COLORS:
            roles["color"].append(word)
        elif word in SHAPES:
            roles["shape"].append(word)
        elif word in SIZES or word in _SIZE_ALIASES:
            roles["size"].append(_SIZE_ALIASES.get(word, word))
        elif word in ATTRIBUTES:
            roles["attribute"].append(word)
        else:
            raise ValueError(
                f"prompt {text!r}: unknown word {word!r}; the tiny world knows {_known_words()}"
            )
    for role, found in roles.items():
        if len(found) > 1:
            raise ValueError(f"prompt {text!r}: more than one {role} ({found}); give at most one")
    for role in ("color", "shape"):
        if not roles[role]:
            raise ValueError(f"prompt {text!r}: no {role} word; expected one of {vocabulary()[role]}")
    return ObjectSpec(**{role: found[0] if found else "" for role, found in roles.items()})


def _known_words() -> str:
    return "; ".join(f"{role}: {', '.join(words)}" for role, words in vocabulary().items())


def prompt_for(spec: ObjectSpec) -> str:
    """The canonical prompt of ``spec``: ``parse_prompt(prompt_for(s)) == s``."""
    words = [spec.size, spec.attribute, spec.color, spec.shape]
    return "a " + " ".join(w for w in words if w)


def all_prompts() -> list[str]:
    """Every canonical prompt of the world (sizes × attributes × colours × shapes), sorted."""
    return sorted(
        prompt_for(ObjectSpec(color, shape, size, attribute))
        for size, attribute, color, shape in itertools.product(SIZES, ATTRIBUTES, COLORS, SHAPES)
    )


def _split() -> tuple[list[str], list[str]]:
    # A fixed permutation, so the held-out set never changes between runs or machines.
    prompts = all_prompts()
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(_SPLIT_SEED)).tolist()
    held_out = sorted(prompts[i] for i in order[:NUM_HELD_OUT])
    train = sorted(prompts[i] for i in order[NUM_HELD_OUT:])
    return train, held_out


def split_prompts(split: str = "train") -> list[str]:
    """The deterministic ``"train"`` or ``"held_out"`` prompts (64 held out, the rest train)."""
    train, held_out = _split()
    if split == "train":
        return train
    if split == "held_out":
        return held_out
    raise ValueError(f"split={split!r} is unknown; expected 'train' or 'held_out'")


def sample_prompts(n: int, generator: torch.Generator | None = None, split: str = "train") -> list[str]:
    """``n`` prompts drawn uniformly with replacement from ``split`` ("train" or "held_out")."""
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    pool = split_prompts(split)
    idx = torch.randint(len(pool), (n,), generator=generator).tolist()
    return [pool[i] for i in idx]


# ----------------------------------------------------------------------------- ground truth
#
# Each primitive lives in a canonical frame where its half-extents are 1 (the torus: outer radius
# 1, tube radius TORUS_TUBE). World point x = R · (half_extents ⊙ p). Rays are mapped into the
# canonical frame and sphere-traced against the canonical signed distance; one code path for all
# shapes, exact to SURFACE_TOLERANCE (torch has no ray-primitive library that does this for us).

TORUS_TUBE = 0.32
SURFACE_TOLERANCE = 1e-4  # canonical units; a medium object's canonical unit is 0.24 world units
_TRACE_STEPS = 128
_BOUND_RADIUS = math.sqrt(3.0)  # every canonical primitive lies inside this sphere


def _canonical_sdf(shape: str, p: torch.Tensor) -> torch.Tensor:
    """Signed distance (a lower bound for the cone) to the canonical ``shape``: (...,3) -> (...)."""
    x, y, z = p.unbind(-1)
    radial = torch.sqrt(x * x + z * z + 1e-12)
    if shape == "sphere":
        return p.norm(dim=-1) - 1.0
    if shape == "cube":
        q = p.abs() - 1.0
        return q.clamp(min=0).norm(dim=-1) + q.amax(dim=-1).clamp(max=0)
    if shape == "cylinder":
        q = torch.stack([radial - 1.0, y.abs() - 1.0], dim=-1)
        return q.clamp(min=0).norm(dim=-1) + q.amax(dim=-1).clamp(max=0)
    if shape == "cone":
        # apex (0,1,0), base radius 1 at y=-1: max of the distances to the lateral line
        # r = (1-y)/2 and to the base plane, a lower bound of the true distance (convex shape).
        lateral = (radial - (1.0 - y) / 2.0) * (2.0 / math.sqrt(5.0))
        return torch.maximum(lateral, -y - 1.0)
    if shape == "torus":
        ring = torch.stack([radial - (1.0 - TORUS_TUBE), y], dim=-1)
        return ring.norm(dim=-1) - TORUS_TUBE
    raise ValueError(f"shape={shape!r} is unknown; expected one of {SHAPES}")


def _object_rotation(spec: ObjectSpec) -> torch.Tensor:
    """Object-to-world rotation (3,3): yaw about y, and the torus tilted about x towards the rig."""
    yaw, tilt = math.radians(OBJECT_YAW_DEG), math.radians(TORUS_TILT_DEG if spec.shape == "torus" else 0.0)
    c, s = math.cos(yaw), math.sin(yaw)
    rot_y = torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    c, s = math.cos(tilt), math.sin(tilt)
    rot_x = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    return rot_y @ rot_x


def cast_rays(specs: ObjectSpec | list[ObjectSpec], origins: torch.Tensor, dirs: torch.Tensor):
    """First hit of each world ray with each object of ``specs`` (all objects share the rays).

    ``origins``, ``dirs`` (..., 3) world space (dirs need not be unit). Returns ``hit (P, ...)``
    bool, ``points (P, ..., 3)`` world hit points and ``normals (P, ..., 3)`` unit outward world
    normals (both meaningless where ``hit`` is False); no P dim when ``specs`` is one ObjectSpec.
    """
    single = isinstance(specs, ObjectSpec)
    specs = [specs] if single else list(specs)
    P, lead = len(specs), (1,) * (origins.ndim - 1)
    rot = torch.stack([_object_rotation(spec) for spec in specs]).to(origins).view(P, *lead, 3, 3)
    half = torch.tensor([spec.half_extents for spec in specs]).to(origins).view(P, *lead, 3)
    # world -> canonical: p = (Rᵀ x) / half; as row vectors, x @ R = (Rᵀ x)ᵀ
    o = (origins.unsqueeze(-2) @ rot).squeeze(-2) / half  # (P, ..., 3)
    d = torch.nn.functional.normalize((dirs.unsqueeze(-2) @ rot).squeeze(-2) / half, dim=-1)

    # Start where the ray enters the bounding sphere; rays that miss it never hit.
    b = (o * d).sum(-1)
    disc = b * b - ((o * o).sum(-1) - _BOUND_RADIUS**2)
    root = disc.clamp(min=0).sqrt()
    t, t_exit = (-b - root).clamp(min=0), torch.where(disc > 0, -b + root, torch.zeros_like(b))
    hit = torch.zeros_like(t, dtype=torch.bool)
    grad = torch.zeros_like(o)  # canonical SDF gradient at the hit
    for shape in sorted({spec.shape for spec in specs}):  # one batched trace per shape
        index = torch.tensor([i for i, spec in enumerate(specs) if spec.shape == shape])
        o_s, d_s, t_s, t_exit_s = o[index], d[index], t[index], t_exit[index]
        for step in range(_TRACE_STEPS):
            dist = _canonical_sdf(shape, o_s + t_s[..., None] * d_s)
            marching = (dist > SURFACE_TOLERANCE * 0.5) & (t_s < t_exit_s)
            t_s = torch.where(marching, t_s + dist, t_s)
            if step % 8 == 7 and not marching.any():
                break
        p = o_s + t_s[..., None] * d_s
        t[index] = t_s
        hit[index] = (t_s < t_exit_s) & (_canonical_sdf(shape, p).abs() < 10 * SURFACE_TOLERANCE)
        # central finite differences of the canonical SDF
        offsets = torch.eye(3).to(p) * 1e-4
        grad[index] = torch.stack([_canonical_sdf(shape, p + e) - _canonical_sdf(shape, p - e) for e in offsets], -1)

    # canonical -> world: points x = R (half ⊙ p); normals by the inverse transpose, R (grad / half).
    rot_t = rot.transpose(-1, -2)
    points = ((o + t[..., None] * d) * half).unsqueeze(-2) @ rot_t
    normals = torch.nn.functional.normalize(((grad / half).unsqueeze(-2) @ rot_t).squeeze(-2), dim=-1)
    points = points.squeeze(-2)
    if single:
        return hit[0], points[0], normals[0]
    return hit, points, normals


def silhouette(spec: ObjectSpec, cameras: Cameras) -> torch.Tensor:
    """Exact object mask seen by ``cameras`` at their resolution, (V,1,H,W) bool.

    Uses the renderer's pixel-centre convention (``pixel_rays``), so it compares directly with
    ``render_splats(...).alphas > 0.5``.
    """
    origins, dirs = pixel_rays(cameras)  # (V, H, W, 3)
    hit, _, _ = cast_rays(spec, origins, dirs)
    return hit.unsqueeze(-3)


def silhouette_iou(alphas: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Per object, the intersection over union of the drawn pixels (``alphas`` (B, V, 1, H, W) above
    ``threshold``) and the exact ``silhouette`` masks ``target`` (B, V, 1, H, W) bool, over all views: (B,)."""
    drawn = alphas > threshold
    return (drawn & target).sum((1, 2, 3, 4)) / (drawn | target).sum((1, 2, 3, 4)).clamp(min=1)


def render_ground_truth(
    specs: ObjectSpec | str | list[ObjectSpec | str],
    cameras: Cameras,
    size: int,
    scale_min: float = 5e-4,
    scale_max: float = 2e-2,
) -> torch.Tensor:
    """DiffSplat-layout splatter images of ``specs`` seen by ``cameras``: (V, 12, size, size) in
    [-1, 1] for one object (ObjectSpec or prompt), (P, V, 12, size, size) for a list of P.

    One Gaussian per pixel, on the pixel's ray under ``decode_splatter_images``' convention
    (column j at x = j/(size−1)), with the rig's own focal (``Ks[0,0]/width``) and distance to the
    origin (``cam_distance``), so decoding with the same rig puts it back on the surface:

    * hit pixels: opacity 1, depth = z-depth of the first hit; the Gaussian is a disc tangent to
      the surface (shortest axis = surface normal, ``scale_min``; the other two half the pixel's
      footprint, 0.5·z/(fxfy·(size−1)), clamped to [scale_min, scale_max]: neighbours overlap
      without smearing the silhouette).
    * missed pixels: opacity 0, depth ``cam_distance`` (the plane through the origin), the
      smallest scale and a camera-facing orientation: transparent, and if a generated opacity
      leaks above 0 such a Gaussian stays a sub-pixel speck inside the object's region instead of
      a haze around it.
    * colour: the prompted ``COLORS`` value, flat (no shading), on every pixel.

    ``scale_min``/``scale_max`` must match the decoder's.
    """
    single = not isinstance(specs, (list, tuple))
    specs = [parse_prompt(s) if isinstance(s, str) else s for s in ([specs] if single else specs)]
    if size < 2:
        raise ValueError(f"size={size} must be >= 2 (DiffSplat's x/(size-1) pixel convention)")
    c2w = cameras.c2w.float()  # (V, 4, 4)
    if c2w.ndim != 3:
        raise ValueError(f"cameras must be an unbatched rig (V,4,4), got viewmats {tuple(cameras.viewmats.shape)}")
    P, V = len(specs), c2w.shape[0]
    fxfy = (cameras.Ks[:, 0, 0] / cameras.width).float().view(V, 1, 1)
    cam_distance = c2w[:, :3, 3].norm(dim=-1)  # (V,)

    coords = torch.arange(size, dtype=torch.float32) / (size - 1) - 0.5
    v, u = torch.meshgrid(coords, coords, indexing="ij")
    dirs_cam = torch.stack([u / fxfy, v / fxfy, torch.ones(V, size, size)], dim=-1)  # (V, h, w, 3), z = 1
    rot_c2w = c2w[:, None, None, :3, :3]  # (V, 1, 1, 3, 3)
    dirs = (rot_c2w @ dirs_cam.unsqueeze(-1)).squeeze(-1)  # (V, h, w, 3)
    origins = c2w[:, None, None, :3, 3].expand_as(dirs)
    hit, points, normals = cast_rays(specs, origins, dirs)  # (P, V, h, w), (P, V, h, w, 3) x2

    # z-depth in each view's camera frame: (x − o) · camera forward axis.
    depth = ((points - origins) * c2w[:, None, None, :3, 2]).sum(-1)
    depth = torch.where(hit, depth, cam_distance.view(V, 1, 1))  # (P, V, h, w)

    # Rotation = (camera-to-world) ∘ (camera z axis -> camera-space normal). The normal is flipped
    # to point away from the camera (same ellipsoid) so the local quaternion's w >= 1 and the
    # per-view quaternion map stays smooth; misses keep the camera-facing identity.
    n_cam = (rot_c2w.transpose(-1, -2) @ normals.unsqueeze(-1)).squeeze(-1)  # (P, V, h, w, 3)
    n_cam = torch.where((n_cam[..., 2:] < 0) & hit[..., None], -n_cam, n_cam)
    n_cam = torch.where(hit[..., None], n_cam, torch.tensor([0.0, 0.0, 1.0]))
    q_local = torch.stack([n_cam[..., 1].neg(), n_cam[..., 0], torch.zeros_like(depth), 1.0 + n_cam[..., 2]], -1)
    view_of_pixel = torch.arange(V).repeat_interleave(size * size).repeat(P).numpy()
    rot_world = Rotation.from_matrix(c2w[:, :3, :3].double().numpy())[view_of_pixel]
    xyzw = (rot_world * Rotation.from_quat(q_local.reshape(-1, 4).double().numpy())).as_quat()  # scalar last
    quats = torch.from_numpy(xyzw[:, [3, 0, 1, 2]]).float().reshape(P, V, size, size, 4)

    footprint = (0.5 * depth / (fxfy * (size - 1))).clamp(scale_min, scale_max)
    footprint = torch.where(hit, footprint, scale_min)  # a miss whose opacity leaks stays a speck
    scales = torch.stack([footprint, footprint, torch.full_like(footprint, scale_min)], dim=-1)
    colors = torch.tensor([COLORS[spec.color] for spec in specs]).view(P, 1, 1, 1, 3).expand(P, V, size, size, 3)

    def channels_first(t):  # (P, V, h, w, C) -> (P, V, C, h, w)
        return t.permute(0, 1, 4, 2, 3)

    splatter = encode_splatter_images(
        colors=channels_first(colors),
        scales=channels_first(scales),
        quats=channels_first(quats),
        opacities=channels_first(hit.float()[..., None]),
        depths=channels_first(depth[..., None]),
        cam_distance=float(cam_distance.mean()),
        scale_min=scale_min,
        scale_max=scale_max,
    )
    return splatter[0] if single else splatter
